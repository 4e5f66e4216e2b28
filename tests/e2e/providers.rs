//! The same client scenario — start (wait), poll, stop, poll — against every provider, each
//! selected purely by configuration of the real binary, with its fake behind it.

use std::time::{Duration, Instant};

use providers::testkit::cloudrun_fake::{FakeCloudRun, FakeCloudRunConfig};
use providers::testkit::ecs_fake::{FakeEcs, FakeEcsConfig};
use reqwest::StatusCode;
use serde_json::{json, Value};

use crate::common::*;

/// Runs the scenario against a dispatcher process started with `env`; returns the machine
/// handle the session reported.
async fn scenario(provider: &str, env: Vec<(&'static str, String)>) -> String {
    let mut env = env;
    env.push(("BOTDISPATCH_LISTEN", "127.0.0.1:0".into()));
    env.push(("BOTDISPATCH_PROVIDER", provider.into()));
    let refs: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let mut d = Dispatcher::spawn(&refs);
    let base = tokio::task::block_in_place(|| d.wait_ready());
    let http = reqwest::Client::new();
    let token = hs_token("alice");
    let t = Instant::now();
    let resp = http
        .post(format!("{base}/start"))
        .bearer_auth(&token)
        .json(&json!({"body": {"provider": provider}}))
        .send()
        .await
        .unwrap();
    let status = resp.status();
    let started: Value = resp.json().await.unwrap();
    assert_eq!(
        status,
        StatusCode::OK,
        "{provider}: {started}\n{}",
        d.output()
    );
    println!(
        "{provider}: /start answered ready in {} ms",
        t.elapsed().as_millis()
    );
    let url = format!("{base}{}", started["statusUrl"].as_str().unwrap());
    let view = get_json(&http, &url, &token).await;
    assert_eq!(view["status"], "ready", "{provider}: {view}");
    assert_eq!(view["provider"], provider);
    let resp = http.delete(&url).bearer_auth(&token).send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK, "{provider}");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let view = get_json(&http, &url, &token).await;
        if view["status"] == "ended" {
            break;
        }
        assert!(Instant::now() < deadline, "{provider}: never ended: {view}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Readiness and `check` against the same provider.
    let resp = http.get(format!("{base}/readyz")).send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK, "{provider}");
    view_machine(&view)
}

fn view_machine(view: &Value) -> String {
    view["machineId"].as_str().unwrap().to_owned()
}

