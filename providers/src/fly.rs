//! The `fly` provider: one Fly Machine per session, through the Fly Machines REST API.
//!
//! A session's machine is created with `auto_destroy: true` and `restart.policy: "no"`, so when the
//! bot exits Fly destroys the VM and nothing stays billed. The machine's `config.metadata` carries
//! the session labels, which is how the reaper and an idempotent retry find it again without any
//! local memory. Requests follow the published OpenAPI spec (`testkit/specs/`).

use std::collections::BTreeMap;
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use reqwest::{Method, RequestBuilder, Response, StatusCode};
use serde::Deserialize;
use serde_json::{json, Value};
use tokio::time::Instant;

use crate::resilient::{Op, RateLimit};
use crate::transport_message;
use crate::{
    label, parse_retry_after, LaunchSpec, Launched, MachineProvider, MachineState, MachineStatus,
    ProviderError, Secret, SessionLabels, MANAGED_BY,
};

const NAME: &str = "fly";
/// Fly's `/wait` refuses to wait longer than this per call; longer waits loop.
const MAX_WAIT_SECS: u64 = 60;

/// Settings of the `fly` provider.
#[derive(Debug, Clone)]
pub struct FlyConfig {
    /// Base URL including the version, e.g. `https://api.machines.dev/v1`.
    pub api_url: String,
    pub api_token: Secret,
    pub app_name: String,
    /// Region used when a start names none; `None` lets Fly choose.
    pub default_region: Option<String>,
    /// Timeout of every single API call except `/wait` (which gets its own wait time plus this).
    pub request_timeout: Duration,
}

/// Launches sessions as Fly Machines.
pub struct FlyProvider {
    http: reqwest::Client,
    config: FlyConfig,
}

impl FlyProvider {
    /// `http` is the dispatcher's one shared client (connection pool, TLS config).
    pub fn new(http: reqwest::Client, mut config: FlyConfig) -> Result<Self, ProviderError> {
        let trimmed = config.api_url.trim_end_matches('/').to_owned();
        url::Url::parse(&trimmed).map_err(|e| ProviderError::Config {
            provider: NAME,
            message: format!("FLY_API_URL {trimmed:?} is not a URL: {e}"),
        })?;
        if config.app_name.is_empty() {
            return Err(ProviderError::Config {
                provider: NAME,
                message: "FLY_APP_NAME is empty".into(),
            });
        }
        if config.api_token.is_empty() {
            return Err(ProviderError::Config {
                provider: NAME,
                message: "FLY_API_TOKEN is empty".into(),
            });
        }
        config.api_url = trimmed;
        Ok(Self { http, config })
    }

    fn request(&self, method: Method, path: &str) -> RequestBuilder {
        let url = format!(
            "{}/apps/{}{}",
            self.config.api_url, self.config.app_name, path
        );
        self.http
            .request(method, url)
            .bearer_auth(self.config.api_token.expose())
            .timeout(self.config.request_timeout)
    }

    /// Sends a request and turns transport failures into [`ProviderError::Unavailable`].
    async fn send(&self, req: RequestBuilder, what: &str) -> Result<Response, ProviderError> {
        req.send().await.map_err(|e| ProviderError::Unavailable {
            provider: NAME,
            message: format!("{what}: {}", transport_message(&e)),
        })
    }

    async fn get_machine(&self, id: &str) -> Result<Option<FlyMachine>, ProviderError> {
        let resp = self
            .send(
                self.request(Method::GET, &format!("/machines/{id}")),
                "get machine",
            )
            .await?;
        if resp.status() == StatusCode::NOT_FOUND {
            return Ok(None);
        }
        Ok(Some(json_or_error(resp, "get machine").await?))
    }

    async fn list(
        &self,
        filters: &[(&str, &str)],
        include_deleted: bool,
    ) -> Result<Vec<FlyMachine>, ProviderError> {
        let mut query: Vec<(String, &str)> = filters
            .iter()
            .map(|(k, v)| (format!("metadata.{k}"), *v))
            .collect();
        if include_deleted {
            query.push(("include_deleted".to_owned(), "true"));
        }
        let resp = self
            .send(
                self.request(Method::GET, "/machines").query(&query),
                "list machines",
            )
            .await?;
        json_or_error(resp, "list machines").await
    }

    fn create_body(&self, spec: &LaunchSpec) -> Value {
        let metadata: BTreeMap<String, String> = spec.labels.to_map();
        let mut config = json!({
            "image": spec.image,
            "env": spec.env,
            "guest": {
                "cpus": spec.guest.cpus,
                "memory_mb": spec.guest.memory_mb,
                "cpu_kind": spec.guest.cpu_kind,
            },
            "metadata": metadata,
            "auto_destroy": true,
            "restart": { "policy": "no" },
        });
        if let Some(cmd) = &spec.cmd {
            config["init"] = json!({ "cmd": cmd });
        }
        let mut body = json!({ "name": spec.name, "config": config });
        if let Some(region) = spec.region.as_ref().or(self.config.default_region.as_ref()) {
            body["region"] = json!(region);
        }
        body
    }
}

