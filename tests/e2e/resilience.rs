//! Never leak, never fall over: idempotency, capacity across replicas, the reaper, shutdown,
//! a crash in the middle of starts, and a few hundred sessions under injected faults.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use providers::testkit::daily_fake::DailyOp;
use providers::testkit::fly_fake::{FakeFlyConfig, FlyOp};
use providers::testkit::Fault;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use reqwest::StatusCode;
use serde_json::{json, Value};
use tokio::sync::Mutex;

use botdispatch::session_id::{new_session_key, resource_name};

use crate::common::*;

async fn start_with_key(env: &TestEnv, sub: &str, key: &str, body: Value) -> (StatusCode, Value) {
    let resp = env
        .http
        .post(format!("{}/start", env.base))
        .bearer_auth(env.token(sub))
        .header("Idempotency-Key", key)
        .json(&body)
        .send()
        .await
        .unwrap();
    (resp.status(), resp.json().await.unwrap())
}

#[tokio::test]
async fn idempotency_key_returns_the_same_session_on_any_replica() {
    let a = TestEnv::start().await;
    let mut opts = Options::default();
    opts.shared = Some((a.fly.clone(), a.daily.clone()));
    let b = TestEnv::with(opts).await;

    let (status, first) = start_with_key(&a, "alice", "order-42", start_body()).await;
    assert_eq!(status, StatusCode::OK, "{first}");
    // The retry lands on the other replica.
    let (status, again) = start_with_key(&b, "alice", "order-42", start_body()).await;
    assert_eq!(status, StatusCode::OK, "{again}");
    assert_eq!(first["sessionId"], again["sessionId"]);
    assert_eq!(first["dailyRoom"], again["dailyRoom"]);
    assert_eq!(a.fly.machines().len(), 1, "one VM for the repeated start");
    assert_eq!(a.daily.rooms().len(), 1);

    // Same key, another caller: another session. Keys are scoped to the caller.
    let (status, bob) = start_with_key(&a, "bob", "order-42", start_body()).await;
    assert_eq!(status, StatusCode::OK);
    assert_ne!(bob["sessionId"], first["sessionId"]);
    assert_eq!(a.fly.machines().len(), 2);

    // Concurrent duplicates: still one machine.
    let (r1, r2) = tokio::join!(
        start_with_key(&a, "carol", "k-1", start_body()),
        start_with_key(&b, "carol", "k-1", start_body())
    );
    assert_eq!(
        (r1.0, r2.0),
        (StatusCode::OK, StatusCode::OK),
        "{} {}",
        r1.1,
        r2.1
    );
    assert_eq!(r1.1["sessionId"], r2.1["sessionId"]);
    assert_eq!(a.fly.machines().len(), 3);

    // After the session ended, the key cannot start a second one.
    let url = first["statusUrl"].as_str().unwrap();
    let (status, _) = a.call("DELETE", url, Some(&a.token("alice")), None).await;
    assert_eq!(status, StatusCode::OK);
    let (status, err) = start_with_key(&b, "alice", "order-42", start_body()).await;
    assert_eq!(status, StatusCode::CONFLICT, "{err}");
    assert_eq!(err["error"], "idempotency_key_used");
    a.assert_spec_clean();

    let (status, err) = start_with_key(&a, "alice", "bad key with spaces", start_body()).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{err}");
}

