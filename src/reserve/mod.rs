//! Warm capacity (DESIGN §10): per agent, a reserve of machines prepared from the agent's
//! template alone — running and ready (`hot`), booted then suspended (`suspended`), or
//! created but never started (`stopped`) — each claimed for exactly one session and destroyed
//! after it; and a per-replica pool of rooms created ahead ([`rooms`]).
//!
//! Nothing here is kept that another replica would need. Every replica lists the reserve
//! (at most once a second, the provider's list limit), claims from that listing and
//! replenishes it ([`replenish`]); a claim is atomic at the provider (a Fly lease), so two
//! replicas never hand out the same machine, and a lost race only means trying the next one.
//! Replenishment names machines after their slot and a time window, so replicas filling the
//! same slot at once collide on the name and only one machine is made.

pub mod replenish;
pub mod rooms;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, Utc};
use providers::{
    MachineProvider, MachineStatus, MachineTemplate, ProviderError, ReserveLabels, SessionLabels,
    Tier,
};
use rand::seq::SliceRandom;
use tokio::time::Instant;

use crate::config::Config;
use crate::handoff::Handoff;
use crate::metrics;
use crate::rooms::RoomService;
pub use rooms::{PooledRoom, RoomPool};

/// How long a listing of the reserve is used before it is read again.
const LISTING_TTL: Duration = Duration::from_secs(1);

/// One agent's reserve.
pub struct ReserveSet {
    pub agent: String,
    pub tier: Tier,
    /// Machines to keep: unclaimed, plus (recycled) those in a session or being recycled.
    pub size: u32,
    /// Machines go back into the reserve after their session.
    pub recycle: bool,
    pub template: Arc<MachineTemplate>,
    /// The template's fingerprint: machines of another are stale.
    pub fingerprint: String,
    /// This replica's room pool for the agent, when on.
    pub rooms: Option<Arc<RoomPool>>,
}

impl ReserveSet {
    /// Whether reserve labels are this set's current ones (agent, template, tier).
    fn owns(&self, labels: &ReserveLabels) -> bool {
        labels.agent == self.agent
            && labels.fingerprint == self.fingerprint
            && labels.tier == self.tier
    }

    /// This set's machines in `machines` by phase.
    fn census(&self, machines: &[MachineStatus]) -> ReserveSummary {
        let mut census = ReserveSummary {
            agent: self.agent.clone(),
            tier: self.tier,
            size: self.size,
            recycle: self.recycle,
            ready: 0,
            preparing: 0,
            in_session: 0,
            recycling: 0,
            pooled_rooms: self.rooms.as_ref().map_or(0, |p| p.len()),
        };
        for m in machines {
            if let Some(r) = &m.reserve {
                if r.agent == self.agent && r.fingerprint == self.fingerprint {
                    if is_ready(m) {
                        census.ready += 1;
                    } else {
                        census.preparing += 1;
                    }
                }
            } else if m
                .held
                .as_ref()
                .is_some_and(|h| self.recycle && self.owns(h))
            {
                if m.state.is_terminal() {
                    census.recycling += 1;
                } else {
                    census.in_session += 1;
                }
            }
        }
        census
    }

    /// Whether `machine` is one of this set's and could serve a session now.
    fn claimable(&self, machine: &MachineStatus) -> bool {
        let Some(reserve) = &machine.reserve else {
            return false;
        };
        reserve.agent == self.agent
            && reserve.fingerprint == self.fingerprint
            && reserve.tier == self.tier
            && is_ready(machine)
    }
}

/// Whether a reserve machine is ready for a claim: for `stopped`, created and stopped; for the
/// others, marked ready (its bot answered `/readyz`; suspended, for that tier) and in the
/// state its tier keeps it in.
pub fn is_ready(machine: &MachineStatus) -> bool {
    let Some(reserve) = &machine.reserve else {
        return false;
    };
    let state = machine.provider_state.as_str();
    match reserve.tier {
        Tier::Stopped => state == "stopped",
        Tier::Hot => reserve.ready && matches!(state, "started" | "running"),
        Tier::Suspended => reserve.ready && state == "suspended",
    }
}

