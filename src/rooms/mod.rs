//! Rooms and meeting tokens: the [`RoomService`] trait, Daily's implementation, and local
//! development rooms. Tokens are minted locally (Daily self-signed JWTs), never with an API call.

pub mod daily;
pub mod local;
pub mod resilient;

use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use providers::retry::{RateLimit, Transient};
use providers::BoxError;
use serde::Serialize;
use serde_json::{Map, Value};

/// Room properties a client may set in `dailyRoomProperties`. Expiry and eject settings are the
/// dispatcher's: they are what guarantees that no room outlives its session.
pub const CLIENT_ROOM_PROPERTIES: &[&str] = &[
    "enable_recording",
    "start_video_off",
    "start_audio_off",
    "enable_chat",
    "enable_screenshare",
    "enable_prejoin_ui",
    "enable_knocking",
    "enable_people_ui",
    "max_participants",
    "lang",
    "geo",
    "enable_dialout",
    "sip",
    "enable_transcription_storage",
];

/// User-token properties a client may set in `dailyMeetingTokenProperties`, with the claim each
/// becomes in a self-signed token.
pub const CLIENT_TOKEN_PROPERTIES: &[(&str, &str)] = &[
    ("user_name", "u"),
    ("user_id", "ud"),
    ("start_video_off", "vo"),
    ("start_audio_off", "ao"),
    ("enable_screenshare", "ss"),
];

#[derive(Debug, thiserror::Error)]
pub enum RoomError {
    /// Daily refused (bad property, bad key). Retrying will not help.
    #[error("Daily refused the request: {message}")]
    Rejected { status: u16, message: String },
    /// A room of this name exists already (an earlier attempt of the same session); the
    /// resilient wrapper adopts it.
    #[error("a room named {0} already exists")]
    AlreadyExists(String),
    /// Daily throttled the call, or the outbound rate limit would not let it through in time.
    #[error("Daily is throttling requests")]
    Throttled { retry_after: Option<Duration> },
    /// Daily failed (5xx), did not answer in time, could not be reached, or answered
    /// something unreadable; the call may be retried. `source` is the transport error, if any.
    #[error("Daily is unavailable: {message}")]
    Unavailable {
        message: String,
        #[source]
        source: Option<BoxError>,
    },
    /// A meeting token could not be signed.
    #[error("cannot sign the meeting token")]
    Token(#[source] jsonwebtoken::errors::Error),
}

impl RoomError {
    pub fn unavailable(message: impl Into<String>) -> Self {
        Self::Unavailable {
            message: message.into(),
            source: None,
        }
    }
}

impl Transient for RoomError {
    fn is_transient(&self) -> bool {
        matches!(self, Self::Throttled { .. } | Self::Unavailable { .. })
    }

    fn retry_after(&self) -> Option<Duration> {
        match self {
            Self::Throttled { retry_after } => *retry_after,
            _ => None,
        }
    }
}

/// The operations of a rooms backend, as rate limits, retries and metrics count them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RoomOp {
    Create,
    Delete,
    Get,
    List,
}

impl RoomOp {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Create => "create room",
            Self::Delete => "delete room",
            Self::Get => "get room",
            Self::List => "list rooms",
        }
    }
}

impl RoomError {
    /// A short stable name of the error's kind, for metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Rejected { .. } => "rejected",
            Self::AlreadyExists(_) => "already_exists",
            Self::Throttled { .. } => "throttled",
            Self::Unavailable { .. } => "unavailable",
            Self::Token(_) => "token",
        }
    }
}

/// What the dispatcher asks for: the name and expiry are its own, the properties are the
/// client's whitelisted extras.
#[derive(Debug, Clone)]
pub struct RoomRequest {
    pub name: String,
    pub exp: DateTime<Utc>,
    pub properties: Map<String, Value>,
    /// Retries of the create stop before this instant.
    pub deadline: Option<tokio::time::Instant>,
}

/// A room of this deployment, as listed by the reaper.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListedRoom {
    pub name: String,
    pub created_at: Option<DateTime<Utc>>,
    /// Created ahead for a room pool (given to a session later, or never).
    pub pooled: bool,
}

/// This deployment's rooms, as far as the listing got.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RoomListing {
    pub rooms: Vec<ListedRoom>,
    /// Whether every room was listed. An incomplete listing (it stopped at its page limit)
    /// cannot show that a room is gone.
    pub complete: bool,
}

/// One page of a room listing.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RoomPage {
    /// This deployment's rooms on the page.
    pub rooms: Vec<ListedRoom>,
    /// Where the next page starts; `None` on the last.
    pub next: Option<String>,
}

/// A listing follows this many pages; one that needs more is incomplete.
pub const MAX_LIST_PAGES: usize = 100;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Room {
    pub name: String,
    pub url: String,
}

/// One meeting token to mint.
#[derive(Debug, Clone)]
pub struct TokenRequest<'a> {
    pub room: &'a str,
    pub owner: bool,
    pub exp: DateTime<Utc>,
    /// Whitelisted user properties (`user_name`, ...).
    pub properties: &'a Map<String, Value>,
}

