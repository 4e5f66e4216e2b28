//! Strict OpenAPI 3.0 request validator: checks a request's method, path, query parameters and
//! JSON body against a spec, rejecting undeclared fields and parameters.
//!
//! It validates requests only; responses are the fakes' own business (run them behind
//! [`PrismProxy`](crate::testkit::prism::PrismProxy) to have responses checked too).
//!
//! Strictness: before compiling, every object schema that declares `properties` and says nothing
//! about `additionalProperties` gets `"additionalProperties": false`, so a misspelled field such
//! as `auto_destory` is an error instead of being silently ignored (Prism and the real API ignore
//! it). Schemas that combine subschemas (`allOf`/`anyOf`/`oneOf`) are left open, since closing
//! them would reject the properties of their other branches. This is sound for the Fly spec,
//! whose only combinators are single-branch `allOf` wrappers without own `properties`; a spec
//! that composes objects from several `$ref`ed branches would need a smarter walk.
//!
//! Schemas are compiled as JSON Schema draft 4, the dialect OpenAPI 3.0 schemas derive from
//! (notably `1.0` is not an `integer`, as for Fly's Go decoder).

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, OnceLock};

use jsonschema::error::ValidationErrorKind;
use jsonschema::{Draft, Validator};
use serde_json::{json, Value};

/// The published Fly Machines OpenAPI spec (servers: `https://api.machines.dev/v1`; its paths are
/// written without the `/v1` prefix).
pub const FLY_MACHINES_SPEC: &str = include_str!("../specs/fly-machines-openapi.json");

const METHODS: [&str; 8] = [
    "get", "put", "post", "delete", "options", "head", "patch", "trace",
];

/// Validates requests against an OpenAPI 3.0 document. Cheap to clone; body validators are
/// compiled on first use per operation and shared by clones.
#[derive(Clone)]
pub struct OpenApiValidator {
    inner: Arc<Inner>,
    query_prefixes: Arc<[QueryPrefix]>,
}

struct Inner {
    operations: Vec<Operation>,
    /// The spec's `components`, made strict; the target of `#/components/...` refs.
    components: Value,
}

/// Undeclared query parameters starting with `prefix` are accepted on one operation.
#[derive(Debug, Clone)]
struct QueryPrefix {
    method: String,
    template: String,
    prefix: String,
}

struct Operation {
    /// Uppercase HTTP method.
    method: String,
    template: String,
    segments: Vec<Segment>,
    operation_id: Option<String>,
    params: Vec<Param>,
    body: Option<RequestBody>,
    compiled: OnceLock<Result<Validator, String>>,
}

#[derive(Clone)]
enum Segment {
    Literal(String),
    Param(String),
}

struct Param {
    name: String,
    location: String,
    required: bool,
    schema: Value,
    description: String,
}

struct RequestBody {
    required: bool,
    /// The `application/json` schema, if the body has one.
    schema: Option<Value>,
}

impl fmt::Debug for OpenApiValidator {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OpenApiValidator")
            .field("operations", &self.inner.operations.len())
            .field("query_prefixes", &self.query_prefixes)
            .finish()
    }
}

impl OpenApiValidator {
    /// The validator for the embedded Fly Machines spec ([`FLY_MACHINES_SPEC`]).
    ///
    /// Parsed once per process; clones share compiled body validators. Accepts
    /// `metadata.<key>=<value>` query parameters on `GET /apps/{app_name}/machines`: Fly
    /// documents metadata filtering on the list endpoint but the published spec omits it.
    pub fn fly() -> Self {
        static FLY: OnceLock<OpenApiValidator> = OnceLock::new();
        FLY.get_or_init(|| {
            Self::from_json(FLY_MACHINES_SPEC)
                .expect("embedded Fly Machines spec parses")
                .allow_query_prefix("GET", "/apps/{app_name}/machines", "metadata.")
        })
        .clone()
    }

