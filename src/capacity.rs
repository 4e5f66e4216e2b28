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

use std::collections::{HashMap, HashSet};
use std::num::NonZeroU32;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use governor::clock::{Clock, DefaultClock};
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use tokio::sync::{Mutex as AsyncMutex, OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;

use crate::config::Config;
use providers::MachineProvider;

/// How long a listing may take before admission gives up on it.
const LISTING_TIMEOUT: Duration = Duration::from_secs(2);
/// A start that finds the count full reads the provider again if its listing is older than
/// this (sessions may have ended since).
const FULL_RECHECK: Duration = Duration::from_millis(500);

/// Why a start is refused; each carries a retry hint in seconds.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CapacityError {
    #[error("too many starts from this caller; slow down")]
    CallerRate { retry_after: u64 },
    #[error("this dispatcher is busy starting other sessions; try again shortly")]
    Busy { retry_after: u64 },
    #[error("at capacity: {max} sessions are running")]
    Full { max: u32, retry_after: u64 },
}

impl CapacityError {
    /// A short stable name for metrics.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::CallerRate { .. } => "caller_rate",
            Self::Busy { .. } => "busy",
            Self::Full { .. } => "at_capacity",
        }
    }

    pub fn retry_after(&self) -> u64 {
        match self {
            Self::CallerRate { retry_after }
            | Self::Busy { retry_after }
            | Self::Full { retry_after, .. } => *retry_after,
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
    counts: Arc<Counts>,
    /// The start left a session behind: it stays counted until a listing shows it.
    started: bool,
}

impl StartPermit {
    /// The start succeeded: its session keeps counting until the provider lists it.
    pub fn started(&mut self) {
        self.started = true;
    }
}

impl Drop for StartPermit {
    fn drop(&mut self) {
        let mut state = self.counts.lock();
        if let Some(n) = state.in_flight.get_mut(&self.key) {
            *n -= 1;
            if *n == 0 {
                state.in_flight.remove(&self.key);
            }
        }
        if self.started {
            state.recent.insert(self.key.clone(), Instant::now());
        }
    }
}

/// The provider's last listing and this replica's starts in flight.
#[derive(Debug, Default)]
struct CountState {
    /// Keys of the live sessions the provider listed, and when (`None`: never listed).
    listed: HashSet<String>,
    listed_at: Option<Instant>,
    /// This replica's starts in flight, by session key (an idempotent retry shares its key).
    in_flight: HashMap<String, usize>,
    /// Sessions this replica started since its last listing was read: counted until a listing
    /// read after they started shows them (or shows them gone).
    recent: HashMap<String, Instant>,
    /// The last read of the provider failed.
    listing_failed: bool,
}

/// What [`Capacity::take`] decided.
enum Taken {
    Admitted(StartPermit),
    /// Full by the count; the in-flight permit is handed back for a second try.
    Full(OwnedSemaphorePermit),
    /// Near the limit with no recent count.
    Unknown,
}

impl CountState {
    /// Sessions live or starting: listed ones, plus this replica's starts in flight that the
    /// listing does not show. Each start is counted once.
    fn total(&self) -> usize {
        let unlisted = self
            .in_flight
            .iter()
            .filter(|(key, _)| !self.listed.contains(*key))
            .map(|(_, n)| *n)
            .sum::<usize>();
        let recent = self
            .recent
            .keys()
            .filter(|key| !self.listed.contains(*key) && !self.in_flight.contains_key(*key))
            .count();
        self.listed.len() + unlisted + recent
    }
}

#[derive(Debug, Default)]
struct Counts(Mutex<CountState>);

impl Counts {
    fn lock(&self) -> std::sync::MutexGuard<'_, CountState> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
}

pub struct Capacity {
    provider: Arc<dyn MachineProvider>,
    max_sessions: u32,
    max_in_flight: u32,
    in_flight: Arc<Semaphore>,
    per_caller: Option<DefaultKeyedRateLimiter<String>>,
    cache_ttl: Duration,
    counts: Arc<Counts>,
    /// One listing at a time; admissions that need a fresh one wait for the one in progress.
    listing: AsyncMutex<()>,
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
            counts: Arc::default(),
            listing: AsyncMutex::new(()),
        }
    }

    /// Starts running on this replica now.
    pub fn in_flight(&self) -> usize {
        self.max_in_flight as usize - self.in_flight.available_permits()
    }

    /// Sessions live or starting as this replica counts them now, and the limit.
    pub fn sessions(&self) -> (usize, u32) {
        (self.counts.lock().total(), self.max_sessions)
    }

    /// Admits the start of session `key` by `sub`, or says why not.
    pub async fn admit(&self, sub: &str, key: &str) -> Result<StartPermit, CapacityError> {
        self.check_caller(sub)?;
        let permit = Arc::clone(&self.in_flight)
            .try_acquire_owned()
            .map_err(|_| CapacityError::Busy { retry_after: 1 })?;
        if self.stale() {
            self.refresh(self.cache_ttl).await;
        }
        let permit = match self.take(permit, key) {
            Taken::Admitted(p) => return Ok(p),
            Taken::Unknown => return Err(CapacityError::Busy { retry_after: 2 }),
            Taken::Full(permit) => permit,
        };
        // Full by a listing that may be older than the sessions that ended since: read again
        // before refusing free capacity.
        self.refresh(FULL_RECHECK).await;
        match self.take(permit, key) {
            Taken::Admitted(p) => Ok(p),
            Taken::Unknown => Err(CapacityError::Busy { retry_after: 2 }),
            Taken::Full(_) => Err(CapacityError::Full {
                max: self.max_sessions,
                retry_after: 5,
            }),
        }
    }

    /// Checks the count and records the start, in one short critical section.
    fn take(&self, permit: OwnedSemaphorePermit, key: &str) -> Taken {
        let mut state = self.counts.lock();
        let total = state.total();
        if total >= self.max_sessions as usize {
            return Taken::Full(permit);
        }
        // The provider could not be read lately: near the limit, refuse rather than risk
        // overshooting on an old count.
        if state.listing_failed && total + self.max_in_flight as usize >= self.max_sessions as usize
        {
            return Taken::Unknown;
        }
        *state.in_flight.entry(key.to_owned()).or_default() += 1;
        Taken::Admitted(StartPermit {
            _permit: permit,
            key: key.to_owned(),
            counts: Arc::clone(&self.counts),
            started: false,
        })
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
        self.counts
            .lock()
            .listed_at
            .is_none_or(|at| at.elapsed() >= self.cache_ttl)
    }

    /// Reads the provider's live sessions, unless another admission is reading them: then
    /// waits for that read. Skipped when the listing is younger than `fresh`. A failed read
    /// keeps the last listing.
    async fn refresh(&self, fresh: Duration) {
        let started = Instant::now();
        let _one = self.listing.lock().await;
        // Someone listed while we waited: that listing is newer than our need.
        let listed_at = self.counts.lock().listed_at;
        if listed_at.is_some_and(|at| at >= started || at.elapsed() < fresh) {
            return;
        }
        let asked = Instant::now();
        let listed = tokio::time::timeout(LISTING_TIMEOUT, self.provider.list_managed()).await;
        match listed {
            Ok(Ok(machines)) => {
                let live: HashSet<String> = machines
                    .into_iter()
                    .filter(|m| !m.state.is_terminal())
                    .filter_map(|m| m.labels.map(|l| l.session_key))
                    .collect();
                crate::metrics::sessions_active(live.len());
                let mut state = self.counts.lock();
                state.listed = live;
                state.listed_at = Some(Instant::now());
                // Sessions started before the listing was asked for are in it, if still live.
                state.recent.retain(|_, at| *at > asked);
                state.listing_failed = false;
            }
            failed => {
                let why = match failed {
                    Ok(Err(e)) => e.to_string(),
                    _ => format!("listing took longer than {LISTING_TIMEOUT:?}"),
                };
                tracing::warn!(error = %why, "cannot count sessions at the provider; using the last count");
                self.counts.lock().listing_failed = true;
            }
        }
    }
}
