//! The one API error type: it alone decides status codes and the JSON error shape
//! `{"error": "<code>", "detail": "<text>", "info": "<text>"}` (Pipecat clients show
//! `info ?? detail`). What a provider or Daily said never reaches a client: their errors get a
//! stable, generic text naming the request id, and the specifics are logged once where the
//! error is handled.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Serialize;

use crate::auth::AuthError;
use crate::rooms::RoomError;
use crate::sessions::SessionError;
use providers::ProviderError;

/// Retry hint sent with provider trouble that has no hint of its own.
const DEFAULT_RETRY_AFTER_SECS: u64 = 2;

#[derive(Debug, Clone)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub detail: String,
    pub retry_after: Option<u64>,
    /// The detail is generic: the response names the request id, so the specifics can be
    /// found in the log.
    refer_to_log: bool,
}

/// The one error shape. `detail` and `info` carry the same text: Pipecat clients show
/// `info ?? detail`.
#[derive(Serialize, utoipa::ToSchema)]
pub struct ErrorBody<'a> {
    /// A stable machine-readable code, e.g. `invalid_request`, `start_timeout`.
    #[schema(example = "invalid_request")]
    pub error: &'a str,
    /// What went wrong, for humans.
    pub detail: &'a str,
    /// The same text as `detail`.
    pub info: &'a str,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, detail: impl Into<String>) -> Self {
        Self {
            status,
            code,
            detail: detail.into(),
            retry_after: None,
            refer_to_log: false,
        }
    }

    /// An error whose specifics stay in the log: the client gets `detail` and the request id.
    pub fn upstream(status: StatusCode, code: &'static str, detail: &'static str) -> Self {
        Self {
            refer_to_log: true,
            ..Self::new(status, code, detail)
        }
    }

    /// The same error, naming the request it answers when it refers to the log.
    pub fn for_request(mut self, request_id: &str) -> Self {
        if self.refer_to_log {
            self.detail = format!("{} (request id {request_id})", self.detail);
            self.refer_to_log = false;
        }
        self
    }

    pub fn bad_request(detail: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "invalid_request", detail)
    }

    pub fn not_found(detail: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "not_found", detail)
    }

    pub fn retry_after(mut self, secs: u64) -> Self {
        self.retry_after = Some(secs.max(1));
        self
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = ErrorBody {
            error: self.code,
            detail: &self.detail,
            info: &self.detail,
        };
        let mut response = (self.status, axum::Json(body)).into_response();
        if self.refer_to_log {
            // The router's outer layer renders it again with the request id.
            response.extensions_mut().insert(self.clone());
        }
        if let Some(secs) = self.retry_after {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        if self.status == StatusCode::UNAUTHORIZED {
            response
                .headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        response
    }
}

impl From<AuthError> for ApiError {
    fn from(e: AuthError) -> Self {
        Self::new(StatusCode::UNAUTHORIZED, "unauthorized", e.to_string())
    }
}

fn secs(d: Option<std::time::Duration>) -> u64 {
    d.map(|d| d.as_secs_f64().ceil() as u64)
        .unwrap_or(DEFAULT_RETRY_AFTER_SECS)
}

impl From<ProviderError> for ApiError {
    fn from(e: ProviderError) -> Self {
        use StatusCode as S;
        match e {
            ProviderError::Throttled { retry_after, .. } => Self::upstream(
                S::SERVICE_UNAVAILABLE,
                "provider_throttled",
                "the machine provider is throttling requests; try again later",
            )
            .retry_after(secs(retry_after)),
            ProviderError::Timeout { .. } => Self::upstream(
                S::GATEWAY_TIMEOUT,
                "start_timeout",
                "the bot machine did not start in time",
            )
            .retry_after(DEFAULT_RETRY_AFTER_SECS),
            ProviderError::Unavailable { .. } => Self::upstream(
                S::BAD_GATEWAY,
                "provider_unavailable",
                "the machine provider is unavailable; try again",
            )
            .retry_after(DEFAULT_RETRY_AFTER_SECS),
            ProviderError::StartFailed { .. } => Self::upstream(
                S::BAD_GATEWAY,
                "bot_start_failed",
                "the bot machine failed to start",
            ),
            ProviderError::Rejected { .. }
            | ProviderError::Conflict { .. }
            | ProviderError::Config { .. } => Self::upstream(
                S::BAD_GATEWAY,
                "provider_error",
                "the machine provider refused the request",
            ),
        }
    }
}

impl From<RoomError> for ApiError {
    fn from(e: RoomError) -> Self {
        use StatusCode as S;
        match e {
            RoomError::Throttled { retry_after } => Self::upstream(
                S::SERVICE_UNAVAILABLE,
                "rooms_throttled",
                "Daily is throttling requests; try again later",
            )
            .retry_after(secs(retry_after)),
            RoomError::Unavailable { .. } => Self::upstream(
                S::BAD_GATEWAY,
                "rooms_unavailable",
                "Daily is unavailable; try again",
            )
            .retry_after(DEFAULT_RETRY_AFTER_SECS),
            RoomError::Rejected { .. } | RoomError::AlreadyExists(_) | RoomError::Token(_) => {
                Self::upstream(S::BAD_GATEWAY, "rooms_error", "Daily refused the request")
            }
        }
    }
}

impl From<crate::capacity::CapacityError> for ApiError {
    fn from(e: crate::capacity::CapacityError) -> Self {
        let code = match e {
            crate::capacity::CapacityError::CallerRate { .. } => "rate_limited",
            crate::capacity::CapacityError::Busy { .. } => "busy",
            crate::capacity::CapacityError::Full { .. } => "at_capacity",
            crate::capacity::CapacityError::QueueFull { .. } => "queue_full",
        };
        Self::new(StatusCode::TOO_MANY_REQUESTS, code, e.to_string()).retry_after(e.retry_after())
    }
}

impl From<SessionError> for ApiError {
    fn from(e: SessionError) -> Self {
        let detail = e.to_string();
        match e {
            SessionError::Invalid(_) => Self::bad_request(detail),
            SessionError::TooLarge(_) => {
                Self::new(StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large", detail)
            }
            SessionError::UnknownAgent(_) => {
                Self::new(StatusCode::NOT_FOUND, "unknown_agent", detail)
            }
            SessionError::AgentForbidden(_) => {
                Self::new(StatusCode::FORBIDDEN, "forbidden", detail)
            }
            SessionError::NotFound => Self::new(StatusCode::NOT_FOUND, "session_not_found", detail),
            SessionError::StartTimeout(_) => {
                Self::new(StatusCode::GATEWAY_TIMEOUT, "start_timeout", detail)
                    .retry_after(DEFAULT_RETRY_AFTER_SECS)
            }
            SessionError::ShuttingDown => {
                Self::new(StatusCode::SERVICE_UNAVAILABLE, "shutting_down", detail).retry_after(1)
            }
            SessionError::IdempotencyKeyUsed => {
                Self::new(StatusCode::CONFLICT, "idempotency_key_used", detail)
            }
            SessionError::Capacity(e) => e.into(),
            SessionError::Handoff(crate::handoff::HandoffError::NotReady(_)) => Self::upstream(
                StatusCode::GATEWAY_TIMEOUT,
                "start_timeout",
                "the bot was not ready in time",
            )
            .retry_after(DEFAULT_RETRY_AFTER_SECS),
            SessionError::Handoff(_) => Self::upstream(
                StatusCode::BAD_GATEWAY,
                "bot_start_failed",
                "the bot did not take the session",
            ),
            SessionError::Provider(e) => e.into(),
            SessionError::Room(e) => e.into(),
            SessionError::Internal => {
                Self::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", detail)
            }
            // Nobody reads this answer; the status is for access logs.
            SessionError::ClientGone => Self::new(
                StatusCode::from_u16(499).unwrap_or(StatusCode::BAD_REQUEST),
                "client_closed_request",
                detail,
            ),
        }
    }
}
