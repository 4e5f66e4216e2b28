//! Stateful fake of the Fly Machines API: an axum server on `127.0.0.1:0` that creates, boots,
//! stops and destroys in-memory machines on a timer, validates every request against the
//! published OpenAPI spec, and can inject faults.
//!
//! Scope: create, list, get, wait, stop and delete of machines (the calls botdispatch makes).
//! Other operations of the spec answer 501. Not modelled: restart policies (a machine whose
//! process exits always stops; it is never restarted), leases, updates, suspend.
//!
//! Order of checks for every request: spec validation ([`OpenApiValidator::fly`]; violations are
//! recorded and answered 400), bearer token (401), implemented route (501), app (404), armed
//! [`Fault`], then the operation itself.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use axum::extract::State;
use axum::http::Method;
use axum::response::Response;
use chrono::{DateTime, SecondsFormat, Utc};
use serde_json::{json, Map, Value};
use tokio::sync::watch;
use ulid::Ulid;

use super::faults::{self, FakeCore};
use super::server::{self, FakeServer, Reply, Request};
use super::validate::openapi::OpenApiValidator;
use super::{Fault, RecordedRequest};

/// Configuration of a [`FakeFly`].
#[derive(Debug, Clone)]
pub struct FakeFlyConfig {
    /// Required bearer token (`Authorization: Bearer <token>`).
    pub token: String,
    /// Apps that exist; requests for any other app answer 404.
    pub apps: Vec<String>,
    /// Time a launched machine spends in `created` before `starting`.
    pub boot_delay: Duration,
    /// Time a machine spends in `starting` before `started`.
    pub starting_for: Duration,
    /// If set, the machine's main process exits by itself (exit code 0) this long after the
    /// machine started.
    pub bot_lifetime: Option<Duration>,
    /// Time a stopped machine spends in `stopping` before `stopped`.
    pub stop_delay: Duration,
    /// Real duration of one second of the wait endpoint's `timeout` parameter. Fly counts whole
    /// seconds; tests may shrink this to exercise wait timeouts quickly. Default 1 s.
    pub wait_second: Duration,
}

impl Default for FakeFlyConfig {
    fn default() -> Self {
        Self {
            token: "fake-fly-token".to_owned(),
            apps: vec!["botdispatch-test".to_owned()],
            boot_delay: Duration::from_millis(50),
            starting_for: Duration::from_millis(20),
            bot_lifetime: None,
            stop_delay: Duration::from_millis(20),
            wait_second: Duration::from_secs(1),
        }
    }
}

/// The operations of [`FakeFly`] faults can be armed for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FlyOp {
    /// `POST /apps/{app}/machines`
    Create,
    /// `GET /apps/{app}/machines/{id}`
    Get,
    /// `GET /apps/{app}/machines/{id}/wait`
    Wait,
    /// `POST /apps/{app}/machines/{id}/stop`
    Stop,
    /// `DELETE /apps/{app}/machines/{id}`
    Delete,
    /// `POST /apps/{app}/machines/{id}/metadata/{key}`
    Metadata,
    /// `GET /apps/{app}/machines`
    List,
}

/// A snapshot of one machine of the fake.
#[derive(Debug, Clone, PartialEq)]
pub struct FakeMachine {
    /// 14 lowercase hex characters.
    pub id: String,
    pub name: String,
    pub app: String,
    pub region: String,
    /// `created`, `starting`, `started`, `stopping`, `stopped` or `destroyed`.
    pub state: String,
    /// 26 uppercase Crockford base32 characters (ULID-like); the machine's version.
    pub instance_id: String,
    /// The `config` of the create request, as sent.
    pub config: Value,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    /// `MachineEvent` objects, newest first (as Fly lists them).
    pub events: Vec<Value>,
}

impl FakeMachine {
    fn auto_destroy(&self) -> bool {
        self.config.get("auto_destroy").and_then(Value::as_bool) == Some(true)
    }

