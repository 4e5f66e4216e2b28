//! Validator of requests and answers against a Google API discovery document (the description
//! Google's client libraries are generated from), and the embedded Cloud Run Admin API v2
//! document.

use std::collections::HashMap;
use std::sync::OnceLock;

use chrono::DateTime;
use serde_json::{json, Map, Value};

/// The published Cloud Run Admin API v2 discovery document (`rootUrl`
/// `https://run.googleapis.com/`; its paths start with `v2/`).
pub const CLOUD_RUN_DISCOVERY: &str = include_str!("../specs/cloudrun-v2-discovery.json");

/// `@type` of an Execution inside an Operation.
pub(crate) const EXECUTION_TYPE: &str = "type.googleapis.com/google.cloud.run.v2.Execution";

/// A `google-duration` in seconds (`"600s"`, `"1.5s"`).
pub(crate) fn parse_duration(value: &str) -> Option<f64> {
    let number = value.strip_suffix('s')?;
    if number.is_empty()
        || !number
            .bytes()
            .all(|b| b.is_ascii_digit() || b == b'.' || b == b'-')
    {
        return None;
    }
    number.parse().ok()
}

/// Validates requests (and answers) against a Google API discovery document: path, HTTP method,
/// path-parameter patterns, query parameters (the method's and the API's standard ones), and
/// JSON bodies against the method's request schema, strictly: unknown field names, wrong JSON
/// types, values outside an `enum`, malformed `google-duration` / `google-datetime` / `int64`
/// strings, output-only fields, and missing fields documented as `Required.` are all errors.
///
/// Answers are checked the same way against the response schema, output-only fields allowed, so
/// a fake's shapes are the published ones.
#[derive(Debug)]
pub struct DiscoveryValidator {
    schemas: Map<String, Value>,
    /// The API-wide query parameters (`alt`, `fields`, `$.xgafv`, …).
    common: Map<String, Value>,
    methods: Vec<DiscoveryMethod>,
}

#[derive(Debug)]
struct DiscoveryMethod {
    http_method: String,
    segments: Vec<PathSegment>,
    /// The expanded path (`v2/{+name}:run`), for path-parameter patterns.
    path: String,
    params: Map<String, Value>,
    request: Option<String>,
    response: Option<String>,
}

#[derive(Debug)]
enum PathSegment {
    Literal(String),
    Param,
    /// `{name}:verb`
    ParamVerb(String),
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Direction {
    Request,
    Response,
}

impl DiscoveryValidator {
    /// The validator of [`CLOUD_RUN_DISCOVERY`], parsed once per process.
    ///
    /// # Panics
    ///
    /// Panics if the embedded document is not a discovery document.
    pub fn cloud_run() -> &'static DiscoveryValidator {
        static VALIDATOR: OnceLock<DiscoveryValidator> = OnceLock::new();
        VALIDATOR.get_or_init(|| {
            DiscoveryValidator::from_json(CLOUD_RUN_DISCOVERY)
                .expect("the embedded Cloud Run discovery document parses")
        })
    }

    /// Reads a discovery document.
    pub fn from_json(document: &str) -> Result<Self, String> {
        let doc: Value = serde_json::from_str(document).map_err(|e| e.to_string())?;
        let schemas = doc
            .get("schemas")
            .and_then(Value::as_object)
            .cloned()
            .ok_or("the document has no schemas")?;
        let common = doc
            .get("parameters")
            .and_then(Value::as_object)
            .cloned()
            .unwrap_or_default();
        let mut methods = Vec::new();
        collect_methods(doc.get("resources"), &mut methods)?;
        if methods.is_empty() {
            return Err("the document has no methods".to_owned());
        }
        Ok(Self {
            schemas,
            common,
            methods,
        })
    }

    /// Finds the method of `method path` (`path` without leading `/`, e.g. `v2/projects/…`).
    fn method(&self, method: &str, path: &str) -> Result<&DiscoveryMethod, String> {
        let segments: Vec<&str> = path.split('/').collect();
        let matching: Vec<&DiscoveryMethod> = self
            .methods
            .iter()
            .filter(|m| m.matches(&segments))
            .collect();
        if matching.is_empty() {
            return Err(format!("no method of the API serves the path /{path}"));
        }
        matching
            .into_iter()
            .filter(|m| m.http_method == method)
            .max_by_key(|m| m.literal_count())
            .ok_or_else(|| format!("method {method} not allowed on /{path}"))
    }