/// One agent's reserve, as last listed.
#[derive(Debug, Clone)]
pub struct ReserveSummary {
    pub agent: String,
    pub tier: Tier,
    pub size: u32,
    pub recycle: bool,
    pub ready: usize,
    pub preparing: usize,
    /// Recycled machines running a session.
    pub in_session: usize,
    /// Recycled machines whose session is over, waiting to boot again.
    pub recycling: usize,
    pub pooled_rooms: usize,
}

/// A machine taken for a session.
#[derive(Debug, Clone)]
pub struct Claimed {
    pub machine: MachineStatus,
    pub tier: Tier,
    /// The machine's name (its handoff secret is derived from it).
    pub name: String,
    /// The claim's lease, still held (see [`providers::Reserve::claim`]).
    pub lease: Option<String>,
}

struct Listing {
    at: Option<Instant>,
    machines: Vec<MachineStatus>,
}

/// Every agent's reserve on this replica.
pub struct Reserves {
    provider: Arc<dyn MachineProvider>,
    sets: BTreeMap<String, ReserveSet>,
    handoff: Handoff,
    deployment: String,
    /// A machine that is not ready this long after it was made is broken.
    prepare_timeout: Duration,
    listing: Mutex<Listing>,
    /// Held while the reserve is listed: callers that find the listing old while a listing
    /// runs wait for it instead of listing again.
    refreshing: tokio::sync::Mutex<()>,
}

impl Reserves {
    /// The reserves the configuration asks for; `None` when no agent has one.
    pub fn new(
        config: &Config,
        provider: Arc<dyn MachineProvider>,
        rooms: &Arc<dyn RoomService>,
        templates: &BTreeMap<String, Arc<MachineTemplate>>,
        handoff: Handoff,
    ) -> Option<Self> {
        let sets: BTreeMap<String, ReserveSet> = config
            .agents
            .iter()
            .filter_map(|(name, agent)| {
                let reserve = agent.reserve.as_ref()?;
                let template = Arc::clone(templates.get(name)?);
                let pool = reserve.rooms.then(|| {
                    Arc::new(RoomPool::new(
                        Arc::clone(rooms),
                        &config.deployment,
                        // A room for every machine a burst can claim.
                        reserve.size.max(1) as usize,
                        config.max_session(),
                    ))
                });
                let set = ReserveSet {
                    agent: name.clone(),
                    tier: reserve.tier.0,
                    size: reserve.size,
                    recycle: reserve.recycle,
                    fingerprint: template.fingerprint(),
                    template,
                    rooms: pool,
                };
                Some((name.clone(), set))
            })
            .collect();
        if sets.is_empty() {
            return None;
        }
        Some(Self {
            provider,
            sets,
            handoff,
            deployment: config.deployment.clone(),
            prepare_timeout: config.start_timeout() * 2
                + Duration::from_secs(config.reaper_grace_secs),
            listing: Mutex::new(Listing {
                at: None,
                machines: Vec::new(),
            }),
            refreshing: tokio::sync::Mutex::new(()),
        })
    }

    pub fn set(&self, agent: &str) -> Option<&ReserveSet> {
        self.sets.get(agent)
    }

    pub fn sets(&self) -> impl Iterator<Item = &ReserveSet> {
        self.sets.values()
    }

    pub fn handoff(&self) -> &Handoff {
        &self.handoff
    }

