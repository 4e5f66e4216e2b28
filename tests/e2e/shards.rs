//! `fly.apps` (DESIGN §10, "Sharding"): one dispatcher spreads its creates over four Fly apps,
//! so Fly's per-app create limit (1 req/s, burst 3) multiplies; sessions, the reaper, the
//! capacity count and the reserve work in every app; a session id naming an app that is not
//! configured is refused before any call; the dispatcher's own app may be none of them.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use botdispatch::session_id::{new_session_key, resource_name, SessionIds};
use chrono::{DateTime, Utc};
use futures_util::future::join_all;
use providers::testkit::fly_fake::FakeMachine;
use reqwest::StatusCode;
use serde_json::{json, Value};

use crate::common::*;

const APPS: [&str; 4] = ["bots-1", "bots-2", "bots-3", "bots-4"];

/// A dispatcher whose bots run in the four apps. The harness's `FLY_APP_NAME=bots` stays set
/// (and names no app of the fake): `fly.apps` takes precedence.
fn sharded() -> Options {
    let mut opts = Options::default();
    opts.fly.apps = APPS.iter().map(|a| (*a).to_owned()).collect();
    opts.env.push(("BOTDISPATCH_FLY_APPS", APPS.join(",")));
    opts
}

/// As [`sharded`], without outbound rate limits (tests of behaviour, not of rates).
fn sharded_unlimited() -> Options {
    let mut opts = sharded();
    opts.env
        .push(("BOTDISPATCH_OUTBOUND_RATE_SCALE", "0".to_owned()));
    opts
}

/// `(app, machine id)` of a sharded handle.
fn split(handle: &str) -> (&str, &str) {
    handle
        .split_once('/')
        .unwrap_or_else(|| panic!("{handle:?} names no app"))
}

/// Creates answered by the fake, per app.
fn creates_per_app(env: &TestEnv) -> BTreeMap<String, usize> {
    let mut counts = BTreeMap::new();
    for r in env.fly.requests() {
        let parts: Vec<&str> = r.path.trim_start_matches('/').split('/').collect();
        if r.method == "POST" && matches!(parts.as_slice(), ["v1", "apps", _, "machines"]) {
            *counts.entry(parts[2].to_owned()).or_insert(0) += 1;
        }
    }
    counts
}

