//! Outbound rate limits and deadline-bounded retries, for any API client: the provider wrapper
//! ([`crate::resilient::Resilient`]) and the service's Daily wrapper both run their calls
//! through a [`Guard`].
//!
//! * Rate limits are the API's documented ones, as governor GCRA buckets per operation (and,
//!   where the API scopes them so, per machine). A call waits for its tokens, never past its
//!   deadline.
//! * Transient failures (throttling, 5xx, connection resets, timeouts) are retried with
//!   exponential backoff and full jitter (backon), honouring `Retry-After`, and never past the
//!   call's deadline: when the next attempt could not begin in time the last error is returned.

use std::num::NonZeroU32;
use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBuilder};
use governor::{DefaultDirectRateLimiter, DefaultKeyedRateLimiter, Quota, RateLimiter};
use tokio::time::Instant;

/// An error that may go away if the same call is made again.
pub trait Transient {
    fn is_transient(&self) -> bool;
    /// The server's hint of when to try again.
    fn retry_after(&self) -> Option<Duration> {
        None
    }
}

impl Transient for crate::ProviderError {
    fn is_transient(&self) -> bool {
        crate::ProviderError::is_transient(self)
    }

    fn retry_after(&self) -> Option<Duration> {
        match self {
            crate::ProviderError::Throttled { retry_after, .. } => *retry_after,
            _ => None,
        }
    }
}

/// How transient failures are retried.
#[derive(Debug, Clone)]
pub struct RetryPolicy {
    pub min_delay: Duration,
    pub max_delay: Duration,
    /// Attempts after the first.
    pub max_retries: usize,
    /// Deadline of calls that have none of their own (status, terminate, list).
    pub call_budget: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            min_delay: Duration::from_millis(100),
            max_delay: Duration::from_secs(5),
            max_retries: 8,
            call_budget: Duration::from_secs(30),
        }
    }
}

/// Calls `attempt` until it succeeds, fails for good, or the next try could not begin before
/// `deadline`. Delays grow exponentially with full jitter (backon) and are at least the
/// server's `Retry-After`. `on_retry` sees every error that is retried and the delay chosen.
pub async fn retry<T, E, F, Fut>(
    policy: &RetryPolicy,
    deadline: Instant,
    mut attempt: F,
    mut on_retry: impl FnMut(&E, Duration),
) -> Result<T, E>
where
    E: Transient,
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, E>>,
{
    let mut delays = ExponentialBuilder::new()
        .with_min_delay(policy.min_delay)
        .with_max_delay(policy.max_delay)
        .with_max_times(policy.max_retries)
        .with_jitter()
        .build();
    loop {
        let err = match attempt().await {
            Ok(value) => return Ok(value),
            Err(e) => e,
        };
        if !err.is_transient() {
            return Err(err);
        }
        let Some(mut delay) = delays.next() else {
            return Err(err);
        };
        if let Some(hint) = err.retry_after() {
            delay = delay.max(hint);
        }
        // Sleeping past the deadline only turns a clear error into a vague timeout.
        if Instant::now() + delay >= deadline {
            return Err(err);
        }
        on_retry(&err, delay);
        tokio::time::sleep(delay).await;
    }
}

/// Delays between polls of a state that providers only report when asked (a starting Cloud
/// Run execution or ECS task): 100 ms, growing by half each time, at most 1 s.
pub fn poll_delays() -> impl Iterator<Item = Duration> {
    std::iter::successors(Some(Duration::from_millis(100)), |d| {
        Some((*d * 3 / 2).min(Duration::from_secs(1)))
    })
}

/// The operations a provider's limits, retries and metrics are counted by.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Op {
    Launch,
    Wait,
    Status,
    Terminate,
    List,
    /// Updating a machine's labels.
    Label,
    /// Starting (resuming) a stopped or suspended machine.
    Start,
    /// Suspending a machine.
    Suspend,
    /// Signalling a machine's process.
    Signal,
    /// Taking a reserve machine (a lease).
    Claim,
}

