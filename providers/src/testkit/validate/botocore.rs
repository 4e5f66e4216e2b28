//! Validator of request bodies against a botocore JSON service model (`service-2.json`, the
//! description AWS SDKs are generated from), and the embedded ECS model.

use std::sync::{Arc, OnceLock};

use serde_json::{Map, Value};

/// The official botocore service model of ECS (`ecs/2014-11-13/service-2.json`).
pub const ECS_SPEC: &str = include_str!("../specs/ecs-service-2.json");

/// The ECS model's pattern of tag keys and values.
const TAG_PATTERN: &str = "([\\p{L}\\p{Z}\\p{N}_.:/=+\\-@]*)";

/// Validates request bodies against a botocore JSON service model: required members present,
/// no unknown members, JSON types, enum values, list and string lengths, integer ranges, and the
/// tag pattern. Other `pattern`s of the model are not checked.
#[derive(Clone)]
pub struct BotocoreValidator {
    model: Arc<Value>,
}

impl std::fmt::Debug for BotocoreValidator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BotocoreValidator")
            .field("service", &self.model.pointer("/metadata/serviceId"))
            .finish()
    }
}

impl BotocoreValidator {
    /// The validator for the embedded ECS model ([`ECS_SPEC`]); parsed once per process.
    pub fn ecs() -> Self {
        static ECS: OnceLock<BotocoreValidator> = OnceLock::new();
        ECS.get_or_init(|| Self::from_json(ECS_SPEC).expect("embedded ECS model parses"))
            .clone()
    }

    /// Builds a validator from the text of a botocore `service-2.json`.
    pub fn from_json(text: &str) -> Result<Self, String> {
        let model: Value =
            serde_json::from_str(text).map_err(|e| format!("model is not valid JSON: {e}"))?;
        if !model.get("shapes").is_some_and(Value::is_object) {
            return Err("model has no `shapes` object".to_owned());
        }
        Ok(Self {
            model: Arc::new(model),
        })
    }

    /// Checks the input of operation `op`; the error lists every problem with its JSON pointer.
    pub fn validate(&self, op: &str, body: &Value) -> Result<(), String> {
        let Some(input) = self
            .model
            .pointer(&format!("/operations/{op}"))
            .map(|o| o.pointer("/input/shape").and_then(Value::as_str))
        else {
            return Err(format!("{op}: no such operation in the model"));
        };
        let mut problems = Vec::new();
        match input {
            Some(shape) => self.check(shape, body, "", &mut problems),
            None if body.as_object().is_some_and(Map::is_empty) => {}
            None => problems.push("operation takes no input".to_owned()),
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(format!("{op}: {}", problems.join("; ")))
        }
    }

    fn check(&self, name: &str, value: &Value, path: &str, problems: &mut Vec<String>) {
        let Some(shape) = self.model.get("shapes").and_then(|s| s.get(name)) else {
            problems.push(format!("{path}: model has no shape {name}"));
            return;
        };
        let at = if path.is_empty() { "/" } else { path };
        let kind = shape
            .get("type")
            .and_then(Value::as_str)
            .unwrap_or_default();
        let int = |key: &str| shape.get(key).and_then(Value::as_i64);
        let mut bad = |what: String| problems.push(format!("{at}: {what}"));
        match kind {
            "structure" => {
                let Some(object) = value.as_object() else {
                    bad(format!("expected an object ({name})"));
                    return;
                };
                let members = shape.get("members").and_then(Value::as_object);
                for required in shape
                    .get("required")
                    .and_then(Value::as_array)
                    .into_iter()
                    .flatten()
                    .filter_map(Value::as_str)
                {
                    if !object.contains_key(required) {
                        bad(format!("missing required member {required}"));
                    }
                }
                if shape.get("union").and_then(Value::as_bool) == Some(true) && object.len() != 1 {
                    bad(format!("union {name} needs exactly one member"));
                }
                for (key, item) in object {
                    match members.and_then(|m| m.get(key)) {
                        Some(member) => {
                            let target = member
                                .get("shape")
                                .and_then(Value::as_str)
                                .unwrap_or_default();
                            self.check(target, item, &format!("{path}/{key}"), problems);
                        }
                        None => problems.push(format!("{at}: unknown member {key} of {name}")),
                    }
                }
            }
            "list" => {
                let Some(items) = value.as_array() else {
                    bad(format!("expected a list ({name})"));
                    return;
                };
                check_len(items.len(), int("min"), int("max"), &mut bad);
                let member = shape
                    .pointer("/member/shape")
                    .and_then(Value::as_str)
                    .unwrap_or_default();
                for (i, item) in items.iter().enumerate() {
                    self.check(member, item, &format!("{path}/{i}"), problems);
                }
            }
            "map" => {
                let Some(entries) = value.as_object() else {
                    bad(format!("expected a map ({name})"));
                    return;
                };
                check_len(entries.len(), int("min"), int("max"), &mut bad);
                let key_shape = shape
                    .pointer("/key/shape")
                    .and_then(Value::as_str)
                    .unwrap_or_default();
                let value_shape = shape
                    .pointer("/value/shape")
                    .and_then(Value::as_str)
                    .unwrap_or_default();
                for (key, item) in entries {
                    self.check(
                        key_shape,
                        &Value::from(key.as_str()),
                        &format!("{path}/{key}"),
                        problems,
                    );
                    self.check(value_shape, item, &format!("{path}/{key}"), problems);
                }
            }
            "string" => {
                let Some(text) = value.as_str() else {
                    bad(format!("expected a string ({name})"));
                    return;
                };
                if let Some(allowed) = shape.get("enum").and_then(Value::as_array) {
                    if !allowed.iter().any(|a| a == text) {
                        bad(format!("{text:?} is not one of {allowed:?}"));
                    }
                }
                check_len(text.chars().count(), int("min"), int("max"), &mut bad);
                if shape.get("pattern").and_then(Value::as_str) == Some(TAG_PATTERN)
                    && !text.chars().all(is_tag_char)
                {
                    bad(format!("{text:?} does not match {TAG_PATTERN}"));
                }
            }
            "integer" | "long" => match value.as_i64() {
                Some(n) => {
                    if int("min").is_some_and(|min| n < min)
                        || int("max").is_some_and(|max| n > max)
                    {
                        bad(format!("{n} is out of range for {name}"));
                    }
                }
                None => bad(format!("expected an integer ({name})")),
            },
            "boolean" if !value.is_boolean() => bad(format!("expected a boolean ({name})")),
            "double" | "float" | "timestamp" if !value.is_number() => {
                bad(format!("expected a number ({name})"))
            }
            "blob" if !value.is_string() => bad(format!("expected a base64 string ({name})")),
            "boolean" | "double" | "float" | "timestamp" | "blob" => {}
            other => bad(format!("shape {name} has unsupported type {other:?}")),
        }
    }
}

