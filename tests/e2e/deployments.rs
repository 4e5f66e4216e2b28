//! Two deployments on one account (staging and production sharing a Daily domain, or a Fly
//! app): each deployment's reaper, capacity count and listings see only its own machines and
//! rooms.

use std::time::Duration;

use providers::testkit::daily_fake::FakeDaily;
use providers::testkit::fly_fake::FakeFly;
use reqwest::StatusCode;

use crate::common::*;

async fn deployment(name: &str, app: &str, fly: &FakeFly, daily: &FakeDaily) -> TestEnv {
    let mut opts = Options::default();
    opts.shared = Some((fly.clone(), daily.clone()));
    opts.background = true;
    opts.env.extend([
        ("BOTDISPATCH_DEPLOYMENT", name.to_owned()),
        ("FLY_APP_NAME", app.to_owned()),
        // The reaper runs every second and considers anything older than 1 s fair game.
        ("BOTDISPATCH_REAPER_INTERVAL_SECS", "1".to_owned()),
        ("BOTDISPATCH_REAPER_GRACE_SECS", "0".to_owned()),
        ("BOTDISPATCH_START_TIMEOUT_SECS", "1".to_owned()),
        ("BOTDISPATCH_MAX_SESSIONS", "3".to_owned()),
        ("BOTDISPATCH_OUTBOUND_RATE_SCALE", "0".to_owned()),
    ]);
    TestEnv::with(opts).await
}

fn two_apps() -> Options {
    let mut opts = Options::default();
    opts.fly.apps = vec![FLY_APP.to_owned(), "bots-staging".to_owned()];
    opts
}

async fn start_ok(env: &TestEnv, sub: &str) -> String {
    let (status, resp) = env.post_start(sub, start_body()).await;
    assert_eq!(status, StatusCode::OK, "{resp}");
    resp["statusUrl"].as_str().unwrap().to_owned()
}

async fn assert_all_ready(env: &TestEnv, sub: &str, urls: &[String]) {
    for url in urls {
        let (status, view) = env.get_session(sub, url).await;
        assert_eq!(status, StatusCode::OK, "{view}");
        assert_eq!(view["status"], "ready", "{view}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deployments_sharing_a_daily_domain_do_not_reap_each_other() {
    let (fly, daily) = start_fakes(&two_apps().fly).await;
    let production = deployment("production", FLY_APP, &fly, &daily).await;
    let staging = deployment("staging", "bots-staging", &fly, &daily).await;
    let prod_sessions = vec![start_ok(&production, "alice").await];
    let staging_sessions = vec![start_ok(&staging, "bob").await];
    // Several reaper passes of both, well past the start timeout plus grace.
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert_eq!(fly.live_machines().len(), 2, "{:?}", fly.live_machines());
    assert_eq!(daily.rooms().len(), 2, "{:?}", daily.rooms());
    assert_all_ready(&production, "alice", &prod_sessions).await;
    assert_all_ready(&staging, "bob", &staging_sessions).await;
    for room in daily.rooms() {
        assert!(
            room.name.starts_with("bd-production-") || room.name.starts_with("bd-staging-"),
            "rooms carry their deployment: {}",
            room.name
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deployments_sharing_a_fly_app_count_only_their_own_sessions() {
    let (fly, daily) = start_fakes(&Options::default().fly).await;
    let production = deployment("production", FLY_APP, &fly, &daily).await;
    let staging = deployment("staging", FLY_APP, &fly, &daily).await;
    let mut prod_sessions = Vec::new();
    for i in 0..3 {
        prod_sessions.push(start_ok(&production, &format!("p{i}")).await);
    }
    // Production is at its limit; staging's three are its own.
    let (status, resp) = production.post_start("p9", start_body()).await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS, "{resp}");
    let mut staging_sessions = Vec::new();
    for i in 0..3 {
        staging_sessions.push(start_ok(&staging, &format!("s{i}")).await);
    }
    let (status, resp) = staging.post_start("s9", start_body()).await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS, "{resp}");

    tokio::time::sleep(Duration::from_secs(4)).await;
    assert_eq!(fly.live_machines().len(), 6, "{:?}", fly.live_machines());
    assert_eq!(daily.rooms().len(), 6);
    for (i, url) in prod_sessions.iter().enumerate() {
        assert_all_ready(&production, &format!("p{i}"), std::slice::from_ref(url)).await;
    }
    for (i, url) in staging_sessions.iter().enumerate() {
        assert_all_ready(&staging, &format!("s{i}"), std::slice::from_ref(url)).await;
    }
    let labelled = |d: &str| {
        fly.live_machines()
            .iter()
            .filter(|m| m.config["metadata"]["botdispatch_deployment"] == d)
            .count()
    };
    assert_eq!((labelled("production"), labelled("staging")), (3, 3));
}