#[async_trait]
impl MachineProvider for FlyProvider {
    fn name(&self) -> &'static str {
        NAME
    }

    /// Fly's documented limits: 1 req/s (burst 3) per action, scoped by app for create and list
    /// and by machine for the rest; reads of one machine 5 req/s (burst 10).
    fn rate_limits(&self) -> Vec<(Op, RateLimit)> {
        vec![
            (Op::Launch, RateLimit::app(1.0, 3)),
            (Op::List, RateLimit::app(1.0, 3)),
            (Op::Wait, RateLimit::machine(1.0, 3)),
            (Op::Terminate, RateLimit::machine(1.0, 3)),
            (Op::Status, RateLimit::machine(5.0, 10)),
            (Op::Label, RateLimit::machine(1.0, 3)),
        ]
    }

    async fn launch(&self, spec: &LaunchSpec) -> Result<Launched, ProviderError> {
        let resp = self
            .send(
                self.request(Method::POST, "/machines")
                    .json(&self.create_body(spec)),
                "create machine",
            )
            .await?;
        if resp.status() == StatusCode::CONFLICT {
            return Err(ProviderError::Conflict {
                provider: NAME,
                name: spec.name.clone(),
            });
        }
        let machine: FlyMachine = json_or_error(resp, "create machine").await?;
        Ok(Launched {
            handle: machine.id,
            region: machine.region,
            version: machine.instance_id,
        })
    }

    async fn wait_started(
        &self,
        launched: &Launched,
        timeout: Duration,
    ) -> Result<(), ProviderError> {
        let deadline = Instant::now() + timeout;
        loop {
            let remaining = deadline.saturating_duration_since(Instant::now());
            if remaining.is_zero() {
                return Err(ProviderError::Timeout { provider: NAME });
            }
            // Whole seconds, at least one, never past our own deadline by more than a second.
            let secs = remaining.as_secs().clamp(1, MAX_WAIT_SECS);
            let mut query = vec![
                ("state", "started".to_owned()),
                ("timeout", secs.to_string()),
            ];
            if let Some(version) = &launched.version {
                query.push(("instance_id", version.clone()));
            }
            let req = self
                .request(Method::GET, &format!("/machines/{}/wait", launched.handle))
                .query(&query)
                .timeout(Duration::from_secs(secs) + self.config.request_timeout);
            let resp =
                match tokio::time::timeout(remaining, self.send(req, "wait for machine")).await {
                    Ok(resp) => resp?,
                    Err(_) => return Err(ProviderError::Timeout { provider: NAME }),
                };
            match resp.status() {
                s if s.is_success() => return Ok(()),
                StatusCode::REQUEST_TIMEOUT => continue,
                s if s.is_server_error() || s == StatusCode::TOO_MANY_REQUESTS => {
                    return Err(error_from(resp, "wait for machine").await)
                }
                _ => {
                    // 400/404/412: the machine will not become started. Read it to say why.
                    let wait_error = error_from(resp, "wait for machine").await;
                    return Err(match self.status(&launched.handle).await {
                        Ok(Some(status)) if status.state == MachineState::Started => return Ok(()),
                        Ok(Some(status)) if status.state.is_terminal() => {
                            ProviderError::StartFailed {
                                provider: NAME,
                                message: status.detail.unwrap_or_else(|| {
                                    format!("machine is {}", status.provider_state)
                                }),
                            }
                        }
                        Ok(None) => ProviderError::StartFailed {
                            provider: NAME,
                            message: "machine disappeared while starting".into(),
                        },
                        _ => wait_error,
                    });
                }
            }
        }
    }

    async fn status(&self, handle: &str) -> Result<Option<MachineStatus>, ProviderError> {
        Ok(self.get_machine(handle).await?.map(FlyMachine::into_status))
    }

    async fn terminate(&self, handle: &str) -> Result<(), ProviderError> {
        // Stop first so the bot gets its SIGTERM, then destroy whatever is left; with
        // auto_destroy the stop alone usually removes it and the delete answers 404.
        let resp = self
            .send(
                self.request(Method::POST, &format!("/machines/{handle}/stop"))
                    .json(&json!({})),
                "stop machine",
            )
            .await?;
        match resp.status() {
            StatusCode::NOT_FOUND => return Ok(()),
            s if s.is_success() => {}
            // A machine that cannot be stopped (already stopping, failed) is still destroyed below.
            s if s.is_client_error() && s != StatusCode::TOO_MANY_REQUESTS => {}
            _ => return Err(error_from(resp, "stop machine").await),
        }
        let resp = self
            .send(
                self.request(Method::DELETE, &format!("/machines/{handle}"))
                    .query(&[("force", "true")]),
                "destroy machine",
            )
            .await?;
        match resp.status() {
            StatusCode::NOT_FOUND => Ok(()),
            s if s.is_success() => Ok(()),
            _ => Err(error_from(resp, "destroy machine").await),
        }
    }

    async fn find(&self, session_key: &str) -> Result<Option<MachineStatus>, ProviderError> {
        // Destroyed machines too: an idempotent retry must see that its session already ran.
        let machines = self
            .list(
                &[
                    (label::MANAGED_BY, MANAGED_BY),
                    (label::SESSION, session_key),
                ],
                true,
            )
            .await?;
        // The filter is the server's; check again so a provider that ignores it cannot fool us.
        // A live machine wins over destroyed ones of the same session.
        let mut ours: Vec<MachineStatus> = machines
            .into_iter()
            .map(FlyMachine::into_status)
            .filter(|m| {
                m.labels
                    .as_ref()
                    .is_some_and(|l| l.session_key == session_key)
            })
            .collect();
        ours.sort_by_key(|m| m.state.is_terminal());
        Ok(ours.into_iter().next())
    }

    async fn list_managed(&self) -> Result<Vec<MachineStatus>, ProviderError> {
        let machines = self.list(&[(label::MANAGED_BY, MANAGED_BY)], false).await?;
        Ok(machines
            .into_iter()
            .map(FlyMachine::into_status)
            .filter(|m| m.labels.is_some() && m.provider_state != "destroyed")
            .collect())
    }

    fn can_set_deadline(&self) -> bool {
        true
    }

    async fn set_deadline(
        &self,
        handle: &str,
        deadline: DateTime<Utc>,
    ) -> Result<(), ProviderError> {
        let resp = self
            .send(
                self.request(
                    Method::POST,
                    &format!("/machines/{handle}/metadata/{}", label::DEADLINE),
                )
                .json(&json!({ "value": deadline.timestamp().to_string() })),
                "update machine metadata",
            )
            .await?;
        if resp.status().is_success() {
            Ok(())
        } else {
            Err(error_from(resp, "update machine metadata").await)
        }
    }

    async fn check(&self) -> Result<(), ProviderError> {
        let resp = self
            .send(
                self.http
                    .get(format!(
                        "{}/apps/{}",
                        self.config.api_url, self.config.app_name
                    ))
                    .bearer_auth(self.config.api_token.expose())
                    .timeout(self.config.request_timeout),
                "get app",
            )
            .await?;
        if resp.status().is_success() {
            Ok(())
        } else {
            Err(error_from(resp, "get app").await)
        }
    }
}