    /// Checks one request; the error explains the first problems found.
    pub fn validate_request(
        &self,
        method: &str,
        path: &str,
        query: &[(String, String)],
        body: Option<&Value>,
    ) -> Result<(), String> {
        let m = self.method(method, path)?;
        let mut problems = Vec::new();
        m.check_path_params(path, &mut problems);
        self.check_query(m, query, &mut problems);
        match (&m.request, body) {
            (None, Some(_)) => problems.push(format!("{method} /{path} takes no request body")),
            (Some(schema), Some(body)) => self.check(
                &json!({ "$ref": schema }),
                body,
                "",
                Direction::Request,
                &mut problems,
            ),
            _ => {}
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(problems.join("; "))
        }
    }

    /// Checks an answer of `method path` against the method's response schema (and an
    /// Operation's Execution metadata against the Execution schema).
    pub fn validate_response(
        &self,
        method: &str,
        path: &str,
        body: &Value,
    ) -> Result<(), Vec<String>> {
        let m = self.method(method, path).map_err(|e| vec![e])?;
        let mut problems = Vec::new();
        if let Some(schema) = &m.response {
            self.check(
                &json!({ "$ref": schema }),
                body,
                "",
                Direction::Response,
                &mut problems,
            );
        }
        for key in ["metadata", "response"] {
            if let Some(Value::Object(inner)) = body.get(key) {
                if inner.get("@type").and_then(Value::as_str) == Some(EXECUTION_TYPE) {
                    let mut execution = inner.clone();
                    execution.remove("@type");
                    self.check(
                        &json!({"$ref": "GoogleCloudRunV2Execution"}),
                        &Value::Object(execution),
                        key,
                        Direction::Response,
                        &mut problems,
                    );
                }
            }
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(problems)
        }
    }

    fn check_query(
        &self,
        m: &DiscoveryMethod,
        query: &[(String, String)],
        problems: &mut Vec<String>,
    ) {
        let mut seen: HashMap<&str, usize> = HashMap::new();
        for (name, value) in query {
            let param = m
                .params
                .get(name)
                .filter(|p| p.get("location").and_then(Value::as_str) == Some("query"))
                .or_else(|| self.common.get(name));
            let Some(param) = param else {
                problems.push(format!("Invalid JSON payload received. Unknown name \"{name}\": Cannot bind query parameter."));
                continue;
            };
            let count = seen.entry(name.as_str()).or_default();
            *count += 1;
            let repeated = param.get("repeated").and_then(Value::as_bool) == Some(true);
            if *count > 1 && !repeated {
                problems.push(format!("query parameter {name:?} may appear once"));
            }
            if let Err(e) = check_scalar(param, value) {
                problems.push(format!("Invalid value at '{name}' ({e})"));
            }
        }
        for (name, param) in &m.params {
            let required = param.get("required").and_then(Value::as_bool) == Some(true);
            let in_query = param.get("location").and_then(Value::as_str) == Some("query");
            if required && in_query && !seen.contains_key(name.as_str()) {
                problems.push(format!("missing required query parameter {name:?}"));
            }
        }
    }

