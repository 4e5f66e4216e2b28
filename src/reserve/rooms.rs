//! A replica's pool of Daily rooms created ahead, as many as the reserve has machines, so that
//! a warm start does not wait for a room, and a burst is not held to Daily's 20 requests/s.
//! Rooms are private and live [`ROOM_TTL_FACTOR`] sessions long; one is handed out only while
//! its remaining lifetime covers a whole session, and retired otherwise. A room that is
//! handed out is named in its session machine's labels, so the reaper's room rules keep
//! working; the pool rooms of a replica that died are deleted by the reaper once too old to
//! be handed out.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, Utc};
use futures_util::future::join_all;
use serde_json::Map;

use crate::rooms::{RoomRequest, RoomService};
use crate::session_id::pool_room_name;

/// Room creates a refill has in flight at once.
const REFILL_CONCURRENCY: usize = 4;

/// How soon a refill that found no Daily token free looks again.
const REFILL_RETRY: Duration = Duration::from_millis(50);

/// What one create of a refill did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Created {
    Room,
    /// No rate-limit token was free; nothing was called.
    NoToken,
    Failed,
}

/// Pool rooms live this many maximal sessions.
pub const ROOM_TTL_FACTOR: u32 = 3;

/// A room created ahead.
#[derive(Debug, Clone)]
pub struct PooledRoom {
    pub name: String,
    pub url: String,
    pub exp: DateTime<Utc>,
}

/// One agent's pool on this replica.
pub struct RoomPool {
    rooms: Arc<dyn RoomService>,
    deployment: String,
    target: usize,
    max_session: Duration,
    ready: Mutex<VecDeque<PooledRoom>>,
    /// A refill runs (at most one at a time).
    refilling: std::sync::atomic::AtomicBool,
}

impl RoomPool {
    pub fn new(
        rooms: Arc<dyn RoomService>,
        deployment: &str,
        target: usize,
        max_session: Duration,
    ) -> Self {
        Self {
            rooms,
            deployment: deployment.to_owned(),
            target,
            max_session,
            ready: Mutex::default(),
            refilling: std::sync::atomic::AtomicBool::new(false),
        }
    }

    /// Refills in a task of its own, unless one runs: the reserve's pass does not wait for
    /// room creates.
    pub fn refill_in_background(self: &Arc<Self>) {
        use std::sync::atomic::Ordering;
        if self.refilling.swap(true, Ordering::AcqRel) {
            return;
        }
        let pool = Arc::clone(self);
        tokio::spawn(async move {
            pool.refill().await;
            pool.refilling.store(false, Ordering::Release);
        });
    }

    /// How old a pool room may get and still be handed out; older unused ones are debris.
    pub fn max_age(max_session: Duration) -> Duration {
        max_session * (ROOM_TTL_FACTOR - 1)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, VecDeque<PooledRoom>> {
        self.ready.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A room whose remaining lifetime covers a whole session (and a minute), if any.
    pub fn take(&self) -> Option<PooledRoom> {
        let enough = Utc::now()
            + chrono::Duration::from_std(self.max_session + Duration::from_secs(60))
                .unwrap_or_default();
        let mut ready = self.lock();
        ready.retain(|room| room.exp > enough);
        ready.pop_front()
    }

    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Creates rooms up to the target, a few at a time, each with a Daily token free at that
    /// moment: when none is, it looks again shortly rather than queueing for one, so a start
    /// that creates its room on demand is never behind the pool's whole refill. An error ends
    /// the refill (logged); the next pass starts another.
    pub async fn refill(&self) {
        loop {
            let missing = self.target.saturating_sub(self.len());
            if missing == 0 {
                return;
            }
            let round =
                join_all((0..missing.min(REFILL_CONCURRENCY)).map(|_| self.create_one())).await;
            if round.contains(&Created::Failed) {
                return;
            }
            if round.iter().all(|c| *c == Created::NoToken) {
                tokio::time::sleep(REFILL_RETRY).await;
            }
        }
    }

    /// One room into the pool.
    async fn create_one(&self) -> Created {
        let exp = Utc::now()
            + chrono::Duration::from_std(self.max_session * ROOM_TTL_FACTOR).unwrap_or_default();
        let req = RoomRequest {
            name: pool_room_name(&self.deployment),
            exp: DateTime::from_timestamp(exp.timestamp(), 0).unwrap_or(exp),
            properties: Map::new(),
            deadline: None,
        };
        match self.rooms.create_if_free(&req).await {
            Some(Ok(room)) => {
                self.lock().push_back(PooledRoom {
                    name: room.name,
                    url: room.url,
                    exp: req.exp,
                });
                Created::Room
            }
            Some(Err(e)) => {
                tracing::warn!(error = %e, "cannot create a pool room; trying again later");
                Created::Failed
            }
            None => Created::NoToken,
        }
    }
}
