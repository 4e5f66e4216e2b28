//! Stateful fake of the Fly Machines API, and of the bot HTTP server inside each of its
//! machines: an axum server on `127.0.0.1:0` that creates, boots, starts, suspends, signals,
//! stops and destroys in-memory machines on a timer, leases them, validates every API request
//! against the published OpenAPI spec, serves each machine's `/readyz` and `/bot` under
//! `/_bot/{machine_id}`, and can inject faults.
//!
//! Layout: this file holds the public types and the [`FakeFly`] handle; `state` the shared
//! state and the machine/process model; `machines` the Machines API routes and operations;
//! `leases` the lease endpoints and the lease guard of mutating calls; `bot_server` each
//! machine's bot HTTP server.
//!
//! Scope of the API: create (with `skip_launch`, `lease_ttl`), list, get, wait, update, start,
//! stop, suspend, signal, delete, leases (create/refresh, show, release) and metadata (show,
//! set several keys, get/set/delete one key). Other operations of the spec answer 501. Not
//! modelled: restart policies (a machine whose process exits always stops; it is never
//! restarted), volumes, checks.
//!
//! The machine model: a *boot* is one start of the machine's main process. A fresh boot starts
//! it from the image (new root filesystem, empty memory; the app takes
//! [`FakeFlyWarmConfig::app_boot`] after `started` until `/readyz` answers 200); a resume
//! restores the memory snapshot taken at suspension (the same process, still ready), unless it
//! comes back cold ([`FakeFly::set_cold_resume`]), which is a fresh boot. The bot server behaves
//! like the Pipecat Cloud base image: `/bot` answers only when the session ends, a second `/bot`
//! in one boot is accepted (and recorded as a [`Violation`]), and on SIGTERM it refuses new
//! connections, lets the running session finish and exits 0.
//!
//! Order of checks for every API request: spec validation ([`OpenApiValidator::fly`], plus the
//! required `fly-machine-lease-nonce` header of lease releases; violations are recorded and
//! answered 400), bearer token (401), implemented route (501), app (404), armed [`Fault`], then
//! the operation itself (machine 404, lease 409, state 412, ...).
//!
//! [`OpenApiValidator::fly`]: super::validate::openapi::OpenApiValidator::fly

mod bot_server;
mod leases;
mod machines;
mod state;

use std::fmt;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::response::Response;
use chrono::{DateTime, Utc};
use serde_json::{json, Value};
use tokio::sync::watch;

use super::faults::FakeCore;
use super::server::{FakeServer, Reply, Request};
use super::validate::openapi::OpenApiValidator;
use super::{Fault, RecordedRequest};
use state::{FlyState, Shared};

/// Configuration of a [`FakeFly`]. The knobs added for warm starts live in
/// [`FakeFlyWarmConfig`] (given to [`FakeFly::start_with`]) so that code naming every field of
/// this struct keeps compiling.
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
    /// machine started from its image (not after a resume).
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

/// What warm starts need of a [`FakeFly`]: start/resume/suspend timings, the bot app's boot
/// time and sessions, and the handoff secret check. The defaults keep the fake's older
/// behaviour (an app is ready as soon as its machine is `started`).
#[derive(Debug, Clone)]
pub struct FakeFlyWarmConfig {
    /// Time after a fresh boot reached `started` until the bot answers `/readyz` 200.
    /// Default 0.
    pub app_boot: Duration,
    /// Time a stopped machine spends in `starting` after `POST .../start` (a fresh boot).
    /// Fly documents "well under a second" (~300 ms); the default is 20 ms to keep tests fast.
    pub start_delay: Duration,
    /// Time a suspended machine spends in `starting` after `POST .../start` (a resume).
    /// Default 20 ms.
    pub resume_delay: Duration,
    /// Time a machine spends in `suspending` before `suspended`. Default 20 ms.
    pub suspend_delay: Duration,
    /// A session delivered by `/bot` ends by itself after this long; `None` (the default):
    /// only [`FakeFly::end_session`], or the machine's process ending, ends it.
    pub session_duration: Option<Duration>,
    /// `true` (the default): `/bot` answers 401 unless its `Authorization` is
    /// `Bearer <BOTDISPATCH_HANDOFF_SECRET of the machine's env>` (when the env has one), as
    /// botdispatch's example bot does. `false`: the header is ignored, as by the Pipecat Cloud
    /// base image.
    pub check_handoff_secret: bool,
    /// Every resume comes back cold (a fresh boot), as when Fly dropped the snapshot on host
    /// maintenance. Default `false`; see also [`FakeFly::set_cold_resume`].
    pub cold_resume: bool,
    /// Real duration of one second of a lease's `ttl`. Default 1 s; `expires_at` is always
    /// reported in nominal seconds.
    pub lease_second: Duration,
}

