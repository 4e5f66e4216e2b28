//! Machine providers for botdispatch: one trait, [`MachineProvider`], implemented once per cloud.
//!
//! A provider launches exactly one machine (VM, task, container, process) per session, reports its
//! state, and destroys it. It never keeps the truth about a session in memory: everything a replica
//! needs to find a machine again is in the machine's own name and labels (Fly metadata, ECS tags,
//! Cloud Run labels), so any dispatcher replica can answer for any session.
//!
//! This crate knows nothing about HTTP handlers, auth or Daily rooms; the service crate depends on
//! it, never the other way round.

#[cfg(feature = "cloudrun")]
pub mod cloudrun;
#[cfg(feature = "fargate")]
pub mod fargate;
pub mod fly;
pub mod local;
pub mod resilient;
mod retry_after;

#[cfg(feature = "testkit")]
pub mod testkit;

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

pub use retry_after::parse_retry_after;

/// Value of the `managed-by` label on every machine botdispatch launches; the reaper only ever
/// touches machines that carry it.
pub const MANAGED_BY: &str = "botdispatch";

/// Label keys, shared by every provider so listings and the reaper read the same names.
/// Lowercase with underscores: valid as Fly metadata keys, ECS tag keys and Cloud Run labels.
pub mod label {
    pub const MANAGED_BY: &str = "managed_by";
    pub const SESSION: &str = "botdispatch_session";
    pub const OWNER: &str = "botdispatch_owner";
    pub const ROOM: &str = "botdispatch_room";
    pub const DEADLINE: &str = "botdispatch_deadline";
    pub const AGENT: &str = "botdispatch_agent";
}

/// A value that must never be printed: `Debug` and `Display` show `[redacted]`.
#[derive(Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }
    /// The secret itself, for the one place that must send it (a header, a signature).
    pub fn expose(&self) -> &str {
        &self.0
    }
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}

/// Size of the VM a session gets.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Guest {
    #[serde(default = "Guest::default_cpus")]
    pub cpus: u32,
    #[serde(default = "Guest::default_memory_mb")]
    pub memory_mb: u32,
    /// `shared` or `performance` on Fly; ignored where the provider has no such notion.
    #[serde(default = "Guest::default_cpu_kind")]
    pub cpu_kind: String,
}

impl Guest {
    fn default_cpus() -> u32 {
        1
    }
    fn default_memory_mb() -> u32 {
        1024
    }
    fn default_cpu_kind() -> String {
        "shared".to_owned()
    }
}

impl Default for Guest {
    fn default() -> Self {
        Self {
            cpus: Self::default_cpus(),
            memory_mb: Self::default_memory_mb(),
            cpu_kind: Self::default_cpu_kind(),
        }
    }
}

/// What a provider attaches to a machine so that the machine alone tells whose session it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionLabels {
    /// The plain session key (also the bot's `BOTDISPATCH_SESSION_ID`).
    pub session_key: String,
    /// The caller's JWT `sub`.
    pub owner: String,
    /// The Daily room name of the session.
    pub room: String,
    /// The agent (bot profile) that was started.
    pub agent: String,
    /// When the session must be over, whatever the bot does.
    pub deadline: DateTime<Utc>,
}

impl SessionLabels {
    /// The labels as key/value pairs, including the `managed-by` marker.
    pub fn to_map(&self) -> BTreeMap<String, String> {
        BTreeMap::from([
            (label::MANAGED_BY.to_owned(), MANAGED_BY.to_owned()),
            (label::SESSION.to_owned(), self.session_key.clone()),
            (label::OWNER.to_owned(), self.owner.clone()),
            (label::ROOM.to_owned(), self.room.clone()),
            (label::AGENT.to_owned(), self.agent.clone()),
            (
                label::DEADLINE.to_owned(),
                self.deadline.timestamp().to_string(),
            ),
        ])
    }

    /// Reads labels back from a machine; `None` when the machine is not one of ours.
    pub fn from_map(map: &BTreeMap<String, String>) -> Option<Self> {
        if map.get(label::MANAGED_BY).map(String::as_str) != Some(MANAGED_BY) {
            return None;
        }
        let deadline = map.get(label::DEADLINE)?.parse::<i64>().ok()?;
        Some(Self {
            session_key: map.get(label::SESSION)?.clone(),
            owner: map.get(label::OWNER)?.clone(),
            room: map.get(label::ROOM)?.clone(),
            agent: map.get(label::AGENT).cloned().unwrap_or_default(),
            deadline: DateTime::from_timestamp(deadline, 0)?,
        })
    }
}

