//! The cold path against the stateful Fly and Daily fakes: happy path, polling, ownership,
//! idempotent delete, every failure path leaving nothing behind, and start latency.

use std::time::{Duration, Instant};

use providers::testkit::fly_fake::FlyOp;
use providers::testkit::Fault;
use reqwest::StatusCode;
use serde_json::{json, Value};

use crate::common::*;

#[tokio::test]
async fn happy_path_starts_a_machine_with_the_bot_contract() {
    let env = TestEnv::start().await;
    let (status, resp) = env
        .post_start(
            "alice",
            json!({
                "body": {"hello": "world", "n": 1},
                "dailyRoomProperties": {"enable_recording": "cloud"},
                "dailyMeetingTokenProperties": {"user_name": "Ann"},
            }),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{resp}");
    assert_eq!(resp["status"], "ready");
    let session_id = resp["sessionId"].as_str().unwrap();
    let key = session_key(session_id);
    let room_name = format!("bd-default-{key}");
    let room_url = format!("https://{DAILY_DOMAIN}.daily.co/{room_name}");
    assert_eq!(resp["dailyRoom"], room_url);
    assert_eq!(resp["room_url"], room_url);
    assert_eq!(resp["dailyToken"], resp["token"]);
    assert_eq!(resp["statusUrl"], format!("/sessions/{session_id}"));

    // The user's token: self-signed with the Daily key, for this room, not an owner.
    let user = decode_hs256(resp["dailyToken"].as_str().unwrap(), DAILY_KEY);
    assert_eq!(user["r"], room_name);
    assert_eq!(user["d"], DAILY_DOMAIN_ID);
    assert_eq!(user["o"], false);
    assert_eq!(user["ejt"], true);
    assert_eq!(user["u"], "Ann");
    let exp = user["exp"].as_i64().unwrap();
    assert!((exp - (now() + 3600)).abs() < 10, "token exp {exp}");

    // The room: private, named after the session, expiring with it, ejecting at expiry.
    let rooms = env.daily.rooms();
    assert_eq!(rooms.len(), 1);
    assert_eq!(rooms[0].name, room_name);
    assert_eq!(rooms[0].privacy, "private");
    assert_eq!(rooms[0].properties["eject_at_room_exp"], true);
    assert_eq!(rooms[0].properties["enable_recording"], "cloud");
    assert!((rooms[0].properties["exp"].as_i64().unwrap() - exp).abs() <= 1);

    // The machine: started, auto-destroyed, never restarted, contract in env (not argv).
    let machines = env.fly.live_machines();
    assert_eq!(machines.len(), 1);
    let m = &machines[0];
    assert_eq!(m.state, "started");
    assert_eq!(m.name, room_name);
    let config = &m.config;
    assert_eq!(config["image"], BOT_IMAGE);
    assert_eq!(config["auto_destroy"], true);
    assert_eq!(config["restart"]["policy"], "no");
    assert_eq!(config["guest"]["cpus"], 1);
    assert_eq!(config["guest"]["memory_mb"], 1024);
    let env_vars = &config["env"];
    assert_eq!(env_vars["DAILY_ROOM_URL"], room_url);
    assert_eq!(env_vars["BOTDISPATCH_SESSION_ID"], key);
    let body: Value = serde_json::from_str(env_vars["BOTDISPATCH_BODY"].as_str().unwrap()).unwrap();
    assert_eq!(body, json!({"hello": "world", "n": 1}));
    let bot = decode_hs256(env_vars["DAILY_ROOM_TOKEN"].as_str().unwrap(), DAILY_KEY);
    assert_eq!(bot["r"], room_name);
    assert_eq!(bot["o"], true);
    assert!(config.get("init").is_none(), "no argv carries the contract");
    let meta = &config["metadata"];
    assert_eq!(meta["managed_by"], "botdispatch");
    assert_eq!(meta["botdispatch_session"], key);
    assert_eq!(meta["botdispatch_owner"], "alice");
    assert_eq!(meta["botdispatch_room"], room_name);
    // The machine launched with a provisional deadline just past the start timeout; once the
    // client has its answer the real one (the session's end) replaces it.
    let provisional: i64 = meta["botdispatch_deadline"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(provisional <= exp);
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let m = env.fly.machine(&m.id).unwrap();
        let label: i64 = m.config["metadata"]["botdispatch_deadline"]
            .as_str()
            .unwrap()
            .parse()
            .unwrap();
        if (label - exp).abs() <= 1 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "deadline never extended: {label} vs {exp}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // Status from the provider.
    let (status, view) = env
        .get_session("alice", resp["statusUrl"].as_str().unwrap())
        .await;
    assert_eq!(status, StatusCode::OK, "{view}");
    assert_eq!(view["status"], "ready");
    assert_eq!(view["provider"], "fly");
    assert_eq!(view["machineId"], m.id);
    assert_eq!(view["region"], m.region);
    assert!(view["readyAt"].is_string() && view["createdAt"].is_string());
    env.assert_spec_clean();
}

#[tokio::test]
async fn wait_false_answers_202_then_polls_to_ready() {
    let mut opts = Options::default();
    opts.fly.boot_delay = Duration::from_millis(400);
    let env = TestEnv::with(opts).await;
    let (status, resp) = env
        .post_start("alice", json!({"wait": false, "body": {}}))
        .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{resp}");
    assert_eq!(resp["status"], "starting");
    let url = resp["statusUrl"].as_str().unwrap();
    let (_, first) = env.get_session("alice", url).await;
    assert_eq!(first["status"], "starting", "{first}");
    let deadline = Instant::now() + Duration::from_secs(10);
    let view = loop {
        let (status, view) = env.get_session("alice", url).await;
        assert_eq!(status, StatusCode::OK);
        if view["status"] == "ready" {
            break view;
        }
        assert!(Instant::now() < deadline, "never became ready: {view}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(view["botStartSeconds"].as_f64().unwrap() >= 0.3, "{view}");

    // The bot exits by itself: the machine is auto-destroyed and the session reads ended.
    let machine = env.fly.live_machines().remove(0);
    env.fly.exit_machine(&machine.id, 0);
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let (_, view) = env.get_session("alice", url).await;
        if view["status"] == "ended" {
            assert!(view["endedAt"].is_string(), "{view}");
            break;
        }
        assert!(Instant::now() < deadline, "never ended: {view}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(env.fly.live_machines().len(), 0);
    env.assert_spec_clean();
}

#[tokio::test]
async fn sessions_are_owned_by_their_sub() {
    let env = TestEnv::start().await;
    let (_, resp) = env.post_start("alice", start_body()).await;
    let url = resp["statusUrl"].as_str().unwrap().to_owned();
    let bob = env.token("bob");

    let (status, err) = env.call("GET", &url, Some(&bob), None).await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{err}");
    assert_eq!(err["error"], "session_not_found");
    let (status, _) = env.call("DELETE", &url, Some(&bob), None).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(env.fly.live_machines().len(), 1, "bob stopped nothing");

    // An operator with the read-every-session scope may read it; a tampered id is not found
    // for anyone.
    let (status, _) = env.call("GET", &url, Some(&env.reader_token()), None).await;
    assert_eq!(status, StatusCode::OK);
    let tampered = format!("{}x", &url[..url.len() - 1]);
    let (status, _) = env.get_session("alice", &tampered).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (status, _) = env.get_session("alice", "/sessions/not-a-session").await;
    assert_eq!(status, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn delete_stops_the_machine_and_room_and_is_idempotent() {
    let env = TestEnv::start().await;
    let (_, resp) = env.post_start("alice", start_body()).await;
    let id = resp["sessionId"].as_str().unwrap();
    let url = format!("/sessions/{id}");
    let alice = env.token("alice");

    let (status, out) = env.call("DELETE", &url, Some(&alice), None).await;
    assert_eq!(status, StatusCode::OK, "{out}");
    assert_eq!(out["status"], "ended");
    assert_eq!(env.leftovers(), (0, 0));

    // Again, and through the Pipecat-Cloud-style alias.
    let (status, _) = env.call("DELETE", &url, Some(&alice), None).await;
    assert_eq!(status, StatusCode::OK);
    let alias = format!("/v1/agents/default/sessions/{id}");
    let (status, _) = env.call("DELETE", &alias, Some(&alice), None).await;
    assert_eq!(status, StatusCode::OK);
    let (status, view) = env.call("GET", &url, Some(&alice), None).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(view["status"], "ended", "{view}");
    env.assert_spec_clean();
}

#[tokio::test]
async fn provider_refusal_cleans_up_the_room() {
    let env = TestEnv::start().await;
    env.fly
        .set_fail_create(Some((422, "image not found".to_owned())));
    let (status, err) = env.post_start("alice", start_body()).await;
    assert_eq!(status, StatusCode::BAD_GATEWAY, "{err}");
    assert_eq!(err["error"], "provider_error");
    // What Fly said stays in the log; the client gets a stable text and the request id.
    assert!(
        !err["info"].as_str().unwrap().contains("image not found")
            && err["info"].as_str().unwrap().contains("request id"),
        "{err}"
    );
    assert_eq!(err["detail"], err["info"]);
    env.assert_nothing_left_within(Duration::ZERO).await;
}

#[tokio::test]
async fn machine_that_never_starts_times_out_with_504_and_is_destroyed() {
    let mut opts = Options::default();
    opts.env
        .push(("BOTDISPATCH_START_TIMEOUT_SECS", "2".into()));
    let env = TestEnv::with(opts).await;
    env.fly.set_never_start(true);
    let t = Instant::now();
    let (status, err) = env.post_start("alice", start_body()).await;
    assert_eq!(status, StatusCode::GATEWAY_TIMEOUT, "{err}");
    assert_eq!(err["error"], "start_timeout");
    assert!(t.elapsed() < Duration::from_secs(4), "{:?}", t.elapsed());
    env.assert_nothing_left_within(Duration::ZERO).await;
    assert_eq!(
        env.fly.machines().len(),
        1,
        "one machine was created and destroyed"
    );
    env.assert_spec_clean();
}

#[tokio::test]
async fn room_failure_destroys_the_machine() {
    let env = TestEnv::start().await;
    env.daily
        .set_fail_create(Some((500, "internal".to_owned())));
    let (status, err) = env.post_start("alice", start_body()).await;
    assert_eq!(status, StatusCode::BAD_GATEWAY, "{err}");
    assert_eq!(err["error"], "rooms_unavailable");
    env.assert_nothing_left_within(Duration::ZERO).await;
    assert_eq!(env.fly.machines().len(), 1);
}

#[tokio::test]
async fn a_brief_throttle_is_retried_and_absorbed() {
    let env = TestEnv::start().await;
    env.fly.set_fault(
        FlyOp::Create,
        Fault::Status {
            status: 429,
            retry_after: Some(1),
        },
        2,
    );
    let (status, resp) = env.post_start("alice", start_body()).await;
    assert_eq!(status, StatusCode::OK, "{resp}");
    assert_eq!(env.fly.live_machines().len(), 1);
    let creates = env
        .fly
        .requests()
        .iter()
        .filter(|r| r.method == "POST" && r.path.ends_with("/machines"))
        .count();
    assert_eq!(
        creates, 3,
        "two throttled attempts, then the one that worked"
    );
}

#[tokio::test]
async fn throttling_longer_than_the_deadline_is_503_with_retry_after() {
    let env = TestEnv::start().await;
    env.fly.set_fault(
        FlyOp::Create,
        Fault::Status {
            status: 429,
            retry_after: Some(30),
        },
        100,
    );
    let t = Instant::now();
    let resp = env
        .http
        .post(format!("{}/start", env.base))
        .bearer_auth(env.token("alice"))
        .json(&start_body())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(resp.headers()["retry-after"], "30");
    let err: Value = resp.json().await.unwrap();
    assert_eq!(err["error"], "provider_throttled");
    assert!(
        t.elapsed() < Duration::from_secs(2),
        "no sleeping past the deadline"
    );
    env.assert_nothing_left_within(Duration::ZERO).await;
}

#[tokio::test]
async fn ghost_create_is_adopted_not_duplicated() {
    let env = TestEnv::start().await;
    env.fly
        .set_fault(FlyOp::Create, Fault::GhostCreate { status: 502 }, 1);
    let (status, resp) = env.post_start("alice", start_body()).await;
    assert_eq!(status, StatusCode::OK, "{resp}");
    assert_eq!(
        env.fly.machines().len(),
        1,
        "the ghost machine was adopted, not duplicated"
    );
    let machine = env.fly.live_machines().remove(0);
    let id = resp["sessionId"].as_str().unwrap();
    assert!(
        id.contains(&base64_url(&machine.id)),
        "the session points at the adopted machine"
    );
    env.assert_spec_clean();
}

#[tokio::test]
async fn a_persistent_provider_outage_fails_cleanly() {
    let mut opts = Options::default();
    opts.env
        .push(("BOTDISPATCH_START_TIMEOUT_SECS", "2".into()));
    let env = TestEnv::with(opts).await;
    env.fly.set_fault(
        FlyOp::Create,
        Fault::Status {
            status: 503,
            retry_after: None,
        },
        1000,
    );
    let (status, err) = env.post_start("alice", start_body()).await;
    assert!(
        status == StatusCode::BAD_GATEWAY || status == StatusCode::GATEWAY_TIMEOUT,
        "{status} {err}"
    );
    env.assert_nothing_left_within(Duration::from_secs(10))
        .await;
}

#[tokio::test]
async fn the_ghost_machines_of_a_failed_start_are_destroyed() {
    // Every create makes a machine but answers 503; the machines never start. The start
    // adopts the ghost, times out waiting for it, and destroys it and the room.
    let mut opts = Options::default();
    opts.env
        .push(("BOTDISPATCH_START_TIMEOUT_SECS", "2".into()));
    let env = TestEnv::with(opts).await;
    env.fly.set_never_start(true);
    env.fly
        .set_fault(FlyOp::Create, Fault::GhostCreate { status: 503 }, 1000);
    let (status, err) = env.post_start("alice", start_body()).await;
    assert!(
        status == StatusCode::BAD_GATEWAY || status == StatusCode::GATEWAY_TIMEOUT,
        "{status} {err}"
    );
    assert!(!env.fly.machines().is_empty(), "a ghost machine was made");
    env.assert_nothing_left_within(Duration::from_secs(10))
        .await;
}

fn base64_url(s: &str) -> String {
    use base64::Engine;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(s)
}

#[tokio::test]
async fn client_disconnect_mid_start_leaves_nothing() {
    let mut opts = Options::default();
    opts.fly.boot_delay = Duration::from_millis(1500);
    let env = TestEnv::with(opts).await;
    let result = env
        .http
        .post(format!("{}/start", env.base))
        .bearer_auth(env.token("alice"))
        .json(&start_body())
        .timeout(Duration::from_millis(400))
        .send()
        .await;
    assert!(result.unwrap_err().is_timeout());
    // The machine was created and was booting when the client left.
    env.assert_nothing_left_within(Duration::from_secs(5)).await;
    assert_eq!(env.fly.machines().len(), 1);
}

#[tokio::test]
async fn agents_are_chosen_by_path_and_limited_by_scope() {
    let mut opts = Options::default();
    opts.toml = r#"
[agents.support]
image = "registry.fly.io/support-bot:v2"
cmd = ["python", "bot.py"]
env = { VOICE = "calm" }
guest = { cpus = 2, memory_mb = 2048, cpu_kind = "performance" }
"#
    .into();
    let env = TestEnv::with(opts).await;
    let alice = env.token("alice");
    let (status, resp) = env
        .call(
            "POST",
            "/v1/public/support/start",
            Some(&alice),
            Some(start_body()),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{resp}");
    let m = env.fly.live_machines().remove(0);
    assert_eq!(m.config["image"], "registry.fly.io/support-bot:v2");
    assert_eq!(m.config["init"]["cmd"], json!(["python", "bot.py"]));
    assert_eq!(m.config["env"]["VOICE"], "calm");
    assert_eq!(
        m.config["guest"],
        json!({"cpus": 2, "memory_mb": 2048, "cpu_kind": "performance"})
    );
    assert_eq!(m.config["metadata"]["botdispatch_agent"], "support");

    let (status, err) = env
        .call(
            "POST",
            "/v1/public/nope/start",
            Some(&alice),
            Some(start_body()),
        )
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(err["error"], "unknown_agent");

    let scoped = env
        .app
        .auth
        .mint("carol", Duration::from_secs(60), Some("agent:default"))
        .unwrap();
    let (status, err) = env
        .call(
            "POST",
            "/v1/public/support/start",
            Some(&scoped),
            Some(start_body()),
        )
        .await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{err}");
    assert_eq!(
        env.fly.machines().len(),
        1,
        "nothing created for the refused start"
    );
    env.assert_spec_clean();
}

/// Room creation and machine launch run concurrently: a start costs about
/// max(room latency, create + boot), not their sum.
#[tokio::test]
async fn start_latency_is_the_slower_of_room_and_machine_not_the_sum() {
    let boot = Duration::from_millis(900);
    let room = Duration::from_millis(700);
    let mut opts = Options::default();
    opts.fly.boot_delay = boot;
    opts.fly.starting_for = Duration::ZERO;
    let env = TestEnv::with(opts).await;
    env.daily.set_create_delay(room);
    // Warm the connection pools so the figure is the flow, not TCP set-up.
    env.call("GET", "/healthz", None, None).await;
    let t = Instant::now();
    let (status, resp) = env.post_start("alice", start_body()).await;
    let elapsed = t.elapsed();
    assert_eq!(status, StatusCode::OK, "{resp}");
    println!(
        "start latency: {} ms with boot delay B = {} ms and room latency R = {} ms (B + R = {} ms)",
        elapsed.as_millis(),
        boot.as_millis(),
        room.as_millis(),
        (boot + room).as_millis()
    );
    assert!(elapsed >= boot, "cannot be faster than the boot");
    assert!(
        elapsed < boot + room - Duration::from_millis(300),
        "{elapsed:?} looks sequential"
    );
}

/// `fly.max_open_waits`: at most that many `/wait` long-polls are open at once (each holds an
/// HTTP/1.1 connection, and its buffers, for the whole boot); a start beyond them reads its
/// machine every half second until it is started or a long-poll frees. Every start still
/// answers ready, each within a poll of its boot.
#[tokio::test]
async fn starts_beyond_the_open_wait_limit_poll_their_machine() {
    const STARTS: usize = 10;
    let boot = Duration::from_millis(1200);
    let mut opts = Options::default();
    opts.fly.boot_delay = boot;
    opts.fly.starting_for = Duration::ZERO;
    opts.env
        .push(("BOTDISPATCH_OUTBOUND_RATE_SCALE", "0".to_owned()));
    opts.env
        .push(("BOTDISPATCH_FLY_MAX_OPEN_WAITS", "3".to_owned()));
    let env = TestEnv::with(opts).await;
    let started = Instant::now();
    let answers = futures_util::future::join_all((0..STARTS).map(|i| {
        let env = &env;
        async move {
            let answer = env.post_start(&format!("user{i}"), start_body()).await;
            (answer, started.elapsed())
        }
    }))
    .await;
    for ((status, resp), _) in &answers {
        assert_eq!(*status, StatusCode::OK, "{resp}");
        assert_eq!(resp["status"], "ready", "{resp}");
    }
    let slowest = answers.iter().map(|(_, t)| *t).max().unwrap();
    println!(
        "{STARTS} starts, boot {boot:?}: open waits at most {}, slowest answer {slowest:?}",
        env.fly.open_waits_peak()
    );
    assert!(
        (1..=3).contains(&env.fly.open_waits_peak()),
        "open waits at most {}",
        env.fly.open_waits_peak()
    );
    let polls = env
        .fly
        .requests()
        .into_iter()
        .filter(|r| {
            r.method == "GET"
                && r.path.starts_with(&format!("/v1/apps/{FLY_APP}/machines/"))
                && !r.path.ends_with("/wait")
        })
        .count();
    assert!(polls >= STARTS - 3, "{polls} machine reads");
    // Within a poll (0.5 s) of the boot, with room for a slow machine.
    assert!(slowest < boot + Duration::from_millis(2500), "{slowest:?}");
    assert_eq!(env.fly.live_machines().len(), STARTS);
    env.assert_spec_clean();
}

/// Without rate limits (`outbound_rate_scale = 0`, load tests), a burst of starts is not a
/// connection to Fly per create: at most 64 calls are open at once besides the long-polls,
/// and every start still answers ready.
#[tokio::test]
async fn a_burst_of_creates_keeps_to_64_calls_open_at_once() {
    const STARTS: usize = 80;
    let mut opts = Options::default();
    opts.fly.boot_delay = Duration::from_millis(200);
    opts.fly.starting_for = Duration::ZERO;
    opts.env
        .push(("BOTDISPATCH_OUTBOUND_RATE_SCALE", "0".to_owned()));
    opts.env
        .push(("BOTDISPATCH_MAX_STARTS_IN_FLIGHT", STARTS.to_string()));
    let env = TestEnv::with(opts).await;
    env.fly.set_create_delay(Duration::from_millis(400));
    let users: Vec<String> = (0..STARTS).map(|i| format!("user{i}")).collect();
    let answers =
        futures_util::future::join_all(users.iter().map(|u| env.post_start(u, start_body()))).await;
    for (status, resp) in &answers {
        assert_eq!(*status, StatusCode::OK, "{resp}");
    }
    let peak = env.fly.open_calls_peak();
    println!("{STARTS} starts: at most {peak} calls open at Fly besides waits");
    assert!((32..=64).contains(&peak), "{peak} calls open at once");
    assert_eq!(env.fly.live_machines().len(), STARTS);
}

/// A start that reads its machine instead of long-polling learns of a failed boot at its next
/// read, not at the start deadline, and leaves nothing behind.
#[tokio::test]
async fn a_polled_machine_that_fails_fails_its_start_at_once() {
    let mut opts = Options::default();
    opts.fly.boot_delay = Duration::from_millis(100);
    opts.fly.starting_for = Duration::from_secs(30);
    opts.env
        .push(("BOTDISPATCH_FLY_MAX_OPEN_WAITS", "1".to_owned()));
    opts.env
        .push(("BOTDISPATCH_START_TIMEOUT_SECS", "20".to_owned()));
    let env = TestEnv::with(opts).await;
    // Alice's start holds the only long-poll while her machine boots.
    let mut alice = Box::pin(env.post_start("alice", start_body()));
    tokio::select! {
        answer = &mut alice => panic!("alice answered {answer:?}"),
        () = async {
            while env.fly.open_waits_peak() == 0 {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        } => {}
    }
    let alices = env.fly.machines()[0].id.clone();
    let starts = futures_util::future::join_all(
        ["bob", "carol"].map(|who| env.post_start(who, start_body())),
    );
    let fail = async {
        let t = Instant::now();
        loop {
            let booting: Vec<_> = env
                .fly
                .machines()
                .into_iter()
                .filter(|m| m.id != alices && m.state == "starting")
                .collect();
            if booting.len() == 2 {
                for m in booting {
                    assert!(env.fly.fail_machine(&m.id));
                }
                return Instant::now();
            }
            assert!(
                t.elapsed() < Duration::from_secs(10),
                "2 more machines booting"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    let (answers, failed_at) = tokio::join!(starts, fail);
    let answered_in = failed_at.elapsed();
    for (status, err) in &answers {
        assert_eq!(*status, StatusCode::BAD_GATEWAY, "{err}");
        assert_eq!(err["error"], "bot_start_failed", "{err}");
    }
    assert!(answered_in < Duration::from_secs(3), "{answered_in:?}");
    assert_eq!(env.fly.open_waits_peak(), 1);
    // Alice goes away: her start is cancelled and cleaned up like the failed ones.
    drop(alice);
    env.assert_nothing_left_within(Duration::from_secs(5)).await;
}
