//! Prometheus metrics: every metric botdispatch exports is named and recorded here, with bounded
//! labels only (agent, provider, outcome, phase, operation: never a session id).
//!
//! Recording goes through the `metrics` facade, which costs a few atomic operations and never
//! blocks the start path; `GET /metrics` renders the process-wide registry.

use std::sync::OnceLock;
use std::time::Duration;

use metrics::{counter, gauge, histogram};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

/// Buckets for this workload: from a warm local start (10 ms) to a slow cold boot (120 s).
pub const LATENCY_BUCKETS: &[f64] = &[
    0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 3.0, 5.0, 7.5, 10.0, 15.0, 20.0, 30.0, 45.0, 60.0,
    90.0, 120.0,
];

pub const START_DURATION: &str = "botdispatch_start_duration_seconds";
pub const START_PHASE_DURATION: &str = "botdispatch_start_phase_duration_seconds";
pub const STARTS_TOTAL: &str = "botdispatch_starts_total";
pub const SESSIONS_STARTING: &str = "botdispatch_sessions_starting";
pub const STARTS_QUEUED: &str = "botdispatch_starts_queued";
pub const SESSIONS_ACTIVE: &str = "botdispatch_sessions_active";
pub const PROVIDER_CALLS: &str = "botdispatch_provider_calls_total";
pub const DAILY_CALLS: &str = "botdispatch_daily_calls_total";
pub const RETRIES: &str = "botdispatch_retries_total";
pub const THROTTLED: &str = "botdispatch_throttled_total";
pub const REAPER_ACTIONS: &str = "botdispatch_reaper_actions_total";
pub const ADMISSION_REFUSED: &str = "botdispatch_admission_refused_total";
pub const RESERVE_MACHINES: &str = "botdispatch_reserve_machines";
pub const RESERVE_CLAIMS: &str = "botdispatch_reserve_claims_total";
pub const RESERVE_CLAIM_DURATION: &str = "botdispatch_reserve_claim_duration_seconds";
pub const RESERVE_REPLENISH_DURATION: &str = "botdispatch_reserve_replenish_duration_seconds";
pub const HANDOFF_FAILURES: &str = "botdispatch_handoff_failures_total";
pub const POOLED_ROOMS: &str = "botdispatch_pooled_rooms";

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

/// Installs the process-wide recorder once (later calls, e.g. from tests, reuse it).
pub fn install() -> PrometheusHandle {
    HANDLE
        .get_or_init(|| {
            let recorder = PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), LATENCY_BUCKETS)
                .expect("buckets are not empty")
                .build_recorder();
            let handle = recorder.handle();
            // Another recorder may be installed already (an embedding application); then ours
            // only renders what it is handed, which is still a valid, empty exposition.
            let _ = metrics::set_global_recorder(recorder);
            describe();
            handle
        })
        .clone()
}

fn describe() {
    use metrics::{describe_counter, describe_gauge, describe_histogram, Unit};
    describe_histogram!(
        START_DURATION,
        Unit::Seconds,
        "POST /start latency by agent, provider and outcome"
    );
    describe_histogram!(
        START_PHASE_DURATION,
        Unit::Seconds,
        "Start phases: room, launch, wait, total"
    );
    describe_counter!(STARTS_TOTAL, "Starts by agent, provider and outcome");
    describe_gauge!(SESSIONS_STARTING, "Starts in flight on this replica");
    describe_gauge!(
        STARTS_QUEUED,
        "Starts waiting for capacity in this replica's queue"
    );
    describe_gauge!(
        SESSIONS_ACTIVE,
        "Live sessions at the provider, as last counted"
    );
    describe_counter!(
        PROVIDER_CALLS,
        "Machine provider API calls by operation and outcome"
    );
    describe_counter!(DAILY_CALLS, "Daily API calls by operation and outcome");
    describe_counter!(RETRIES, "Retried outbound calls by target and operation");
    describe_counter!(
        THROTTLED,
        "Outbound calls throttled (429 from the API, or queued past the deadline)"
    );
    describe_counter!(
        REAPER_ACTIONS,
        "Reaper passes, actions (destroy_*, delete_room) and errors, by kind"
    );
    describe_counter!(
        ADMISSION_REFUSED,
        "Starts refused before anything was created, by reason"
    );
    describe_gauge!(
        RESERVE_MACHINES,
        "Unclaimed reserve machines by agent, tier and state (ready, preparing), as last listed"
    );
    describe_counter!(
        RESERVE_CLAIMS,
        "Reserve claims by agent and result (hit, miss, lease_conflict, error)"
    );
    describe_histogram!(
        RESERVE_CLAIM_DURATION,
        Unit::Seconds,
        "Time to take a reserve machine (lease and labels), by agent"
    );
    describe_histogram!(
        RESERVE_REPLENISH_DURATION,
        Unit::Seconds,
        "Time from creating a reserve machine to its being ready, by agent and tier"
    );
    describe_counter!(
        HANDOFF_FAILURES,
        "Sessions a bot did not take over HTTP, by phase (before or after delivery) and reason"
    );
    describe_gauge!(
        POOLED_ROOMS,
        "Rooms created ahead in this replica's pools, by agent"
    );
}

