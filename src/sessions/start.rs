//! The start flow: admission, the start task, and its steps — the room, tokens, an idempotent
//! retry's resumption, then the `env` handoff (room ∥ machine launched with the session, the
//! wait for the machine) or the `http` one ([`super::http`]) — with [`Created`] cleaning up on
//! every way a start can fail.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use providers::{
    Deadline, Launched, MachineState, MachineStatus, ProviderError, SessionBinding, SessionLabels,
    StartType, Timings,
};
use serde_json::Map;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{info, instrument, Instrument};

use super::cleanup::Created;
use super::plan::{StartPlan, StartRequest};
use super::{SessionError, Sessions, Started};
use crate::auth::Caller;
use crate::metrics;
use crate::rooms::{RoomError, RoomRequest, TokenRequest};

/// A start's deadlines. Labels, room `exp` and token `exp` carry whole unix seconds.
#[derive(Clone, Copy)]
pub(super) struct Deadlines {
    /// The start must be answered by then.
    pub start: Deadline,
    /// The session must be over by then, whatever the bot does.
    pub session_end: Deadline,
    /// The machine's deadline until the client has its answer (see [`Sessions::deadlines`]).
    pub provisional: Deadline,
}

/// The session's room: named after the session and created now, or taken from this replica's
/// pool (created ahead).
#[derive(Debug, Clone)]
pub(super) struct RoomChoice {
    pub name: String,
    pub url: String,
    pub pooled: bool,
}

/// The room's URL and both tokens, when the start has a room.
#[derive(Clone)]
pub(super) struct Tokens {
    pub room_url: String,
    pub room: String,
    pub bot: String,
    pub user: String,
}

/// How long each phase took, for metrics and the log.
#[derive(Default)]
struct Phases {
    room: Option<Duration>,
    launch: Duration,
    wait: Option<Duration>,
}

impl Sessions {
    /// Validates, admits and runs a start. The start runs as its own tracked task: if this
    /// future is dropped (the client disconnected), the task is cancelled and cleans up what
    /// it created; a shutdown past its grace period cancels it too.
    pub async fn start(
        self: &Arc<Self>,
        caller: &Caller,
        agent: Option<&str>,
        idempotency_key: Option<&[u8]>,
        req: StartRequest,
    ) -> Result<Started, SessionError> {
        let mut plan = self.plan(caller, agent, idempotency_key, req)?;
        if self.shutdown.is_cancelled() {
            return Err(SessionError::ShuttingDown);
        }
        let mut permit = self
            .capacity
            .admit(&caller.sub, &plan.key, &plan.agent)
            .await
            .inspect_err(|e| metrics::admission_refused(e.reason()))?;
        plan.queued = permit.queued;
        let cancel = self.shutdown.child_token();
        // A client that goes away cancels its start, unless it sent an Idempotency-Key: then it
        // will retry with the key, and the start runs to its end so that the retry finds it
        // (the provisional deadline still reaps it if nobody comes back).
        let client_gone = (!plan.idempotent).then(|| cancel.clone().drop_guard());
        let this = Arc::clone(self);
        // The task keeps the request's span (and so its request id) as the parent of its own.
        let task = self.tasks.spawn(
            async move {
                let result = this.run(plan, cancel).await;
                if result.is_ok() {
                    permit.started();
                }
                let queued = permit.queued;
                drop(permit);
                result.map(|started| Started { queued, ..started })
            }
            .in_current_span(),
        );
        let result = task.await;
        client_gone.map(|guard| guard.disarm());
        result.unwrap_or_else(|e| {
            tracing::error!(error = %e, "start task panicked");
            Err(SessionError::Internal)
        })
    }

    /// Starts running on this replica now.
    pub fn starts_in_flight(&self) -> usize {
        self.capacity.in_flight()
    }

