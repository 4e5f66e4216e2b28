//! Admission control for `/start`, decided before anything is created:
//!
//! * a per-caller start rate (token bucket per JWT `sub`);
//! * `max_starts_in_flight` starts at once on this replica;
//! * `max_sessions` across all replicas, counted from the provider itself (the only place every
//!   replica sees).
//!
//! The session count is optimistic and lock-free for admissions: the provider's listing (the
//! live sessions' keys) is read in the background of admissions — at most one read at a time,
//! reused for `capacity_cache_ms`, read again at once when an admission finds the limit reached
//! on an older listing — and this replica's own starts in flight are counted exactly, each once:
//! a start whose machine is already listed is not counted again. An admission only takes a
//! short in-memory lock to check and record its start; it never waits on the provider unless
//! the limit looks reached. Across replicas, concurrent starts can overshoot the limit by at
//! most the starts in flight elsewhere that the last listing did not show yet.
//!
//! With `queue_timeout_secs`, a start that finds no capacity waits for a slot instead of a bare
//! 429: in one FIFO (so each agent's starts keep their order), at most `queue_max_length` per
//! agent, for up to the timeout; then 429 with a `Retry-After` from the release rate observed
//! (sessions that ended and starts that failed, over the last five minutes). Slots free when a
//! start of this replica fails, and when a listing shows sessions gone; while starts wait, the
//! provider is listed again at most every [`QUEUE_RECHECK`].

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::num::NonZeroU32;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use governor::clock::{Clock, DefaultClock};
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use tokio::sync::{Mutex as AsyncMutex, Notify, OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;
use tracing::Instrument;

use crate::config::Config;
use providers::MachineProvider;

/// How long a listing may take before admission gives up on it.
const LISTING_TIMEOUT: Duration = Duration::from_secs(2);
/// A start that finds the count full reads the provider again if its listing is older than
/// this (sessions may have ended since).
const FULL_RECHECK: Duration = Duration::from_millis(500);
/// While starts wait in the queue, the provider is read again at most this often.
pub const QUEUE_RECHECK: Duration = Duration::from_secs(1);
/// Releases (ended sessions, failed starts) are remembered this long for the retry hint.
const RELEASE_WINDOW: Duration = Duration::from_secs(300);

/// Why a start is refused; each carries a retry hint in seconds.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CapacityError {
    #[error("too many starts from this caller; slow down")]
    CallerRate { retry_after: u64 },
    #[error("this dispatcher is busy starting other sessions; try again shortly")]
    Busy { retry_after: u64 },
    #[error("at capacity: {max} sessions are running")]
    Full { max: u32, retry_after: u64 },
    #[error("at capacity, and {waiting} starts of this agent are already waiting")]
    QueueFull { waiting: usize, retry_after: u64 },
}

impl CapacityError {
    /// A short stable name for metrics.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::CallerRate { .. } => "caller_rate",
            Self::Busy { .. } => "busy",
            Self::Full { .. } => "at_capacity",
            Self::QueueFull { .. } => "queue_full",
        }
    }

    pub fn retry_after(&self) -> u64 {
        match self {
            Self::CallerRate { retry_after }
            | Self::Busy { retry_after }
            | Self::Full { retry_after, .. }
            | Self::QueueFull { retry_after, .. } => *retry_after,
        }
    }
}

/// Held by a start while it runs; dropping it frees its in-flight slot and its place in the
/// session count (its machine, if it has one, is counted from the provider's listing from then
/// on).
#[derive(Debug)]
pub struct StartPermit {
    _permit: OwnedSemaphorePermit,
    key: String,
    agent: String,
    shared: Arc<Shared>,
    /// The start left a session behind: it stays counted until a listing shows it.
    started: bool,
    /// How long the start waited in the queue.
    pub queued: Duration,
}

impl StartPermit {
    /// The start succeeded: its session keeps counting until the provider lists it.
    pub fn started(&mut self) {
        self.started = true;
    }
}

