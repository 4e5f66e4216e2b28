//! The fake's shared state and machine model: machine records, the main process of each boot
//! (its readiness and running sessions), state transitions with their `MachineEvent`s, and
//! process exits.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use chrono::{DateTime, SecondsFormat, Utc};
use serde_json::{json, Value};
use tokio::sync::{oneshot, watch};
use tokio::time::Instant;
use ulid::Ulid;

use super::super::faults::FakeCore;
use super::super::server::{self, Reply};
use super::super::validate::openapi::OpenApiValidator;
use super::super::RecordedRequest;
use super::{
    Boot, BootKind, FakeFlyConfig, FakeFlyWarmConfig, FakeLease, FakeMachine, FlyOp, Violation,
    ViolationKind,
};

/// Env var of a machine's handoff secret (botdispatch's `HANDOFF_SECRET_ENV`).
pub(super) const HANDOFF_SECRET_ENV: &str = "BOTDISPATCH_HANDOFF_SECRET";

#[derive(Debug)]
pub(super) struct Shared {
    pub(super) config: FakeFlyConfig,
    pub(super) warm: FakeFlyWarmConfig,
    pub(super) validator: OpenApiValidator,
    pub(super) core: FakeCore<FlyOp>,
    pub(super) state: Mutex<FlyState>,
    /// Bumped on every machine state change; waiters re-check when it moves.
    pub(super) changes: watch::Sender<u64>,
    /// `/wait` requests being answered.
    pub(super) open_waits: Gauge,
    /// Every other request being answered.
    pub(super) open_calls: Gauge,
}

impl Shared {
    pub(super) fn lock(&self) -> MutexGuard<'_, FlyState> {
        server::lock(&self.state)
    }

    pub(super) fn notify(&self) {
        self.changes.send_modify(|n| *n = n.wrapping_add(1));
    }
}

/// How many requests of a kind are being answered, and the most there ever were at once.
#[derive(Debug, Default)]
pub(super) struct Gauge {
    now: AtomicUsize,
    peak: AtomicUsize,
}

impl Gauge {
    /// Counts one more until the returned guard drops.
    pub(super) fn open(&self) -> Open<'_> {
        let now = self.now.fetch_add(1, Ordering::SeqCst) + 1;
        self.peak.fetch_max(now, Ordering::SeqCst);
        Open(self)
    }

    pub(super) fn peak(&self) -> usize {
        self.peak.load(Ordering::SeqCst)
    }
}

/// One request counted by a [`Gauge`].
pub(super) struct Open<'a>(&'a Gauge);

impl Drop for Open<'_> {
    fn drop(&mut self) {
        self.0.now.fetch_sub(1, Ordering::SeqCst);
    }
}

#[derive(Debug, Default)]
pub(super) struct FlyState {
    pub(super) machines: Vec<MachineRecord>,
    pub(super) fail_create: Option<(u16, String)>,
    pub(super) never_start: bool,
    pub(super) create_delay: Duration,
    pub(super) violations: Vec<Violation>,
    pub(super) bot_calls: Vec<RecordedRequest>,
    /// Last session number handed out.
    pub(super) sessions: u64,
}

impl FlyState {
    /// Machine `id` of `app`, destroyed or not.
    pub(super) fn machine(&self, app: &str, id: &str) -> Option<&MachineRecord> {
        self.machines
            .iter()
            .find(|r| r.machine.app == app && r.machine.id == id)
    }

    /// Index of machine `id` of `app`, destroyed or not.
    pub(super) fn index(&self, app: &str, id: &str) -> Option<usize> {
        self.machines
            .iter()
            .position(|r| r.machine.app == app && r.machine.id == id)
    }

    /// Machine `id` of any app.
    pub(super) fn by_id(&self, id: &str) -> Option<&MachineRecord> {
        self.machines.iter().find(|r| r.machine.id == id)
    }

    pub(super) fn by_id_mut(&mut self, id: &str) -> Option<&mut MachineRecord> {
        self.machines.iter_mut().find(|r| r.machine.id == id)
    }

    pub(super) fn violation(&mut self, machine_id: &str, kind: ViolationKind, detail: String) {
        self.violations.push(Violation {
            machine_id: machine_id.to_owned(),
            kind,
            detail,
        });
    }
}

#[derive(Debug)]
pub(super) struct MachineRecord {
    pub(super) machine: FakeMachine,
    pub(super) private_ip: String,
    /// `(event id, state)` of every state the machine entered, oldest first.
    pub(super) history: Vec<(String, String)>,
    /// Bumped by every external transition (start, stop, suspend, update, delete, exit) so that
    /// background lifecycle tasks started before it give up.
    pub(super) epoch: u64,
    /// `set_never_start` was on when the machine was created.
    pub(super) never_start: bool,
    /// The main process of the current boot, from `starting` until it exits or is suspended.
    pub(super) process: Option<Process>,
    /// The process frozen in the memory snapshot of a suspended machine.
    pub(super) snapshot: Option<Process>,
    pub(super) lease: Option<LeaseRecord>,
    /// One-shot: the next `/bot` answers this status.
    pub(super) bot_refusal: Option<u16>,
    pub(super) never_ready: bool,
    /// One-shot: the next resume is a cold boot.
    pub(super) cold_resume: bool,
}

