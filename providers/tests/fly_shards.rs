//! `fly.apps` (DESIGN §10, "Sharding"): creates spread over several Fly apps so that the
//! per-app create limit (1 req/s, burst 3) multiplies; handles name their app; listings, finds,
//! the reserve and `check` cover every app; the same machine name always goes to the same app,
//! so a retried or duplicated create conflicts instead of making a second machine.

#![cfg(feature = "testkit")]

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use futures_util::future::join_all;
use providers::env::Env;
use providers::fly::{FlyConfig, FlyProvider};
use providers::resilient::Resilient;
use providers::retry::RetryPolicy;
use providers::testkit::contract::{run_contract_suite, ContractPeer, Scenario};
use providers::testkit::fly_fake::{FakeFly, FakeFlyConfig, FlyOp};
use providers::testkit::Fault;
use providers::{
    BuildContext, ConfigError, Deadline, Guest, Launched, MachineProvider, MachineTemplate,
    ProviderError, ProviderSettings, ReserveLabels, Secret, SessionBinding, SessionLabels,
    StartType, Tier, Workload,
};
use serde_json::json;

const TOKEN: &str = "t0ken";
const APPS: [&str; 4] = ["bots-a", "bots-b", "bots-c", "bots-d"];
const MACHINE_ID: &str = "148ed193b95089";

fn strings(apps: &[&str]) -> Vec<String> {
    apps.iter().map(|a| (*a).to_owned()).collect()
}

async fn fake(apps: &[&str]) -> FakeFly {
    FakeFly::start(FakeFlyConfig {
        token: TOKEN.into(),
        apps: strings(apps),
        boot_delay: Duration::from_millis(20),
        starting_for: Duration::from_millis(10),
        stop_delay: Duration::from_millis(10),
        ..FakeFlyConfig::default()
    })
    .await
}

fn sharded_config(api_url: &str, apps: &[&str]) -> FlyConfig {
    FlyConfig {
        api_url: api_url.to_owned(),
        api_token: Some(Secret::new(TOKEN)),
        apps: strings(apps),
        default_region: Some("iad".into()),
        ..FlyConfig::default()
    }
}

fn build(config: FlyConfig) -> Arc<FlyProvider> {
    let ctx =
        BuildContext::new(reqwest::Client::new()).with_request_timeout(Duration::from_secs(5));
    Arc::new(FlyProvider::new(&ctx, config).expect("valid config"))
}

fn sharded(fake: &FakeFly, apps: &[&str]) -> Arc<FlyProvider> {
    build(sharded_config(&fake.base_url(), apps))
}

/// `inner` behind the resilient wrapper, at `scale` times the documented limits (0: off).
fn resilient(inner: Arc<FlyProvider>, scale: f64) -> Arc<Resilient> {
    Arc::new(Resilient::new(inner, RetryPolicy::default(), scale))
}

fn template() -> MachineTemplate {
    MachineTemplate {
        workload: Workload::Image("registry.fly.io/bots:v1".into()),
        cmd: None,
        guest: Guest::default(),
        region: None,
        env: BTreeMap::new(),
        handoff_port: None,
    }
}

/// A session named as the service names it (`bd-<deployment>-<key>`).
fn session(key: &str) -> SessionBinding {
    SessionBinding {
        name: format!("bd-default-{key}"),
        env: BTreeMap::from([
            (
                "DAILY_ROOM_URL".to_owned(),
                "https://x.daily.co/r".to_owned(),
            ),
            ("DAILY_ROOM_TOKEN".to_owned(), "token".to_owned()),
            ("BOTDISPATCH_SESSION_ID".to_owned(), key.to_owned()),
            ("BOTDISPATCH_BODY".to_owned(), "{}".to_owned()),
        ]),
        labels: SessionLabels {
            session_key: key.to_owned(),
            owner: "alice".to_owned(),
            room: format!("bd-default-{key}"),
            agent: "default".to_owned(),
            deployment: "default".to_owned(),
            start: StartType::Cold,
            deadline: Deadline::from_unix_secs(Utc::now().timestamp() + 600).unwrap(),
            timings: None,
        },
        deadline: Deadline::after(Duration::from_secs(60)),
    }
}

fn reserve_labels(name: &str, slot: u32) -> ReserveLabels {
    ReserveLabels {
        name: name.to_owned(),
        slot,
        agent: "default".to_owned(),
        fingerprint: "f00d1".to_owned(),
        tier: Tier::Stopped,
        ready: false,
        recycle: false,
        recycled_at: None,
    }
}