    fn check(
        &self,
        schema: &Value,
        value: &Value,
        at: &str,
        direction: Direction,
        problems: &mut Vec<String>,
    ) {
        if let Some(reference) = schema.get("$ref").and_then(Value::as_str) {
            match self.schemas.get(reference) {
                Some(target) => self.check(target, value, at, direction, problems),
                None => problems.push(format!("unresolvable schema {reference:?}")),
            }
            return;
        }
        if value.is_null() {
            // proto3 JSON reads null as the field's default.
            return;
        }
        let kind = schema.get("type").and_then(Value::as_str).unwrap_or("any");
        let shown = || {
            if at.is_empty() {
                "(root)".to_owned()
            } else {
                at.to_owned()
            }
        };
        match kind {
            "object" => {
                let Some(object) = value.as_object() else {
                    problems.push(format!(
                        "Invalid value at '{}' (type.googleapis.com/object), {value}",
                        shown()
                    ));
                    return;
                };
                let properties = schema.get("properties").and_then(Value::as_object);
                let additional = schema.get("additionalProperties");
                for (key, item) in object {
                    let path = if at.is_empty() {
                        key.clone()
                    } else {
                        format!("{at}.{key}")
                    };
                    match (properties.and_then(|p| p.get(key)), additional) {
                        (Some(property), _) => {
                            if direction == Direction::Request
                                && property.get("readOnly").and_then(Value::as_bool) == Some(true)
                            {
                                problems.push(format!("field '{path}' is output only"));
                            }
                            self.check(property, item, &path, direction, problems);
                        }
                        (None, Some(additional)) => self.check(additional, item, &path, direction, problems),
                        (None, None) => problems.push(format!(
                            "Invalid JSON payload received. Unknown name \"{key}\" at '{}': Cannot find field.",
                            shown()
                        )),
                    }
                }
                if direction == Direction::Request {
                    for (key, property) in properties.into_iter().flatten() {
                        let required = property
                            .get("description")
                            .and_then(Value::as_str)
                            .is_some_and(|d| d.starts_with("Required."));
                        if required && !object.contains_key(key) {
                            let path = if at.is_empty() {
                                key.clone()
                            } else {
                                format!("{at}.{key}")
                            };
                            problems.push(format!("Required field '{path}' is missing"));
                        }
                    }
                }
            }
            "array" => {
                let Some(items) = value.as_array() else {
                    problems.push(format!("Invalid value at '{}' (array), {value}", shown()));
                    return;
                };
                let item_schema = schema
                    .get("items")
                    .cloned()
                    .unwrap_or_else(|| json!({"type": "any"}));
                for (i, item) in items.iter().enumerate() {
                    self.check(
                        &item_schema,
                        item,
                        &format!("{at}[{i}]"),
                        direction,
                        problems,
                    );
                }
            }
            "any" => {}
            _ => {
                let text = match value {
                    Value::String(s) => s.clone(),
                    Value::Number(_) | Value::Bool(_) => value.to_string(),
                    _ => {
                        problems.push(format!("Invalid value at '{}' ({kind}), {value}", shown()));
                        return;
                    }
                };
                // JSON types must fit too: proto3 takes int64 as a string or a number, the rest
                // as their own JSON type.
                let format = schema.get("format").and_then(Value::as_str).unwrap_or("");
                let type_ok = match kind {
                    "string" => {
                        value.is_string()
                            || (matches!(format, "int64" | "uint64") && value.is_i64())
                    }
                    "integer" | "number" => value.is_number(),
                    "boolean" => value.is_boolean(),
                    _ => true,
                };
                if !type_ok {
                    problems.push(format!("Invalid value at '{}' ({kind}), {value}", shown()));
                    return;
                }
                if let Err(e) = check_scalar(schema, &text) {
                    problems.push(format!("Invalid value at '{}' ({e})", shown()));
                }
            }
        }
    }
}

/// Checks a scalar's text against a discovery `type`, `format` and `enum`.
fn check_scalar(schema: &Value, text: &str) -> Result<(), String> {
    let kind = schema
        .get("type")
        .and_then(Value::as_str)
        .unwrap_or("string");
    let format = schema.get("format").and_then(Value::as_str).unwrap_or("");
    let ok = match (kind, format) {
        ("integer", "int32") => text.parse::<i32>().is_ok(),
        ("integer", "uint32") => text.parse::<u32>().is_ok(),
        ("integer", _) | ("string", "int64") => text.parse::<i64>().is_ok(),
        ("string", "uint64") => text.parse::<u64>().is_ok(),
        ("number", _) => text.parse::<f64>().is_ok(),
        ("boolean", _) => matches!(text, "true" | "false"),
        ("string", "google-duration") => parse_duration(text).is_some(),
        ("string", "google-datetime") => DateTime::parse_from_rfc3339(text).is_ok(),
        _ => true,
    };
    if !ok {
        return Err(format!(
            "{kind}{}, {text:?}",
            if format.is_empty() {
                String::new()
            } else {
                format!(" {format}")
            }
        ));
    }
    if let Some(allowed) = schema.get("enum").and_then(Value::as_array) {
        if !allowed.iter().any(|a| a.as_str() == Some(text)) {
            return Err(format!("{text:?} is not a value of the enum"));
        }
    }
    Ok(())
}

