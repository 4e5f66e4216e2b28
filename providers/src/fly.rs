//! The `fly` provider: one Fly Machine per session, through the Fly Machines REST API.
//!
//! A session's machine is created with `auto_destroy: true` and `restart.policy: "no"`, so when the
//! bot exits Fly destroys the VM and nothing stays billed. The machine's `config.metadata` carries
//! the session labels, which is how the reaper and an idempotent retry find it again without any
//! local memory. Requests follow the published OpenAPI spec (`testkit/specs/`).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use reqwest::{Method, RequestBuilder, Response, StatusCode};
use serde::Deserialize;
use serde_json::{json, Value};

use crate::config::{check_url, is_slug, required, BuildContext, ConfigError, ProviderSettings};
use crate::env::Env;
use crate::http::{self, CallFailure, ErrorShape};
use crate::labels::{key, MANAGED_BY};
use crate::retry::{Op, RateLimit};
use crate::{
    Deadline, Launched, MachineProvider, MachineState, MachineStatus, MachineTemplate,
    ProviderError, Relabel, Secret, SessionBinding, SessionLabels, Workload,
};

const NAME: &str = "fly";
/// Fly's `/wait` refuses to wait longer than this per call; longer waits loop.
const MAX_WAIT_SECS: u64 = 60;
/// Default base URL of the Machines API (`FLY_API_URL`).
pub const DEFAULT_API_URL: &str = "https://api.machines.dev/v1";

/// Settings of the `fly` provider: the `[fly]` section of the configuration file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FlyConfig {
    /// `FLY_API_TOKEN`.
    pub api_token: Option<Secret>,
    /// The app the bot machines run in. `BOTDISPATCH_FLY_APP`, else `FLY_APP_NAME`.
    pub app_name: Option<String>,
    /// Base URL including the version. `BOTDISPATCH_FLY_API_URL`, else `FLY_API_URL`; default
    /// `https://api.machines.dev/v1`.
    pub api_url: String,
    /// Region used when a start names none; unset lets Fly choose.
    /// `BOTDISPATCH_FLY_REGION`, else `FLY_REGION`.
    pub default_region: Option<String>,
}

impl Default for FlyConfig {
    fn default() -> Self {
        Self {
            api_token: None,
            app_name: None,
            api_url: DEFAULT_API_URL.to_owned(),
            default_region: None,
        }
    }
}

#[async_trait]
impl ProviderSettings for FlyConfig {
    fn name(&self) -> &'static str {
        NAME
    }

    fn apply_env(&mut self, env: &Env) -> Result<(), ConfigError> {
        env.apply("FLY_API_TOKEN", &mut self.api_token)?;
        env.apply("FLY_APP_NAME", &mut self.app_name)?;
        env.apply("FLY_API_URL", &mut self.api_url)?;
        env.apply("FLY_REGION", &mut self.default_region)?;
        // On Fly itself, `FLY_*` names belong to the platform (every machine gets its own
        // FLY_APP_NAME and FLY_REGION), so a dispatcher deployed on Fly names the bots' app
        // with these, which win.
        env.apply("BOTDISPATCH_FLY_APP", &mut self.app_name)?;
        env.apply("BOTDISPATCH_FLY_API_URL", &mut self.api_url)?;
        env.apply("BOTDISPATCH_FLY_REGION", &mut self.default_region)
    }

    fn validate(&self, _production: bool) -> Result<(), ConfigError> {
        required(
            self.api_token.as_ref().map(Secret::expose),
            "fly.api_token (FLY_API_TOKEN)",
            NAME,
        )?;
        let app = required(
            self.app_name.as_deref(),
            "fly.app_name (FLY_APP_NAME)",
            NAME,
        )?;
        if !is_slug(app, 63) {
            return Err(ConfigError::new(format!(
                "fly.app_name (FLY_APP_NAME) = {app:?} is not a Fly app name"
            )));
        }
        check_url("fly.api_url (FLY_API_URL)", &self.api_url)?;
        if let Some(region) = &self.default_region {
            if !is_slug(region, 32) {
                return Err(ConfigError::new(format!(
                    "fly.default_region (FLY_REGION) = {region:?} is not a region code"
                )));
            }
        }
        Ok(())
    }

    fn workload(
        &self,
        agent: &str,
        image: Option<&str>,
        _cmd: Option<&[String]>,
    ) -> Result<Workload, ConfigError> {
        match image.map(str::trim).filter(|i| !i.is_empty()) {
            Some(image) => Ok(Workload::Image(image.to_owned())),
            None => Err(ConfigError::new(format!(
                "agents.{agent}.image is required (or BOTDISPATCH_BOT_IMAGE for the default agent)"
            ))),
        }
    }

    async fn build(&self, ctx: &BuildContext) -> Result<Arc<dyn MachineProvider>, ProviderError> {
        Ok(Arc::new(FlyProvider::new(ctx, self.clone())?))
    }
}