fn base_env(daily: &providers::testkit::daily_fake::FakeDaily) -> Vec<(&'static str, String)> {
    vec![
        ("BOTDISPATCH_ROOMS", "daily".into()),
        ("BOTDISPATCH_JWT_SECRET", JWT_SECRET.into()),
        ("DAILY_API_KEY", DAILY_KEY.into()),
        ("DAILY_API_URL", daily.base_url()),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fly_by_configuration() {
    let (fly, daily) = start_fakes(&Options::default().fly).await;
    let mut env = base_env(&daily);
    env.extend([
        ("BOTDISPATCH_BOT_IMAGE", BOT_IMAGE.to_owned()),
        ("FLY_API_TOKEN", FLY_TOKEN.to_owned()),
        ("FLY_APP_NAME", "not-the-bots-app".to_owned()),
        // On Fly, FLY_APP_NAME is the dispatcher's own app: BOTDISPATCH_FLY_APP wins.
        ("BOTDISPATCH_FLY_APP", FLY_APP.to_owned()),
        ("BOTDISPATCH_FLY_API_URL", fly.base_url()),
    ]);
    let machine = scenario("fly", env).await;
    assert_eq!(fly.machine(&machine).unwrap().state, "destroyed");
    assert!(fly.spec_violations().is_empty());
}

fn fargate_env(ecs: &FakeEcs, env: &mut Vec<(&'static str, String)>) {
    env.extend([
        ("BOTDISPATCH_FARGATE_CLUSTER", "bots".to_owned()),
        ("BOTDISPATCH_FARGATE_TASK_DEFINITION", "bot:1".to_owned()),
        ("BOTDISPATCH_FARGATE_CONTAINER", "bot".to_owned()),
        ("BOTDISPATCH_FARGATE_SUBNETS", "subnet-0a1b2c3d".to_owned()),
        (
            "BOTDISPATCH_FARGATE_SECURITY_GROUPS",
            "sg-0a1b2c3d".to_owned(),
        ),
        // The SDK's standard chain, pointed at the fake. No instance metadata lookups.
        ("AWS_ACCESS_KEY_ID", ecs.config().access_key_id.clone()),
        ("AWS_SECRET_ACCESS_KEY", "fake-secret".to_owned()),
        ("AWS_REGION", ecs.config().region.clone()),
        ("AWS_ENDPOINT_URL_ECS", ecs.endpoint_url()),
        ("AWS_EC2_METADATA_DISABLED", "true".to_owned()),
    ]);
}

fn cloudrun_env(run: &FakeCloudRun, env: &mut Vec<(&'static str, String)>) {
    env.extend([
        (
            "BOTDISPATCH_CLOUDRUN_PROJECT",
            "botdispatch-test".to_owned(),
        ),
        ("BOTDISPATCH_CLOUDRUN_REGION", "europe-west1".to_owned()),
        ("BOTDISPATCH_CLOUDRUN_JOB", "bots".to_owned()),
        ("CLOUD_RUN_API_URL", run.api_url()),
        ("GCE_METADATA_HOST", run.metadata_host()),
    ]);
}

fn fly_env(fly: &providers::testkit::fly_fake::FakeFly, env: &mut Vec<(&'static str, String)>) {
    env.extend([
        ("BOTDISPATCH_BOT_IMAGE", BOT_IMAGE.to_owned()),
        ("FLY_API_TOKEN", FLY_TOKEN.to_owned()),
        ("BOTDISPATCH_FLY_APP", FLY_APP.to_owned()),
        ("BOTDISPATCH_FLY_API_URL", fly.base_url()),
    ]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fargate_by_configuration() {
    let ecs = FakeEcs::start(FakeEcsConfig::default()).await;
    let (_, daily) = start_fakes(&Options::default().fly).await;
    let mut env = base_env(&daily);
    fargate_env(&ecs, &mut env);
    let task = scenario("fargate", env).await;
    let fake = ecs.task(&task).expect("the session's task");
    assert_eq!(fake.desired_status, "STOPPED", "StopTask was sent");
    assert_eq!(fake.stop_code.as_deref(), Some("UserInitiated"));
    assert!(
        ecs.spec_violations().is_empty(),
        "{:?}",
        ecs.spec_violations()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cloudrun_by_configuration() {
    let run = FakeCloudRun::start(FakeCloudRunConfig::default()).await;
    let (_, daily) = start_fakes(&Options::default().fly).await;
    let mut env = base_env(&daily);
    cloudrun_env(&run, &mut env);
    let execution = scenario("cloudrun", env).await;
    assert!(run.execution(&execution).is_some());
    assert!(
        run.spec_violations().is_empty(),
        "{:?}",
        run.spec_violations()
    );
}

/// Starts a dispatcher process for `provider` with `env`; its base URL.
fn dispatcher(provider: &str, mut env: Vec<(&'static str, String)>) -> (Dispatcher, String) {
    env.push(("BOTDISPATCH_LISTEN", "127.0.0.1:0".into()));
    env.push(("BOTDISPATCH_PROVIDER", provider.into()));
    let refs: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let mut d = Dispatcher::spawn(&refs);
    let base = tokio::task::block_in_place(|| d.wait_ready());
    (d, base)
}

/// A start whose `body` fits botdispatch's own 64 KiB limit but not `provider`'s: 413 at plan
/// time, naming the limit, with nothing created.
async fn too_large_for(
    provider: &str,
    env: Vec<(&'static str, String)>,
    body_bytes: usize,
    limit: &str,
) {
    let (mut d, base) = dispatcher(provider, env);
    let resp = reqwest::Client::new()
        .post(format!("{base}/start"))
        .bearer_auth(hs_token("alice"))
        .json(&json!({"body": {"transcript": "x".repeat(body_bytes)}}))
        .send()
        .await
        .unwrap();
    let status = resp.status();
    let err: Value = resp.json().await.unwrap();
    assert_eq!(
        status,
        StatusCode::PAYLOAD_TOO_LARGE,
        "{provider}: {err}\n{}",
        d.output()
    );
    assert_eq!(err["error"], "payload_too_large");
    assert!(
        err["detail"].as_str().unwrap().contains(limit),
        "{provider}: {err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_cloud_run_cannot_carry_is_refused_before_anything_exists() {
    let run = FakeCloudRun::start(FakeCloudRunConfig::default()).await;
    let (_, daily) = start_fakes(&Options::default().fly).await;
    let mut env = base_env(&daily);
    env.extend([
        (
            "BOTDISPATCH_CLOUDRUN_PROJECT",
            "botdispatch-test".to_owned(),
        ),
        ("BOTDISPATCH_CLOUDRUN_REGION", "europe-west1".to_owned()),
        ("BOTDISPATCH_CLOUDRUN_JOB", "bots".to_owned()),
        ("CLOUD_RUN_API_URL", run.api_url()),
        ("GCE_METADATA_HOST", run.metadata_host()),
    ]);
    // A Cloud Run env value holds at most 32,768 bytes.
    too_large_for("cloudrun", env, 40 * 1024, "32768").await;
    assert!(run.executions().is_empty());
    assert!(daily.rooms().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_fargate_cannot_carry_is_refused_before_anything_exists() {
    let ecs = FakeEcs::start(FakeEcsConfig::default()).await;
    let (_, daily) = start_fakes(&Options::default().fly).await;
    let mut env = base_env(&daily);
    env.extend([
        ("BOTDISPATCH_FARGATE_CLUSTER", "bots".to_owned()),
        ("BOTDISPATCH_FARGATE_TASK_DEFINITION", "bot:1".to_owned()),
        ("BOTDISPATCH_FARGATE_SUBNETS", "subnet-0a1b2c3d".to_owned()),
        ("AWS_ACCESS_KEY_ID", ecs.config().access_key_id.clone()),
        ("AWS_SECRET_ACCESS_KEY", "fake-secret".to_owned()),
        ("AWS_REGION", ecs.config().region.clone()),
        ("AWS_ENDPOINT_URL_ECS", ecs.endpoint_url()),
        ("AWS_EC2_METADATA_DISABLED", "true".to_owned()),
    ]);
    // RunTask's overrides hold at most 8,192 characters.
    too_large_for("fargate", env, 10 * 1024, "8192").await;
    assert!(ecs.tasks().is_empty());
    assert!(daily.rooms().is_empty());
}

/// `max_sessions = N` admits exactly N concurrent starts, on every provider: a start in flight
/// whose machine the provider already lists is counted once (it used to count twice: with
/// Cloud Run, five concurrent starts under `max_sessions = 5` admitted only 3).
async fn admits_exactly(provider: &str, mut env: Vec<(&'static str, String)>) {
    const N: usize = 5;
    env.push(("BOTDISPATCH_MAX_SESSIONS", N.to_string()));
    env.push(("BOTDISPATCH_STARTS_PER_MINUTE_PER_CALLER", "0".into()));
    let (mut d, base) = dispatcher(provider, env);
    let http = reqwest::Client::new();
    let start = |i: usize| {
        let http = http.clone();
        let base = base.clone();
        async move {
            let resp = http
                .post(format!("{base}/start"))
                .bearer_auth(hs_token(&format!("user{i}")))
                .json(&json!({}))
                .send()
                .await
                .unwrap();
            let status = resp.status();
            (status, resp.json::<Value>().await.unwrap())
        }
    };
    // N + 2 at once: exactly N admitted.
    let answers = futures_util::future::join_all((0..N + 2).map(start)).await;
    let ok = answers.iter().filter(|(s, _)| *s == StatusCode::OK).count();
    let full: Vec<_> = answers
        .iter()
        .filter(|(s, _)| *s == StatusCode::TOO_MANY_REQUESTS)
        .collect();
    assert_eq!(ok, N, "{provider}: {answers:?}\n{}", d.output());
    assert_eq!(full.len(), 2, "{provider}: {answers:?}");
    assert!(
        full.iter().all(|(_, b)| b["error"] == "at_capacity"),
        "{full:?}"
    );
    // And once they are all listed by the provider, still N: one more is refused.
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let (status, body) = start(99).await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS, "{provider}: {body}");
    println!(
        "{provider}: {N} of {} concurrent starts admitted under max_sessions = {N}",
        N + 2
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_sessions_admits_exactly_n_on_fly() {
    let (fly, daily) = start_fakes(&Options::default().fly).await;
    let mut env = base_env(&daily);
    fly_env(&fly, &mut env);
    admits_exactly("fly", env).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_sessions_admits_exactly_n_on_fargate() {
    let ecs = FakeEcs::start(FakeEcsConfig::default()).await;
    let (_, daily) = start_fakes(&Options::default().fly).await;
    let mut env = base_env(&daily);
    fargate_env(&ecs, &mut env);
    admits_exactly("fargate", env).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_sessions_admits_exactly_n_on_cloudrun() {
    let run = FakeCloudRun::start(FakeCloudRunConfig::default()).await;
    let (_, daily) = start_fakes(&Options::default().fly).await;
    let mut env = base_env(&daily);
    cloudrun_env(&run, &mut env);
    admits_exactly("cloudrun", env).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_sessions_admits_exactly_n_locally() {
    let (_, daily) = start_fakes(&Options::default().fly).await;
    let mut env = base_env(&daily);
    env.push(("BOTDISPATCH_HANDOFF", "env".into()));
    env.push(("BOTDISPATCH_RESERVE_SIZE", "0".into()));
    admits_exactly("local", env).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_sessions_admits_exactly_n_on_kubernetes() {
    use providers::testkit::kube_fake::{FakeKube, FakeKubeConfig};
    let kube = FakeKube::start(FakeKubeConfig::default()).await;
    let (_, daily) = start_fakes(&Options::default().fly).await;
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = dir.path().join("kubeconfig");
    std::fs::write(&kubeconfig, kube.kubeconfig("bots")).unwrap();
    let mut env = base_env(&daily);
    env.extend([
        ("BOTDISPATCH_BOT_IMAGE", "ghcr.io/acme/bot:1.0".to_owned()),
        ("KUBECONFIG", kubeconfig.display().to_string()),
    ]);
    admits_exactly("kubernetes", env).await;
}
