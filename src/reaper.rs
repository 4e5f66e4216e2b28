//! The reaper: a reconcile loop that removes what no session needs any more.
//!
//! Each pass re-derives everything from the provider and Daily (no memory between passes), so it
//! is safe on every replica at once: every action is idempotent, and nothing younger than the
//! start timeout (plus a margin) is touched, so a start still in flight on another replica is
//! never mistaken for debris. A pass destroys managed machines that are
//! * past their deadline (which, for providers that can relabel, is a short provisional one
//!   until the start answered its client: this is what reaps the starts of a crashed dispatcher),
//! * stuck in created/starting beyond the start timeout,
//! * whose room is gone;
//!
//! and deletes `bd-*` rooms whose machine is gone (Daily's delete limit is applied by the rooms
//! client). Every action is logged and counted.
//!
//! With reserves (DESIGN §10) a pass also retires unclaimed reserve machines that are stale,
//! broken or surplus (under the provider's claim lease: a machine claimed since the listing is
//! left alone), and deletes pool rooms once their session's machine is gone, or once too old to
//! be handed out (a dead replica's pool). A warm-started machine's age is that of its claim, not
//! of its creation: until its start answered (its provisional deadline), only the deadline rule
//! applies to it.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, Utc};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::reserve::{Reserves, RoomPool};
use crate::rooms::{ListedRoom, RoomService};
use providers::{
    MachineProvider, MachineState, MachineStatus, ProviderError, SessionLabels, StartType,
};

/// What one pass did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct PassReport {
    pub machines_seen: usize,
    pub past_deadline: usize,
    pub stuck_starting: usize,
    pub room_gone: usize,
    pub rooms_deleted: usize,
    /// Unclaimed reserve machines retired (stale, broken, surplus).
    pub reserve_retired: usize,
    /// Machines of recycled reserves whose session is over and that no reserve takes back.
    pub spent: usize,
    pub errors: usize,
}

pub struct Reaper {
    provider: Arc<dyn MachineProvider>,
    rooms: Arc<dyn RoomService>,
    start_timeout: Duration,
    /// Margin beyond the start timeout before anything young is considered debris.
    grace: Duration,
    reserves: Option<Arc<Reserves>>,
    /// Pool rooms seen in a live session's labels: once that machine is gone, the room goes.
    pooled_in_use: Mutex<HashSet<String>>,
    /// How old a pool room may get before it is debris even if never handed out.
    pooled_max_age: Duration,
}

impl Reaper {
    pub fn new(
        provider: Arc<dyn MachineProvider>,
        rooms: Arc<dyn RoomService>,
        start_timeout: Duration,
        grace: Duration,
    ) -> Self {
        Self {
            provider,
            rooms,
            start_timeout,
            grace,
            reserves: None,
            pooled_in_use: Mutex::default(),
            pooled_max_age: Duration::MAX,
        }
    }

    /// Also looks after the reserves and their room pools (`max_session` bounds a pool room's
    /// useful life).
    pub fn with_reserves(mut self, reserves: Option<Arc<Reserves>>, max_session: Duration) -> Self {
        self.reserves = reserves;
        self.pooled_max_age = RoomPool::max_age(max_session) + self.grace;
        self
    }

    /// Runs passes every `interval` (± 20 % jitter, so replicas spread out) until `stop`.
    pub async fn run(self: Arc<Self>, interval: Duration, stop: CancellationToken) {
        info!(interval_secs = interval.as_secs(), "reaper running");
        loop {
            let jitter = 0.8 + rand::random::<f64>() * 0.4;
            tokio::select! {
                () = stop.cancelled() => return,
                () = tokio::time::sleep(interval.mul_f64(jitter)) => {}
            }
            let report = self.pass().await;
            if report
                != (PassReport {
                    machines_seen: report.machines_seen,
                    ..PassReport::default()
                })
            {
                info!(?report, "reaper pass");
            }
        }
    }

