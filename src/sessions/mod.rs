//! The session flow: start (room ∥ machine, then wait), status and stop, with admission and
//! the start's own task. It knows nothing of axum or status codes (the handlers in
//! `crate::api` parse, call, answer; `crate::error` maps [`SessionError`]); its request and
//! view types carry their OpenAPI schema.
//!
//! * [`plan`]: a start request, validated into a plan (nothing created yet);
//! * [`start`](mod@start): admission, the start task and its steps;
//! * [`cleanup`]: what a start created, destroyed on every way it can fail;
//! * this module: reading and stopping a session by its id.

mod cleanup;
mod error;
mod plan;
mod start;
mod view;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use providers::{MachineProvider, MachineTemplate};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, instrument};

use crate::auth::Caller;
use crate::capacity::Capacity;
use crate::config::{Config, ConfigError};
use crate::rooms::RoomService;
use crate::session_id::{resource_name, SessionIds, SessionRef};

pub use error::SessionError;
pub use plan::{StartPlan, StartRequest, MAX_BODY_BYTES};
pub use view::{SessionView, Started};

/// Settings the flow reads, copied out of [`Config`] once.
#[derive(Debug, Clone)]
pub struct SessionSettings {
    pub start_timeout: Duration,
    /// Margin the reaper gives young machines; also the provisional deadline's slack.
    pub reaper_grace: Duration,
    pub max_session: Duration,
    pub default_agent: String,
    pub allowed_regions: Vec<String>,
}

impl From<&Config> for SessionSettings {
    fn from(c: &Config) -> Self {
        Self {
            start_timeout: c.start_timeout(),
            reaper_grace: Duration::from_secs(c.reaper_grace_secs),
            max_session: c.max_session(),
            default_agent: c.default_agent.clone(),
            allowed_regions: c.allowed_regions.clone(),
        }
    }
}

/// Everything a session's life needs: the provider and rooms (already resilient), the id
/// signer, admission, and the tracker that runs starts and their background work.
pub struct Sessions {
    provider: Arc<dyn MachineProvider>,
    rooms: Arc<dyn RoomService>,
    ids: SessionIds,
    settings: SessionSettings,
    /// Every agent's machine template.
    templates: BTreeMap<String, Arc<MachineTemplate>>,
    capacity: Capacity,
    /// Runs every start, and background work of a start that outlives its answer.
    tasks: TaskTracker,
    /// Cancelled when the dispatcher gives up on in-flight starts at shutdown.
    shutdown: CancellationToken,
}

impl Sessions {
    pub fn new(
        config: &Config,
        provider: Arc<dyn MachineProvider>,
        rooms: Arc<dyn RoomService>,
        ids: SessionIds,
        tasks: TaskTracker,
        shutdown: CancellationToken,
    ) -> Result<Self, ConfigError> {
        let templates = config
            .templates()?
            .into_iter()
            .map(|(name, t)| (name, Arc::new(t)))
            .collect();
        Ok(Self {
            capacity: Capacity::new(config, Arc::clone(&provider)),
            provider,
            rooms,
            ids,
            settings: SessionSettings::from(config),
            templates,
            tasks,
            shutdown,
        })
    }

    pub fn provider(&self) -> &Arc<dyn MachineProvider> {
        &self.provider
    }

    pub fn rooms(&self) -> &Arc<dyn RoomService> {
        &self.rooms
    }

    /// Verifies an id and its owner. Another caller's session reads as not found.
    fn resolve(&self, caller: &Caller, id: &str) -> Result<SessionRef, SessionError> {
        let session = self.ids.decode(id).ok_or(SessionError::NotFound)?;
        if !(caller.is_admin() || self.ids.is_owner(&session, &caller.sub)) {
            return Err(SessionError::NotFound);
        }
        tracing::Span::current().record("session.key", session.key.as_str());
        Ok(session)
    }

    /// The session's state, read from the provider (works on any replica).
    #[instrument(name = "status", skip_all, fields(session.key = tracing::field::Empty))]
    pub async fn get(&self, caller: &Caller, id: &str) -> Result<SessionView, SessionError> {
        let session = self.resolve(caller, id)?;
        let machine = self.provider.status(&session.handle).await?;
        Ok(SessionView::new(
            id,
            self.provider.name(),
            &session.handle,
            machine,
        ))
    }

    /// Stops the machine and deletes the room. Idempotent.
    #[instrument(name = "stop", skip_all, fields(session.key = tracing::field::Empty))]
    pub async fn stop(&self, caller: &Caller, id: &str) -> Result<(), SessionError> {
        let session = self.resolve(caller, id)?;
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