/// A machine labelled as a session of this deployment, created behind the dispatcher's back
/// in `app` (debris of a crashed replica, say).
async fn session_machine(env: &TestEnv, app: &str, key: &str, deadline: i64) -> String {
    let resp: Value = env
        .http
        .post(format!("{}/apps/{app}/machines", env.fly.base_url()))
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
                    "botdispatch_owner": "alice",
                    "botdispatch_room": "",
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn starts_spread_over_every_app_at_their_combined_create_rate() {
    // The documented limits on; a generous start timeout so that no start gives up while its
    // app's bucket refills.
    let mut opts = sharded();
    opts.env.extend([
        ("BOTDISPATCH_OUTBOUND_RATE_SCALE", "1".to_owned()),
        ("BOTDISPATCH_START_TIMEOUT_SECS", "30".to_owned()),
    ]);
    let env = TestEnv::with(opts).await;
    const N: usize = 28;
    let started = Instant::now();
    let answers = join_all((0..N).map(|i| {
        let env = &env;
        async move { env.post_start(&format!("caller-{i}"), start_body()).await }
    }))
    .await;
    let elapsed = started.elapsed();
    for (status, resp) in &answers {
        assert_eq!(*status, StatusCode::OK, "no start was throttled: {resp}");
        let handle = session_handle(resp["sessionId"].as_str().unwrap());
        let (app, id) = split(&handle);
        assert_eq!(env.fly.machine(id).unwrap().app, app);
    }
    assert!(
        env.fly.requests().iter().all(|r| r.status != 429),
        "no call was ever throttled by Fly"
    );
    let per_app = creates_per_app(&env);
    assert_eq!(
        per_app.len(),
        APPS.len(),
        "every app got creates: {per_app:?}"
    );
    assert_eq!(per_app.values().sum::<usize>(), N);

    // Each app's creates kept to 1/s after a burst of 3; all four apps at once.
    let mut times: BTreeMap<String, Vec<DateTime<Utc>>> = BTreeMap::new();
    for m in env.fly.machines() {
        times.entry(m.app).or_default().push(m.created_at);
    }
    let mut sustained = 0.0;
    for (app, t) in &mut times {
        t.sort();
        for (k, at) in t.iter().enumerate().skip(3) {
            let since = (*at - t[0]).to_std().unwrap_or_default();
            let least =
                Duration::from_secs(k as u64 - 2).saturating_sub(Duration::from_millis(150));
            assert!(
                since >= least,
                "{app}: create {k} only {since:?} after the first"
            );
        }
        if t.len() > 3 {
            let span = (t[t.len() - 1] - t[2]).to_std().unwrap().as_secs_f64();
            sustained += (t.len() - 3) as f64 / span;
        }
    }
    let busiest = per_app.values().max().copied().unwrap();
    let queueing = times.values().filter(|t| t.len() > 3).count();
    println!(
        "{N} starts over {} apps in {elapsed:.2?} ({per_app:?}): {sustained:.2} creates/s \
         sustained by the {queueing} apps that queued; one app would take at least {} s",
        APPS.len(),
        N - 3
    );
    // One app needs N - 3 = 25 s; four need about their busiest app's n - 3 seconds (names
    // hash to apps: the split of random session keys varies from run to run).
    assert!(
        elapsed < Duration::from_secs((busiest - 3) as u64 + 3),
        "{elapsed:?} for a busiest app of {busiest}"
    );
    assert!(elapsed < Duration::from_secs(N as u64 - 3), "{elapsed:?}");
    // Every app that queued ran at its own 1/s, all at once.
    assert!(
        sustained > 0.8 * queueing as f64,
        "{sustained} by {queueing} apps"
    );
    env.assert_spec_clean();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_in_every_app_read_and_stop_in_their_own_app() {
    let env = TestEnv::with(sharded_unlimited()).await;
    // Starts until every app holds a session (names hash to apps: about 4 starts in 4 do).
    let mut by_app: BTreeMap<String, (String, Value)> = BTreeMap::new();
    for i in 0..100 {
        if by_app.len() == APPS.len() {
            break;
        }
        let sub = format!("user-{i}");
        let (status, resp) = env.post_start(&sub, start_body()).await;
        assert_eq!(status, StatusCode::OK, "{resp}");
        let handle = session_handle(resp["sessionId"].as_str().unwrap());
        by_app
            .entry(split(&handle).0.to_owned())
            .or_insert((sub, resp));
    }
    assert_eq!(by_app.len(), APPS.len(), "{by_app:?}");

    for (app, (sub, resp)) in &by_app {
        let url = resp["statusUrl"].as_str().unwrap();
        let handle = session_handle(resp["sessionId"].as_str().unwrap());
        let id = split(&handle).1;
        let (status, view) = env.get_session(sub, url).await;
        assert_eq!(status, StatusCode::OK, "{view}");
        assert_eq!(view["status"], "ready", "{view}");
        assert_eq!(view["machineId"], handle);
        let machine = env.fly.machine(id).unwrap();
        assert_eq!(&machine.app, app);
        assert_eq!(machine.state, "started");

        let (status, out) = env.call("DELETE", url, Some(&env.token(sub)), None).await;
        assert_eq!(status, StatusCode::OK, "{out}");
        assert_eq!(out["status"], "ended");
        assert!(
            env.fly
                .wait_for_state(id, "destroyed", Duration::from_secs(5))
                .await
        );
        let (status, view) = env.get_session(sub, url).await;
        assert_eq!(status, StatusCode::OK, "{view}");
        assert_eq!(view["status"], "ended", "{view}");
        // Every call about this machine went to its own app.
        for r in env.fly.requests().iter().filter(|r| r.path.contains(id)) {
            assert!(
                r.path.starts_with(&format!("/v1/apps/{app}/machines/{id}")),
                "{} {}",
                r.method,
                r.path
            );
        }
    }
    env.assert_spec_clean();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_repeated_start_finds_its_machine_in_its_app_on_any_replica() {
    let a = TestEnv::with(sharded_unlimited()).await;
    let mut opts = sharded_unlimited();
    opts.shared = Some((a.fly.clone(), a.daily.clone()));
    let b = TestEnv::with(opts).await;
    let start = |env: &TestEnv, key: String| {
        let req = env
            .http
            .post(format!("{}/start", env.base))
            .bearer_auth(env.token("carol"))
            .header("Idempotency-Key", key)
            // Without a room: a replica that finds the key's room but not yet its machine
            // reads the key as used (409), a race of the start flow that is not this test's.
            .json(&json!({"createDailyRoom": false, "body": {"hello": "world"}}));
        async move {
            let resp = req.send().await.unwrap();
            (resp.status(), resp.json::<Value>().await.unwrap())
        }
    };
    for i in 0..16 {
        let key = format!("order-{i}");
        // The same start sent to both replicas at once: both creates go to the app the
        // machine's name hashes to, where the second conflicts and adopts the first.
        let ((s1, r1), (s2, r2)) = tokio::join!(start(&a, key.clone()), start(&b, key.clone()));
        assert_eq!((s1, s2), (StatusCode::OK, StatusCode::OK), "{r1} {r2}");
        assert_eq!(r1["sessionId"], r2["sessionId"]);
    }
    assert_eq!(
        a.fly.machines().len(),
        16,
        "one VM per key: {:#?}",
        a.fly.machines()
    );
    let apps: BTreeSet<String> = a.fly.machines().into_iter().map(|m| m.app).collect();
    let conflicts = a
        .fly
        .requests()
        .iter()
        .filter(|r| r.method == "POST" && r.status == 409)
        .count();
    println!(
        "16 keys started on two replicas at once: 16 machines in {apps:?}, {conflicts} creates conflicted"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_reaper_and_the_capacity_count_see_every_app() {
    let mut opts = sharded_unlimited();
    opts.env.extend([
        ("BOTDISPATCH_START_TIMEOUT_SECS", "1".to_owned()),
        ("BOTDISPATCH_REAPER_GRACE_SECS", "0".to_owned()),
        ("BOTDISPATCH_MAX_SESSIONS", APPS.len().to_string()),
    ]);
    let env = TestEnv::with(opts).await;
    // One session machine past its deadline in every app.
    let mut debris = Vec::new();
    for app in APPS {
        let id = session_machine(&env, app, &new_session_key(), now() - 10).await;
        debris.push(id);
    }
    for id in &debris {
        assert!(
            env.fly
                .wait_for_state(id, "started", Duration::from_secs(5))
                .await
        );
    }
    // They count: four apps, four sessions, the limit.
    let (status, resp) = env.post_start("alice", start_body()).await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS, "{resp}");
    assert_eq!(resp["error"], "at_capacity", "{resp}");

    // Older than start timeout + grace.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let report = env.app.reaper.pass().await;
    println!("reaper pass over {} apps: {report:?}", APPS.len());
    assert_eq!(report.past_deadline, APPS.len(), "{report:?}");
    assert_eq!(report.errors, 0, "{report:?}");
    for id in &debris {
        let m = env.fly.machine(id).unwrap();
        assert!(m.state == "destroyed" || m.state == "stopped", "{m:?}");
    }
    // Room to start again.
    let (status, resp) = env.post_start("alice", start_body()).await;
    assert_eq!(status, StatusCode::OK, "{resp}");
    env.assert_spec_clean();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_id_naming_an_app_not_configured_is_refused_before_any_call() {
    let mut opts = sharded_unlimited();
    opts.fly.apps.push("elsewhere".to_owned());
    let env = TestEnv::with(opts).await;
    // A machine in an app the dispatcher was not given, labelled exactly as alice's session.
    let key = new_session_key();
    let victim = session_machine(&env, "elsewhere", &key, now() + 3600).await;
    assert!(
        env.fly
            .wait_for_state(&victim, "started", Duration::from_secs(5))
            .await
    );
    // Ids signed with the real session secret (the worst case: the secret leaked).
    let ids = SessionIds::new(vec![SESSION_SECRET.as_bytes().to_vec()], "fly", "default");
    let alice = env.token("alice");
    let before = env.fly.requests().len();
    for handle in [
        format!("elsewhere/{victim}"),
        format!("elsewhere/../bots-1/{victim}"),
        format!("bots-1/{victim}/stop"),
        format!("bots-1//{victim}"),
        format!("/{victim}"),
    ] {
        let url = format!("/sessions/{}", ids.encode(&key, &handle, "alice"));
        let (status, err) = env.call("GET", &url, Some(&alice), None).await;
        assert_eq!(status, StatusCode::NOT_FOUND, "{handle}: {err}");
        assert_eq!(err["error"], "session_not_found");
        let (status, _) = env.call("DELETE", &url, Some(&alice), None).await;
        assert_eq!(status, StatusCode::NOT_FOUND, "{handle}");
    }
    assert_eq!(
        env.fly.requests().len(),
        before,
        "no call reached Fly for an app that is not configured"
    );
    // A configured app's handle reads only that app: the machine elsewhere is not found there.
    let url = format!(
        "/sessions/{}",
        ids.encode(&key, &format!("bots-2/{victim}"), "alice")
    );
    env.call("GET", &url, Some(&alice), None).await;
    env.call("DELETE", &url, Some(&alice), None).await;
    for r in &env.fly.requests()[before..] {
        assert!(
            r.path.starts_with("/v1/apps/bots-2/"),
            "{} {}",
            r.method,
            r.path
        );
        assert_eq!(r.method, "GET", "nothing changed: {}", r.path);
    }
    assert_eq!(env.fly.machine(&victim).unwrap().state, "started");
}

#[test]
fn the_dispatchers_own_app_may_be_none_of_the_apps() {
    // What Fly sets on every machine of the dispatcher's own app.
    let on_fly = |apps: &str, toml: &str| {
        let env: BTreeMap<&str, String> = BTreeMap::from([
            ("BOTDISPATCH_PROVIDER", "fly".to_owned()),
            ("BOTDISPATCH_ROOMS", "local".to_owned()),
            ("BOTDISPATCH_JWT_SECRET", JWT_SECRET.to_owned()),
            ("BOTDISPATCH_SESSION_SECRET", SESSION_SECRET.to_owned()),
            ("BOTDISPATCH_BOT_IMAGE", BOT_IMAGE.to_owned()),
            ("FLY_API_TOKEN", FLY_TOKEN.to_owned()),
            ("FLY_APP_NAME", "dispatcher".to_owned()),
            ("FLY_MACHINE_ID", "148ed193b95089".to_owned()),
            ("BOTDISPATCH_FLY_APPS", apps.to_owned()),
        ]);
        config_from(toml, &env)
    };
    let err = on_fly("bots-1,dispatcher,bots-3", "").unwrap_err();
    assert!(
        err.contains("own app") && err.contains("\"dispatcher\"") && err.contains("fly.apps"),
        "{err}"
    );
    let err = on_fly("", "[fly]\napps = [\"bots-1\", \"dispatcher\"]\n").unwrap_err();
    assert!(err.contains("own app"), "{err}");
    // With a list, Fly's FLY_APP_NAME (the dispatcher's own app) is simply not used.
    on_fly("bots-1,bots-2", "").unwrap();
    on_fly("", "[fly]\napps = [\"bots-1\", \"bots-2\"]\n").unwrap();
}

/// Ready reserve machines of the fake.
fn ready_reserve(env: &TestEnv) -> Vec<FakeMachine> {
    env.fly
        .live_machines()
        .into_iter()
        .filter(|m| {
            let meta = &m.config["metadata"];
            meta["botdispatch_role"] == "reserve" && meta["botdispatch_ready"] == "1"
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hot_reserve_spread_over_the_apps_hands_out_its_machines() {
    let mut opts = sharded_unlimited();
    opts.background = true;
    opts.env.extend([
        ("BOTDISPATCH_HANDOFF", "http".to_owned()),
        ("BOTDISPATCH_RESERVE_TIER", "hot".to_owned()),
        ("BOTDISPATCH_RESERVE_SIZE", "4".to_owned()),
        ("BOTDISPATCH_RESERVE_INTERVAL_MS", "100".to_owned()),
        ("BOTDISPATCH_REAPER_INTERVAL_SECS", "0".to_owned()),
    ]);
    let env = TestEnv::with(opts).await;
    let deadline = Instant::now() + Duration::from_secs(20);
    while ready_reserve(&env).len() < 4 {
        assert!(
            Instant::now() < deadline,
            "reserve not ready: {:#?}",
            env.fly.live_machines()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Let the dispatcher list them.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let reserve = ready_reserve(&env);
    let apps: BTreeSet<&str> = reserve.iter().map(|m| m.app.as_str()).collect();
    println!("a reserve of 4 over {apps:?}");

    for sub in ["alice", "bob"] {
        let (status, resp) = env.post_start(sub, start_body()).await;
        assert_eq!(status, StatusCode::OK, "{resp}");
        assert_eq!(resp["startType"], "hot", "{resp}");
        let handle = session_handle(resp["sessionId"].as_str().unwrap());
        let (app, id) = split(&handle);
        let machine = reserve
            .iter()
            .find(|m| m.id == id)
            .expect("a reserve machine");
        assert_eq!(machine.app, app);
        // Handed over, then told to end after its session, in its own app.
        assert!(
            env.fly
                .wait_for_deliveries(id, 1, Duration::from_secs(5))
                .await
        );
        let deadline = Instant::now() + Duration::from_secs(5);
        while !env.fly.signals(id).contains(&"SIGTERM".to_owned()) {
            assert!(Instant::now() < deadline, "no SIGTERM after the handoff");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        for r in env.fly.requests().iter().filter(|r| r.path.contains(id)) {
            assert!(
                r.path.starts_with(&format!("/v1/apps/{app}/machines/{id}")),
                "{} {}",
                r.method,
                r.path
            );
        }
        let (status, view) = env
            .get_session(sub, resp["statusUrl"].as_str().unwrap())
            .await;
        assert_eq!(status, StatusCode::OK, "{view}");
        assert_eq!(view["startType"], "hot", "{view}");
    }
    assert!(
        env.fly.violations().is_empty(),
        "{:?}",
        env.fly.violations()
    );
    env.assert_spec_clean();
}
