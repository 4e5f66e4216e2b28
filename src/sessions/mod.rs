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
mod http;
mod list;
mod plan;
mod start;
mod view;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use providers::{MachineProvider, MachineStatus, MachineTemplate};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, instrument};

use crate::auth::Caller;
use crate::capacity::Capacity;
use crate::config::{Config, ConfigError};
use crate::handoff::Handoff;
use crate::reserve::Reserves;
use crate::rooms::RoomService;
use crate::session_id::{resource_name, SessionIds, SessionRef};

pub use error::SessionError;
pub use list::{ListParams, SessionList};
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
    /// This deployment's name: in room and machine names and labels.
    pub deployment: String,
}

impl From<&Config> for SessionSettings {
    fn from(c: &Config) -> Self {
        Self {
            start_timeout: c.start_timeout(),
            reaper_grace: Duration::from_secs(c.reaper_grace_secs),
            max_session: c.max_session(),
            default_agent: c.default_agent.clone(),
            allowed_regions: c.allowed_regions.clone(),
            deployment: c.deployment.clone(),
        }
    }
}

/// What [`Sessions`] is built from.
pub struct Parts {
    /// The provider, already resilient.
    pub provider: Arc<dyn MachineProvider>,
    /// The rooms backend, already resilient.
    pub rooms: Arc<dyn RoomService>,
    pub ids: SessionIds,
    pub handoff: Handoff,
}

/// Everything a session's life needs: the provider and rooms (already resilient), the id
/// signer, admission, the reserves, and the tracker that runs starts and their background
/// work.
pub struct Sessions {
    provider: Arc<dyn MachineProvider>,
    rooms: Arc<dyn RoomService>,
    ids: SessionIds,
    settings: SessionSettings,
    /// Every agent's machine template.
    templates: BTreeMap<String, Arc<MachineTemplate>>,
    capacity: Capacity,
    /// The agents' reserves and room pools, when any agent keeps one.
    reserves: Option<Arc<Reserves>>,
    /// The `http` handoff's client and secrets.
    handoff: Handoff,
    /// Runs every start, and background work of a start that outlives its answer.
    tasks: TaskTracker,
    /// Cancelled when the dispatcher gives up on in-flight starts at shutdown.
    shutdown: CancellationToken,
    /// The provider's last listing, shared by `GET /sessions` for a second.
    listing: list::Listing,
}

impl Sessions {
    pub fn new(
        config: &Config,
        parts: Parts,
        tasks: TaskTracker,
        shutdown: CancellationToken,
    ) -> Result<Self, ConfigError> {
        let templates: BTreeMap<String, Arc<MachineTemplate>> = config
            .templates()?
            .into_iter()
            .map(|(name, t)| (name, Arc::new(t)))
            .collect();
        let reserves = Reserves::new(
            config,
            Arc::clone(&parts.provider),
            &parts.rooms,
            &templates,
            parts.handoff.clone(),
        )
        .map(Arc::new);
        Ok(Self {
            capacity: Capacity::new(config, Arc::clone(&parts.provider)),
            provider: parts.provider,
            rooms: parts.rooms,
            ids: parts.ids,
            settings: SessionSettings::from(config),
            templates,
            reserves,
            handoff: parts.handoff,
            tasks,
            shutdown,
            listing: list::Listing::default(),
        })
    }

    /// The agents' reserves, when any agent keeps one.
    pub fn reserves(&self) -> Option<&Arc<Reserves>> {
        self.reserves.as_ref()
    }

    /// Admission: this replica's counts and queue.
    pub fn capacity(&self) -> &Capacity {
        &self.capacity
    }

    pub fn provider(&self) -> &Arc<dyn MachineProvider> {
        &self.provider
    }

    pub fn rooms(&self) -> &Arc<dyn RoomService> {
        &self.rooms
    }

    /// The room (and machine) name of session `key`.
    pub(super) fn resource_name(&self, key: &str) -> String {
        resource_name(&self.settings.deployment, key)
    }