/// The fields of a Fly `Machine` that botdispatch reads.
#[derive(Debug, Deserialize)]
struct FlyMachine {
    id: String,
    #[serde(default)]
    instance_id: Option<String>,
    #[serde(default)]
    region: Option<String>,
    #[serde(default)]
    state: String,
    #[serde(default)]
    created_at: Option<String>,
    #[serde(default)]
    config: Option<FlyMachineConfig>,
    #[serde(default)]
    events: Vec<FlyEvent>,
}

#[derive(Debug, Deserialize)]
struct FlyMachineConfig {
    #[serde(default)]
    metadata: BTreeMap<String, String>,
}

#[derive(Debug, Deserialize)]
struct FlyEvent {
    #[serde(default, rename = "type")]
    kind: String,
    #[serde(default)]
    status: String,
    #[serde(default)]
    timestamp: Option<i64>,
    #[serde(default)]
    request: Option<Value>,
}

impl FlyEvent {
    fn at(&self) -> Option<DateTime<Utc>> {
        self.timestamp.and_then(DateTime::from_timestamp_millis)
    }

    fn exit_code(&self) -> Option<i64> {
        let req = self.request.as_ref()?;
        req.pointer("/exit_event/exit_code")
            .or_else(|| req.get("exit_code"))
            .and_then(Value::as_i64)
    }
}