impl Default for FakeFlyWarmConfig {
    fn default() -> Self {
        Self {
            app_boot: Duration::ZERO,
            start_delay: Duration::from_millis(20),
            resume_delay: Duration::from_millis(20),
            suspend_delay: Duration::from_millis(20),
            session_duration: None,
            check_handoff_secret: true,
            cold_resume: false,
            lease_second: Duration::from_secs(1),
        }
    }
}

/// The operations of [`FakeFly`] faults can be armed for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FlyOp {
    /// `POST /apps/{app}/machines`
    Create,
    /// `GET /apps/{app}/machines/{id}` (and `GET .../lease`, `GET .../metadata[/{key}]`)
    Get,
    /// `GET /apps/{app}/machines/{id}/wait`
    Wait,
    /// `POST /apps/{app}/machines/{id}/stop`
    Stop,
    /// `DELETE /apps/{app}/machines/{id}`
    Delete,
    /// `POST|DELETE /apps/{app}/machines/{id}/metadata/{key}` and
    /// `PUT|PATCH /apps/{app}/machines/{id}/metadata`
    Metadata,
    /// `GET /apps/{app}/machines`
    List,
    /// `POST /apps/{app}/machines/{id}/start`
    Start,
    /// `POST /apps/{app}/machines/{id}/suspend`
    Suspend,
    /// `POST /apps/{app}/machines/{id}/signal`
    Signal,
    /// `POST /apps/{app}/machines/{id}` (update)
    Update,
    /// `POST /apps/{app}/machines/{id}/lease` (acquire or refresh)
    Lease,
    /// `DELETE /apps/{app}/machines/{id}/lease`
    ReleaseLease,
}

/// A snapshot of one machine of the fake.
#[derive(Debug, Clone, PartialEq)]
pub struct FakeMachine {
    /// 14 lowercase hex characters.
    pub id: String,
    pub name: String,
    pub app: String,
    pub region: String,
    /// `created`, `starting`, `started`, `stopping`, `stopped`, `suspending`, `suspended` or
    /// `destroyed`.
    pub state: String,
    /// 26 uppercase Crockford base32 characters (ULID-like); the machine's version. Changed by
    /// updates only.
    pub instance_id: String,
    /// The `config` of the create request, as sent (then as updated, metadata included).
    pub config: Value,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    /// `MachineEvent` objects, newest first (as Fly lists them).
    pub events: Vec<Value>,
    /// Fresh boots from the image so far (launch, start of a stopped machine, cold resume,
    /// restart by an update). Warm resumes do not count; see `boot_log`.
    pub boots: u32,
    /// Every start of the main process, oldest first: fresh boots and resumes.
    pub boot_log: Vec<Boot>,
    /// Every `/bot` request that reached the machine's bot server, oldest first.
    pub deliveries: Vec<Delivery>,
    /// The lease held on the machine, if one is held and has not expired.
    pub lease: Option<FakeLease>,
    /// Completed or begun suspensions (`POST .../suspend` accepted).
    pub suspends: u32,
    /// Signals accepted by `POST .../signal`, oldest first (`"SIGTERM"`, ...).
    pub signals: Vec<String>,
}