impl MachineRecord {
    pub(super) fn new(machine: FakeMachine, private_ip: String, history: (String, String)) -> Self {
        Self {
            machine,
            private_ip,
            history: vec![history],
            epoch: 0,
            never_start: false,
            process: None,
            snapshot: None,
            lease: None,
            bot_refusal: None,
            never_ready: false,
            cold_resume: false,
        }
    }

    /// The public view, with the lease only while it holds.
    pub(super) fn snapshot(&self) -> FakeMachine {
        let mut machine = self.machine.clone();
        machine.lease = self.active_lease().map(|l| l.lease.clone());
        machine
    }

    pub(super) fn active_lease(&self) -> Option<&LeaseRecord> {
        self.lease.as_ref().filter(|l| l.deadline > Instant::now())
    }

    pub(super) fn auto_destroy(&self) -> bool {
        self.machine
            .config
            .get("auto_destroy")
            .and_then(Value::as_bool)
            == Some(true)
    }

    pub(super) fn metadata(&self, key: &str) -> Option<&str> {
        self.machine
            .config
            .get("metadata")
            .and_then(|m| m.get(key))
            .and_then(Value::as_str)
    }

    /// The machine's `BOTDISPATCH_HANDOFF_SECRET`, if its env has one.
    pub(super) fn handoff_secret(&self) -> Option<&str> {
        self.machine
            .config
            .get("env")
            .and_then(|env| env.get(HANDOFF_SECRET_ENV))
            .and_then(Value::as_str)
    }

    /// The machine's JSON as the API answers it (the spec's `Machine`).
    pub(super) fn to_json(&self, summary: bool) -> Value {
        let m = &self.machine;
        let mut out = json!({
            "id": m.id,
            "name": m.name,
            "state": m.state,
            "region": m.region,
            "instance_id": m.instance_id,
            "private_ip": self.private_ip,
            "created_at": rfc3339(m.created_at),
            "updated_at": rfc3339(m.updated_at),
        });
        if !summary {
            out["config"] = m.config.clone();
            out["events"] = Value::Array(m.events.clone());
            out["host_status"] = json!("ok");
        }
        out
    }

    /// Whether the bot answers `/readyz` 200 now.
    pub(super) fn ready(&self) -> bool {
        self.machine.state == "started"
            && !self.never_ready
            && self
                .process
                .as_ref()
                .is_some_and(|p| !p.draining && p.ready_at.is_some_and(|t| t <= Instant::now()))
    }

    /// A new start of the main process (the machine enters `starting`). A fresh boot starts a
    /// new process; a resume brings back the snapshot's, under a new boot id.
    pub(super) fn begin_boot(&mut self, kind: BootKind) {
        let boot_id = Ulid::new().to_string();
        let process = match (kind, self.snapshot.take()) {
            (BootKind::Resume, Some(mut frozen)) => {
                frozen.boot_id.clone_from(&boot_id);
                frozen
            }
            _ => Process::new(boot_id.clone()),
        };
        if process.boot_id == process.image_boot_id {
            self.machine.boots += 1;
        }
        let kind = if kind == BootKind::Resume && process.boot_id == process.image_boot_id {
            BootKind::ColdResume
        } else {
            kind
        };
        self.machine.boot_log.push(Boot {
            id: boot_id,
            kind,
            at: Utc::now(),
        });
        self.kill_process();
        self.process = Some(process);
    }

    /// The machine reached `started`: a fresh process's app starts booting, a resumed one
    /// carries on where it was frozen.
    pub(super) fn on_started(&mut self, app_boot: Duration) {
        if let Some(process) = self.process.as_mut() {
            let left = process.ready_left.take().unwrap_or(app_boot);
            process.ready_at = Some(Instant::now() + left);
        }
    }

    /// Freezes the process into the memory snapshot (suspension). Connections do not survive:
    /// running sessions' `/bot` requests are reset.
    pub(super) fn freeze(&mut self) {
        if let Some(mut process) = self.process.take() {
            for session in process.sessions.drain(..) {
                let _ = session.done.send(SessionEnd::Killed);
            }
            process.ready_left = Some(process.ready_at.map_or(Duration::ZERO, |t| {
                t.saturating_duration_since(Instant::now())
            }));
            process.ready_at = None;
            self.snapshot = Some(process);
        }
    }