    /// One reconcile pass.
    pub async fn pass(&self) -> PassReport {
        let mut report = PassReport::default();
        crate::metrics::reaper_action("pass");
        let machines = match self.provider.list_managed().await {
            Ok(m) => m,
            Err(e) => {
                warn!(error = %e, "reaper cannot list machines; will retry next pass");
                report.errors += 1;
                crate::metrics::reaper_action("error");
                return report;
            }
        };
        report.machines_seen = machines.len();
        let rooms = match self.rooms.list_managed().await {
            Ok(r) => Some(r),
            Err(e) => {
                warn!(error = %e, "reaper cannot list rooms; skipping room checks this pass");
                report.errors += 1;
                None
            }
        };
        let now = Utc::now();
        // An incomplete listing cannot show that a room is gone: the room-gone rule waits.
        let room_names: Option<HashSet<&str>> = rooms
            .as_ref()
            .filter(|listing| listing.complete)
            .map(|listing| listing.rooms.iter().map(|r| r.name.as_str()).collect());
        let mut live_rooms: HashSet<&str> = HashSet::new();
        for m in &machines {
            let Some(labels) = &m.labels else { continue };
            if m.state.is_terminal() {
                if self.spent(m) {
                    report.spent += 1;
                    self.destroy(
                        m,
                        labels,
                        "session over, not recycled",
                        "spent",
                        &mut report,
                    )
                    .await;
                }
                continue;
            }
            match self.verdict(m, labels, room_names.as_ref(), now, &mut report) {
                Some((reason, action)) => {
                    self.destroy(m, labels, reason, action, &mut report).await
                }
                None => {
                    live_rooms.insert(&labels.room);
                }
            }
        }
        let listed = rooms.iter().flat_map(|listing| &listing.rooms);
        let debris: Vec<&ListedRoom> = self.debris_rooms(listed, &live_rooms, now);
        for room in debris {
            self.delete_room(&room.name, &mut report).await;
        }
        self.retire_reserve(now, &mut report).await;
        report
    }

