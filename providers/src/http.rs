//! HTTP plumbing shared by the JSON API clients (Fly, Cloud Run, and the service's Daily
//! client): sending, reading an error answer once in the API's own error shape, and turning
//! failures into secret-free messages.

use std::time::Duration;

use chrono::{DateTime, Utc};
use reqwest::{RequestBuilder, Response, StatusCode};

use crate::ProviderError;

/// Idle connections a client built by [`client_builder`] keeps per host.
pub const MAX_IDLE_PER_HOST: usize = 32;

/// The settings every outbound HTTP client of the service starts from: a connect timeout and
/// a bounded idle pool.
///
/// Bounded because each idle HTTP/1 connection keeps its buffers and dispatch channel (about
/// 25 KiB): unbounded, a burst of 1,000 starts leaves 1,000 idle connections to Daily and to
/// Fly for a minute after it. 32 idle per host cover steady traffic (20 starts/s make a few
/// concurrent calls per host); connections a burst opens beyond that close once answered.
pub fn client_builder() -> reqwest::ClientBuilder {
    reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(5))
        .pool_idle_timeout(Duration::from_secs(60))
        .pool_max_idle_per_host(MAX_IDLE_PER_HOST)
}

/// How one API spells its error answers.
#[derive(Debug, Clone, Copy)]
pub struct ErrorShape {
    /// Reads an error body; `None` when it is not in the API's error shape.
    pub parse: fn(&str) -> Option<ParsedError>,
    /// Error codes that mean "slow down" whatever the HTTP status.
    pub throttling_codes: &'static [&'static str],
}

/// What an error body says, in an API's own shape.
#[derive(Debug, Clone, Default)]
pub struct ParsedError {
    /// The API's error code, if it has one.
    pub code: Option<String>,
    pub message: String,
    /// A retry hint in the body (used when the answer has no `Retry-After`).
    pub retry_after: Option<Duration>,
}

impl ParsedError {
    pub fn message(message: impl Into<String>) -> Self {
        Self {
            message: message.into(),
            ..Self::default()
        }
    }
}

/// One failed HTTP call, before a client maps it onto its own error type.
#[derive(Debug)]
pub enum CallFailure {
    /// No usable answer: connection, timeout, or an unreadable body.
    Transport(reqwest::Error),
    /// An error answer.
    Answer(ErrorAnswer),
}

/// An error answer, read once.
#[derive(Debug, Clone)]
pub struct ErrorAnswer {
    pub status: StatusCode,
    /// The API's own error code, if it sent one (`RESOURCE_EXHAUSTED`, ...).
    pub code: Option<String>,
    /// The API's message, or the beginning of the body when it is not in the API's shape.
    pub message: String,
    pub retry_after: Option<Duration>,
    throttling: bool,
}

/// What a failure means for whoever made the call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureClass {
    /// Slow down, then try again.
    Throttled,
    /// The server failed or the answer was lost; the same call may succeed.
    Transient,
    /// The server refused the request; sending it again will not help.
    Refused,
}

impl ErrorAnswer {
    /// Reads a non-success answer's status, `Retry-After` and body.
    pub async fn read(resp: Response, shape: ErrorShape) -> Self {
        let status = resp.status();
        let retry_after = resp
            .headers()
            .get(reqwest::header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(parse_retry_after);
        let text = resp.text().await.unwrap_or_default();
        let parsed = (shape.parse)(&text)
            .unwrap_or_else(|| ParsedError::message(truncate(text.trim(), 200)));
        let throttling = parsed
            .code
            .as_deref()
            .is_some_and(|c| shape.throttling_codes.contains(&c));
        Self {
            status,
            code: parsed.code,
            message: parsed.message,
            retry_after: retry_after.or(parsed.retry_after),
            throttling,
        }
    }

    pub fn class(&self) -> FailureClass {
        if self.status == StatusCode::TOO_MANY_REQUESTS || self.throttling {
            FailureClass::Throttled
        } else if self.status.is_server_error() || self.status == StatusCode::REQUEST_TIMEOUT {
            FailureClass::Transient
        } else {
            FailureClass::Refused
        }
    }

    /// `{what}: HTTP {status} {code}: {message}`.
    pub fn describe(&self, what: &str) -> String {
        let code = self
            .code
            .as_deref()
            .filter(|c| !c.is_empty())
            .map(|c| format!(" {c}"))
            .unwrap_or_default();
        format!(
            "{what}: HTTP {}{code}: {}",
            self.status.as_u16(),
            self.message
        )
    }
}

impl CallFailure {
    /// A secret-free one-line description, prefixed with `what` the call was.
    pub fn describe(&self, what: &str) -> String {
        match self {
            Self::Transport(e) => format!("{what}: {}", transport_message(e)),
            Self::Answer(a) => a.describe(what),
        }
    }

    pub fn class(&self) -> FailureClass {
        match self {
            Self::Transport(_) => FailureClass::Transient,
            Self::Answer(a) => a.class(),
        }
    }