impl Drop for StartPermit {
    fn drop(&mut self) {
        {
            let mut state = self.shared.lock();
            if let Some(entry) = state.in_flight.get_mut(&self.key) {
                entry.0 -= 1;
                if entry.0 == 0 {
                    state.in_flight.remove(&self.key);
                }
            }
            if self.started {
                let entry = (Instant::now(), self.agent.clone());
                state.recent.insert(self.key.clone(), entry);
            } else {
                // A failed start frees its slot at once.
                state.released(1);
            }
        }
        self.shared.changed.notify_waiters();
    }
}

/// The provider's last listing, this replica's starts in flight and its queue.
#[derive(Debug, Default)]
struct CountState {
    /// Keys of the live sessions the provider listed (with their agent), and when.
    listed: HashMap<String, String>,
    listed_at: Option<Instant>,
    /// This replica's starts in flight, by session key (an idempotent retry shares its key).
    in_flight: HashMap<String, (usize, String)>,
    /// Sessions this replica started since its last listing was read: counted until a listing
    /// read after they started shows them (or shows them gone).
    recent: HashMap<String, (Instant, String)>,
    /// The last read of the provider failed.
    listing_failed: bool,
    /// Starts waiting for a slot, oldest first: (ticket, agent).
    queue: VecDeque<(u64, String)>,
    next_ticket: u64,
    /// When slots were freed (sessions gone, starts failed), within [`RELEASE_WINDOW`].
    releases: VecDeque<Instant>,
}

impl CountState {
    /// Sessions live or starting: listed ones, plus this replica's starts that the listing
    /// does not show. Each start is counted once.
    fn total(&self) -> usize {
        let unlisted = self
            .in_flight
            .iter()
            .filter(|(key, _)| !self.listed.contains_key(*key))
            .map(|(_, (n, _))| *n)
            .sum::<usize>();
        let recent = self
            .recent
            .keys()
            .filter(|key| !self.listed.contains_key(*key) && !self.in_flight.contains_key(*key))
            .count();
        self.listed.len() + unlisted + recent
    }

    fn released(&mut self, n: usize) {
        let now = Instant::now();
        self.releases.extend(std::iter::repeat_n(now, n));
        while self
            .releases
            .front()
            .is_some_and(|at| at.elapsed() > RELEASE_WINDOW)
        {
            self.releases.pop_front();
        }
    }

    /// Seconds until `ahead` more slots are likely free, from the release rate observed.
    fn retry_after(&self, ahead: usize) -> u64 {
        let Some(first) = self.releases.front() else {
            return 5;
        };
        let span = first.elapsed().as_secs_f64().max(1.0);
        let per_sec = self.releases.len() as f64 / span;
        ((ahead + 1) as f64 / per_sec).ceil().clamp(1.0, 300.0) as u64
    }

    fn waiting(&self, agent: &str) -> usize {
        self.queue.iter().filter(|(_, a)| a == agent).count()
    }
}

#[derive(Debug, Default)]
struct Shared {
    state: Mutex<CountState>,
    /// Told whenever a slot may have freed (a start ended, a listing was read).
    changed: Notify,
}

impl Shared {
    fn lock(&self) -> std::sync::MutexGuard<'_, CountState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// What [`Capacity::take`] decided.
enum Taken {
    Admitted(StartPermit),
    /// No room by the count (or not this start's turn in the queue).
    Full,
    /// No in-flight slot on this replica.
    Busy,
    /// Near the limit with no recent count.
    Unknown,
}

/// One agent's sessions as this replica counts them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AgentCount {
    /// Running sessions (listed by the provider, or started here since the last listing).
    pub live: usize,
    /// Starts in flight on this replica.
    pub starting: usize,
    /// Starts waiting in this replica's queue.
    pub queued: usize,
}

