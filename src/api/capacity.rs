//! `GET /capacity`: what this replica counts — sessions live and starting per agent, the
//! agents' reserves by tier and state, the queue, the limit. For operators and client back-ends
//! deciding whether to start now; any authenticated caller may read it (it names agents and
//! counts, nothing of any session).

use std::collections::BTreeMap;

use axum::extract::State;
use axum::Json;
use serde::Serialize;

use crate::app::AppState;
use crate::auth::Caller;
use crate::error::{ApiError, ErrorBody};

/// The whole answer.
#[derive(Debug, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct CapacityView {
    /// `max_sessions`: sessions at once across replicas.
    pub limit: u32,
    /// Sessions live or starting, as this replica counts them (the provider's last listing plus
    /// its own starts).
    pub sessions: usize,
    /// How long a start waits for a slot before its 429 (0: no queue).
    pub queue_timeout_secs: u64,
    pub agents: BTreeMap<String, AgentView>,
}

/// One agent.
#[derive(Debug, Default, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct AgentView {
    pub live: usize,
    /// Starts in flight on this replica.
    pub starting: usize,
    /// Starts waiting in this replica's queue.
    pub queued: usize,
    pub reserve: Option<ReserveView>,
}

/// An agent's reserve, as last listed.
#[derive(Debug, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct ReserveView {
    /// `hot`, `suspended` or `stopped`.
    #[schema(value_type = String, example = "hot")]
    pub tier: &'static str,
    /// Machines it keeps: unclaimed ones, and with `recycle` those in a session or recycling.
    pub size: u32,
    /// Machines go back into the reserve after their session (a fresh boot).
    pub recycle: bool,
    pub ready: usize,
    pub preparing: usize,
    /// Recycled machines running a session (0 without `recycle`).
    pub in_session: usize,
    /// Recycled machines whose session is over, waiting to boot again (0 without `recycle`).
    pub recycling: usize,
    /// Rooms created ahead in this replica's pool.
    pub pooled_rooms: usize,
}

/// This replica's view of capacity.
#[utoipa::path(get, path = "/capacity", tag = "operations",
    responses(
        (status = 200, description = "Counts by agent", body = CapacityView),
        (status = 401, description = "Missing or invalid token", body = ErrorBody),
    ),
    security(("bearer" = [])))]
pub async fn get(
    State(state): State<AppState>,
    _caller: Caller,
) -> Result<Json<CapacityView>, ApiError> {
    let (limit, sessions, counts) = state.sessions.capacity().counts();
    let mut agents: BTreeMap<String, AgentView> = state
        .config
        .agents
        .keys()
        .map(|a| (a.clone(), AgentView::default()))
        .collect();
    for (agent, c) in counts {
        let view = agents.entry(agent).or_default();
        view.live = c.live;
        view.starting = c.starting;
        view.queued = c.queued;
    }
    if let Some(reserves) = state.sessions.reserves() {
        for r in reserves.summary() {
            if let Some(view) = agents.get_mut(&r.agent) {
                view.reserve = Some(ReserveView {
                    tier: r.tier.as_str(),
                    size: r.size,
                    recycle: r.recycle,
                    ready: r.ready,
                    preparing: r.preparing,
                    in_session: r.in_session,
                    recycling: r.recycling,
                    pooled_rooms: r.pooled_rooms,
                });
            }
        }
    }
    Ok(Json(CapacityView {
        limit,
        sessions,
        queue_timeout_secs: state.config.queue_timeout_secs,
        agents,
    }))
}
