//! The HTTP layer: routes, extractors that answer in the project's error shape, and the fallback.
//! Handlers are thin: parse, call [`crate::sessions`], map errors.

mod capacity;
mod cors;
mod health;
pub mod openapi;
mod proxy;
mod sessions;
mod sessions_list;
mod start;

use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, FromRequest, FromRequestParts, Request};
use axum::http::request::Parts;
use axum::http::{header, Method, StatusCode, Uri};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{any, delete, get, post};
use axum::Extension;
use axum::Router;
use bytes::Bytes;
use serde::de::DeserializeOwned;
use std::time::Duration;

use axum::extract::MatchedPath;
use tower_http::request_id::{MakeRequestUuid, PropagateRequestIdLayer, SetRequestIdLayer};
use tower_http::trace::{DefaultOnResponse, TraceLayer};
use tower_http::LatencyUnit;
use tracing::{Level, Span};

use crate::app::AppState;
use crate::auth::Caller;
use crate::error::ApiError;
use crate::sessions::MAX_BODY_BYTES;

const X_REQUEST_ID: &str = "x-request-id";

/// Whole request bodies may exceed the bot `body` limit by this much (the other fields).
const REQUEST_OVERHEAD_BYTES: usize = 16 * 1024;

/// The whole HTTP API; `main` and the tests both call this.
pub fn build_router(state: AppState) -> Router {
    let proxy = Extension(proxy::ProxyClient::new().expect("the session proxy's client builds"));
    Router::new()
        .route("/start", post(start::start))
        .route("/v1/public/{agent}/start", post(start::start_agent))
        .route(
            "/sessions/{id}",
            get(sessions::get).delete(sessions::delete),
        )
        .route(
            "/v1/agents/{agent}/sessions/{id}",
            delete(sessions::delete_alias),
        )
        .route("/sessions", get(sessions_list::list))
        .route(
            "/sessions/{id}/proxy/{*path}",
            any(proxy::session).layer(proxy.clone()),
        )
        .route(
            "/v1/public/{agent}/sessions/{id}/{*path}",
            any(proxy::pipecat).layer(proxy),
        )
        .route("/capacity", get(capacity::get))
        .route("/healthz", get(health::healthz))
        .route("/readyz", get(health::readyz))
        .route("/metrics", get(health::metrics))
        .route("/openapi.json", get(openapi::serve))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(
            MAX_BODY_BYTES + REQUEST_OVERHEAD_BYTES,
        ))
        .layer(Extension(BodyDeadline(Duration::from_secs(
            state.config.body_read_timeout_secs,
        ))))
        .layer(middleware::from_fn(errors_name_their_request))
        // Outermost last: a client's request id is kept only when it is safe to log and echo,
        // a request id is set, the request span carries it, and the response echoes it in
        // `x-request-id`.
        .layer(PropagateRequestIdLayer::x_request_id())
        .layer(
            TraceLayer::new_for_http()
                .make_span_with(request_span)
                .on_request(())
                .on_response(
                    DefaultOnResponse::new()
                        .level(Level::INFO)
                        .latency_unit(LatencyUnit::Millis),
                )
                // Failures are logged once, where they are handled.
                .on_failure(()),
        )
        .layer(SetRequestIdLayer::x_request_id(MakeRequestUuid))
        .layer(middleware::from_fn(drop_unsafe_request_ids))
        .layer(middleware::from_fn_with_state(
            cors::allow_list(&state.config.cors_allowed_origins),
            cors::apply,
        ))
        .with_state(state)
}

/// A client's `x-request-id` is kept (logged, echoed) only when it is 1 to 64 characters of
/// `[A-Za-z0-9._-]`; anything else is dropped and a fresh id generated.
async fn drop_unsafe_request_ids(mut req: Request, next: Next) -> Response {
    let safe = |v: &[u8]| {
        (1..=64).contains(&v.len())
            && v.iter()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
    };
    if req
        .headers()
        .get(X_REQUEST_ID)
        .is_some_and(|v| !safe(v.as_bytes()))
    {
        req.headers_mut().remove(X_REQUEST_ID);
    }
    next.run(req).await
}

