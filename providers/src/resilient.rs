//! Retries and outbound rate limiting around any provider, so a burst of starts queues briefly
//! instead of spraying 429s, and a transient failure is retried instead of surfacing.
//!
//! * Rate limits are each provider's documented ones ([`MachineProvider::rate_limits`]), applied
//!   per operation and, where the provider scopes them so, per machine (governor GCRA buckets).
//! * Transient failures (throttling, 5xx, connection resets, timeouts) are retried with
//!   exponential backoff and full jitter (backon), honouring `Retry-After`, and never past the
//!   call's deadline: when the next attempt could not finish in time the last error is returned.
//! * A create is only retried because it is safe to: machine names are derived from the session
//!   key (and ECS gets a `clientToken`), so a retried create after an ambiguous failure either
//!   creates the machine once or answers "already exists" — which is then resolved by finding
//!   the machine by session key and adopting it, never by launching a second one.

use std::collections::HashMap;
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use backon::{BackoffBuilder, ExponentialBuilder};
use governor::{DefaultDirectRateLimiter, DefaultKeyedRateLimiter, Quota, RateLimiter};
use tokio::time::Instant;

use crate::{LaunchSpec, Launched, MachineProvider, MachineStatus, ProviderError};

/// An error that may go away if the same call is made again.
pub trait Transient {
    fn is_transient(&self) -> bool;
    /// The server's hint of when to try again.
    fn retry_after(&self) -> Option<Duration> {
        None
    }
}

impl Transient for ProviderError {
    fn is_transient(&self) -> bool {
        ProviderError::is_transient(self)
    }

    fn retry_after(&self) -> Option<Duration> {
        match self {
            ProviderError::Throttled { retry_after, .. } => *retry_after,
            _ => None,
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

/// The operations a provider's limits and retries are counted by.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Op {
    Launch,
    Wait,
    Status,
    Terminate,
    List,
    /// Updating a machine's labels.
    Label,
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
        }
    }
}

/// A documented rate limit: `per_second` sustained with bursts of `burst`, counted per machine
/// when `per_machine` (Fly scopes most actions by machine id) or for the whole account/app.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RateLimit {
    pub per_second: f64,
    pub burst: u32,
    pub per_machine: bool,
}

impl RateLimit {
    pub const fn app(per_second: f64, burst: u32) -> Self {
        Self {
            per_second,
            burst,
            per_machine: false,
        }
    }

    pub const fn machine(per_second: f64, burst: u32) -> Self {
        Self {
            per_second,
            burst,
            per_machine: true,
        }
    }

