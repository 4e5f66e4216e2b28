//! Retries and Daily's documented rate limits around any [`RoomService`], like
//! [`providers::resilient::Resilient`] does for machines.
//!
//! Daily allows 20 requests/s and 100 per 5 s on most endpoints, and about 2 deletes/s (50 per
//! 30 s). The buckets here stay inside both windows: 16/s with bursts of 4 for everything, and
//! one delete per 625 ms. A create that failed ambiguously is retried safely because room names
//! are derived from the session key: "already exists" on a retry means the first attempt
//! created it, and the room is adopted.

use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use providers::resilient::{retry, RetryPolicy, Transient};
use tokio::time::Instant;

use super::{Room, RoomError, RoomRequest, RoomService, TokenRequest};

impl Transient for RoomError {
    fn is_transient(&self) -> bool {
        matches!(
            self,
            RoomError::Throttled { .. } | RoomError::Unavailable { .. }
        )
    }

    fn retry_after(&self) -> Option<Duration> {
        match self {
            RoomError::Throttled { retry_after } => *retry_after,
            _ => None,
        }
    }
}

pub struct ResilientRooms {
    inner: Arc<dyn RoomService>,
    policy: RetryPolicy,
    all: Option<DefaultDirectRateLimiter>,
    deletes: Option<DefaultDirectRateLimiter>,
}

fn quota(period: Duration, burst: u32) -> Quota {
    Quota::with_period(period)
        .expect("positive period")
        .allow_burst(NonZeroU32::new(burst.max(1)).expect("positive burst"))
}

impl ResilientRooms {
    /// `rate_scale` multiplies the documented limits (0 turns limiting off).
    pub fn new(inner: Arc<dyn RoomService>, policy: RetryPolicy, rate_scale: f64) -> Self {
        // Local rooms make no calls; limiting them would only slow development down.
        let limited = rate_scale > 0.0 && inner.kind() == "daily";
        let scaled = |period_ms: f64, burst: u32| {
            quota(
                Duration::from_secs_f64(period_ms / 1000.0 / rate_scale.max(0.001)),
                ((burst as f64) * rate_scale).ceil() as u32,
            )
        };
        Self {
            all: limited.then(|| RateLimiter::direct(scaled(62.5, 4))),
            deletes: limited.then(|| RateLimiter::direct(scaled(625.0, 1))),
            inner,
            policy,
        }
    }

    async fn run<T, F, Fut>(
        &self,
        op: &'static str,
        delete: bool,
        deadline: Instant,
        call: F,
    ) -> Result<T, RoomError>
    where
        F: Fn() -> Fut,
        Fut: std::future::Future<Output = Result<T, RoomError>>,
    {
        let call = &call;
        let attempt = move || async move {
            let wait = async {
                if delete {
                    if let Some(l) = &self.deletes {
                        l.until_ready().await;
                    }
                }
                if let Some(l) = &self.all {
                    l.until_ready().await;
                }
            };
            tokio::time::timeout_at(deadline, wait)
                .await
                .map_err(|_| RoomError::Throttled {
                    retry_after: Some(Duration::from_secs(1)),
                })?;
            let result = match tokio::time::timeout_at(deadline, call()).await {
                Ok(result) => result,
                Err(_) => Err(RoomError::Unavailable {
                    message: format!("{op}: no answer before the deadline"),
                }),
            };
            if self.inner.kind() == "daily" {
                crate::metrics::daily_call(
                    op,
                    result.as_ref().map_or_else(RoomError::kind, |_| "ok"),
                );
            }
            result
        };
        retry(&self.policy, deadline, attempt, |err, delay| {
            crate::metrics::retry("daily", op);
            tracing::debug!(op, error = %err, delay_ms = delay.as_millis() as u64, "retrying Daily call");
        })
        .await
    }

    fn budget(&self) -> Instant {
        Instant::now() + self.policy.call_budget
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
        let deadline = req.deadline.unwrap_or_else(|| self.budget());
        match self
            .run("create room", false, deadline, || self.inner.create(req))
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

    async fn delete(&self, name: &str) -> Result<(), RoomError> {
        self.run("delete room", true, self.budget(), || {
            self.inner.delete(name)
        })
        .await
    }

    async fn exists(&self, name: &str) -> Result<bool, RoomError> {
        self.run("get room", false, self.budget(), || self.inner.exists(name))
            .await
    }

    async fn list_managed(&self) -> Result<Vec<super::ListedRoom>, RoomError> {
        self.run("list rooms", false, self.budget(), || {
            self.inner.list_managed()
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
