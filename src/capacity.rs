//! Admission control for `/start`, decided before anything is created:
//!
//! * a per-caller start rate (token bucket per JWT `sub`);
//! * `max_starts_in_flight` starts at once on this replica;
//! * `max_sessions` across all replicas, counted from the provider itself (the only place every
//!   replica sees), cached briefly. Near the limit every admission re-reads the provider, and
//!   this replica's own starts still in flight are added to the count, so concurrent starts can
//!   overshoot the limit by at most the starts in flight elsewhere.

use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;

use governor::clock::{Clock, DefaultClock};
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use tokio::sync::{Mutex, OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;

use crate::config::Config;
use providers::MachineProvider;

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

/// Held by a start while it runs; dropping it frees the in-flight slot.
#[derive(Debug)]
pub struct StartPermit {
    _permit: OwnedSemaphorePermit,
}

struct Count {
    at: Instant,
    live: usize,
}

pub struct Capacity {
    provider: Arc<dyn MachineProvider>,
    max_sessions: u32,
    max_in_flight: u32,
    in_flight: Arc<Semaphore>,
    per_caller: Option<DefaultKeyedRateLimiter<String>>,
    cache_ttl: Duration,
    count: Mutex<Option<Count>>,
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
            count: Mutex::new(None),
        }
    }

    /// Starts running on this replica now.
    pub fn in_flight(&self) -> usize {
        self.max_in_flight as usize - self.in_flight.available_permits()
    }

    /// Admits a start by `sub`, or says why not.
    pub async fn admit(&self, sub: &str) -> Result<StartPermit, CapacityError> {
        if let Some(limiter) = &self.per_caller {
            if limiter.len() > 100_000 {
                limiter.retain_recent();
            }
            if let Err(not_until) = limiter.check_key(&sub.to_owned()) {
                let wait = not_until.wait_time_from(DefaultClock::default().now());
                return Err(CapacityError::CallerRate {
                    retry_after: wait.as_secs_f64().ceil().max(1.0) as u64,
                });
            }
        }
        let permit = Arc::clone(&self.in_flight)
            .try_acquire_owned()
            .map_err(|_| CapacityError::Busy { retry_after: 1 })?;
        // Our own starts in flight, this one included, may not be listed by the provider yet.
        let ours = self.in_flight();
        match self.live_sessions(ours).await {
            Some(live) if live + ours <= self.max_sessions as usize => {
                Ok(StartPermit { _permit: permit })
            }
            Some(_) => Err(CapacityError::Full {
                max: self.max_sessions,
                retry_after: 5,
            }),
            // Near the limit and the provider cannot be counted right now: refuse rather than
            // risk overshooting on a stale count.
            None => Err(CapacityError::Busy { retry_after: 2 }),
        }
    }

    /// Live sessions according to the provider: cached while far from the limit, read afresh
    /// near it. `None` when near the limit and the provider cannot be read in time. Far from
    /// the limit, a provider that cannot be read leaves the last count (or admits: the start
    /// will meet the same provider trouble and answer it clearly).
    async fn live_sessions(&self, ours: usize) -> Option<usize> {
        let mut count = self.count.lock().await;
        let near_limit =
            |live: usize| live + ours + self.max_in_flight as usize >= self.max_sessions as usize;
        let cached = count
            .as_ref()
            .map(|c| (c.live, c.at.elapsed() < self.cache_ttl));
        if let Some((live, true)) = cached {
            if !near_limit(live) {
                return Some(live);
            }
        }
        // Admission must stay fast: a slow count is treated as unavailable.
        let listed =
            tokio::time::timeout(Duration::from_secs(2), self.provider.list_managed()).await;
        match listed {
            Ok(Ok(machines)) => {
                let live = machines.iter().filter(|m| !m.state.is_terminal()).count();
                crate::metrics::sessions_active(live);
                *count = Some(Count {
                    at: Instant::now(),
                    live,
                });
                Some(live)
            }
            failed => {
                let why = match failed {
                    Ok(Err(e)) => e.to_string(),
                    _ => "listing took longer than 2 s".to_owned(),
                };
                tracing::warn!(error = %why, "cannot count sessions at the provider");
                match cached {
                    Some((live, _)) if near_limit(live) => None,
                    Some((live, _)) => Some(live),
                    None => Some(0),
                }
            }
        }
    }
}
