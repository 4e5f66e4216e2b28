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

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::rooms::RoomService;
use providers::{MachineProvider, MachineState, MachineStatus, SessionLabels};

/// What one pass did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct PassReport {
    pub machines_seen: usize,
    pub past_deadline: usize,
    pub stuck_starting: usize,
    pub room_gone: usize,
    pub rooms_deleted: usize,
    pub errors: usize,
}

pub struct Reaper {
    provider: Arc<dyn MachineProvider>,
    rooms: Arc<dyn RoomService>,
    start_timeout: Duration,
    /// Margin beyond the start timeout before anything young is considered debris.
    grace: Duration,
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
        }
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
        for room in rooms.iter().flat_map(|listing| &listing.rooms) {
            if !live_rooms.contains(room.name.as_str()) && self.old_enough(room.created_at, now) {
                self.delete_room(&room.name, &mut report).await;
            }
        }
        report
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