/// The app a sharded handle names.
fn app_of(handle: &str) -> &str {
    handle
        .split_once('/')
        .unwrap_or_else(|| panic!("{handle:?} names no app"))
        .0
}

fn id_of(handle: &str) -> &str {
    handle.rsplit('/').next().unwrap()
}

/// Creates the fake answered, per app.
fn creates_per_app(fake: &FakeFly) -> BTreeMap<String, usize> {
    let mut counts = BTreeMap::new();
    for r in fake.requests() {
        let parts: Vec<&str> = r.path.trim_start_matches('/').split('/').collect();
        if r.method == "POST" && matches!(parts.as_slice(), ["v1", "apps", _, "machines"]) {
            *counts.entry(parts[2].to_owned()).or_insert(0) += 1;
        }
    }
    counts
}

/// Loads a `[fly]` section from these environment variables, as the service does.
fn load(vars: &[(&str, String)]) -> Result<FlyConfig, ConfigError> {
    let map: BTreeMap<String, String> = vars
        .iter()
        .map(|(k, v)| ((*k).to_owned(), v.clone()))
        .collect();
    let lookup = move |k: &str| map.get(k).cloned();
    let mut config = FlyConfig::default();
    config.apply_env(&Env::new(&lookup))?;
    config.validate(true)?;
    Ok(config)
}

#[test]
fn fly_apps_take_precedence_and_are_validated() {
    let token = ("FLY_API_TOKEN", "t".to_owned());
    // The env list wins over the single app, whichever variable names that one.
    let c = load(&[
        token.clone(),
        ("FLY_APP_NAME", "legacy".into()),
        ("BOTDISPATCH_FLY_APP", "legacy".into()),
        ("BOTDISPATCH_FLY_APPS", "bots-a, bots-b,,bots-c".into()),
    ])
    .unwrap();
    assert_eq!(c.apps, ["bots-a", "bots-b", "bots-c"]);
    // No single app is needed with a list; nothing at all is refused, naming both keys.
    load(&[token.clone(), ("BOTDISPATCH_FLY_APPS", "bots-a".into())]).unwrap();
    let e = load(std::slice::from_ref(&token)).unwrap_err().0;
    assert!(e.contains("fly.app_name") && e.contains("fly.apps"), "{e}");
    // The TOML key.
    let c: FlyConfig = serde_json::from_value(json!({"apps": ["bots-a", "bots-b"]})).unwrap();
    assert_eq!(c.apps, ["bots-a", "bots-b"]);

    let refused = |apps: String, why: &str| {
        let e = load(&[token.clone(), ("BOTDISPATCH_FLY_APPS", apps)])
            .unwrap_err()
            .0;
        assert!(e.contains("fly.apps") && e.contains(why), "{why}: {e}");
    };
    refused("bots-a,bots-b,bots-a".into(), "\"bots-a\"");
    refused("bots-a,Bots_B!".into(), "\"Bots_B!\"");
    refused("bots-a,../x".into(), "\"../x\"");
    let too_many: Vec<String> = (0..65).map(|i| format!("bots-{i}")).collect();
    refused(too_many.join(","), "64");
    let enough: Vec<String> = (0..64).map(|i| format!("bots-{i}")).collect();
    load(&[token.clone(), ("BOTDISPATCH_FLY_APPS", enough.join(","))]).unwrap();

    // On Fly, the dispatcher's own app may be none of them ...
    let on_fly = |apps: &str| {
        load(&[
            token.clone(),
            ("FLY_MACHINE_ID", MACHINE_ID.into()),
            ("FLY_APP_NAME", "dispatcher".into()),
            ("BOTDISPATCH_FLY_APPS", apps.into()),
        ])
    };
    let e = on_fly("bots-a,dispatcher,bots-c").unwrap_err().0;
    assert!(
        e.contains("own app") && e.contains("\"dispatcher\"") && e.contains("fly.apps"),
        "{e}"
    );
    // ... and with a list, Fly's FLY_APP_NAME (the dispatcher's app) is simply not used.
    let c = on_fly("bots-a,bots-b").unwrap();
    assert_eq!(c.apps, ["bots-a", "bots-b"]);
}