#[tokio::test]
async fn capacity_is_shared_by_replicas_and_refused_before_anything_is_created() {
    let max_sessions = 5usize;
    let in_flight = 2usize;
    let mut fly = Options::default().fly;
    fly.boot_delay = Duration::from_millis(200);
    let fakes = start_fakes(&fly).await;
    let replica = |_: usize| {
        let mut opts = Options::default();
        opts.shared = Some(fakes.clone());
        opts.env
            .push(("BOTDISPATCH_MAX_SESSIONS", max_sessions.to_string()));
        opts.env
            .push(("BOTDISPATCH_MAX_STARTS_IN_FLIGHT", in_flight.to_string()));
        opts.env
            .push(("BOTDISPATCH_STARTS_PER_MINUTE_PER_CALLER", "0".into()));
        TestEnv::with(opts)
    };
    let a = Arc::new(replica(0).await);
    let b = Arc::new(replica(1).await);
    let mut tasks = Vec::new();
    for i in 0..24 {
        let env = if i % 2 == 0 { a.clone() } else { b.clone() };
        tasks.push(tokio::spawn(async move {
            let resp = env
                .http
                .post(format!("{}/start", env.base))
                .bearer_auth(env.token(&format!("user{i}")))
                .json(&start_body())
                .send()
                .await
                .unwrap();
            let retry_after = resp.headers().get("retry-after").cloned();
            let status = resp.status();
            let body: Value = resp.json().await.unwrap();
            (status, body, retry_after)
        }));
    }
    let mut ok = 0;
    let mut refused = 0;
    for t in tasks {
        let (status, body, retry_after) = t.await.unwrap();
        match status {
            StatusCode::OK => ok += 1,
            StatusCode::TOO_MANY_REQUESTS => {
                refused += 1;
                assert!(retry_after.is_some(), "429 without Retry-After: {body}");
                assert!(
                    ["at_capacity", "busy"].contains(&body["error"].as_str().unwrap()),
                    "{body}"
                );
            }
            other => panic!("unexpected {other}: {body}"),
        }
    }
    let live = fakes.0.live_machines().len();
    println!(
        "capacity: max_sessions={max_sessions}, in-flight allowance={in_flight}/replica, 2 replicas, 24 concurrent starts: {ok} started, {refused} refused (429), {live} machines live"
    );
    assert!(
        ok >= max_sessions.min(24) - in_flight,
        "capacity mostly used: {ok}"
    );
    assert!(
        live <= max_sessions + in_flight,
        "overshoot beyond the in-flight allowance: {live}"
    );
    assert_eq!(ok + refused, 24);
    // Refused starts created nothing: every machine belongs to a 200.
    assert_eq!(fakes.0.machines().len(), ok);
    assert_eq!(fakes.1.rooms().len(), ok);
}

#[tokio::test]
async fn per_caller_start_rate_is_limited() {
    let mut opts = Options::default();
    opts.env
        .push(("BOTDISPATCH_STARTS_PER_MINUTE_PER_CALLER", "2".into()));
    opts.env
        .push(("BOTDISPATCH_OUTBOUND_RATE_SCALE", "0".into()));
    let env = TestEnv::with(opts).await;
    for _ in 0..2 {
        let (status, body) = env.post_start("alice", start_body()).await;
        assert_eq!(status, StatusCode::OK, "{body}");
    }
    let resp = env
        .http
        .post(format!("{}/start", env.base))
        .bearer_auth(env.token("alice"))
        .json(&start_body())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::TOO_MANY_REQUESTS);
    let retry: u64 = resp.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=60).contains(&retry), "{retry}");
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["error"], "rate_limited");
    // Another caller is not affected.
    let (status, _) = env.post_start("bob", start_body()).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(env.fly.machines().len(), 3);
}

/// Creates a machine in the fake as a crashed dispatcher would have left it.
async fn orphan_machine(env: &TestEnv, key: &str, deadline: i64, room: &str) -> String {
    let resp: Value = env
        .http
        .post(format!("{}/apps/{FLY_APP}/machines", env.fly.base_url()))
        .bearer_auth(FLY_TOKEN)
        .json(&json!({
            "name": resource_name("default", key),
            "config": {
                "image": BOT_IMAGE,
                "auto_destroy": true,
                "restart": {"policy": "no"},
                "metadata": {
                    "managed_by": "botdispatch",
                    "botdispatch_session": key,
                    "botdispatch_owner": "ghost",
                    "botdispatch_room": room,
                    "botdispatch_agent": "default",
                    "botdispatch_deployment": "default",
                    "botdispatch_deadline": deadline.to_string(),
                },
            },
        }))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    resp["id"].as_str().unwrap().to_owned()
}

