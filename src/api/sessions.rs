//! `GET /sessions/{id}`, `DELETE /sessions/{id}` and its alias.

use axum::extract::State;
use axum::Json;
use serde_json::{json, Value};

use super::ApiPath;
use crate::app::AppState;
use crate::auth::Caller;
use crate::error::ApiError;
use crate::sessions::SessionView;

pub async fn get(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath(id): ApiPath<String>,
) -> Result<Json<SessionView>, ApiError> {
    Ok(Json(state.sessions.get(&caller, &id).await?))
}

pub async fn delete(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath(id): ApiPath<String>,
) -> Result<Json<Value>, ApiError> {
    state.sessions.stop(&caller, &id).await?;
    Ok(Json(json!({ "sessionId": id, "status": "ended" })))
}

pub async fn delete_alias(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath((_agent, id)): ApiPath<(String, String)>,
) -> Result<Json<Value>, ApiError> {
    delete(State(state), caller, ApiPath(id)).await
}