    /// Builds a validator from the text of an OpenAPI 3.0 JSON document.
    pub fn from_json(text: &str) -> Result<Self, String> {
        let doc: Value =
            serde_json::from_str(text).map_err(|e| format!("spec is not valid JSON: {e}"))?;
        let paths = doc
            .get("paths")
            .and_then(Value::as_object)
            .ok_or("spec has no `paths` object")?;

        let mut components = doc.get("components").cloned().unwrap_or_else(|| json!({}));
        if let Some(schemas) = components.get_mut("schemas").and_then(Value::as_object_mut) {
            schemas.values_mut().for_each(make_strict);
        }

        let mut operations = Vec::new();
        for (template, item) in paths {
            let item = resolve(&doc, item)?;
            let segments = parse_template(template)?;
            let shared_params = item.get("parameters").and_then(Value::as_array);
            for method in METHODS {
                let Some(op) = item.get(method) else { continue };
                let mut params: Vec<Param> = Vec::new();
                let op_params = op.get("parameters").and_then(Value::as_array);
                // Operation-level parameters override path-level ones with the same name and
                // location.
                for raw in shared_params.into_iter().chain(op_params).flatten() {
                    let param = parse_param(&doc, raw)?;
                    params.retain(|p| !(p.name == param.name && p.location == param.location));
                    params.push(param);
                }
                let body = match op.get("requestBody") {
                    Some(raw) => Some(parse_body(&doc, raw)?),
                    None => None,
                };
                operations.push(Operation {
                    method: method.to_ascii_uppercase(),
                    template: template.clone(),
                    segments: segments.clone(),
                    operation_id: op
                        .get("operationId")
                        .and_then(Value::as_str)
                        .map(str::to_owned),
                    params,
                    body,
                    compiled: OnceLock::new(),
                });
            }
        }

        Ok(Self {
            inner: Arc::new(Inner {
                operations,
                components,
            }),
            query_prefixes: Arc::from(Vec::new()),
        })
    }

    /// Also accepts undeclared query parameters whose name starts with `prefix` on the operation
    /// `method` + `template` (template as written in the spec, e.g. `/apps/{app_name}/machines`).
    /// For parameters the API supports but the spec does not declare.
    #[must_use]
    pub fn allow_query_prefix(mut self, method: &str, template: &str, prefix: &str) -> Self {
        let mut prefixes = self.query_prefixes.to_vec();
        prefixes.push(QueryPrefix {
            method: method.to_ascii_uppercase(),
            template: template.to_owned(),
            prefix: prefix.to_owned(),
        });
        self.query_prefixes = Arc::from(prefixes);
        self
    }

    /// The path template (as written in the spec) of the operation that handles
    /// `method` + `path`, if any.
    pub fn operation_template(&self, method: &str, path: &str) -> Option<&str> {
        self.find(method, path).ok().map(|op| op.template.as_str())
    }