    /// Runs a planned start to its end; on failure, what it created is destroyed before the
    /// error is returned.
    #[instrument(name = "start", skip_all, fields(session.key = %plan.key, agent = %plan.agent, provider = self.provider.name()))]
    async fn run(
        self: Arc<Self>,
        plan: StartPlan,
        cancel: CancellationToken,
    ) -> Result<Started, SessionError> {
        let t0 = Instant::now();
        metrics::starting(1.0);
        let created = self.created(&plan.key);
        let result = self.run_steps(&plan, &cancel, &created).await;
        match &result {
            Ok(_) => created.keep(),
            Err(e) => {
                tracing::warn!(error = %e, "start failed; cleaning up");
                Box::pin(created.clean_up()).await;
            }
        }
        metrics::starting(-1.0);
        let outcome = match &result {
            Ok(s) if s.ready => "ready",
            Ok(_) => "accepted",
            Err(e) => e.outcome(),
        };
        let start_type = result.as_ref().map_or("none", |s| s.start_type.as_str());
        metrics::start_finished(
            &plan.agent,
            self.provider.name(),
            start_type,
            outcome,
            t0.elapsed(),
        );
        result
    }

    /// A new record of what the start of session `key` creates.
    pub(super) fn created(&self, key: &str) -> Created {
        Created::new(
            Arc::clone(&self.provider),
            Arc::clone(&self.rooms),
            self.tasks.clone(),
            key,
        )
    }

    async fn run_steps(
        self: &Arc<Self>,
        plan: &StartPlan,
        cancel: &CancellationToken,
        created: &Created,
    ) -> Result<Started, SessionError> {
        let deadlines = self.deadlines();
        let room = self.choose_room(plan);
        let tokens = self.mint_tokens(plan, room.as_ref(), deadlines.session_end)?;
        // Each way a start can go is boxed, so a task holds only the one it takes: an `env`
        // start's future is about 1 KB, the task's was 4.7 KB unboxed (release build), and a
        // thousand starts may wait at once.
        // An idempotent retry whose machine exists already answers with that session.
        if plan.idempotent {
            if let Some(started) = Box::pin(self.resume(plan, &tokens, &deadlines, cancel)).await? {
                return Ok(started);
            }
        }
        match plan.template.handoff_port {
            None => Box::pin(self.start_env(plan, &tokens, &deadlines, cancel, created)).await,
            Some(port) => {
                let start = super::http::HttpStart {
                    sessions: Arc::clone(self),
                    plan: plan.clone(),
                    port,
                    room,
                    tokens,
                    deadlines,
                };
                Box::pin(start.run(cancel, created)).await
            }
        }
    }

    /// The `env` handoff: the room ∥ a machine launched with the session in its env; then
    /// (unless the client does not wait) the wait for the machine to start.
    async fn start_env(
        &self,
        plan: &StartPlan,
        tokens: &Option<Tokens>,
        deadlines: &Deadlines,
        cancel: &CancellationToken,
        created: &Created,
    ) -> Result<Started, SessionError> {
        let t0 = Instant::now();
        let session = self.binding(plan, tokens.as_ref(), deadlines);
        let mut phases = Phases::default();
        let launched = self
            .launch_with_room(plan, &session, deadlines, created, &mut phases)
            .await?;
        if cancel.is_cancelled() {
            return Err(self.cancelled());
        }
        if plan.wait {
            let t = Instant::now();
            self.wait_started(&launched, deadlines.start, cancel)
                .await?;
            phases.wait = Some(t.elapsed());
        }
        self.record(&phases, &launched, t0.elapsed(), plan.wait);
        // With `wait: false` the bot's start is not seen here: no timings.
        let timings = plan.wait.then(|| plan.timings());
        self.confirm(&launched.handle, deadlines, timings);
        Ok(Started {
            session_id: self.ids.encode(&plan.key, &launched.handle, &plan.owner),
            room_url: tokens.as_ref().map(|t| t.room_url.clone()),
            user_token: tokens.as_ref().map(|t| t.user.clone()),
            ready: plan.wait,
            start_type: StartType::Cold,
            queued: Duration::ZERO,
        })
    }

    /// The session's room, if it has one: from this replica's pool for the agent when the
    /// agent keeps one and the client asked for no room properties (a room created ahead has
    /// none), else one named after the session.
    fn choose_room(&self, plan: &StartPlan) -> Option<RoomChoice> {
        if !plan.create_room {
            return None;
        }
        // A retry with an Idempotency-Key must find the same room: pool rooms are for starts
        // without one.
        let pooled = (plan.room_properties.is_empty() && !plan.idempotent)
            .then(|| self.reserves.as_ref()?.take_room(&plan.agent))
            .flatten();
        Some(match pooled {
            Some(room) => RoomChoice {
                name: room.name,
                url: room.url,
                pooled: true,
            },
            None => {
                let name = self.resource_name(&plan.key);
                RoomChoice {
                    url: self.rooms.room_url(&name),
                    name,
                    pooled: false,
                }
            }
        })
    }