    fn metadata(&self, key: &str) -> Option<&str> {
        self.config
            .get("metadata")
            .and_then(|m| m.get(key))
            .and_then(Value::as_str)
    }

    fn to_json(&self, private_ip: &str, summary: bool) -> Value {
        let mut out = json!({
            "id": self.id,
            "name": self.name,
            "state": self.state,
            "region": self.region,
            "instance_id": self.instance_id,
            "private_ip": private_ip,
            "created_at": rfc3339(self.created_at),
            "updated_at": rfc3339(self.updated_at),
        });
        if !summary {
            out["config"] = self.config.clone();
            out["events"] = Value::Array(self.events.clone());
            out["host_status"] = json!("ok");
        }
        out
    }
}

/// A handle on a running fake Fly Machines API. Clones share the same server and state; the
/// server stops when the last handle is dropped.
#[derive(Debug, Clone)]
pub struct FakeFly {
    server: FakeServer<Shared>,
}

#[derive(Debug)]
struct Shared {
    config: FakeFlyConfig,
    validator: OpenApiValidator,
    core: FakeCore<FlyOp>,
    state: Mutex<FlyState>,
    /// Bumped on every machine state change; waiters re-check when it moves.
    changes: watch::Sender<u64>,
}

#[derive(Debug, Default)]
struct FlyState {
    machines: Vec<MachineRecord>,
    fail_create: Option<(u16, String)>,
    never_start: bool,
    create_delay: Duration,
}

impl FlyState {
    /// Machine `id` of `app`, destroyed or not.
    fn machine(&self, app: &str, id: &str) -> Option<&MachineRecord> {
        self.machines
            .iter()
            .find(|r| r.machine.app == app && r.machine.id == id)
    }

    fn machine_mut(&mut self, app: &str, id: &str) -> Option<&mut MachineRecord> {
        self.machines
            .iter_mut()
            .find(|r| r.machine.app == app && r.machine.id == id)
    }
}

#[derive(Debug)]
struct MachineRecord {
    machine: FakeMachine,
    private_ip: String,
    /// `(event id, state)` of every state the machine entered, oldest first.
    history: Vec<(String, String)>,
    /// Bumped by every external transition (stop, delete, exit) so that background
    /// lifecycle tasks started before it give up.
    epoch: u64,
    /// `set_never_start` was on when the machine was created.
    never_start: bool,
}

enum Route {
    App(String),
    SetMetadata(String, String, String),
    Create(String),
    List(String),
    Get(String, String),
    Wait(String, String),
    Stop(String, String),
    Delete(String, String),
}

impl Route {
    fn parse(method: &Method, path: &str) -> Option<Self> {
        let segments: Vec<&str> = path.trim_start_matches('/').split('/').collect();
        let route = match (method.as_str(), segments.as_slice()) {
            ("GET", ["apps", app]) => Self::App((*app).to_owned()),
            ("POST", ["apps", app, "machines", id, "metadata", key]) => {
                Self::SetMetadata((*app).to_owned(), (*id).to_owned(), (*key).to_owned())
            }
            ("POST", ["apps", app, "machines"]) => Self::Create((*app).to_owned()),
            ("GET", ["apps", app, "machines"]) => Self::List((*app).to_owned()),
            ("GET", ["apps", app, "machines", id]) => {
                Self::Get((*app).to_owned(), (*id).to_owned())
            }
            ("GET", ["apps", app, "machines", id, "wait"]) => {
                Self::Wait((*app).to_owned(), (*id).to_owned())
            }
            ("POST", ["apps", app, "machines", id, "stop"]) => {
                Self::Stop((*app).to_owned(), (*id).to_owned())
            }
            ("DELETE", ["apps", app, "machines", id]) => {
                Self::Delete((*app).to_owned(), (*id).to_owned())
            }
            _ => return None,
        };
        Some(route)
    }

