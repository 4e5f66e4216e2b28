//! The embedded default as a newcomer runs it: the real binary with no configuration at all
//! starts a real local bot process from the printed curl command's token, and stops it.

use std::process::Command;
use std::time::{Duration, Instant};

use crate::common::{get_json, nix_kill, session_key, Dispatcher};

use reqwest::StatusCode;
use serde_json::{json, Value};

#[tokio::test]
async fn embedded_default_runs_a_real_local_bot_and_stops_it() {
    let mut d = Dispatcher::spawn(&[]);
    let (base, token) = d.wait_dev_banner();
    let url = format!("{base}/start");
    let http = reqwest::Client::new();

    let resp = http
        .post(&url)
        .bearer_auth(&token)
        .json(&json!({"body": {"hello": "world"}}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let started: Value = resp.json().await.unwrap();
    assert_eq!(started["status"], "ready");
    assert!(started["dailyRoom"]
        .as_str()
        .unwrap()
        .starts_with("https://local-rooms.invalid/bd-"));
    let key = session_key(started["sessionId"].as_str().unwrap()).to_owned();
    let room = started["dailyRoom"].as_str().unwrap();
    // The embedded default keeps a hot reserve; right after start-up it may still be filling.
    let start_type = started["startType"].as_str().unwrap();
    assert!(["hot", "cold"].contains(&start_type), "{started}");

    // The bot is a real process that got the session over HTTP (POST /bot).
    d.wait_for(
        &format!("[local-bot {key}] started: DAILY_ROOM_URL={room}"),
        Duration::from_secs(10),
    );
    d.wait_for(
        &format!("[local-bot {key}] BOTDISPATCH_BODY={{\"hello\":\"world\"}}"),
        Duration::from_secs(5),
    );
    let status_url = format!("{base}{}", started["statusUrl"].as_str().unwrap());
    let view = get_json(&http, &status_url, &token).await;
    assert_eq!(view["status"], "ready", "{view}");
    assert_eq!(view["provider"], "local");
    assert_eq!(view["startType"], start_type, "{view}");

    let resp = http
        .delete(&status_url)
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    d.wait_for(
        &format!("[local-bot {key}] SIGTERM: leaving the room"),
        Duration::from_secs(10),
    );
    let view = get_json(&http, &status_url, &token).await;
    assert_eq!(view["status"], "ended", "{view}");

    // The tokens never reach the output (the bot prints only their length).
    let output = d.output();
    let user_token = started["dailyToken"].as_str().unwrap();
    assert!(
        !output.contains(user_token),
        "user token leaked into the output"
    );

    // SIGTERM: a clean exit.
    nix_kill(d.child.id(), "TERM");
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        if let Some(status) = d.child.try_wait().unwrap() {
            assert!(status.success(), "exit status {status}");
            break;
        }
        assert!(Instant::now() < deadline, "did not exit on SIGTERM");
        std::thread::sleep(Duration::from_millis(50));
    }
    d.wait_for("botdispatch stopped", Duration::from_secs(2));
}

#[tokio::test]
async fn local_bots_are_stopped_when_the_dispatcher_shuts_down() {
    let mut d = Dispatcher::spawn(&[]);
    let (base, token) = d.wait_dev_banner();
    let url = format!("{base}/start");
    let resp = reqwest::Client::new()
        .post(&url)
        .bearer_auth(&token)
        .json(&json!({}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let started: Value = resp.json().await.unwrap();
    let key = session_key(started["sessionId"].as_str().unwrap()).to_owned();
    d.wait_for(
        &format!("[local-bot {key}] started"),
        Duration::from_secs(10),
    );
    nix_kill(d.child.id(), "TERM");
    d.wait_for(
        &format!("[local-bot {key}] SIGTERM: leaving the room"),
        Duration::from_secs(10),
    );
    let deadline = Instant::now() + Duration::from_secs(15);
    while d.child.try_wait().unwrap().is_none() {
        assert!(Instant::now() < deadline, "did not exit on SIGTERM");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn token_command_mints_a_token_for_the_configured_secret() {
    let out = Command::new(env!("CARGO_BIN_EXE_botdispatch"))
        .args(["token", "--sub", "alice", "--ttl", "2h", "--scope", "admin"])
        .env_clear()
        .env("BOTDISPATCH_JWT_SECRET", crate::common::JWT_SECRET)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let token = String::from_utf8(out.stdout).unwrap();
    let claims = crate::common::decode_hs256(token.trim(), crate::common::JWT_SECRET);
    assert_eq!(claims["sub"], "alice");
    assert_eq!(claims["scope"], "admin");
    let ttl = claims["exp"].as_i64().unwrap() - claims["iat"].as_i64().unwrap();
    assert_eq!(ttl, 7200);

    // Without a secret it explains what to set, and fails.
    let out = Command::new(env!("CARGO_BIN_EXE_botdispatch"))
        .args(["token", "--sub", "alice"])
        .env_clear()
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("BOTDISPATCH_JWT_SECRET"));
}

#[test]
fn bad_configuration_refuses_to_start_naming_the_key() {
    let out = Command::new(env!("CARGO_BIN_EXE_botdispatch"))
        .env_clear()
        .env("BOTDISPATCH_PROVIDER", "fly")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("FLY_API_TOKEN"), "{stderr}");

    let out = Command::new(env!("CARGO_BIN_EXE_botdispatch"))
        .env_clear()
        .env("APP_ENV", "production")
        .env("BOTDISPATCH_JWT_SECRET", crate::common::JWT_SECRET)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("refused when APP_ENV=production"),
        "{stderr}"
    );
}

/// The tour's promise: once the embedded default's hot reserve is ready, a start takes a bot
/// that already booted (`startType: hot`) and hands it the session at once.
#[tokio::test]
async fn embedded_default_serves_a_start_from_its_hot_reserve() {
    let mut d = Dispatcher::spawn(&[("BOTDISPATCH_RESERVE_INTERVAL_MS", "100")]);
    let (base, token) = d.wait_dev_banner();
    d.wait_for(
        "keeps 2 bots booted and waiting (a hot reserve)",
        Duration::from_secs(5),
    );
    let http = reqwest::Client::new();
    // Ready once both bots answer /readyz (their start-up takes a second).
    let ready = "botdispatch_reserve_machines{agent=\"default\",tier=\"hot\",state=\"ready\"} 2";
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let metrics = http
            .get(format!("{base}/metrics"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        if metrics.contains(ready) {
            break;
        }
        assert!(Instant::now() < deadline, "the hot reserve never got ready");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let t = Instant::now();
    let resp = http
        .post(format!("{base}/start"))
        .bearer_auth(&token)
        .json(&json!({"body": {"warm": true}}))
        .send()
        .await
        .unwrap();
    let took = t.elapsed();
    assert_eq!(resp.status(), StatusCode::OK);
    let started: Value = resp.json().await.unwrap();
    assert_eq!(started["startType"], "hot", "{started}");
    let key = session_key(started["sessionId"].as_str().unwrap()).to_owned();
    d.wait_for(
        &format!("[local-bot {key}] BOTDISPATCH_BODY={{\"warm\":true}}"),
        Duration::from_secs(5),
    );
    // Far below the bot's own one-second start-up: it had booted already.
    assert!(took < Duration::from_millis(900), "hot start took {took:?}");
    // The bot got SIGTERM right after the handoff: it takes no other session.
    d.wait_for(
        "SIGTERM: no further sessions in this boot; the call goes on",
        Duration::from_secs(5),
    );
}
