//! Admission that queues (issue 11 §4): a start that finds no capacity waits its turn (FIFO)
//! for up to `queue_timeout_secs` instead of a bare 429; then 429 with a Retry-After from the
//! release rate; a bounded queue; `GET /capacity`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use reqwest::StatusCode;
use serde_json::Value;

use crate::common::*;

fn queued_env(max_sessions: usize, timeout_secs: u64, mut opts: Options) -> Options {
    opts.env.extend([
        ("BOTDISPATCH_MAX_SESSIONS", max_sessions.to_string()),
        ("BOTDISPATCH_QUEUE_TIMEOUT_SECS", timeout_secs.to_string()),
        ("BOTDISPATCH_STARTS_PER_MINUTE_PER_CALLER", "0".to_owned()),
        ("BOTDISPATCH_MAX_STARTS_IN_FLIGHT", "200".to_owned()),
        ("BOTDISPATCH_OUTBOUND_RATE_SCALE", "0".to_owned()),
        ("BOTDISPATCH_CAPACITY_CACHE_MS", "500".to_owned()),
    ]);
    opts
}

/// A burst of 100 simultaneous starts against 20 slots, sessions lasting 1 s: none refused,
/// and they are admitted in the order they arrived.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_waits_for_capacity_in_arrival_order() {
    let mut opts = queued_env(20, 60, Options::default());
    opts.fly.bot_lifetime = Some(Duration::from_secs(1));
    let env = Arc::new(TestEnv::with(opts).await);
    let t0 = Instant::now();
    let mut tasks = Vec::new();
    for i in 0..100 {
        let env = env.clone();
        tasks.push(tokio::spawn(async move {
            // Arrival order: 20 ms apart.
            tokio::time::sleep(Duration::from_millis(20 * i)).await;
            let (status, body) = env.post_start(&format!("user{i}"), start_body()).await;
            (i, status, body, t0.elapsed())
        }));
    }
    let mut answers = Vec::new();
    for t in tasks {
        answers.push(t.await.unwrap());
    }
    let refused: Vec<_> = answers.iter().filter(|a| a.1 != StatusCode::OK).collect();
    assert!(refused.is_empty(), "refused: {refused:?}");
    // A session key is a ULID taken when the request arrived (ms resolution); arrival plus
    // the queue wait is when the start was admitted. In arrival order, admissions never go
    // backwards — by more than 150 ms, the scheduling noise of a loaded 2-core machine between
    // taking the key and joining the queue (out-of-order admission would show inversions of
    // whole session lengths: slots free in batches, 1 s apart).
    let mut admitted: Vec<(u64, f64)> = answers
        .iter()
        .map(|a| {
            let key = session_key(a.2["sessionId"].as_str().unwrap());
            let arrived = ulid::Ulid::from_string(&key.to_uppercase())
                .unwrap()
                .timestamp_ms();
            (
                arrived,
                arrived as f64 + a.2["queueSeconds"].as_f64().unwrap() * 1000.0,
            )
        })
        .collect();
    admitted.sort_by_key(|a| a.0);
    let queued = answers
        .iter()
        .filter(|a| a.2["queueSeconds"].as_f64().unwrap() > 0.0)
        .count();
    assert!(queued >= 50, "most of the burst waited: {queued}");
    for pair in admitted.windows(2) {
        assert!(
            pair[1].0 == pair[0].0 || pair[1].1 + 150.0 >= pair[0].1,
            "FIFO order broken: {pair:?}"
        );
    }
    let last = answers.iter().map(|a| a.3).max().unwrap();
    println!("100 starts against 20 slots of 1 s sessions: all admitted, the last after {last:?}");
}

#[tokio::test]
async fn a_start_that_waits_too_long_gets_429_with_a_retry_hint() {
    let opts = queued_env(1, 1, Options::default());
    let env = TestEnv::with(opts).await;
    let (status, _) = env.post_start("alice", start_body()).await;
    assert_eq!(status, StatusCode::OK);
    let t = Instant::now();
    let resp = env
        .http
        .post(format!("{}/start", env.base))
        .bearer_auth(env.token("bob"))
        .json(&start_body())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::TOO_MANY_REQUESTS);
    let waited = t.elapsed();
    assert!(waited >= Duration::from_millis(900), "waited {waited:?}");
    let retry: u64 = resp.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=300).contains(&retry), "{retry}");
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["error"], "at_capacity", "{body}");
    // Nothing was created for the refused start.
    assert_eq!(env.fly.machines().len(), 1);
}

#[tokio::test]
async fn a_stopped_session_frees_its_slot_for_the_next_in_line_at_once() {
    let opts = queued_env(1, 30, Options::default());
    let env = Arc::new(TestEnv::with(opts).await);
    let (status, first) = env.post_start("alice", start_body()).await;
    assert_eq!(status, StatusCode::OK);
    let waiting = {
        let env = env.clone();
        tokio::spawn(async move {
            let t = Instant::now();
            let (status, body) = env.post_start("bob", start_body()).await;
            (status, body, t.elapsed())
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    // It waits: GET /capacity shows it queued.
    let (status, capacity) = env
        .call("GET", "/capacity", Some(&env.token("ops")), None)
        .await;
    assert_eq!(status, StatusCode::OK, "{capacity}");
    assert_eq!(capacity["limit"], 1);
    assert_eq!(capacity["agents"]["default"]["queued"], 1, "{capacity}");
    assert_eq!(capacity["agents"]["default"]["live"], 1, "{capacity}");
    assert_eq!(capacity["queueTimeoutSecs"], 30);
    let (status, _) = env
        .call(
            "DELETE",
            first["statusUrl"].as_str().unwrap(),
            Some(&env.token("alice")),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    let (status, body, waited) = waiting.await.unwrap();
    assert_eq!(status, StatusCode::OK, "{body}");
    println!("the queued start was admitted {waited:?} after it arrived");
    // Without unauthenticated access.
    let (status, _) = env.call("GET", "/capacity", None, None).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
}

#[tokio::test]
async fn the_queue_is_bounded_per_agent() {
    let mut opts = queued_env(1, 30, Options::default());
    opts.env
        .push(("BOTDISPATCH_QUEUE_MAX_LENGTH", "1".to_owned()));
    let env = Arc::new(TestEnv::with(opts).await);
    let (status, _) = env.post_start("alice", start_body()).await;
    assert_eq!(status, StatusCode::OK);
    let env2 = env.clone();
    let waiting = tokio::spawn(async move { env2.post_start("bob", start_body()).await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let t = Instant::now();
    let (status, body) = env.post_start("carol", start_body()).await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS, "{body}");
    assert_eq!(body["error"], "queue_full", "{body}");
    assert!(t.elapsed() < Duration::from_millis(500), "refused at once");
    waiting.abort();
}
