//! Retries and the backend's documented rate limits around any [`RoomService`], through the
//! same [`Guard`] that wraps machine providers.
//!
//! A create that failed ambiguously is retried safely because room names are derived from the
//! session key: "already exists" on a retry means the first attempt created it, and the room is
//! adopted.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use providers::retry::{Guard, GuardHooks, RetryPolicy};
use tokio::sync::Semaphore;
use tokio::time::Instant;

use super::{
    ListedRoom, Room, RoomError, RoomOp, RoomPage, RoomRequest, RoomService, TokenRequest,
};

/// Calls open to the backend at once. Each holds a connection (its buffers, its task), and
/// Daily answers 20 requests a second whatever is sent: with its limits on, the dispatcher
/// has about 16 × the call's latency open; with them off (`outbound_rate_scale = 0`), a burst
/// of starts would otherwise open a connection per start.
pub const CALLS_AT_ONCE: usize = 32;

pub struct ResilientRooms {
    inner: Arc<dyn RoomService>,
    guard: Guard<RoomOp>,
    calls: Semaphore,
}

impl ResilientRooms {
    /// `rate_scale` multiplies the documented limits (0 turns limiting off).
    pub fn new(inner: Arc<dyn RoomService>, policy: RetryPolicy, rate_scale: f64) -> Self {
        Self {
            guard: Guard::new(inner.rate_limits(), policy, rate_scale),
            inner,
            calls: Semaphore::new(CALLS_AT_ONCE),
        }
    }

    async fn run<T, F, Fut>(&self, op: RoomOp, deadline: Instant, call: F) -> Result<T, RoomError>
    where
        F: Fn() -> Fut,
        Fut: Future<Output = Result<T, RoomError>>,
    {
        self.guard
            .run(op, "", deadline, self, || self.bounded(call()))
            .await
    }

    /// `call` once one of the [`CALLS_AT_ONCE`] slots is free (the wait counts against the
    /// attempt's deadline).
    async fn bounded<T>(
        &self,
        call: impl Future<Output = Result<T, RoomError>>,
    ) -> Result<T, RoomError> {
        let _slot = self
            .calls
            .acquire()
            .await
            .map_err(|_| RoomError::unavailable("the rooms client is closed"))?;
        call.await
    }
}

impl GuardHooks<RoomOp, RoomError> for ResilientRooms {
    fn throttled_locally(&self) -> RoomError {
        RoomError::Throttled {
            retry_after: Some(Duration::from_secs(1)),
        }
    }

    fn no_answer(&self, op: RoomOp) -> RoomError {
        RoomError::unavailable(format!("{}: no answer before the deadline", op.as_str()))
    }

    fn attempt(&self, _: RoomOp, _: Result<(), &RoomError>) {}

    fn retry(&self, op: RoomOp, error: &RoomError, delay: Duration) {
        crate::metrics::retry(self.inner.kind(), op.as_str());
        tracing::debug!(op = op.as_str(), %error, delay_ms = delay.as_millis() as u64, "retrying a rooms call");
    }
}

