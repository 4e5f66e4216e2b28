//! The session flow: start (room ∥ machine, then wait), status and stop. No HTTP types here.
//!
//! Everything a start creates is cleaned up on every failure path before the error is returned:
//! provider refusal, throttling, timeout, room failure, and the client going away (the caller
//! cancels the [`CancellationToken`]; the flow itself always runs to its end).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, instrument, warn, Instrument};

use crate::auth::Caller;
use crate::config::{AgentConfig, Config};
use crate::metrics;
use crate::rooms::{validate_client_properties, RoomError, RoomRequest, RoomService, TokenRequest};
use crate::session_id::{new_session_key, resource_name, SessionIds};
use providers::{LaunchSpec, MachineProvider, MachineState, ProviderError, SessionLabels};

/// Most bytes the `body` passed to the bot may take, serialized.
pub const MAX_BODY_BYTES: usize = 64 * 1024;

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
#[derive(Debug)]
pub struct StartPlan {
    pub key: String,
    /// Started with an `Idempotency-Key`: a retry finds and returns the same session.
    idempotent: bool,
    pub agent: String,
    pub owner: String,
    agent_config: AgentConfig,
    body_json: String,
    create_room: bool,
    room_properties: Map<String, Value>,
    token_properties: Map<String, Value>,
    region: Option<String>,
    pub wait: bool,
}

/// A successful start.
#[derive(Debug, Clone)]
pub struct Started {
    pub session_id: String,
    pub room_url: Option<String>,
    pub user_token: Option<String>,
    pub ready: bool,
}

/// `GET /sessions/{id}`.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct SessionView {
    pub session_id: String,
    /// `starting` | `ready` | `ended` | `failed`
    #[schema(value_type = String, example = "ready")]
    pub status: &'static str,
    /// `fly`, `fargate`, `cloudrun` or `local`.
    #[schema(value_type = String, example = "fly")]
    pub provider: &'static str,
    pub agent: Option<String>,
    pub region: Option<String>,
    pub machine_id: String,
    pub created_at: Option<DateTime<Utc>>,
    pub ready_at: Option<DateTime<Utc>>,
    pub ended_at: Option<DateTime<Utc>>,
    pub bot_start_seconds: Option<f64>,
    pub detail: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    #[error("{0}")]
    Invalid(String),
    #[error("{0}")]
    TooLarge(String),
    #[error("no agent named {0:?} is configured")]
    UnknownAgent(String),
    #[error("this token may not start agent {0:?}")]
    AgentForbidden(String),
    #[error("no such session")]
    NotFound,
    #[error("the bot machine did not start within {0} s")]
    StartTimeout(u64),
    #[error(transparent)]
    Provider(#[from] ProviderError),
    #[error(transparent)]
    Room(#[from] RoomError),
    #[error("the client went away before the session started")]
    ClientGone,
    #[error("the dispatcher is shutting down; try again")]
    ShuttingDown,
    #[error("this Idempotency-Key belongs to a session that has ended; use a new key")]
    IdempotencyKeyUsed,
}

impl SessionError {
    /// A short stable name for metrics.
    pub fn outcome(&self) -> &'static str {
        match self {
            Self::Invalid(_) | Self::TooLarge(_) => "invalid",
            Self::UnknownAgent(_) | Self::AgentForbidden(_) | Self::NotFound => "refused",
            Self::StartTimeout(_) => "timeout",
            Self::Provider(ProviderError::Throttled { .. }) => "provider_throttled",
            Self::Provider(ProviderError::Timeout { .. }) => "timeout",
            Self::Provider(ProviderError::StartFailed { .. }) => "bot_start_failed",
            Self::Provider(_) => "provider_error",
            Self::Room(_) => "room_error",
            Self::ClientGone => "client_gone",
            Self::ShuttingDown => "shutting_down",
            Self::IdempotencyKeyUsed => "idempotency_conflict",
        }
    }
}

/// Settings the flow reads, copied out of [`Config`] once.
#[derive(Debug, Clone)]
pub struct SessionSettings {
    pub start_timeout: Duration,
    /// Margin the reaper gives young machines; also the provisional deadline's slack.
    pub reaper_grace: Duration,
    pub max_session: Duration,
    pub default_agent: String,
    pub agents: BTreeMap<String, AgentConfig>,
    pub allowed_regions: Vec<String>,
}

