//! The reserve's background reconcile loop, on every replica: list the reserve, make ready
//! what booted (its bot answers `/readyz`; the suspended tier is then suspended), and create
//! machines for empty slots — within the provider's rate limits, which the resilient wrapper
//! applies. Removing what must go (stale, broken, surplus) is the reaper's.
//!
//! Overshoot across replicas: a slot's machine is named after the slot and the current
//! [`WINDOW`], so replicas that find the same slot empty within one window pick the same
//! name and the provider refuses all but the first. Replicas can disagree only while their
//! listings do (at most one listing period, 1 s) across a window boundary: then a slot gets at
//! most one machine per replica too many, and the reaper removes the surplus.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use futures_util::StreamExt;
use providers::{MachineStatus, ProviderError, ReserveLabels, Tier, HANDOFF_SECRET_ENV};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::{is_ready, ReserveSet, Reserves};
use crate::metrics;
use crate::session_id::reserve_machine_name;

/// Replicas filling a slot within the same window of this many seconds pick the same name.
pub const WINDOW: u64 = 5;
/// Creates one pass runs at once (each held to the provider's limit for its app).
const CREATE_CONCURRENCY: usize = 8;
/// How long one readiness probe of a booting machine may take.
const PROBE: Duration = Duration::from_secs(2);

/// What one pass did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Replenished {
    pub listed: usize,
    pub made_ready: usize,
    pub created: usize,
    pub taken_by_others: usize,
    /// Empty slots left for a later pass: the create limit had no token free.
    pub throttled: usize,
    /// Machines put back into the reserve after their session.
    pub recycled: usize,
    pub errors: usize,
}

/// What became of one slot's create.
enum Created {
    Yes,
    /// Another replica's machine has the slot's name.
    TakenByOthers,
    /// No create token free now.
    NoTokenNow,
    Failed,
}

impl Reserves {
    /// Runs passes every `interval` (± 20 % jitter) until `stop`.
    pub async fn run(self: Arc<Self>, interval: Duration, stop: CancellationToken) {
        info!(
            interval_ms = interval.as_millis() as u64,
            "reserve replenishment running"
        );
        loop {
            let report = self.replenish().await;
            if report.created + report.made_ready + report.errors > 0 {
                debug!(?report, "reserve pass");
            }
            let jitter = 0.8 + rand::random::<f64>() * 0.4;
            tokio::select! {
                () = stop.cancelled() => return,
                () = tokio::time::sleep(interval.mul_f64(jitter)) => {}
            }
        }
    }

    /// One reconcile pass.
    pub async fn replenish(&self) -> Replenished {
        let mut report = Replenished::default();
        {
            self.listing().at = None;
        }
        let machines = match self.machines().await {
            Ok(m) => m,
            Err(e) => {
                warn!(error = %e, "cannot list the reserve; trying again next pass");
                report.errors += 1;
                return report;
            }
        };
        report.listed = machines.len();
        self.report(&machines);
        for set in self.sets() {
            let mine: Vec<&MachineStatus> = machines
                .iter()
                .filter(|m| {
                    m.reserve.as_ref().is_some_and(|r| {
                        r.agent == set.agent
                            && r.fingerprint == set.fingerprint
                            && r.tier == set.tier
                    })
                })
                .collect();
            let held: Vec<&MachineStatus> = machines
                .iter()
                .filter(|m| m.held.as_ref().is_some_and(|h| h.agent == set.agent))
                .collect();
            self.recycle(set, &held, &mut report).await;
            self.make_ready(set, &mine, &mut report).await;
            self.fill_slots(set, &mine, &held, &mut report).await;
            if let Some(pool) = &set.rooms {
                pool.refill_in_background();
            }
        }
        report
    }

    /// Marks ready the machines whose bot answers `/readyz` (suspending the suspended tier's
    /// first), probing them concurrently.
    async fn make_ready(
        &self,
        set: &ReserveSet,
        mine: &[&MachineStatus],
        report: &mut Replenished,
    ) {
        let Some(reserve) = self.provider.reserve() else {
            return;
        };
        let port = set.template.handoff_port.unwrap_or(8080);
        let waiting = mine.iter().filter(|m| !is_ready(m));
        let probes = waiting.map(|m| async move {
            let already_suspended = m.provider_state == "suspended";
            if !already_suspended {
                if !matches!(m.provider_state.as_str(), "started" | "running") {
                    return Ok(false);
                }
                let handoff = self.provider.handoff().ok_or_else(|| {
                    ProviderError::config(self.provider.name(), "no http handoff")
                })?;
                let url = handoff.bot_url(&m.as_launched(), port)?;
                let deadline = providers::Deadline::after(PROBE);
                if self
                    .handoff()
                    .client
                    .wait_ready(&url, deadline)
                    .await
                    .is_err()
                {
                    return Ok(false);
                }
                if set.tier == Tier::Suspended {
                    reserve.suspend(&m.handle).await?;
                }
            }
            reserve.mark_ready(&m.handle).await?;
            self.made_ready(&m.handle, set.tier);
            if let Some(created) = m.created_at {
                let took = (Utc::now() - created).to_std().unwrap_or_default();
                metrics::reserve_replenished(&set.agent, set.tier.as_str(), took);
            }
            Ok::<bool, ProviderError>(true)
        });
        for result in futures_util::future::join_all(probes).await {
            match result {
                Ok(true) => report.made_ready += 1,
                Ok(false) => {}
                Err(e) => {
                    report.errors += 1;
                    warn!(error = %e, "cannot make a reserve machine ready");
                }
            }
        }
    }

