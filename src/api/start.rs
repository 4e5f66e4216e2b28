//! `POST /start` and `POST /v1/public/{agent}/start`.

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Serialize;

use super::{ApiJson, ApiPath};
use crate::app::AppState;
use crate::auth::Caller;
use crate::error::{ApiError, ErrorBody};
use crate::sessions::{StartRequest, Started};

/// Every spelling a Pipecat client reads: `dailyRoom`/`dailyToken` (Pipecat Cloud, client-js),
/// `room_url`/`token` (older examples), `sessionId` (SmallWebRTC).
#[derive(Debug, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct StartResponse {
    pub session_id: String,
    pub daily_room: Option<String>,
    pub daily_token: Option<String>,
    #[serde(rename = "room_url")]
    pub room_url: Option<String>,
    #[serde(rename = "token")]
    pub token: Option<String>,
    /// `ready` (200) or `starting` (202).
    #[schema(value_type = String, example = "ready")]
    pub status: &'static str,
    pub status_url: String,
    /// How the session's machine came to it: `hot`, `suspended` or `stopped` (taken from the
    /// agent's reserve) or `cold` (created for it). With `wait: false`, what was chosen so far.
    #[schema(value_type = String, example = "hot")]
    pub start_type: &'static str,
    /// How long the start waited for capacity (`queue_timeout_secs`), in seconds.
    pub queue_seconds: f64,
}

impl From<Started> for StartResponse {
    fn from(s: Started) -> Self {
        Self {
            status_url: format!("/sessions/{}", s.session_id),
            session_id: s.session_id,
            daily_room: s.room_url.clone(),
            daily_token: s.user_token.clone(),
            room_url: s.room_url,
            token: s.user_token,
            status: if s.ready { "ready" } else { "starting" },
            start_type: s.start_type.as_str(),
            queue_seconds: (s.queued.as_secs_f64() * 1000.0).round() / 1000.0,
        }
    }
}

/// Start a session with the default agent.
#[utoipa::path(post, path = "/start", tag = "sessions", request_body = StartRequest,
    params(("Idempotency-Key" = Option<String>, Header, description = "Repeats of the same start (same caller and key) return the same session")),
    responses(
        (status = 200, description = "The machine is started", body = StartResponse),
        (status = 202, description = "Launched; poll statusUrl (wait: false)", body = StartResponse),
        (status = 400, description = "Invalid request", body = ErrorBody),
        (status = 401, description = "Missing or invalid token", body = ErrorBody),
        (status = 403, description = "The token may not start this agent", body = ErrorBody),
        (status = 404, description = "Unknown agent", body = ErrorBody),
        (status = 409, description = "The Idempotency-Key's session has ended", body = ErrorBody),
        (status = 413, description = "Body too large", body = ErrorBody),
        (status = 429, description = "At capacity or rate limited (Retry-After)", body = ErrorBody),
        (status = 502, description = "The provider or Daily refused or failed", body = ErrorBody),
        (status = 503, description = "Throttled or shutting down (Retry-After)", body = ErrorBody),
        (status = 504, description = "The machine did not start in time", body = ErrorBody),
    ),
    security(("bearer" = [])))]
pub async fn start(
    State(state): State<AppState>,
    caller: Caller,
    headers: HeaderMap,
    ApiJson(req): ApiJson<StartRequest>,
) -> Result<Response, ApiError> {
    run(state, caller, None, &headers, req).await
}

/// Start a session with the named agent (Pipecat Cloud compatible path).
#[utoipa::path(post, path = "/v1/public/{agent}/start", tag = "sessions", request_body = StartRequest,
    params(("agent" = String, Path, description = "Agent (bot profile) name"),
        ("Idempotency-Key" = Option<String>, Header, description = "Repeats of the same start return the same session")),
    responses(
        (status = 200, description = "The machine is started", body = StartResponse),
        (status = 202, description = "Launched; poll statusUrl (wait: false)", body = StartResponse),
        (status = 400, description = "Invalid request", body = ErrorBody),
        (status = 401, description = "Missing or invalid token", body = ErrorBody),
        (status = 403, description = "The token may not start this agent", body = ErrorBody),
        (status = 404, description = "Unknown agent", body = ErrorBody),
        (status = 409, description = "The Idempotency-Key's session has ended", body = ErrorBody),
        (status = 413, description = "Body too large", body = ErrorBody),
        (status = 429, description = "At capacity or rate limited (Retry-After)", body = ErrorBody),
        (status = 502, description = "The provider or Daily refused or failed", body = ErrorBody),
        (status = 503, description = "Throttled or shutting down (Retry-After)", body = ErrorBody),
        (status = 504, description = "The machine did not start in time", body = ErrorBody),
    ),
    security(("bearer" = [])))]
pub async fn start_agent(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath(agent): ApiPath<String>,
    headers: HeaderMap,
    ApiJson(req): ApiJson<StartRequest>,
) -> Result<Response, ApiError> {
    run(state, caller, Some(agent), &headers, req).await
}

async fn run(
    state: AppState,
    caller: Caller,
    agent: Option<String>,
    headers: &HeaderMap,
    req: StartRequest,
) -> Result<Response, ApiError> {
    let idempotency_key = headers.get("idempotency-key").map(|v| v.as_bytes());
    let started = state
        .sessions
        .start(&caller, agent.as_deref(), idempotency_key, req)
        .await?;
    let status = if started.ready {
        StatusCode::OK
    } else {
        StatusCode::ACCEPTED
    };
    Ok((status, Json(StartResponse::from(started))).into_response())
}