    /// The process is gone: running sessions' `/bot` requests are reset.
    pub(super) fn kill_process(&mut self) {
        if let Some(process) = self.process.take() {
            for session in process.sessions {
                let _ = session.done.send(SessionEnd::Killed);
            }
        }
    }

    /// Ends session `which` (all when `None`) normally: its `/bot` answers 200. Returns how
    /// many ended.
    pub(super) fn end_sessions(&mut self, which: Option<u64>) -> usize {
        let Some(process) = self.process.as_mut() else {
            return 0;
        };
        let (ended, kept): (Vec<Session>, Vec<Session>) = process
            .sessions
            .drain(..)
            .partition(|s| which.is_none_or(|w| w == s.id));
        process.sessions = kept;
        let count = ended.len();
        for session in ended {
            if let Some(delivery) = self.machine.deliveries.get_mut(session.delivery) {
                delivery.status = Some(200);
            }
            let _ = session.done.send(SessionEnd::Finished);
        }
        count
    }

    /// Whether the process got SIGTERM and has no session left: it exits now.
    pub(super) fn drained(&self) -> bool {
        matches!(self.machine.state.as_str(), "starting" | "started")
            && self
                .process
                .as_ref()
                .is_some_and(|p| p.draining && p.sessions.is_empty())
    }
}

/// The main process of one boot: the bot's HTTP server.
#[derive(Debug)]
pub(super) struct Process {
    /// The start this process is running in.
    pub(super) boot_id: String,
    /// The fresh boot whose memory this is.
    pub(super) image_boot_id: String,
    /// When `/readyz` turns 200; `None` until the machine is `started`.
    pub(super) ready_at: Option<Instant>,
    /// While frozen in a snapshot: app boot time still to go.
    pub(super) ready_left: Option<Duration>,
    /// Got SIGTERM (or the machine is stopping): refuses new connections.
    pub(super) draining: bool,
    pub(super) sessions: Vec<Session>,
}

impl Process {
    fn new(boot_id: String) -> Self {
        Self {
            image_boot_id: boot_id.clone(),
            boot_id,
            ready_at: None,
            ready_left: None,
            draining: false,
            sessions: Vec::new(),
        }
    }
}

/// A session running in a process; its `/bot` request waits on `done`.
#[derive(Debug)]
pub(super) struct Session {
    pub(super) id: u64,
    /// Index in the machine's deliveries.
    pub(super) delivery: usize,
    pub(super) done: oneshot::Sender<SessionEnd>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum SessionEnd {
    /// The session ended: `/bot` answers 200 `{}`.
    Finished,
    /// The process died or was frozen: the connection is reset.
    Killed,
}

#[derive(Debug)]
pub(super) struct LeaseRecord {
    pub(super) lease: FakeLease,
    /// Real expiry (tokio time, so that paused-clock tests work).
    pub(super) deadline: Instant,
}

/// Puts the machine in `to`, recording a `MachineEvent` (newest first) and the history entry.
pub(super) fn transition(
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
pub(super) fn process_exited(record: &mut MachineRecord, exit_event: Value) {
    record.kill_process();
    record.snapshot = None;
    let request = json!({ "exit_event": exit_event });
    transition(record, "stopped", "exit", "flyd", Some(request));
    if record.auto_destroy() {
        destroyed(record, "flyd");
    }
}

/// The machine is destroyed: its process, snapshot and lease go with it.
pub(super) fn destroyed(record: &mut MachineRecord, source: &str) {
    record.kill_process();
    record.snapshot = None;
    record.lease = None;
    transition(record, "destroyed", "destroy", source, None);
}

/// An `exit_event` of a process that exited by itself or on a signal.
pub(super) fn exit_event(exit_code: i32, signal: Option<i32>, requested_stop: bool) -> Value {
    let mut event = json!({
        "exit_code": exit_code,
        "oom_killed": false,
        "requested_stop": requested_stop,
        "exited_at": rfc3339(Utc::now()),
    });
    if let Some(signal) = signal {
        event["signal"] = json!(signal);
    }
    event
}

pub(super) fn event(kind: &str, status: &str, source: &str, request: Option<Value>) -> Value {
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

pub(super) fn rfc3339(at: DateTime<Utc>) -> String {
    at.to_rfc3339_opts(SecondsFormat::Secs, true)
}

/// Fly's error shape: `{"error": "..."}`.
pub(super) fn fly_error(status: u16, message: impl Into<String>) -> Reply {
    Reply::json(status, json!({ "error": message.into() }))
}

pub(super) fn not_found() -> Reply {
    fly_error(404, "machine not found")
}

/// A Fly-like generated name (`adjective-noun-1234`), derived from the machine id.
pub(super) fn generated_name(id: &str) -> String {
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
