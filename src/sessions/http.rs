//! The `http` handoff's start (DESIGN §4, §10): a machine that boots without the session —
//! taken from the agent's reserve, else created cold — is made ready (started or resumed when
//! the reserve keeps it stopped or suspended, then its bot answers `GET /readyz`), and the
//! session is delivered with `POST /bot`. A machine that fails any of that is destroyed and the
//! next one tried (the next reserve machine, else a cold one), within the start deadline. Right
//! after delivery the machine gets SIGTERM, so no second session can ever reach that boot.

use std::collections::BTreeMap;
use std::sync::Arc;

use providers::{
    Launched, MachineProvider, ProviderError, SessionBinding, StartType, Tier, HANDOFF_SECRET_ENV,
};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn, Instrument};
use url::Url;

use super::cleanup::Created;
use super::plan::StartPlan;
use super::start::{confirm_labels, Deadlines, RoomChoice, Tokens};
use super::{SessionError, Sessions, Started};
use crate::handoff::{HandoffError, LaterAnswer, Session};
use crate::metrics;
use crate::rooms::{RoomError, RoomRequest};

/// One `http` start, owning what it needs (it may finish in the background after a 202).
pub(super) struct HttpStart {
    pub sessions: Arc<Sessions>,
    pub plan: StartPlan,
    /// The bot's HTTP port.
    pub port: u16,
    pub room: Option<RoomChoice>,
    pub tokens: Option<Tokens>,
    pub deadlines: Deadlines,
}

/// A machine taken or created for the session, not yet ready.
struct Candidate {
    launched: Launched,
    /// Its name: its handoff secret is derived from it.
    name: String,
    start: StartType,
    /// A reserve claim's lease, held until the handoff is over.
    lease: Option<String>,
}

/// What has been tried so far.
#[derive(Default)]
struct Attempts {
    reserve_empty: bool,
    cold_tried: bool,
}

impl HttpStart {
    /// Runs the start: the room ∥ the first machine; then (now, or in the background when the
    /// client does not wait) readiness and delivery, moving on to the next machine when one
    /// fails.
    pub async fn run(
        self,
        cancel: &CancellationToken,
        created: &Created,
    ) -> Result<Started, SessionError> {
        let t0 = Instant::now();
        let mut attempts = Attempts::default();
        let (room, first) = tokio::join!(
            self.create_room(created),
            self.next_machine(&mut attempts, created)
        );
        room?;
        let candidate = first?;
        let session_id = self.session_id(&candidate.launched);
        if !self.plan.wait {
            let started = self.started(session_id, false, candidate.start);
            self.finish_in_background(candidate, attempts);
            return Ok(started);
        }
        let start = self
            .complete(candidate, &mut attempts, cancel, created, t0)
            .await?;
        Ok(self.started(start.0, true, start.1))
    }

    fn started(&self, session_id: String, ready: bool, start_type: StartType) -> Started {
        Started {
            session_id,
            room_url: self.tokens.as_ref().map(|t| t.room_url.clone()),
            user_token: self.tokens.as_ref().map(|t| t.user.clone()),
            ready,
            start_type,
            queued: std::time::Duration::ZERO,
        }
    }

    fn session_id(&self, launched: &Launched) -> String {
        self.sessions
            .ids
            .encode(&self.plan.key, &launched.handle, &self.plan.owner)
    }

    /// Makes `candidate` (or, when it fails, the next machines) ready and hands it the
    /// session. Returns the session id and how its machine came to it.
    async fn complete(
        &self,
        mut candidate: Candidate,
        attempts: &mut Attempts,
        cancel: &CancellationToken,
        created: &Created,
        t0: Instant,
    ) -> Result<(String, StartType), SessionError> {
        loop {
            created.machine(&candidate.launched.handle);
            match self.ready_and_deliver(&candidate, cancel).await {
                Ok(launched) => {
                    self.delivered(&launched, &candidate, t0);
                    return Ok((self.session_id(&launched), candidate.start));
                }
                Err(e) => {
                    let reason = failure_reason(&e);
                    metrics::handoff_failure("before", reason);
                    warn!(machine.id = %candidate.launched.handle, error = %e, start = candidate.start.as_str(), "the machine did not take the session; destroying it");
                    self.discard(&candidate);
                    created.no_machine();
                    if matches!(e, SessionError::ClientGone | SessionError::ShuttingDown)
                        || self.deadlines.start.is_past()
                    {
                        return Err(e);
                    }
                    candidate = match self.next_machine(attempts, created).await {
                        Ok(next) => next,
                        Err(_) => return Err(e),
                    };
                }
            }
        }
    }

