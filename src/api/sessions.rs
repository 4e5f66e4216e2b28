//! `GET /sessions/{id}`, `DELETE /sessions/{id}` and its alias.

use axum::extract::State;
use axum::Json;
use serde::Serialize;

use super::ApiPath;
use crate::app::AppState;
use crate::auth::Caller;
use crate::error::{ApiError, ErrorBody};
use crate::sessions::SessionView;

/// What `DELETE /sessions/{id}` answers.
#[derive(Debug, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Stopped {
    pub session_id: String,
    /// Always `ended`.
    #[schema(example = "ended")]
    pub status: &'static str,
}

/// A session's state, read from the provider (any replica).
#[utoipa::path(get, path = "/sessions/{id}", tag = "sessions",
    params(("id" = String, Path, description = "The sessionId from /start")),
    responses(
        (status = 200, description = "The session", body = SessionView),
        (status = 401, description = "Missing or invalid token", body = ErrorBody),
        (status = 404, description = "No such session for this caller", body = ErrorBody),
    ),
    security(("bearer" = [])))]
pub async fn get(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath(id): ApiPath<String>,
) -> Result<Json<SessionView>, ApiError> {
    Ok(Json(state.sessions.get(&caller, &id).await?))
}

/// Stop the machine and delete the room. Idempotent.
#[utoipa::path(delete, path = "/sessions/{id}", tag = "sessions",
    params(("id" = String, Path, description = "The sessionId from /start")),
    responses(
        (status = 200, description = "Stopped (or already over)", body = Stopped),
        (status = 404, description = "No such session for this caller", body = ErrorBody),
        (status = 502, description = "The provider or Daily failed; retry", body = ErrorBody),
    ),
    security(("bearer" = [])))]
pub async fn delete(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath(id): ApiPath<String>,
) -> Result<Json<Stopped>, ApiError> {
    state.sessions.stop(&caller, &id).await?;
    Ok(Json(Stopped {
        session_id: id,
        status: "ended",
    }))
}

/// Pipecat-Cloud-compatible alias of `DELETE /sessions/{id}`.
#[utoipa::path(delete, path = "/v1/agents/{agent}/sessions/{id}", tag = "sessions",
    params(("agent" = String, Path, description = "Agent name (not checked)"),
        ("id" = String, Path, description = "The sessionId from /start")),
    responses(
        (status = 200, description = "Stopped (or already over)", body = Stopped),
        (status = 404, description = "No such session for this caller", body = ErrorBody),
    ),
    security(("bearer" = [])))]
pub async fn delete_alias(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath((_agent, id)): ApiPath<(String, String)>,
) -> Result<Json<Stopped>, ApiError> {
    delete(State(state), caller, ApiPath(id)).await
}
