//! The Machines API of the fake: routing, the order of checks, and the machine operations
//! (create, list, get, wait, update, start, stop, suspend, signal, delete, metadata). Leases
//! are in `leases`.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use axum::http::Method;
use chrono::Utc;
use serde_json::{json, Map, Value};
use ulid::Ulid;

use super::super::faults;
use super::super::server::{Reply, Request};
use super::leases::{self, LEASE_NONCE_HEADER};
use super::state::{
    destroyed, event, exit_event, fly_error, generated_name, not_found, process_exited, transition,
    MachineRecord, Shared,
};
use super::{BootKind, FakeMachine, FlyOp};

/// An operation's answer: `Err` carries an early error reply.
pub(super) type Answer = Result<Reply, Reply>;

/// Machines with more memory than this cannot be suspended (Fly's documented limit).
const MAX_SUSPEND_MEMORY_MB: i64 = 2048;

pub(super) struct Route {
    pub(super) app: String,
    pub(super) target: Target,
}

pub(super) enum Target {
    App,
    Create,
    List,
    Machine(String, MachineOp),
}

pub(super) enum MachineOp {
    Get,
    Wait,
    Update,
    Start,
    Stop,
    Suspend,
    Signal,
    Delete,
    ShowLease,
    AcquireLease,
    ReleaseLease,
    ShowMetadata,
    UpdateMetadata,
    GetMetadataKey(String),
    SetMetadataKey(String),
    DeleteMetadataKey(String),
}

impl Route {
    fn parse(method: &Method, path: &str) -> Option<Self> {
        let segments: Vec<&str> = path.trim_start_matches('/').split('/').collect();
        let method = method.as_str();
        let (app, target) = match segments.as_slice() {
            ["apps", app] if method == "GET" => (app, Target::App),
            ["apps", app, "machines"] => match method {
                "POST" => (app, Target::Create),
                "GET" => (app, Target::List),
                _ => return None,
            },
            ["apps", app, "machines", id, rest @ ..] => {
                let op = match (method, rest) {
                    ("GET", []) => MachineOp::Get,
                    ("POST", []) => MachineOp::Update,
                    ("DELETE", []) => MachineOp::Delete,
                    ("GET", ["wait"]) => MachineOp::Wait,
                    ("POST", ["start"]) => MachineOp::Start,
                    ("POST", ["stop"]) => MachineOp::Stop,
                    ("POST", ["suspend"]) => MachineOp::Suspend,
                    ("POST", ["signal"]) => MachineOp::Signal,
                    ("GET", ["lease"]) => MachineOp::ShowLease,
                    ("POST", ["lease"]) => MachineOp::AcquireLease,
                    ("DELETE", ["lease"]) => MachineOp::ReleaseLease,
                    ("GET", ["metadata"]) => MachineOp::ShowMetadata,
                    ("PUT" | "PATCH", ["metadata"]) => MachineOp::UpdateMetadata,
                    ("GET", ["metadata", key]) => MachineOp::GetMetadataKey((*key).to_owned()),
                    ("POST", ["metadata", key]) => MachineOp::SetMetadataKey((*key).to_owned()),
                    ("DELETE", ["metadata", key]) => {
                        MachineOp::DeleteMetadataKey((*key).to_owned())
                    }
                    _ => return None,
                };
                (app, Target::Machine((*id).to_owned(), op))
            }
            _ => return None,
        };
        Some(Self {
            app: (*app).to_owned(),
            target,
        })
    }

    fn op(&self) -> FlyOp {
        match &self.target {
            Target::Create => FlyOp::Create,
            Target::App | Target::List => FlyOp::List,
            Target::Machine(_, op) => match op {
                MachineOp::Get
                | MachineOp::ShowLease
                | MachineOp::ShowMetadata
                | MachineOp::GetMetadataKey(_) => FlyOp::Get,
                MachineOp::Wait => FlyOp::Wait,
                MachineOp::Update => FlyOp::Update,
                MachineOp::Start => FlyOp::Start,
                MachineOp::Stop => FlyOp::Stop,
                MachineOp::Suspend => FlyOp::Suspend,
                MachineOp::Signal => FlyOp::Signal,
                MachineOp::Delete => FlyOp::Delete,
                MachineOp::AcquireLease => FlyOp::Lease,
                MachineOp::ReleaseLease => FlyOp::ReleaseLease,
                MachineOp::UpdateMetadata
                | MachineOp::SetMetadataKey(_)
                | MachineOp::DeleteMetadataKey(_) => FlyOp::Metadata,
            },
        }
    }
}