impl Op {
    pub fn as_str(self) -> &'static str {
        match self {
            Op::Launch => "launch",
            Op::Wait => "wait",
            Op::Status => "status",
            Op::Terminate => "terminate",
            Op::List => "list",
            Op::Label => "label",
            Op::Start => "start",
            Op::Suspend => "suspend",
            Op::Signal => "signal",
            Op::Claim => "claim",
        }
    }
}

/// A documented rate limit: `per_second` sustained with bursts of `burst`, counted per key
/// when `per_machine` (the key a call names: the machine for most Fly actions, the app for
/// Fly's creates), else for the whole account or app.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RateLimit {
    pub per_second: f64,
    pub burst: u32,
    pub per_machine: bool,
}

impl RateLimit {
    /// A limit on the whole account or app.
    pub const fn app(per_second: f64, burst: u32) -> Self {
        Self {
            per_second,
            burst,
            per_machine: false,
        }
    }

    /// A limit counted separately for each machine.
    pub const fn machine(per_second: f64, burst: u32) -> Self {
        Self {
            per_second,
            burst,
            per_machine: true,
        }
    }

    /// A limit counted separately for each key the calls name (e.g. Fly's creates, per app:
    /// [`crate::MachineProvider::launch_key`]).
    pub const fn keyed(per_second: f64, burst: u32) -> Self {
        Self::machine(per_second, burst)
    }

    /// This limit multiplied by `scale` (burst rounded up).
    fn scaled(mut self, scale: f64) -> Self {
        self.per_second *= scale;
        self.burst = ((self.burst as f64) * scale).ceil() as u32;
        self
    }

    fn quota(&self) -> Quota {
        let period = Duration::from_secs_f64(1.0 / self.per_second.max(0.001));
        Quota::with_period(period)
            .expect("period is positive")
            .allow_burst(NonZeroU32::new(self.burst.max(1)).expect("burst is positive"))
    }
}

enum Bucket {
    Direct(DefaultDirectRateLimiter),
    Keyed(DefaultKeyedRateLimiter<String>),
}

impl Bucket {
    async fn until_ready(&self, key: &str) {
        match self {
            Bucket::Direct(l) => l.until_ready().await,
            Bucket::Keyed(l) => {
                if l.len() > 10_000 {
                    l.retain_recent();
                }
                l.until_key_ready(&key.to_owned()).await
            }
        }
    }
}

/// What a [`Guard`] reports and how it names its own failures, per client.
pub trait GuardHooks<O, E> {
    /// The error of a call whose rate-limit tokens did not come before its deadline.
    fn throttled_locally(&self) -> E;
    /// The error of a call that did not answer before its deadline.
    fn no_answer(&self, op: O) -> E;
    /// Every attempt's outcome (`Ok` or the error), e.g. for metrics.
    fn attempt(&self, op: O, outcome: Result<(), &E>);
    /// Every retry, with the delay chosen.
    fn retry(&self, op: O, error: &E, delay: Duration);
}

/// Rate limits and retries for one API client. `O` names the client's operations.
pub struct Guard<O> {
    /// `(None, limit)` applies to every operation, `(Some(op), limit)` to `op` alone; a call
    /// draws a token from every bucket that applies.
    buckets: Vec<(Option<O>, Bucket)>,
    policy: RetryPolicy,
}

impl<O: Copy + PartialEq> Guard<O> {
    /// `rate_scale` multiplies the documented limits (1.0 in production; a test against a fake
    /// may raise them, 0 turns limiting off).
    pub fn new(
        limits: impl IntoIterator<Item = (Option<O>, RateLimit)>,
        policy: RetryPolicy,
        rate_scale: f64,
    ) -> Self {
        let buckets = limits
            .into_iter()
            .filter(|_| rate_scale > 0.0)
            .map(|(op, limit)| {
                let limit = limit.scaled(rate_scale);
                let bucket = if limit.per_machine {
                    Bucket::Keyed(RateLimiter::keyed(limit.quota()))
                } else {
                    Bucket::Direct(RateLimiter::direct(limit.quota()))
                };
                (op, bucket)
            })
            .collect();
        Self { buckets, policy }
    }

