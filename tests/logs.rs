//! Captures every log line of a full scenario (at TRACE, every crate) and checks that no secret
//! appears in it, and that lines about a session carry its id. A test binary of its own: the
//! subscriber is process-wide.

#[allow(dead_code)]
#[path = "e2e/common.rs"]
mod common;

use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use reqwest::StatusCode;
use serde_json::{json, Value};

#[derive(Clone, Default)]
struct Capture(Arc<Mutex<Vec<u8>>>);

impl Write for Capture {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_scenario_logs_no_secret_and_names_its_sessions() {
    let capture = Capture::default();
    let writer = capture.clone();
    tracing_subscriber::fmt()
        .json()
        .flatten_event(true)
        .with_current_span(true)
        .with_span_list(true)
        .with_max_level(tracing::Level::TRACE)
        .with_writer(move || writer.clone())
        .init();

    let env = TestEnv::start().await;
    let alice = env.token("alice");
    // Success, status, stop.
    let (status, started) = env
        .post_start("alice", json!({"body": {"hello": "world"}, "dailyMeetingTokenProperties": {"user_name": "Ann"}}))
        .await;
    assert_eq!(status, StatusCode::OK, "{started}");
    let url = started["statusUrl"].as_str().unwrap();
    let bot_token = env.fly.live_machines()[0].config["env"]["DAILY_ROOM_TOKEN"]
        .as_str()
        .unwrap()
        .to_owned();
    env.call("GET", url, Some(&alice), None).await;
    env.call("DELETE", url, Some(&alice), None).await;
    // A failed start (provider refusal) and a refused token.
    env.fly.set_fail_create(Some((422, "bad image".into())));
    let (status, failed) = env.post_start("alice", start_body()).await;
    assert_eq!(status, StatusCode::BAD_GATEWAY, "{failed}");
    let bad_token = format!("{alice}tampered");
    env.call("POST", "/start", Some(&bad_token), Some(start_body()))
        .await;
    tokio::time::sleep(Duration::from_millis(200)).await;

    let logs = String::from_utf8(capture.0.lock().unwrap().clone()).unwrap();
    assert!(logs.lines().count() > 20, "captured too little:\n{logs}");
    let secrets = [
        ("JWT secret", JWT_SECRET.to_owned()),
        ("Fly API token", FLY_TOKEN.to_owned()),
        ("Daily API key", DAILY_KEY.to_owned()),
        ("caller JWT", alice.clone()),
        (
            "caller JWT signature",
            alice.rsplit('.').next().unwrap().to_owned(),
        ),
        (
            "user meeting token",
            started["dailyToken"].as_str().unwrap().to_owned(),
        ),
        ("bot meeting token", bot_token.clone()),
        (
            "bot token signature",
            bot_token.rsplit('.').next().unwrap().to_owned(),
        ),
    ];
    for (what, secret) in &secrets {
        assert!(
            !logs.contains(secret.as_str()),
            "the {what} appears in the logs"
        );
    }

    // Every log line emitted inside a session's span carries the session id.
    let key = started["sessionId"]
        .as_str()
        .unwrap()
        .split('.')
        .next()
        .unwrap();
    let mut about_session = 0;
    for line in logs.lines() {
        let Ok(v) = serde_json::from_str::<Value>(line) else {
            continue;
        };
        let in_session_span = v["spans"].as_array().is_some_and(|spans| {
            spans
                .iter()
                .any(|s| ["start", "status", "stop"].contains(&s["name"].as_str().unwrap_or("")))
        });
        if in_session_span && line.contains(key) {
            about_session += 1;
        }
        if v["message"] == "session started" {
            assert_eq!(v["span"]["session.key"], key, "{line}");
            // The start runs in its own task, still under the request's span and id.
            assert!(
                v["spans"][0]["name"] == "request" && v["spans"][0]["request.id"].is_string(),
                "{line}"
            );
        }
    }
    assert!(about_session >= 2, "session lines: {about_session}\n{logs}");
    // One request span per request, with its request id.
    assert!(logs.contains("\"request.id\""), "{logs}");

    // What the provider said reaches the log once, under the request id the client was given,
    // and never the client.
    let detail = failed["detail"].as_str().unwrap();
    assert!(!detail.contains("bad image"), "{detail}");
    let request_id = detail
        .rsplit("request id ")
        .next()
        .unwrap()
        .trim_end_matches(')');
    let mentions: Vec<Value> = logs
        .lines()
        .filter(|l| l.contains("bad image"))
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    assert_eq!(mentions.len(), 1, "logged once: {mentions:#?}");
    assert_eq!(
        mentions[0]["spans"][0]["request.id"], request_id,
        "{:#}",
        mentions[0]
    );
    println!(
        "captured {} log lines; none holds a secret",
        logs.lines().count()
    );
}
