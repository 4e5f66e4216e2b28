//! Warm starts against the Fly fake's per-machine bot servers (DESIGN §4, §10): the `http`
//! handoff cold and from hot, suspended and stopped reserves; every failure of a warm start
//! ending with the next machine, the cold path or a clean error; and three replicas claiming
//! from one reserve without handing any machine out twice.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use futures_util::future::join_all;
use providers::testkit::fly_fake::{BootKind, FakeMachine, FlyOp, HandoffAuth};
use providers::testkit::Fault;
use reqwest::StatusCode;
use serde_json::{json, Value};

use crate::common::*;

/// A dispatcher whose default agent hands sessions over HTTP and keeps a reserve of `size`
/// machines of `tier` (none when `size` is 0), replenished every 100 ms.
async fn warm_env(tier: &str, size: u32, mut opts: Options) -> TestEnv {
    opts.background = true;
    opts.env.extend([
        ("BOTDISPATCH_HANDOFF", "http".to_owned()),
        ("BOTDISPATCH_RESERVE_TIER", tier.to_owned()),
        ("BOTDISPATCH_RESERVE_SIZE", size.to_string()),
        ("BOTDISPATCH_RESERVE_INTERVAL_MS", "100".to_owned()),
        ("BOTDISPATCH_REAPER_INTERVAL_SECS", "0".to_owned()),
        ("BOTDISPATCH_OUTBOUND_RATE_SCALE", "0".to_owned()),
    ]);
    TestEnv::with(opts).await
}

/// A dispatcher whose default agent hands sessions over HTTP and keeps a reserve of `size`
/// machines of `tier`, whose passes run only when the test calls them (no reaper either).
async fn manual_reserve_env(tier: &str, size: u32, mut opts: Options) -> TestEnv {
    opts.env.extend([
        ("BOTDISPATCH_HANDOFF", "http".to_owned()),
        ("BOTDISPATCH_RESERVE_TIER", tier.to_owned()),
        ("BOTDISPATCH_RESERVE_SIZE", size.to_string()),
        ("BOTDISPATCH_RESERVE_INTERVAL_MS", "0".to_owned()),
        ("BOTDISPATCH_REAPER_INTERVAL_SECS", "0".to_owned()),
    ]);
    TestEnv::with(opts).await
}

/// A start that must succeed as `start_type` (a tier, or `cold`): its machine's handle.
async fn start_as(env: &TestEnv, user: &str, start_type: &str) -> String {
    let (status, resp) = env.post_start(user, start_body()).await;
    assert_eq!(status, StatusCode::OK, "{resp}");
    assert_eq!(resp["startType"], start_type, "{resp}");
    session_handle(resp["sessionId"].as_str().unwrap())
}

fn assert_no_violations(env: &TestEnv) {
    let violations = env.fly.violations();
    assert!(violations.is_empty(), "{violations:?}");
}

fn meta(m: &FakeMachine) -> &Value {
    &m.config["metadata"]
}

/// Unclaimed reserve machines that are ready: marked so (hot, suspended) or created and
/// stopped (stopped).
fn ready_reserve(env: &TestEnv) -> Vec<FakeMachine> {
    env.fly
        .live_machines()
        .into_iter()
        .filter(|m| {
            let meta = meta(m);
            meta["botdispatch_role"] == "reserve"
                && (meta["botdispatch_ready"] == "1"
                    || (meta["botdispatch_tier"] == "stopped" && m.state == "stopped"))
        })
        .collect()
}