/// One incoming request, routed.
pub(super) struct Incoming<'a> {
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

    /// The `fly-machine-lease-nonce` header, if sent and not empty.
    fn nonce(&self) -> Option<&str> {
        self.http
            .header(LEASE_NONCE_HEADER)
            .filter(|n| !n.is_empty())
    }
}

impl Shared {
    pub(super) async fn process(
        self: &Arc<Self>,
        request: &Request,
        body: Option<&Value>,
    ) -> Reply {
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
        // The validator checks no headers; the spec's only required one is the nonce of a
        // lease release.
        if method == Method::DELETE
            && api_path.ends_with("/lease")
            && request.header(LEASE_NONCE_HEADER).is_none()
        {
            let violation = format!(
                "{method} {api_path} (Machines_release_lease): required header \
                 `{LEASE_NONCE_HEADER}` is missing"
            );
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
        if !self.config.apps.contains(&route.app) {
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
        let _open = match request.route.target {
            Target::Machine(_, MachineOp::Wait) => None,
            _ => Some(self.open_calls.open()),
        };
        let app = request.route.app.as_str();
        let body = request.body;
        let answer = match &request.route.target {
            Target::App => Ok(self.app_info(app)),
            Target::Create => Ok(self.create(app, body).await),
            Target::List => Ok(self.list(app, request)),
            Target::Machine(id, op) => {
                let nonce = request.nonce();
                match op {
                    MachineOp::Get => self.get(app, id),
                    MachineOp::Wait => Ok(self.wait(app, id, request).await),
                    MachineOp::Update => self.update(app, id, body, nonce),
                    MachineOp::Start => self.start(app, id, nonce),
                    MachineOp::Stop => self.stop(app, id, nonce),
                    MachineOp::Suspend => self.suspend(app, id, nonce),
                    MachineOp::Signal => self.signal(app, id, body, nonce),
                    MachineOp::Delete => self.delete(app, id, request.query_flag("force"), nonce),
                    MachineOp::ShowLease => self.show_lease(app, id),
                    MachineOp::AcquireLease => self.acquire_lease(app, id, body, nonce),
                    MachineOp::ReleaseLease => self.release_lease(app, id, nonce),
                    MachineOp::ShowMetadata => self.show_metadata(app, id),
                    MachineOp::UpdateMetadata => self.update_metadata(app, id, body, nonce),
                    MachineOp::GetMetadataKey(key) => self.get_metadata_key(app, id, key),
                    MachineOp::SetMetadataKey(key) => {
                        self.set_metadata_key(app, id, key, body, nonce)
                    }
                    MachineOp::DeleteMetadataKey(key) => {
                        self.delete_metadata_key(app, id, key, nonce)
                    }
                }
            }
        };
        answer.unwrap_or_else(|reply| reply)
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
        let lease_ttl = body
            .get("lease_ttl")
            .and_then(Value::as_i64)
            .filter(|t| *t > 0);

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
                let id = super::super::random_string(super::super::LOWER_HEX, 14);
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
                boots: 0,
                boot_log: Vec::new(),
                deliveries: Vec::new(),
                lease: None,
                suspends: 0,
                signals: Vec::new(),
            };
            // Distinct per machine: the ordinal in the 6PN address.
            let private_ip = format!("fdaa:0:1:a7b:{:x}:{:x}::2", ordinal >> 16, ordinal & 0xffff);
            let id = machine.id.clone();
            let mut record =
                MachineRecord::new(machine, private_ip, (event_id, initial.to_owned()));
            record.never_start = state.never_start;
            let mut snapshot = record.to_json(false);
            if let Some(ttl) = lease_ttl {
                // The creator holds the machine's first lease; only this answer carries its
                // nonce (the spec's `Machine.nonce`).
                let lease = leases::new_lease(&record, ttl, "", &self.warm);
                snapshot["nonce"] = json!(lease.lease.nonce);
                record.lease = Some(lease);
            }
            state.machines.push(record);
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
        let never_start = self.lock().by_id(&id).is_none_or(|r| r.never_start);
        if never_start {
            return;
        }
        let delay = self.config.starting_for;
        self.finish_start(id, 0, delay, true).await;
    }

    /// The end of a start: `starting` → `started` after `delay`, then for a fresh boot the
    /// configured bot lifetime.
    async fn finish_start(self: Arc<Self>, id: String, epoch: u64, delay: Duration, fresh: bool) {
        tokio::time::sleep(delay).await;
        if !self.advance(&id, epoch, "starting", "started", "start") {
            return;
        }
        if let (true, Some(lifetime)) = (fresh, self.config.bot_lifetime) {
            tokio::time::sleep(lifetime).await;
            self.exit(&id, 0, None, Some(epoch));
        }
    }

    /// Moves machine `id` from `from` to `to` if nothing else touched it since `epoch`.
    pub(super) fn advance(&self, id: &str, epoch: u64, from: &str, to: &str, kind: &str) -> bool {
        {
            let mut state = self.lock();
            let Some(record) = state.by_id_mut(id) else {
                return false;
            };
            if record.epoch != epoch || record.machine.state != from {
                return false;
            }
            transition(record, to, kind, "flyd", None);
            match to {
                "starting" => record.begin_boot(BootKind::Fresh),
                "started" => record.on_started(self.warm.app_boot),
                _ => {}
            }
        }
        self.notify();
        true
    }

    /// The main process exits (with `signal`, if a signal ended it); see
    /// [`FakeFly::exit_machine`](super::FakeFly::exit_machine). With `epoch`, only if nothing
    /// else touched the machine since.
    pub(super) fn exit(
        &self,
        id: &str,
        exit_code: i32,
        signal: Option<i32>,
        epoch: Option<u64>,
    ) -> bool {
        {
            let mut state = self.lock();
            let Some(record) = state.by_id_mut(id) else {
                return false;
            };
            if epoch.is_some_and(|e| e != record.epoch)
                || !matches!(record.machine.state.as_str(), "starting" | "started")
            {
                return false;
            }
            record.epoch += 1;
            process_exited(record, exit_event(exit_code, signal, false));
        }
        self.notify();
        true
    }

    /// Machine `id` fails: its process is killed and it stays `failed`.
    pub(super) fn fail(&self, id: &str) -> bool {
        {
            let mut state = self.lock();
            let Some(record) = state.by_id_mut(id) else {
                return false;
            };
            if !matches!(record.machine.state.as_str(), "starting" | "started") {
                return false;
            }
            record.epoch += 1;
            record.kill_process();
            record.snapshot = None;
            transition(record, "failed", "exit", "flyd", None);
        }
        self.notify();
        true
    }

    /// Ends sessions of machine `id` (see [`MachineRecord::end_sessions`]); a draining process
    /// left without sessions exits 0.
    pub(super) fn end_sessions(&self, id: &str, which: Option<u64>) -> usize {
        let ended = {
            let mut state = self.lock();
            let Some(record) = state.by_id_mut(id) else {
                return 0;
            };
            let ended = record.end_sessions(which);
            if record.drained() {
                record.epoch += 1;
                process_exited(record, exit_event(0, None, false));
            }
            ended
        };
        self.notify();
        ended
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
                    .all(|(key, value)| r.metadata(key) == Some(*value))
            })
            .map(|r| r.to_json(summary))
            .collect();
        Reply::json(200, Value::Array(machines))
    }

    fn get(&self, app: &str, id: &str) -> Answer {
        let state = self.lock();
        let record = state.machine(app, id).ok_or_else(not_found)?;
        Ok(Reply::json(200, record.to_json(false)))
    }

    async fn wait(&self, app: &str, id: &str, request: &Incoming<'_>) -> Reply {
        let _open = self.open_waits.open();
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

    /// `POST /apps/{app}/machines/{id}/start`: a stopped machine boots afresh (`start_delay`);
    /// a suspended one resumes its snapshot (`resume_delay`), or boots cold when armed.
    fn start(self: &Arc<Self>, app: &str, id: &str, nonce: Option<&str>) -> Answer {
        let (epoch, delay, fresh, never_start, previous) = {
            let mut state = self.lock();
            let i = leases::writable(&mut state, app, id, nonce, "start")?;
            let record = &mut state.machines[i];
            let previous = record.machine.state.clone();
            let kind = match previous.as_str() {
                "stopped" => BootKind::Fresh,
                "suspended" => {
                    let cold = std::mem::take(&mut record.cold_resume)
                        || self.warm.cold_resume
                        || record.snapshot.is_none();
                    if cold {
                        BootKind::ColdResume
                    } else {
                        BootKind::Resume
                    }
                }
                other => {
                    return Err(fly_error(
                        412,
                        format!(
                            "failed_precondition: unable to start machine from current state: '{other}'"
                        ),
                    ))
                }
            };
            record.epoch += 1;
            transition(record, "starting", "start", "user", None);
            record.begin_boot(kind);
            let delay = if kind == BootKind::Resume {
                self.warm.resume_delay
            } else {
                self.warm.start_delay
            };
            (
                record.epoch,
                delay,
                kind.is_fresh(),
                record.never_start,
                previous,
            )
        };
        self.notify();
        if !never_start {
            tokio::spawn(
                self.clone()
                    .finish_start(id.to_owned(), epoch, delay, fresh),
            );
        }
        Ok(Reply::json(200, json!({ "previous_state": previous })))
    }

    /// `POST /apps/{app}/machines/{id}/stop`. The process gets SIGTERM (its bot server takes no
    /// new requests) and is gone `stop_delay` later.
    fn stop(self: &Arc<Self>, app: &str, id: &str, nonce: Option<&str>) -> Answer {
        {
            let mut state = self.lock();
            let i = state.index(app, id).ok_or_else(not_found)?;
            if state.machines[i].machine.state == "destroyed" {
                // Nothing to do.
                return Ok(Reply::json(200, json!({"ok": true})));
            }
            leases::guard(&mut state, i, nonce, "stop")?;
            let record = &mut state.machines[i];
            match record.machine.state.as_str() {
                "created" | "starting" | "started" | "suspending" => {
                    record.epoch += 1;
                    let epoch = record.epoch;
                    if let Some(process) = record.process.as_mut() {
                        process.draining = true;
                    }
                    transition(record, "stopping", "stop", "user", None);
                    let this = self.clone();
                    let id = id.to_owned();
                    tokio::spawn(async move {
                        tokio::time::sleep(this.config.stop_delay).await;
                        this.finish_stop(&id, epoch);
                    });
                }
                // The snapshot is discarded; nothing runs.
                "suspended" => {
                    record.epoch += 1;
                    process_exited(record, exit_event(0, None, true));
                }
                // Already stopping or stopped: nothing to do.
                _ => return Ok(Reply::json(200, json!({"ok": true}))),
            }
        }
        self.notify();
        Ok(Reply::json(200, json!({"ok": true})))
    }

    fn finish_stop(&self, id: &str, epoch: u64) {
        {
            let mut state = self.lock();
            let Some(record) = state.by_id_mut(id) else {
                return;
            };
            if record.epoch != epoch || record.machine.state != "stopping" {
                return;
            }
            process_exited(record, exit_event(0, Some(15), true));
        }
        self.notify();
    }

    /// `POST /apps/{app}/machines/{id}/suspend`: started → suspending → suspended; the process
    /// is frozen into a snapshot (its running sessions' connections are reset).
    fn suspend(self: &Arc<Self>, app: &str, id: &str, nonce: Option<&str>) -> Answer {
        let epoch = {
            let mut state = self.lock();
            let i = leases::writable(&mut state, app, id, nonce, "suspend")?;
            let record = &mut state.machines[i];
            if let Some(reason) = unsuspendable(&record.machine.config) {
                // Fly refuses these up front; 400 with its error shape (the spec lists only 200
                // for suspend).
                return Err(fly_error(400, format!("invalid_argument: {reason}")));
            }
            if record.machine.state != "started" {
                return Err(fly_error(
                    412,
                    format!(
                        "failed_precondition: unable to suspend machine from current state: '{}'",
                        record.machine.state
                    ),
                ));
            }
            record.epoch += 1;
            record.machine.suspends += 1;
            record.freeze();
            transition(record, "suspending", "suspend", "user", None);
            record.epoch
        };
        self.notify();
        let this = self.clone();
        let id = id.to_owned();
        tokio::spawn(async move {
            tokio::time::sleep(this.warm.suspend_delay).await;
            this.advance(&id, epoch, "suspending", "suspended", "suspend");
        });
        Ok(Reply::json(200, json!({"ok": true})))
    }

    /// `POST /apps/{app}/machines/{id}/signal`: delivered to the main process, which reacts as
    /// the Pipecat Cloud base image (uvicorn) does: SIGTERM/SIGINT drain (no new requests; exit
    /// 0 once no session runs), SIGPIPE is ignored, any other signal ends it at once with
    /// 128 + the signal's number.
    fn signal(
        self: &Arc<Self>,
        app: &str,
        id: &str,
        body: Option<&Value>,
        nonce: Option<&str>,
    ) -> Answer {
        let Some(name) = body.and_then(|b| b.get("signal")).and_then(Value::as_str) else {
            return Err(fly_error(400, "invalid_argument: signal is required"));
        };
        {
            let mut state = self.lock();
            let i = leases::writable(&mut state, app, id, nonce, "signal")?;
            let record = &mut state.machines[i];
            if !matches!(record.machine.state.as_str(), "starting" | "started")
                || record.process.is_none()
            {
                return Err(fly_error(
                    412,
                    format!(
                        "failed_precondition: machine is not running (state '{}')",
                        record.machine.state
                    ),
                ));
            }
            record.machine.signals.push(name.to_owned());
            match name {
                "SIGTERM" | "SIGINT" => {
                    if let Some(process) = record.process.as_mut() {
                        process.draining = true;
                    }
                    if record.drained() {
                        record.epoch += 1;
                        process_exited(record, exit_event(0, None, false));
                    }
                }
                "SIGPIPE" => {}
                other => {
                    let number = signal_number(other);
                    record.epoch += 1;
                    process_exited(record, exit_event(128 + number, Some(number), false));
                }
            }
        }
        self.notify();
        Ok(Reply::json(200, json!({"ok": true})))
    }

    /// `POST /apps/{app}/machines/{id}`: replaces the config (new `instance_id`). A running or
    /// suspended machine restarts from its image (a fresh boot); a stopped one starts; with
    /// `skip_launch` the machine ends up (or stays) stopped.
    fn update(
        self: &Arc<Self>,
        app: &str,
        id: &str,
        body: Option<&Value>,
        nonce: Option<&str>,
    ) -> Answer {
        let empty = Value::Object(Map::new());
        let body = body.unwrap_or(&empty);
        let skip_launch = body.get("skip_launch").and_then(Value::as_bool) == Some(true);
        let (snapshot, epoch, never_start) = {
            let mut state = self.lock();
            let i = leases::writable(&mut state, app, id, nonce, "update")?;
            let record = &mut state.machines[i];
            if let Some(current) = body.get("current_version").and_then(Value::as_str) {
                if current != record.machine.instance_id {
                    // The spec lists 400 as update's only error.
                    return Err(fly_error(
                        400,
                        format!(
                            "failed_precondition: machine version is {}, not {current}",
                            record.machine.instance_id
                        ),
                    ));
                }
            }
            let state_now = record.machine.state.clone();
            if matches!(state_now.as_str(), "stopping" | "suspending") {
                return Err(fly_error(
                    412,
                    format!("failed_precondition: unable to update machine in state '{state_now}'"),
                ));
            }
            if let Some(config) = body.get("config") {
                record.machine.config = config.clone();
            }
            record.machine.instance_id = Ulid::new().to_string();
            record.epoch += 1;
            record.kill_process();
            record.snapshot = None;
            if matches!(state_now.as_str(), "created" | "starting" | "started") {
                transition(record, "stopping", "update", "flyd", None);
                transition(record, "stopped", "update", "flyd", None);
            } else if state_now == "suspended" {
                transition(record, "stopped", "update", "flyd", None);
            }
            if !skip_launch {
                transition(record, "starting", "start", "flyd", None);
                record.begin_boot(BootKind::Fresh);
            }
            (record.to_json(false), record.epoch, record.never_start)
        };
        self.notify();
        if !skip_launch && !never_start {
            tokio::spawn(self.clone().finish_start(
                id.to_owned(),
                epoch,
                self.warm.start_delay,
                true,
            ));
        }
        Ok(Reply::json(200, snapshot))
    }

    fn delete(&self, app: &str, id: &str, force: bool, nonce: Option<&str>) -> Answer {
        {
            let mut state = self.lock();
            let i = leases::writable(&mut state, app, id, nonce, "delete")?;
            let record = &mut state.machines[i];
            if !force
                && matches!(
                    record.machine.state.as_str(),
                    "started" | "starting" | "stopping" | "suspending"
                )
            {
                return Err(fly_error(
                    412,
                    "failed_precondition: unable to destroy machine, not currently stopped, suspended, or failed",
                ));
            }
            record.epoch += 1;
            destroyed(record, "user");
        }
        self.notify();
        Ok(Reply::json(200, json!({"ok": true})))
    }

    /// `GET /apps/{app}/machines/{id}/metadata`.
    fn show_metadata(&self, app: &str, id: &str) -> Answer {
        let state = self.lock();
        let record = state
            .machine(app, id)
            .filter(|r| r.machine.state != "destroyed")
            .ok_or_else(not_found)?;
        let metadata = record
            .machine
            .config
            .get("metadata")
            .filter(|m| m.is_object())
            .cloned()
            .unwrap_or_else(|| json!({}));
        Ok(Reply::json(200, metadata))
    }

    /// `PUT|PATCH /apps/{app}/machines/{id}/metadata`: sets several keys at once (an empty
    /// value removes the key; 204). A `machine_version` other than the current `instance_id`
    /// answers 412. `updated_at` is accepted and not checked. The machine does not restart.
    fn update_metadata(
        &self,
        app: &str,
        id: &str,
        body: Option<&Value>,
        nonce: Option<&str>,
    ) -> Answer {
        let mut state = self.lock();
        let i = leases::writable(&mut state, app, id, nonce, "metadata update")?;
        let record = &mut state.machines[i];
        if let Some(version) = body
            .and_then(|b| b.get("machine_version"))
            .and_then(Value::as_str)
        {
            if version != record.machine.instance_id {
                return Err(fly_error(
                    412,
                    format!(
                        "failed_precondition: machine version is {}, not {version}",
                        record.machine.instance_id
                    ),
                ));
            }
        }
        let changes = body
            .and_then(|b| b.get("metadata"))
            .and_then(Value::as_object)
            .cloned()
            .unwrap_or_default();
        let metadata = metadata_mut(record);
        for (key, value) in changes {
            match value.as_str() {
                Some("") | None => {
                    metadata.remove(&key);
                }
                Some(_) => {
                    metadata.insert(key, value);
                }
            }
        }
        record.machine.updated_at = Utc::now();
        Ok(Reply::json(204, Value::Null))
    }

    /// `GET /apps/{app}/machines/{id}/metadata/{key}`.
    fn get_metadata_key(&self, app: &str, id: &str, key: &str) -> Answer {
        let state = self.lock();
        let record = state
            .machine(app, id)
            .filter(|r| r.machine.state != "destroyed")
            .ok_or_else(not_found)?;
        match record.metadata(key) {
            Some(value) => Ok(Reply::json(200, json!({ "value": value }))),
            None => Err(fly_error(404, format!("metadata key {key:?} not found"))),
        }
    }

    /// `POST /apps/{app}/machines/{id}/metadata/{key}`: upserts one metadata value (204).
    fn set_metadata_key(
        &self,
        app: &str,
        id: &str,
        key: &str,
        body: Option<&Value>,
        nonce: Option<&str>,
    ) -> Answer {
        let Some(value) = body.and_then(|b| b.get("value")).and_then(Value::as_str) else {
            return Err(fly_error(400, "value is required"));
        };
        let mut state = self.lock();
        let i = leases::writable(&mut state, app, id, nonce, "metadata update")?;
        let record = &mut state.machines[i];
        metadata_mut(record).insert(key.to_owned(), json!(value));
        Ok(Reply::json(204, Value::Null))
    }

    /// `DELETE /apps/{app}/machines/{id}/metadata/{key}` (204, also when absent).
    fn delete_metadata_key(&self, app: &str, id: &str, key: &str, nonce: Option<&str>) -> Answer {
        let mut state = self.lock();
        let i = leases::writable(&mut state, app, id, nonce, "metadata update")?;
        metadata_mut(&mut state.machines[i]).remove(key);
        Ok(Reply::json(204, Value::Null))
    }
}