    fn listing(&self) -> std::sync::MutexGuard<'_, Listing> {
        self.listing.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The reserve as last listed; read again when older than [`LISTING_TTL`], by one caller
    /// at a time: the others wait for that listing and share it.
    pub async fn machines(&self) -> Result<Vec<MachineStatus>, ProviderError> {
        let fresh = |listing: &Listing| listing.at.is_some_and(|at| at.elapsed() < LISTING_TTL);
        {
            let listing = self.listing();
            if fresh(&listing) {
                return Ok(listing.machines.clone());
            }
        }
        let Some(reserve) = self.provider.reserve() else {
            return Ok(Vec::new());
        };
        let _refreshing = self.refreshing.lock().await;
        {
            let listing = self.listing();
            if fresh(&listing) {
                return Ok(listing.machines.clone());
            }
        }
        let machines = reserve.list_reserve().await?;
        let mut listing = self.listing();
        listing.at = Some(Instant::now());
        listing.machines = machines.clone();
        Ok(machines)
    }

    /// Takes a ready machine of `agent` for the session `labels` describe (their `start` is
    /// set to the tier): from the last listing, in random order (so replicas seldom race for
    /// the same one), lease by lease. `None` when none could be taken: the caller goes cold.
    pub async fn claim(&self, agent: &str, labels: &SessionLabels) -> Option<Claimed> {
        let set = self.sets.get(agent)?;
        let t0 = Instant::now();
        let mut candidates = self.candidates(set);
        if candidates.is_empty() {
            // Nothing in the last listing: read it again if it is old (at most once a second).
            if let Err(e) = self.machines().await {
                tracing::debug!(error = %e, "cannot list the reserve; starting cold");
            }
            candidates = self.candidates(set);
        }
        candidates.shuffle(&mut rand::rng());
        let reserve = self.provider.reserve()?;
        let mut labels = labels.clone();
        labels.start = providers::StartType::Warm(set.tier);
        for machine in candidates {
            // Whatever happens, this machine is no candidate any more for this replica.
            self.forget(&machine.handle);
            match reserve.claim(&machine.handle, &labels).await {
                Ok(lease) => {
                    metrics::reserve_claim(agent, "hit");
                    metrics::reserve_claim_duration(agent, t0.elapsed());
                    let name = machine
                        .reserve
                        .as_ref()
                        .map(|r| r.name.clone())
                        .unwrap_or_default();
                    return Some(Claimed {
                        machine,
                        tier: set.tier,
                        name,
                        lease,
                    });
                }
                Err(ProviderError::Conflict { .. }) => {
                    metrics::reserve_claim(agent, "lease_conflict")
                }
                Err(e) => {
                    metrics::reserve_claim(agent, "error");
                    tracing::warn!(machine.id = %machine.handle, error = %e, "cannot claim a reserve machine; trying another");
                }
            }
        }
        metrics::reserve_claim(agent, "miss");
        None
    }

    /// The claimable machines of `set` in the last listing.
    fn candidates(&self, set: &ReserveSet) -> Vec<MachineStatus> {
        let listing = self.listing();
        listing
            .machines
            .iter()
            .filter(|m| set.claimable(m))
            .cloned()
            .collect()
    }

    /// Records in the cached listing that a machine was made ready (and suspended, for that
    /// tier), so claims need not wait for the next listing.
    fn made_ready(&self, handle: &str, tier: Tier) {
        let mut listing = self.listing();
        if let Some(m) = listing.machines.iter_mut().find(|m| m.handle == handle) {
            if let Some(reserve) = m.reserve.as_mut() {
                reserve.ready = true;
            }
            if tier == Tier::Suspended {
                m.provider_state = "suspended".to_owned();
            }
        }
    }

    /// Records in the cached listing that a held machine went back into the reserve under
    /// `labels` (not marked ready: the stopped tier needs no mark, only its state).
    fn recycled_stopped(&self, handle: &str, labels: &ReserveLabels) {
        let mut listing = self.listing();
        if let Some(m) = listing.machines.iter_mut().find(|m| m.handle == handle) {
            m.held = None;
            m.labels = None;
            m.reserve = Some(ReserveLabels {
                ready: false,
                ..labels.clone()
            });
        }
    }

    /// Drops a machine from the cached listing (claimed, or found wanting).
    fn forget(&self, handle: &str) {
        self.listing().machines.retain(|m| m.handle != handle);
    }

