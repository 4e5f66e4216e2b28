//! The [`MachineProvider`] trait every cloud implements, and the optional capabilities a
//! provider may add ([`Relabel`]).

use std::collections::BTreeMap;

use async_trait::async_trait;

use crate::retry::{Op, RateLimit};
use crate::{
    Deadline, Launched, MachineStatus, MachineTemplate, ProviderError, ReserveLabels,
    SessionBinding, SessionLabels, Tier,
};

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

    /// The key under which the create of a machine named `name` (a launch, a reserve
    /// machine's preparation) draws its [`Op::Launch`] tokens from a keyed limit
    /// ([`RateLimit::keyed`]): Fly's create limit is per app, and a Fly provider spread over
    /// several apps names the app the create goes to. Default: one key for every create.
    fn launch_key(&self, name: &str) -> String {
        let _ = name;
        String::new()
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

    /// Handing sessions to machines over HTTP (the `http` handoff), where the provider's
    /// machines can be reached on a private network.
    fn handoff(&self) -> Option<&dyn HttpHandoff> {
        None
    }

    /// Keeping a reserve of machines prepared from a template alone, each claimed for one
    /// session, where the provider can.
    fn reserve(&self) -> Option<&dyn Reserve> {
        None
    }

    /// Called once when the dispatcher shuts down. Remote machines outlive the dispatcher on
    /// purpose (their sessions go on); the local provider stops its child processes.
    async fn shutdown(&self) {}
}

/// Changing the labels of a machine that runs, without restarting it.
#[async_trait]
pub trait Relabel: Send + Sync {
    /// Sets these labels (others are kept), in one call.
    async fn set_labels(
        &self,
        handle: &str,
        labels: &BTreeMap<String, String>,
    ) -> Result<(), ProviderError>;

    /// Moves the machine's session deadline.
    async fn set_deadline(&self, handle: &str, deadline: Deadline) -> Result<(), ProviderError> {
        let labels = BTreeMap::from([(
            crate::labels::key::DEADLINE.to_owned(),
            deadline.unix_secs().to_string(),
        )]);
        self.set_labels(handle, &labels).await
    }
}

/// Handing a session to a booted machine over HTTP (DESIGN §4): the dispatcher reaches the
/// machine's bot server on the provider's private network.
#[async_trait]
pub trait HttpHandoff: Send + Sync {
    /// The base URL of `machine`'s bot server listening on `port`; `/readyz` and `/bot` are
    /// appended to its path.
    fn bot_url(&self, machine: &Launched, port: u16) -> Result<url::Url, ProviderError>;

    /// Sends the machine's bot SIGTERM: it finishes the session it has and exits, and no
    /// other session can reach this boot. `lease`: the claim's, while the caller holds it.
    async fn end_after_session(
        &self,
        handle: &str,
        lease: Option<&str>,
    ) -> Result<(), ProviderError>;
}

/// A reserve of machines prepared from their agent's template alone, each taken for exactly
/// one session (DESIGN §10). Machines are reserve machines ([`ReserveLabels`]) until claimed;
/// a claimed one carries its session's labels like any session's machine.
#[async_trait]
pub trait Reserve: Send + Sync {
    /// The tiers this provider can keep.
    fn tiers(&self) -> &'static [Tier];

    /// Creates a reserve machine named `name` (deterministic: a name taken by another replica
    /// answers [`ProviderError::Conflict`]) from `template` alone, with `env` (its own
    /// handoff secret) and `labels`: running for the hot and suspended tiers (the dispatcher
    /// suspends it once ready), created but never started for the stopped tier. Through the
    /// resilient wrapper, [`ProviderError::Throttled`] at once when the create limit has no
    /// token free now.
    async fn prepare(
        &self,
        template: &MachineTemplate,
        name: &str,
        labels: &ReserveLabels,
        env: &BTreeMap<String, String>,
    ) -> Result<Launched, ProviderError>;

    /// This deployment's reserve machines that no session has claimed
    /// ([`MachineStatus::reserve`]), and the machines of recycled reserves that a session
    /// holds or held ([`MachineStatus::held`]): they keep their slot.
    async fn list_reserve(&self) -> Result<Vec<MachineStatus>, ProviderError>;

    /// Marks a reserve machine ready (its bot answered `/readyz`; suspended, for that tier).
    async fn mark_ready(&self, handle: &str) -> Result<(), ProviderError>;

    /// Suspends a running reserve machine: a memory snapshot a later start resumes.
    async fn suspend(&self, handle: &str) -> Result<(), ProviderError>;

    /// Takes an unclaimed reserve machine for a session, atomically across replicas, and
    /// writes the session's labels. [`ProviderError::Conflict`] when another replica holds it
    /// or it is no reserve machine any more: try another. Returns the claim's lease (where the
    /// provider has leases), still held: calls on the machine pass it until
    /// [`Reserve::release`], so a replica acting on an older listing cannot get in between.
    async fn claim(
        &self,
        handle: &str,
        session: &SessionLabels,
    ) -> Result<Option<String>, ProviderError>;

    /// Starts a claimed stopped machine (a boot) or suspended one (a resume, which may come
    /// back cold). Returns once the provider accepted it.
    async fn start(&self, handle: &str, lease: Option<&str>) -> Result<Launched, ProviderError>;

    /// Sets `labels` (none: nothing to set) under a claim's lease, then releases it.
    async fn release(
        &self,
        handle: &str,
        lease: &str,
        labels: &BTreeMap<String, String>,
    ) -> Result<(), ProviderError>;

    /// Whether a held machine whose session is over can never be recycled (the provider left
    /// it failed; only a destroy removes it): its slot is freed by destroying it. Machines
    /// merely between states are not: their recycle is tried again next pass.
    fn unrecyclable(&self, _machine: &MachineStatus) -> bool {
        false
    }

    /// Puts a held machine whose session is over (stopped, not destroyed: recycled reserves
    /// are created without auto-destroy) back into the reserve: atomically with respect to
    /// other replicas, its session labels are cleared and its reserve labels restored (not
    /// ready), and for the hot and suspended tiers it is started again from its image — a
    /// fresh boot: new memory, the root filesystem reset. The stopped tier boots on its next
    /// claim. [`ProviderError::Conflict`] when another replica is recycling it or it is not a
    /// held machine whose session is over.
    async fn recycle(&self, handle: &str, labels: &ReserveLabels) -> Result<(), ProviderError>;

    /// Destroys a reserve machine only if no session has claimed it, atomically with respect
    /// to [`Reserve::claim`] (under the same lease): a listing may be older than a claim.
    /// [`ProviderError::Conflict`] when it is held or claimed: it is left alone.
    async fn retire(&self, handle: &str) -> Result<(), ProviderError>;
}