    /// The status of an error answer; `None` for a transport failure.
    pub fn status(&self) -> Option<StatusCode> {
        match self {
            Self::Transport(_) => None,
            Self::Answer(a) => Some(a.status),
        }
    }
}

/// Sends a request; a transport failure is a [`CallFailure::Transport`].
pub async fn send(req: RequestBuilder) -> Result<Response, CallFailure> {
    req.send().await.map_err(CallFailure::Transport)
}

/// The answer's JSON on success; otherwise the error answer, read in the API's shape.
pub async fn read_json<T: serde::de::DeserializeOwned>(
    resp: Response,
    shape: ErrorShape,
) -> Result<T, CallFailure> {
    if !resp.status().is_success() {
        return Err(CallFailure::Answer(ErrorAnswer::read(resp, shape).await));
    }
    resp.json().await.map_err(CallFailure::Transport)
}

/// Succeeds on any 2xx answer; otherwise the error answer.
pub async fn expect_success(resp: Response, shape: ErrorShape) -> Result<Response, CallFailure> {
    if resp.status().is_success() {
        Ok(resp)
    } else {
        Err(CallFailure::Answer(ErrorAnswer::read(resp, shape).await))
    }
}

impl ProviderError {
    /// The provider error a failed call of `what` stands for.
    pub fn from_call(provider: &'static str, what: &str, failure: CallFailure) -> Self {
        let message = failure.describe(what);
        match failure {
            CallFailure::Transport(e) => Self::Unavailable {
                provider,
                message,
                source: Some(Box::new(e)),
            },
            CallFailure::Answer(answer) => match answer.class() {
                FailureClass::Throttled => Self::Throttled {
                    provider,
                    retry_after: answer.retry_after,
                },
                FailureClass::Transient => Self::unavailable(provider, message),
                FailureClass::Refused => Self::Rejected {
                    provider,
                    status: answer.status.as_u16(),
                    message,
                },
            },
        }
    }
}

/// Characters left as they are in a URL path segment: RFC 3986's unreserved ones.
const SEGMENT: &percent_encoding::AsciiSet = &percent_encoding::NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

/// `value` as one URL path segment: `/`, `%`, `?`, `#` and the rest percent-encoded, and the
/// dot segments `.` and `..` refused (a URL parser would resolve them), so data can never
/// move a request to another path.
pub fn segment(value: &str) -> Result<String, String> {
    if value.is_empty() || value == "." || value == ".." {
        return Err(format!("{value:?} cannot be a URL path segment"));
    }
    Ok(percent_encoding::utf8_percent_encode(value, SEGMENT).to_string())
}

/// Reads a `Retry-After` value: either whole seconds or an HTTP-date (RFC 7231 §7.1.3).
/// Dates in the past give zero; garbage gives `None`.
pub fn parse_retry_after(value: &str) -> Option<Duration> {
    let value = value.trim();
    if let Ok(secs) = value.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let when = DateTime::parse_from_rfc2822(value)
        .ok()?
        .with_timezone(&Utc);
    Some((when - Utc::now()).to_std().unwrap_or(Duration::ZERO))
}

/// A short, secret-free description of a transport error (timeout, connection, decoding).
pub fn transport_message(e: &reqwest::Error) -> String {
    if e.is_timeout() {
        "timed out".to_owned()
    } else if e.is_connect() {
        "connection failed".to_owned()
    } else if e.is_decode() {
        "unreadable answer: invalid JSON".to_owned()
    } else {
        error_chain(e)
    }
}

/// An error and its sources, `: `-separated and cut to 300 characters, without `Debug` dumps
/// of requests or responses.
pub fn error_chain(err: &(dyn std::error::Error + 'static)) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(s) = source {
        text = format!("{text}: {s}");
        source = s.source();
    }
    truncate(&text, 300)
}

/// At most `max` characters of `text`, with `…` when cut.
pub fn truncate(text: &str, max: usize) -> String {
    match text.char_indices().nth(max) {
        Some((i, _)) => format!("{}…", &text[..i]),
        None => text.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_after_seconds_dates_and_garbage() {
        assert_eq!(parse_retry_after("7"), Some(Duration::from_secs(7)));
        assert_eq!(
            parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT"),
            Some(Duration::ZERO)
        );
        assert_eq!(parse_retry_after("soon"), None);
    }

    #[test]
    fn segments_cannot_leave_their_place() {
        assert_eq!(segment("148ed193b95089").unwrap(), "148ed193b95089");
        assert_eq!(segment("../x").unwrap(), "..%2Fx");
        assert_eq!(segment("a?b#c%d").unwrap(), "a%3Fb%23c%25d");
        assert!(segment("..").is_err() && segment(".").is_err() && segment("").is_err());
    }

    #[test]
    fn truncates_on_characters() {
        assert_eq!(truncate("héllo", 2), "hé…");
        assert_eq!(truncate("hé", 2), "hé");
    }
}