/// Waits until `n` reserve machines are ready, and then until the dispatcher has listed them
/// (it claims from its last listing, taken every pass).
async fn wait_reserve_ready(env: &TestEnv, n: usize) -> Vec<FakeMachine> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let ready = ready_reserve(env);
        if ready.len() >= n {
            tokio::time::sleep(Duration::from_millis(300)).await;
            return ready;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "reserve not ready: {} of {n}; machines: {:#?}",
            ready.len(),
            env.fly.live_machines()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The session's only delivery, checked against the start's answer.
fn assert_delivered(env: &TestEnv, handle: &str, resp: &Value) {
    let deliveries = env.fly.deliveries(handle);
    assert_eq!(deliveries.len(), 1, "{deliveries:#?}");
    let d = &deliveries[0];
    let key = session_key(resp["sessionId"].as_str().unwrap());
    assert!(d.accepted, "{d:?}");
    assert_eq!(d.auth, HandoffAuth::Matched);
    assert_eq!(d.session_id.as_deref(), Some(key));
    assert_eq!(d.room_url.as_deref(), resp["dailyRoom"].as_str());
    assert_eq!(d.body, Some(json!({"hello": "world"})));
    // The bot's room token: an owner token for the session's room.
    let room = resp["dailyRoom"]
        .as_str()
        .unwrap()
        .rsplit('/')
        .next()
        .unwrap();
    let bot = decode_hs256(d.room_token.as_deref().unwrap(), DAILY_KEY);
    assert_eq!(bot["r"], room);
    assert_eq!(bot["o"], true);
}

async fn wait_signalled(env: &TestEnv, handle: &str) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while !env.fly.signals(handle).contains(&"SIGTERM".to_owned()) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "no SIGTERM after the handoff"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn http_handoff_cold_start_delivers_the_session_and_ends_the_boot() {
    let env = warm_env("hot", 0, Options::default()).await;
    let (status, resp) = env.post_start("alice", start_body()).await;
    assert_eq!(status, StatusCode::OK, "{resp}");
    assert_eq!(resp["status"], "ready");
    assert_eq!(resp["startType"], "cold");
    let handle = session_handle(resp["sessionId"].as_str().unwrap());
    let machine = env.fly.machine(&handle).unwrap();
    // Launched without the session: static env and its own handoff secret only.
    let vars = &machine.config["env"];
    assert!(vars.get("DAILY_ROOM_URL").is_none(), "{vars}");
    assert!(vars.get("BOTDISPATCH_SESSION_ID").is_none(), "{vars}");
    assert_eq!(
        vars["BOTDISPATCH_HANDOFF_SECRET"].as_str().unwrap().len(),
        64
    );
    assert_eq!(vars["PORT"], "8080");
    assert_delivered(&env, &handle, &resp);
    wait_signalled(&env, &handle).await;

    // A second /bot can never reach this boot: the bot stopped taking sessions.
    let url = format!("{}/bot", env.fly.machine_url(&handle));
    let secret = vars["BOTDISPATCH_HANDOFF_SECRET"].as_str().unwrap();
    let second = env
        .http
        .post(&url)
        .bearer_auth(secret)
        .json(&json!({}))
        .timeout(Duration::from_secs(2))
        .send()
        .await;
    assert!(
        second.map_or(true, |r| !r.status().is_success()),
        "a second session was accepted"
    );

    let (_, view) = env
        .get_session("alice", resp["statusUrl"].as_str().unwrap())
        .await;
    assert_eq!(view["status"], "ready", "{view}");
    assert_eq!(view["startType"], "cold", "{view}");

    // The session ends: the bot exits and auto_destroy reclaims the machine.
    env.fly.end_session(&handle);
    assert!(
        env.fly
            .wait_for_state(&handle, "destroyed", Duration::from_secs(5))
            .await
    );
    assert_no_violations(&env);
    env.assert_spec_clean();
}

#[tokio::test]
async fn hot_reserve_hands_out_a_booted_machine_and_refills() {
    let env = warm_env("hot", 2, Options::default()).await;
    let reserve = wait_reserve_ready(&env, 2).await;
    let boots_before: u32 = reserve.iter().map(|m| m.boots).sum();

    let (status, resp) = env.post_start("alice", start_body()).await;
    assert_eq!(status, StatusCode::OK, "{resp}");
    assert_eq!(resp["startType"], "hot");
    let handle = session_handle(resp["sessionId"].as_str().unwrap());
    assert!(
        reserve.iter().any(|m| m.id == handle),
        "not a reserve machine"
    );
    let m = env.fly.machine(&handle).unwrap();
    assert_eq!(m.boots, 1, "a hot machine is not booted again");
    assert_eq!(meta(&m)["botdispatch_role"], "session");
    assert_eq!(meta(&m)["botdispatch_start"], "hot");
    assert_eq!(
        meta(&m)["botdispatch_session"],
        session_key(resp["sessionId"].as_str().unwrap())
    );
    assert_delivered(&env, &handle, &resp);
    wait_signalled(&env, &handle).await;
    // The claim's lease was held through the handoff and is released after it, with the
    // session's real deadline written.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(3);
    while env.fly.lease(&handle).is_some() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the claim's lease is never released"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let m = env.fly.machine(&handle).unwrap();
    let real = meta(&m)["botdispatch_deadline"]
        .as_str()
        .unwrap()
        .parse::<i64>()
        .unwrap();
    assert!((real - (now() + 3600)).abs() < 10, "deadline {real}");
    // The room came from this replica's pool, created ahead.
    let room = resp["dailyRoom"].as_str().unwrap();
    assert!(room.contains("/bd-default-p"), "{room}");
    assert_eq!(
        meta(&m)["botdispatch_room"],
        room.rsplit('/').next().unwrap()
    );

    let (_, view) = env
        .get_session("alice", resp["statusUrl"].as_str().unwrap())
        .await;
    assert_eq!(view["startType"], "hot", "{view}");
    assert_eq!(view["status"], "ready", "{view}");

    // Back to two ready machines, the claimed one not among them.
    let refilled = wait_reserve_ready(&env, 2).await;
    assert!(refilled.iter().all(|m| m.id != handle));
    let boots_after: u32 = refilled.iter().map(|m| m.boots).sum::<u32>() + 1;
    assert_eq!(
        boots_after,
        boots_before + 1,
        "one new machine for one claimed"
    );

    // DELETE ends it: machine and (pooled) room.
    let (status, _) = env
        .call(
            "DELETE",
            resp["statusUrl"].as_str().unwrap(),
            Some(&env.token("alice")),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    assert!(
        env.fly
            .wait_for_state(&handle, "destroyed", Duration::from_secs(5))
            .await
    );
    let room_name = room.rsplit('/').next().unwrap();
    assert!(env.daily.rooms().iter().all(|r| r.name != room_name));
    assert_no_violations(&env);
    env.assert_spec_clean();
}

#[tokio::test]
async fn suspended_reserve_resumes_from_the_snapshot() {
    let env = warm_env("suspended", 1, Options::default()).await;
    let reserve = wait_reserve_ready(&env, 1).await;
    assert_eq!(reserve[0].state, "suspended");
    assert_eq!(reserve[0].suspends, 1);

    let (status, resp) = env.post_start("alice", start_body()).await;
    assert_eq!(status, StatusCode::OK, "{resp}");
    assert_eq!(resp["startType"], "suspended");
    let handle = session_handle(resp["sessionId"].as_str().unwrap());
    assert_eq!(handle, reserve[0].id);
    let log = env.fly.boot_log(&handle);
    assert_eq!(
        log.iter().map(|b| b.kind).collect::<Vec<_>>(),
        [BootKind::Fresh, BootKind::Resume],
        "booted once, resumed once"
    );
    assert_delivered(&env, &handle, &resp);
    wait_signalled(&env, &handle).await;
    assert_no_violations(&env);
    env.assert_spec_clean();
}

#[tokio::test]
async fn a_resume_that_comes_back_cold_still_serves_the_session() {
    let mut opts = Options::default();
    opts.fly_warm.app_boot = Duration::from_millis(300);
    let env = warm_env("suspended", 1, opts).await;
    let reserve = wait_reserve_ready(&env, 1).await;
    env.fly.set_cold_resume(&reserve[0].id);
    let (status, resp) = env.post_start("alice", start_body()).await;
    assert_eq!(status, StatusCode::OK, "{resp}");
    assert_eq!(resp["startType"], "suspended");
    let handle = session_handle(resp["sessionId"].as_str().unwrap());
    let log = env.fly.boot_log(&handle);
    assert_eq!(log.last().unwrap().kind, BootKind::ColdResume);
    assert_delivered(&env, &handle, &resp);
    assert_no_violations(&env);
}

#[tokio::test]
async fn stopped_reserve_boots_on_claim() {
    let env = warm_env("stopped", 1, Options::default()).await;
    let reserve = wait_reserve_ready(&env, 1).await;
    assert_eq!(reserve[0].state, "stopped");
    assert_eq!(reserve[0].boots, 0, "created with skip_launch");
    assert_eq!(reserve[0].config["env"]["PORT"], "8080");

    let (status, resp) = env.post_start("alice", start_body()).await;
    assert_eq!(status, StatusCode::OK, "{resp}");
    assert_eq!(resp["startType"], "stopped");
    let handle = session_handle(resp["sessionId"].as_str().unwrap());
    assert_eq!(handle, reserve[0].id);
    assert_eq!(env.fly.boots(&handle), 1);
    assert_delivered(&env, &handle, &resp);
    assert_no_violations(&env);
    env.assert_spec_clean();
}

#[tokio::test]
async fn a_refused_handoff_moves_on_to_the_next_machine() {
    let env = warm_env("hot", 2, Options::default()).await;
    let reserve = wait_reserve_ready(&env, 2).await;
    // Both reserve machines refuse; the start ends on a cold machine.
    for m in &reserve {
        env.fly.set_bot_refusal(&m.id, Some(500));
    }
    let (status, resp) = env.post_start("alice", start_body()).await;
    assert_eq!(status, StatusCode::OK, "{resp}");
    assert_eq!(resp["startType"], "cold");
    let handle = session_handle(resp["sessionId"].as_str().unwrap());
    assert!(reserve.iter().all(|m| m.id != handle));
    assert_delivered(&env, &handle, &resp);
    // The machines that refused are destroyed, not handed out again.
    for m in &reserve {
        assert!(
            env.fly
                .wait_for_state(&m.id, "destroyed", Duration::from_secs(5))
                .await,
            "{:?}",
            env.fly.machine(&m.id)
        );
    }
    assert_no_violations(&env);
}

#[tokio::test]
async fn a_lost_lease_or_failed_resume_moves_on() {
    let env = warm_env("suspended", 2, Options::default()).await;
    let reserve = wait_reserve_ready(&env, 2).await;
    // Another holder's lease on the first machine tried; the resume of the next one fails.
    env.fly.set_fault(
        FlyOp::Lease,
        Fault::Status {
            status: 409,
            retry_after: None,
        },
        1,
    );
    env.fly.set_fault(
        FlyOp::Start,
        Fault::Status {
            status: 500,
            retry_after: None,
        },
        1,
    );
    let (status, resp) = env.post_start("alice", start_body()).await;
    env.fly.clear_faults();
    assert_eq!(status, StatusCode::OK, "{resp}");
    let handle = session_handle(resp["sessionId"].as_str().unwrap());
    assert_delivered(&env, &handle, &resp);
    // The machine whose resume failed is destroyed; whatever served the session (the other
    // reserve machine, once its lease was free, or a cold one) got exactly one session.
    let failed: Vec<_> = reserve
        .iter()
        .filter(|m| m.id != handle && env.fly.deliveries(&m.id).is_empty())
        .filter(|m| {
            env.fly
                .machine(&m.id)
                .is_some_and(|m| m.boot_log.len() == 1)
        })
        .collect();
    println!("served by a {} machine", resp["startType"]);
    assert!(["suspended", "cold"].contains(&resp["startType"].as_str().unwrap()));
    let destroyed = env
        .fly
        .machines()
        .into_iter()
        .filter(|m| m.state == "destroyed")
        .count();
    assert!(
        destroyed >= 1,
        "the machine whose start failed is destroyed: {failed:?}"
    );
    assert_no_violations(&env);
}

#[tokio::test]
async fn a_machine_that_never_gets_ready_fails_cleanly() {
    let mut opts = Options::default();
    opts.env
        .push(("BOTDISPATCH_START_TIMEOUT_SECS", "2".to_owned()));
    opts.fly_warm.app_boot = Duration::from_secs(3600);
    let env = warm_env("hot", 0, opts).await;
    let (status, resp) = env.post_start("alice", start_body()).await;
    assert_eq!(status, StatusCode::GATEWAY_TIMEOUT, "{resp}");
    assert_eq!(resp["error"], "start_timeout");
    env.assert_nothing_left_within(Duration::from_secs(5)).await;
}

#[tokio::test]
async fn a_bot_that_fails_the_session_later_marks_it_failed() {
    let env = warm_env("hot", 0, Options::default()).await;
    let (status, resp) = env.post_start("alice", start_body()).await;
    assert_eq!(status, StatusCode::OK, "{resp}");
    let handle = session_handle(resp["sessionId"].as_str().unwrap());
    // The bot crashes mid-session: its process dies, the held /bot connection is reset.
    env.fly.exit_machine(&handle, 1);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let (_, view) = env
            .get_session("alice", resp["statusUrl"].as_str().unwrap())
            .await;
        if view["status"] == "ended" || view["status"] == "failed" {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "{view}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn three_replicas_never_hand_a_machine_out_twice() {
    const SIZE: u32 = 8;
    const STARTS: usize = 30;
    let mut first = Options::default();
    first.fly_warm.session_duration = Some(Duration::from_millis(1500));
    let (fly, daily) = start_fakes_with(&first.fly, &first.fly_warm).await;
    let mut replicas = Vec::new();
    for _ in 0..3 {
        let mut opts = Options::default();
        opts.shared = Some((fly.clone(), daily.clone()));
        replicas.push(warm_env("hot", SIZE, opts).await);
    }
    wait_reserve_ready(&replicas[0], SIZE as usize).await;
    let calls = (0..STARTS).map(|i| {
        let env = &replicas[i % 3];
        async move { env.post_start(&format!("user{i}"), start_body()).await }
    });
    let answers = join_all(calls).await;
    let mut handles = BTreeSet::new();
    let mut types: BTreeMap<String, usize> = BTreeMap::new();
    for (status, resp) in &answers {
        assert_eq!(*status, StatusCode::OK, "{resp}");
        let handle = session_handle(resp["sessionId"].as_str().unwrap());
        assert!(
            handles.insert(handle.clone()),
            "machine {handle} handed out twice"
        );
        *types
            .entry(resp["startType"].as_str().unwrap().to_owned())
            .or_default() += 1;
        let accepted = fly
            .deliveries(&handle)
            .iter()
            .filter(|d| d.accepted)
            .count();
        assert_eq!(accepted, 1, "machine {handle}: {accepted} sessions");
    }
    println!("start types: {types:?}");
    assert!(
        types.get("hot").copied().unwrap_or(0) >= SIZE as usize / 2,
        "{types:?}"
    );
    assert!(fly.violations().is_empty(), "{:?}", fly.violations());

    // Every session ends by itself (the bot exits, auto_destroy). The reserve is back at its
    // size, beyond it by at most one machine per slot per replica (the documented bound),
    // and a reaper pass takes it back to its size.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let sessions = fly
            .live_machines()
            .into_iter()
            .filter(|m| meta(m)["botdispatch_role"] != "reserve")
            .count();
        let ready = ready_reserve(&replicas[0]).len();
        if sessions == 0 && ready >= SIZE as usize {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{sessions} sessions still live, {ready} ready"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let reserve = fly.live_machines().len();
    assert!(
        reserve <= SIZE as usize * 3,
        "overshoot beyond the bound: {reserve} machines for a reserve of {SIZE}"
    );
    for env in &replicas {
        env.app.shutdown.cancel();
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    // Past the grace, the reaper retires the surplus.
    let mut reaper_opts = Options::default();
    reaper_opts.shared = Some((fly.clone(), daily.clone()));
    reaper_opts
        .env
        .push(("BOTDISPATCH_REAPER_GRACE_SECS", "0".to_owned()));
    reaper_opts
        .env
        .push(("BOTDISPATCH_START_TIMEOUT_SECS", "1".to_owned()));
    let reaper_env = warm_env("hot", SIZE, reaper_opts).await;
    reaper_env.app.shutdown.cancel();
    tokio::time::sleep(Duration::from_millis(1100)).await;
    reaper_env.app.reaper.pass().await;
    let left = fly.live_machines().len();
    assert_eq!(left, SIZE as usize, "{:#?}", fly.live_machines());
    // No session room is left; only the replicas' pool rooms (deleted as they age out).
    let rooms = daily.rooms();
    assert!(
        rooms.iter().all(|r| r.name.starts_with("bd-default-p")),
        "{rooms:?}"
    );
}

/// The reaper's reserve rules: machines of a stale template and machines that never got ready
/// are retired; a claimed machine (a session's now) never is; the reserve is rebuilt from the
/// current template.
#[tokio::test]
async fn the_reaper_rotates_stale_and_broken_reserve_machines_and_spares_claimed_ones() {
    let mut v1 = Options::default();
    v1.fly_warm.session_duration = None;
    let (fly, daily) = start_fakes_with(&v1.fly, &v1.fly_warm).await;
    v1.shared = Some((fly.clone(), daily.clone()));
    let old = warm_env("hot", 2, v1).await;
    let stale = wait_reserve_ready(&old, 2).await;
    // One of them becomes a session's.
    let (status, resp) = old.post_start("alice", start_body()).await;
    assert_eq!(status, StatusCode::OK, "{resp}");
    assert_eq!(resp["startType"], "hot");
    let claimed = session_handle(resp["sessionId"].as_str().unwrap());
    old.app.shutdown.cancel();

    // A new release of the bot: another image, so another template fingerprint.
    let mut v2 = Options::default();
    v2.shared = Some((fly.clone(), daily.clone()));
    v2.env.extend([
        (
            "BOTDISPATCH_BOT_IMAGE",
            "registry.fly.io/bots:v2".to_owned(),
        ),
        ("BOTDISPATCH_REAPER_GRACE_SECS", "0".to_owned()),
        ("BOTDISPATCH_START_TIMEOUT_SECS", "1".to_owned()),
    ]);
    let new = warm_env("hot", 2, v2).await;
    let fresh = wait_reserve_ready(&new, 3).await;
    let v2_ready: Vec<_> = fresh
        .iter()
        .filter(|m| m.config["image"] == "registry.fly.io/bots:v2")
        .collect();
    assert_eq!(v2_ready.len(), 2, "the new template's reserve is built");
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let report = new.app.reaper.pass().await;
    println!("{report:?}");
    for m in stale.iter().filter(|m| m.id != claimed) {
        assert!(
            fly.wait_for_state(&m.id, "destroyed", Duration::from_secs(5))
                .await,
            "stale reserve machine {} kept",
            m.id
        );
    }
    assert_eq!(
        fly.machine(&claimed).unwrap().state,
        "started",
        "a claimed machine is a session's: never retired"
    );

    // A machine that never gets ready is retired once past its preparation time.
    let mut v2b = Options::default();
    v2b.shared = Some((fly.clone(), daily.clone()));
    v2b.env.extend([
        (
            "BOTDISPATCH_BOT_IMAGE",
            "registry.fly.io/bots:v3".to_owned(),
        ),
        ("BOTDISPATCH_REAPER_GRACE_SECS", "0".to_owned()),
        ("BOTDISPATCH_START_TIMEOUT_SECS", "1".to_owned()),
        ("BOTDISPATCH_RESERVE_INTERVAL_MS", "0".to_owned()),
    ]);
    new.app.shutdown.cancel();
    let v3 = warm_env("hot", 1, v2b).await;
    let reserves = v3.app.sessions.reserves().unwrap().clone();
    reserves.replenish().await;
    let unready = fly
        .live_machines()
        .into_iter()
        .find(|m| m.config["image"] == "registry.fly.io/bots:v3")
        .expect("a v3 machine was created");
    fly.set_never_ready(&unready.id, true);
    reserves.replenish().await;
    assert!(!fly.is_ready(&unready.id) || ready_reserve(&v3).iter().all(|m| m.id != unready.id));
    // Past 2 × start timeout + grace (2 s) it counts as broken.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let report = v3.app.reaper.pass().await;
    assert!(report.reserve_retired >= 1, "{report:?}");
    assert!(
        fly.wait_for_state(&unready.id, "destroyed", Duration::from_secs(5))
            .await,
        "a reserve machine that never got ready is retired"
    );
    assert!(fly.violations().is_empty(), "{:?}", fly.violations());
}

/// A pool room handed to a session is deleted by the reaper once that session's machine is
/// gone (it cannot carry the session's name, so the room-gone rule alone would not find it).
#[tokio::test]
async fn the_reaper_deletes_a_pool_room_after_its_session() {
    let mut opts = Options::default();
    opts.env
        .push(("BOTDISPATCH_REAPER_GRACE_SECS", "0".to_owned()));
    let env = warm_env("hot", 1, opts).await;
    wait_reserve_ready(&env, 1).await;
    let (status, resp) = env.post_start("alice", start_body()).await;
    assert_eq!(status, StatusCode::OK, "{resp}");
    let room = resp["dailyRoom"]
        .as_str()
        .unwrap()
        .rsplit('/')
        .next()
        .unwrap()
        .to_owned();
    assert!(room.starts_with("bd-default-p"), "{room}");
    let handle = session_handle(resp["sessionId"].as_str().unwrap());
    env.app.reaper.pass().await;
    assert!(
        env.daily.rooms().iter().any(|r| r.name == room),
        "in use: kept"
    );
    env.fly.end_session(&handle);
    assert!(
        env.fly
            .wait_for_state(&handle, "destroyed", Duration::from_secs(5))
            .await
    );
    let report = env.app.reaper.pass().await;
    assert!(report.rooms_deleted >= 1, "{report:?}");
    assert!(
        env.daily.rooms().iter().all(|r| r.name != room),
        "the used pool room is deleted"
    );
}

/// Recycling (issue 11 §1): a reserve machine whose session ended is started again from its
/// image and put back — no create per session — and never gets a session without a fresh
/// boot since its previous one (the fake checks every delivery).
async fn recycles(tier: &str) {
    let mut opts = Options::default();
    opts.fly_warm.session_duration = Some(Duration::from_millis(300));
    opts.env
        .push(("BOTDISPATCH_RESERVE_RECYCLE", "true".to_owned()));
    let env = warm_env(tier, 1, opts).await;
    let first = wait_reserve_ready(&env, 1).await.remove(0);
    assert_eq!(
        first.config["auto_destroy"], false,
        "{tier}: kept to be recycled"
    );
    assert_eq!(first.config["rootfs"]["persist"], "never", "{tier}");
    for round in 1..=3 {
        let (status, resp) = env.post_start(&format!("user{round}"), start_body()).await;
        assert_eq!(status, StatusCode::OK, "{tier} round {round}: {resp}");
        assert_eq!(resp["startType"], tier, "{tier} round {round}: {resp}");
        let handle = session_handle(resp["sessionId"].as_str().unwrap());
        assert_eq!(
            handle, first.id,
            "{tier} round {round}: the same machine, recycled"
        );
        // The session ends by itself; the machine stops (no auto_destroy) and is recycled.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
        loop {
            let ready = ready_reserve(&env);
            let deliveries = env.fly.deliveries(&handle).len();
            if deliveries == round && ready.iter().any(|m| m.id == handle) {
                break;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "{tier} round {round}: not back in the reserve: {:#?}",
                env.fly.machine(&handle)
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    assert_eq!(env.fly.machines().len(), 1, "{tier}: no create per session");
    let boots = env.fly.boot_log(&first.id);
    println!(
        "{tier}: {:?}",
        boots.iter().map(|b| b.kind).collect::<Vec<_>>()
    );
    assert!(
        env.fly.violations().is_empty(),
        "{tier}: {:?}",
        env.fly.violations()
    );
    env.assert_spec_clean();
}

#[tokio::test]
async fn hot_reserve_recycles_its_machines() {
    recycles("hot").await;
}

#[tokio::test]
async fn suspended_reserve_recycles_its_machines() {
    recycles("suspended").await;
}

#[tokio::test]
async fn stopped_reserve_recycles_its_machines() {
    recycles("stopped").await;
}

/// A recycled reserve's machine is created without auto-destroy: when no reserve takes it back
/// after its session (here the reserve was switched off), the reaper destroys it rather than
/// leave it stopped for ever.
#[tokio::test]
async fn the_reaper_destroys_a_recycled_machine_no_reserve_takes_back() {
    let mut opts = Options::default();
    opts.fly_warm.session_duration = Some(Duration::from_millis(1500));
    opts.env
        .push(("BOTDISPATCH_RESERVE_RECYCLE", "true".to_owned()));
    let a = warm_env("hot", 1, opts).await;
    let machine = wait_reserve_ready(&a, 1).await.remove(0);
    let (status, resp) = a.post_start("alice", start_body()).await;
    assert_eq!(status, StatusCode::OK, "{resp}");
    assert_eq!(resp["startType"], "hot", "{resp}");
    // GET /capacity counts the machine in its session as part of the reserve.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(1);
    loop {
        let (status, capacity) = a
            .call("GET", "/capacity", Some(&a.token("ops")), None)
            .await;
        assert_eq!(status, StatusCode::OK, "{capacity}");
        let reserve = &capacity["agents"]["default"]["reserve"];
        assert_eq!(reserve["recycle"], true, "{capacity}");
        if reserve["inSession"] == 1 {
            assert_eq!(reserve["size"], 1, "{capacity}");
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "{capacity}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The recycling dispatcher goes; its successor keeps no reserve.
    a.app.shutdown.cancel();
    let mut opts = Options::default();
    opts.shared = Some((a.fly.clone(), a.daily.clone()));
    opts.env.push(("BOTDISPATCH_HANDOFF", "http".to_owned()));
    let b = TestEnv::with(opts).await;
    // While the session runs, the machine is a live session's: left alone.
    let report = b.app.reaper.pass().await;
    assert_eq!(report.spent, 0, "{report:?}");
    assert!(b
        .fly
        .machine(&machine.id)
        .is_some_and(|m| m.state == "started"));
    // Its session over, the machine stops (no auto-destroy) and the reaper destroys it.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while b
        .fly
        .machine(&machine.id)
        .is_some_and(|m| m.state != "stopped")
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{:#?}",
            b.fly.machine(&machine.id)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let report = b.app.reaper.pass().await;
    assert_eq!(report.spent, 1, "{report:?}");
    assert_eq!(
        b.fly.machine(&machine.id).map(|m| m.state),
        Some("destroyed".to_owned())
    );
    assert!(b.fly.violations().is_empty(), "{:?}", b.fly.violations());
}

/// A pass never waits for a whole reserve's creates (held to Fly's 1 create/s per app): it
/// creates what the limit allows now and leaves the other slots to later passes, so recycling
/// and readiness keep their cadence while a large reserve fills, and every machine's name
/// comes from a fresh listing. Before, one pass filling 12 slots took 8.5 s.
#[tokio::test]
async fn a_pass_creates_what_the_create_limit_allows_and_moves_on() {
    // Fly's documented limits on; no background passes: this test runs them.
    let env = manual_reserve_env("hot", 12, Options::default()).await;
    let reserves = env.app.sessions.reserves().unwrap().clone();
    let t = tokio::time::Instant::now();
    let report = reserves.replenish().await;
    let took = t.elapsed();
    println!("first pass: {report:?} in {took:?}");
    assert!(took < Duration::from_secs(4), "{report:?} took {took:?}");
    // Fly's create burst (3), and the other slots left for later passes without waiting.
    assert!((3..12).contains(&report.created), "{report:?}");
    assert_eq!(report.created + report.throttled, 12, "{report:?}");
    // Later passes fill the rest, and make the first machines ready meanwhile.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while ready_reserve(&env).len() < 12 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{} of 12 ready",
            ready_reserve(&env).len()
        );
        reserves.replenish().await;
    }
    assert_eq!(env.fly.live_machines().len(), 12);
}

/// The room pool is as large as the machine reserve (before, at most 20 rooms): a burst that
/// claims every ready machine finds a room created ahead for each, and creates no room while
/// the client waits. Daily's budget (20 requests/s for every call) is the ceiling of rooms
/// created on demand; a pool filled while the reserve was idle is what carries a burst past it.
#[tokio::test]
async fn a_burst_that_claims_the_whole_reserve_finds_a_pool_room_for_every_start() {
    const SIZE: usize = 30;
    let env = warm_env("hot", SIZE as u32, Options::default()).await;
    wait_reserve_ready(&env, SIZE).await;
    let pool_rooms = || {
        env.daily
            .rooms()
            .iter()
            .filter(|r| r.name.starts_with("bd-default-p"))
            .count()
    };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while pool_rooms() < SIZE {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{} pool rooms of {SIZE}",
            pool_rooms()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // More starts than the old pool's 20 rooms, a few less than the reserve: a claim that
    // meets a machine another claim took first moves on to the next.
    let users: Vec<String> = (0..SIZE - 5).map(|i| format!("user{i}")).collect();
    let answers = join_all(users.iter().map(|u| env.post_start(u, start_body()))).await;
    for (status, resp) in &answers {
        assert_eq!(*status, StatusCode::OK, "{resp}");
        assert_eq!(resp["startType"], "hot", "{resp}");
        let room = resp["dailyRoom"].as_str().unwrap();
        assert!(room.contains("/bd-default-p"), "a pool room: {room}");
    }
    let rooms: BTreeSet<&str> = answers
        .iter()
        .map(|(_, resp)| resp["dailyRoom"].as_str().unwrap())
        .collect();
    assert_eq!(rooms.len(), SIZE - 5, "one room per session");
    // No session-named room was created for the burst (the pool refills with new names).
    assert!(
        env.daily
            .rooms()
            .iter()
            .all(|r| r.name.starts_with("bd-default-p")),
        "{:?}",
        env.daily.rooms()
    );
}

/// A recycled reserve's machine that fails during its session (flyd leaves it `failed`, and
/// only a stopped machine can be started again) is destroyed and its slot filled anew; before,
/// each pass tried to recycle it, was refused, and the slot stayed taken for good.
#[tokio::test]
async fn a_recycled_machine_that_failed_is_replaced() {
    let mut opts = Options::default();
    opts.env
        .push(("BOTDISPATCH_RESERVE_RECYCLE", "true".to_owned()));
    let env = warm_env("hot", 1, opts).await;
    let first = wait_reserve_ready(&env, 1).await.remove(0);
    assert_eq!(start_as(&env, "alice", "hot").await, first.id);

    assert!(env.fly.fail_machine(&first.id));
    assert!(
        env.fly
            .wait_for_state(&first.id, "destroyed", Duration::from_secs(10))
            .await,
        "{:#?}",
        env.fly.machine(&first.id)
    );
    let replacement = wait_reserve_ready(&env, 1).await.remove(0);
    assert_ne!(replacement.id, first.id);
    assert_eq!(start_as(&env, "bob", "hot").await, replacement.id);
    assert_no_violations(&env);
}

/// A stopped-tier machine is claimable as soon as the pass that recycled it is over: it needs
/// no boot, so claims need not wait for the next listing to see it (before, a burst arriving
/// within that second went cold).
#[tokio::test]
async fn a_recycled_stopped_machine_is_claimable_at_once() {
    let mut opts = Options::default();
    opts.fly_warm.session_duration = Some(Duration::from_millis(200));
    opts.env.extend([
        ("BOTDISPATCH_RESERVE_RECYCLE", "true".to_owned()),
        ("BOTDISPATCH_OUTBOUND_RATE_SCALE", "0".to_owned()),
    ]);
    // No background passes: this test runs them.
    let env = manual_reserve_env("stopped", 1, opts).await;
    let reserves = env.app.sessions.reserves().unwrap().clone();
    while ready_reserve(&env).is_empty() {
        reserves.replenish().await;
    }
    reserves.replenish().await;
    let handle = start_as(&env, "alice", "stopped").await;
    assert!(
        env.fly
            .wait_for_state(&handle, "stopped", Duration::from_secs(10))
            .await
    );

    let report = reserves.replenish().await;
    assert_eq!(report.recycled, 1, "{report:?}");
    assert_eq!(start_as(&env, "bob", "stopped").await, handle);
    assert_no_violations(&env);
}

/// Claims that find the last listing empty read the reserve again at most once between them:
/// a burst of starts on a drained reserve shares one listing. Before, every claim listed for
/// itself, and at Fly's 1 list a second per app a burst queued for as many seconds as it had
/// starts (in the bench, a 25 s stall with every start waiting).
#[tokio::test]
async fn a_burst_on_a_drained_reserve_shares_one_listing() {
    let mut opts = Options::default();
    opts.env.extend([
        ("BOTDISPATCH_OUTBOUND_RATE_SCALE", "0".to_owned()),
        // Admission's count is read once.
        ("BOTDISPATCH_CAPACITY_CACHE_MS", "60000".to_owned()),
    ]);
    // No background passes: nothing lists but the claims.
    let env = manual_reserve_env("hot", 1, opts).await;
    // The last listing is over a second old when the burst comes.
    env.app
        .sessions
        .reserves()
        .unwrap()
        .machines()
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let listings = || {
        env.fly
            .requests()
            .iter()
            .filter(|r| r.method == "GET" && r.path == format!("/v1/apps/{FLY_APP}/machines"))
            .count()
    };
    let before = listings();
    let users: Vec<String> = (0..10).map(|i| format!("user{i}")).collect();
    let answers = join_all(users.iter().map(|u| env.post_start(u, start_body()))).await;
    for (status, resp) in &answers {
        assert_eq!(*status, StatusCode::OK, "{resp}");
        assert_eq!(resp["startType"], "cold", "{resp}");
    }
    // One listing for the ten claims (two if the burst outlasts a listing's second on a slow
    // machine), and admission's count of the running sessions (one listing of its own).
    let during = listings() - before;
    assert!(
        during <= 3,
        "{during} listings: {:#?}",
        &env.fly.requests()[..]
    );
}