    /// Checks one request. `path` is the request path relative to the spec's server URL (for
    /// Fly: without `/v1`), without query string; `query` are the decoded query pairs; `body`
    /// the parsed JSON body, if the request has one.
    ///
    /// The error says method, path and, for body errors, the failing JSON pointer.
    pub fn validate(
        &self,
        method: &str,
        path: &str,
        query: &[(String, String)],
        body: Option<&Value>,
    ) -> Result<(), String> {
        let method = method.to_ascii_uppercase();
        let op = self.find(&method, path)?;
        let at = match &op.operation_id {
            Some(id) => format!("{method} {path} ({id})"),
            None => format!("{method} {path}"),
        };

        // Path parameters.
        let values = path.trim_start_matches('/').split('/');
        for (segment, value) in op.segments.iter().zip(values) {
            if let Segment::Param(name) = segment {
                if let Some(param) = op.param(name, "path") {
                    check_param_value(&self.inner.components, param, value)
                        .map_err(|e| format!("{at}: path parameter `{name}`: {e}"))?;
                }
            }
        }

        // Query parameters.
        let mut seen: HashMap<&str, usize> = HashMap::new();
        for (name, value) in query {
            match op.param(name, "query") {
                Some(param) => {
                    let count = seen.entry(param.name.as_str()).or_default();
                    *count += 1;
                    if *count == 2 && !param.repeatable(&self.inner.components) {
                        return Err(format!(
                            "{at}: query parameter `{name}` given more than once"
                        ));
                    }
                    check_param_value(&self.inner.components, param, value)
                        .map_err(|e| format!("{at}: query parameter `{name}`: {e}"))?;
                }
                None if self.prefix_allowed(op, name) => {}
                None => {
                    return Err(format!(
                        "{at}: query parameter `{name}` is not declared by the spec"
                    ))
                }
            }
        }
        for param in op.params.iter().filter(|p| p.location == "query") {
            if param.required && !seen.contains_key(param.name.as_str()) {
                return Err(format!(
                    "{at}: required query parameter `{}` is missing",
                    param.name
                ));
            }
        }

        // Body.
        match (&op.body, body) {
            (None, None) => Ok(()),
            (None, Some(_)) => Err(format!(
                "{at}: the operation takes no request body, but one was sent"
            )),
            (Some(spec), None) if spec.required => Err(format!("{at}: a request body is required")),
            (Some(_), None) => Ok(()),
            (Some(spec), Some(body)) => {
                let Some(schema) = &spec.schema else {
                    return Ok(());
                };
                let validator = op
                    .compiled
                    .get_or_init(|| compile(schema, &self.inner.components))
                    .as_ref()
                    .map_err(|e| format!("{at}: cannot compile the body schema: {e}"))?;
                let errors: Vec<String> = validator
                    .iter_errors(body)
                    .map(|e| {
                        let pointer = e.instance_path().as_str();
                        match e.kind() {
                            // The crate's own message elides long enums; list them all.
                            ValidationErrorKind::Enum { options } => format!(
                                "body at pointer \"{pointer}\": {} is not one of {options}",
                                e.instance()
                            ),
                            _ => format!("body at pointer \"{pointer}\": {e}"),
                        }
                    })
                    .collect();
                if errors.is_empty() {
                    Ok(())
                } else {
                    Err(format!("{at}: {}", errors.join("; ")))
                }
            }
        }
    }

    /// The operation for `method` + `path`: among the templates matching the path, the most
    /// specific one (literal segments win over `{param}` segments, left to right), and then the
    /// method must be one it declares.
    fn find(&self, method: &str, path: &str) -> Result<&Operation, String> {
        let method = method.to_ascii_uppercase();
        let Some(rest) = path.strip_prefix('/') else {
            return Err(format!("{method} {path}: path must start with `/`"));
        };
        let values: Vec<&str> = rest.split('/').collect();
        let matching = self
            .inner
            .operations
            .iter()
            .filter(|op| op.matches(&values))
            .collect::<Vec<_>>();
        let best = matching
            .iter()
            .map(|op| op.specificity())
            .max()
            .ok_or_else(|| format!("{method} {path}: no path in the spec matches"))?;
        let candidates: Vec<&&Operation> = matching
            .iter()
            .filter(|op| op.specificity() == best)
            .collect();
        candidates
            .iter()
            .find(|op| op.method == method)
            .map(|op| **op)
            .ok_or_else(|| {
                format!(
                    "{method} {path}: method not allowed for {} (allowed: {})",
                    candidates[0].template,
                    candidates
                        .iter()
                        .map(|op| op.method.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                )
            })
    }

    fn prefix_allowed(&self, op: &Operation, name: &str) -> bool {
        self.query_prefixes.iter().any(|p| {
            p.method == op.method && p.template == op.template && name.starts_with(&p.prefix)
        })
    }
}

impl Operation {
    fn matches(&self, values: &[&str]) -> bool {
        self.segments.len() == values.len()
            && self
                .segments
                .iter()
                .zip(values)
                .all(|(segment, value)| match segment {
                    Segment::Literal(literal) => literal == value,
                    Segment::Param(_) => !value.is_empty(),
                })
    }

    /// Literal segments as `true`, left to right: compared lexicographically, more literal
    /// (earlier) wins.
    fn specificity(&self) -> Vec<bool> {
        self.segments
            .iter()
            .map(|s| matches!(s, Segment::Literal(_)))
            .collect()
    }