    /// Verifies an id, its handle's shape and the caller's right to it. Another caller's
    /// session, or anything forged, reads as not found: its existence is not revealed.
    fn resolve(&self, caller: &Caller, id: &str, right: Right) -> Result<SessionRef, SessionError> {
        let session = self.ids.decode(id).ok_or(SessionError::NotFound)?;
        let any = match right {
            Right::Read => caller.may_read_any(),
            Right::Stop => caller.may_stop_any(),
        };
        if !(any || self.ids.is_owner(&session, &caller.sub)) {
            return Err(SessionError::NotFound);
        }
        // A handle that is not one of the provider's never reaches it.
        if !self.provider.is_handle(&session.handle) {
            tracing::warn!("a verified session id carries an invalid handle");
            return Err(SessionError::NotFound);
        }
        tracing::Span::current().record("session.key", session.key.as_str());
        Ok(session)
    }

    /// The session's machine, if the provider still knows it; `NotFound` unless it is
    /// botdispatch's, this deployment's and this session's. A machine that is over may have
    /// lost its labels (ECS deletes a stopped task's tags): it reads as ended, and nothing is
    /// ever done to it.
    async fn machine(&self, session: &SessionRef) -> Result<Option<MachineStatus>, SessionError> {
        let machine = self.provider.status(&session.handle).await.inspect_err(
            |e| tracing::warn!(machine.id = %session.handle, error = %e, "cannot read the machine"),
        )?;
        let Some(m) = machine else { return Ok(None) };
        match &m.labels {
            Some(labels) if labels.session_key == session.key => Ok(Some(m)),
            None if m.state.is_terminal() => Ok(Some(m)),
            _ => {
                tracing::warn!(machine.id = %session.handle, "a verified session id names a machine of another session");
                Err(SessionError::NotFound)
            }
        }
    }

    /// The session's machine for `caller` to act on with `right` (the session proxy), as
    /// [`Sessions::get`] reads it: `NotFound` unless the id verifies, the caller has the right
    /// and the machine is this session's; `None` when the provider no longer knows it.
    pub async fn machine_for(
        &self,
        caller: &Caller,
        id: &str,
        right: Right,
    ) -> Result<Option<MachineStatus>, SessionError> {
        let session = self.resolve(caller, id, right)?;
        self.machine(&session).await
    }

    /// The machine template of `agent` (the default agent's for machines labelled before
    /// agents had names), if it is configured.
    pub fn template(&self, agent: &str) -> Option<&MachineTemplate> {
        let agent = match agent {
            "" => self.settings.default_agent.as_str(),
            named => named,
        };
        self.templates.get(agent).map(AsRef::as_ref)
    }

    /// The session's state, read from the provider (works on any replica).
    #[instrument(name = "status", skip_all, fields(session.key = tracing::field::Empty))]
    pub async fn get(&self, caller: &Caller, id: &str) -> Result<SessionView, SessionError> {
        let session = self.resolve(caller, id, Right::Read)?;
        let machine = self.machine(&session).await?;
        Ok(SessionView::new(
            id,
            self.provider.name(),
            &session.handle,
            machine,
        ))
    }

    /// Stops the machine and deletes the room. Idempotent: a machine that is gone leaves only
    /// the room to delete.
    #[instrument(name = "stop", skip_all, fields(session.key = tracing::field::Empty))]
    pub async fn stop(&self, caller: &Caller, id: &str) -> Result<(), SessionError> {
        let session = self.resolve(caller, id, Right::Stop)?;
        let machine = self.machine(&session).await?;
        // A warm start's room may have come from a pool: its machine's labels name it.
        let room = machine
            .as_ref()
            .and_then(|m| m.labels.as_ref())
            .map(|l| l.room.clone())
            .unwrap_or_else(|| self.resource_name(&session.key));
        let terminate = async {
            match machine {
                Some(m) if !m.state.is_terminal() => self.provider.terminate(&session.handle).await,
                _ => Ok(()),
            }
        };
        let delete_room = async {
            match room.is_empty() {
                true => Ok(()),
                false => self.rooms.delete(&room).await,
            }
        };
        let (machine, room) = tokio::join!(terminate, delete_room);
        machine.inspect_err(|e| tracing::warn!(error = %e, "cannot stop the machine"))?;
        self.capacity.ended(&session.key);
        room.inspect_err(|e| tracing::warn!(error = %e, "cannot delete the room"))?;
        info!("session stopped");
        Ok(())
    }
}

/// What a caller wants to do with a session by id.
#[derive(Debug, Clone, Copy)]
pub enum Right {
    /// Read it: the owner, or a token with `sessions:read_any`.
    Read,
    /// Stop it or act on it (the session proxy): the owner, or a token with
    /// `sessions:stop_any`.
    Stop,
}