impl From<&Config> for SessionSettings {
    fn from(c: &Config) -> Self {
        Self {
            start_timeout: c.start_timeout(),
            reaper_grace: Duration::from_secs(c.reaper_grace_secs),
            max_session: c.max_session(),
            default_agent: c.default_agent.clone(),
            agents: c.agents.clone(),
            allowed_regions: c.allowed_regions.clone(),
        }
    }
}

pub struct Sessions {
    provider: Arc<dyn MachineProvider>,
    rooms: Arc<dyn RoomService>,
    ids: SessionIds,
    settings: SessionSettings,
    /// Background work of a start that outlives its answer (deadline confirmation).
    tasks: TaskTracker,
    /// Cancelled when the dispatcher gives up on in-flight starts at shutdown.
    shutdown: CancellationToken,
}

/// What a failed start must clean up.
enum MachineCleanup {
    Nothing,
    Handle(String),
    /// The create may or may not have happened (timeout, connection lost): look it up by key.
    Find,
}

impl Sessions {
    pub fn new(
        provider: Arc<dyn MachineProvider>,
        rooms: Arc<dyn RoomService>,
        ids: SessionIds,
        settings: SessionSettings,
        tasks: TaskTracker,
        shutdown: CancellationToken,
    ) -> Self {
        Self {
            provider,
            rooms,
            ids,
            settings,
            tasks,
            shutdown,
        }
    }

    /// Why a start's cancellation token fired.
    fn cancelled(&self) -> SessionError {
        if self.shutdown.is_cancelled() {
            SessionError::ShuttingDown
        } else {
            SessionError::ClientGone
        }
    }

    pub fn provider(&self) -> &Arc<dyn MachineProvider> {
        &self.provider
    }

    pub fn rooms(&self) -> &Arc<dyn RoomService> {
        &self.rooms
    }

    /// Validates a start request. Pure: nothing is created, so a refusal loses nothing.
    pub fn plan(
        &self,
        caller: &Caller,
        agent: Option<&str>,
        idempotency_key: Option<&str>,
        req: StartRequest,
    ) -> Result<StartPlan, SessionError> {
        let key = match idempotency_key {
            None => new_session_key(),
            Some(k) if valid_idempotency_key(k) => self.ids.idempotent_key(&caller.sub, k),
            Some(_) => {
                return Err(SessionError::Invalid(
                    "Idempotency-Key must be 1 to 255 visible ASCII characters".into(),
                ))
            }
        };
        let agent = agent.unwrap_or(&self.settings.default_agent).to_owned();
        let agent_config = self
            .settings
            .agents
            .get(&agent)
            .cloned()
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
        if let Some(region) = &req.region {
            if !self.settings.allowed_regions.contains(region) {
                return Err(SessionError::Invalid(
                    if self.settings.allowed_regions.is_empty() {
                        format!("region {region:?} is not allowed: this dispatcher accepts no region hints")
                    } else {
                        format!(
                            "region {region:?} is not allowed (allowed: {})",
                            self.settings.allowed_regions.join(", ")
                        )
                    },
                ));
            }
        }
        Ok(StartPlan {
            idempotent: idempotency_key.is_some(),
            key,
            agent,
            owner: caller.sub.clone(),
            agent_config,
            body_json,
            create_room,
            room_properties,
            token_properties,
            region: req.region,
            wait: req.wait.unwrap_or(true),
        })
    }

    /// Runs a planned start to its end. `cancel` signals that the client went away: whatever
    /// was created is then destroyed.
    #[instrument(name = "start", skip_all, fields(session.key = %plan.key, agent = %plan.agent, provider = self.provider.name()))]
    pub async fn start(
        &self,
        plan: StartPlan,
        cancel: CancellationToken,
    ) -> Result<Started, SessionError> {
        let t0 = Instant::now();
        let agent = plan.agent.clone();
        metrics::starting(1.0);
        let result = self.run_start(plan, cancel).await;
        metrics::starting(-1.0);
        let outcome = match &result {
            Ok(s) if s.ready => "ready",
            Ok(_) => "accepted",
            Err(e) => e.outcome(),
        };
        metrics::start_finished(&agent, self.provider.name(), outcome, t0.elapsed());
        result
    }

