//! The Fly provider's requests checked by an independent implementation of the published spec:
//! the real Prism proxy (`prism proxy --errors`) between botdispatch and the stateful fake. A
//! request Prism rejects never reaches the fake and fails the start.

use std::time::{Duration, Instant};

use providers::testkit::prism::{fly_spec_path, PrismProxy};
use reqwest::StatusCode;
use serde_json::json;

use crate::common::*;

#[tokio::test]
async fn fly_requests_pass_prism_validation() {
    let fly_for_prism = providers::testkit::fly_fake::FakeFly::start(Options::default().fly).await;
    let upstream = fly_for_prism.root_url();
    // Never skipped: a test that cannot run must not read as passed. ./scripts/test installs
    // Prism from package-lock.json.
    let prism =
        tokio::task::spawn_blocking(move || PrismProxy::spawn(&fly_spec_path(), &upstream))
            .await
            .unwrap()
            .expect("Prism is not installed: run ./scripts/test (it runs `npm ci`, which installs @stoplight/prism-cli@5.14.2)");
    let mut opts = Options::default();
    opts.fly_url = Some(prism.url().to_owned());
    opts.env.push(("BOTDISPATCH_ALLOWED_REGIONS", "ord".into()));
    let env = TestEnv::with(opts).await;
    let fly = fly_for_prism;

    // Start with everything the create request can carry, poll, stop.
    let (status, resp) = env
        .post_start(
            "alice",
            json!({"body": {"a": 1}, "region": "ord", "wait": true}),
        )
        .await;
    assert_eq!(
        status,
        StatusCode::OK,
        "{resp}\nprism log:\n{}",
        prism.log()
    );
    let url = resp["statusUrl"].as_str().unwrap();
    let (status, view) = env.get_session("alice", url).await;
    assert_eq!(
        (status, view["status"].as_str()),
        (StatusCode::OK, Some("ready")),
        "{view}"
    );
    let (status, _) = env
        .call("DELETE", url, Some(&env.token("alice")), None)
        .await;
    assert_eq!(status, StatusCode::OK, "prism log:\n{}", prism.log());

    // A start whose machine never starts exercises /wait with its timeout and the clean-up.
    fly.set_never_start(true);
    let t = Instant::now();
    let mut opts = Options::default();
    opts.fly_url = Some(prism.url().to_owned());
    opts.env
        .push(("BOTDISPATCH_START_TIMEOUT_SECS", "1".into()));
    let short = TestEnv::with(opts).await;
    let (status, err) = short.post_start("alice", start_body()).await;
    assert_eq!(status, StatusCode::GATEWAY_TIMEOUT, "{err}");
    assert!(t.elapsed() < Duration::from_secs(10));

    // Readiness goes through Prism too.
    let (status, ready) = env.call("GET", "/readyz", None, None).await;
    assert_eq!(status, StatusCode::OK, "{ready}");

    assert!(
        fly.spec_violations().is_empty(),
        "{:?}",
        fly.spec_violations()
    );
    assert!(fly.live_machines().is_empty(), "{:?}", fly.live_machines());
    let methods: Vec<String> = fly
        .requests()
        .iter()
        .map(|r| format!("{} {}", r.method, r.path))
        .collect();
    for expected in [
        "POST /apps/bots/machines",
        "/wait",
        "POST /apps/bots/machines/",
        "DELETE /apps/bots/machines/",
    ] {
        assert!(
            methods.iter().any(|m| m.contains(expected)),
            "{expected} missing from {methods:?}"
        );
    }
    assert!(
        !prism.log().contains("UNPROCESSABLE_ENTITY"),
        "Prism rejected a request:\n{}",
        prism.log()
    );
}
