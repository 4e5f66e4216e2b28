//! The [`MachineProvider`] trait every cloud implements, and the optional capabilities a
//! provider may add ([`Relabel`]).

use std::collections::BTreeMap;

use async_trait::async_trait;

use crate::retry::{Op, RateLimit};
use crate::{Deadline, Launched, MachineStatus, MachineTemplate, ProviderError, SessionBinding};

/// One cloud's way of running a session's machine. Implementations are cheap to share
/// (`Arc<dyn MachineProvider>`) and hold no per-session state that another replica would need.
#[async_trait]
pub trait MachineProvider: Send + Sync + 'static {
    /// Short stable name (`fly`, `local`, ...), used in logs, metrics and `GET /sessions`.
    fn name(&self) -> &'static str;

    /// The provider's documented outbound rate limits, by operation; the resilient wrapper
    /// applies them.
    fn rate_limits(&self) -> Vec<(Op, RateLimit)> {
        Vec::new()
    }

    /// Whether `handle` has the shape of this provider's machine handles, in this provider's
    /// own app, cluster or project. Handles from outside (a session id) are checked with it
    /// before any call: a handle that fails it must never reach the provider.
    fn is_handle(&self, handle: &str) -> bool;

    /// Whether a session env of these sizes fits what one launch of `template` may carry
    /// (Cloud Run: 32,768 bytes per env value; ECS: 8,192 characters of overrides). Checked
    /// before anything is created; `Err` says which limit, in the provider's words.
    fn fits(
        &self,
        template: &MachineTemplate,
        session_env: &BTreeMap<String, String>,
    ) -> Result<(), String> {
        let _ = (template, session_env);
        Ok(())
    }

    /// Creates and boots a machine of `template` for `session`. Returns once the provider has
    /// accepted it (not started).
    async fn launch(
        &self,
        template: &MachineTemplate,
        session: &SessionBinding,
    ) -> Result<Launched, ProviderError>;

    /// Waits until the machine is started, at most until `deadline`. Must fail with
    /// [`ProviderError::StartFailed`] as soon as the machine can no longer start, and with
    /// [`ProviderError::Timeout`] at the deadline.
    async fn wait_started(
        &self,
        launched: &Launched,
        deadline: Deadline,
    ) -> Result<(), ProviderError>;

    /// Reads a machine by handle. `Ok(None)` when the provider no longer knows it.
    async fn status(&self, handle: &str) -> Result<Option<MachineStatus>, ProviderError>;

    /// Stops and destroys the machine. Idempotent: a machine that is already gone is success.
    async fn terminate(&self, handle: &str) -> Result<(), ProviderError>;

    /// Finds a session's machine without knowing its handle (by name or labels). Slow path:
    /// used to recover an ambiguous create, never for status polls.
    async fn find(&self, session_key: &str) -> Result<Option<MachineStatus>, ProviderError>;

    /// Every machine this dispatcher manages that is not yet destroyed (for the reaper and
    /// capacity counting).
    async fn list_managed(&self) -> Result<Vec<MachineStatus>, ProviderError>;

    /// One cheap read-only call that proves the credentials work (readiness, `botdispatch check`).
    async fn check(&self) -> Result<(), ProviderError>;

    /// Changing a running machine's labels, where the provider can. With it, a start launches
    /// with a short provisional deadline and extends it once the client has its answer, so the
    /// reaper removes the machines of starts whose dispatcher died half-way.
    fn relabel(&self) -> Option<&dyn Relabel> {
        None
    }

    /// Called once when the dispatcher shuts down. Remote machines outlive the dispatcher on
    /// purpose (their sessions go on); the local provider stops its child processes.
    async fn shutdown(&self) {}
}

/// Changing the labels of a machine that runs, without restarting it.
#[async_trait]
pub trait Relabel: Send + Sync {
    /// Moves the machine's session deadline.
    async fn set_deadline(&self, handle: &str, deadline: Deadline) -> Result<(), ProviderError>;
}