    fn param(&self, name: &str, location: &str) -> Option<&Param> {
        self.params
            .iter()
            .find(|p| p.name == name && p.location == location)
    }
}

impl Param {
    /// Whether the parameter may be given several times: arrays, and parameters whose
    /// description says repeated values are supported (Fly's `state` on `/wait`).
    fn repeatable(&self, components: &Value) -> bool {
        schema_type(&resolve_schema(components, &self.schema)) == Some("array")
            || self.description.to_ascii_lowercase().contains("repeated")
    }

    /// Whether one value may hold a comma-separated list: arrays (form style), and parameters
    /// whose description says so (Fly's `state` on `/wait` declares a plain string enum but
    /// documents comma-separated values). Note that Prism does not know this and rejects
    /// `state=started,stopped` against the enum.
    fn comma_separated(&self) -> bool {
        self.description.to_ascii_lowercase().contains("comma")
    }
}

/// Checks one (already decoded) parameter value against the parameter's schema.
fn check_param_value(components: &Value, param: &Param, value: &str) -> Result<(), String> {
    let schema = resolve_schema(components, &param.schema);
    if schema_type(&schema) == Some("array") {
        let items = resolve_schema(components, schema.get("items").unwrap_or(&Value::Null));
        return value
            .split(',')
            .try_for_each(|part| check_scalar(&items, part));
    }
    if param.comma_separated() {
        value
            .split(',')
            .try_for_each(|part| check_scalar(&schema, part))
    } else {
        check_scalar(&schema, value)
    }
}

fn check_scalar(schema: &Value, value: &str) -> Result<(), String> {
    let typed = match schema_type(schema) {
        Some("boolean") => match value {
            "true" => Value::Bool(true),
            "false" => Value::Bool(false),
            _ => return Err(format!("{value:?} is not a boolean (true or false)")),
        },
        Some("integer") => value
            .parse::<i64>()
            .map(Value::from)
            .map_err(|_| format!("{value:?} is not an integer"))?,
        Some("number") => value
            .parse::<f64>()
            .ok()
            .filter(|n| n.is_finite())
            .map(Value::from)
            .ok_or_else(|| format!("{value:?} is not a number"))?,
        _ => Value::String(value.to_owned()),
    };
    if let Some(allowed) = schema.get("enum").and_then(Value::as_array) {
        if !allowed.contains(&typed) {
            let allowed: Vec<String> = allowed.iter().map(Value::to_string).collect();
            return Err(format!("{value:?} is not one of [{}]", allowed.join(", ")));
        }
    }
    Ok(())
}

fn schema_type(schema: &Value) -> Option<&str> {
    schema.get("type").and_then(Value::as_str)
}

/// Follows `#/components/...` refs of a parameter schema (through `allOf` wrappers too).
fn resolve_schema(components: &Value, schema: &Value) -> Value {
    let mut current = schema.clone();
    for _ in 0..16 {
        if let Some(target) = current
            .get("$ref")
            .and_then(Value::as_str)
            .and_then(|r| r.strip_prefix("#/components"))
            .and_then(|pointer| components.pointer(pointer))
        {
            current = target.clone();
            continue;
        }
        if current.get("type").is_none() {
            if let Some([only]) = current
                .get("allOf")
                .and_then(Value::as_array)
                .map(Vec::as_slice)
            {
                current = only.clone();
                continue;
            }
        }
        break;
    }
    current
}

/// Compiles the body schema with the strict components next to it, so that
/// `#/components/schemas/...` refs resolve.
fn compile(schema: &Value, components: &Value) -> Result<Validator, String> {
    let mut schema = schema.clone();
    make_strict(&mut schema);
    let document = json!({ "allOf": [schema], "components": components });
    jsonschema::options()
        .with_draft(Draft::Draft4)
        .build(&document)
        .map_err(|e| e.to_string())
}

/// Closes every object schema that lists `properties` without saying anything about
/// `additionalProperties` (see the module docs).
fn make_strict(schema: &mut Value) {
    let Some(obj) = schema.as_object_mut() else {
        return;
    };
    let combines = ["allOf", "anyOf", "oneOf"]
        .iter()
        .any(|k| obj.contains_key(*k));
    if obj.get("properties").is_some_and(Value::is_object)
        && !obj.contains_key("additionalProperties")
        && !combines
    {
        obj.insert("additionalProperties".to_owned(), Value::Bool(false));
    }
    if let Some(properties) = obj.get_mut("properties").and_then(Value::as_object_mut) {
        properties.values_mut().for_each(make_strict);
    }
    for key in ["items", "additionalProperties", "not"] {
        if let Some(sub) = obj.get_mut(key) {
            make_strict(sub);
        }
    }
    for key in ["allOf", "anyOf", "oneOf"] {
        if let Some(branches) = obj.get_mut(key).and_then(Value::as_array_mut) {
            branches.iter_mut().for_each(make_strict);
        }
    }
}

/// Follows a local `$ref` (`#/...`) in the spec document.
fn resolve<'a>(doc: &'a Value, value: &'a Value) -> Result<&'a Value, String> {
    let mut current = value;
    for _ in 0..16 {
        let Some(reference) = current.get("$ref").and_then(Value::as_str) else {
            return Ok(current);
        };
        current = reference
            .strip_prefix('#')
            .and_then(|pointer| doc.pointer(pointer))
            .ok_or_else(|| format!("unresolvable $ref {reference:?}"))?;
    }
    Err("too many nested $refs".to_owned())
}

fn parse_template(template: &str) -> Result<Vec<Segment>, String> {
    let rest = template
        .strip_prefix('/')
        .ok_or_else(|| format!("path {template:?} does not start with `/`"))?;
    Ok(rest
        .split('/')
        .map(
            |segment| match segment.strip_prefix('{').and_then(|s| s.strip_suffix('}')) {
                Some(name) => Segment::Param(name.to_owned()),
                None => Segment::Literal(segment.to_owned()),
            },
        )
        .collect())
}

fn parse_param(doc: &Value, raw: &Value) -> Result<Param, String> {
    let raw = resolve(doc, raw)?;
    let name = raw
        .get("name")
        .and_then(Value::as_str)
        .ok_or("parameter without name")?;
    let location = raw
        .get("in")
        .and_then(Value::as_str)
        .ok_or_else(|| format!("parameter {name:?} without `in`"))?;
    Ok(Param {
        name: name.to_owned(),
        location: location.to_owned(),
        required: raw
            .get("required")
            .and_then(Value::as_bool)
            .unwrap_or(location == "path"),
        schema: raw.get("schema").cloned().unwrap_or_else(|| json!({})),
        description: raw
            .get("description")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_owned(),
    })
}

fn parse_body(doc: &Value, raw: &Value) -> Result<RequestBody, String> {
    let raw = resolve(doc, raw)?;
    let content = raw.get("content").and_then(Value::as_object);
    let schema = content
        .and_then(|c| {
            c.get("application/json")
                .or_else(|| c.iter().find(|(k, _)| k.contains("json")).map(|(_, v)| v))
        })
        .and_then(|media| media.get("schema"))
        .cloned();
    Ok(RequestBody {
        required: raw
            .get("required")
            .and_then(Value::as_bool)
            .unwrap_or(false),
        schema,
    })
}

#[cfg(test)]
mod tests {
    use super::super::q;
    use super::*;