    /// After delivery, in the background (the client need not wait): SIGTERM, then the
    /// session's real deadline, and the claim's lease released; and the log line.
    fn delivered(&self, launched: &Launched, candidate: &Candidate, t0: Instant) {
        let start = candidate.start;
        let provider = Arc::clone(&self.sessions.provider);
        let handle = launched.handle.clone();
        let lease = candidate.lease.clone();
        let sessions = Arc::clone(&self.sessions);
        let deadlines = self.deadlines;
        let timings = self.plan.timings();
        self.sessions.tasks.spawn(
            async move {
                if let Some(handoff) = provider.handoff() {
                    if let Err(e) = handoff.end_after_session(&handle, lease.as_deref()).await {
                        warn!(machine.id = %handle, error = %e, "cannot send SIGTERM after the handoff; the machine stays a session's and gets no other");
                    }
                }
                match (lease, provider.reserve()) {
                    (Some(lease), Some(reserve)) => {
                        let labels = confirm_labels(&deadlines, Some(timings));
                        if let Err(e) = reserve.release(&handle, &lease, &labels).await {
                            warn!(machine.id = %handle, error = %e, "cannot set the session's deadline; the reaper will stop it early");
                        }
                    }
                    _ => sessions.confirm(&handle, &deadlines, Some(timings)),
                }
            }
            .in_current_span(),
        );
        let provider = self.sessions.provider.name();
        metrics::start_phase(provider, "handoff", t0.elapsed());
        info!(machine.id = %launched.handle, start = start.as_str(), total_ms = t0.elapsed().as_millis() as u64, "session handed to its bot");
    }

    /// Creates the session's room unless it came from the pool (recorded in `created`
    /// either way: a failed start deletes it).
    async fn create_room(&self, created: &Created) -> Result<(), SessionError> {
        let Some(room) = &self.room else {
            return Ok(());
        };
        if room.pooled {
            created.room(&room.name);
            return Ok(());
        }
        let req = RoomRequest {
            name: room.name.clone(),
            exp: self.deadlines.session_end.wall(),
            properties: self.plan.room_properties.clone(),
            deadline: Some(self.deadlines.start.instant()),
        };
        let rooms = &self.sessions.rooms;
        let result = tokio::time::timeout_at(self.deadlines.start.instant(), rooms.create(&req))
            .await
            .unwrap_or_else(|_| Err(RoomError::unavailable("create room: timed out")));
        if !matches!(result, Err(RoomError::Rejected { .. })) {
            created.room(&room.name);
        }
        result.map(drop).map_err(SessionError::from)
    }

    /// The next machine: a reserve machine while the reserve has one, else (once) a cold one.
    async fn next_machine(
        &self,
        attempts: &mut Attempts,
        created: &Created,
    ) -> Result<Candidate, SessionError> {
        if !attempts.reserve_empty {
            let claimed = match &self.sessions.reserves {
                Some(reserves) => {
                    let labels = self.labels(StartType::Cold);
                    reserves.claim(&self.plan.agent, &labels).await
                }
                None => None,
            };
            match claimed {
                Some(claimed) => {
                    created.machine(&claimed.machine.handle);
                    return Ok(Candidate {
                        launched: claimed.machine.as_launched(),
                        name: claimed.name,
                        start: StartType::Warm(claimed.tier),
                        lease: claimed.lease,
                    });
                }
                None => attempts.reserve_empty = true,
            }
        }
        if attempts.cold_tried {
            return Err(SessionError::Handoff(HandoffError::Unreachable(
                "no machine took the session".into(),
            )));
        }
        attempts.cold_tried = true;
        self.launch_cold(created).await
    }

    fn labels(&self, start: StartType) -> providers::SessionLabels {
        self.sessions
            .labels(&self.plan, self.tokens.as_ref(), &self.deadlines, start)
    }

    /// Creates a machine for the session: its template's env and its own handoff secret, no
    /// session in it.
    async fn launch_cold(&self, created: &Created) -> Result<Candidate, SessionError> {
        let name = self.sessions.resource_name(&self.plan.key);
        let secret = self.sessions.handoff.secrets.for_machine(&name);
        let binding = SessionBinding {
            name: name.clone(),
            env: BTreeMap::from([(HANDOFF_SECRET_ENV.to_owned(), secret)]),
            labels: self.labels(StartType::Cold),
            deadline: self.deadlines.start,
        };
        let provider = &self.sessions.provider;
        let launched = tokio::time::timeout_at(
            self.deadlines.start.instant(),
            provider.launch(&self.plan.template, &binding),
        )
        .await
        .unwrap_or_else(|_| {
            Err(ProviderError::Timeout {
                provider: provider.name(),
            })
        });
        match &launched {
            Ok(l) => created.machine(&l.handle),
            Err(ProviderError::Timeout { .. } | ProviderError::Unavailable { .. }) => {
                created.machine_maybe()
            }
            Err(_) => {}
        }
        let launched = launched.map_err(|e| self.sessions.start_error(e))?;
        Ok(Candidate {
            launched,
            name,
            start: StartType::Cold,
            lease: None,
        })
    }