    /// Puts the agent's machines whose session is over back into the reserve (a fresh boot);
    /// those of a stale template, or of an agent that no longer recycles, are destroyed.
    async fn recycle(&self, set: &ReserveSet, held: &[&MachineStatus], report: &mut Replenished) {
        let Some(reserve) = self.provider.reserve() else {
            return;
        };
        let over = held.iter().filter(|m| m.state.is_terminal());
        let work = over.map(|m| async move {
            let labels = m.held.as_ref().expect("held machines have reserve labels");
            if set.recycle && set.owns(labels) && !reserve.unrecyclable(m) {
                reserve.recycle(&m.handle, labels).await?;
                // A stopped-tier machine is ready as it is: claims need not wait for the
                // next listing to see it.
                if set.tier == Tier::Stopped {
                    self.recycled_stopped(&m.handle, labels);
                }
                Ok(true)
            } else {
                self.provider.terminate(&m.handle).await.map(|()| false)
            }
        });
        for result in futures_util::future::join_all(work).await {
            match result {
                Ok(true) => report.recycled += 1,
                Ok(false) | Err(ProviderError::Conflict { .. }) => {}
                Err(e) => {
                    report.errors += 1;
                    warn!(error = %e, "cannot recycle a reserve machine; trying again next pass");
                }
            }
        }
    }

    /// Creates machines for the slots no machine fills (held machines keep theirs).
    async fn fill_slots(
        &self,
        set: &ReserveSet,
        mine: &[&MachineStatus],
        held: &[&MachineStatus],
        report: &mut Replenished,
    ) {
        let Some(reserve) = self.provider.reserve() else {
            return;
        };
        let taken: BTreeSet<u32> = mine
            .iter()
            .filter_map(|m| m.reserve.as_ref().map(|r| r.slot))
            .chain(
                held.iter()
                    .filter_map(|m| m.held.as_ref())
                    .filter(|h| set.owns(h))
                    .map(|h| h.slot),
            )
            .collect();
        let window = Utc::now().timestamp().max(0) as u64 / WINDOW;
        // Every empty slot is tried, a few at a time; a create whose token is not free now is
        // skipped (the wrapper never lets it wait), so a pass takes about one create's time
        // however large the reserve, recycling and readiness keep their cadence, and no
        // machine's name comes from an old listing.
        let failed = AtomicBool::new(false);
        let empty = (0..set.size).filter(|s| !taken.contains(s));
        let creates = futures_util::stream::iter(empty)
            .take_while(|_| std::future::ready(!failed.load(Ordering::Relaxed)))
            .map(|slot| self.create(reserve, set, slot, window, &failed))
            .buffer_unordered(CREATE_CONCURRENCY);
        let outcomes: Vec<Created> = creates.collect().await;
        for outcome in outcomes {
            match outcome {
                Created::Yes => report.created += 1,
                Created::TakenByOthers => report.taken_by_others += 1,
                Created::NoTokenNow => report.throttled += 1,
                Created::Failed => report.errors += 1,
            }
        }
    }

    /// Creates slot `slot`'s machine; a failure sets `failed`: no more creates this pass.
    async fn create(
        &self,
        reserve: &dyn providers::Reserve,
        set: &ReserveSet,
        slot: u32,
        window: u64,
        failed: &AtomicBool,
    ) -> Created {
        let name = reserve_machine_name(&self.deployment, slot, &set.fingerprint, window);
        let labels = ReserveLabels {
            name: name.clone(),
            slot,
            agent: set.agent.clone(),
            fingerprint: set.fingerprint.clone(),
            tier: set.tier,
            ready: false,
            recycle: set.recycle,
            recycled_at: None,
        };
        let env = [(
            HANDOFF_SECRET_ENV.to_owned(),
            self.handoff().secrets.for_machine(&name),
        )]
        .into();
        let t = Instant::now();
        match reserve.prepare(&set.template, &name, &labels, &env).await {
            Ok(launched) => {
                debug!(machine.id = %launched.handle, slot, took_ms = t.elapsed().as_millis() as u64, "reserve machine created");
                Created::Yes
            }
            Err(ProviderError::Conflict { .. }) => Created::TakenByOthers,
            Err(ProviderError::Throttled { .. }) => Created::NoTokenNow,
            Err(e) => {
                failed.store(true, Ordering::Relaxed);
                warn!(slot, error = %e, "cannot create a reserve machine; trying again next pass");
                Created::Failed
            }
        }
    }
}