    /// Now's deadlines. Where the provider can relabel, the machine first gets a deadline just
    /// past the start timeout and only the real one once the client has its answer: if this
    /// dispatcher dies in between, the reaper removes the machine soon instead of at the
    /// session's end.
    pub(super) fn deadlines(&self) -> Deadlines {
        let whole = |after: Duration| {
            Deadline::from_unix_secs(chrono::Utc::now().timestamp() + after.as_secs() as i64)
                .unwrap_or_else(|| Deadline::after(after))
        };
        let session_end = whole(self.settings.max_session);
        let provisional = match self.provider.relabel() {
            Some(_) => {
                whole(self.settings.start_timeout + self.settings.reaper_grace).min(session_end)
            }
            None => session_end,
        };
        Deadlines {
            start: Deadline::after(self.settings.start_timeout),
            session_end,
            provisional,
        }
    }

    /// The room's URL and both tokens, signed locally from the room's name: the bot gets its
    /// token at launch while the room is still being created.
    fn mint_tokens(
        &self,
        plan: &StartPlan,
        room: Option<&RoomChoice>,
        session_end: Deadline,
    ) -> Result<Option<Tokens>, SessionError> {
        let Some(room) = room else {
            return Ok(None);
        };
        let token = |owner: bool, properties| {
            self.rooms.mint_token(&TokenRequest {
                room: &room.name,
                owner,
                exp: session_end.wall(),
                properties,
            })
        };
        Ok(Some(Tokens {
            room_url: room.url.clone(),
            room: room.name.clone(),
            bot: token(true, &Map::new())?,
            user: token(false, &plan.token_properties)?,
        }))
    }

    /// The session's side of the launch: the bot contract and the labels.
    fn binding(
        &self,
        plan: &StartPlan,
        tokens: Option<&Tokens>,
        deadlines: &Deadlines,
    ) -> SessionBinding {
        let name = self.resource_name(&plan.key);
        let room = tokens.map(|t| (t.room_url.as_str(), t.bot.as_str()));
        let env = contract_env(&plan.key, room, &plan.body_json);
        SessionBinding {
            labels: self.labels(plan, tokens, deadlines, StartType::Cold),
            name,
            env,
            deadline: deadlines.start,
        }
    }

    /// The session's labels, as its machine carries them.
    pub(super) fn labels(
        &self,
        plan: &StartPlan,
        tokens: Option<&Tokens>,
        deadlines: &Deadlines,
        start: StartType,
    ) -> SessionLabels {
        SessionLabels {
            session_key: plan.key.clone(),
            owner: plan.owner.clone(),
            room: tokens.map(|t| t.room.clone()).unwrap_or_default(),
            agent: plan.agent.clone(),
            deployment: self.settings.deployment.clone(),
            start,
            deadline: deadlines.provisional,
            timings: None,
        }
    }

    /// Creates the room and launches the machine concurrently: the critical path is the
    /// slower of the two. Records in `created` what may exist, whatever happens.
    async fn launch_with_room(
        &self,
        plan: &StartPlan,
        session: &SessionBinding,
        deadlines: &Deadlines,
        created: &Created,
        phases: &mut Phases,
    ) -> Result<Launched, SessionError> {
        let room = async {
            if !plan.create_room {
                return None;
            }
            let t = Instant::now();
            let req = RoomRequest {
                name: session.labels.room.clone(),
                exp: deadlines.session_end.wall(),
                properties: plan.room_properties.clone(),
                deadline: Some(deadlines.start.instant()),
            };
            let result =
                tokio::time::timeout_at(deadlines.start.instant(), self.rooms.create(&req))
                    .await
                    .unwrap_or_else(|_| Err(RoomError::unavailable("create room: timed out")));
            Some((result, t.elapsed()))
        };
        let launch = async {
            let t = Instant::now();
            let result = tokio::time::timeout_at(
                deadlines.start.instant(),
                self.provider.launch(&plan.template, session),
            )
            .await
            .unwrap_or_else(|_| {
                Err(ProviderError::Timeout {
                    provider: self.provider.name(),
                })
            });
            (result, t.elapsed())
        };
        let (room, (launched, launch_time)) = tokio::join!(room, launch);
        phases.launch = launch_time;
        match &room {
            // Refused: nothing was created.
            None | Some((Err(RoomError::Rejected { .. }), _)) => {}
            Some(_) => created.room(&session.labels.room),
        }
        match &launched {
            Ok(l) => created.machine(&l.handle),
            Err(ProviderError::Timeout { .. } | ProviderError::Unavailable { .. }) => {
                created.machine_maybe()
            }
            Err(_) => {}
        }
        let launched = launched.map_err(|e| self.start_error(e))?;
        if let Some((result, t)) = room {
            result?;
            phases.room = Some(t);
        }
        Ok(launched)
    }