/// How a start of a machine's main process came about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BootKind {
    /// Started from the image: new root filesystem, empty memory, the app boots.
    Fresh,
    /// Resumed from the memory snapshot taken at suspension: the same process, still ready.
    Resume,
    /// A resume that came back cold: a fresh boot.
    ColdResume,
}

impl BootKind {
    /// Whether the process started from the image (memory and root filesystem new).
    pub fn is_fresh(self) -> bool {
        !matches!(self, Self::Resume)
    }
}

/// One start of a machine's main process.
#[derive(Debug, Clone, PartialEq)]
pub struct Boot {
    /// Unique per start (a ULID).
    pub id: String,
    pub kind: BootKind,
    pub at: DateTime<Utc>,
}

/// What a `/bot` request's `Authorization` header was, against the machine's
/// `BOTDISPATCH_HANDOFF_SECRET`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HandoffAuth {
    /// `Bearer <the machine's secret>`.
    Matched,
    /// Some other value.
    Mismatched,
    /// No `Authorization` header, while the machine has a secret.
    Missing,
    /// The machine's env has no `BOTDISPATCH_HANDOFF_SECRET`: nothing to compare with.
    NoSecret,
}

/// One `/bot` request that reached a machine's bot server.
#[derive(Debug, Clone, PartialEq)]
pub struct Delivery {
    /// The [`Boot`] (start) it reached.
    pub boot_id: String,
    /// The fresh boot whose memory served it: equal to `boot_id` unless the machine was
    /// resumed from a snapshot since.
    pub image_boot_id: String,
    /// `X-Daily-Session-Id`.
    pub session_id: Option<String>,
    /// `X-Daily-Room-Url`.
    pub room_url: Option<String>,
    /// `X-Daily-Room-Token`.
    pub room_token: Option<String>,
    pub auth: HandoffAuth,
    /// The JSON body, if it was JSON.
    pub body: Option<Value>,
    /// A session was started (the request was not refused).
    pub accepted: bool,
    /// Status answered: at once for a refusal, when the session ended for an accepted one;
    /// `None` while the session runs or when its connection was reset (the process died).
    pub status: Option<u16>,
    pub at: DateTime<Utc>,
}

/// A lease held on a machine.
#[derive(Debug, Clone, PartialEq)]
pub struct FakeLease {
    /// 12 lowercase hex characters; send it as `fly-machine-lease-nonce`.
    pub nonce: String,
    pub owner: String,
    pub description: String,
    /// The machine's `instance_id` when the lease was taken.
    pub version: String,
    /// Nominal expiry (`ttl` whole seconds after the last acquire or refresh).
    pub expires_at: DateTime<Utc>,
}

/// Kinds of [`Violation`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ViolationKind {
    /// A `/bot` was accepted by a boot that had already accepted one.
    SecondSessionInBoot,
    /// A `/bot` was accepted by a machine resumed from the memory of a boot that had already
    /// served a session: no fresh boot since its previous session.
    SessionWithoutFreshBoot,
    /// A mutating call on a leased machine without the lease's nonce.
    WriteWithoutLeaseNonce,
}

/// Something a correct dispatcher must never cause, seen by the fake.
#[derive(Debug, Clone, PartialEq)]
pub struct Violation {
    pub machine_id: String,
    pub kind: ViolationKind,
    pub detail: String,
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?} on {}: {}", self.kind, self.machine_id, self.detail)
    }
}

/// A handle on a running fake Fly Machines API. Clones share the same server and state; the
/// server stops when the last handle is dropped.
#[derive(Debug, Clone)]
pub struct FakeFly {
    server: FakeServer<Shared>,
}

impl FakeFly {
    /// Starts the fake on a free local port, on the current tokio runtime, with the default
    /// [`FakeFlyWarmConfig`].
    ///
    /// # Panics
    ///
    /// Panics outside a tokio runtime or if no local port can be bound.
    pub async fn start(config: FakeFlyConfig) -> FakeFly {
        Self::start_with(config, FakeFlyWarmConfig::default()).await
    }