impl FlyMachine {
    fn into_status(self) -> MachineStatus {
        // Fly lists events newest first; sort so "first started" and "last ended" are clear.
        let mut events = self.events;
        events.sort_by_key(|e| e.timestamp.unwrap_or_default());
        let started_at = events
            .iter()
            .find(|e| e.status == "started")
            .and_then(FlyEvent::at);
        let exit = events.iter().rev().find(|e| e.kind == "exit");
        let exit_code = exit.and_then(FlyEvent::exit_code);
        let state = match self.state.as_str() {
            "created" | "starting" | "replacing" | "updating" => MachineState::Starting,
            "started" => MachineState::Started,
            "failed" => MachineState::Failed,
            // Stopped, suspended, destroying, destroyed: over. It never ran if it never started.
            _ if started_at.is_none() => MachineState::Failed,
            _ => MachineState::Ended,
        };
        let ended_at = if state.is_terminal() {
            events
                .iter()
                .rev()
                .find(|e| {
                    matches!(e.status.as_str(), "stopped" | "destroyed" | "failed")
                        || e.kind == "exit"
                })
                .and_then(FlyEvent::at)
        } else {
            None
        };
        let detail = match (state, exit_code) {
            (MachineState::Failed, _) if started_at.is_none() => {
                Some(format!("machine is {} and never started", self.state))
            }
            (s, Some(code)) if s.is_terminal() => Some(format!("bot exited with code {code}")),
            _ => None,
        };
        let labels = self
            .config
            .as_ref()
            .and_then(|c| SessionLabels::from_map(&c.metadata));
        MachineStatus {
            handle: self.id,
            state,
            provider_state: self.state,
            region: self.region,
            created_at: self
                .created_at
                .as_deref()
                .and_then(|s| DateTime::parse_from_rfc3339(s).ok())
                .map(|d| d.with_timezone(&Utc)),
            started_at,
            ended_at,
            labels,
            detail,
        }
    }
}

/// Fly's error body: `{"error": "...", "status": ...}`.
#[derive(Debug, Deserialize)]
struct FlyError {
    #[serde(default)]
    error: Option<String>,
}

async fn json_or_error<T: serde::de::DeserializeOwned>(
    resp: Response,
    what: &str,
) -> Result<T, ProviderError> {
    if !resp.status().is_success() {
        return Err(error_from(resp, what).await);
    }
    resp.json().await.map_err(|e| ProviderError::Unavailable {
        provider: NAME,
        message: format!("{what}: unreadable answer: {}", transport_message(&e)),
    })
}

/// Maps a non-success answer to a provider error, keeping Fly's own message.
async fn error_from(resp: Response, what: &str) -> ProviderError {
    let status = resp.status();
    let retry_after = resp
        .headers()
        .get(reqwest::header::RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .and_then(parse_retry_after);
    let text = resp.text().await.unwrap_or_default();
    let message = serde_json::from_str::<FlyError>(&text)
        .ok()
        .and_then(|e| e.error)
        .unwrap_or_else(|| truncate(&text, 200));
    let message = format!("{what}: HTTP {}: {message}", status.as_u16());
    match status {
        StatusCode::TOO_MANY_REQUESTS => ProviderError::Throttled {
            provider: NAME,
            retry_after,
        },
        s if s.is_server_error() || s == StatusCode::REQUEST_TIMEOUT => {
            ProviderError::Unavailable {
                provider: NAME,
                message,
            }
        }
        s => ProviderError::Rejected {
            provider: NAME,
            status: s.as_u16(),
            message,
        },
    }
}

fn truncate(text: &str, max: usize) -> String {
    match text.char_indices().nth(max) {
        Some((i, _)) => format!("{}…", &text[..i]),
        None => text.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn machine(state: &str, events: Value) -> FlyMachine {
        serde_json::from_value(json!({
            "id": "148ed193b95089",
            "instance_id": "01H8XYZ",
            "region": "iad",
            "state": state,
            "created_at": "2026-11-22T10:00:00Z",
            "config": {"metadata": {"managed_by": "botdispatch", "botdispatch_session": "k",
                "botdispatch_owner": "alice", "botdispatch_room": "bd-k", "botdispatch_deadline": "1800000000"}},
            "events": events,
        }))
        .unwrap()
    }

    #[test]
    fn maps_fly_states_and_events() {
        let s = machine("starting", json!([])).into_status();
        assert_eq!(s.state, MachineState::Starting);
        assert_eq!(s.labels.unwrap().owner, "alice");

        let events = json!([
            {"type": "exit", "status": "stopped", "timestamp": 1_700_000_009_000_i64,
             "request": {"exit_event": {"exit_code": 0}}},
            {"type": "start", "status": "started", "timestamp": 1_700_000_002_000_i64},
            {"type": "launch", "status": "created", "timestamp": 1_700_000_000_000_i64}
        ]);
        let s = machine("destroyed", events).into_status();
        assert_eq!(s.state, MachineState::Ended);
        assert_eq!(s.started_at.unwrap().timestamp(), 1_700_000_002);
        assert_eq!(s.ended_at.unwrap().timestamp(), 1_700_000_009);
        assert_eq!(s.detail.as_deref(), Some("bot exited with code 0"));

        let s = machine("destroyed", json!([])).into_status();
        assert_eq!(s.state, MachineState::Failed);
    }
}
