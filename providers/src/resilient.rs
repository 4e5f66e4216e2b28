//! Retries and outbound rate limiting around any provider, so a burst of starts queues briefly
//! instead of spraying 429s, and a transient failure is retried instead of surfacing
//! ([`crate::retry::Guard`] does both, under the provider's documented limits).
//!
//! A create is only retried because it is safe to: machine names are derived from the session
//! key (ECS gets a `clientToken`), so a create whose outcome is unknown either created the
//! machine once or answers "already exists". Both cases are resolved here, and only here, by
//! finding the session's machine and adopting it, never by launching a second one.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;

use crate::retry::{Guard, GuardHooks, Op, RateLimit, RetryPolicy};
use std::collections::BTreeMap;

use crate::{
    Deadline, HttpHandoff, Launched, MachineProvider, MachineStatus, MachineTemplate,
    ProviderError, Relabel, Reserve, ReserveLabels, SessionBinding, SessionLabels, Tier,
};

/// Sees every attempt's outcome and every retry, e.g. to count them in metrics.
pub trait CallObserver: Send + Sync {
    /// `outcome` is `ok` or [`ProviderError::kind`].
    fn attempt(&self, provider: &'static str, op: Op, outcome: &'static str);
    fn retry(&self, provider: &'static str, op: Op);
}

/// Wraps a provider with retries and rate limits; is itself a [`MachineProvider`].
pub struct Resilient {
    inner: Arc<dyn MachineProvider>,
    guard: Guard<Op>,
    observer: Option<Arc<dyn CallObserver>>,
}

impl GuardHooks<Op, ProviderError> for Resilient {
    fn throttled_locally(&self) -> ProviderError {
        ProviderError::Throttled {
            provider: self.inner.name(),
            retry_after: Some(Duration::from_secs(1)),
        }
    }

    fn no_answer(&self, op: Op) -> ProviderError {
        ProviderError::unavailable(
            self.inner.name(),
            format!("{} did not answer before the deadline", op.as_str()),
        )
    }

    fn attempt(&self, op: Op, outcome: Result<(), &ProviderError>) {
        if let Some(observer) = &self.observer {
            let outcome = outcome.map_or_else(ProviderError::kind, |()| "ok");
            observer.attempt(self.inner.name(), op, outcome);
        }
    }

    fn retry(&self, op: Op, error: &ProviderError, delay: Duration) {
        if let Some(observer) = &self.observer {
            observer.retry(self.inner.name(), op);
        }
        tracing::debug!(op = op.as_str(), %error, delay_ms = delay.as_millis() as u64, "retrying");
    }
}

impl Resilient {
    /// `rate_scale` multiplies the provider's documented limits (1.0 in production; a test
    /// against a fake may raise them, 0 turns limiting off).
    pub fn new(inner: Arc<dyn MachineProvider>, policy: RetryPolicy, rate_scale: f64) -> Self {
        let limits = inner
            .rate_limits()
            .into_iter()
            .map(|(op, limit)| (Some(op), limit));
        Self {
            guard: Guard::new(limits, policy, rate_scale),
            inner,
            observer: None,
        }
    }

    pub fn with_observer(mut self, observer: Arc<dyn CallObserver>) -> Self {
        self.observer = Some(observer);
        self
    }