#[test]
fn handles_name_their_app_and_only_configured_apps_are_handles() {
    let provider = build(sharded_config("http://127.0.0.1:9/v1", &APPS));
    for app in APPS {
        assert!(provider.is_handle(&format!("{app}/{MACHINE_ID}")), "{app}");
    }
    // A plain id (a session id issued before sharding) is a machine of the first app.
    assert!(provider.is_handle(MACHINE_ID));
    for hostile in [
        format!("elsewhere/{MACHINE_ID}"),
        format!("bots-b/{MACHINE_ID}/x"),
        format!("bots-b//{MACHINE_ID}"),
        format!("/{MACHINE_ID}"),
        "bots-b/".to_owned(),
        "bots-b/..".to_owned(),
        format!("bots-b/../{MACHINE_ID}"),
        format!("BOTS-B/{MACHINE_ID}"),
        format!("bots-b/{}", MACHINE_ID.to_uppercase()),
        format!("bots-b%2F{MACHINE_ID}"),
        format!("../bots-b/{MACHINE_ID}"),
    ] {
        assert!(!provider.is_handle(&hostile), "{hostile:?} is not a handle");
    }

    // The handoff reaches the machine in its own app.
    let handoff = provider.handoff().unwrap();
    let launched = |handle: &str| Launched {
        handle: handle.to_owned(),
        region: Some("ams".into()),
        version: None,
        address: Some("fdaa::3".into()),
    };
    let url = handoff
        .bot_url(&launched(&format!("bots-c/{MACHINE_ID}")), 8080)
        .unwrap();
    assert_eq!(
        url.as_str(),
        format!("http://{MACHINE_ID}.vm.bots-c.internal:8080/")
    );
    let url = handoff.bot_url(&launched(MACHINE_ID), 8080).unwrap();
    assert_eq!(
        url.as_str(),
        format!("http://{MACHINE_ID}.vm.bots-a.internal:8080/")
    );
    assert!(handoff
        .bot_url(&launched(&format!("elsewhere/{MACHINE_ID}")), 8080)
        .is_err());

    // One app: handles stay plain machine ids (existing session ids remain valid).
    let single = build(FlyConfig {
        api_url: "http://127.0.0.1:9/v1".into(),
        api_token: Some(Secret::new(TOKEN)),
        app_name: Some("bots".into()),
        ..FlyConfig::default()
    });
    assert!(single.is_handle(MACHINE_ID));
    assert!(single.is_handle(&format!("bots/{MACHINE_ID}")));
    assert!(!single.is_handle(&format!("bots-a/{MACHINE_ID}")));
    assert_eq!(single.launch_key("bd-default-x"), "bots");
}

#[test]
fn a_name_always_maps_to_the_same_app_and_names_spread_evenly() {
    let four = build(sharded_config("http://127.0.0.1:9/v1", &APPS));
    let again = build(sharded_config("http://127.0.0.1:9/v1", &APPS));
    let three = build(sharded_config("http://127.0.0.1:9/v1", &APPS[..3]));
    let mut counts: BTreeMap<String, usize> = BTreeMap::new();
    let mut moved = 0;
    for i in 0..2000 {
        let name = format!("bd-default-01k{i:05}");
        let app = four.launch_key(&name);
        assert!(APPS.contains(&app.as_str()), "{app}");
        // Every replica (every provider built from the same list) picks the same app.
        assert_eq!(again.launch_key(&name), app);
        // Adding an app moves names only to the new app (rendezvous hashing): a retry across
        // a change of the list mostly still meets its first attempt.
        let before = three.launch_key(&name);
        if before != app {
            assert_eq!(app, "bots-d", "{name}: {before} -> {app}");
            moved += 1;
        }
        *counts.entry(app).or_default() += 1;
    }
    println!("2000 names over 4 apps: {counts:?}; {moved} moved when bots-d was added");
    for (app, n) in &counts {
        assert!((400..=600).contains(n), "{app}: {n} of 2000");
    }
    assert!((400..=600).contains(&moved), "{moved}");
}