fn collect_methods(
    resources: Option<&Value>,
    out: &mut Vec<DiscoveryMethod>,
) -> Result<(), String> {
    let Some(resources) = resources.and_then(Value::as_object) else {
        return Ok(());
    };
    for resource in resources.values() {
        for (name, method) in resource
            .get("methods")
            .and_then(Value::as_object)
            .into_iter()
            .flatten()
        {
            let text = |key: &str| method.get(key).and_then(Value::as_str).map(str::to_owned);
            let flat = text("flatPath")
                .or_else(|| text("path"))
                .ok_or_else(|| format!("method {name} has no path"))?;
            let segments = flat
                .split('/')
                .map(
                    |s| match s.strip_prefix('{').and_then(|rest| rest.split_once('}')) {
                        Some((_, "")) => PathSegment::Param,
                        Some((_, verb)) => {
                            PathSegment::ParamVerb(verb.trim_start_matches(':').to_owned())
                        }
                        None => PathSegment::Literal(s.to_owned()),
                    },
                )
                .collect();
            out.push(DiscoveryMethod {
                http_method: text("httpMethod")
                    .ok_or_else(|| format!("method {name} has no httpMethod"))?,
                segments,
                path: text("path").unwrap_or(flat),
                params: method
                    .get("parameters")
                    .and_then(Value::as_object)
                    .cloned()
                    .unwrap_or_default(),
                request: method
                    .pointer("/request/$ref")
                    .and_then(Value::as_str)
                    .map(str::to_owned),
                response: method
                    .pointer("/response/$ref")
                    .and_then(Value::as_str)
                    .map(str::to_owned),
            });
        }
        collect_methods(resource.get("resources"), out)?;
    }
    Ok(())
}

impl DiscoveryMethod {
    fn matches(&self, segments: &[&str]) -> bool {
        self.segments.len() == segments.len()
            && self
                .segments
                .iter()
                .zip(segments)
                .all(|(template, actual)| match template {
                    PathSegment::Literal(l) => l == actual,
                    PathSegment::Param => !actual.is_empty() && !actual.contains(':'),
                    PathSegment::ParamVerb(verb) => actual
                        .strip_suffix(verb.as_str())
                        .and_then(|s| s.strip_suffix(':'))
                        .is_some_and(|id| !id.is_empty() && !id.contains(':')),
                })
    }

    fn literal_count(&self) -> usize {
        self.segments
            .iter()
            .filter(|s| matches!(s, PathSegment::Literal(_)))
            .count()
    }

