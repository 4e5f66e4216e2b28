//! Hostile input: random bodies and tokens never panic or answer 5xx, and slow or oversized
//! requests are cut off.

use std::time::Duration;

use botdispatch::server::ServerLimits;
use proptest::prelude::*;
use proptest::strategy::ValueTree;
use proptest::test_runner::{Config as PropConfig, RngAlgorithm, TestRng, TestRunner};
use reqwest::StatusCode;
use serde_json::{json, Map, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::common::*;

fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(|n| json!(n)),
        any::<f64>()
            .prop_filter("finite", |f| f.is_finite())
            .prop_map(|f| json!(f)),
        ".{0,40}".prop_map(Value::String),
    ];
    leaf.prop_recursive(4, 64, 8, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            prop::collection::btree_map(".{0,12}", inner, 0..6)
                .prop_map(|m| Value::Object(m.into_iter().collect::<Map<_, _>>())),
        ]
    })
}

/// Start bodies: mostly the real field names with random values, sometimes anything at all.
fn start_body_strategy() -> impl Strategy<Value = Value> {
    let field = prop_oneof![
        Just("body"),
        Just("createDailyRoom"),
        Just("dailyRoomProperties"),
        Just("dailyMeetingTokenProperties"),
        Just("region"),
        Just("wait"),
        Just("unknown"),
    ];
    prop_oneof![
        3 => prop::collection::btree_map(field, json_value(), 0..4).prop_map(|m| {
            Value::Object(m.into_iter().map(|(k, v)| (k.to_owned(), v)).collect())
        }),
        1 => json_value(),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_start_bodies_get_clean_answers() {
    let mut opts = Options::default();
    opts.env
        .push(("BOTDISPATCH_OUTBOUND_RATE_SCALE", "0".into()));
    opts.env
        .push(("BOTDISPATCH_STARTS_PER_MINUTE_PER_CALLER", "0".into()));
    opts.env.push(("BOTDISPATCH_ALLOWED_REGIONS", "iad".into()));
    let env = TestEnv::with(opts).await;
    let token = env.token("fuzz");
    // Sampled rather than shrunk: each case is a real HTTP round trip, and a failure prints
    // the offending body in full.
    let mut runner = TestRunner::new_with_rng(
        PropConfig::default(),
        TestRng::deterministic_rng(RngAlgorithm::ChaCha),
    );
    let strategy = start_body_strategy();
    let bodies: Vec<Value> = (0..200)
        .map(|_| strategy.new_tree(&mut runner).unwrap().current())
        .collect();
    let mut seen = std::collections::BTreeMap::new();
    for body in bodies {
        let resp = env
            .http
            .post(format!("{}/start", env.base))
            .bearer_auth(&token)
            .json(&json!(body))
            .send()
            .await
            .unwrap();
        let status = resp.status();
        let text = resp.text().await.unwrap();
        let parsed: Value =
            serde_json::from_str(&text).unwrap_or_else(|_| panic!("non-JSON {status}: {text}"));
        assert!(
            status.is_success() || status.is_client_error(),
            "{status} for {body}: {parsed}"
        );
        if status.is_client_error() {
            assert!(
                parsed["error"].is_string() && parsed["detail"] == parsed["info"],
                "{parsed}"
            );
        }
        *seen.entry(status.as_u16()).or_insert(0) += 1;
    }
    println!("random /start bodies by status: {seen:?}");
    // Nothing was left running by the bodies that were valid.
    for m in env.fly.live_machines() {
        env.fly.exit_machine(&m.id, 0);
    }
}

#[tokio::test]
async fn random_authorization_headers_are_401() {
    let env = TestEnv::start().await;
    let header = prop_oneof![
        ".{0,200}",
        "Bearer [A-Za-z0-9_.-]{0,300}",
        "Bearer [A-Za-z0-9_-]{1,60}\\.[A-Za-z0-9_-]{1,200}\\.[A-Za-z0-9_-]{0,90}",
    ];
    let mut runner = TestRunner::new_with_rng(
        PropConfig::default(),
        TestRng::deterministic_rng(RngAlgorithm::ChaCha),
    );
    let headers: Vec<String> = (0..300)
        .map(|_| header.new_tree(&mut runner).unwrap().current())
        .collect();
    for h in headers {
        let Ok(value) = reqwest::header::HeaderValue::from_str(&h) else {
            continue;
        };
        let resp = env
            .http
            .post(format!("{}/start", env.base))
            .header("authorization", value)
            .json(&start_body())
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), StatusCode::UNAUTHORIZED, "{h:?}");
    }
    assert!(env.fly.requests().is_empty());
}