pub struct Capacity {
    provider: Arc<dyn MachineProvider>,
    max_sessions: u32,
    max_in_flight: u32,
    in_flight: Arc<Semaphore>,
    per_caller: Option<DefaultKeyedRateLimiter<String>>,
    cache_ttl: Duration,
    queue_timeout: Duration,
    queue_max: usize,
    shared: Arc<Shared>,
    /// One listing at a time; admissions that need a fresh one wait for the one in progress.
    listing: Arc<AsyncMutex<()>>,
}

impl Capacity {
    pub fn new(config: &Config, provider: Arc<dyn MachineProvider>) -> Self {
        let per_caller = NonZeroU32::new(config.starts_per_minute_per_caller)
            .map(|n| RateLimiter::keyed(Quota::per_minute(n)));
        Self {
            provider,
            max_sessions: config.max_sessions,
            max_in_flight: config.max_starts_in_flight,
            in_flight: Arc::new(Semaphore::new(config.max_starts_in_flight as usize)),
            per_caller,
            cache_ttl: Duration::from_millis(config.capacity_cache_ms),
            queue_timeout: Duration::from_secs(config.queue_timeout_secs),
            queue_max: config.queue_max_length as usize,
            shared: Arc::default(),
            listing: Arc::default(),
        }
    }

    /// Starts running on this replica now.
    pub fn in_flight(&self) -> usize {
        self.max_in_flight as usize - self.in_flight.available_permits()
    }

    /// The limit, the count, and each agent's share of it, as this replica sees them now.
    pub fn counts(&self) -> (u32, usize, BTreeMap<String, AgentCount>) {
        let state = self.shared.lock();
        let mut agents: BTreeMap<String, AgentCount> = BTreeMap::new();
        for (key, agent) in &state.listed {
            if !state.in_flight.contains_key(key) {
                agents.entry(agent.clone()).or_default().live += 1;
            }
        }
        for (key, (_, agent)) in &state.recent {
            if !state.listed.contains_key(key) && !state.in_flight.contains_key(key) {
                agents.entry(agent.clone()).or_default().live += 1;
            }
        }
        for (n, agent) in state.in_flight.values() {
            agents.entry(agent.clone()).or_default().starting += n;
        }
        for (_, agent) in &state.queue {
            agents.entry(agent.clone()).or_default().queued += 1;
        }
        (self.max_sessions, state.total(), agents)
    }

    /// A session this replica stopped: its slot is free now, not at the next listing.
    pub fn ended(&self, key: &str) {
        {
            let mut state = self.shared.lock();
            let listed = state.listed.remove(key).is_some();
            let recent = state.recent.remove(key).is_some();
            if listed || recent {
                state.released(1);
            }
        }
        self.shared.changed.notify_waiters();
    }

    /// Admits the start of session `key` of `agent` by `sub`, or says why not. With a queue
    /// configured, a start that finds no capacity waits its turn for up to the queue timeout.
    pub async fn admit(
        &self,
        sub: &str,
        key: &str,
        agent: &str,
    ) -> Result<StartPermit, CapacityError> {
        self.check_caller(sub)?;
        if !self.queue_timeout.is_zero() {
            // In the queue from the moment it arrives, so its turn follows arrival order.
            return self.wait_in_queue(key, agent).await;
        }
        self.revalidate().await;
        match self.take(key, agent, None, Duration::ZERO) {
            Taken::Admitted(p) => return Ok(p),
            Taken::Busy => return Err(CapacityError::Busy { retry_after: 1 }),
            Taken::Unknown => return Err(CapacityError::Busy { retry_after: 2 }),
            Taken::Full => {}
        }
        // Full by a listing that may be older than the sessions that ended since: read again
        // before refusing free capacity.
        self.refresh(FULL_RECHECK).await;
        match self.take(key, agent, None, Duration::ZERO) {
            Taken::Admitted(p) => Ok(p),
            Taken::Busy => Err(CapacityError::Busy { retry_after: 1 }),
            Taken::Unknown => Err(CapacityError::Busy { retry_after: 2 }),
            Taken::Full => Err(self.full(0)),
        }
    }