    fn create_request() -> Value {
        json!({
            "name": "bot-1",
            "region": "iad",
            "config": {
                "image": "registry.fly.io/bot:latest",
                "env": {"ROOM_URL": "https://example.daily.co/room"},
                "guest": {"cpus": 1, "memory_mb": 1024, "cpu_kind": "shared"},
                "metadata": {"botdispatch_session": "s-1"},
                "auto_destroy": true,
                "restart": {"policy": "no"}
            }
        })
    }

    const MACHINES: &str = "/apps/my-app/machines";

    #[test]
    fn correct_create_machine_request_passes() {
        let v = OpenApiValidator::fly();
        v.validate("POST", MACHINES, &[], Some(&create_request()))
            .unwrap();
    }

    #[test]
    fn invalid_restart_policy_fails_with_pointer() {
        let mut body = create_request();
        body["config"]["restart"]["policy"] = json!("never");
        let err = OpenApiValidator::fly()
            .validate("POST", MACHINES, &[], Some(&body))
            .unwrap_err();
        assert!(err.contains("POST /apps/my-app/machines"), "{err}");
        assert!(err.contains("/config/restart/policy"), "{err}");
    }

    #[test]
    fn string_cpus_fails() {
        let mut body = create_request();
        body["config"]["guest"]["cpus"] = json!("1");
        let err = OpenApiValidator::fly()
            .validate("POST", MACHINES, &[], Some(&body))
            .unwrap_err();
        assert!(err.contains("/config/guest/cpus"), "{err}");
    }

