//! What a provider is asked to run and what it reports back: the per-agent
//! [`MachineTemplate`], the per-session [`SessionBinding`], and a machine's [`MachineStatus`].
//!
//! The split lets a machine be prepared from its agent's template alone and handed a session
//! later; a cold start passes both at once.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::{Deadline, SessionLabels};

/// Env names of the bot contract, set by botdispatch for every session, plus the names
/// providers use for their own bookkeeping. An agent's static env may not set any of them.
pub const RESERVED_ENV: [&str; 6] = [
    "DAILY_ROOM_URL",
    "DAILY_ROOM_TOKEN",
    "BOTDISPATCH_SESSION_ID",
    "BOTDISPATCH_BODY",
    // The Cloud Run provider's copy of the session labels (jobs cannot be labelled per run).
    "BOTDISPATCH_LABELS",
    // The `http` handoff's per-machine secret.
    HANDOFF_SECRET_ENV,
];

/// Env var of a machine's handoff secret: the bot's `/bot` accepts only this bearer token.
pub const HANDOFF_SECRET_ENV: &str = "BOTDISPATCH_HANDOFF_SECRET";

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

/// What a machine runs, in the terms of the provider that runs it. Each provider accepts one
/// kind; the provider's configuration turns an agent's `image` setting into it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Workload {
    /// A container image reference (`fly`).
    Image(String),
    /// An ECS task definition: `family`, `family:revision` or an ARN (`fargate`: ECS cannot
    /// override a container image per run).
    TaskDefinition(String),
    /// A Cloud Run job name (`cloudrun`: a job's template fixes its image).
    Job(String),
    /// A program on the dispatcher's host (`local`).
    Program(String),
}

impl Workload {
    /// The reference itself, whatever its kind.
    pub fn reference(&self) -> &str {
        match self {
            Self::Image(r) | Self::TaskDefinition(r) | Self::Job(r) | Self::Program(r) => r,
        }
    }
}

/// How a machine that waits for its session is kept, fastest and dearest first (DESIGN §10).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Tier {
    /// Running, its bot answering `/readyz` 200.
    Hot,
    /// Booted until ready, then suspended (a memory snapshot); a claim resumes it.
    Suspended,
    /// Created but never started (image pulled, root filesystem built); a claim boots it.
    Stopped,
}

impl Tier {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Hot => "hot",
            Self::Suspended => "suspended",
            Self::Stopped => "stopped",
        }
    }

    pub fn parse(value: &str) -> Option<Self> {
        match value {
            "hot" => Some(Self::Hot),
            "suspended" => Some(Self::Suspended),
            "stopped" => Some(Self::Stopped),
            _ => None,
        }
    }
}

/// How a session's machine came to it: a reserve tier's, or a machine created for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum StartType {
    #[default]
    Cold,
    Warm(Tier),
}

impl StartType {
    /// `hot`, `suspended`, `stopped` or `cold`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Cold => "cold",
            Self::Warm(tier) => tier.as_str(),
        }
    }

    pub fn parse(value: &str) -> Self {
        Tier::parse(value).map_or(Self::Cold, Self::Warm)
    }
}

/// The labels of a reserve machine that is not (yet) any session's.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReserveLabels {
    /// The machine's name (its handoff secret is derived from it).
    pub name: String,
    /// Its place in the reserve: replicas replenishing the same slot at once pick the same
    /// name, and all but one are refused.
    pub slot: u32,
    /// The agent whose template it was made from.
    pub agent: String,
    /// The template's fingerprint: a machine of a stale template is rotated out.
    pub fingerprint: String,
    pub tier: Tier,
    /// Its bot answered `/readyz` (and, for the suspended tier, it was suspended afterwards).
    pub ready: bool,
    /// After its session it is started again from its image and put back (not destroyed).
    pub recycle: bool,
    /// When it was last put back after a session (unix seconds): its preparation time counts
    /// from then, not from its creation.
    pub recycled_at: Option<i64>,
}