    fn op(&self) -> FlyOp {
        match self {
            Self::Create(_) => FlyOp::Create,
            Self::App(_) | Self::List(_) => FlyOp::List,
            Self::SetMetadata(..) => FlyOp::Metadata,
            Self::Get(..) => FlyOp::Get,
            Self::Wait(..) => FlyOp::Wait,
            Self::Stop(..) => FlyOp::Stop,
            Self::Delete(..) => FlyOp::Delete,
        }
    }

    fn app(&self) -> &str {
        match self {
            Self::App(app) | Self::Create(app) | Self::List(app) => app,
            Self::Get(app, _)
            | Self::Wait(app, _)
            | Self::Stop(app, _)
            | Self::Delete(app, _)
            | Self::SetMetadata(app, _, _) => app,
        }
    }
}

/// One incoming request, routed.
struct Incoming<'a> {
    route: Route,
    http: &'a Request,
    body: Option<&'a Value>,
}

impl Incoming<'_> {
    fn query(&self, name: &str) -> Option<&str> {
        self.http.query(name)
    }

    fn query_all<'s>(&'s self, name: &'s str) -> impl Iterator<Item = &'s str> + 's {
        self.http
            .query
            .iter()
            .filter(move |(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    fn query_flag(&self, name: &str) -> bool {
        self.query(name) == Some("true")
    }
}

impl FakeFly {
    /// Starts the fake on a free local port, on the current tokio runtime.
    ///
    /// # Panics
    ///
    /// Panics outside a tokio runtime or if no local port can be bound.
    pub async fn start(config: FakeFlyConfig) -> FakeFly {
        let (changes, _) = watch::channel(0);
        let shared = Shared {
            config,
            validator: OpenApiValidator::fly(),
            core: FakeCore::default(),
            state: Mutex::new(FlyState::default()),
            changes,
        };
        FakeFly {
            server: FakeServer::start(shared, handle).await,
        }
    }

    /// `http://127.0.0.1:PORT/v1`, what a client configured for `https://api.machines.dev/v1`
    /// should use.
    pub fn base_url(&self) -> String {
        format!("{}/v1", self.root_url())
    }

    /// `http://127.0.0.1:PORT`: the same API without the `/v1` prefix (as Prism forwards it).
    pub fn root_url(&self) -> String {
        self.server.url("")
    }

    /// The address the fake listens on.
    pub fn addr(&self) -> SocketAddr {
        self.server.addr()
    }

    /// The bearer token the fake accepts.
    pub fn token(&self) -> &str {
        &self.server.config.token
    }

    /// Every machine ever created (destroyed ones included), oldest first.
    pub fn machines(&self) -> Vec<FakeMachine> {
        let state = self.server.lock();
        state.machines.iter().map(|r| r.machine.clone()).collect()
    }

    /// The machines that are not destroyed, oldest first.
    pub fn live_machines(&self) -> Vec<FakeMachine> {
        let state = self.server.lock();
        state
            .machines
            .iter()
            .filter(|r| r.machine.state != "destroyed")
            .map(|r| r.machine.clone())
            .collect()
    }

    /// One machine by id (of any app).
    pub fn machine(&self, id: &str) -> Option<FakeMachine> {
        let state = self.server.lock();
        state
            .machines
            .iter()
            .find(|r| r.machine.id == id)
            .map(|r| r.machine.clone())
    }

    /// The machine's main process exits with `exit_code`: a `starting` or `started` machine
    /// becomes `stopped` (recording an `exit` event whose `request.exit_event.exit_code` is the
    /// code), then `destroyed` if its config has `auto_destroy: true`. Returns whether the
    /// machine was running.
    pub fn exit_machine(&self, id: &str, exit_code: i32) -> bool {
        self.server.exit(id, exit_code, None)
    }

    /// Waits until the machine `id` is (or has been, since the call) in `state`, at most
    /// `timeout`. Returns whether it got there.
    pub async fn wait_for_state(&self, id: &str, state: &str, timeout: Duration) -> bool {
        let mut changes = self.server.changes.subscribe();
        let start = {
            let guard = self.server.lock();
            match guard.machines.iter().find(|r| r.machine.id == id) {
                Some(record) => record.history.len() - 1,
                None => return false,
            }
        };
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            {
                let guard = self.server.lock();
                let Some(record) = guard.machines.iter().find(|r| r.machine.id == id) else {
                    return false;
                };
                if record.history[start..].iter().any(|(_, s)| s == state) {
                    return true;
                }
            }
            match tokio::time::timeout_at(deadline, changes.changed()).await {
                Ok(Ok(())) => {}
                Ok(Err(_)) | Err(_) => return false,
            }
        }
    }

    /// Every request answered so far, oldest first.
    pub fn requests(&self) -> Vec<RecordedRequest> {
        self.server.core.calls()
    }

    /// Every spec violation seen so far (each was answered 400).
    pub fn spec_violations(&self) -> Vec<String> {
        self.server.core.violations()
    }

    /// While set, every create answers `status` with `{"error": <message>}` and creates nothing.
    pub fn set_fail_create(&self, failure: Option<(u16, String)>) {
        self.server.lock().fail_create = failure;
    }

    /// While on, machines created from now on never reach `started` (they stay in `starting`).
    pub fn set_never_start(&self, never: bool) {
        self.server.lock().never_start = never;
    }

    /// Creates answer after this delay. The machine exists (and boots) from the moment the
    /// request arrived, like a slow API whose caller may time out after the fact.
    pub fn set_create_delay(&self, delay: Duration) {
        self.server.lock().create_delay = delay;
    }

    /// Arms `fault` for the next `count` requests of `op` (after any fault already armed for it).
    pub fn set_fault(&self, op: FlyOp, fault: Fault, count: u32) {
        self.server.core.set_fault(op, fault, count);
    }

    /// Disarms every fault armed with [`set_fault`](Self::set_fault).
    pub fn clear_faults(&self) {
        self.server.core.clear_faults();
    }
}