pub fn reserve_machines(agent: &str, tier: &'static str, state: &'static str, count: usize) {
    gauge!(RESERVE_MACHINES, "agent" => agent.to_owned(), "tier" => tier, "state" => state)
        .set(count as f64);
}

pub fn reserve_claim(agent: &str, result: &'static str) {
    counter!(RESERVE_CLAIMS, "agent" => agent.to_owned(), "result" => result).increment(1);
}

pub fn reserve_claim_duration(agent: &str, took: Duration) {
    histogram!(RESERVE_CLAIM_DURATION, "agent" => agent.to_owned()).record(took.as_secs_f64());
}

pub fn reserve_replenished(agent: &str, tier: &'static str, took: Duration) {
    histogram!(RESERVE_REPLENISH_DURATION, "agent" => agent.to_owned(), "tier" => tier)
        .record(took.as_secs_f64());
}

pub fn handoff_failure(phase: &'static str, reason: &'static str) {
    counter!(HANDOFF_FAILURES, "phase" => phase, "reason" => reason).increment(1);
}

pub fn pooled_rooms(agent: &str, count: usize) {
    gauge!(POOLED_ROOMS, "agent" => agent.to_owned()).set(count as f64);
}

pub fn start_finished(
    agent: &str,
    provider: &'static str,
    start_type: &'static str,
    outcome: &'static str,
    total: Duration,
) {
    let labels = [
        ("agent", agent.to_owned()),
        ("provider", provider.to_owned()),
        ("start_type", start_type.to_owned()),
        ("outcome", outcome.to_owned()),
    ];
    histogram!(START_DURATION, &labels).record(total.as_secs_f64());
    counter!(STARTS_TOTAL, &labels).increment(1);
}

pub fn start_phase(provider: &'static str, phase: &'static str, took: Duration) {
    histogram!(START_PHASE_DURATION, "provider" => provider, "phase" => phase)
        .record(took.as_secs_f64());
}

pub fn queued(delta: f64) {
    gauge!(STARTS_QUEUED).increment(delta);
}

pub fn starting(delta: f64) {
    gauge!(SESSIONS_STARTING).increment(delta);
}

pub fn sessions_active(live: usize) {
    gauge!(SESSIONS_ACTIVE).set(live as f64);
}

pub fn provider_call(provider: &'static str, op: &'static str, outcome: &'static str) {
    counter!(PROVIDER_CALLS, "provider" => provider, "op" => op, "outcome" => outcome).increment(1);
    if outcome == "throttled" {
        counter!(THROTTLED, "target" => provider).increment(1);
    }
}

pub fn daily_call(op: &'static str, outcome: &'static str) {
    counter!(DAILY_CALLS, "op" => op, "outcome" => outcome).increment(1);
    if outcome == "throttled" {
        counter!(THROTTLED, "target" => "daily").increment(1);
    }
}

pub fn retry(target: &'static str, op: &'static str) {
    counter!(RETRIES, "target" => target, "op" => op).increment(1);
}

pub fn reaper_action(action: &'static str) {
    counter!(REAPER_ACTIONS, "action" => action).increment(1);
}

pub fn admission_refused(reason: &'static str) {
    counter!(ADMISSION_REFUSED, "reason" => reason).increment(1);
}

/// Counts every provider call attempt and retry made by [`providers::resilient::Resilient`].
pub struct ProviderMetrics;

impl providers::resilient::CallObserver for ProviderMetrics {
    fn attempt(&self, provider: &'static str, op: providers::retry::Op, outcome: &'static str) {
        provider_call(provider, op.as_str(), outcome);
    }

    fn retry(&self, provider: &'static str, op: providers::retry::Op) {
        retry(provider, op.as_str());
    }
}