    async fn run_start(
        &self,
        plan: StartPlan,
        cancel: CancellationToken,
    ) -> Result<Started, SessionError> {
        let t0 = Instant::now();
        let start_deadline = t0 + self.settings.start_timeout;
        let name = resource_name(&plan.key);
        // Whole seconds: room `exp`, token `exp` and machine labels all carry unix seconds.
        let session_end = DateTime::from_timestamp(
            Utc::now().timestamp() + self.settings.max_session.as_secs() as i64,
            0,
        )
        .unwrap_or_else(Utc::now);
        // Where the provider can relabel, the machine first gets a deadline just past the start
        // timeout and only the real one once the client has its answer: if this dispatcher dies
        // in between, the reaper removes the machine soon instead of at the session's end.
        let provisional_deadline = if self.provider.can_set_deadline() {
            DateTime::from_timestamp(
                Utc::now().timestamp()
                    + (self.settings.start_timeout + self.settings.reaper_grace).as_secs() as i64,
                0,
            )
            .unwrap_or(session_end)
            .min(session_end)
        } else {
            session_end
        };

        // Tokens are signed locally from the deterministic room name: the bot gets its token at
        // launch while the room is still being created.
        let (room_url, bot_token, user_token) = if plan.create_room {
            let no_props = Map::new();
            let bot = self.rooms.mint_token(&TokenRequest {
                room: &name,
                owner: true,
                exp: session_end,
                properties: &no_props,
            })?;
            let user = self.rooms.mint_token(&TokenRequest {
                room: &name,
                owner: false,
                exp: session_end,
                properties: &plan.token_properties,
            })?;
            (Some(self.rooms.room_url(&name)), Some(bot), Some(user))
        } else {
            (None, None, None)
        };

        // An idempotent retry whose machine exists already answers with that session.
        if plan.idempotent {
            if let Some(started) = self
                .resume(&plan, &room_url, &user_token, start_deadline, &cancel)
                .await?
            {
                return Ok(started);
            }
        }

        let mut env = plan.agent_config.env.clone();
        if let (Some(url), Some(token)) = (&room_url, &bot_token) {
            env.insert("DAILY_ROOM_URL".into(), url.clone());
            env.insert("DAILY_ROOM_TOKEN".into(), token.clone());
        }
        env.insert("BOTDISPATCH_SESSION_ID".into(), plan.key.clone());
        env.insert("BOTDISPATCH_BODY".into(), plan.body_json.clone());
        let spec = LaunchSpec {
            name: name.clone(),
            image: plan.agent_config.image.clone().unwrap_or_default(),
            cmd: plan.agent_config.cmd.clone(),
            env,
            guest: plan.agent_config.guest.clone(),
            region: plan.region.clone(),
            labels: SessionLabels {
                session_key: plan.key.clone(),
                owner: plan.owner.clone(),
                room: if plan.create_room {
                    name.clone()
                } else {
                    String::new()
                },
                agent: plan.agent.clone(),
                deadline: provisional_deadline,
            },
            deadline: Some(start_deadline),
        };

        // Room and machine concurrently: the critical path is the slower of the two.
        let room_phase = async {
            if !plan.create_room {
                return None;
            }
            let t = Instant::now();
            let req = RoomRequest {
                name: name.clone(),
                exp: session_end,
                properties: plan.room_properties.clone(),
                deadline: Some(start_deadline),
            };
            let result =
                match tokio::time::timeout_at(start_deadline, self.rooms.create(&req)).await {
                    Ok(r) => r,
                    Err(_) => Err(RoomError::Unavailable {
                        message: "create room: timed out".into(),
                    }),
                };
            Some((result, t.elapsed()))
        };
        let launch_phase = async {
            let t = Instant::now();
            let result =
                match tokio::time::timeout_at(start_deadline, self.provider.launch(&spec)).await {
                    Ok(r) => r,
                    Err(_) => Err(ProviderError::Timeout {
                        provider: self.provider.name(),
                    }),
                };
            (result, t.elapsed())
        };
        let (room_result, (launch_result, launch_time)) = tokio::join!(room_phase, launch_phase);

        let room_cleanup = match &room_result {
            // Refused: nothing was created.
            Some((Err(RoomError::Rejected { .. }), _)) | None => None,
            Some(_) => Some(name.as_str()),
        };
        let launched = match launch_result {
            Ok(launched) => launched,
            Err(e) => {
                let cleanup = match &e {
                    ProviderError::Timeout { .. } | ProviderError::Unavailable { .. } => {
                        MachineCleanup::Find
                    }
                    _ => MachineCleanup::Nothing,
                };
                warn!(error = %e, "launch failed; cleaning up");
                self.compensate(&plan.key, cleanup, room_cleanup).await;
                return Err(match e {
                    ProviderError::Timeout { .. } => {
                        SessionError::StartTimeout(self.settings.start_timeout.as_secs())
                    }
                    e => e.into(),
                });
            }
        };
        let room_time = match room_result {
            Some((Err(e), _)) => {
                warn!(error = %e, "room creation failed; cleaning up");
                self.compensate(
                    &plan.key,
                    MachineCleanup::Handle(launched.handle.clone()),
                    room_cleanup,
                )
                .await;
                return Err(e.into());
            }
            Some((Ok(_), t)) => Some(t),
            None => None,
        };
        if cancel.is_cancelled() {
            info!("client went away during launch; cleaning up");
            self.compensate(
                &plan.key,
                MachineCleanup::Handle(launched.handle.clone()),
                room_cleanup,
            )
            .await;
            return Err(self.cancelled());
        }

        let mut wait_time = None;
        if plan.wait {
            let t = Instant::now();
            let remaining = start_deadline.saturating_duration_since(t);
            let waited = tokio::select! {
                r = tokio::time::timeout(remaining, self.provider.wait_started(&launched, remaining)) => match r {
                    Ok(Ok(())) => Ok(()),
                    Ok(Err(ProviderError::Timeout { .. })) | Err(_) => {
                        Err(SessionError::StartTimeout(self.settings.start_timeout.as_secs()))
                    }
                    Ok(Err(e)) => Err(e.into()),
                },
                () = cancel.cancelled() => Err(self.cancelled()),
            };
            if let Err(e) = waited {
                warn!(error = %e, "machine did not start; cleaning up");
                self.compensate(
                    &plan.key,
                    MachineCleanup::Handle(launched.handle.clone()),
                    room_cleanup,
                )
                .await;
                return Err(e);
            }
            wait_time = Some(t.elapsed());
        }

        let provider = self.provider.name();
        if let Some(t) = room_time {
            metrics::start_phase(provider, "room", t);
        }
        metrics::start_phase(provider, "launch", launch_time);
        if let Some(t) = wait_time {
            metrics::start_phase(provider, "wait", t);
        }
        metrics::start_phase(provider, "total", t0.elapsed());
        info!(
            machine.id = %launched.handle,
            room_ms = room_time.map(|t| t.as_millis() as u64),
            launch_ms = launch_time.as_millis() as u64,
            wait_ms = wait_time.map(|t| t.as_millis() as u64),
            total_ms = t0.elapsed().as_millis() as u64,
            ready = plan.wait,
            "session started"
        );
        self.confirm_deadline(&launched.handle, provisional_deadline, session_end);
        Ok(Started {
            session_id: self.ids.encode(&plan.key, &launched.handle, &plan.owner),
            room_url,
            user_token,
            ready: plan.wait,
        })
    }