    /// Queues the start and waits for its turn and a slot, or the queue timeout.
    async fn wait_in_queue(&self, key: &str, agent: &str) -> Result<StartPermit, CapacityError> {
        let t0 = Instant::now();
        let ticket = {
            let mut state = self.shared.lock();
            let waiting = state.waiting(agent);
            if waiting >= self.queue_max {
                return Err(CapacityError::QueueFull {
                    waiting,
                    retry_after: state.retry_after(state.queue.len()),
                });
            }
            let ticket = state.next_ticket;
            state.next_ticket += 1;
            state.queue.push_back((ticket, agent.to_owned()));
            ticket
        };
        crate::metrics::queued(1.0);
        // Leaves the queue however this ends (admitted, timed out, or the client gone).
        let _leave = LeaveQueue {
            shared: &self.shared,
            ticket,
        };
        let deadline = t0 + self.queue_timeout;
        self.revalidate().await;
        loop {
            let changed = self.shared.changed.notified();
            match self.take(key, agent, Some(ticket), t0.elapsed()) {
                Taken::Admitted(p) => return Ok(p),
                Taken::Full | Taken::Busy | Taken::Unknown => {}
            }
            tokio::select! {
                () = changed => {}
                () = tokio::time::sleep(QUEUE_RECHECK) => self.refresh(QUEUE_RECHECK).await,
                () = tokio::time::sleep_until(deadline) => {
                    let state = self.shared.lock();
                    let ahead = state.queue.iter().take_while(|(t, _)| *t != ticket).count();
                    return Err(CapacityError::Full {
                        max: self.max_sessions,
                        retry_after: state.retry_after(ahead),
                    });
                }
            }
        }
    }

    /// Checks the count and records the start, in one short critical section. A queued start
    /// (`ticket`) goes only when it is the oldest waiting; an unqueued one only when nobody
    /// waits.
    fn take(&self, key: &str, agent: &str, ticket: Option<u64>, queued: Duration) -> Taken {
        let mut state = self.shared.lock();
        let turn = match ticket {
            Some(t) => state.queue.front().is_some_and(|(head, _)| *head == t),
            None => state.queue.is_empty(),
        };
        let total = state.total();
        if !turn || total >= self.max_sessions as usize {
            return Taken::Full;
        }
        // The provider could not be read lately: near the limit, refuse rather than risk
        // overshooting on an old count.
        if state.listing_failed && total + self.max_in_flight as usize >= self.max_sessions as usize
        {
            return Taken::Unknown;
        }
        let Ok(permit) = Arc::clone(&self.in_flight).try_acquire_owned() else {
            return Taken::Busy;
        };
        if ticket.is_some() {
            state.queue.pop_front();
        }
        state
            .in_flight
            .entry(key.to_owned())
            .or_insert_with(|| (0, agent.to_owned()))
            .0 += 1;
        Taken::Admitted(StartPermit {
            _permit: permit,
            key: key.to_owned(),
            agent: agent.to_owned(),
            shared: Arc::clone(&self.shared),
            started: false,
            queued,
        })
    }

    fn full(&self, ahead: usize) -> CapacityError {
        CapacityError::Full {
            max: self.max_sessions,
            retry_after: self.shared.lock().retry_after(ahead),
        }
    }

    fn check_caller(&self, sub: &str) -> Result<(), CapacityError> {
        let Some(limiter) = &self.per_caller else {
            return Ok(());
        };
        if limiter.len() > 100_000 {
            limiter.retain_recent();
        }
        limiter.check_key(&sub.to_owned()).map_err(|not_until| {
            let wait = not_until.wait_time_from(DefaultClock::default().now());
            CapacityError::CallerRate {
                retry_after: wait.as_secs_f64().ceil().max(1.0) as u64,
            }
        })
    }

    fn stale(&self) -> bool {
        self.shared
            .lock()
            .listed_at
            .is_none_or(|at| at.elapsed() >= self.cache_ttl)
    }