    /// The listed rooms no session needs: a session room whose machine is gone (once past the
    /// start timeout: its start may be in flight), a pool room whose session's machine is gone
    /// (seen in use by an earlier pass) or that is too old to be handed out any more.
    fn debris_rooms<'a>(
        &self,
        listed: impl Iterator<Item = &'a ListedRoom>,
        live: &HashSet<&str>,
        now: DateTime<Utc>,
    ) -> Vec<&'a ListedRoom> {
        let mut in_use = self.pooled_in_use.lock().unwrap_or_else(|e| e.into_inner());
        let mut debris = Vec::new();
        let mut still_in_use = HashSet::new();
        for room in listed {
            let name = room.name.as_str();
            if live.contains(name) {
                if room.pooled {
                    still_in_use.insert(name.to_owned());
                }
                continue;
            }
            let gone = if room.pooled {
                let age = room
                    .created_at
                    .map_or(Duration::MAX, |c| (now - c).to_std().unwrap_or_default());
                in_use.contains(name) || age > self.pooled_max_age
            } else {
                self.old_enough(room.created_at, now)
            };
            if gone {
                debris.push(room);
            }
        }
        *in_use = still_in_use;
        debris
    }

    /// Retires the reserve machines that must go, each only if still unclaimed.
    async fn retire_reserve(&self, now: DateTime<Utc>, report: &mut PassReport) {
        let Some(reserves) = &self.reserves else {
            return;
        };
        let Some(reserve) = self.provider.reserve() else {
            return;
        };
        let machines = match reserves.machines().await {
            Ok(m) => m,
            Err(e) => {
                warn!(error = %e, "reaper cannot list the reserve; will retry next pass");
                report.errors += 1;
                return;
            }
        };
        let grace = self.start_timeout + self.grace;
        for (handle, reason) in reserves.doomed(&machines, now, grace) {
            match reserve.retire(&handle).await {
                Ok(()) => {
                    report.reserve_retired += 1;
                    crate::metrics::reaper_action("retire_reserve");
                    info!(machine.id = %handle, reason, "reaper retired a reserve machine");
                }
                // Claimed (or being claimed) since the listing: a session's now.
                Err(ProviderError::Conflict { .. }) => {}
                Err(e) => {
                    report.errors += 1;
                    crate::metrics::reaper_action("error");
                    warn!(machine.id = %handle, error = %e, "reaper cannot retire a reserve machine");
                }
            }
        }
    }

    /// Whether `m` is a recycled reserve's machine whose session is over and that no reserve
    /// here takes back (its agent stopped recycling or is gone, or its template is stale): it
    /// was created without auto-destroy, so it would stay, stopped, for ever.
    fn spent(&self, m: &MachineStatus) -> bool {
        m.held.as_ref().is_some_and(|held| {
            !self
                .reserves
                .as_ref()
                .is_some_and(|reserves| reserves.recycles(held))
        })
    }

    /// Whether something created at `created` is past the start timeout plus the grace (and
    /// so cannot be a start in flight on some replica).
    fn old_enough(&self, created: Option<DateTime<Utc>>, now: DateTime<Utc>) -> bool {
        created.is_none_or(|c| {
            (now - c).to_std().unwrap_or_default() > self.start_timeout + self.grace
        })
    }

    /// Why a live machine must go (the reason for the log, the action for metrics), if it must.
    fn verdict(
        &self,
        m: &MachineStatus,
        labels: &SessionLabels,
        room_names: Option<&HashSet<&str>>,
        now: DateTime<Utc>,
        report: &mut PassReport,
    ) -> Option<(&'static str, &'static str)> {
        if labels.deadline.wall() < now {
            report.past_deadline += 1;
            Some(("past its deadline", "destroy_past_deadline"))
        } else if labels.start != StartType::Cold && !self.answered(labels, now) {
            // Claimed from the reserve and its start still in flight (or its dispatcher dead,
            // which the provisional deadline covers): its creation time says nothing.
            None
        } else if m.state == MachineState::Starting && self.old_enough(m.created_at, now) {
            report.stuck_starting += 1;
            Some(("stuck starting beyond the start timeout", "destroy_stuck"))
        } else if !labels.room.is_empty()
            && self.old_enough(m.created_at, now)
            && room_names.is_some_and(|names| !names.contains(labels.room.as_str()))
        {
            report.room_gone += 1;
            Some(("its room is gone", "destroy_roomless"))
        } else {
            None
        }
    }

    /// Whether a machine's start has answered its client: its deadline is no longer the
    /// provisional one (at most the start timeout plus the grace away).
    fn answered(&self, labels: &SessionLabels, now: DateTime<Utc>) -> bool {
        let left = (labels.deadline.wall() - now).to_std().unwrap_or_default();
        left > self.start_timeout + self.grace + Duration::from_secs(1)
    }

    async fn destroy(
        &self,
        m: &MachineStatus,
        labels: &SessionLabels,
        reason: &'static str,
        action: &'static str,
        report: &mut PassReport,
    ) {
        match self.provider.terminate(&m.handle).await {
            Ok(()) => {
                crate::metrics::reaper_action(action);
                info!(machine.id = %m.handle, session.key = %labels.session_key, reason, "reaper destroyed a machine");
            }
            Err(e) => {
                report.errors += 1;
                crate::metrics::reaper_action("error");
                warn!(machine.id = %m.handle, error = %e, "reaper cannot destroy a machine");
            }
        }
    }

    async fn delete_room(&self, name: &str, report: &mut PassReport) {
        match self.rooms.delete(name).await {
            Ok(()) => {
                report.rooms_deleted += 1;
                crate::metrics::reaper_action("delete_room");
                info!(room = %name, "reaper deleted a room whose machine is gone");
            }
            Err(e) => {
                report.errors += 1;
                crate::metrics::reaper_action("error");
                warn!(room = %name, error = %e, "reaper cannot delete a room");
            }
        }
    }
}