fn check_len(len: usize, min: Option<i64>, max: Option<i64>, bad: &mut impl FnMut(String)) {
    let len = len as i64;
    if min.is_some_and(|m| len < m) {
        bad(format!(
            "length {len} is below the minimum {}",
            min.unwrap_or_default()
        ));
    }
    if max.is_some_and(|m| len > m) {
        bad(format!(
            "length {len} is above the maximum {}",
            max.unwrap_or_default()
        ));
    }
}

/// `[\p{L}\p{Z}\p{N}_.:/=+\-@]`.
fn is_tag_char(c: char) -> bool {
    let separator = matches!(
        c,
        ' ' | '\u{a0}' | '\u{1680}' | '\u{2000}'
            ..='\u{200a}' | '\u{2028}' | '\u{2029}' | '\u{202f}' | '\u{205f}' | '\u{3000}'
    );
    c.is_alphabetic() || c.is_numeric() || separator || "_.:/=+-@".contains(c)
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn run_task() -> Value {
        json!({
            "cluster": "bots",
            "taskDefinition": "bot",
            "launchType": "FARGATE",
            "count": 1,
            "networkConfiguration": {"awsvpcConfiguration": {
                "subnets": ["subnet-1"], "securityGroups": [], "assignPublicIp": "DISABLED"}},
            "overrides": {"containerOverrides": [{"name": "bot",
                "environment": [{"name": "A", "value": "b"}], "command": ["python", "bot.py"]}],
                "cpu": "1024", "memory": "2048"},
            "startedBy": "k",
            "tags": [{"key": "managed_by", "value": "botdispatch"}],
            "clientToken": "botdispatch-k",
        })
    }

    #[test]
    fn a_correct_run_task_passes() {
        BotocoreValidator::ecs()
            .validate("RunTask", &run_task())
            .unwrap();
        BotocoreValidator::ecs()
            .validate(
                "DescribeTasks",
                &json!({"cluster": "bots", "tasks": ["a"], "include": ["TAGS"]}),
            )
            .unwrap();
    }

    #[test]
    fn model_violations_are_reported_with_pointers() {
        let v = BotocoreValidator::ecs();
        let mut body = run_task();
        body["launchType"] = json!("LAMBDA");
        body["networkConfiguration"]["awsvpcConfiguration"]["assignPublicIp"] = json!(true);
        body["overrides"]["containerOverrides"][0]["enviroment"] = json!([]);
        body["tags"][0]["value"] = json!("auth0|alice");
        body["count"] = json!("1");
        let error = v.validate("RunTask", &body).unwrap_err();
        for expected in [
            "/launchType: \"LAMBDA\" is not one of",
            "/networkConfiguration/awsvpcConfiguration/assignPublicIp: expected a string",
            "/overrides/containerOverrides/0: unknown member enviroment",
            "/tags/0/value: \"auth0|alice\" does not match",
            "/count: expected an integer",
        ] {
            assert!(error.contains(expected), "{expected} in {error}");
        }
        let error = v
            .validate("DescribeTasks", &json!({"include": ["EVERYTHING"]}))
            .unwrap_err();
        assert!(error.contains("missing required member tasks"), "{error}");
        assert!(v.validate("LaunchRocket", &json!({})).is_err());
        let long = json!({"tasks": ["a"], "include": ["TAGS"], "cluster": "x".repeat(3)});
        assert!(v.validate("DescribeTasks", &long).is_ok());
        let tags: Vec<Value> = (0..51).map(|i| json!({"key": format!("k{i}")})).collect();
        let error = v
            .validate("RunTask", &json!({"taskDefinition": "bot", "tags": tags}))
            .unwrap_err();
        assert!(
            error.contains("/tags: length 51 is above the maximum 50"),
            "{error}"
        );
    }

    #[test]
    fn tag_pattern_accepts_unicode_letters_and_rejects_symbols() {
        assert!("Ünïcødé 名前 1 _.:/=+-@".chars().all(is_tag_char));
        for c in ['|', '!', '#', '\n', '🎙', ','] {
            assert!(!is_tag_char(c), "{c:?}");
        }
    }
}