    #[test]
    fn fractional_cpus_fails() {
        let mut body = create_request();
        body["config"]["guest"]["cpus"] = json!(1.5);
        assert!(OpenApiValidator::fly()
            .validate("POST", MACHINES, &[], Some(&body))
            .is_err());
    }

    #[test]
    fn unknown_field_fails_in_strict_mode() {
        let mut body = create_request();
        body["config"]["auto_destory"] = json!(true);
        let err = OpenApiValidator::fly()
            .validate("POST", MACHINES, &[], Some(&body))
            .unwrap_err();
        assert!(err.contains("auto_destory"), "{err}");
        assert!(err.contains("pointer \"/config\""), "{err}");

        let mut body = create_request();
        body["nmae"] = json!("typo");
        assert!(OpenApiValidator::fly()
            .validate("POST", MACHINES, &[], Some(&body))
            .is_err());
    }

    #[test]
    fn free_form_maps_stay_open() {
        let mut body = create_request();
        body["config"]["env"]["ANY_NAME"] = json!("x");
        body["config"]["metadata"]["any_key"] = json!("y");
        OpenApiValidator::fly()
            .validate("POST", MACHINES, &[], Some(&body))
            .unwrap();
        // But their values are still typed.
        body["config"]["env"]["N"] = json!(1);
        assert!(OpenApiValidator::fly()
            .validate("POST", MACHINES, &[], Some(&body))
            .is_err());
    }

    #[test]
    fn missing_required_body_fails() {
        let err = OpenApiValidator::fly()
            .validate("POST", MACHINES, &[], None)
            .unwrap_err();
        assert!(err.contains("required"), "{err}");
    }

    #[test]
    fn optional_body_may_be_absent_or_valid() {
        let v = OpenApiValidator::fly();
        let stop = "/apps/a/machines/148e1234567890/stop";
        v.validate("POST", stop, &[], None).unwrap();
        v.validate(
            "POST",
            stop,
            &[],
            Some(&json!({"signal": "SIGTERM", "timeout": "5s"})),
        )
        .unwrap();
        assert!(v
            .validate("POST", stop, &[], Some(&json!({"signal": "SIGFOO"})))
            .is_err());
    }

    #[test]
    fn body_on_operation_without_body_fails() {
        let err = OpenApiValidator::fly()
            .validate("DELETE", "/apps/a/machines/m1", &[], Some(&json!({})))
            .unwrap_err();
        assert!(err.contains("no request body"), "{err}");
    }

    #[test]
    fn wait_query_parameters_are_typed() {
        let v = OpenApiValidator::fly();
        let wait = "/apps/a/machines/m1/wait";
        v.validate(
            "GET",
            wait,
            &q(&[
                ("state", "started"),
                ("timeout", "30"),
                ("instance_id", "X"),
            ]),
            None,
        )
        .unwrap();
        let err = v
            .validate("GET", wait, &q(&[("timeout", "abc")]), None)
            .unwrap_err();
        assert!(err.contains("GET /apps/a/machines/m1/wait"), "{err}");
        assert!(err.contains("timeout"), "{err}");
        assert!(v
            .validate("GET", wait, &q(&[("state", "running")]), None)
            .is_err());
    }

    #[test]
    fn wait_state_accepts_comma_separated_and_repeated_enum_members() {
        let v = OpenApiValidator::fly();
        let wait = "/apps/a/machines/m1/wait";
        v.validate("GET", wait, &q(&[("state", "started,stopped")]), None)
            .unwrap();
        v.validate(
            "GET",
            wait,
            &q(&[("state", "started"), ("state", "destroyed")]),
            None,
        )
        .unwrap();
        assert!(v
            .validate("GET", wait, &q(&[("state", "started,bogus")]), None)
            .is_err());
        // Other parameters may not be repeated.
        assert!(v
            .validate("GET", wait, &q(&[("timeout", "1"), ("timeout", "2")]), None)
            .is_err());
    }