async fn handle(State(shared): State<Arc<Shared>>, request: Request) -> Response {
    let body = request.json_body();
    let reply = match &body {
        Ok(json) => shared.process(&request, json.as_ref()).await,
        Err(e) => {
            let message = format!(
                "{} {}: request body is not valid JSON: {e}",
                request.method, request.path
            );
            shared.core.violation(message.clone());
            Reply::json(400, json!({"error": message, "status": "unknown"}))
        }
    };
    shared
        .core
        .record(request.recorded(body.ok().flatten(), &reply));
    request.respond(reply)
}

fn fly_error(status: u16, message: impl Into<String>) -> Reply {
    Reply::json(status, json!({ "error": message.into() }))
}

fn not_found() -> Reply {
    fly_error(404, "machine not found")
}

fn rfc3339(at: DateTime<Utc>) -> String {
    at.to_rfc3339_opts(SecondsFormat::Secs, true)
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, FlyState> {
        server::lock(&self.state)
    }

    fn notify(&self) {
        self.changes.send_modify(|n| *n = n.wrapping_add(1));
    }

    async fn process(self: &Arc<Self>, request: &Request, body: Option<&Value>) -> Reply {
        let method = &request.method;
        // Routes are served under `/v1` (the real base URL) and at the root (Prism forwards
        // the spec's paths, which have no `/v1`).
        let api_path = match request.path.strip_prefix("/v1") {
            Some(rest) if rest.starts_with('/') => rest,
            _ => &request.path,
        };

        if let Err(violation) =
            self.validator
                .validate(method.as_str(), api_path, &request.query, body)
        {
            self.core.violation(violation.clone());
            return Reply::json(400, json!({"error": violation, "status": "unknown"}));
        }

        if request.bearer_token() != Some(self.config.token.as_str()) {
            return fly_error(401, "unauthorized: missing or invalid bearer token");
        }

        let Some(route) = Route::parse(method, api_path) else {
            return fly_error(
                501,
                format!("{method} {api_path} is not implemented by FakeFly"),
            );
        };
        if !self.config.apps.iter().any(|a| a == route.app()) {
            return fly_error(404, "app not found");
        }
        let incoming = Incoming {
            route,
            http: request,
            body,
        };

        faults::answer(
            self.core.next_fault(incoming.route.op()),
            || self.execute(&incoming),
            |status| json!({ "error": faults::reason(status).to_ascii_lowercase() }),
        )
        .await
    }

    async fn execute(self: &Arc<Self>, request: &Incoming<'_>) -> Reply {
        match &request.route {
            Route::App(app) => self.app_info(app),
            Route::SetMetadata(app, id, key) => self.set_metadata(app, id, key, request.body),
            Route::Create(app) => self.create(app, request.body).await,
            Route::List(app) => self.list(app, request),
            Route::Get(app, id) => self.get(app, id),
            Route::Wait(app, id) => self.wait(app, id, request).await,
            Route::Stop(app, id) => self.stop(app, id),
            Route::Delete(app, id) => self.delete(app, id, request.query_flag("force")),
        }
    }

    async fn create(self: &Arc<Self>, app: &str, body: Option<&Value>) -> Reply {
        let empty = Value::Object(Map::new());
        let body = body.unwrap_or(&empty);
        let text = |key: &str| {
            body.get(key)
                .and_then(Value::as_str)
                .filter(|s| !s.is_empty())
                .map(str::to_owned)
        };
        let skip_launch = body.get("skip_launch").and_then(Value::as_bool) == Some(true);

        let (snapshot, delay) = {
            let mut state = self.lock();
            if let Some((status, message)) = state.fail_create.clone() {
                return fly_error(status, message);
            }
            if let Some(name) = text("name") {
                let taken = state.machines.iter().any(|r| {
                    r.machine.app == app && r.machine.name == name && r.machine.state != "destroyed"
                });
                if taken {
                    return fly_error(
                        409,
                        format!("already exists: a machine named {name:?} already exists in app {app:?}"),
                    );
                }
            }
            let existing: HashSet<&str> = state
                .machines
                .iter()
                .map(|r| r.machine.id.as_str())
                .collect();
            let id = loop {
                let id = super::random_string(super::LOWER_HEX, 14);
                if !existing.contains(id.as_str()) {
                    break id;
                }
            };
            let now = Utc::now();
            let initial = if skip_launch { "stopped" } else { "created" };
            let event = event("launch", initial, "user", None);
            let event_id = event["id"].as_str().unwrap_or_default().to_owned();
            let ordinal = state.machines.len() + 1;
            let machine = FakeMachine {
                name: text("name").unwrap_or_else(|| generated_name(&id)),
                id,
                app: app.to_owned(),
                region: text("region").unwrap_or_else(|| "iad".to_owned()),
                state: initial.to_owned(),
                instance_id: Ulid::new().to_string(),
                config: body.get("config").cloned().unwrap_or_else(|| json!({})),
                created_at: now,
                updated_at: now,
                events: vec![event],
            };
            let private_ip = format!("fdaa:0:1:a7b:{:x}:{:x}::2", ordinal >> 16, ordinal & 0xffff);
            let snapshot = machine.to_json(&private_ip, false);
            let never_start = state.never_start;
            let id = machine.id.clone();
            state.machines.push(MachineRecord {
                machine,
                private_ip,
                history: vec![(event_id, initial.to_owned())],
                epoch: 0,
                never_start,
            });
            if !skip_launch {
                tokio::spawn(self.clone().boot(id));
            }
            (snapshot, state.create_delay)
        };
        self.notify();
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
        Reply::json(200, snapshot)
    }

    /// Background lifecycle of a launched machine: created → starting → started → (exit).
    async fn boot(self: Arc<Self>, id: String) {
        tokio::time::sleep(self.config.boot_delay).await;
        if !self.advance(&id, 0, "created", "starting", "start") {
            return;
        }
        let never_start = {
            let state = self.lock();
            state
                .machines
                .iter()
                .find(|r| r.machine.id == id)
                .is_none_or(|r| r.never_start)
        };
        if never_start {
            return;
        }
        tokio::time::sleep(self.config.starting_for).await;
        if !self.advance(&id, 0, "starting", "started", "start") {
            return;
        }
        if let Some(lifetime) = self.config.bot_lifetime {
            tokio::time::sleep(lifetime).await;
            self.exit(&id, 0, Some(0));
        }
    }

    /// Moves machine `id` from `from` to `to` if nothing else touched it since `epoch`.
    fn advance(&self, id: &str, epoch: u64, from: &str, to: &str, kind: &str) -> bool {
        {
            let mut state = self.lock();
            let Some(record) = state.machines.iter_mut().find(|r| r.machine.id == id) else {
                return false;
            };
            if record.epoch != epoch || record.machine.state != from {
                return false;
            }
            transition(record, to, kind, "flyd", None);
        }
        self.notify();
        true
    }

    /// The main process exits; see [`FakeFly::exit_machine`]. With `epoch`, only if nothing
    /// else touched the machine since.
    fn exit(&self, id: &str, exit_code: i32, epoch: Option<u64>) -> bool {
        {
            let mut state = self.lock();
            let Some(record) = state.machines.iter_mut().find(|r| r.machine.id == id) else {
                return false;
            };
            if epoch.is_some_and(|e| e != record.epoch)
                || !matches!(record.machine.state.as_str(), "starting" | "started")
            {
                return false;
            }
            record.epoch += 1;
            process_exited(
                record,
                json!({
                    "exit_code": exit_code,
                    "oom_killed": false,
                    "requested_stop": false,
                    "exited_at": rfc3339(Utc::now()),
                }),
            );
        }
        self.notify();
        true
    }

    /// `POST /apps/{app}/machines/{id}/metadata/{key}`: upserts one metadata value (204).
    fn set_metadata(&self, app: &str, id: &str, key: &str, body: Option<&Value>) -> Reply {
        let Some(value) = body.and_then(|b| b.get("value")).and_then(Value::as_str) else {
            return Reply::json(400, json!({"error": "value is required"}));
        };
        let mut state = self.lock();
        let Some(record) = state
            .machine_mut(app, id)
            .filter(|r| r.machine.state != "destroyed")
        else {
            return Reply::json(404, json!({"error": "machine not found"}));
        };
        if !record
            .machine
            .config
            .get("metadata")
            .is_some_and(Value::is_object)
        {
            record.machine.config["metadata"] = json!({});
        }
        record.machine.config["metadata"][key] = json!(value);
        Reply::json(204, Value::Null)
    }

    /// `GET /apps/{app}`: the app exists (unknown apps were answered 404 before this).
    fn app_info(&self, app: &str) -> Reply {
        let state = self.lock();
        let machine_count = state
            .machines
            .iter()
            .filter(|r| r.machine.app == app && r.machine.state != "destroyed")
            .count();
        Reply::json(
            200,
            json!({
                "id": app,
                "name": app,
                "machine_count": machine_count,
                "network": "default",
                "organization": {"name": "Test Org", "slug": "test-org"},
                "status": "deployed",
            }),
        )
    }

    fn list(&self, app: &str, request: &Incoming<'_>) -> Reply {
        let include_deleted = request.query_flag("include_deleted");
        let summary = request.query_flag("summary");
        let region = request.query("region");
        let states: Option<HashSet<&str>> = request
            .query("state")
            .map(|s| s.split(',').filter(|s| !s.is_empty()).collect());
        let metadata: Vec<(&str, &str)> = request
            .http
            .query
            .iter()
            .filter_map(|(k, v)| Some((k.strip_prefix("metadata.")?, v.as_str())))
            .collect();
        let state = self.lock();
        let machines: Vec<Value> = state
            .machines
            .iter()
            .filter(|r| r.machine.app == app)
            .filter(|r| include_deleted || r.machine.state != "destroyed")
            .filter(|r| region.is_none_or(|region| r.machine.region == region))
            .filter(|r| {
                states
                    .as_ref()
                    .is_none_or(|s| s.contains(r.machine.state.as_str()))
            })
            .filter(|r| {
                metadata
                    .iter()
                    .all(|(key, value)| r.machine.metadata(key) == Some(*value))
            })
            .map(|r| r.machine.to_json(&r.private_ip, summary))
            .collect();
        Reply::json(200, Value::Array(machines))
    }

    fn get(&self, app: &str, id: &str) -> Reply {
        let state = self.lock();
        match state.machine(app, id) {
            Some(r) => Reply::json(200, r.machine.to_json(&r.private_ip, false)),
            None => not_found(),
        }
    }

    async fn wait(&self, app: &str, id: &str, request: &Incoming<'_>) -> Reply {
        let mut wanted: Vec<&str> = request
            .query_all("state")
            .flat_map(|s| s.split(','))
            .filter(|s| !s.is_empty())
            .collect();
        if wanted.is_empty() {
            wanted.push("started");
        }
        let seconds = request
            .query("timeout")
            .and_then(|t| t.parse::<i64>().ok())
            .filter(|t| *t > 0)
            .map_or(60, |t| t.min(60));
        let timeout = self
            .config
            .wait_second
            .saturating_mul(u32::try_from(seconds).unwrap_or(60));
        let version = request.query("version").or(request.query("instance_id"));

        // Subscribe before the first check so that no change is missed.
        let mut changes = self.changes.subscribe();
        let start = {
            let state = self.lock();
            let Some(record) = state.machine(app, id) else {
                return not_found();
            };
            if let Some(version) = version {
                if version != record.machine.instance_id {
                    return fly_error(
                        400,
                        format!(
                            "machine {id} has version {}, not {version}",
                            record.machine.instance_id
                        ),
                    );
                }
            }
            // With from_event_id, states entered after that event count; otherwise the
            // current state and later ones.
            request
                .query("from_event_id")
                .and_then(|event| record.history.iter().position(|(e, _)| e == event))
                .map_or(record.history.len() - 1, |i| i + 1)
        };

        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if let Some(reply) = self.check_wait(app, id, start, &wanted) {
                return reply;
            }
            match tokio::time::timeout_at(deadline, changes.changed()).await {
                Ok(Ok(())) => {}
                Ok(Err(_)) => return fly_error(503, "fake is shutting down"),
                Err(_) => {
                    return fly_error(
                        408,
                        format!(
                            "deadline_exceeded: timeout waiting for machine to be {}",
                            wanted.join(",")
                        ),
                    )
                }
            }
        }
    }

    /// `Some` when a wait for `wanted` (counting states from `history[start]` on) is decided.
    fn check_wait(&self, app: &str, id: &str, start: usize, wanted: &[&str]) -> Option<Reply> {
        let state = self.lock();
        let Some(record) = state.machine(app, id) else {
            return Some(not_found());
        };
        let reached = record
            .history
            .iter()
            .skip(start)
            .find(|(_, s)| wanted.iter().any(|w| state_matches(w, s)));
        if let Some((event_id, reached)) = reached {
            return Some(Reply::json(
                200,
                json!({
                    "ok": true,
                    "state": reached,
                    "event_id": event_id,
                    "version": record.machine.instance_id,
                }),
            ));
        }
        let current = record.machine.state.as_str();
        let hopeless = match current {
            "destroyed" => true,
            // Stopped machines only go on to be destroyed, unless someone starts them.
            "stopped" | "failed" => !wanted.contains(&"destroyed"),
            _ => false,
        };
        hopeless.then(|| fly_error(400, format!("machine {id} is {current}")))
    }

    fn stop(self: &Arc<Self>, app: &str, id: &str) -> Reply {
        {
            let mut state = self.lock();
            let Some(record) = state.machine_mut(app, id) else {
                return not_found();
            };
            if !matches!(
                record.machine.state.as_str(),
                "created" | "starting" | "started"
            ) {
                // Already stopping, stopped or destroyed: nothing to do.
                return Reply::json(200, json!({"ok": true}));
            }
            record.epoch += 1;
            let epoch = record.epoch;
            transition(record, "stopping", "stop", "user", None);
            let this = self.clone();
            let id = id.to_owned();
            tokio::spawn(async move {
                tokio::time::sleep(this.config.stop_delay).await;
                this.finish_stop(&id, epoch);
            });
        }
        self.notify();
        Reply::json(200, json!({"ok": true}))
    }

    fn finish_stop(&self, id: &str, epoch: u64) {
        {
            let mut state = self.lock();
            let Some(record) = state.machines.iter_mut().find(|r| r.machine.id == id) else {
                return;
            };
            if record.epoch != epoch || record.machine.state != "stopping" {
                return;
            }
            process_exited(
                record,
                json!({
                    "exit_code": 0,
                    "signal": 15,
                    "oom_killed": false,
                    "requested_stop": true,
                    "exited_at": rfc3339(Utc::now()),
                }),
            );
        }
        self.notify();
    }

    fn delete(&self, app: &str, id: &str, force: bool) -> Reply {
        {
            let mut state = self.lock();
            let Some(record) = state.machine_mut(app, id) else {
                return not_found();
            };
            match record.machine.state.as_str() {
                "destroyed" => return not_found(),
                "started" | "starting" | "stopping" if !force => {
                    return fly_error(
                        412,
                        "failed_precondition: unable to destroy machine, not currently stopped, suspended, or failed",
                    )
                }
                _ => {}
            }
            record.epoch += 1;
            transition(record, "destroyed", "destroy", "user", None);
        }
        self.notify();
        Reply::json(200, json!({"ok": true}))
    }
}