async fn orphan_room(env: &TestEnv, name: &str) {
    let resp = env
        .http
        .post(format!("{}/rooms", env.daily.base_url()))
        .bearer_auth(DAILY_KEY)
        .json(&json!({"name": name, "privacy": "private", "properties": {"exp": now() + 3600}}))
        .send()
        .await
        .unwrap();
    assert!(resp.status().is_success());
}

#[tokio::test]
async fn reaper_removes_what_no_session_needs_and_nothing_else() {
    let mut opts = Options::default();
    opts.env
        .push(("BOTDISPATCH_START_TIMEOUT_SECS", "1".into()));
    opts.env.push(("BOTDISPATCH_REAPER_GRACE_SECS", "0".into()));
    let env = TestEnv::with(opts).await;
    // A live session that must survive.
    let (status, live) = env.post_start("alice", start_body()).await;
    assert_eq!(status, StatusCode::OK, "{live}");
    // Debris: a machine past its deadline, one stuck starting, one whose room is gone, and a
    // room whose machine is gone.
    let key = |_| new_session_key();
    let (past_key, stuck_key, roomless_key, lonely_key) = (key(1), key(2), key(3), key(4));
    let room_of = |k: &str| resource_name("default", k);
    env.fly.set_never_start(true);
    let past = orphan_machine(&env, &past_key, now() - 10, &room_of(&past_key)).await;
    let stuck = orphan_machine(&env, &stuck_key, now() + 3600, "").await;
    env.fly.set_never_start(false);
    orphan_room(&env, &room_of(&past_key)).await;
    let roomless = orphan_machine(&env, &roomless_key, now() + 3600, &room_of(&roomless_key)).await;
    orphan_room(&env, &room_of(&lonely_key)).await;
    // Another deployment's room (sharing the Daily domain) is not this reaper's to delete.
    let staging_room = resource_name("staging", &new_session_key());
    orphan_room(&env, &staging_room).await;
    // Someone else's machine in the same app is never touched.
    let foreign: Value = env
        .http
        .post(format!("{}/apps/{FLY_APP}/machines", env.fly.base_url()))
        .bearer_auth(FLY_TOKEN)
        .json(&json!({"name": "not-ours", "config": {"image": "nginx"}}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    env.fly
        .wait_for_state(&roomless, "started", Duration::from_secs(5))
        .await;
    // Older than start timeout + grace.
    tokio::time::sleep(Duration::from_millis(1100)).await;

    let report = env.app.reaper.pass().await;
    println!("reaper pass: {report:?}");
    assert_eq!(report.past_deadline, 1, "{report:?}");
    assert_eq!(report.stuck_starting, 1, "{report:?}");
    assert_eq!(report.room_gone, 1, "{report:?}");
    assert_eq!(report.errors, 0, "{report:?}");
    for id in [&past, &stuck, &roomless] {
        let state = env.fly.machine(id).unwrap().state;
        assert!(state == "destroyed" || state == "stopped", "{id}: {state}");
    }
    let live_ids: Vec<String> = env
        .fly
        .live_machines()
        .iter()
        .map(|m| m.id.clone())
        .collect();
    assert_eq!(
        live_ids.len(),
        2,
        "the live session and the foreign machine remain"
    );
    assert!(live_ids.contains(&foreign["id"].as_str().unwrap().to_owned()));
    let mut rooms: Vec<String> = env.daily.rooms().iter().map(|r| r.name.clone()).collect();
    rooms.sort();
    let mut expected = vec![
        resource_name("default", session_key(live["sessionId"].as_str().unwrap())),
        staging_room,
    ];
    expected.sort();
    assert_eq!(rooms, expected);

    // A second pass (or another replica's) finds nothing more to do.
    let again = env.app.reaper.pass().await;
    assert_eq!(
        (
            again.past_deadline,
            again.stuck_starting,
            again.room_gone,
            again.rooms_deleted
        ),
        (0, 0, 0, 0)
    );
    env.assert_spec_clean();
}

#[tokio::test]
async fn shutdown_past_the_grace_period_cleans_up_in_flight_starts() {
    let mut opts = Options::default();
    opts.fly.boot_delay = Duration::from_secs(3);
    let env = Arc::new(TestEnv::with(opts).await);
    let caller = env.clone();
    let start = tokio::spawn(async move { caller.post_start("alice", start_body()).await });
    // Wait until the machine exists, then give up on the start as a shutdown would.
    let deadline = Instant::now() + Duration::from_secs(5);
    while env.fly.machines().is_empty() {
        assert!(Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    env.app.shutdown.cancel();
    let (status, err) = start.await.unwrap();
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{err}");
    assert_eq!(err["error"], "shutting_down");
    env.assert_nothing_left_within(Duration::from_secs(5)).await;
}

// Multi-threaded: the fakes keep serving while the test thread blocks on the process.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_lets_in_flight_starts_finish_then_exits() {
    let mut fly = Options::default().fly;
    fly.boot_delay = Duration::from_millis(1500);
    let (fly, daily) = start_fakes(&fly).await;
    let mut env = process_env(&fly, &daily);
    env.push(("BOTDISPATCH_LISTEN", "127.0.0.1:0".into()));
    env.push(("BOTDISPATCH_SHUTDOWN_GRACE_SECS", "20".into()));
    let env_refs: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let mut d = Dispatcher::spawn(&env_refs);
    let base = d.wait_ready();
    let http = reqwest::Client::new();
    let request = http
        .post(format!("{base}/start"))
        .bearer_auth(hs_token("alice"))
        .json(&start_body())
        .send();
    let start = tokio::spawn(request);
    while fly.machines().is_empty() {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    d.signal("TERM");
    // New connections are refused while the start in flight completes normally.
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(http.get(format!("{base}/healthz")).send().await.is_err());
    let resp = start.await.unwrap().unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let status = tokio::task::spawn_blocking(move || {
        let status = d.wait_exit(Duration::from_secs(20));
        (status, d.output())
    })
    .await
    .unwrap();
    assert!(status.0.success(), "{}", status.1);
    assert_eq!(
        fly.live_machines().len(),
        1,
        "the finished session keeps running"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_mid_start_is_recovered_by_the_next_reaper_pass() {
    let mut fly = Options::default().fly;
    fly.boot_delay = Duration::from_millis(1500);
    let (fly, daily) = start_fakes(&fly).await;
    let mut env = process_env(&fly, &daily);
    env.push(("BOTDISPATCH_LISTEN", "127.0.0.1:0".into()));
    env.push(("BOTDISPATCH_START_TIMEOUT_SECS", "3".into()));
    env.push(("BOTDISPATCH_REAPER_GRACE_SECS", "1".into()));
    env.push(("BOTDISPATCH_REAPER_INTERVAL_SECS", "1".into()));
    env.push(("BOTDISPATCH_OUTBOUND_RATE_SCALE", "0".into()));
    let env_refs: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let mut first = Dispatcher::spawn(&env_refs);
    let base = first.wait_ready();
    let http = reqwest::Client::new();
    let starts = 6;
    for i in 0..starts {
        let req = http
            .post(format!("{base}/start"))
            .bearer_auth(hs_token(&format!("user{i}")))
            .json(&start_body())
            .send();
        tokio::spawn(req);
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    while fly.machines().len() < starts || daily.rooms().len() < starts {
        assert!(Instant::now() < deadline, "starts did not begin");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    first.signal("KILL");
    let killed_at = Instant::now();
    tokio::task::spawn_blocking(move || first.wait_exit(Duration::from_secs(5)))
        .await
        .unwrap();
    let (orphans, orphan_rooms) = (fly.live_machines().len(), daily.rooms().len());
    assert_eq!(
        (orphans, orphan_rooms),
        (starts, starts),
        "the crash left debris"
    );

    // A new dispatcher: its reaper reconciles.
    let mut second = Dispatcher::spawn(&env_refs);
    second.wait_ready();
    let deadline = Instant::now() + Duration::from_secs(30);
    while !fly.live_machines().is_empty() || !daily.rooms().is_empty() {
        assert!(
            Instant::now() < deadline,
            "still orphaned: {} machines, {} rooms\n{}",
            fly.live_machines().len(),
            daily.rooms().len(),
            second.output()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    println!(
        "kill -9 recovery: {orphans} orphaned machines and {orphan_rooms} rooms reaped {:.1} s after the crash (start timeout 3 s + grace 1 s, reaper every 1 s)",
        killed_at.elapsed().as_secs_f64()
    );
    let output = second.output();
    assert!(output.contains("reaper destroyed a machine"), "{output}");
    assert!(fly.spec_violations().is_empty());
}

#[derive(Debug, Default)]
struct SoakReport {
    sessions: usize,
    started: usize,
    faults: BTreeMap<String, usize>,
    client_errors: BTreeMap<String, usize>,
}

fn random_fault(rng: &mut StdRng, create: bool) -> (String, Fault) {
    let kinds = if create { 7 } else { 6 };
    match rng.random_range(0..kinds) {
        0 => (
            "429+Retry-After".into(),
            Fault::Status {
                status: 429,
                retry_after: Some(1),
            },
        ),
        1 => (
            "500".into(),
            Fault::Status {
                status: 500,
                retry_after: None,
            },
        ),
        2 => (
            "502".into(),
            Fault::Status {
                status: 502,
                retry_after: None,
            },
        ),
        3 => (
            "503".into(),
            Fault::Status {
                status: 503,
                retry_after: None,
            },
        ),
        4 => ("stall".into(), Fault::Stall(Duration::from_millis(2500))),
        5 => ("reset".into(), Fault::Reset),
        _ => ("ghost create".into(), Fault::GhostCreate { status: 500 }),
    }
}

/// Every outbound call kind gets 5 % faults of every kind, over a few hundred sessions started
/// and stopped concurrently. Nothing may leak, and no client may see an error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn soak_with_five_percent_faults_leaks_nothing() {
    let sessions: usize = std::env::var("SOAK_SESSIONS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(300);
    let seed: u64 = std::env::var("SOAK_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20261122);
    let mut opts = Options::default();
    opts.fly = FakeFlyConfig {
        boot_delay: Duration::from_millis(30),
        starting_for: Duration::from_millis(10),
        ..opts.fly
    };
    opts.env
        .push(("BOTDISPATCH_START_TIMEOUT_SECS", "20".into()));
    opts.env
        .push(("BOTDISPATCH_REQUEST_TIMEOUT_SECS", "2".into()));
    opts.env
        .push(("BOTDISPATCH_OUTBOUND_RATE_SCALE", "0".into()));
    opts.env
        .push(("BOTDISPATCH_STARTS_PER_MINUTE_PER_CALLER", "0".into()));
    opts.env.push(("BOTDISPATCH_MAX_SESSIONS", "10000".into()));
    let env = Arc::new(TestEnv::with(opts).await);
    let rng = Arc::new(Mutex::new(StdRng::seed_from_u64(seed)));
    let report = Arc::new(Mutex::new(SoakReport::default()));
    let t0 = Instant::now();

    let concurrency = 12;
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut workers = Vec::new();
    for _ in 0..concurrency {
        let (env, rng, report, next) = (env.clone(), rng.clone(), report.clone(), next.clone());
        workers.push(tokio::spawn(async move {
            loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if i >= sessions {
                    return;
                }
                // Arm faults: each outbound call kind has a 5 % chance per session.
                {
                    let mut rng = rng.lock().await;
                    let mut report = report.lock().await;
                    for op in [
                        FlyOp::Create,
                        FlyOp::Wait,
                        FlyOp::Stop,
                        FlyOp::Delete,
                        FlyOp::Metadata,
                    ] {
                        if rng.random_bool(0.05) {
                            let (kind, fault) = random_fault(&mut rng, op == FlyOp::Create);
                            env.fly.set_fault(op, fault, 1);
                            *report
                                .faults
                                .entry(format!("fly {op:?}: {kind}"))
                                .or_default() += 1;
                        }
                    }
                    for op in [DailyOp::CreateRoom, DailyOp::DeleteRoom] {
                        if rng.random_bool(0.05) {
                            let (kind, fault) = random_fault(&mut rng, op == DailyOp::CreateRoom);
                            env.daily.set_fault(op, fault, 1);
                            *report
                                .faults
                                .entry(format!("daily {op:?}: {kind}"))
                                .or_default() += 1;
                        }
                    }
                }
                let sub = format!("user{}", i % 7);
                let (status, body) = env.post_start(&sub, json!({"body": {"i": i}})).await;
                let mut report_guard = report.lock().await;
                report_guard.sessions += 1;
                if status != StatusCode::OK {
                    *report_guard
                        .client_errors
                        .entry(format!(
                            "{status} {}",
                            body["error"].as_str().unwrap_or("?")
                        ))
                        .or_default() += 1;
                    continue;
                }
                report_guard.started += 1;
                drop(report_guard);
                let url = body["statusUrl"].as_str().unwrap().to_owned();
                let (status, body) = env.call("DELETE", &url, Some(&env.token(&sub)), None).await;
                if status != StatusCode::OK {
                    *report
                        .lock()
                        .await
                        .client_errors
                        .entry(format!(
                            "DELETE {status} {}",
                            body["error"].as_str().unwrap_or("?")
                        ))
                        .or_default() += 1;
                }
            }
        }));
    }
    for w in workers {
        w.await.unwrap();
    }
    let elapsed = t0.elapsed();
    env.fly.clear_faults();
    env.daily.clear_faults();
    // Clean-up of failed starts may still be finishing.
    env.assert_nothing_left_within(Duration::from_secs(30))
        .await;
    let report = report.lock().await;
    let faults: usize = report.faults.values().sum();
    println!(
        "soak (seed {seed}): {} sessions in {:.1} s, {} started, {faults} faults injected {:?}, client errors {:?}, leaked machines 0, leaked rooms 0, machines created {}, Fly requests {}",
        report.sessions,
        elapsed.as_secs_f64(),
        report.started,
        report.faults,
        report.client_errors,
        env.fly.machines().len(),
        env.fly.requests().len(),
    );
    assert_eq!(report.sessions, sessions);
    assert!(faults > 0);
    assert!(
        report.client_errors.is_empty(),
        "every injected fault was transient and retrying within the deadline could absorb it: {:?}",
        report.client_errors
    );
    assert_eq!(
        env.fly.machines().len(),
        sessions,
        "one machine per session: no duplicates"
    );
    env.assert_spec_clean();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idempotent_start_survives_the_client_timing_out() {
    let mut opts = Options::default();
    opts.fly.boot_delay = Duration::from_millis(1500);
    let env = TestEnv::with(opts).await;
    let key = "order-4711";
    // The client gives up mid-boot...
    let impatient = reqwest::Client::builder()
        .timeout(Duration::from_millis(400))
        .build()
        .unwrap();
    let first = impatient
        .post(format!("{}/start", env.base))
        .bearer_auth(env.token("alice"))
        .header("idempotency-key", key)
        .json(&start_body())
        .send()
        .await;
    assert!(first.is_err_and(|e| e.is_timeout()));
    // ...and retries with the same key: the same start, run to its end, answers.
    let (status, resp) = start_with_key(&env, "alice", key, start_body()).await;
    assert_eq!(status, StatusCode::OK, "{resp}");
    let (status, again) = start_with_key(&env, "alice", key, start_body()).await;
    assert_eq!(status, StatusCode::OK, "{again}");
    assert_eq!(again["sessionId"], resp["sessionId"]);
    assert_eq!(env.fly.machines().len(), 1, "one machine, ever");
    assert_eq!(env.leftovers(), (1, 1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_resumed_after_a_crash_keeps_running_past_its_provisional_deadline() {
    let mut fly = Options::default().fly;
    fly.boot_delay = Duration::from_millis(1500);
    let (fly, daily) = start_fakes(&fly).await;
    let mut env = process_env(&fly, &daily);
    env.push(("BOTDISPATCH_START_TIMEOUT_SECS", "3".into()));
    env.push(("BOTDISPATCH_REAPER_GRACE_SECS", "1".into()));
    env.push(("BOTDISPATCH_REAPER_INTERVAL_SECS", "1".into()));
    env.push(("BOTDISPATCH_OUTBOUND_RATE_SCALE", "0".into()));
    let env_refs: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let http = reqwest::Client::new();
    let start = |base: String| {
        http.post(format!("{base}/start"))
            .bearer_auth(hs_token("alice"))
            .header("idempotency-key", "call-42")
            .json(&start_body())
            .send()
    };

    let mut first = Dispatcher::spawn(&env_refs);
    let base = first.wait_ready();
    tokio::spawn(start(base));
    let deadline = Instant::now() + Duration::from_secs(5);
    while fly.machines().is_empty() {
        assert!(Instant::now() < deadline, "the start did not begin");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    first.signal("KILL");
    let started_at = Instant::now();
    tokio::task::spawn_blocking(move || first.wait_exit(Duration::from_secs(5)))
        .await
        .unwrap();

    let mut second = Dispatcher::spawn(&env_refs);
    let base = second.wait_ready();
    let resp = start(base.clone()).await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let resp: Value = resp.json().await.unwrap();
    let url = format!("{base}{}", resp["statusUrl"].as_str().unwrap());
    // Past the provisional deadline (start timeout 3 s + grace 1 s) and a few reaper passes.
    let past = Duration::from_secs(8).saturating_sub(started_at.elapsed());
    tokio::time::sleep(past).await;
    let view = get_json(&http, &url, &hs_token("alice")).await;
    assert_eq!(view["status"], "ready", "{view}\n{}", second.output());
    assert_eq!(fly.live_machines().len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_incomplete_room_listing_condemns_no_machine() {
    let mut opts = Options::default();
    opts.env.extend([
        ("BOTDISPATCH_START_TIMEOUT_SECS", "1".to_owned()),
        ("BOTDISPATCH_REAPER_GRACE_SECS", "0".to_owned()),
        ("BOTDISPATCH_OUTBOUND_RATE_SCALE", "0".to_owned()),
    ]);
    let env = TestEnv::with(opts).await;
    let (status, live) = env.post_start("alice", start_body()).await;
    assert_eq!(status, StatusCode::OK, "{live}");
    // Another deployment's 100 full pages of newer rooms: one listing never reaches this
    // session's room.
    env.daily
        .insert_rooms((0..100 * 100).map(|_| resource_name("staging", &new_session_key())));
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let report = env.app.reaper.pass().await;
    assert_eq!(report.room_gone, 0, "{report:?}");
    assert_eq!(report.rooms_deleted, 0, "{report:?}");
    assert_eq!(env.fly.live_machines().len(), 1);
    let (status, view) = env
        .get_session("alice", live["statusUrl"].as_str().unwrap())
        .await;
    assert_eq!(
        (status, view["status"].as_str()),
        (StatusCode::OK, Some("ready"))
    );
}

/// Each page of the reaper's room listing is a request of its own under Daily's limit (20
/// requests/s for every call): before, the pages of one listing went out back to back under
/// one token, and a domain holding the room pools' hundreds of rooms passed the limit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_page_of_the_room_listing_keeps_to_dailys_limit() {
    let mut opts = Options::default();
    // The documented limits at 1/16: Daily's guard lets 1 request a second through.
    opts.env
        .push(("BOTDISPATCH_OUTBOUND_RATE_SCALE", "0.0625".to_owned()));
    let env = TestEnv::with(opts).await;
    env.daily
        .insert_rooms((0..250).map(|_| resource_name("default", &new_session_key())));
    let listings = || {
        env.daily
            .requests()
            .iter()
            .filter(|r| r.method == "GET" && r.path.ends_with("/rooms"))
            .count()
    };
    let before = listings();
    let t = tokio::time::Instant::now();
    env.app.reaper.pass().await;
    let took = t.elapsed();
    assert_eq!(listings() - before, 3, "250 rooms are 3 pages of 100");
    assert!(
        took >= Duration::from_millis(1800),
        "3 pages at 1 request/s took {took:?}"
    );
}

/// Far from `max_sessions`, a count older than `capacity_cache_ms` is read again in the
/// background: a start does not wait for a provider listing held up by its rate limit (Fly
/// lists 1 a second per app, shared with the reserve's passes). Before, every admission after
/// the count went stale waited for that listing, up to 2 s (in the bench: p99 2.6 s at 20
/// starts/s where the median was 0.2 s).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_session_count_holds_no_start_far_from_the_limit() {
    let mut opts = Options::default();
    opts.env.extend([
        ("BOTDISPATCH_CAPACITY_CACHE_MS", "100".to_owned()),
        ("BOTDISPATCH_OUTBOUND_RATE_SCALE", "0".to_owned()),
    ]);
    let env = TestEnv::with(opts).await;
    let (status, resp) = env.post_start("alice", start_body()).await;
    assert_eq!(status, StatusCode::OK, "{resp}");
    tokio::time::sleep(Duration::from_millis(200)).await;
    // The next listing takes 3 s.
    env.fly
        .set_fault(FlyOp::List, Fault::Stall(Duration::from_secs(3)), 1);
    let t = Instant::now();
    let (status, resp) = env.post_start("bob", start_body()).await;
    let took = t.elapsed();
    assert_eq!(status, StatusCode::OK, "{resp}");
    assert!(
        took < Duration::from_millis(1500),
        "the start waited for the listing: {took:?}"
    );
    // The count was read meanwhile: both sessions are in it.
    tokio::time::sleep(Duration::from_millis(3500)).await;
    let (status, capacity) = env
        .call("GET", "/capacity", Some(&env.reader_token()), None)
        .await;
    assert_eq!(status, StatusCode::OK, "{capacity}");
    assert_eq!(capacity["sessions"], 2, "{capacity}");
    assert_eq!(capacity["agents"]["default"]["live"], 2, "{capacity}");
}

/// The same Idempotency-Key on two replicas at once: both get the same session, never a 409.
/// The second used to find the key's room (created alongside the launch) but not yet its
/// machine, and took the session for one that had ended.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_retries_on_two_replicas_share_the_session() {
    let mut fly = Options::default().fly;
    fly.boot_delay = Duration::from_millis(100);
    let fakes = start_fakes(&fly).await;
    let replica = || {
        let mut opts = Options::default();
        opts.shared = Some(fakes.clone());
        opts.env
            .push(("BOTDISPATCH_STARTS_PER_MINUTE_PER_CALLER", "0".into()));
        opts.env
            .push(("BOTDISPATCH_OUTBOUND_RATE_SCALE", "0".into()));
        TestEnv::with(opts)
    };
    let (a, b) = (replica().await, replica().await);
    for i in 0..25 {
        let key = format!("race-{i}");
        let (one, two) = tokio::join!(
            start_with_key(&a, "alice", &key, start_body()),
            start_with_key(&b, "alice", &key, start_body())
        );
        assert_eq!(one.0, StatusCode::OK, "attempt {i}: {}", one.1);
        assert_eq!(two.0, StatusCode::OK, "attempt {i}: {}", two.1);
        assert_eq!(one.1["sessionId"], two.1["sessionId"], "attempt {i}");
    }
    assert_eq!(fakes.0.live_machines().len(), 25, "one machine per key");
}
