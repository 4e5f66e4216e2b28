//! Fault injection and request recording shared by the fakes: the [`Fault`] enum, how a fault
//! changes an answer (`answer`), per-operation fault queues, and `FakeCore`, the recorder of
//! requests, spec violations and armed faults that every fake embeds.

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::hash::Hash;
use std::sync::Mutex;
use std::time::Duration;

use axum::http::StatusCode;
use serde_json::Value;

use super::server::{lock, Reply};

/// A misbehaviour injected into the next requests of one operation of a fake
/// (see `FakeFly::set_fault` and `FakeDaily::set_fault`).
///
/// Faults are applied after the request passed spec validation and authentication, so a client
/// bug is still reported as such while a fault is armed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fault {
    /// Answer `status` with the API's usual error body (and `Retry-After: <seconds>` when
    /// `retry_after` is set). Nothing happens server-side.
    Status {
        /// HTTP status to answer.
        status: u16,
        /// Value of the `Retry-After` header, in seconds.
        retry_after: Option<u64>,
    },
    /// Perform the operation (for a create: the resource exists afterwards), then answer
    /// `status` with an error body anyway, as an API does when it fails after committing.
    GhostCreate {
        /// HTTP status to answer.
        status: u16,
    },
    /// Sleep this long, then handle the request normally.
    Stall(Duration),
    /// Close the TCP connection with a reset, without answering and without performing the
    /// operation. Recorded with status `0`.
    Reset,
}

/// One request seen by a fake, recorded when it was answered.
#[derive(Debug, Clone, PartialEq)]
pub struct RecordedRequest {
    /// HTTP method, uppercase (`"POST"`).
    pub method: String,
    /// Path as received, including any `/v1` prefix.
    pub path: String,
    /// Decoded query pairs, in order.
    pub query: Vec<(String, String)>,
    /// JSON body, if the request had a non-empty body that parsed as JSON.
    pub body: Option<Value>,
    /// Status answered; `0` when the connection was reset instead ([`Fault::Reset`]).
    pub status: u16,
}

/// Queues of armed faults, per operation. Each entry applies to the next `count` requests.
#[derive(Debug)]
struct FaultQueue<Op, F = Fault> {
    queues: HashMap<Op, VecDeque<(F, u32)>>,
}

impl<Op, F> Default for FaultQueue<Op, F> {
    fn default() -> Self {
        Self {
            queues: HashMap::new(),
        }
    }
}

impl<Op: Eq + Hash, F: Clone> FaultQueue<Op, F> {
    /// Arms `fault` for the next `count` requests of `op`, after any fault already armed for it.
    fn push(&mut self, op: Op, fault: F, count: u32) {
        if count > 0 {
            self.queues.entry(op).or_default().push_back((fault, count));
        }
    }

    /// Takes the fault that applies to the current request of `op`, if any.
    fn next(&mut self, op: Op) -> Option<F> {
        let queue = self.queues.get_mut(&op)?;
        let (fault, remaining) = queue.front_mut()?;
        let fault = fault.clone();
        *remaining -= 1;
        if *remaining == 0 {
            queue.pop_front();
        }
        Some(fault)
    }

    /// Disarms every fault.
    fn clear(&mut self) {
        self.queues.clear();
    }
}

/// What every fake keeps besides its own state: the requests it answered (as `Call`s), the spec
/// violations it refused, and the faults armed per operation `Op`.
#[derive(Debug)]
pub(crate) struct FakeCore<Op, Call = RecordedRequest, F = Fault> {
    inner: Mutex<CoreState<Op, Call, F>>,
}

#[derive(Debug)]
struct CoreState<Op, Call, F> {
    calls: Vec<Call>,
    violations: Vec<String>,
    faults: FaultQueue<Op, F>,
}

impl<Op, Call, F> Default for FakeCore<Op, Call, F> {
    fn default() -> Self {
        Self {
            inner: Mutex::new(CoreState {
                calls: Vec::new(),
                violations: Vec::new(),
                faults: FaultQueue::default(),
            }),
        }
    }
}

impl<Op: Eq + Hash, Call: Clone, F: Clone> FakeCore<Op, Call, F> {
    /// Records an answered request.
    pub(crate) fn record(&self, call: Call) {
        lock(&self.inner).calls.push(call);
    }

    /// Every request answered so far, oldest first.
    pub(crate) fn calls(&self) -> Vec<Call> {
        lock(&self.inner).calls.clone()
    }

    /// Records a spec violation (the fake answers it 400).
    pub(crate) fn violation(&self, message: String) {
        lock(&self.inner).violations.push(message);
    }

    /// Every spec violation seen so far.
    pub(crate) fn violations(&self) -> Vec<String> {
        lock(&self.inner).violations.clone()
    }

    /// Arms `fault` for the next `count` requests of `op` (after any fault already armed for it).
    pub(crate) fn set_fault(&self, op: Op, fault: F, count: u32) {
        lock(&self.inner).faults.push(op, fault, count);
    }

    /// Takes the fault that applies to the current request of `op`, if any.
    pub(crate) fn next_fault(&self, op: Op) -> Option<F> {
        lock(&self.inner).faults.next(op)
    }

    /// Disarms every fault.
    pub(crate) fn clear_faults(&self) {
        lock(&self.inner).faults.clear();
    }
}

/// Answers a request under the armed `fault`, if any: `run` performs the operation and answers
/// it; `error` is the API's error body for an HTTP status.
///
/// [`Fault::Status`] answers the error without running; [`Fault::GhostCreate`] runs, then
/// answers the error anyway; [`Fault::Stall`] sleeps, then runs; [`Fault::Reset`] resets the
/// connection without running.
pub(crate) async fn answer<Fut>(
    fault: Option<Fault>,
    run: impl FnOnce() -> Fut,
    error: impl FnOnce(u16) -> Value,
) -> Reply
where
    Fut: Future<Output = Reply>,
{
    match fault {
        None => run().await,
        Some(Fault::Status {
            status,
            retry_after,
        }) => Reply::Json {
            status,
            body: error(status),
            retry_after,
        },
        Some(Fault::GhostCreate { status }) => {
            let _ = run().await;
            Reply::json(status, error(status))
        }
        Some(Fault::Stall(duration)) => {
            tokio::time::sleep(duration).await;
            run().await
        }
        Some(Fault::Reset) => Reply::Reset,
    }
}

/// Standard reason phrase for `status`, for error bodies.
pub(crate) fn reason(status: u16) -> &'static str {
    StatusCode::from_u16(status)
        .ok()
        .and_then(|s| s.canonical_reason())
        .unwrap_or("error")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fault_queue_applies_each_fault_count_times_in_order() {
        let mut queue = FaultQueue::default();
        queue.push("create", Fault::Reset, 2);
        queue.push("create", Fault::Stall(Duration::from_millis(1)), 1);
        queue.push("create", Fault::Reset, 0);
        assert_eq!(queue.next("get"), None);
        assert_eq!(queue.next("create"), Some(Fault::Reset));
        assert_eq!(queue.next("create"), Some(Fault::Reset));
        assert_eq!(
            queue.next("create"),
            Some(Fault::Stall(Duration::from_millis(1)))
        );
        assert_eq!(queue.next("create"), None);
        queue.push("get", Fault::Reset, 5);
        queue.clear();
        assert_eq!(queue.next("get"), None);
    }
}