/// Fly's error body: `{"error": "...", "status": ...}`.
const FLY_ERRORS: ErrorShape = ErrorShape {
    parse: |text| {
        #[derive(Deserialize)]
        struct FlyError {
            error: Option<String>,
        }
        let message = serde_json::from_str::<FlyError>(text).ok()?.error?;
        Some(http::ParsedError::message(message))
    },
    throttling_codes: &[],
};

/// Launches sessions as Fly Machines.
pub struct FlyProvider {
    http: reqwest::Client,
    api_url: String,
    api_token: Secret,
    app_name: String,
    default_region: Option<String>,
    request_timeout: Duration,
    deployment: String,
}

/// A Fly machine id: lowercase hex today (14 characters); letters and digits, 8 to 32, are
/// accepted so a longer id scheme would not lock sessions out.
fn is_machine_id(handle: &str) -> bool {
    (8..=32).contains(&handle.len())
        && handle
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
}

impl FlyProvider {
    /// Validates `config` (no I/O) and builds the client on the context's shared HTTP client.
    pub fn new(ctx: &BuildContext, config: FlyConfig) -> Result<Self, ProviderError> {
        config
            .validate(ctx.production)
            .map_err(|e| ProviderError::config(NAME, e.0))?;
        Ok(Self {
            http: ctx.http.clone(),
            api_url: config.api_url.trim_end_matches('/').to_owned(),
            api_token: config.api_token.unwrap_or_default(),
            app_name: config.app_name.unwrap_or_default(),
            default_region: config.default_region,
            request_timeout: ctx.request_timeout,
            deployment: ctx.deployment.clone(),
        })
    }

    /// `/machines/{handle}{rest}`, for a valid handle only (percent-encoded all the same).
    fn machine_path(&self, handle: &str, rest: &str) -> Result<String, ProviderError> {
        if !is_machine_id(handle) {
            return Err(ProviderError::rejected(
                NAME,
                format!("{handle:?} is not a Fly machine id"),
            ));
        }
        let id = http::segment(handle).map_err(|e| ProviderError::rejected(NAME, e))?;
        Ok(format!("/machines/{id}{rest}"))
    }

    fn status_of(&self, machine: FlyMachine) -> MachineStatus {
        machine.into_status(&self.deployment)
    }

    fn request(&self, method: Method, path: &str) -> RequestBuilder {
        let url = format!("{}/apps/{}{}", self.api_url, self.app_name, path);
        self.http
            .request(method, url)
            .bearer_auth(self.api_token.expose())
            .timeout(self.request_timeout)
    }

    /// Sends a request; any failure becomes the provider error of `what`.
    async fn send(&self, req: RequestBuilder, what: &str) -> Result<Response, ProviderError> {
        http::send(req).await.map_err(|f| fail(what, f))
    }

    async fn json<T: serde::de::DeserializeOwned>(
        &self,
        req: RequestBuilder,
        what: &str,
    ) -> Result<T, ProviderError> {
        let resp = self.send(req, what).await?;
        http::read_json(resp, FLY_ERRORS)
            .await
            .map_err(|f| fail(what, f))
    }

    async fn get_machine(&self, id: &str) -> Result<Option<FlyMachine>, ProviderError> {
        let what = "get machine";
        let path = self.machine_path(id, "")?;
        let resp = self.send(self.request(Method::GET, &path), what).await?;
        if resp.status() == StatusCode::NOT_FOUND {
            return Ok(None);
        }
        http::read_json(resp, FLY_ERRORS)
            .await
            .map(Some)
            .map_err(|f| fail(what, f))
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
        self.json(
            self.request(Method::GET, "/machines").query(&query),
            "list machines",
        )
        .await
    }