    /// After a create whose outcome is unknown: the session's machine, if the create (or an
    /// earlier attempt of the same session) made it for the same owner.
    async fn adopt(&self, session: &SessionBinding) -> Option<Launched> {
        let key = &session.labels.session_key;
        let found = self
            .guard
            .run(Op::List, "", session.deadline.instant(), self, || {
                self.inner.find(key)
            })
            .await;
        match found {
            Ok(Some(m))
                if m.labels
                    .as_ref()
                    .is_some_and(|l| l.owner == session.labels.owner) =>
            {
                tracing::info!(machine.id = %m.handle, "adopted the machine of an earlier attempt");
                Some(m.as_launched())
            }
            Ok(_) => None,
            Err(e) => {
                tracing::debug!(error = %e, "cannot look for the machine of an ambiguous create");
                None
            }
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

    fn launch_key(&self, name: &str) -> String {
        self.inner.launch_key(name)
    }

    fn is_handle(&self, handle: &str) -> bool {
        self.inner.is_handle(handle)
    }

    fn fits(
        &self,
        template: &MachineTemplate,
        session_env: &std::collections::BTreeMap<String, String>,
    ) -> Result<(), String> {
        self.inner.fits(template, session_env)
    }

    async fn launch(
        &self,
        template: &MachineTemplate,
        session: &SessionBinding,
    ) -> Result<Launched, ProviderError> {
        // Through the retry loop attempt by attempt, so that an ambiguous failure is resolved
        // (adopted) before the create is sent again.
        let deadline = session.deadline.instant();
        let key = self.inner.launch_key(&session.name);
        let attempt = || async {
            let result = self
                .guard
                .once(Op::Launch, &key, deadline, self, || {
                    self.inner.launch(template, session)
                })
                .await;
            match result {
                Err(e) if e.is_ambiguous_create() => match self.adopt(session).await {
                    Some(launched) => Ok(launched),
                    None => Err(e),
                },
                other => other,
            }
        };
        crate::retry::retry(self.guard.policy(), deadline, attempt, |err, delay| {
            GuardHooks::retry(self, Op::Launch, err, delay)
        })
        .await
    }

    async fn wait_started(
        &self,
        launched: &Launched,
        deadline: Deadline,
    ) -> Result<(), ProviderError> {
        self.guard
            .run(Op::Wait, &launched.handle, deadline.instant(), self, || {
                self.inner.wait_started(launched, deadline)
            })
            .await
    }

    async fn status(&self, handle: &str) -> Result<Option<MachineStatus>, ProviderError> {
        self.guard
            .run(Op::Status, handle, self.guard.budget(), self, || {
                self.inner.status(handle)
            })
            .await
    }

    async fn terminate(&self, handle: &str) -> Result<(), ProviderError> {
        self.guard
            .run(Op::Terminate, handle, self.guard.budget(), self, || {
                self.inner.terminate(handle)
            })
            .await
    }

    async fn find(&self, session_key: &str) -> Result<Option<MachineStatus>, ProviderError> {
        self.guard
            .run(Op::List, "", self.guard.budget(), self, || {
                self.inner.find(session_key)
            })
            .await
    }

    async fn list_managed(&self) -> Result<Vec<MachineStatus>, ProviderError> {
        self.guard
            .run(Op::List, "", self.guard.budget(), self, || {
                self.inner.list_managed()
            })
            .await
    }

    async fn check(&self) -> Result<(), ProviderError> {
        self.inner.check().await
    }

    fn relabel(&self) -> Option<&dyn Relabel> {
        self.inner.relabel().map(|_| self as &dyn Relabel)
    }

    fn handoff(&self) -> Option<&dyn HttpHandoff> {
        self.inner.handoff().map(|_| self as &dyn HttpHandoff)
    }

    fn reserve(&self) -> Option<&dyn Reserve> {
        self.inner.reserve().map(|_| self as &dyn Reserve)
    }

    async fn shutdown(&self) {
        self.inner.shutdown().await
    }
}

#[async_trait]
impl Relabel for Resilient {
    async fn set_labels(
        &self,
        handle: &str,
        labels: &BTreeMap<String, String>,
    ) -> Result<(), ProviderError> {
        let inner = self
            .inner
            .relabel()
            .ok_or_else(|| self.missing("change a machine's labels"))?;
        self.guard
            .run(Op::Label, handle, self.guard.budget(), self, || {
                inner.set_labels(handle, labels)
            })
            .await
    }
}

#[async_trait]
impl HttpHandoff for Resilient {
    fn bot_url(&self, machine: &Launched, port: u16) -> Result<url::Url, ProviderError> {
        let inner = self
            .inner
            .handoff()
            .ok_or_else(|| self.missing("reach machines over HTTP"))?;
        inner.bot_url(machine, port)
    }

    async fn end_after_session(
        &self,
        handle: &str,
        lease: Option<&str>,
    ) -> Result<(), ProviderError> {
        let inner = self
            .inner
            .handoff()
            .ok_or_else(|| self.missing("reach machines over HTTP"))?;
        self.guard
            .run(Op::Signal, handle, self.guard.budget(), self, || {
                inner.end_after_session(handle, lease)
            })
            .await
    }
}

#[async_trait]
impl Reserve for Resilient {
    fn tiers(&self) -> &'static [Tier] {
        self.inner.reserve().map_or(&[], |r| r.tiers())
    }

    fn unrecyclable(&self, machine: &MachineStatus) -> bool {
        self.inner
            .reserve()
            .is_some_and(|r| r.unrecyclable(machine))
    }

    async fn prepare(
        &self,
        template: &MachineTemplate,
        name: &str,
        labels: &ReserveLabels,
        env: &BTreeMap<String, String>,
    ) -> Result<Launched, ProviderError> {
        let inner = self.inner_reserve()?;
        // A taken name is another replica's machine for the same slot: not retried, not
        // adopted (see the reserve's replenishment). Only a create token free now is taken:
        // a reserve create never waits in the limiter where sessions' creates wait, and the
        // pass moves on (Throttled) to try again with its next listing.
        let key = self.inner.launch_key(name);
        self.guard
            .once_if_free(Op::Launch, &key, self.guard.budget(), self, || {
                inner.prepare(template, name, labels, env)
            })
            .await
            .unwrap_or_else(|| Err(self.throttled_locally()))
    }

    async fn list_reserve(&self) -> Result<Vec<MachineStatus>, ProviderError> {
        let inner = self.inner_reserve()?;
        self.guard
            .run(Op::List, "", self.guard.budget(), self, || {
                inner.list_reserve()
            })
            .await
    }

    async fn mark_ready(&self, handle: &str) -> Result<(), ProviderError> {
        let inner = self.inner_reserve()?;
        self.guard
            .run(Op::Label, handle, self.guard.budget(), self, || {
                inner.mark_ready(handle)
            })
            .await
    }

    async fn suspend(&self, handle: &str) -> Result<(), ProviderError> {
        let inner = self.inner_reserve()?;
        self.guard
            .run(Op::Suspend, handle, self.guard.budget(), self, || {
                inner.suspend(handle)
            })
            .await
    }

    async fn claim(
        &self,
        handle: &str,
        session: &SessionLabels,
    ) -> Result<Option<String>, ProviderError> {
        let inner = self.inner_reserve()?;
        // One attempt: a lost race is the caller's cue to try another machine, and a
        // retried claim after an ambiguous failure could take a machine twice.
        self.guard
            .once(Op::Claim, handle, self.guard.budget(), self, || {
                inner.claim(handle, session)
            })
            .await
    }

    /// One attempt: a claimed machine that does not start is given up for the next one
    /// rather than spend the start's deadline on it.
    async fn start(&self, handle: &str, lease: Option<&str>) -> Result<Launched, ProviderError> {
        let inner = self.inner_reserve()?;
        self.guard
            .once(Op::Start, handle, self.guard.budget(), self, || {
                inner.start(handle, lease)
            })
            .await
    }

    async fn release(
        &self,
        handle: &str,
        lease: &str,
        labels: &BTreeMap<String, String>,
    ) -> Result<(), ProviderError> {
        let inner = self.inner_reserve()?;
        self.guard
            .run(Op::Label, handle, self.guard.budget(), self, || {
                inner.release(handle, lease, labels)
            })
            .await
    }

    async fn recycle(&self, handle: &str, labels: &ReserveLabels) -> Result<(), ProviderError> {
        let inner = self.inner_reserve()?;
        // One attempt: the next replenishment pass tries again.
        self.guard
            .once(Op::Start, handle, self.guard.budget(), self, || {
                inner.recycle(handle, labels)
            })
            .await
    }

    async fn retire(&self, handle: &str) -> Result<(), ProviderError> {
        let inner = self.inner_reserve()?;
        self.guard
            .run(Op::Claim, handle, self.guard.budget(), self, || {
                inner.retire(handle)
            })
            .await
    }
}

impl Resilient {
    fn missing(&self, what: &str) -> ProviderError {
        ProviderError::config(self.inner.name(), format!("this provider cannot {what}"))
    }

    fn inner_reserve(&self) -> Result<&dyn Reserve, ProviderError> {
        self.inner
            .reserve()
            .ok_or_else(|| self.missing("keep a reserve of machines"))
    }
}
