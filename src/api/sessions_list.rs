//! `GET /sessions`: the caller's sessions, filtered and paginated.

use axum::extract::{Query, State};
use axum::http::Uri;
use axum::Json;

use crate::app::AppState;
use crate::auth::Caller;
use crate::error::{ApiError, ErrorBody};
use crate::sessions::{ListParams, SessionList};

/// The caller's sessions (all with `sessions:read_any`), filtered and paginated.
///
/// Newest first, each as `GET /sessions/{id}` shows it, from the provider's listing of this
/// deployment's machines: how far back ended sessions go depends on the provider (see the
/// README). Filters apply on every page; pass `nextCursor` as `cursor` for the next one.
#[utoipa::path(get, path = "/sessions", tag = "sessions",
    params(ListParams),
    responses(
        (status = 200, description = "One page of sessions", body = SessionList),
        (status = 400, description = "Invalid parameter or cursor", body = ErrorBody),
        (status = 401, description = "Missing or invalid token", body = ErrorBody),
        (status = 502, description = "The provider failed; retry", body = ErrorBody),
    ),
    security(("bearer" = [])))]
pub async fn list(
    State(state): State<AppState>,
    caller: Caller,
    uri: Uri,
) -> Result<Json<SessionList>, ApiError> {
    let Query(params) = Query::<ListParams>::try_from_uri(&uri)
        .map_err(|e| ApiError::bad_request(format!("invalid query: {}", e.body_text())))?;
    Ok(Json(state.sessions.list(&caller, params).await?))
}