    /// Gives the machine its real deadline, in the background (off the critical path).
    fn confirm_deadline(
        &self,
        handle: &str,
        provisional: DateTime<Utc>,
        session_end: DateTime<Utc>,
    ) {
        if provisional >= session_end {
            return;
        }
        let provider = Arc::clone(&self.provider);
        let handle = handle.to_owned();
        self.tasks.spawn(
            async move {
                if let Err(e) = provider.set_deadline(&handle, session_end).await {
                    tracing::error!(machine.id = %handle, error = %e, "cannot extend the machine's provisional deadline; the reaper will stop it early");
                }
            }
            .in_current_span(),
        );
    }

    /// An idempotent retry: answers with the session's machine if it exists (waiting for it
    /// when asked to), `None` when this key never launched anything.
    async fn resume(
        &self,
        plan: &StartPlan,
        room_url: &Option<String>,
        user_token: &Option<String>,
        start_deadline: Instant,
        cancel: &CancellationToken,
    ) -> Result<Option<Started>, SessionError> {
        let name = resource_name(&plan.key);
        let machine = match self.provider.find(&plan.key).await? {
            Some(m) => m,
            None => {
                // No machine, but its room: this key's session ran and is over.
                if plan.create_room
                    && self.rooms.kind() == "daily"
                    && self.rooms.exists(&name).await?
                {
                    return Err(SessionError::IdempotencyKeyUsed);
                }
                return Ok(None);
            }
        };
        if machine.state.is_terminal() {
            return Err(SessionError::IdempotencyKeyUsed);
        }
        let mut ready = machine.state == MachineState::Started;
        if plan.wait && !ready {
            let launched = providers::Launched {
                handle: machine.handle.clone(),
                region: machine.region.clone(),
                version: None,
            };
            let remaining = start_deadline.saturating_duration_since(Instant::now());
            tokio::select! {
                r = self.provider.wait_started(&launched, remaining) => match r {
                    Ok(()) => ready = true,
                    Err(ProviderError::Timeout { .. }) => {
                        return Err(SessionError::StartTimeout(self.settings.start_timeout.as_secs()))
                    }
                    Err(e) => return Err(e.into()),
                },
                () = cancel.cancelled() => return Err(self.cancelled()),
            }
        }
        info!(machine.id = %machine.handle, "idempotent retry answered with the existing session");
        Ok(Some(Started {
            session_id: self.ids.encode(&plan.key, &machine.handle, &plan.owner),
            room_url: room_url.clone(),
            user_token: user_token.clone(),
            ready,
        }))
    }