    pub fn policy(&self) -> &RetryPolicy {
        &self.policy
    }

    /// The deadline of a call that has none of its own.
    pub fn budget(&self) -> Instant {
        Instant::now() + self.policy.call_budget
    }

    /// Waits for the tokens of every bucket `op` draws from (for machine `key`), at most until
    /// `deadline`; `false` when the deadline came first.
    async fn acquire(&self, op: O, key: &str, deadline: Instant) -> bool {
        let wait = async {
            for (_, bucket) in self
                .buckets
                .iter()
                .filter(|(applies, _)| applies.is_none_or(|o| o == op))
            {
                bucket.until_ready(key).await;
            }
        };
        tokio::time::timeout_at(deadline, wait).await.is_ok()
    }

    /// One attempt of `call` under `op`'s rate limits, bounded by `deadline`, reported to
    /// `hooks`; no retry.
    pub async fn once<T, E, F, Fut>(
        &self,
        op: O,
        key: &str,
        deadline: Instant,
        hooks: &impl GuardHooks<O, E>,
        call: F,
    ) -> Result<T, E>
    where
        F: FnOnce() -> Fut,
        Fut: std::future::Future<Output = Result<T, E>>,
    {
        match self
            .try_once(op, key, deadline, deadline, hooks, call)
            .await
        {
            Some(result) => result,
            None => {
                let result = Err(hooks.throttled_locally());
                hooks.attempt(op, result.as_ref().map(drop));
                result
            }
        }
    }

    /// One attempt of `call` if `op`'s rate-limit tokens are free now (a background call that
    /// must not queue behind, or take tokens from, calls a client waits for), bounded by
    /// `deadline`. `None`, with nothing called or reported, when a token is not free.
    pub async fn once_if_free<T, E, F, Fut>(
        &self,
        op: O,
        key: &str,
        deadline: Instant,
        hooks: &impl GuardHooks<O, E>,
        call: F,
    ) -> Option<Result<T, E>>
    where
        F: FnOnce() -> Fut,
        Fut: std::future::Future<Output = Result<T, E>>,
    {
        // A deadline already reached still lets tokens that are free now be taken: the wait
        // is polled once before the deadline is.
        self.try_once(op, key, Instant::now(), deadline, hooks, call)
            .await
    }

    /// `call` once `op`'s tokens were taken by `tokens_by`, bounded by `deadline` and reported
    /// to `hooks`; `None`, with nothing called or reported, when they were not.
    async fn try_once<T, E, F, Fut>(
        &self,
        op: O,
        key: &str,
        tokens_by: Instant,
        deadline: Instant,
        hooks: &impl GuardHooks<O, E>,
        call: F,
    ) -> Option<Result<T, E>>
    where
        F: FnOnce() -> Fut,
        Fut: std::future::Future<Output = Result<T, E>>,
    {
        if !self.acquire(op, key, tokens_by).await {
            return None;
        }
        let result = match tokio::time::timeout_at(deadline, call()).await {
            Ok(result) => result,
            Err(_) => Err(hooks.no_answer(op)),
        };
        hooks.attempt(op, result.as_ref().map(drop));
        Some(result)
    }

    /// Runs `call` under `op`'s rate limits, retrying transient errors until `deadline`. Each
    /// attempt is bounded by the deadline too.
    pub async fn run<T, E, F, Fut>(
        &self,
        op: O,
        key: &str,
        deadline: Instant,
        hooks: &impl GuardHooks<O, E>,
        call: F,
    ) -> Result<T, E>
    where
        E: Transient,
        F: Fn() -> Fut,
        Fut: std::future::Future<Output = Result<T, E>>,
    {
        retry(
            &self.policy,
            deadline,
            || self.once(op, key, deadline, hooks, &call),
            |err, delay| hooks.retry(op, err, delay),
        )
        .await
    }
}
