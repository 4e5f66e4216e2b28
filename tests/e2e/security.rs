//! What an attacker holding one leaked secret, or a forged id, can do: nothing beyond the
//! sessions that secret was for. Session ids are verified, handles validated, machines read
//! and checked before any action; errors reveal no upstream text.

use botdispatch::session_id::{new_session_key, SessionIds};
use hmac::{Hmac, Mac};
use providers::testkit::fly_fake::FakeFly;
use reqwest::StatusCode;
use serde_json::json;
use sha2::Sha256;
use std::time::Duration;

use crate::common::*;

fn forge(key: &[u8], session_key: &str, handle: &str, owner: &str) -> String {
    SessionIds::new(vec![key.to_vec()], "fly", "default").encode(session_key, handle, owner)
}

/// Requests of the Fly fake after `from` that change anything.
fn mutating_since(env: &TestEnv, from: usize) -> Vec<String> {
    env.fly.requests()[from..]
        .iter()
        .filter(|r| r.method != "GET")
        .map(|r| format!("{} {}", r.method, r.path))
        .collect()
}

/// Waits until a start's background label update reached the machine.
async fn confirmed(fly: &FakeFly, machine: &str) {
    let path = format!("/v1/apps/{FLY_APP}/machines/{machine}/metadata");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !fly
        .requests()
        .iter()
        .any(|r| r.method == "PATCH" && r.path == path)
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{machine} never confirmed"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn assert_not_found_and_untouched(env: &TestEnv, id: &str, why: &str) {
    let before = env.fly.requests().len();
    let url = format!("/sessions/{id}");
    let alice = env.token("alice");
    let (status, err) = env.call("GET", &url, Some(&alice), None).await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{why}: {err}");
    let (status, err) = env.call("DELETE", &url, Some(&alice), None).await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{why}: {err}");
    assert_eq!(mutating_since(env, before), Vec::<String>::new(), "{why}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_session_ids_are_404_and_change_nothing() {
    let mut fly = Options::default().fly;
    fly.apps.push("other-app".into());
    let (fly, daily) = start_fakes(&fly).await;
    let env_with = |deployment: &str| {
        let mut opts = Options::default();
        opts.shared = Some((fly.clone(), daily.clone()));
        opts.env
            .push(("BOTDISPATCH_DEPLOYMENT", deployment.to_owned()));
        TestEnv::with(opts)
    };
    let env = env_with("default").await;
    let staging = env_with("staging").await;

    // A machine in another app, one of another deployment, one that is not ours at all, and
    // bob's session.
    let other_app = env
        .http
        .post(format!("{}/apps/other-app/machines", fly.base_url()))
        .bearer_auth(FLY_TOKEN)
        .json(&json!({"name": "victim", "config": {"image": "nginx"}}))
        .send()
        .await
        .unwrap()
        .json::<serde_json::Value>()
        .await
        .unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let (status, resp) = staging.post_start("alice", start_body()).await;
    assert_eq!(status, StatusCode::OK, "{resp}");
    let staging_machine = session_handle(resp["sessionId"].as_str().unwrap());
    let foreign = env
        .http
        .post(format!("{}/apps/{FLY_APP}/machines", fly.base_url()))
        .bearer_auth(FLY_TOKEN)
        .json(&json!({"name": "someone-elses", "config": {"image": "nginx"}}))
        .send()
        .await
        .unwrap()
        .json::<serde_json::Value>()
        .await
        .unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let (status, resp) = env.post_start("bob", start_body()).await;
    assert_eq!(status, StatusCode::OK, "{resp}");
    let bobs_machine = session_handle(resp["sessionId"].as_str().unwrap());

    // Both starts patch their machine's labels once they answered (off the critical path):
    // let that land, so the window below sees only what the forged ids cause.
    for machine in [&staging_machine, &bobs_machine] {
        confirmed(&fly, machine).await;
    }

    let key = SESSION_SECRET.as_bytes();
    let fresh = new_session_key();
    let cases = [
        (
            format!("../../other-app/machines/{other_app}"),
            "a traversal handle",
        ),
        (format!("{other_app}/../../x"), "dot segments"),
        (format!("{other_app}%2F..%2F"), "encoded separators"),
        (staging_machine.clone(), "another deployment's machine"),
        (foreign.clone(), "a machine that is not botdispatch's"),
        (bobs_machine.clone(), "a machine of another session"),
    ];
    for (handle, why) in &cases {
        assert_not_found_and_untouched(&env, &forge(key, &fresh, handle, "alice"), why).await;
    }
    // Traversal handles never reach the provider at all.
    let before = fly.requests().len();
    let id = forge(key, &fresh, &cases[0].0, "alice");
    env.call(
        "GET",
        &format!("/sessions/{id}"),
        Some(&env.token("alice")),
        None,
    )
    .await;
    assert_eq!(
        fly.requests().len(),
        before,
        "an invalid handle is refused before any call"
    );

    for id in [&other_app, &staging_machine, &foreign, &bobs_machine] {
        assert_eq!(fly.machine(id).unwrap().state, "started", "{id} untouched");
    }
}

#[tokio::test]
async fn session_ids_are_not_derived_from_the_jwt_secret() {
    // Whoever can mint tokens must not be able to sign session ids: without a session secret
    // the key is random (development), never derived from the JWT secret.
    let mut opts = Options::default();
    opts.env.push(("BOTDISPATCH_SESSION_SECRET", String::new()));
    let env = TestEnv::with(opts).await;
    let (status, resp) = env.post_start("bob", start_body()).await;
    assert_eq!(status, StatusCode::OK, "{resp}");
    let id = resp["sessionId"].as_str().unwrap();
    let mut mac = Hmac::<Sha256>::new_from_slice(JWT_SECRET.as_bytes()).unwrap();
    mac.update(b"botdispatch session ids v1");
    let derived = mac.finalize().into_bytes();
    let forged = forge(&derived, session_key(id), &session_handle(id), "alice");
    let (status, _) = env
        .call(
            "GET",
            &format!("/sessions/{forged}"),
            Some(&env.token("alice")),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn session_secrets_rotate_without_orphaning_live_sessions() {
    let old = "old-session-secret-0123456789abcdef0123";
    let new = "new-session-secret-0123456789abcdef0123";
    let (fly, daily) = start_fakes(&Options::default().fly).await;
    let with_secrets = |secrets: String| {
        let mut opts = Options::default();
        opts.shared = Some((fly.clone(), daily.clone()));
        opts.env.push(("BOTDISPATCH_SESSION_SECRET", secrets));
        TestEnv::with(opts)
    };
    let before = with_secrets(old.into()).await;
    let during = with_secrets(format!("{new},{old}")).await;
    let after = with_secrets(new.into()).await;

    let (_, resp) = before.post_start("alice", start_body()).await;
    let old_url = resp["statusUrl"].as_str().unwrap().to_owned();
    let (status, view) = during.get_session("alice", &old_url).await;
    assert_eq!(
        status,
        StatusCode::OK,
        "the old secret still verifies: {view}"
    );
    let (_, resp) = during.post_start("alice", start_body()).await;
    let new_url = resp["statusUrl"].as_str().unwrap().to_owned();
    let (status, _) = after.get_session("alice", &new_url).await;
    assert_eq!(status, StatusCode::OK, "the first secret signs");
    let (status, _) = before.get_session("alice", &new_url).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (status, _) = after.get_session("alice", &old_url).await;
    assert_eq!(
        status,
        StatusCode::NOT_FOUND,
        "a retired secret verifies nothing"
    );
}

#[tokio::test]
async fn provider_error_text_never_reaches_clients() {
    let env = TestEnv::start().await;
    env.fly.set_fault(
        providers::testkit::fly_fake::FlyOp::Create,
        providers::testkit::Fault::Status {
            status: 422,
            retry_after: None,
        },
        1,
    );
    let resp = env
        .http
        .post(format!("{}/start", env.base))
        .bearer_auth(env.token("alice"))
        .json(&start_body())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::BAD_GATEWAY);
    let request_id = resp.headers()["x-request-id"].to_str().unwrap().to_owned();
    let err: serde_json::Value = resp.json().await.unwrap();
    let detail = err["detail"].as_str().unwrap();
    assert_eq!(err["error"], "provider_error");
    assert!(detail.contains(&request_id), "{detail}");
    assert!(
        !detail.contains("422") && !detail.contains("HTTP") && !detail.contains("fault"),
        "no upstream text: {detail}"
    );
}

#[tokio::test]
async fn readiness_names_only_the_failing_component() {
    let mut opts = Options::default();
    opts.env.push(("FLY_API_TOKEN", "wrong-token".into()));
    let env = TestEnv::with(opts).await;
    let (status, err) = env.call("GET", "/readyz", None, None).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{err}");
    assert_eq!(err["error"], "not_ready");
    let detail = err["detail"].as_str().unwrap();
    assert!(detail.contains("provider"), "{detail}");
    assert!(
        !detail.contains("401") && !detail.contains("HTTP") && !detail.contains("token"),
        "nothing of the provider's answer: {detail}"
    );
}

#[tokio::test]
async fn client_request_ids_are_echoed_only_when_safe() {
    let env = TestEnv::start().await;
    let echoed = |value: &'static str| {
        let http = env.http.clone();
        let url = format!("{}/healthz", env.base);
        async move {
            let resp = http
                .get(url)
                .header("x-request-id", value)
                .send()
                .await
                .unwrap();
            resp.headers()["x-request-id"].to_str().unwrap().to_owned()
        }
    };
    assert_eq!(echoed("req-123_ABC.x").await, "req-123_ABC.x");
    for hostile in [
        "'; DROP TABLE sessions; --",
        "<script>alert(1)</script>",
        "a b",
        "xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx",
    ] {
        let id = echoed(hostile).await;
        assert_ne!(id, hostile);
        assert_eq!(id.len(), 36, "a generated UUID instead: {id}");
    }
}

#[tokio::test]
async fn a_development_config_refuses_a_public_address() {
    let mut d = Dispatcher::spawn(&[("BOTDISPATCH_LISTEN", "0.0.0.0:0")]);
    let status = tokio::task::spawn_blocking(move || {
        let status = d.wait_exit(std::time::Duration::from_secs(20));
        (status, d.output())
    })
    .await
    .unwrap();
    assert!(!status.0.success(), "{}", status.1);
    assert!(status.1.contains("BOTDISPATCH_JWT_SECRET"), "{}", status.1);
}

#[test]
fn the_dispatcher_image_runs_in_production_mode() {
    let dockerfile = include_str!("../../Dockerfile.dispatcher");
    assert!(
        dockerfile
            .lines()
            .any(|l| l.trim_start().starts_with("ENV") && l.contains("APP_ENV=production")),
        "Dockerfile.dispatcher sets APP_ENV=production"
    );
}