/// Everything a provider needs to launch one session's machine.
#[derive(Debug, Clone)]
pub struct LaunchSpec {
    /// Deterministic machine name derived from the session key, so a retried create conflicts
    /// instead of launching a second machine.
    pub name: String,
    pub image: String,
    /// Overrides the image's command; may reference the contract's env vars.
    pub cmd: Option<Vec<String>>,
    /// The bot contract (room URL, bot token, session id, body) plus the agent's static env.
    /// Values may be secrets: never log this map.
    pub env: BTreeMap<String, String>,
    pub guest: Guest,
    pub region: Option<String>,
    pub labels: SessionLabels,
    /// When the start must be over; retries of the launch stop before it. `None`: a default
    /// budget.
    pub deadline: Option<tokio::time::Instant>,
}

impl LaunchSpec {
    /// The env names only, for logs.
    pub fn env_names(&self) -> Vec<&str> {
        self.env.keys().map(String::as_str).collect()
    }
}

/// What a successful launch returns: enough to find the machine again in one read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Launched {
    /// The provider's id for the machine (Fly machine id, ECS task ARN, Cloud Run execution, pid
    /// table key). Opaque to the service.
    pub handle: String,
    pub region: Option<String>,
    /// The provider's version of the machine, where waits need it (Fly `instance_id`).
    pub version: Option<String>,
}

/// A machine's state, as the service reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MachineState {
    /// Created or booting; the bot is not running yet.
    Starting,
    /// The provider reports the machine started: the bot process runs.
    Started,
    /// The machine stopped or is gone after running normally (or was stopped by us).
    Ended,
    /// The machine failed to start or crashed.
    Failed,
}

impl MachineState {
    pub fn is_terminal(self) -> bool {
        matches!(self, Self::Ended | Self::Failed)
    }
}

/// One read of a machine.
#[derive(Debug, Clone)]
pub struct MachineStatus {
    pub handle: String,
    pub state: MachineState,
    /// The provider's own word for the state (`started`, `RUNNING`, ...), for humans.
    pub provider_state: String,
    pub region: Option<String>,
    pub created_at: Option<DateTime<Utc>>,
    pub started_at: Option<DateTime<Utc>>,
    pub ended_at: Option<DateTime<Utc>>,
    /// `None` when the machine carries no (or not our) labels.
    pub labels: Option<SessionLabels>,
    /// A short human explanation (exit code, stop reason).
    pub detail: Option<String>,
}

/// Errors every provider maps its own failures into. The service decides status codes from these.
#[derive(Debug, thiserror::Error)]
pub enum ProviderError {
    /// The provider refused the request (bad image, quota, invalid config): retrying the same
    /// request will not help.
    #[error("{provider} refused the request: {message}")]
    Rejected {
        provider: &'static str,
        status: u16,
        message: String,
    },
    /// The provider throttled us; try again after the hint.
    #[error("{provider} is throttling requests")]
    Throttled {
        provider: &'static str,
        retry_after: Option<Duration>,
    },
    /// The provider failed or could not be reached; the request may be retried.
    #[error("{provider} is unavailable: {message}")]
    Unavailable {
        provider: &'static str,
        message: String,
    },
    /// The machine did not reach the wanted state before the deadline.
    #[error("{provider} machine did not start before the deadline")]
    Timeout { provider: &'static str },
    /// The machine reached a state from which it cannot start any more.
    #[error("{provider} machine failed to start: {message}")]
    StartFailed {
        provider: &'static str,
        message: String,
    },
    /// A machine with this name already exists (a retried or duplicated create).
    #[error("{provider} machine {name} already exists")]
    Conflict {
        provider: &'static str,
        name: String,
    },
    /// The provider is misconfigured (missing credentials, bad URL).
    #[error("{provider} is misconfigured: {message}")]
    Config {
        provider: &'static str,
        message: String,
    },
}

impl ProviderError {
    /// A short stable name of the error's kind, for metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Rejected { .. } => "rejected",
            Self::Throttled { .. } => "throttled",
            Self::Unavailable { .. } => "unavailable",
            Self::Timeout { .. } => "timeout",
            Self::StartFailed { .. } => "start_failed",
            Self::Conflict { .. } => "conflict",
            Self::Config { .. } => "config",
        }
    }

    /// Whether the same call may succeed if retried.
    pub fn is_transient(&self) -> bool {
        matches!(self, Self::Throttled { .. } | Self::Unavailable { .. })
    }
}

