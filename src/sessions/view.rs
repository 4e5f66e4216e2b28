//! What the flow answers: [`Started`] for a start, [`SessionView`] for a read.

use chrono::{DateTime, Utc};
use providers::{MachineState, MachineStatus, StartType};
use serde::Serialize;

/// A successful start.
#[derive(Debug, Clone)]
pub struct Started {
    pub session_id: String,
    pub room_url: Option<String>,
    pub user_token: Option<String>,
    pub ready: bool,
    /// How its machine came to it.
    pub start_type: StartType,
    /// How long the start waited in the queue for capacity.
    pub queued: std::time::Duration,
}

/// `GET /sessions/{id}`, and each item of `GET /sessions`.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct SessionView {
    pub session_id: String,
    /// `starting` | `ready` | `ended` | `failed`
    #[schema(value_type = String, example = "ready")]
    pub status: &'static str,
    /// `fly`, `fargate`, `cloudrun`, `kubernetes` or `local`.
    #[schema(value_type = String, example = "fly")]
    pub provider: &'static str,
    pub agent: Option<String>,
    pub region: Option<String>,
    pub machine_id: String,
    /// When the provider created the machine. For a warm start (`startType` other than
    /// `cold`) that is when the reserve machine was made, before the session was requested.
    pub created_at: Option<DateTime<Utc>>,
    /// When the provider first reported the machine started. For `hot` and `suspended`
    /// starts that is the reserve machine's boot, before the session was requested.
    pub ready_at: Option<DateTime<Utc>>,
    pub ended_at: Option<DateTime<Utc>>,
    /// Seconds from the start request until the bot could talk (its machine started with the
    /// `env` handoff; its session delivered with `http`), queue included, as the start
    /// recorded it on the machine once it answered. Where the provider cannot relabel a
    /// machine (Cloud Run), or until the record is written, a machine created for the
    /// session (`cold`) gives its first start minus its creation (the provider's boot
    /// alone); a warm start's machine predates the request and gives `null`.
    pub bot_start_seconds: Option<f64>,
    /// Seconds the start waited for capacity (the admission queue), as the start recorded it
    /// on the machine once it answered; `null` where it is not recorded.
    pub queue_seconds: Option<f64>,
    /// How the session's machine came to it: `hot`, `suspended` or `stopped` (from the agent's
    /// reserve) or `cold` (created for it).
    #[schema(value_type = Option<String>, example = "hot")]
    pub start_type: Option<&'static str>,
    pub detail: Option<String>,
}

impl SessionView {
    /// The view of a session whose machine reads as `machine` (`None`: the provider no longer
    /// knows it).
    pub fn new(
        session_id: &str,
        provider: &'static str,
        handle: &str,
        machine: Option<MachineStatus>,
    ) -> Self {
        let Some(m) = machine else {
            return Self {
                session_id: session_id.to_owned(),
                status: "ended",
                provider,
                agent: None,
                region: None,
                machine_id: handle.to_owned(),
                created_at: None,
                ready_at: None,
                ended_at: None,
                bot_start_seconds: None,
                queue_seconds: None,
                start_type: None,
                detail: Some("the machine is gone".to_owned()),
            };
        };
        // A bot that refused its session after the handoff failed it, whatever its machine
        // does now.
        let status = match m.state {
            _ if m.failure.is_some() => "failed",
            MachineState::Starting => "starting",
            MachineState::Started => "ready",
            MachineState::Ended => "ended",
            MachineState::Failed => "failed",
        };
        let start = m.labels.as_ref().map(|l| l.start);
        let timings = m.labels.as_ref().and_then(|l| l.timings);
        let secs = |ms: u64| ms as f64 / 1000.0;
        // A warm start's machine was created (and, but for the stopped tier, started) before
        // the session was requested: its times say nothing of this session's start.
        let warm = start.is_some_and(|s| s != StartType::Cold);
        Self {
            session_id: session_id.to_owned(),
            status,
            start_type: start.map(StartType::as_str),
            provider,
            agent: m.labels.map(|l| l.agent).filter(|a| !a.is_empty()),
            region: m.region,
            machine_id: handle.to_owned(),
            bot_start_seconds: match (timings, m.created_at, m.started_at) {
                (Some(t), _, _) => Some(secs(t.ready_ms)),
                (None, Some(c), Some(s)) if !warm => {
                    Some(secs((s - c).num_milliseconds().max(0) as u64))
                }
                _ => None,
            },
            queue_seconds: timings.map(|t| secs(t.queue_ms)),
            created_at: m.created_at,
            ready_at: m.started_at,
            ended_at: m.ended_at,
            detail: m.failure.or(m.detail),
        }
    }
}