/// Errors whose specifics stay in the log answer with the request id, so that an operator can
/// find them.
async fn errors_name_their_request(req: Request, next: Next) -> Response {
    let request_id = req
        .headers()
        .get(X_REQUEST_ID)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let mut resp = next.run(req).await;
    match (resp.extensions_mut().remove::<ApiError>(), request_id) {
        (Some(error), Some(id)) => error.for_request(&id).into_response(),
        _ => resp,
    }
}

/// How long a client may take to send its whole request body.
#[derive(Debug, Clone, Copy)]
struct BodyDeadline(Duration);

/// One span per request: method, route template (never the raw path: it holds session ids),
/// and the request id.
fn request_span(req: &axum::http::Request<axum::body::Body>) -> Span {
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map_or("unmatched", MatchedPath::as_str);
    let request_id = req
        .headers()
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    tracing::info_span!("request", method = %req.method(), route, request.id = %request_id)
}

async fn not_found(method: Method, uri: Uri) -> ApiError {
    ApiError::not_found(format!("no route for {method} {}", uri.path()))
}

async fn method_not_allowed(method: Method, uri: Uri) -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        format!("{method} is not allowed on {}", uri.path()),
    )
}

/// JSON body extractor whose rejections use the project's error shape. An empty body reads as
/// `{}` (every start field is optional); a non-JSON content type is refused.
pub struct ApiJson<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for ApiJson<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        if let Some(ct) = req.headers().get(header::CONTENT_TYPE) {
            let ct = ct.to_str().unwrap_or_default().to_ascii_lowercase();
            let essence = ct.split(';').next().unwrap_or_default().trim();
            if !(essence == "application/json" || essence.ends_with("+json")) {
                return Err(ApiError::new(
                    StatusCode::UNSUPPORTED_MEDIA_TYPE,
                    "unsupported_media_type",
                    format!("send the body as application/json, not {essence:?}"),
                ));
            }
        }
        // One deadline for the whole body, however slowly it trickles in (a timeout reset by
        // every frame would let one byte every few seconds hold the request for ever).
        let deadline = req
            .extensions()
            .get::<BodyDeadline>()
            .map_or(Duration::from_secs(10), |d| d.0);
        let body_timeout = || {
            ApiError::new(
                StatusCode::REQUEST_TIMEOUT,
                "request_timeout",
                "the request body did not arrive in time",
            )
        };
        let bytes = tokio::time::timeout(deadline, Bytes::from_request(req, state))
            .await
            .map_err(|_| body_timeout())?
            .map_err(|e: BytesRejection| {
                if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
                    ApiError::new(
                        StatusCode::PAYLOAD_TOO_LARGE,
                        "payload_too_large",
                        format!(
                            "request body is larger than {} bytes",
                            MAX_BODY_BYTES + REQUEST_OVERHEAD_BYTES
                        ),
                    )
                } else {
                    ApiError::bad_request(format!("cannot read the request body: {e}"))
                }
            })?;
        let bytes: &[u8] = if bytes.iter().all(u8::is_ascii_whitespace) {
            b"{}"
        } else {
            &bytes
        };
        serde_json::from_slice(bytes)
            .map(ApiJson)
            .map_err(|e| ApiError::bad_request(format!("invalid JSON body: {e}")))
    }
}

/// Path extractor whose rejections use the project's error shape.
pub struct ApiPath<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned + Send> FromRequestParts<S> for ApiPath<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        axum::extract::Path::<T>::from_request_parts(parts, state)
            .await
            .map(|p| ApiPath(p.0))
            .map_err(|e| ApiError::bad_request(format!("invalid path: {e}")))
    }
}

/// The authenticated caller, from the `Authorization: Bearer` header.
impl FromRequestParts<AppState> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let header = parts
            .headers
            .get(header::AUTHORIZATION)
            .map(|v| v.to_str().unwrap_or("\u{0}"));
        Ok(state.auth.authenticate(header)?)
    }
}