    fn create_body(
        &self,
        template: &MachineTemplate,
        session: &SessionBinding,
    ) -> Result<Value, ProviderError> {
        let Workload::Image(image) = &template.workload else {
            return Err(ProviderError::rejected(
                NAME,
                format!("fly runs container images, not {:?}", template.workload),
            ));
        };
        let metadata: BTreeMap<String, String> = session.labels.to_map();
        let mut config = json!({
            "image": image,
            "env": session.machine_env(template),
            "guest": {
                "cpus": template.guest.cpus,
                "memory_mb": template.guest.memory_mb,
                "cpu_kind": template.guest.cpu_kind,
            },
            "metadata": metadata,
            "auto_destroy": true,
            "restart": { "policy": "no" },
        });
        if let Some(cmd) = &template.cmd {
            config["init"] = json!({ "cmd": cmd });
        }
        let mut body = json!({ "name": session.name, "config": config });
        if let Some(region) = template.region.as_ref().or(self.default_region.as_ref()) {
            body["region"] = json!(region);
        }
        Ok(body)
    }

    /// After a wait that Fly ended early (400/404/412): reads the machine to say why.
    async fn why_not_started(&self, handle: &str, wait_error: ProviderError) -> ProviderError {
        match self.status(handle).await {
            Ok(Some(status)) if status.state.is_terminal() => ProviderError::StartFailed {
                provider: NAME,
                message: status
                    .detail
                    .unwrap_or_else(|| format!("machine is {}", status.provider_state)),
            },
            Ok(None) => ProviderError::StartFailed {
                provider: NAME,
                message: "machine disappeared while starting".into(),
            },
            _ => wait_error,
        }
    }
}

/// The provider error of a failed call of `what`.
fn fail(what: &str, failure: CallFailure) -> ProviderError {
    ProviderError::from_call(NAME, what, failure)
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

    async fn launch(
        &self,
        template: &MachineTemplate,
        session: &SessionBinding,
    ) -> Result<Launched, ProviderError> {
        let what = "create machine";
        let body = self.create_body(template, session)?;
        let resp = self
            .send(self.request(Method::POST, "/machines").json(&body), what)
            .await?;
        if resp.status() == StatusCode::CONFLICT {
            return Err(ProviderError::Conflict {
                provider: NAME,
                name: session.name.clone(),
            });
        }
        let machine: FlyMachine = http::read_json(resp, FLY_ERRORS)
            .await
            .map_err(|f| fail(what, f))?;
        Ok(Launched {
            handle: machine.id,
            region: machine.region,
            version: machine.instance_id,
        })
    }

    fn is_handle(&self, handle: &str) -> bool {
        is_machine_id(handle)
    }

    async fn wait_started(
        &self,
        launched: &Launched,
        deadline: Deadline,
    ) -> Result<(), ProviderError> {
        let what = "wait for machine";
        loop {
            let remaining = deadline.remaining();
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
                .request(Method::GET, &self.machine_path(&launched.handle, "/wait")?)
                .query(&query)
                .timeout(Duration::from_secs(secs) + self.request_timeout);
            let resp = match tokio::time::timeout_at(deadline.instant(), self.send(req, what)).await
            {
                Ok(resp) => resp?,
                Err(_) => return Err(ProviderError::Timeout { provider: NAME }),
            };
            let status = resp.status();
            if status.is_success() {
                return Ok(());
            }
            if status == StatusCode::REQUEST_TIMEOUT {
                continue;
            }
            let error = fail(
                what,
                CallFailure::Answer(http::ErrorAnswer::read(resp, FLY_ERRORS).await),
            );
            if status.is_server_error() || status == StatusCode::TOO_MANY_REQUESTS {
                return Err(error);
            }
            // 400/404/412: the machine will not become started. Read it to say why.
            return match self.status(&launched.handle).await {
                Ok(Some(s)) if s.state == MachineState::Started => Ok(()),
                _ => Err(self.why_not_started(&launched.handle, error).await),
            };
        }
    }

    async fn status(&self, handle: &str) -> Result<Option<MachineStatus>, ProviderError> {
        Ok(self.get_machine(handle).await?.map(|m| self.status_of(m)))
    }

    async fn terminate(&self, handle: &str) -> Result<(), ProviderError> {
        // Stop first so the bot gets its SIGTERM, then destroy whatever is left; with
        // auto_destroy the stop alone usually removes it and the delete answers 404.
        let what = "stop machine";
        let resp = self
            .send(
                self.request(Method::POST, &self.machine_path(handle, "/stop")?)
                    .json(&json!({})),
                what,
            )
            .await?;
        match resp.status() {
            StatusCode::NOT_FOUND => return Ok(()),
            s if s.is_success() => {}
            // A machine that cannot be stopped (already stopping, failed) is still destroyed below.
            s if s.is_client_error() && s != StatusCode::TOO_MANY_REQUESTS => {}
            _ => {
                return Err(fail(
                    what,
                    CallFailure::Answer(http::ErrorAnswer::read(resp, FLY_ERRORS).await),
                ))
            }
        }
        let what = "destroy machine";
        let resp = self
            .send(
                self.request(Method::DELETE, &self.machine_path(handle, "")?)
                    .query(&[("force", "true")]),
                what,
            )
            .await?;
        if resp.status() == StatusCode::NOT_FOUND {
            return Ok(());
        }
        http::expect_success(resp, FLY_ERRORS)
            .await
            .map(drop)
            .map_err(|f| fail(what, f))
    }

    async fn find(&self, session_key: &str) -> Result<Option<MachineStatus>, ProviderError> {
        // Destroyed machines too: an idempotent retry must see that its session already ran.
        let machines = self
            .list(
                &[
                    (key::MANAGED_BY, MANAGED_BY),
                    (key::DEPLOYMENT, &self.deployment),
                    (key::SESSION, session_key),
                ],
                true,
            )
            .await?;
        // The filter is the server's; check again so a provider that ignores it cannot fool us.
        // A live machine wins over destroyed ones of the same session.
        let mut ours: Vec<MachineStatus> = machines
            .into_iter()
            .map(|m| self.status_of(m))
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
        let machines = self
            .list(
                &[
                    (key::MANAGED_BY, MANAGED_BY),
                    (key::DEPLOYMENT, &self.deployment),
                ],
                false,
            )
            .await?;
        Ok(machines
            .into_iter()
            .map(|m| self.status_of(m))
            .filter(|m| m.labels.is_some() && m.provider_state != "destroyed")
            .collect())
    }

    async fn check(&self) -> Result<(), ProviderError> {
        let req = self
            .http
            .get(format!("{}/apps/{}", self.api_url, self.app_name))
            .bearer_auth(self.api_token.expose())
            .timeout(self.request_timeout);
        let resp = self.send(req, "get app").await?;
        http::expect_success(resp, FLY_ERRORS)
            .await
            .map(drop)
            .map_err(|f| fail("get app", f))
    }

    fn relabel(&self) -> Option<&dyn Relabel> {
        Some(self)
    }
}