#[tokio::test]
async fn launches_spread_over_every_app_and_each_call_goes_to_the_machines_app() {
    let fake = fake(&APPS).await;
    let fly = sharded(&fake, &APPS);
    let provider = resilient(fly.clone(), 0.0);
    let launches = (0..24).map(|i| {
        let provider = provider.clone();
        async move {
            provider
                .launch(&template(), &session(&format!("k{i}")))
                .await
        }
    });
    let handles: Vec<String> = join_all(launches)
        .await
        .into_iter()
        .map(|r| r.expect("launch").handle)
        .collect();
    let mut used = BTreeSet::new();
    for (i, handle) in handles.iter().enumerate() {
        assert!(provider.is_handle(handle), "{handle}");
        let app = app_of(handle);
        let machine = fake.machine(id_of(handle)).unwrap();
        assert_eq!(machine.app, app, "the handle names the machine's app");
        assert_eq!(machine.name, format!("bd-default-k{i}"));
        assert_eq!(fly.launch_key(&machine.name), app);
        used.insert(app.to_owned());
    }
    assert_eq!(used.len(), APPS.len(), "every app got creates: {handles:?}");
    assert_eq!(creates_per_app(&fake).values().sum::<usize>(), 24);

    // Status, waits and stops: each one call on the machine's own app.
    for (i, handle) in handles.iter().enumerate() {
        let launched = Launched {
            handle: handle.clone(),
            region: None,
            version: None,
            address: None,
        };
        provider
            .wait_started(&launched, Deadline::after(Duration::from_secs(10)))
            .await
            .expect("started");
        let status = provider.status(handle).await.unwrap().expect("known");
        assert_eq!(&status.handle, handle);
        assert_eq!(status.labels.unwrap().session_key, format!("k{i}"));
    }
    let found = provider.find("k5").await.unwrap().expect("found");
    assert_eq!(found.handle, handles[5]);
    let listed: BTreeSet<String> = provider
        .list_managed()
        .await
        .unwrap()
        .into_iter()
        .map(|m| m.handle)
        .collect();
    assert_eq!(listed, handles.iter().cloned().collect());
    for handle in &handles {
        provider.terminate(handle).await.unwrap();
        assert!(
            fake.wait_for_state(id_of(handle), "destroyed", Duration::from_secs(5))
                .await
        );
    }
    let gone = provider.status(&handles[0]).await.unwrap();
    assert!(
        gone.as_ref().is_none_or(|m| m.state.is_terminal()),
        "{gone:?}"
    );
    // Every machine call went to the machine's own app.
    for r in fake.requests() {
        let parts: Vec<&str> = r.path.trim_start_matches('/').split('/').collect();
        if let ["v1", "apps", app, "machines", id, ..] = parts.as_slice() {
            assert_eq!(
                fake.machine(id).unwrap().app,
                *app,
                "{} {}",
                r.method,
                r.path
            );
        }
    }
    // Listings covered every app, concurrently merged.
    let listed_apps: BTreeSet<String> = fake
        .requests()
        .iter()
        .filter(|r| r.method == "GET" && r.path.ends_with("/machines"))
        .map(|r| r.path.split('/').nth(3).unwrap().to_owned())
        .collect();
    assert_eq!(listed_apps, APPS.iter().map(|a| a.to_string()).collect());
    assert!(
        fake.spec_violations().is_empty(),
        "{:?}",
        fake.spec_violations()
    );
}

#[tokio::test]
async fn a_failing_app_fails_the_listing_and_check_covers_every_app() {
    let fake = fake(&APPS).await;
    let provider = sharded(&fake, &APPS);
    provider.check().await.expect("every app exists");
    let gets: BTreeSet<String> = fake
        .requests()
        .iter()
        .filter(|r| {
            r.method == "GET" && r.path.starts_with("/v1/apps/") && r.path.split('/').count() == 4
        })
        .map(|r| r.path.clone())
        .collect();
    assert_eq!(gets.len(), APPS.len(), "{gets:?}");

    provider.launch(&template(), &session("one")).await.unwrap();
    // One app of four fails its listing: the whole listing fails (a partial one would let
    // the capacity count or the reserve undercount).
    fake.set_fault(
        FlyOp::List,
        Fault::Status {
            status: 500,
            retry_after: None,
        },
        1,
    );
    let err = provider.list_managed().await.unwrap_err();
    assert!(err.is_transient(), "{err:?}");
    assert_eq!(provider.list_managed().await.unwrap().len(), 1);
    fake.set_fault(
        FlyOp::List,
        Fault::Status {
            status: 500,
            retry_after: None,
        },
        1,
    );
    provider.find("one").await.unwrap_err();
    fake.set_fault(
        FlyOp::List,
        Fault::Status {
            status: 500,
            retry_after: None,
        },
        1,
    );
    provider
        .reserve()
        .unwrap()
        .list_reserve()
        .await
        .unwrap_err();

    // An app that does not exist (a typo in the list) fails the check.
    let typo = sharded(&fake, &["bots-a", "bots-typo"]);
    let err = typo.check().await.unwrap_err();
    assert!(err.to_string().contains("bots-typo"), "{err}");
}