    /// Starts (or resumes) the machine where its tier keeps it stopped, waits until its bot
    /// answers `/readyz`, and delivers the session. The machine as finally started.
    async fn ready_and_deliver(
        &self,
        candidate: &Candidate,
        cancel: &CancellationToken,
    ) -> Result<Launched, SessionError> {
        let provider = &self.sessions.provider;
        let deadline = self.deadlines.start;
        let launched = match candidate.start {
            StartType::Warm(Tier::Hot) => candidate.launched.clone(),
            StartType::Warm(_) => {
                let reserve = provider
                    .reserve()
                    .ok_or_else(|| no_capability(provider.as_ref()))?;
                let lease = candidate.lease.as_deref();
                let started = reserve.start(&candidate.launched.handle, lease).await?;
                self.sessions
                    .wait_started(&started, deadline, cancel)
                    .await?;
                started
            }
            StartType::Cold => {
                self.sessions
                    .wait_started(&candidate.launched, deadline, cancel)
                    .await?;
                candidate.launched.clone()
            }
        };
        let handoff = provider
            .handoff()
            .ok_or_else(|| no_capability(provider.as_ref()))?;
        let url = handoff.bot_url(&launched, self.port)?;
        let client = &self.sessions.handoff.client;
        tokio::select! {
            ready = client.wait_ready(&url, deadline) => ready?,
            () = cancel.cancelled() => return Err(self.sessions.cancelled()),
        }
        self.deliver(&launched, &url, &candidate.name).await?;
        Ok(launched)
    }

    async fn deliver(
        &self,
        launched: &Launched,
        url: &Url,
        name: &str,
    ) -> Result<(), SessionError> {
        let secret = self.sessions.handoff.secrets.for_machine(name);
        let session = Session {
            room_url: self.tokens.as_ref().map(|t| t.room_url.as_str()),
            room_token: self.tokens.as_ref().map(|t| t.bot.as_str()),
            session_key: &self.plan.key,
            body_json: &self.plan.body_json,
            secret: &secret,
        };
        let provider = Arc::clone(&self.sessions.provider);
        let handle = launched.handle.clone();
        let later = move |answer: LaterAnswer| refused_later(provider, handle, answer);
        self.sessions
            .handoff
            .client
            .deliver(url, &session, later)
            .await
            .map_err(SessionError::from)
    }

    /// Destroys a machine that did not take the session (its claim's lease released first),
    /// in the background.
    fn discard(&self, candidate: &Candidate) {
        let provider = Arc::clone(&self.sessions.provider);
        let handle = candidate.launched.handle.clone();
        let lease = candidate.lease.clone();
        self.sessions.tasks.spawn(
            async move {
                if let (Some(lease), Some(reserve)) = (lease, provider.reserve()) {
                    let _ = reserve.release(&handle, &lease, &BTreeMap::new()).await;
                }
                if let Err(e) = provider.terminate(&handle).await {
                    warn!(machine.id = %handle, error = %e, "cannot destroy a machine that failed its handoff; left for the reaper");
                }
            }
            .in_current_span(),
        );
    }

    /// The client does not wait (202): readiness and delivery go on in a tracked task, which
    /// cleans up what it has if it fails.
    fn finish_in_background(self, candidate: Candidate, mut attempts: Attempts) {
        let sessions = Arc::clone(&self.sessions);
        let created = sessions.created(&self.plan.key);
        if let Some(room) = &self.room {
            created.room(&room.name);
        }
        let cancel = sessions.shutdown.child_token();
        sessions.tasks.spawn(
            async move {
                let t0 = Instant::now();
                match self
                    .complete(candidate, &mut attempts, &cancel, &created, t0)
                    .await
                {
                    Ok(_) => created.keep(),
                    Err(e) => {
                        warn!(error = %e, "a start answered 202 failed its handoff; cleaning up");
                        created.clean_up().await;
                    }
                }
            }
            .in_current_span(),
        );
    }
}

/// What a bot's `/bot` answered after the session counted as delivered: an error marks the
/// session failed (a label the session view reads) and ends its machine; a normal end, or a
/// connection that drops, is nothing to act on.
fn refused_later(provider: Arc<dyn MachineProvider>, handle: String, answer: LaterAnswer) {
    let Ok(status) = answer else { return };
    if status < 400 {
        return;
    }
    metrics::handoff_failure("after", "refused");
    tokio::spawn(async move {
        warn!(machine.id = %handle, status, "the bot refused its session after delivery; the session failed");
        if let Some(relabel) = provider.relabel() {
            let failure = format!("the bot refused the session with HTTP {status}");
            let labels = BTreeMap::from([(providers::labels::key::FAILURE.to_owned(), failure)]);
            let _ = relabel.set_labels(&handle, &labels).await;
        }
        let _ = provider.terminate(&handle).await;
    });
}

fn failure_reason(e: &SessionError) -> &'static str {
    match e {
        SessionError::Handoff(HandoffError::NotReady(_)) | SessionError::StartTimeout(_) => {
            "not_ready"
        }
        SessionError::Handoff(HandoffError::Refused(_)) => "refused",
        SessionError::Handoff(HandoffError::Unreachable(_)) => "unreachable",
        SessionError::Provider(_) => "provider",
        _ => "other",
    }
}

fn no_capability(provider: &dyn MachineProvider) -> SessionError {
    SessionError::Provider(ProviderError::config(
        provider.name(),
        "this provider cannot hand sessions over HTTP",
    ))
}