/// The machine's metadata object, created if missing.
fn metadata_mut(record: &mut MachineRecord) -> &mut Map<String, Value> {
    let config = &mut record.machine.config;
    if !config.is_object() {
        *config = json!({});
    }
    if !config.get("metadata").is_some_and(Value::is_object) {
        config["metadata"] = json!({});
    }
    match config.get_mut("metadata") {
        Some(Value::Object(map)) => map,
        _ => unreachable!("metadata was just made an object"),
    }
}

/// Why Fly would refuse to suspend a machine of this config, if it would: more than 2 GB of
/// memory, swap, a schedule or a GPU.
fn unsuspendable(config: &Value) -> Option<String> {
    let guest = config.get("guest");
    let memory = guest
        .and_then(|g| g.get("memory_mb"))
        .and_then(Value::as_i64)
        .unwrap_or(256);
    if memory > MAX_SUSPEND_MEMORY_MB {
        return Some(format!(
            "machines with more than {MAX_SUSPEND_MEMORY_MB} MB of memory cannot be suspended (this one has {memory} MB)"
        ));
    }
    let swap = config
        .get("init")
        .and_then(|i| i.get("swap_size_mb"))
        .and_then(Value::as_i64)
        .unwrap_or(0);
    if swap > 0 {
        return Some("machines with swap cannot be suspended".to_owned());
    }
    if config
        .get("schedule")
        .and_then(Value::as_str)
        .is_some_and(|s| !s.is_empty())
    {
        return Some("scheduled machines cannot be suspended".to_owned());
    }
    let gpus = guest
        .and_then(|g| g.get("gpus"))
        .and_then(Value::as_i64)
        .unwrap_or(0);
    let gpu_kind = guest
        .and_then(|g| g.get("gpu_kind"))
        .and_then(Value::as_str)
        .is_some_and(|k| !k.is_empty());
    if gpus > 0 || gpu_kind {
        return Some("machines with GPUs cannot be suspended".to_owned());
    }
    None
}

/// The Linux number of a signal of the spec's `SignalRequest` enum.
fn signal_number(name: &str) -> i32 {
    match name {
        "SIGHUP" => 1,
        "SIGINT" => 2,
        "SIGQUIT" => 3,
        "SIGILL" => 4,
        "SIGTRAP" => 5,
        "SIGABRT" => 6,
        "SIGFPE" => 8,
        "SIGKILL" => 9,
        "SIGUSR1" => 10,
        "SIGSEGV" => 11,
        "SIGUSR2" => 12,
        "SIGPIPE" => 13,
        "SIGALRM" => 14,
        "SIGTERM" => 15,
        // The spec's enum has no other member; validation refused anything else.
        _ => 15,
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