/// Self-signed Daily meeting-token claims.
#[derive(Debug, Serialize)]
pub(crate) struct TokenClaims<'a> {
    r: &'a str,
    d: &'a str,
    iat: i64,
    exp: i64,
    o: bool,
    ejt: bool,
    #[serde(flatten)]
    extra: Map<String, Value>,
}

impl<'a> TokenClaims<'a> {
    pub(crate) fn new(domain_id: &'a str, req: &TokenRequest<'a>) -> Self {
        let extra = CLIENT_TOKEN_PROPERTIES
            .iter()
            .filter_map(|(prop, claim)| {
                req.properties
                    .get(*prop)
                    .map(|v| ((*claim).to_owned(), v.clone()))
            })
            .collect();
        Self {
            r: req.room,
            d: domain_id,
            iat: Utc::now().timestamp(),
            exp: req.exp.timestamp(),
            o: req.owner,
            ejt: true,
            extra,
        }
    }
}

#[async_trait]
pub trait RoomService: Send + Sync + 'static {
    /// `daily` or `local`.
    fn kind(&self) -> &'static str;
    /// The backend's documented rate limits: `(None, limit)` applies to every operation,
    /// `(Some(op), limit)` to `op` alone. Applied by the resilient wrapper.
    fn rate_limits(&self) -> Vec<(Option<RoomOp>, RateLimit)> {
        Vec::new()
    }
    /// The URL a room of this name has (known before it is created, so the bot can be launched
    /// concurrently with the room creation).
    fn room_url(&self, name: &str) -> String;
    async fn create(&self, req: &RoomRequest) -> Result<Room, RoomError>;
    /// Creates a room ahead of need (the pool) only if that takes nothing a client waits for:
    /// `None`, with nothing called, when the rate limit has no token free now. Backends
    /// without limits just create.
    async fn create_if_free(&self, req: &RoomRequest) -> Option<Result<Room, RoomError>> {
        Some(self.create(req).await)
    }
    /// Deletes a room; a room that does not exist is success.
    async fn delete(&self, name: &str) -> Result<(), RoomError>;
    /// The room, if it still exists (and has not expired).
    async fn find(&self, name: &str) -> Result<Option<ListedRoom>, RoomError>;
    /// One page of the existing rooms of this deployment (named by
    /// [`resource_name`](crate::session_id::resource_name) for it), from `cursor` (`None`:
    /// the first page).
    async fn list_page(&self, cursor: Option<&str>) -> Result<RoomPage, RoomError>;
    /// Every existing room of this deployment, for the reaper: page after page, each a call
    /// of its own (through the resilient wrapper, each under the rate limit), at most
    /// [`MAX_LIST_PAGES`].
    async fn list_managed(&self) -> Result<RoomListing, RoomError> {
        let mut rooms = Vec::new();
        let mut cursor: Option<String> = None;
        for _ in 0..MAX_LIST_PAGES {
            let page = self.list_page(cursor.as_deref()).await?;
            rooms.extend(page.rooms);
            match page.next {
                Some(next) => cursor = Some(next),
                None => {
                    return Ok(RoomListing {
                        rooms,
                        complete: true,
                    })
                }
            }
        }
        tracing::warn!(
            pages = MAX_LIST_PAGES,
            "the room listing has more pages than are read; the reaper skips its room-gone rule"
        );
        Ok(RoomListing {
            rooms,
            complete: false,
        })
    }
    fn mint_token(&self, req: &TokenRequest<'_>) -> Result<String, RoomError>;
    /// One cheap read proving the API key works.
    async fn check(&self) -> Result<(), RoomError>;
}

/// Checks client-supplied room and token properties against the whitelists; the error names the
/// offending key.
pub fn validate_client_properties(
    room: &Map<String, Value>,
    token: &Map<String, Value>,
) -> Result<(), String> {
    if let Some(key) = room
        .keys()
        .find(|k| !CLIENT_ROOM_PROPERTIES.contains(&k.as_str()))
    {
        return Err(format!(
            "dailyRoomProperties.{key} is not allowed (allowed: {}); expiry and eject settings are set by botdispatch",
            CLIENT_ROOM_PROPERTIES.join(", ")
        ));
    }
    if let Some(key) = token
        .keys()
        .find(|k| !CLIENT_TOKEN_PROPERTIES.iter().any(|(p, _)| p == k))
    {
        let allowed: Vec<&str> = CLIENT_TOKEN_PROPERTIES.iter().map(|(p, _)| *p).collect();
        return Err(format!(
            "dailyMeetingTokenProperties.{key} is not allowed (allowed: {})",
            allowed.join(", ")
        ));
    }
    for (key, value) in token {
        let ok = match key.as_str() {
            "user_name" | "user_id" => value.as_str().is_some_and(|s| s.len() <= 256),
            _ => value.is_boolean(),
        };
        if !ok {
            return Err(format!(
                "dailyMeetingTokenProperties.{key} has the wrong type or is too long"
            ));
        }
    }
    Ok(())
}