    /// Destroys what a failed start created, concurrently. The provider and rooms clients
    /// already retry transient failures; what still fails is logged, and the reaper reconciles
    /// it (the room expires by itself regardless).
    async fn compensate(&self, key: &str, machine: MachineCleanup, room: Option<&str>) {
        let machine_cleanup = async {
            let handle = match machine {
                MachineCleanup::Nothing => return,
                MachineCleanup::Handle(h) => h,
                MachineCleanup::Find => match self.provider.find(key).await {
                    Ok(Some(m)) => m.handle,
                    Ok(None) => return,
                    Err(e) => {
                        warn!(error = %e, "cannot look up the machine of a failed start; left for the reaper");
                        return;
                    }
                },
            };
            if let Err(e) = self.provider.terminate(&handle).await {
                warn!(machine.id = %handle, error = %e, "cannot destroy the machine of a failed start; left for the reaper");
            }
        };
        let room_cleanup = async {
            if let Some(room) = room {
                if let Err(e) = self.rooms.delete(room).await {
                    warn!(room, error = %e, "cannot delete the room of a failed start; it expires by itself");
                }
            }
        };
        tokio::join!(
            machine_cleanup.in_current_span(),
            room_cleanup.in_current_span()
        );
    }

    /// Verifies an id and its owner. Another caller's session reads as not found.
    fn resolve(
        &self,
        caller: &Caller,
        id: &str,
    ) -> Result<crate::session_id::SessionRef, SessionError> {
        let session = self.ids.decode(id).ok_or(SessionError::NotFound)?;
        if !(caller.is_admin() || self.ids.is_owner(&session, &caller.sub)) {
            return Err(SessionError::NotFound);
        }
        Ok(session)
    }

    /// The session's state, read from the provider (works on any replica).
    #[instrument(name = "status", skip_all, fields(session.key = tracing::field::Empty))]
    pub async fn get(&self, caller: &Caller, id: &str) -> Result<SessionView, SessionError> {
        let session = self.resolve(caller, id)?;
        tracing::Span::current().record("session.key", session.key.as_str());
        let status = self.provider.status(&session.handle).await?;
        let mut view = SessionView {
            session_id: id.to_owned(),
            status: "ended",
            provider: self.provider.name(),
            agent: None,
            region: None,
            machine_id: session.handle.clone(),
            created_at: None,
            ready_at: None,
            ended_at: None,
            bot_start_seconds: None,
            detail: Some("the machine is gone".to_owned()),
        };
        if let Some(m) = status {
            view.status = match m.state {
                MachineState::Starting => "starting",
                MachineState::Started => "ready",
                MachineState::Ended => "ended",
                MachineState::Failed => "failed",
            };
            view.agent = m.labels.map(|l| l.agent).filter(|a| !a.is_empty());
            view.region = m.region;
            view.created_at = m.created_at;
            view.ready_at = m.started_at;
            view.ended_at = m.ended_at;
            view.bot_start_seconds = match (m.created_at, m.started_at) {
                (Some(c), Some(s)) => Some((s - c).num_milliseconds().max(0) as f64 / 1000.0),
                _ => None,
            };
            view.detail = m.detail;
        }
        Ok(view)
    }

    /// Stops the machine and deletes the room. Idempotent.
    #[instrument(name = "stop", skip_all, fields(session.key = tracing::field::Empty))]
    pub async fn stop(&self, caller: &Caller, id: &str) -> Result<(), SessionError> {
        let session = self.resolve(caller, id)?;
        tracing::Span::current().record("session.key", session.key.as_str());
        let room = resource_name(&session.key);
        let (machine, room) = tokio::join!(
            self.provider.terminate(&session.handle),
            self.rooms.delete(&room)
        );
        machine?;
        room?;
        info!("session stopped");
        Ok(())
    }
}

/// `Idempotency-Key`: 1 to 255 visible ASCII characters.
fn valid_idempotency_key(key: &str) -> bool {
    (1..=255).contains(&key.len()) && key.bytes().all(|b| b.is_ascii_graphic())
}
