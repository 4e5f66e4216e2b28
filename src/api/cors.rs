//! CORS for browser clients, opt-in: with `cors_allowed_origins` set, a web app on one of those
//! origins may call the API directly with a bearer token its backend minted. Unset, nothing
//! changes: no CORS headers, and a preflight `OPTIONS` is an ordinary 405.
//!
//! Bearer tokens travel in `Authorization`, never in cookies, so credentials mode stays off: an
//! allowed origin gains nothing a page without the token could use.

use std::time::Duration;

use axum::extract::{Request, State};
use axum::http::{header, HeaderName, Method};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use tower::{Layer, ServiceExt};
use tower_http::cors::{AllowOrigin, CorsLayer};

/// Browsers may reuse a preflight answer this long (Chromium caps it at 2 h), so a web app's
/// `/start` pays the extra round trip once, not on every start.
const PREFLIGHT_MAX_AGE: Duration = Duration::from_secs(7200);

/// The CORS policy for `origins` (validated by the configuration), or `None` when empty.
pub fn allow_list(origins: &[String]) -> Option<CorsLayer> {
    if origins.is_empty() {
        return None;
    }
    let allow_origin = if origins.iter().any(|o| o == "*") {
        AllowOrigin::any()
    } else {
        AllowOrigin::list(origins.iter().filter_map(|o| o.parse().ok()))
    };
    Some(
        CorsLayer::new()
            .allow_origin(allow_origin)
            .allow_methods([Method::GET, Method::POST, Method::DELETE])
            .allow_headers([
                header::AUTHORIZATION,
                header::CONTENT_TYPE,
                HeaderName::from_static("idempotency-key"),
                HeaderName::from_static("x-request-id"),
            ])
            // What a client reads besides the body: the request id (to quote in a support
            // ticket) and Retry-After on 429/503.
            .expose_headers([HeaderName::from_static("x-request-id"), header::RETRY_AFTER])
            .max_age(PREFLIGHT_MAX_AGE),
    )
}

/// Middleware: applies the policy when one is configured, else passes the request through.
pub async fn apply(State(cors): State<Option<CorsLayer>>, req: Request, next: Next) -> Response {
    match cors {
        None => next.run(req).await,
        Some(cors) => match cors.layer(next).oneshot(req).await {
            Ok(resp) => resp.into_response(),
            Err(never) => match never {},
        },
    }
}