/// What every machine of one agent has in common, whatever session it serves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MachineTemplate {
    pub workload: Workload,
    /// Overrides the workload's command (for `local`, the whole argv); may reference the
    /// contract's env vars.
    pub cmd: Option<Vec<String>>,
    pub guest: Guest,
    /// Where the machine runs; `None` lets the provider choose (its default region).
    pub region: Option<String>,
    /// The agent's static env. Values may be secrets: never log them.
    pub env: BTreeMap<String, String>,
    /// `Some(port)`: the session is handed over HTTP (DESIGN §4): the bot serves `/readyz` and
    /// `/bot` on this port (its `PORT`). `None`: the session travels in the env.
    pub handoff_port: Option<u16>,
}

impl MachineTemplate {
    /// A short stable digest of everything that makes two machines of this template alike
    /// (workload, command, guest, region, static env, handoff port): a reserve machine whose
    /// fingerprint differs from its agent's current one is stale.
    pub fn fingerprint(&self) -> String {
        use sha2::{Digest, Sha256};
        let text = format!(
            "{:?}|{:?}|{:?}|{:?}|{:?}|{:?}",
            self.workload, self.cmd, self.guest, self.region, self.env, self.handoff_port
        );
        let digest = Sha256::digest(text.as_bytes());
        digest[..5].iter().map(|b| format!("{b:02x}")).collect()
    }

    /// A machine's whole env: this static env and `extra` (a session's contract, a reserve
    /// machine's handoff secret), `extra` winning a name both have.
    pub fn env_with<'a>(
        &'a self,
        extra: &'a BTreeMap<String, String>,
    ) -> BTreeMap<&'a str, &'a str> {
        self.env
            .iter()
            .chain(extra)
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect()
    }
}

/// What ties a machine to one session.
#[derive(Debug, Clone)]
pub struct SessionBinding {
    /// Deterministic machine name derived from the session key, so a retried create conflicts
    /// instead of launching a second machine.
    pub name: String,
    /// The bot contract (room URL, bot token, session id, body). Values are secrets: never log
    /// them.
    pub env: BTreeMap<String, String>,
    pub labels: SessionLabels,
    /// When the launch must be over: calls and retries made for it stop before.
    pub deadline: Deadline,
}

impl SessionBinding {
    /// The machine's whole env: the template's static env and the session's contract (the
    /// contract wins; configuration validation keeps the two apart).
    pub fn machine_env<'a>(&'a self, template: &'a MachineTemplate) -> BTreeMap<&'a str, &'a str> {
        template.env_with(&self.env)
    }

    /// The env names only, for logs.
    pub fn env_names<'a>(&'a self, template: &'a MachineTemplate) -> Vec<&'a str> {
        self.machine_env(template).into_keys().collect()
    }
}

/// What a successful launch returns: enough to find the machine again in one read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Launched {
    /// The provider's id for the machine (Fly machine id, ECS task ARN, Cloud Run execution,
    /// process table key). Opaque to the service.
    pub handle: String,
    pub region: Option<String>,
    /// The provider's version of the machine, where waits need it (Fly `instance_id`).
    pub version: Option<String>,
    /// Its address on the provider's private network, where it has one (Fly `private_ip`).
    pub address: Option<String>,
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
    /// `None` when the machine carries no session labels of this deployment.
    pub labels: Option<SessionLabels>,
    /// `Some` for a reserve machine of this deployment that is no session's yet.
    pub reserve: Option<ReserveLabels>,
    /// Its address on the provider's private network, where it has one.
    pub address: Option<String>,
    /// A short human explanation (exit code, stop reason).
    pub detail: Option<String>,
    /// Why the session failed after its machine took it (a bot that refused its session
    /// after the handoff), as the dispatcher recorded it on the machine.
    pub failure: Option<String>,
    /// A recycled agent's reserve machine that a session holds or held: its reserve labels
    /// (it keeps its slot, and goes back to the reserve once its session is over).
    pub held: Option<ReserveLabels>,
}

impl MachineStatus {
    /// The launch this status describes, for a wait on a machine found rather than launched.
    pub fn as_launched(&self) -> Launched {
        Launched {
            handle: self.handle.clone(),
            region: self.region.clone(),
            version: None,
            address: self.address.clone(),
        }
    }
}
