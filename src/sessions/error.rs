//! [`SessionError`]: why a start, read or stop did not happen. The HTTP layer maps each variant
//! to a status code (`crate::error`).

use providers::ProviderError;

use crate::capacity::CapacityError;
use crate::rooms::RoomError;

#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    /// The request is malformed or asks for something not allowed (400).
    #[error("{0}")]
    Invalid(String),
    /// The bot `body` is larger than allowed (413).
    #[error("{0}")]
    TooLarge(String),
    /// No such agent is configured (404).
    #[error("no agent named {0:?} is configured")]
    UnknownAgent(String),
    /// The caller's token may not start this agent (403).
    #[error("this token may not start agent {0:?}")]
    AgentForbidden(String),
    /// No such session, or not the caller's (404: existence is not revealed).
    #[error("no such session")]
    NotFound,
    /// Refused before anything was created: capacity, in-flight starts or the caller's rate.
    #[error(transparent)]
    Capacity(#[from] CapacityError),
    /// The machine did not start within the start timeout (504).
    #[error("the bot machine did not start within {0} s")]
    StartTimeout(u64),
    /// The provider refused, failed or throttled.
    #[error(transparent)]
    Provider(#[from] ProviderError),
    /// Daily refused, failed or throttled.
    #[error(transparent)]
    Room(#[from] RoomError),
    /// The bot did not take the session over HTTP (no machine was ready in time, or its bot
    /// refused the session).
    #[error("the bot did not take the session: {0}")]
    Handoff(#[from] crate::handoff::HandoffError),
    /// The client disconnected before the start finished; what it created was cleaned up.
    #[error("the client went away before the session started")]
    ClientGone,
    /// The dispatcher is shutting down and refuses (or gave up on) the start.
    #[error("the dispatcher is shutting down; try again")]
    ShuttingDown,
    /// The Idempotency-Key's session ran and is over.
    #[error("this Idempotency-Key belongs to a session that has ended; use a new key")]
    IdempotencyKeyUsed,
    /// The start task panicked (a bug); what it created is cleaned up in the background.
    #[error("internal error")]
    Internal,
}

impl SessionError {
    /// A short stable name for metrics.
    pub fn outcome(&self) -> &'static str {
        match self {
            Self::Invalid(_) | Self::TooLarge(_) => "invalid",
            Self::UnknownAgent(_) | Self::AgentForbidden(_) | Self::NotFound => "refused",
            Self::Capacity(e) => e.reason(),
            Self::StartTimeout(_) => "timeout",
            Self::Provider(ProviderError::Throttled { .. }) => "provider_throttled",
            Self::Provider(ProviderError::Timeout { .. }) => "timeout",
            Self::Provider(ProviderError::StartFailed { .. }) => "bot_start_failed",
            Self::Provider(_) => "provider_error",
            Self::Room(_) => "room_error",
            Self::Handoff(crate::handoff::HandoffError::NotReady(_)) => "timeout",
            Self::Handoff(_) => "bot_start_failed",
            Self::ClientGone => "client_gone",
            Self::ShuttingDown => "shutting_down",
            Self::IdempotencyKeyUsed => "idempotency_conflict",
            Self::Internal => "internal",
        }
    }
}