    /// Whether a machine held under these reserve labels goes back into its reserve after its
    /// session here (its agent recycles, and it is of the agent's current template and tier).
    pub fn recycles(&self, labels: &ReserveLabels) -> bool {
        self.sets
            .get(&labels.agent)
            .is_some_and(|s| s.recycle && s.owns(labels))
    }

    /// A room from `agent`'s pool on this replica, if it has one ready.
    pub fn take_room(&self, agent: &str) -> Option<PooledRoom> {
        self.sets.get(agent)?.rooms.as_ref()?.take()
    }

    /// Unclaimed reserve machines the reaper must remove, with why: a stale template, no
    /// reserve for its agent any more, never ready in time (broken), or surplus beyond the
    /// size (the youngest first). Machines younger than `grace` are left to their preparation.
    pub fn doomed(
        &self,
        machines: &[MachineStatus],
        now: DateTime<Utc>,
        grace: Duration,
    ) -> Vec<(String, &'static str)> {
        // A recycled machine prepares anew from when it was put back.
        let age = |m: &MachineStatus| {
            let since = m
                .reserve
                .as_ref()
                .and_then(|r| r.recycled_at)
                .and_then(|t| DateTime::from_timestamp(t, 0))
                .or(m.created_at);
            since.map_or(Duration::MAX, |c| (now - c).to_std().unwrap_or_default())
        };
        // Held machines (a session's, or being recycled) keep their slots.
        let mut held: BTreeMap<&str, usize> = BTreeMap::new();
        for m in machines {
            if let Some(h) = m.held.as_ref().filter(|h| self.recycles(h)) {
                *held.entry(h.agent.as_str()).or_default() += 1;
            }
        }
        let mut doomed = Vec::new();
        let mut keep: BTreeMap<&str, Vec<&MachineStatus>> = BTreeMap::new();
        for m in machines {
            let Some(reserve) = &m.reserve else { continue };
            let set = self.sets.get(&reserve.agent);
            if m.state.is_terminal()
                && !matches!(m.provider_state.as_str(), "stopped" | "suspended")
            {
                doomed.push((m.handle.clone(), "broken"));
            } else if set
                .is_none_or(|s| s.fingerprint != reserve.fingerprint || s.tier != reserve.tier)
            {
                doomed.push((m.handle.clone(), "stale"));
            } else if !is_ready(m) && age(m) > self.prepare_timeout {
                doomed.push((m.handle.clone(), "broken"));
            } else {
                keep.entry(reserve.agent.as_str()).or_default().push(m);
            }
        }
        for (agent, mut machines) in keep {
            let size = self.sets.get(agent).map_or(0, |s| s.size as usize);
            let size = size.saturating_sub(held.get(agent).copied().unwrap_or(0));
            // Ready ones first, then the oldest: the surplus is the youngest unready.
            machines.sort_by_key(|m| (!is_ready(m), m.created_at));
            doomed.extend(
                machines
                    .iter()
                    .skip(size)
                    .filter(|m| age(m) > grace)
                    .map(|m| (m.handle.clone(), "surplus")),
            );
        }
        doomed
    }

    /// Each agent's reserve as last listed (no provider call).
    pub fn summary(&self) -> Vec<ReserveSummary> {
        let machines = self.listing().machines.clone();
        self.sets
            .values()
            .map(|set| set.census(&machines))
            .collect()
    }

    /// Publishes the reserve's size by agent, tier and state.
    fn report(&self, machines: &[MachineStatus]) {
        for set in self.sets.values() {
            let census = set.census(machines);
            let tier = set.tier.as_str();
            metrics::reserve_machines(&set.agent, tier, "ready", census.ready);
            metrics::reserve_machines(&set.agent, tier, "preparing", census.preparing);
            if set.recycle {
                metrics::reserve_machines(&set.agent, tier, "in_session", census.in_session);
                metrics::reserve_machines(&set.agent, tier, "recycling", census.recycling);
            }
            if let Some(pool) = &set.rooms {
                metrics::pooled_rooms(&set.agent, pool.len());
            }
        }
    }
}
