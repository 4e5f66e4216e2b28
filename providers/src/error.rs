//! [`ProviderError`]: what every provider maps its own failures into. The service decides status
//! codes from the variant; the text is for logs (it never carries credentials).

use std::time::Duration;

/// A boxed cause, kept as the error's `source()`.
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

#[derive(Debug, thiserror::Error)]
pub enum ProviderError {
    /// The provider refused the request (bad image, quota, invalid settings), or the request
    /// was refused here because the provider would refuse it: sending it again will not help.
    /// `status` is the provider's HTTP status (400 for a refusal decided before sending, 200
    /// for APIs that report refusals in a successful answer).
    #[error("{provider} refused the request: {message}")]
    Rejected {
        provider: &'static str,
        status: u16,
        message: String,
    },
    /// The provider throttled the call (429 or its own throttling code), or the outbound rate
    /// limit would not let the call through before its deadline. Try again after the hint.
    #[error("{provider} is throttling requests")]
    Throttled {
        provider: &'static str,
        retry_after: Option<Duration>,
    },
    /// The provider failed (5xx), did not answer in time, could not be reached, or answered
    /// something unreadable. The same call may succeed if made again. `source` is the transport
    /// error, when there was one.
    #[error("{provider} is unavailable: {message}")]
    Unavailable {
        provider: &'static str,
        message: String,
        #[source]
        source: Option<BoxError>,
    },
    /// The machine did not reach the wanted state before the deadline.
    #[error("{provider} machine did not start before the deadline")]
    Timeout { provider: &'static str },
    /// The machine reached a state from which it cannot start any more (it failed, exited or
    /// disappeared while starting); `message` says why, in the provider's words.
    #[error("{provider} machine failed to start: {message}")]
    StartFailed {
        provider: &'static str,
        message: String,
    },
    /// A machine of this name exists already: a retried or duplicated create. The resilient
    /// wrapper resolves it by adopting the session's machine.
    #[error("{provider} machine {name} already exists")]
    Conflict {
        provider: &'static str,
        name: String,
    },
    /// The provider's settings cannot work (missing credentials, bad URL, unreadable key
    /// file); `source` is the underlying error, when there was one.
    #[error("{provider} is misconfigured: {message}")]
    Config {
        provider: &'static str,
        message: String,
        #[source]
        source: Option<BoxError>,
    },
}

impl ProviderError {
    /// A refusal decided here, before any request (status 400, as the provider would answer).
    pub fn rejected(provider: &'static str, message: impl Into<String>) -> Self {
        Self::Rejected {
            provider,
            status: 400,
            message: message.into(),
        }
    }

    /// A failure without an underlying error value.
    pub fn unavailable(provider: &'static str, message: impl Into<String>) -> Self {
        Self::Unavailable {
            provider,
            message: message.into(),
            source: None,
        }
    }

    pub fn config(provider: &'static str, message: impl Into<String>) -> Self {
        Self::Config {
            provider,
            message: message.into(),
            source: None,
        }
    }

    /// A short stable name of the error's kind, for metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Rejected { .. } => "rejected",
            Self::Throttled { .. } => "throttled",
            Self::Unavailable { .. } => "unavailable",
            Self::Timeout { .. } => "timeout",
            Self::StartFailed { .. } => "start_failed",
            Self::Conflict { .. } => "conflict",
            Self::Config { .. } => "config",
        }
    }

    /// Whether the same call may succeed if retried.
    pub fn is_transient(&self) -> bool {
        matches!(self, Self::Throttled { .. } | Self::Unavailable { .. })
    }

    /// Whether a create that failed this way may have happened anyway (the answer was lost, or
    /// the name is taken): the session's machine must be looked for before anything else.
    pub fn is_ambiguous_create(&self) -> bool {
        matches!(self, Self::Unavailable { .. } | Self::Conflict { .. })
    }
}