#[async_trait]
impl Relabel for FlyProvider {
    /// One metadata key, set without restarting the machine.
    async fn set_deadline(&self, handle: &str, deadline: Deadline) -> Result<(), ProviderError> {
        let what = "update machine metadata";
        let req = self
            .request(
                Method::POST,
                &self.machine_path(handle, &format!("/metadata/{}", key::DEADLINE))?,
            )
            .json(&json!({ "value": deadline.unix_secs().to_string() }));
        let resp = self.send(req, what).await?;
        http::expect_success(resp, FLY_ERRORS)
            .await
            .map(drop)
            .map_err(|f| fail(what, f))
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
    /// The machine as botdispatch reports it; labels only when it is `deployment`'s.
    fn into_status(self, deployment: &str) -> MachineStatus {
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
            .and_then(|c| SessionLabels::from_map_of(&c.metadata, deployment));
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
        let s = machine("starting", json!([])).into_status("default");
        assert_eq!(s.state, MachineState::Starting);
        assert_eq!(s.labels.unwrap().owner, "alice");

        let events = json!([
            {"type": "exit", "status": "stopped", "timestamp": 1_700_000_009_000_i64,
             "request": {"exit_event": {"exit_code": 0}}},
            {"type": "start", "status": "started", "timestamp": 1_700_000_002_000_i64},
            {"type": "launch", "status": "created", "timestamp": 1_700_000_000_000_i64}
        ]);
        let s = machine("destroyed", events).into_status("default");
        assert_eq!(s.state, MachineState::Ended);
        assert_eq!(s.started_at.unwrap().timestamp(), 1_700_000_002);
        assert_eq!(s.ended_at.unwrap().timestamp(), 1_700_000_009);
        assert_eq!(s.detail.as_deref(), Some("bot exited with code 0"));

        let s = machine("destroyed", json!([])).into_status("default");
        assert_eq!(s.state, MachineState::Failed);
    }
}