    /// Checks the `{+name}` expansion of the request path against the parameter's `pattern`.
    fn check_path_params(&self, path: &str, problems: &mut Vec<String>) {
        let Some((prefix, rest)) = self.path.split_once("{+") else {
            return;
        };
        let Some((name, suffix)) = rest.split_once('}') else {
            return;
        };
        let Some(value) = path
            .strip_prefix(prefix)
            .and_then(|v| v.strip_suffix(suffix))
        else {
            return;
        };
        let Some(pattern) = self.params.get(name).and_then(|p| p.get("pattern")) else {
            return;
        };
        let matches = jsonschema::validator_for(&json!({ "type": "string", "pattern": pattern }))
            .map(|v| v.is_valid(&json!(value)));
        if !matches!(matches, Ok(true)) {
            problems.push(format!(
                "path parameter {name} = {value:?} does not match {pattern}"
            ));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::q;
    use super::*;

    const RUN: &str = "v2/projects/p/locations/r/jobs/bots:run";

    fn run_body() -> Value {
        json!({"overrides": {
            "containerOverrides": [{"env": [{"name": "A", "value": "1"}], "args": ["x"]}],
            "taskCount": 1,
            "timeout": "600s",
        }})
    }

    #[test]
    fn a_correct_run_request_passes() {
        let v = DiscoveryValidator::cloud_run();
        v.validate_request("POST", RUN, &[], Some(&run_body()))
            .unwrap();
        v.validate_request("POST", RUN, &[], None).unwrap();
    }

    #[test]
    fn unknown_fields_wrong_types_and_bad_formats_fail() {
        let v = DiscoveryValidator::cloud_run();
        let mut body = run_body();
        body["overrides"]["labels"] = json!({"a": "b"});
        let err = v
            .validate_request("POST", RUN, &[], Some(&body))
            .unwrap_err();
        assert!(
            err.contains("Unknown name \"labels\" at 'overrides'"),
            "{err}"
        );

        let mut body = run_body();
        body["overrides"]["taskCount"] = json!("1");
        assert!(v.validate_request("POST", RUN, &[], Some(&body)).is_err());

        let mut body = run_body();
        body["overrides"]["timeout"] = json!("600");
        let err = v
            .validate_request("POST", RUN, &[], Some(&body))
            .unwrap_err();
        assert!(err.contains("google-duration"), "{err}");

        let mut body = run_body();
        body["overrides"]["containerOverrides"][0]["env"][0] = json!({"value": "no name"});
        let err = v
            .validate_request("POST", RUN, &[], Some(&body))
            .unwrap_err();
        assert!(err.contains("Required field"), "{err}");

        let mut body = run_body();
        body["overrides"]["containerOverrides"][0]["env"] = json!({"A": "1"});
        assert!(v.validate_request("POST", RUN, &[], Some(&body)).is_err());
    }

    #[test]
    fn paths_methods_and_query_parameters_are_checked() {
        let v = DiscoveryValidator::cloud_run();
        let list = "v2/projects/p/locations/r/jobs/-/executions";
        v.validate_request(
            "GET",
            list,
            &q(&[("pageSize", "100"), ("pageToken", "t")]),
            None,
        )
        .unwrap();
        assert!(v
            .validate_request("GET", list, &q(&[("pageSize", "many")]), None)
            .is_err());
        assert!(v
            .validate_request("GET", list, &q(&[("filter", "x")]), None)
            .is_err());
        assert!(v.validate_request("DELETE", list, &[], None).is_err());
        assert!(v.validate_request("GET", "v2/nope", &[], None).is_err());
        let cancel = "v2/projects/p/locations/r/jobs/j/executions/j-abcde:cancel";
        v.validate_request("POST", cancel, &[], Some(&json!({})))
            .unwrap();
        assert!(v
            .validate_request("POST", cancel, &[], Some(&json!({"force": true})))
            .is_err());
        let get = "v2/projects/p/locations/r/jobs/j/executions/j-abcde";
        v.validate_request("GET", get, &[], None).unwrap();
        assert!(v
            .validate_request("GET", get, &[], Some(&json!({})))
            .is_err());
    }

    #[test]
    fn answers_are_checked_with_output_only_fields_allowed() {
        let v = DiscoveryValidator::cloud_run();
        let get = "v2/projects/p/locations/r/jobs/j/executions/j-abcde";
        let execution = json!({"name": "x", "runningCount": 1, "createTime": "2026-11-22T10:00:00Z",
                               "conditions": [{"type": "Completed", "state": "CONDITION_PENDING"}]});
        v.validate_response("GET", get, &execution).unwrap();
        let bad = json!({"name": "x", "conditions": [{"state": "PENDING"}]});
        assert!(v.validate_response("GET", get, &bad).is_err());
        let op = json!({"name": "o", "metadata": {"@type": EXECUTION_TYPE, "runningCount": "x"}});
        assert!(v.validate_response("POST", RUN, &op).is_err());
    }

    #[test]
    fn durations_parse() {
        assert_eq!(parse_duration("600s"), Some(600.0));
        assert_eq!(parse_duration("1.5s"), Some(1.5));
        assert_eq!(parse_duration("600"), None);
        assert_eq!(parse_duration("1e3s"), None);
    }
}