/// Whether a machine in `state` satisfies a wait for `wanted`.
fn state_matches(wanted: &str, state: &str) -> bool {
    wanted == state
        || (wanted == "settled"
            && matches!(
                state,
                "started" | "stopped" | "suspended" | "failed" | "destroyed"
            ))
}

/// Puts the machine in `to`, recording a `MachineEvent` (newest first) and the history entry.
fn transition(
    record: &mut MachineRecord,
    to: &str,
    kind: &str,
    source: &str,
    request: Option<Value>,
) {
    let event = event(kind, to, source, request);
    let event_id = event["id"].as_str().unwrap_or_default().to_owned();
    record.machine.state = to.to_owned();
    record.machine.updated_at = Utc::now();
    record.machine.events.insert(0, event);
    record.history.push((event_id, to.to_owned()));
}

/// The machine's main process exited (`exit_event` as Fly reports it): the machine stops, and is
/// destroyed if its config has `auto_destroy: true`.
fn process_exited(record: &mut MachineRecord, exit_event: Value) {
    let request = json!({ "exit_event": exit_event });
    transition(record, "stopped", "exit", "flyd", Some(request));
    if record.machine.auto_destroy() {
        transition(record, "destroyed", "destroy", "flyd", None);
    }
}

fn event(kind: &str, status: &str, source: &str, request: Option<Value>) -> Value {
    let mut event = json!({
        "id": Ulid::new().to_string(),
        "type": kind,
        "status": status,
        "source": source,
        "timestamp": Utc::now().timestamp_millis(),
    });
    if let Some(request) = request {
        event["request"] = request;
    }
    event
}

/// A Fly-like generated name (`adjective-noun-1234`), derived from the machine id.
fn generated_name(id: &str) -> String {
    const ADJECTIVES: [&str; 8] = [
        "late", "quiet", "bold", "young", "misty", "snowy", "ancient", "polished",
    ];
    const NOUNS: [&str; 8] = [
        "wave", "forest", "river", "meadow", "thunder", "frost", "sun", "glade",
    ];
    let n = u64::from_str_radix(id.get(..12).unwrap_or("0"), 16).unwrap_or(0);
    format!(
        "{}-{}-{}",
        ADJECTIVES[(n % 8) as usize],
        NOUNS[((n / 8) % 8) as usize],
        (n / 64) % 10_000
    )
}