#[async_trait]
impl RoomService for ResilientRooms {
    fn kind(&self) -> &'static str {
        self.inner.kind()
    }

    fn room_url(&self, name: &str) -> String {
        self.inner.room_url(name)
    }

    async fn create(&self, req: &RoomRequest) -> Result<Room, RoomError> {
        let deadline = req.deadline.unwrap_or_else(|| self.guard.budget());
        match self
            .run(RoomOp::Create, deadline, || self.inner.create(req))
            .await
        {
            // Deterministic names: an existing room of this name is this session's own, made by
            // an earlier attempt whose answer was lost.
            Err(RoomError::AlreadyExists(name)) => Ok(Room {
                url: self.inner.room_url(&name),
                name,
            }),
            other => other,
        }
    }

    async fn create_if_free(&self, req: &RoomRequest) -> Option<Result<Room, RoomError>> {
        let deadline = req.deadline.unwrap_or_else(|| self.guard.budget());
        self.guard
            .once_if_free(RoomOp::Create, "", deadline, self, || {
                self.bounded(self.inner.create(req))
            })
            .await
    }

    async fn delete(&self, name: &str) -> Result<(), RoomError> {
        self.run(RoomOp::Delete, self.guard.budget(), || {
            self.inner.delete(name)
        })
        .await
    }

    async fn find(&self, name: &str) -> Result<Option<ListedRoom>, RoomError> {
        self.run(RoomOp::Get, self.guard.budget(), || self.inner.find(name))
            .await
    }

    async fn list_page(&self, cursor: Option<&str>) -> Result<RoomPage, RoomError> {
        self.run(RoomOp::List, self.guard.budget(), || {
            self.inner.list_page(cursor)
        })
        .await
    }

    fn mint_token(&self, req: &TokenRequest<'_>) -> Result<String, RoomError> {
        self.inner.mint_token(req)
    }

    async fn check(&self) -> Result<(), RoomError> {
        self.inner.check().await
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use chrono::Utc;
    use providers::retry::RateLimit;
    use serde_json::Map;

    use super::*;

    /// Counts creates (and how many ran at once, each taking `delay`); limited to 1 a second
    /// with bursts of 2.
    #[derive(Default)]
    struct Counting(AtomicUsize, AtomicUsize, AtomicUsize, Duration);

    #[async_trait]
    impl RoomService for Counting {
        fn kind(&self) -> &'static str {
            "counting"
        }
        fn rate_limits(&self) -> Vec<(Option<RoomOp>, providers::retry::RateLimit)> {
            vec![(None, RateLimit::app(1.0, 2))]
        }
        fn room_url(&self, name: &str) -> String {
            format!("https://rooms.invalid/{name}")
        }
        async fn create(&self, req: &RoomRequest) -> Result<Room, RoomError> {
            self.0.fetch_add(1, Ordering::SeqCst);
            let now = self.1.fetch_add(1, Ordering::SeqCst) + 1;
            self.2.fetch_max(now, Ordering::SeqCst);
            tokio::time::sleep(self.3).await;
            self.1.fetch_sub(1, Ordering::SeqCst);
            Ok(Room {
                name: req.name.clone(),
                url: self.room_url(&req.name),
            })
        }
        async fn delete(&self, _: &str) -> Result<(), RoomError> {
            Ok(())
        }
        async fn find(&self, _: &str) -> Result<Option<ListedRoom>, RoomError> {
            Ok(None)
        }
        async fn list_page(&self, _: Option<&str>) -> Result<RoomPage, RoomError> {
            Ok(RoomPage::default())
        }
        fn mint_token(&self, _: &TokenRequest<'_>) -> Result<String, RoomError> {
            Ok(String::new())
        }
        async fn check(&self) -> Result<(), RoomError> {
            Ok(())
        }
    }

    fn request(name: &str) -> RoomRequest {
        RoomRequest {
            name: name.to_owned(),
            exp: Utc::now(),
            properties: Map::new(),
            deadline: None,
        }
    }

    /// A pool's create takes only a token free now: it never waits for one, so it never queues
    /// in front of a start's create; a start's create waits its turn.
    #[tokio::test]
    async fn a_create_ahead_takes_only_a_free_token_and_a_start_waits_for_its_own() {
        let inner = Arc::new(Counting::default());
        let rooms = ResilientRooms::new(inner.clone(), RetryPolicy::default(), 1.0);
        for name in ["a", "b"] {
            let room = rooms.create_if_free(&request(name)).await;
            assert_eq!(room.unwrap().unwrap().name, name);
        }
        let t = Instant::now();
        assert!(rooms.create_if_free(&request("c")).await.is_none());
        assert!(t.elapsed() < Duration::from_millis(100), "did not wait");
        assert_eq!(
            inner.0.load(Ordering::SeqCst),
            2,
            "nothing called without a token"
        );
        // A start waits for the next token (1 a second).
        let room = rooms.create(&request("d")).await.unwrap();
        assert_eq!(room.name, "d");
        assert!(
            t.elapsed() >= Duration::from_millis(500),
            "{:?}",
            t.elapsed()
        );
        assert_eq!(inner.0.load(Ordering::SeqCst), 3);
    }

    /// However many rooms are asked for at once (rate limits off), at most
    /// [`CALLS_AT_ONCE`] calls are open to the backend: each holds a connection, and Daily
    /// takes 20 requests a second whatever the dispatcher sends.
    #[tokio::test]
    async fn calls_at_once_are_bounded() {
        let inner = Arc::new(Counting(
            AtomicUsize::new(0),
            AtomicUsize::new(0),
            AtomicUsize::new(0),
            Duration::from_millis(20),
        ));
        let rooms = ResilientRooms::new(inner.clone(), RetryPolicy::default(), 0.0);
        let requests: Vec<RoomRequest> = (0..200).map(|i| request(&format!("r{i}"))).collect();
        let created =
            futures_util::future::join_all(requests.iter().map(|r| rooms.create(r))).await;
        assert!(created.iter().all(Result::is_ok));
        assert_eq!(inner.0.load(Ordering::SeqCst), 200);
        let peak = inner.2.load(Ordering::SeqCst);
        assert!(peak <= CALLS_AT_ONCE, "{peak} calls at once");
    }
}
