//! A start request and its validation into a [`StartPlan`]: pure, nothing is created, so a
//! refusal loses nothing.

use std::sync::Arc;

use providers::MachineTemplate;
use serde::Deserialize;
use serde_json::{Map, Value};

use super::{SessionError, Sessions};
use crate::auth::Caller;
use crate::rooms::validate_client_properties;
use crate::session_id::new_session_key;

/// Most bytes the `body` passed to the bot may take, serialized (providers may allow less).
pub const MAX_BODY_BYTES: usize = 64 * 1024;

/// A bound on the length of a bot's meeting token (a self-signed JWT with fixed claims is
/// about 250 characters), for checking provider limits before the token exists.
const TOKEN_LENGTH_BOUND: usize = 512;

/// `POST /start` request. Every field is optional; unknown fields are refused.
#[derive(Debug, Default, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct StartRequest {
    /// Passed to the bot unchanged as `BOTDISPATCH_BODY` (at most 64 KiB serialized).
    #[schema(value_type = Option<Object>)]
    pub body: Option<Map<String, Value>>,
    /// Create a Daily room and tokens (default true).
    pub create_daily_room: Option<bool>,
    /// Whitelisted Daily room properties (`enable_recording`, `start_video_off`, ...); expiry
    /// and eject settings are the dispatcher's.
    #[schema(value_type = Option<Object>)]
    pub daily_room_properties: Option<Map<String, Value>>,
    /// Whitelisted user-token properties (`user_name`, `user_id`, `start_video_off`,
    /// `start_audio_off`, `enable_screenshare`).
    #[schema(value_type = Option<Object>)]
    pub daily_meeting_token_properties: Option<Map<String, Value>>,
    /// Provider region hint; must be in the configured allow-list.
    pub region: Option<String>,
    /// Answer once the machine is started (default true), or at once with 202.
    pub wait: Option<bool>,
}

/// A validated start, before anything exists.
#[derive(Debug, Clone)]
pub struct StartPlan {
    pub key: String,
    /// Started with an `Idempotency-Key`: a retry finds and returns the same session.
    pub idempotent: bool,
    pub agent: String,
    pub owner: String,
    /// The agent's machine template, with the request's region.
    pub template: Arc<MachineTemplate>,
    pub body_json: String,
    pub create_room: bool,
    pub room_properties: Map<String, Value>,
    pub token_properties: Map<String, Value>,
    pub wait: bool,
    /// When the request was planned (it had just arrived).
    pub received: tokio::time::Instant,
    /// How long it waited for capacity (set at admission).
    pub queued: std::time::Duration,
}

impl StartPlan {
    /// How the start went, now that its bot can talk.
    pub fn timings(&self) -> providers::Timings {
        providers::Timings {
            queue_ms: self.queued.as_millis() as u64,
            ready_ms: self.received.elapsed().as_millis() as u64,
        }
    }
}

impl Sessions {
    /// Validates a start request. `idempotency_key` is the raw `Idempotency-Key` header.
    pub fn plan(
        &self,
        caller: &Caller,
        agent: Option<&str>,
        idempotency_key: Option<&[u8]>,
        req: StartRequest,
    ) -> Result<StartPlan, SessionError> {
        let key = match idempotency_key {
            None => new_session_key(),
            Some(k) => self
                .ids
                .idempotent_key(&caller.sub, idempotency_key_text(k)?),
        };
        let agent = agent.unwrap_or(&self.settings.default_agent).to_owned();
        let template = self
            .templates
            .get(&agent)
            .ok_or_else(|| SessionError::UnknownAgent(agent.clone()))?;
        if !caller.may_start(&agent) {
            return Err(SessionError::AgentForbidden(agent));
        }
        let body_json = serde_json::to_string(&req.body.unwrap_or_default())
            .map_err(|e| SessionError::Invalid(format!("body: {e}")))?;
        if body_json.len() > MAX_BODY_BYTES {
            return Err(SessionError::TooLarge(format!(
                "body is {} bytes serialized; the limit is {MAX_BODY_BYTES}",
                body_json.len()
            )));
        }
        let room_properties = req.daily_room_properties.unwrap_or_default();
        let token_properties = req.daily_meeting_token_properties.unwrap_or_default();
        validate_client_properties(&room_properties, &token_properties)
            .map_err(SessionError::Invalid)?;
        let create_room = req.create_daily_room.unwrap_or(true);
        let has_room_options = !room_properties.is_empty() || !token_properties.is_empty();
        if !create_room && has_room_options {
            return Err(SessionError::Invalid(
                "dailyRoomProperties and dailyMeetingTokenProperties need createDailyRoom: true"
                    .into(),
            ));
        }
        let template = match req.region {
            None => Arc::clone(template),
            Some(region) => Arc::new(MachineTemplate {
                region: Some(self.allowed_region(region)?),
                ..MachineTemplate::clone(template)
            }),
        };
        self.check_fits(&template, &key, create_room, &body_json)?;
        Ok(StartPlan {
            idempotent: idempotency_key.is_some(),
            key,
            agent,
            owner: caller.sub.clone(),
            template,
            body_json,
            create_room,
            room_properties,
            token_properties,
            wait: req.wait.unwrap_or(true),
            received: tokio::time::Instant::now(),
            queued: std::time::Duration::ZERO,
        })
    }

    /// Whether the provider can carry this start's contract: its limits are checked here,
    /// before anything exists, with a room URL and token as long as real ones get.
    fn check_fits(
        &self,
        template: &MachineTemplate,
        key: &str,
        create_room: bool,
        body_json: &str,
    ) -> Result<(), SessionError> {
        let name = self.resource_name(key);
        let url = self.rooms.room_url(&name);
        let token = "t".repeat(TOKEN_LENGTH_BOUND);
        let room = create_room.then_some((url.as_str(), token.as_str()));
        let env = super::start::contract_env(key, room, body_json);
        self.provider.fits(template, &env).map_err(|limit| {
            SessionError::TooLarge(format!(
                "body is {} bytes serialized; the {} provider cannot carry it: {limit}",
                body_json.len(),
                self.provider.name()
            ))
        })
    }

    fn allowed_region(&self, region: String) -> Result<String, SessionError> {
        let allowed = &self.settings.allowed_regions;
        if allowed.contains(&region) {
            return Ok(region);
        }
        Err(SessionError::Invalid(if allowed.is_empty() {
            format!("region {region:?} is not allowed: this dispatcher accepts no region hints")
        } else {
            format!(
                "region {region:?} is not allowed (allowed: {})",
                allowed.join(", ")
            )
        }))
    }
}

/// `Idempotency-Key`: 1 to 255 visible ASCII characters.
fn idempotency_key_text(raw: &[u8]) -> Result<&str, SessionError> {
    match std::str::from_utf8(raw) {
        Ok(key) if (1..=255).contains(&key.len()) && key.bytes().all(|b| b.is_ascii_graphic()) => {
            Ok(key)
        }
        _ => Err(SessionError::Invalid(
            "Idempotency-Key must be 1 to 255 visible ASCII characters".into(),
        )),
    }
}