    /// Waits for the machine to start, until the start deadline or the client leaves.
    pub(super) async fn wait_started(
        &self,
        launched: &Launched,
        deadline: Deadline,
        cancel: &CancellationToken,
    ) -> Result<(), SessionError> {
        let wait = tokio::time::timeout_at(
            deadline.instant(),
            self.provider.wait_started(launched, deadline),
        );
        tokio::select! {
            r = wait => r
                .unwrap_or(Err(ProviderError::Timeout { provider: self.provider.name() }))
                .map_err(|e| self.start_error(e)),
            () = cancel.cancelled() => Err(self.cancelled()),
        }
    }

    /// A provider error of a start, with the provider's timeout as the start timeout.
    pub(super) fn start_error(&self, e: ProviderError) -> SessionError {
        match e {
            ProviderError::Timeout { .. } => {
                SessionError::StartTimeout(self.settings.start_timeout.as_secs())
            }
            e => e.into(),
        }
    }

    /// Why a start's cancellation token fired.
    pub(super) fn cancelled(&self) -> SessionError {
        if self.shutdown.is_cancelled() {
            SessionError::ShuttingDown
        } else {
            SessionError::ClientGone
        }
    }

    fn record(&self, phases: &Phases, launched: &Launched, total: Duration, ready: bool) {
        let provider = self.provider.name();
        if let Some(t) = phases.room {
            metrics::start_phase(provider, "room", t);
        }
        metrics::start_phase(provider, "launch", phases.launch);
        if let Some(t) = phases.wait {
            metrics::start_phase(provider, "wait", t);
        }
        metrics::start_phase(provider, "total", total);
        info!(
            machine.id = %launched.handle,
            room_ms = phases.room.map(|t| t.as_millis() as u64),
            launch_ms = phases.launch.as_millis() as u64,
            wait_ms = phases.wait.map(|t| t.as_millis() as u64),
            total_ms = total.as_millis() as u64,
            ready,
            "session started"
        );
    }

    /// Once the start answered: gives the machine its real deadline and records how the start
    /// went, in one call in the background (off the critical path).
    pub(super) fn confirm(&self, handle: &str, deadlines: &Deadlines, timings: Option<Timings>) {
        let labels = confirm_labels(deadlines, timings);
        if labels.is_empty() {
            return;
        }
        let provider = Arc::clone(&self.provider);
        let handle = handle.to_owned();
        self.tasks.spawn(
            async move {
                let Some(relabel) = provider.relabel() else { return };
                if let Err(e) = relabel.set_labels(&handle, &labels).await {
                    tracing::error!(machine.id = %handle, error = %e, "cannot give the machine its real deadline; the reaper will stop it early");
                }
            }
            .in_current_span(),
        );
    }

