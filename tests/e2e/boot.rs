//! Start-up against a Daily that is briefly unavailable: the domain read (`GET /`) is retried
//! with backoff for a bounded time, a refusal fails at once, and a configured domain needs no
//! call at all.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use botdispatch::{app, App};
use providers::testkit::daily_fake::{DailyOp, FakeDaily};
use providers::testkit::Fault;

use crate::common::{
    config_from, start_fakes, Options, BOT_IMAGE, DAILY_DOMAIN, DAILY_DOMAIN_ID, DAILY_KEY,
    FLY_APP, FLY_TOKEN, JWT_SECRET, SESSION_SECRET,
};

/// Builds the app as `serve` does, against fresh fakes whose Daily was prepared by `arm`;
/// answers how the build ended, how long it took and how many domain reads Daily saw.
async fn boot(
    env: &[(&'static str, &str)],
    arm: impl FnOnce(&FakeDaily),
) -> (anyhow::Result<App>, Duration, usize) {
    let (fly, daily) = start_fakes(&Options::default().fly).await;
    arm(&daily);
    let mut vars: BTreeMap<&str, String> = BTreeMap::from([
        ("BOTDISPATCH_PROVIDER", "fly".to_owned()),
        ("BOTDISPATCH_ROOMS", "daily".to_owned()),
        ("BOTDISPATCH_JWT_SECRET", JWT_SECRET.to_owned()),
        ("BOTDISPATCH_SESSION_SECRET", SESSION_SECRET.to_owned()),
        ("BOTDISPATCH_BOT_IMAGE", BOT_IMAGE.to_owned()),
        ("FLY_API_TOKEN", FLY_TOKEN.to_owned()),
        ("FLY_APP_NAME", FLY_APP.to_owned()),
        ("FLY_API_URL", fly.base_url()),
        ("DAILY_API_KEY", DAILY_KEY.to_owned()),
        ("DAILY_API_URL", daily.base_url()),
    ]);
    vars.extend(env.iter().map(|(k, v)| (*k, (*v).to_owned())));
    let config = config_from("", &vars).expect("test config is valid");
    let began = Instant::now();
    let built = App::build(config, app::http_client().unwrap()).await;
    let elapsed = began.elapsed();
    let domain_reads = daily
        .requests()
        .iter()
        .filter(|r| r.method == "GET" && r.path.trim_end_matches('/') == "/v1")
        .count();
    (built, elapsed, domain_reads)
}

fn unavailable(status: u16) -> Fault {
    Fault::Status {
        status,
        retry_after: None,
    }
}

#[tokio::test]
async fn a_daily_blip_at_boot_is_retried() {
    let (built, _, reads) = boot(&[], |daily| {
        daily.set_fault(DailyOp::Domain, unavailable(503), 2);
        daily.set_fault(DailyOp::Domain, Fault::Reset, 1);
    })
    .await;
    let app = built.expect("the dispatcher boots once Daily answers");
    assert_eq!(reads, 4, "two 503s and a reset, then the answer");
    let token = app
        .sessions
        .rooms()
        .mint_token(&botdispatch::rooms::TokenRequest {
            room: "bd-default-x",
            owner: false,
            exp: chrono::Utc::now() + chrono::Duration::minutes(5),
            properties: &serde_json::Map::new(),
        });
    let claims = crate::common::decode_hs256(&token.unwrap(), DAILY_KEY);
    assert_eq!(
        claims["d"], DAILY_DOMAIN_ID,
        "the domain read after the retries is used"
    );
}

#[tokio::test]
async fn a_throttled_boot_waits_for_retry_after() {
    let (built, elapsed, reads) = boot(&[], |daily| {
        daily.set_fault(
            DailyOp::Domain,
            Fault::Status {
                status: 429,
                retry_after: Some(1),
            },
            1,
        );
    })
    .await;
    built.expect("the dispatcher boots after the throttle");
    assert_eq!(reads, 2);
    assert!(
        elapsed >= Duration::from_secs(1),
        "Retry-After is honoured: {elapsed:?}"
    );
}

#[tokio::test]
async fn a_wrong_daily_key_fails_at_once() {
    let (built, elapsed, reads) = boot(&[("DAILY_API_KEY", "not-the-daily-key")], |_| {}).await;
    let error = format!("{:#}", built.err().expect("a refused key is not retried"));
    assert_eq!(reads, 1, "401 is not retried");
    assert!(elapsed < Duration::from_secs(2), "{elapsed:?}");
    assert!(error.contains("DAILY_API_KEY"), "{error}");
}

#[tokio::test]
async fn a_daily_outage_fails_the_boot_within_the_bound() {
    // request_timeout_secs = 1: the domain read is retried for at most 4 s.
    let (built, elapsed, reads) = boot(&[("BOTDISPATCH_REQUEST_TIMEOUT_SECS", "1")], |daily| {
        daily.set_fault(DailyOp::Domain, unavailable(502), 1000);
    })
    .await;
    let error = format!("{:#}", built.err().expect("an outage fails the boot"));
    let bound = Duration::from_secs(botdispatch::rooms::daily::BOOT_BUDGET_PER_TIMEOUT.into());
    assert!(elapsed < bound + Duration::from_secs(1), "{elapsed:?}");
    assert!(reads >= 3, "retried with backoff, {reads} reads");
    assert!(
        reads < 40,
        "with backoff, not in a tight loop: {reads} reads"
    );
    assert!(error.contains("Daily"), "{error}");
}

#[tokio::test]
async fn a_configured_domain_needs_no_call_at_boot() {
    let (built, _, reads) = boot(
        &[
            ("DAILY_DOMAIN_ID", DAILY_DOMAIN_ID),
            ("DAILY_DOMAIN_NAME", DAILY_DOMAIN),
        ],
        |daily| daily.set_fault(DailyOp::Domain, unavailable(503), 1000),
    )
    .await;
    built.expect("no Daily call, no failure");
    assert_eq!(reads, 0);
}