#[tokio::test]
async fn a_retried_or_duplicated_create_meets_its_first_attempt_in_the_same_app() {
    let fake = fake(&APPS).await;
    // Two replicas with the same list race the same session (one Idempotency-Key sent twice).
    let a = resilient(sharded(&fake, &APPS), 0.0);
    let b = resilient(sharded(&fake, &APPS), 0.0);
    for i in 0..8 {
        let s = session(&format!("dup{i}"));
        let t = template();
        let (ra, rb) = tokio::join!(a.launch(&t, &s), b.launch(&t, &s));
        let (ra, rb) = (ra.unwrap(), rb.unwrap());
        assert_eq!(ra.handle, rb.handle, "both adopt the one machine");
    }
    assert_eq!(fake.machines().len(), 8, "{:#?}", fake.machines());

    // A create that happened but answered 500, while the listing that would adopt it is
    // refused: the create is sent again, to the same app, and conflicts; it is adopted then.
    fake.set_fault(FlyOp::Create, Fault::GhostCreate { status: 500 }, 1);
    fake.set_fault(
        FlyOp::List,
        Fault::Status {
            status: 400,
            retry_after: None,
        },
        APPS.len() as u32,
    );
    let s = session("ghost");
    let launched = a.launch(&template(), &s).await.expect("adopted");
    let named: Vec<_> = fake
        .machines()
        .into_iter()
        .filter(|m| m.name == s.name)
        .collect();
    assert_eq!(named.len(), 1, "one machine for the session: {named:#?}");
    assert_eq!(id_of(&launched.handle), named[0].id);
    let conflicts = fake
        .requests()
        .iter()
        .filter(|r| r.method == "POST" && r.status == 409)
        .count();
    assert!(conflicts >= 1, "the second create met the first");

    // Reserve slots: replicas replenishing the same slot pick the same name, hence the same
    // app, and all but one are refused.
    let name = "bd-default-r0-f00d1-123";
    let labels = reserve_labels(name, 0);
    let env = BTreeMap::new();
    let t = template();
    let (ra, rb) = tokio::join!(
        a.reserve().unwrap().prepare(&t, name, &labels, &env),
        b.reserve().unwrap().prepare(&t, name, &labels, &env),
    );
    let outcomes = [ra, rb];
    assert_eq!(
        outcomes.iter().filter(|r| r.is_ok()).count(),
        1,
        "{outcomes:?}"
    );
    assert!(outcomes
        .iter()
        .any(|r| matches!(r, Err(ProviderError::Conflict { .. }))));
    let prepared = outcomes.iter().find_map(|r| r.as_ref().ok()).unwrap();
    assert_eq!(app_of(&prepared.handle), a.launch_key(name));
    let reserve: Vec<String> = a
        .reserve()
        .unwrap()
        .list_reserve()
        .await
        .unwrap()
        .into_iter()
        .map(|m| m.handle)
        .collect();
    assert_eq!(reserve, std::slice::from_ref(&prepared.handle));
}

/// Per app, create times conform to 1 req/s with bursts of 3: the `k`-th create (from 0) is
/// at least `k - 2` seconds after the first (a little slack for clocks).
fn assert_within_fly_limit(app: &str, times: &[DateTime<Utc>]) {
    for (k, t) in times.iter().enumerate().skip(3) {
        let since = (*t - times[0]).to_std().unwrap_or_default();
        let least = Duration::from_secs(k as u64 - 2).saturating_sub(Duration::from_millis(150));
        assert!(
            since >= least,
            "{app}: create {k} only {since:?} after the first"
        );
    }
}

/// `n` concurrent launches through the wrapper at the documented limits; (elapsed, creation
/// times per app).
async fn burst(apps: &[&str], n: usize) -> (Duration, BTreeMap<String, Vec<DateTime<Utc>>>) {
    let fake = fake(apps).await;
    let provider = resilient(sharded(&fake, apps), 1.0);
    let started = Instant::now();
    let results = join_all((0..n).map(|i| {
        let provider = provider.clone();
        async move {
            provider
                .launch(&template(), &session(&format!("r{}x{i}", apps.len())))
                .await
        }
    }))
    .await;
    let elapsed = started.elapsed();
    for r in &results {
        assert!(r.is_ok(), "no create was throttled: {r:?}");
    }
    assert!(
        fake.requests().iter().all(|r| r.status != 429),
        "no 429 was even tried"
    );
    let mut times: BTreeMap<String, Vec<DateTime<Utc>>> = BTreeMap::new();
    for m in fake.machines() {
        times.entry(m.app).or_default().push(m.created_at);
    }
    for (app, t) in &mut times {
        t.sort();
        assert_within_fly_limit(app, t);
    }
    (elapsed, times)
}