fn tight_limits() -> Options {
    let mut opts = Options::default();
    opts.limits = ServerLimits {
        header_read_timeout: Duration::from_millis(500),
        max_header_bytes: 16 * 1024,
        ..ServerLimits::default()
    };
    opts.env
        .push(("BOTDISPATCH_BODY_READ_TIMEOUT_SECS", "1".into()));
    opts
}

#[tokio::test]
async fn slow_headers_are_cut_off() {
    let env = TestEnv::with(tight_limits()).await;
    let mut stream = TcpStream::connect(env.base.trim_start_matches("http://"))
        .await
        .unwrap();
    stream
        .write_all(b"POST /start HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    let mut buf = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut buf)).await;
    assert!(
        read.is_ok(),
        "the server kept a slow client's connection open"
    );
    let text = String::from_utf8_lossy(&buf);
    assert!(
        text.is_empty() || text.starts_with("HTTP/1.1 408"),
        "{text}"
    );
}

#[tokio::test]
async fn slow_bodies_get_408() {
    let env = TestEnv::with(tight_limits()).await;
    let mut stream = TcpStream::connect(env.base.trim_start_matches("http://"))
        .await
        .unwrap();
    let head = format!(
        "POST /start HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {}\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{{\"body\":",
        env.token("slow")
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    let mut buf = vec![0u8; 4096];
    let n = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut buf))
        .await
        .expect("answered before the test's own timeout")
        .unwrap();
    let text = String::from_utf8_lossy(&buf[..n]);
    assert!(text.starts_with("HTTP/1.1 408"), "{text}");
    assert!(text.contains("request_timeout"), "{text}");
    assert!(env.fly.requests().is_empty());
}

#[tokio::test]
async fn oversized_headers_are_refused() {
    let env = TestEnv::with(tight_limits()).await;
    let resp = env
        .http
        .post(format!("{}/start", env.base))
        .bearer_auth(env.token("big"))
        .header("x-padding", "a".repeat(20 * 1024))
        .json(&start_body())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE);
    assert!(env.fly.requests().is_empty());
}

#[tokio::test]
async fn a_body_dripped_byte_by_byte_is_cut_off_at_the_overall_deadline() {
    // One byte every 400 ms never lets a per-frame timeout (1 s) fire; the overall deadline
    // for the body (1 s) does.
    let env = TestEnv::with(tight_limits()).await;
    let mut stream = TcpStream::connect(env.base.trim_start_matches("http://"))
        .await
        .unwrap();
    let head = format!(
        "POST /start HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {}\r\nContent-Type: application/json\r\nContent-Length: 40\r\n\r\n",
        env.token("drip")
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    let t0 = std::time::Instant::now();
    let (mut reader, mut writer) = stream.into_split();
    let drip = tokio::spawn(async move {
        for _ in 0..39 {
            if writer.write_all(b" ").await.is_err() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(400)).await;
        }
    });
    let mut buf = vec![0u8; 4096];
    let n = tokio::time::timeout(Duration::from_secs(10), reader.read(&mut buf))
        .await
        .expect("answered while the client was still dripping")
        .unwrap();
    let text = String::from_utf8_lossy(&buf[..n]);
    assert!(text.starts_with("HTTP/1.1 408"), "{text}");
    assert!(
        t0.elapsed() < Duration::from_secs(4),
        "cut off near the 1 s body deadline, not after the 16 s drip: {:?}",
        t0.elapsed()
    );
    drip.abort();
    assert!(env.fly.requests().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_client_cannot_hold_a_shutdown() {
    let mut d = Dispatcher::spawn(&[
        ("BOTDISPATCH_JWT_SECRET", JWT_SECRET),
        ("BOTDISPATCH_SHUTDOWN_GRACE_SECS", "1"),
        ("BOTDISPATCH_BODY_READ_TIMEOUT_SECS", "60"),
    ]);
    let base = d.wait_ready();
    let mut stream = TcpStream::connect(base.trim_start_matches("http://"))
        .await
        .unwrap();
    let head = format!(
        "POST /start HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {}\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n{{",
        hs_token("slow")
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    d.signal("TERM");
    let t0 = std::time::Instant::now();
    let (status, output) = tokio::task::spawn_blocking(move || {
        let status = d.wait_exit(Duration::from_secs(30));
        (status, d.output())
    })
    .await
    .unwrap();
    assert!(status.success(), "{output}");
    assert!(
        t0.elapsed() < Duration::from_secs(8),
        "the drain is bounded (grace 1 s): exited after {:?}\n{output}",
        t0.elapsed()
    );
    drop(stream);
}