    /// Reads the count again when it is older than `capacity_cache_ms`: an admission waits
    /// for that read only when the count decides it — near the limit (within the starts this
    /// replica may have in flight), never read, or its last read failed. Otherwise it goes on
    /// with the count it has, which its own starts keep current, and the read runs in the
    /// background: a provider listing held to its rate limit (Fly: 1 a second per app, shared
    /// with the reserve) would otherwise hold every start for as long as it takes.
    async fn revalidate(&self) {
        if !self.stale() {
            return;
        }
        let decides = {
            let state = self.shared.lock();
            state.listed_at.is_none()
                || state.listing_failed
                || state.total() + self.max_in_flight as usize >= self.max_sessions as usize
        };
        if decides {
            self.refresh(self.cache_ttl).await;
            return;
        }
        // A listing in progress will do.
        if self.listing.try_lock().is_err() {
            return;
        }
        let reader = self.reader();
        let fresh = self.cache_ttl;
        tokio::spawn(async move { reader.refresh(fresh).await }.in_current_span());
    }

    /// Reads the provider's live sessions, unless another admission is reading them: then
    /// waits for that read. Skipped when the listing is younger than `fresh`. A failed read
    /// keeps the last listing.
    async fn refresh(&self, fresh: Duration) {
        self.reader().refresh(fresh).await
    }

    fn reader(&self) -> Reader {
        Reader {
            provider: Arc::clone(&self.provider),
            listing: Arc::clone(&self.listing),
            shared: Arc::clone(&self.shared),
        }
    }
}

/// What reading the provider's count takes, apart from the admission that asks for it.
struct Reader {
    provider: Arc<dyn MachineProvider>,
    listing: Arc<AsyncMutex<()>>,
    shared: Arc<Shared>,
}

impl Reader {
    /// See [`Capacity::refresh`].
    async fn refresh(&self, fresh: Duration) {
        let started = Instant::now();
        let _one = self.listing.lock().await;
        // Someone listed while we waited: that listing is newer than our need.
        let listed_at = self.shared.lock().listed_at;
        if listed_at.is_some_and(|at| at >= started || at.elapsed() < fresh) {
            return;
        }
        let asked = Instant::now();
        let listed = tokio::time::timeout(LISTING_TIMEOUT, self.provider.list_managed()).await;
        match listed {
            Ok(Ok(machines)) => {
                let live: HashMap<String, String> = machines
                    .into_iter()
                    .filter(|m| !m.state.is_terminal())
                    .filter_map(|m| m.labels.map(|l| (l.session_key, l.agent)))
                    .collect();
                crate::metrics::sessions_active(live.len());
                {
                    let mut state = self.shared.lock();
                    let gone = state
                        .listed
                        .keys()
                        .filter(|k| !live.contains_key(*k) && !state.in_flight.contains_key(*k))
                        .count();
                    state.released(gone);
                    state.listed = live;
                    state.listed_at = Some(Instant::now());
                    state.listing_failed = false;
                    // Sessions started before the listing was asked for are in it, if live.
                    state.recent.retain(|_, (at, _)| *at > asked);
                }
                self.shared.changed.notify_waiters();
            }
            failed => {
                let why = match failed {
                    Ok(Err(e)) => e.to_string(),
                    _ => format!("listing took longer than {LISTING_TIMEOUT:?}"),
                };
                tracing::warn!(error = %why, "cannot count sessions at the provider; using the last count");
                self.shared.lock().listing_failed = true;
            }
        }
    }
}

/// Takes a ticket out of the queue when its start stops waiting, however that happens.
struct LeaveQueue<'a> {
    shared: &'a Shared,
    ticket: u64,
}

impl Drop for LeaveQueue<'_> {
    fn drop(&mut self) {
        let mut state = self.shared.lock();
        let before = state.queue.len();
        state.queue.retain(|(t, _)| *t != self.ticket);
        let left = before != state.queue.len();
        drop(state);
        crate::metrics::queued(-1.0);
        if left {
            // The next one may be at the head now.
            self.shared.changed.notify_waiters();
        }
    }
}