/// Creates per second after the first burst (3 per app), while every app still had a queue.
fn sustained_rate(times: &BTreeMap<String, Vec<DateTime<Utc>>>) -> f64 {
    times
        .values()
        .filter(|t| t.len() > 3)
        .map(|t| (t.len() - 3) as f64 / (t[t.len() - 1] - t[2]).to_std().unwrap().as_secs_f64())
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_app_create_limits_multiply_the_create_rate() {
    // One app: 9 creates take 3 at once and then one a second. Four apps: 28 creates, each
    // app at its own 1/s. Both at the documented limits, side by side.
    let ((one_elapsed, one), (four_elapsed, four)) =
        tokio::join!(burst(&["bots-a"], 9), burst(&APPS, 28));
    let per_app: BTreeMap<&String, usize> = four.iter().map(|(a, t)| (a, t.len())).collect();
    let (one_rate, four_rate) = (sustained_rate(&one), sustained_rate(&four));
    println!(
        "one app: 9 creates in {one_elapsed:.2?}, {one_rate:.2} creates/s sustained; \
         four apps: 28 creates in {four_elapsed:.2?} ({per_app:?}), {four_rate:.2} creates/s \
         sustained (sum of the apps' rates)"
    );
    assert_eq!(per_app.len(), 4, "every app got creates: {per_app:?}");
    assert!(
        one_elapsed >= Duration::from_millis(5800),
        "{one_elapsed:?}"
    );
    // One app would need 25 s for 28 creates; the busiest of four apps needs n - 3 seconds.
    let busiest = per_app.values().max().copied().unwrap();
    let bound = Duration::from_secs(busiest.saturating_sub(3) as u64 + 2);
    assert!(four_elapsed <= bound, "{four_elapsed:?} > {bound:?}");
    assert!(
        four_elapsed < Duration::from_secs(25 / 2),
        "{four_elapsed:?}"
    );
    assert!((0.8..1.3).contains(&one_rate), "{one_rate}");
    let apps_with_queues = four.values().filter(|t| t.len() > 3).count() as f64;
    assert!(
        four_rate > 0.8 * apps_with_queues && four_rate >= 2.4,
        "{four_rate} with {apps_with_queues} apps queueing"
    );
}

/// The provider contract suite, against a provider sharded over three apps.
struct ShardedPeer {
    fake: FakeFly,
    provider: Arc<dyn MachineProvider>,
}

#[async_trait]
impl ContractPeer for ShardedPeer {
    fn provider(&self) -> Arc<dyn MachineProvider> {
        self.provider.clone()
    }
    fn workload(&self) -> Workload {
        Workload::Image("registry.fly.io/bots:v1".into())
    }
    fn supports(&self, _: Scenario) -> bool {
        true
    }
    async fn refuse_next_launch(&self) {
        let refusal = Fault::Status {
            status: 422,
            retry_after: None,
        };
        self.fake.set_fault(FlyOp::Create, refusal, 1);
    }
    async fn set_never_start(&self, on: bool) {
        self.fake.set_never_start(on);
    }
    async fn throttle_next_launch(&self) {
        let throttle = Fault::Status {
            status: 429,
            retry_after: Some(1),
        };
        self.fake.set_fault(FlyOp::Create, throttle, 1);
    }
    async fn exit_bot(&self, handle: &str) {
        assert!(self.fake.exit_machine(id_of(handle), 0));
    }
    async fn create_foreign_machine(&self) {
        for app in &APPS[..3] {
            let resp = reqwest::Client::new()
                .post(format!("{}/apps/{app}/machines", self.fake.base_url()))
                .bearer_auth(TOKEN)
                .json(&json!({"name": "someone-elses", "config": {"image": "nginx"}}))
                .send()
                .await
                .unwrap();
            assert!(resp.status().is_success());
        }
    }
}

#[tokio::test]
async fn a_sharded_fly_passes_the_contract() {
    let fake = fake(&APPS[..3]).await;
    let provider = sharded(&fake, &APPS[..3]);
    let peer = ShardedPeer {
        fake: fake.clone(),
        provider,
    };
    let report = run_contract_suite(&peer).await;
    assert!(report.skipped.is_empty());
    let apps: BTreeSet<String> = fake.machines().into_iter().map(|m| m.app).collect();
    println!("contract over {apps:?}: {report:?}");
    assert!(
        fake.spec_violations().is_empty(),
        "{:?}",
        fake.spec_violations()
    );
}