    /// Starts the fake with warm-start knobs; see [`start`](Self::start).
    ///
    /// # Panics
    ///
    /// Panics outside a tokio runtime or if no local port can be bound.
    pub async fn start_with(config: FakeFlyConfig, warm: FakeFlyWarmConfig) -> FakeFly {
        let (changes, _) = watch::channel(0);
        let shared = Shared {
            config,
            warm,
            validator: OpenApiValidator::fly(),
            core: FakeCore::default(),
            state: std::sync::Mutex::new(FlyState::default()),
            changes,
            open_waits: Default::default(),
            open_calls: Default::default(),
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

    /// `http://127.0.0.1:PORT/_bot/{machine_id}`: where each machine's bot HTTP server is
    /// reached, in the form of botdispatch's `fly.machine_url` template (append `/readyz`,
    /// `/bot`).
    pub fn machine_url_template(&self) -> String {
        format!("{}/_bot/{{machine_id}}", self.root_url())
    }

    /// The bot server base URL of machine `id` (the template, expanded).
    pub fn machine_url(&self, id: &str) -> String {
        format!("{}/_bot/{id}", self.root_url())
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
        state.machines.iter().map(|r| r.snapshot()).collect()
    }

    /// The machines that are not destroyed, oldest first.
    pub fn live_machines(&self) -> Vec<FakeMachine> {
        let state = self.server.lock();
        state
            .machines
            .iter()
            .filter(|r| r.machine.state != "destroyed")
            .map(|r| r.snapshot())
            .collect()
    }

    /// One machine by id (of any app).
    pub fn machine(&self, id: &str) -> Option<FakeMachine> {
        let state = self.server.lock();
        state.by_id(id).map(|r| r.snapshot())
    }

    /// Fresh boots of machine `id` so far (see [`FakeMachine::boots`]); 0 if unknown.
    pub fn boots(&self, id: &str) -> u32 {
        self.machine(id).map_or(0, |m| m.boots)
    }

    /// Every start of machine `id`'s process, oldest first.
    pub fn boot_log(&self, id: &str) -> Vec<Boot> {
        self.machine(id).map(|m| m.boot_log).unwrap_or_default()
    }

    /// Every `/bot` request that reached machine `id`, oldest first.
    pub fn deliveries(&self, id: &str) -> Vec<Delivery> {
        self.machine(id).map(|m| m.deliveries).unwrap_or_default()
    }

    /// Signals machine `id` accepted, oldest first.
    pub fn signals(&self, id: &str) -> Vec<String> {
        self.machine(id).map(|m| m.signals).unwrap_or_default()
    }

    /// The unexpired lease on machine `id`, if any.
    pub fn lease(&self, id: &str) -> Option<FakeLease> {
        self.machine(id).and_then(|m| m.lease)
    }

    /// Whether machine `id`'s bot would answer `/readyz` 200 now.
    pub fn is_ready(&self, id: &str) -> bool {
        let state = self.server.lock();
        state.by_id(id).is_some_and(state::MachineRecord::ready)
    }

    /// Sessions running on machine `id` now.
    pub fn running_sessions(&self, id: &str) -> usize {
        let state = self.server.lock();
        state
            .by_id(id)
            .and_then(|r| r.process.as_ref())
            .map_or(0, |p| p.sessions.len())
    }

    /// Everything seen so far that a correct dispatcher must never cause, oldest first.
    pub fn violations(&self) -> Vec<Violation> {
        self.server.lock().violations.clone()
    }

    /// Every request to a machine's bot server (`/_bot/...`) answered so far, oldest first
    /// (status 0: connection reset). Not included in [`requests`](Self::requests).
    pub fn bot_requests(&self) -> Vec<RecordedRequest> {
        self.server.lock().bot_calls.clone()
    }

    /// The machine's main process exits with `exit_code`: a `starting` or `started` machine
    /// becomes `stopped` (recording an `exit` event whose `request.exit_event.exit_code` is the
    /// code), then `destroyed` if its config has `auto_destroy: true`. A running `/bot`
    /// session's connection is reset. Returns whether the machine was running.
    pub fn exit_machine(&self, id: &str, exit_code: i32) -> bool {
        self.server.exit(id, exit_code, None, None)
    }

    /// The host fails machine `id` (as flyd reports a machine that crashed or could not run):
    /// its process dies, its `/bot` session's connection is reset, and it is left `failed`
    /// (no `auto_destroy`: only a destroy removes it). Returns whether it was running.
    pub fn fail_machine(&self, id: &str) -> bool {
        self.server.fail(id)
    }

    /// Ends the sessions running on machine `id` (their `/bot` requests answer 200 `{}`); a
    /// process that got SIGTERM then exits 0. Returns how many sessions ended.
    pub fn end_session(&self, id: &str) -> usize {
        self.server.end_sessions(id, None)
    }

    /// The next `/bot` on machine `id` answers `status` at once and starts no session
    /// (`None` disarms).
    pub fn set_bot_refusal(&self, id: &str, status: Option<u16>) {
        if let Some(record) = self.server.lock().by_id_mut(id) {
            record.bot_refusal = status;
        }
    }

    /// While on, machine `id`'s bot answers `/readyz` 503 (and `/bot` 503), whatever its boot.
    pub fn set_never_ready(&self, id: &str, never: bool) {
        if let Some(record) = self.server.lock().by_id_mut(id) {
            record.never_ready = never;
        }
        self.server.notify();
    }

    /// The next resume of machine `id` comes back cold: a fresh boot (new boot, the app boots
    /// again, readiness lost), as when Fly dropped its snapshot.
    pub fn set_cold_resume(&self, id: &str) {
        if let Some(record) = self.server.lock().by_id_mut(id) {
            record.cold_resume = true;
        }
    }

    /// Waits until the machine `id` is (or has been, since the call) in `state`, at most
    /// `timeout`. Returns whether it got there.
    pub async fn wait_for_state(&self, id: &str, state: &str, timeout: Duration) -> bool {
        let start = {
            let guard = self.server.lock();
            match guard.by_id(id) {
                Some(record) => record.history.len() - 1,
                None => return false,
            }
        };
        self.wait_until(timeout, |guard| {
            guard
                .by_id(id)
                .is_some_and(|r| r.history[start..].iter().any(|(_, s)| s == state))
        })
        .await
    }

    /// Waits until machine `id` has received at least `count` `/bot` requests, at most
    /// `timeout`. Returns whether it did.
    pub async fn wait_for_deliveries(&self, id: &str, count: usize, timeout: Duration) -> bool {
        self.wait_until(timeout, |guard| {
            guard
                .by_id(id)
                .is_some_and(|r| r.machine.deliveries.len() >= count)
        })
        .await
    }

    async fn wait_until(&self, timeout: Duration, done: impl Fn(&FlyState) -> bool) -> bool {
        let mut changes = self.server.changes.subscribe();
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if done(&self.server.lock()) {
                return true;
            }
            match tokio::time::timeout_at(deadline, changes.changed()).await {
                Ok(Ok(())) => {}
                Ok(Err(_)) | Err(_) => return false,
            }
        }
    }

    /// The most `/wait` requests that were open at once (each holds a client's connection
    /// while it waits).
    pub fn open_waits_peak(&self) -> usize {
        self.server.open_waits.peak()
    }

    /// The most other API requests that were being answered at once.
    pub fn open_calls_peak(&self) -> usize {
        self.server.open_calls.peak()
    }

    /// Every API request answered so far, oldest first.
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

    /// While on, machines created from now on never reach `started` (they stay in `starting`,
    /// also when started again later).
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

/// Every request: a machine's bot server under `/_bot/`, the Machines API otherwise.
async fn handle(State(shared): State<Arc<Shared>>, request: Request) -> Response {
    if let Some(rest) = request.path.strip_prefix("/_bot/") {
        let reply = shared.serve_bot(&request, rest).await;
        let recorded = request.recorded(request.json_body().ok().flatten(), &reply);
        shared.lock().bot_calls.push(recorded);
        return request.respond(reply);
    }
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
