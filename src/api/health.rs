//! `GET /healthz` (liveness, no I/O) and `GET /readyz` (cached provider and rooms check).

use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;
use serde_json::{json, Value};

use crate::app::AppState;
use crate::error::ApiError;

pub async fn healthz() -> Json<Value> {
    Json(json!({ "status": "ok" }))
}

pub async fn readyz(State(state): State<AppState>) -> Result<Json<Value>, ApiError> {
    state.readiness().await.map_err(|detail| {
        ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "not_ready", detail).retry_after(10)
    })?;
    Ok(Json(json!({
        "status": "ready",
        "provider": state.sessions.provider().name(),
        "rooms": state.sessions.rooms().kind(),
    })))
}