/// One cloud's way of running a session's machine. Implementations are cheap to share
/// (`Arc<dyn MachineProvider>`) and hold no per-session state that another replica would need.
#[async_trait]
pub trait MachineProvider: Send + Sync + 'static {
    /// Short stable name (`fly`, `local`, ...), used in logs, metrics and `GET /sessions`.
    fn name(&self) -> &'static str;

    /// The provider's documented outbound rate limits, applied by [`resilient::Resilient`].
    fn rate_limits(&self) -> Vec<(resilient::Op, resilient::RateLimit)> {
        Vec::new()
    }

    /// Creates and boots the machine. Returns once the provider has accepted it (not started).
    async fn launch(&self, spec: &LaunchSpec) -> Result<Launched, ProviderError>;

    /// Waits until the machine is started, at most `timeout`. Must fail with
    /// [`ProviderError::StartFailed`] as soon as the machine can no longer start.
    async fn wait_started(
        &self,
        launched: &Launched,
        timeout: Duration,
    ) -> Result<(), ProviderError>;

    /// Reads a machine by handle. `Ok(None)` when the provider no longer knows it.
    async fn status(&self, handle: &str) -> Result<Option<MachineStatus>, ProviderError>;

    /// Stops and destroys the machine. Idempotent: a machine that is already gone is success.
    async fn terminate(&self, handle: &str) -> Result<(), ProviderError>;

    /// Finds a session's machine without knowing its handle (by name or labels). Slow path: used
    /// to recover an ambiguous create, never for status polls.
    async fn find(&self, session_key: &str) -> Result<Option<MachineStatus>, ProviderError>;

    /// Every machine this dispatcher manages that is not yet destroyed (for the reaper and
    /// capacity counting).
    async fn list_managed(&self) -> Result<Vec<MachineStatus>, ProviderError>;

    /// One cheap read-only call that proves the credentials work (readiness, `botdispatch check`).
    async fn check(&self) -> Result<(), ProviderError>;

    /// Whether [`MachineProvider::set_deadline`] works. When it does, a start launches with a
    /// short provisional deadline and extends it once the client has its answer, so the reaper
    /// removes the machines of starts whose dispatcher died half-way.
    fn can_set_deadline(&self) -> bool {
        false
    }

    /// Moves the machine's deadline label.
    async fn set_deadline(
        &self,
        handle: &str,
        deadline: DateTime<Utc>,
    ) -> Result<(), ProviderError> {
        let _ = (handle, deadline);
        Err(ProviderError::Config {
            provider: self.name(),
            message: "this provider cannot change a machine's labels".into(),
        })
    }

    /// Called once when the dispatcher shuts down. Remote machines outlive the dispatcher on
    /// purpose (their sessions go on); the local provider stops its child processes.
    async fn shutdown(&self) {}
}

/// A short, secret-free description of a transport error (timeout, connection, decoding), for
/// error messages of every HTTP client here and in the service.
pub fn transport_message(e: &reqwest::Error) -> String {
    if e.is_timeout() {
        "timed out".to_owned()
    } else if e.is_connect() {
        "connection failed".to_owned()
    } else if e.is_decode() {
        "invalid JSON".to_owned()
    } else {
        let mut msg = e.to_string();
        let mut source = std::error::Error::source(e);
        while let Some(s) = source {
            msg = format!("{msg}: {s}");
            source = s.source();
        }
        msg
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_round_trip_and_reject_foreign_machines() {
        let labels = SessionLabels {
            session_key: "01k0abc".into(),
            owner: "alice".into(),
            room: "bd-01k0abc".into(),
            agent: "default".into(),
            deadline: DateTime::from_timestamp(1_800_000_000, 0).unwrap(),
        };
        let map = labels.to_map();
        assert_eq!(SessionLabels::from_map(&map), Some(labels));
        let mut foreign = map.clone();
        foreign.insert(label::MANAGED_BY.into(), "someone-else".into());
        assert_eq!(SessionLabels::from_map(&foreign), None);
    }

    #[test]
    fn secrets_never_print() {
        let s = Secret::new("hunter2");
        assert_eq!(format!("{s:?} {s}"), "[redacted] [redacted]");
    }
}