    /// Moves the machine's deadline label to `session_end`, in the background.
    fn extend_deadline(&self, handle: &str, session_end: Deadline) {
        let provider = Arc::clone(&self.provider);
        let handle = handle.to_owned();
        self.tasks.spawn(
            async move {
                let Some(relabel) = provider.relabel() else { return };
                if let Err(e) = relabel.set_deadline(&handle, session_end).await {
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
        tokens: &Option<Tokens>,
        deadlines: &Deadlines,
        cancel: &CancellationToken,
    ) -> Result<Option<Started>, SessionError> {
        let found = match self.provider.find(&plan.key).await? {
            Some(machine) => Some(machine),
            None => self.in_flight_elsewhere(plan, tokens, deadlines).await?,
        };
        let Some(machine) = found else {
            return Ok(None);
        };
        if machine.state.is_terminal() {
            return Err(SessionError::IdempotencyKeyUsed);
        }
        let mut ready = machine.state == MachineState::Started;
        if plan.wait && !ready {
            self.wait_started(&machine.as_launched(), deadlines.start, cancel)
                .await?;
            ready = true;
        }
        // The start that launched it may have died before giving it its real deadline.
        if let Some(created) = machine.created_at {
            let end =
                created + chrono::Duration::from_std(self.settings.max_session).unwrap_or_default();
            let session_end = Deadline::from_unix_secs(end.timestamp())
                .unwrap_or(deadlines.session_end)
                .min(deadlines.session_end);
            if machine
                .labels
                .as_ref()
                .is_some_and(|l| l.deadline < session_end)
            {
                self.extend_deadline(&machine.handle, session_end);
            }
        }
        info!(machine.id = %machine.handle, "idempotent retry answered with the existing session");
        let labels = machine.labels.as_ref();
        Ok(Some(Started {
            session_id: self.ids.encode(&plan.key, &machine.handle, &plan.owner),
            room_url: tokens.as_ref().map(|t| t.room_url.clone()),
            user_token: tokens.as_ref().map(|t| t.user.clone()),
            ready,
            start_type: labels.map_or(StartType::Cold, |l| l.start),
            queued: Duration::ZERO,
        }))
    }
}

impl Sessions {
    /// An idempotent retry found no machine for its key. If the key's room exists, a start of
    /// the same key may be in flight on another replica (the room is created alongside the
    /// launch): while the room is young, wait for its machine to show up. The machine that
    /// shows up; `None` (start afresh) when there is no room or it went away (that start
    /// failed and cleaned up); `IdempotencyKeyUsed` when the room outlived any start (this
    /// key's session ran and is over).
    async fn in_flight_elsewhere(
        &self,
        plan: &StartPlan,
        tokens: &Option<Tokens>,
        deadlines: &Deadlines,
    ) -> Result<Option<MachineStatus>, SessionError> {
        let Some(room) = tokens
            .as_ref()
            .map(|t| t.room.as_str())
            .filter(|r| !r.is_empty())
        else {
            return Ok(None);
        };
        let young_for = self.settings.start_timeout + self.settings.reaper_grace;
        loop {
            let Some(listed) = self.rooms.find(room).await? else {
                return Ok(None);
            };
            let age = listed.created_at.map_or(Duration::MAX, |c| {
                (chrono::Utc::now() - c).to_std().unwrap_or_default()
            });
            if age > young_for || deadlines.start.is_past() {
                return Err(SessionError::IdempotencyKeyUsed);
            }
            tokio::time::sleep(Duration::from_millis(200).min(deadlines.start.remaining())).await;
            if let Some(machine) = self.provider.find(&plan.key).await? {
                return Ok(Some(machine));
            }
        }
    }
}

/// The labels a start writes once it answered: the real deadline (when the first was
/// provisional) and the timings.
pub(super) fn confirm_labels(
    deadlines: &Deadlines,
    timings: Option<Timings>,
) -> BTreeMap<String, String> {
    let mut labels = timings.map(Timings::to_map).unwrap_or_default();
    if deadlines.provisional < deadlines.session_end {
        labels.insert(
            providers::labels::key::DEADLINE.to_owned(),
            deadlines.session_end.unix_secs().to_string(),
        );
    }
    labels
}

/// The bot contract's env: the room and its owner token (when the start has a room), the plain
/// session key and the client's body.
pub(super) fn contract_env(
    key: &str,
    room: Option<(&str, &str)>,
    body_json: &str,
) -> BTreeMap<String, String> {
    let mut env = BTreeMap::new();
    if let Some((url, token)) = room {
        env.insert("DAILY_ROOM_URL".into(), url.to_owned());
        env.insert("DAILY_ROOM_TOKEN".into(), token.to_owned());
    }
    env.insert("BOTDISPATCH_SESSION_ID".into(), key.to_owned());
    env.insert("BOTDISPATCH_BODY".into(), body_json.to_owned());
    env
}