    #[test]
    fn booleans_must_be_true_or_false() {
        let v = OpenApiValidator::fly();
        v.validate("GET", MACHINES, &q(&[("include_deleted", "true")]), None)
            .unwrap();
        assert!(v
            .validate("GET", MACHINES, &q(&[("include_deleted", "1")]), None)
            .is_err());
        v.validate(
            "DELETE",
            "/apps/a/machines/m1",
            &q(&[("force", "false")]),
            None,
        )
        .unwrap();
    }

    #[test]
    fn metadata_filter_passes_on_list_only() {
        let v = OpenApiValidator::fly();
        v.validate(
            "GET",
            MACHINES,
            &q(&[("metadata.botdispatch_session", "x"), ("region", "iad")]),
            None,
        )
        .unwrap();
        assert!(v
            .validate(
                "GET",
                "/apps/a/machines/m1",
                &q(&[("metadata.botdispatch_session", "x")]),
                None
            )
            .is_err());
    }

    #[test]
    fn unknown_query_param_fails() {
        let err = OpenApiValidator::fly()
            .validate("GET", MACHINES, &q(&[("bogus", "1")]), None)
            .unwrap_err();
        assert!(err.contains("bogus"), "{err}");
    }

    #[test]
    fn literal_segments_win_over_templates() {
        let v = OpenApiValidator::fly();
        assert_eq!(
            v.operation_template("GET", "/apps/a/machines/m1/wait"),
            Some("/apps/{app_name}/machines/{machine_id}/wait")
        );
        assert_eq!(
            v.operation_template("GET", "/apps/a/machines/m1"),
            Some("/apps/{app_name}/machines/{machine_id}")
        );
        assert_eq!(
            v.operation_template("POST", "/apps/a/certificates/acme"),
            Some("/apps/{app_name}/certificates/acme")
        );
    }

    #[test]
    fn unknown_path_method_or_empty_segment_fails() {
        let v = OpenApiValidator::fly();
        assert!(v.validate("GET", "/nope", &[], None).is_err());
        assert!(v.validate("GET", "/v1/apps/a/machines", &[], None).is_err());
        assert!(v.validate("GET", "/apps//machines", &[], None).is_err());
        let err = v
            .validate("PUT", "/apps/a/machines/m1/stop", &[], None)
            .unwrap_err();
        assert!(err.contains("method not allowed"), "{err}");
    }

    #[test]
    fn generic_specs_work_too() {
        let spec = json!({
            "openapi": "3.0.1",
            "paths": {
                "/things/{id}": {
                    "parameters": [{"name": "id", "in": "path", "required": true,
                                    "schema": {"type": "integer"}}],
                    "put": {
                        "parameters": [{"name": "dry", "in": "query", "required": true,
                                        "schema": {"type": "boolean"}}],
                        "requestBody": {"$ref": "#/components/requestBodies/Thing"}
                    }
                }
            },
            "components": {
                "requestBodies": {"Thing": {"required": true, "content": {"application/json":
                    {"schema": {"$ref": "#/components/schemas/Thing"}}}}},
                "schemas": {"Thing": {"type": "object", "required": ["n"],
                    "properties": {"n": {"type": "integer"}}}}
            }
        });
        let v = OpenApiValidator::from_json(&spec.to_string()).unwrap();
        let dry = q(&[("dry", "true")]);
        v.validate("PUT", "/things/7", &dry, Some(&json!({"n": 1})))
            .unwrap();
        assert!(v
            .validate("PUT", "/things/x", &dry, Some(&json!({"n": 1})))
            .is_err());
        assert!(v
            .validate("PUT", "/things/7", &[], Some(&json!({"n": 1})))
            .is_err());
        assert!(v
            .validate("PUT", "/things/7", &dry, Some(&json!({"n": 1, "m": 2})))
            .is_err());
        assert!(v
            .validate("PUT", "/things/7", &dry, Some(&json!({})))
            .is_err());
        assert!(OpenApiValidator::from_json("{").is_err());
    }
}