    fn quota(&self) -> Quota {
        let period = Duration::from_secs_f64(1.0 / self.per_second.max(0.001));
        Quota::with_period(period)
            .expect("period is positive")
            .allow_burst(NonZeroU32::new(self.burst.max(1)).expect("burst is positive"))
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

/// Counters of what the wrapper did, for metrics and reports.
#[derive(Debug, Default)]
pub struct ResilienceStats {
    pub retries: AtomicU64,
    pub throttled_locally: AtomicU64,
    pub adopted: AtomicU64,
}

enum Limiter {
    Direct(DefaultDirectRateLimiter),
    Keyed(DefaultKeyedRateLimiter<String>),
}

/// Sees every attempt's outcome and every retry, e.g. to count them in metrics.
pub trait CallObserver: Send + Sync {
    /// `outcome` is `ok` or [`ProviderError::kind`].
    fn attempt(&self, provider: &'static str, op: Op, outcome: &'static str);
    fn retry(&self, provider: &'static str, op: Op);
}

/// Wraps a provider with retries and rate limits; is itself a [`MachineProvider`].
pub struct Resilient {
    inner: Arc<dyn MachineProvider>,
    policy: RetryPolicy,
    limiters: HashMap<Op, Limiter>,
    pub stats: Arc<ResilienceStats>,
    observer: Option<Arc<dyn CallObserver>>,
}

impl Resilient {
    /// `rate_scale` multiplies the provider's documented limits (1.0 in production; a test
    /// against a fake may raise them, 0 turns limiting off).
    pub fn new(inner: Arc<dyn MachineProvider>, policy: RetryPolicy, rate_scale: f64) -> Self {
        let limiters = inner
            .rate_limits()
            .into_iter()
            .filter(|_| rate_scale > 0.0)
            .map(|(op, mut limit)| {
                limit.per_second *= rate_scale;
                limit.burst = ((limit.burst as f64) * rate_scale).ceil() as u32;
                let limiter = if limit.per_machine {
                    Limiter::Keyed(RateLimiter::keyed(limit.quota()))
                } else {
                    Limiter::Direct(RateLimiter::direct(limit.quota()))
                };
                (op, limiter)
            })
            .collect();
        Self {
            inner,
            policy,
            limiters,
            stats: Arc::default(),
            observer: None,
        }
    }

    pub fn with_observer(mut self, observer: Arc<dyn CallObserver>) -> Self {
        self.observer = Some(observer);
        self
    }

    /// Waits for the operation's rate-limit token, at most until `deadline`.
    async fn acquire(&self, op: Op, key: &str, deadline: Instant) -> Result<(), ProviderError> {
        let wait = async {
            match self.limiters.get(&op) {
                None => {}
                Some(Limiter::Direct(l)) => l.until_ready().await,
                Some(Limiter::Keyed(l)) => {
                    if l.len() > 10_000 {
                        l.retain_recent();
                    }
                    l.until_key_ready(&key.to_owned()).await
                }
            }
        };
        tokio::time::timeout_at(deadline, wait).await.map_err(|_| {
            self.stats.throttled_locally.fetch_add(1, Ordering::Relaxed);
            ProviderError::Throttled {
                provider: self.inner.name(),
                retry_after: Some(Duration::from_secs(1)),
            }
        })
    }

    /// Runs `call` under the op's rate limit, retrying transient errors until `deadline`.
    async fn run<T, F, Fut>(
        &self,
        op: Op,
        key: &str,
        deadline: Instant,
        call: F,
    ) -> Result<T, ProviderError>
    where
        F: Fn() -> Fut,
        Fut: std::future::Future<Output = Result<T, ProviderError>>,
    {
        let call = &call;
        let attempt = move || async move {
            let result = match self.acquire(op, key, deadline).await {
                Err(e) => Err(e),
                Ok(()) => match tokio::time::timeout_at(deadline, call()).await {
                    Ok(result) => result,
                    Err(_) => Err(ProviderError::Unavailable {
                        provider: self.inner.name(),
                        message: format!("{} did not answer before the deadline", op.as_str()),
                    }),
                },
            };
            if let Some(observer) = &self.observer {
                let outcome = result.as_ref().map_or_else(ProviderError::kind, |_| "ok");
                observer.attempt(self.inner.name(), op, outcome);
            }
            result
        };
        retry(&self.policy, deadline, attempt, |err, delay| {
            self.stats.retries.fetch_add(1, Ordering::Relaxed);
            if let Some(observer) = &self.observer {
                observer.retry(self.inner.name(), op);
            }
            tracing::debug!(op = op.as_str(), error = %err, delay_ms = delay.as_millis() as u64, "retrying");
        })
        .await
    }

    fn budget(&self) -> Instant {
        Instant::now() + self.policy.call_budget
    }

    /// After "already exists": the machine of this session is ours from an earlier attempt (or
    /// an idempotent retry); adopt it instead of failing or creating another.
    async fn adopt(&self, spec: &LaunchSpec, deadline: Instant) -> Result<Launched, ProviderError> {
        let key = &spec.labels.session_key;
        let found = self
            .run(Op::List, "", deadline, || self.inner.find(key))
            .await?;
        match found {
            Some(m)
                if m.labels
                    .as_ref()
                    .is_some_and(|l| l.owner == spec.labels.owner) =>
            {
                self.stats.adopted.fetch_add(1, Ordering::Relaxed);
                tracing::info!(machine.id = %m.handle, "adopted the machine of an earlier attempt");
                Ok(Launched {
                    handle: m.handle,
                    region: m.region,
                    version: None,
                })
            }
            _ => Err(ProviderError::Conflict {
                provider: self.inner.name(),
                name: spec.name.clone(),
            }),
        }
    }
}

#[async_trait]
impl MachineProvider for Resilient {
    fn name(&self) -> &'static str {
        self.inner.name()
    }

    fn rate_limits(&self) -> Vec<(Op, RateLimit)> {
        // Already applied here; a wrapper of this wrapper must not count them twice.
        Vec::new()
    }

    async fn launch(&self, spec: &LaunchSpec) -> Result<Launched, ProviderError> {
        let deadline = spec.deadline.unwrap_or_else(|| self.budget());
        match self
            .run(Op::Launch, "", deadline, || self.inner.launch(spec))
            .await
        {
            Err(ProviderError::Conflict { .. }) => self.adopt(spec, deadline).await,
            other => other,
        }
    }

    async fn wait_started(
        &self,
        launched: &Launched,
        timeout: Duration,
    ) -> Result<(), ProviderError> {
        let deadline = Instant::now() + timeout;
        self.run(Op::Wait, &launched.handle, deadline, || {
            let left = deadline.saturating_duration_since(Instant::now());
            self.inner.wait_started(launched, left)
        })
        .await
    }

    async fn status(&self, handle: &str) -> Result<Option<MachineStatus>, ProviderError> {
        self.run(Op::Status, handle, self.budget(), || {
            self.inner.status(handle)
        })
        .await
    }

    async fn terminate(&self, handle: &str) -> Result<(), ProviderError> {
        self.run(Op::Terminate, handle, self.budget(), || {
            self.inner.terminate(handle)
        })
        .await
    }

    async fn find(&self, session_key: &str) -> Result<Option<MachineStatus>, ProviderError> {
        self.run(Op::List, "", self.budget(), || self.inner.find(session_key))
            .await
    }

    async fn list_managed(&self) -> Result<Vec<MachineStatus>, ProviderError> {
        self.run(Op::List, "", self.budget(), || self.inner.list_managed())
            .await
    }

    async fn check(&self) -> Result<(), ProviderError> {
        self.inner.check().await
    }

    fn can_set_deadline(&self) -> bool {
        self.inner.can_set_deadline()
    }

    async fn set_deadline(
        &self,
        handle: &str,
        deadline: chrono::DateTime<chrono::Utc>,
    ) -> Result<(), ProviderError> {
        self.run(Op::Label, handle, self.budget(), || {
            self.inner.set_deadline(handle, deadline)
        })
        .await
    }

    async fn shutdown(&self) {
        self.inner.shutdown().await
    }
}
