//! The `cloudrun` provider against the stateful Cloud Run fake: the contract suite with both
//! ways of getting tokens (metadata server, service-account key), token caching and refresh,
//! error mapping, and the requests' shape.

#![cfg(all(feature = "cloudrun", feature = "testkit"))]

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use chrono::Utc;
use providers::cloudrun::{CloudRunAuth, CloudRunConfig, CloudRunProvider, LABELS_ENV};
use providers::resilient::Resilient;
use providers::retry::RetryPolicy;
use providers::testkit::cloudrun_fake::{
    CloudRunOp, FakeCloudRun, FakeCloudRunConfig, FakeServiceAccount,
};
use providers::testkit::contract::{
    run_contract_suite, spec_for, ContractPeer, LaunchSpec, Scenario,
};
use providers::testkit::Fault;
use providers::{
    BuildContext, Deadline, MachineProvider, MachineState, ProviderError, ProviderSettings, Secret,
    Workload,
};
use serde_json::Value;

const KEY: &str = include_str!("fixtures/cloudrun-sa-key.json");
const UNTRUSTED_KEY: &str = include_str!("fixtures/cloudrun-sa-untrusted-key.json");
const PUBLIC_KEY: &str = include_str!("fixtures/cloudrun-sa-public.pem");
const STATIC_TOKEN: &str = "static-t0ken";
const JOB: &str = "bots";
const OTHER_JOB: &str = "bots-large";

#[derive(Clone, Copy)]
enum Auth {
    Metadata,
    Key,
    UntrustedKey,
    Static(&'static str),
}

fn fake_config() -> FakeCloudRunConfig {
    let key: Value = serde_json::from_str(KEY).unwrap();
    FakeCloudRunConfig {
        jobs: vec![JOB.into(), OTHER_JOB.into()],
        static_token: Some(STATIC_TOKEN.into()),
        service_account: Some(FakeServiceAccount {
            client_email: key["client_email"].as_str().unwrap().into(),
            key_id: key["private_key_id"].as_str().unwrap().into(),
            public_key_pem: PUBLIC_KEY.into(),
        }),
        start_delay: Duration::from_millis(50),
        cancel_delay: Duration::from_millis(30),
        // Small pages, so every listing of the suite pages.
        max_page_size: 2,
        ..FakeCloudRunConfig::default()
    }
}

/// The build context of every provider here: each call is bounded by 5 s.
fn ctx() -> BuildContext {
    BuildContext::new(reqwest::Client::new()).with_request_timeout(Duration::from_secs(5))
}

fn provider_config(fake: &FakeCloudRun) -> CloudRunConfig {
    CloudRunConfig {
        api_url: fake.api_url(),
        project: Some("botdispatch-test".into()),
        region: Some("europe-west1".into()),
        job: Some(JOB.into()),
        ..CloudRunConfig::default()
    }
}

fn provider_auth(fake: &FakeCloudRun, auth: Auth) -> CloudRunAuth {
    let key = |json: &str| CloudRunAuth::ServiceAccountKey {
        key_json: Secret::new(json),
        token_uri_override: Some(fake.token_uri()),
    };
    match auth {
        Auth::Metadata => CloudRunAuth::MetadataServer {
            host: fake.metadata_host(),
        },
        Auth::Key => key(KEY),
        Auth::UntrustedKey => key(UNTRUSTED_KEY),
        Auth::Static(token) => CloudRunAuth::StaticToken(Secret::new(token)),
    }
}

async fn start(
    auth: Auth,
    tweak: impl FnOnce(&mut FakeCloudRunConfig),
) -> (FakeCloudRun, Arc<CloudRunProvider>) {
    let mut config = fake_config();
    tweak(&mut config);
    let fake = FakeCloudRun::start(config).await;
    let provider =
        CloudRunProvider::new(&ctx(), &provider_config(&fake), provider_auth(&fake, auth))
            .expect("valid config");
    (fake, Arc::new(provider))
}

/// The fake saw no request outside the discovery document and gave no answer outside it.
fn assert_clean(fake: &FakeCloudRun) {
    let violations = fake.spec_violations();
    assert!(violations.is_empty(), "{violations:#?}");
}

struct CloudRunPeer {
    fake: FakeCloudRun,
    provider: Arc<dyn MachineProvider>,
}

#[async_trait]
impl ContractPeer for CloudRunPeer {
    fn provider(&self) -> Arc<dyn MachineProvider> {
        self.provider.clone()
    }
    fn workload(&self) -> Workload {
        // For cloudrun an agent's image names the job.
        Workload::Job(JOB.into())
    }
    fn supports(&self, _: Scenario) -> bool {
        true
    }
    async fn refuse_next_launch(&self) {
        self.fake
            .refuse_next_run("spec.template.spec.containers[0].image: Image 'bot:nope' not found.");
    }
    async fn set_never_start(&self, on: bool) {
        self.fake.set_never_start(on);
    }
    async fn throttle_next_launch(&self) {
        self.fake.throttle_next_run(Some(Duration::from_secs(1)));
    }
    async fn exit_bot(&self, handle: &str) {
        assert!(self.fake.exit_bot(handle, 0), "{handle} was running");
    }
    async fn create_foreign_machine(&self) {
        self.fake.create_foreign_execution(JOB);
    }
}

async fn contract(auth: Auth) -> FakeCloudRun {
    let (fake, provider) = start(auth, |_| {}).await;
    let peer = CloudRunPeer {
        fake: fake.clone(),
        provider,
    };
    let started = Instant::now();
    let report = run_contract_suite(&peer).await;
    let api_requests = fake
        .requests()
        .iter()
        .filter(|r| r.path.starts_with("/v2/"))
        .count();
    println!(
        "cloudrun contract suite: {:.2} s, {api_requests} Cloud Run API requests",
        started.elapsed().as_secs_f64(),
    );
    assert!(report.skipped.is_empty(), "{:?}", report.skipped);
    assert_clean(&fake);
    fake
}

#[tokio::test]
async fn cloudrun_passes_the_contract_with_metadata_server_tokens() {
    let fake = contract(Auth::Metadata).await;
    assert_eq!(
        fake.metadata_token_requests(),
        1,
        "one token for the whole suite"
    );
    assert_eq!(fake.oauth_token_requests(), 0);
}

#[tokio::test]
async fn cloudrun_passes_the_contract_with_a_service_account_key() {
    let fake = contract(Auth::Key).await;
    assert_eq!(
        fake.oauth_token_requests(),
        1,
        "one token for the whole suite"
    );
    assert_eq!(fake.metadata_token_requests(), 0);
}

#[tokio::test]
async fn concurrent_callers_share_one_token_request() {
    for auth in [Auth::Metadata, Auth::Key] {
        let (fake, provider) = start(auth, |_| {}).await;
        let checks = (0..20).map(|_| provider.check());
        for result in futures_util::future::join_all(checks).await {
            result.unwrap();
        }
        provider.check().await.unwrap();
        assert_eq!(
            fake.metadata_token_requests() + fake.oauth_token_requests(),
            1
        );
        assert_eq!(
            fake.requests()
                .iter()
                .filter(|r| r.path.starts_with("/v2/"))
                .count(),
            21
        );
        assert_clean(&fake);
    }
}

#[tokio::test]
async fn short_lived_tokens_are_refreshed_before_they_expire() {
    let (fake, provider) = start(Auth::Key, |c| c.token_lifetime = Duration::from_secs(2)).await;
    provider.check().await.unwrap();
    provider.check().await.unwrap();
    assert_eq!(fake.oauth_token_requests(), 1, "cached");
    // Tokens under two minutes are refreshed halfway through their life.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    provider.check().await.unwrap();
    assert_eq!(fake.oauth_token_requests(), 2, "refreshed");
    provider.check().await.unwrap();
    assert_eq!(fake.oauth_token_requests(), 2, "the new token is cached");
    assert!(
        fake.requests().iter().all(|r| r.status != 401),
        "no request went out with an expired token"
    );
}

#[tokio::test]
async fn a_token_refused_by_the_api_is_replaced_once() {
    let (fake, provider) = start(Auth::Metadata, |_| {}).await;
    provider.check().await.unwrap();
    fake.revoke_tokens();
    provider.check().await.unwrap();
    assert_eq!(fake.metadata_token_requests(), 2);
    let statuses: Vec<u16> = fake
        .requests()
        .iter()
        .filter(|r| r.path.starts_with("/v2/"))
        .map(|r| r.status)
        .collect();
    assert_eq!(statuses, [200, 401, 200]);
}

#[tokio::test]
async fn a_wrong_static_token_is_rejected_cleanly() {
    let (fake, provider) = start(Auth::Static("not-the-t0ken"), |_| {}).await;
    let err = provider.check().await.unwrap_err();
    match &err {
        ProviderError::Rejected {
            status: 401,
            message,
            ..
        } => {
            assert!(message.contains("UNAUTHENTICATED"), "{message}");
        }
        other => panic!("expected Rejected 401, got {other:?}"),
    }
    assert!(!format!("{err} {err:?}").contains("not-the-t0ken"));
    assert_eq!(fake.requests().len(), 1, "a static token is not retried");

    let (_fake, provider) = start(Auth::Static(STATIC_TOKEN), |_| {}).await;
    provider.check().await.unwrap();
}

#[tokio::test]
async fn an_untrusted_key_is_a_clean_config_error() {
    let (fake, provider) = start(Auth::UntrustedKey, |_| {}).await;
    let err = provider.check().await.unwrap_err();
    let text = format!("{err} {err:?}");
    assert!(matches!(err, ProviderError::Config { .. }), "{text}");
    assert!(
        text.contains("invalid_grant: Invalid JWT Signature."),
        "{text}"
    );
    for secret in ["PRIVATE KEY", "eyJ"] {
        assert!(!text.contains(secret), "{text}");
    }
    assert_eq!(fake.oauth_token_requests(), 1);
    assert!(fake.requests().iter().all(|r| !r.path.starts_with("/v2/")));
}

#[tokio::test]
async fn token_endpoint_trouble_is_transient() {
    let (fake, provider) = start(Auth::Metadata, |_| {}).await;
    fake.set_fault(
        CloudRunOp::MetadataToken,
        Fault::Status {
            status: 503,
            retry_after: None,
        },
        1,
    );
    let err = provider.check().await.unwrap_err();
    assert!(matches!(err, ProviderError::Unavailable { .. }), "{err:?}");
    provider.check().await.unwrap();
}

#[tokio::test]
async fn the_metadata_server_wants_its_header() {
    let (fake, _) = start(Auth::Metadata, |_| {}).await;
    let url = format!(
        "http://{}/computeMetadata/v1/instance/service-accounts/default/token",
        fake.metadata_host()
    );
    let http = reqwest::Client::new();
    assert_eq!(http.get(&url).send().await.unwrap().status(), 403);
    let answer: Value = http
        .get(&url)
        .header("Metadata-Flavor", "Google")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!(answer["access_token"]
        .as_str()
        .unwrap()
        .starts_with("ya29."));
    assert_eq!(answer["expires_in"], 3600);
}

#[tokio::test]
async fn resource_exhausted_is_throttled_with_its_retry_hint() {
    let (fake, provider) = start(Auth::Metadata, |_| {}).await;
    let peer = CloudRunPeer {
        fake: fake.clone(),
        provider: provider.clone(),
    };
    fake.throttle_next_run(Some(Duration::from_millis(1500)));
    match spec_for(&peer, "quota").launch(&*provider).await {
        Err(ProviderError::Throttled { retry_after, .. }) => {
            assert_eq!(
                retry_after,
                Some(Duration::from_millis(1500)),
                "from google.rpc.RetryInfo"
            );
        }
        other => panic!("expected Throttled, got {other:?}"),
    }
    fake.set_fault(
        CloudRunOp::Run,
        Fault::Status {
            status: 429,
            retry_after: Some(7),
        },
        1,
    );
    match spec_for(&peer, "quota").launch(&*provider).await {
        Err(ProviderError::Throttled { retry_after, .. }) => {
            assert_eq!(
                retry_after,
                Some(Duration::from_secs(7)),
                "from Retry-After"
            );
        }
        other => panic!("expected Throttled, got {other:?}"),
    }
    assert!(fake.executions().is_empty());
}

#[tokio::test]
async fn a_run_operation_done_with_an_error_is_rejected() {
    let (fake, provider) = start(Auth::Metadata, |_| {}).await;
    let peer = CloudRunPeer {
        fake: fake.clone(),
        provider: provider.clone(),
    };
    fake.fail_next_run_operation(9, "Job 'bots' is not ready: the latest revision failed.");
    match spec_for(&peer, "opfail").launch(&*provider).await {
        Err(ProviderError::Rejected {
            status, message, ..
        }) => {
            assert_eq!(status, 400);
            assert!(message.contains("is not ready"), "{message}");
        }
        other => panic!("expected Rejected, got {other:?}"),
    }
    assert!(fake.executions().is_empty());
    assert_clean(&fake);
}

#[tokio::test]
async fn a_lost_run_answer_adopts_the_execution_instead_of_running_twice() {
    let (fake, provider) = start(Auth::Metadata, |_| {}).await;
    let peer = CloudRunPeer {
        fake: fake.clone(),
        provider: provider.clone(),
    };
    // Adoption lives in the resilient wrapper (the provider reports the ambiguous run).
    let resilient = Resilient::new(provider.clone(), RetryPolicy::default(), 0.0);
    // The run happens, but the answer is a 503.
    fake.set_fault(CloudRunOp::Run, Fault::GhostCreate { status: 503 }, 1);
    let spec = spec_for(&peer, "ghost");
    let launched = spec.launch(&resilient).await.expect("adopted");
    let executions = fake.executions();
    assert_eq!(executions.len(), 1);
    assert_eq!(launched.handle, executions[0].name);

    // The run never happens (connection reset): nothing to adopt, a transient error (with no
    // retry behind it, to see the error the adoption attempt leaves).
    let no_retry = Resilient::new(
        provider.clone(),
        RetryPolicy {
            max_retries: 0,
            ..RetryPolicy::default()
        },
        0.0,
    );
    fake.set_fault(CloudRunOp::Run, Fault::Reset, 1);
    let err = spec_for(&peer, "reset")
        .launch(&no_retry)
        .await
        .unwrap_err();
    assert!(err.is_transient(), "{err:?}");
    assert_eq!(fake.executions().len(), 1);

    // The bare provider does not adopt by itself: a lost run answer is Unavailable.
    fake.set_fault(CloudRunOp::Run, Fault::GhostCreate { status: 503 }, 1);
    match spec_for(&peer, "bare").launch(&*provider).await {
        Err(e @ ProviderError::Unavailable { .. }) => assert!(e.is_transient()),
        other => panic!("expected Unavailable, got {other:?}"),
    }
    assert_eq!(fake.executions().len(), 2, "the run happened all the same");
    assert_clean(&fake);
}

#[tokio::test]
async fn the_run_request_carries_the_contract_labels_args_and_deadline() {
    let (fake, provider) = start(Auth::Metadata, |_| {}).await;
    let peer = CloudRunPeer {
        fake: fake.clone(),
        provider: provider.clone(),
    };
    let mut spec: LaunchSpec = spec_for(&peer, "shape");
    spec.template.workload = Workload::Job(OTHER_JOB.into());
    spec.template.cmd = Some(vec!["python".into(), "bot.py".into()]);
    spec.session.labels.deadline = Deadline::from_unix_secs(Utc::now().timestamp() + 300).unwrap();
    let launched = spec.launch(&*provider).await.unwrap();
    assert!(
        launched
            .handle
            .contains("/jobs/bots-large/executions/bots-large-"),
        "{}",
        launched.handle
    );
    assert_eq!(launched.region.as_deref(), Some("europe-west1"));

    let run = fake
        .requests()
        .into_iter()
        .find(|r| r.path.ends_with(":run"))
        .unwrap();
    assert_eq!(
        run.path,
        "/v2/projects/botdispatch-test/locations/europe-west1/jobs/bots-large:run"
    );
    let overrides = &run.body.unwrap()["overrides"];
    assert_eq!(overrides["taskCount"], 1);
    let timeout: u64 = overrides["timeout"]
        .as_str()
        .unwrap()
        .trim_end_matches('s')
        .parse()
        .unwrap();
    assert!((295..=301).contains(&timeout), "{timeout}");
    let container = &overrides["containerOverrides"][0];
    assert_eq!(container["args"], serde_json::json!(["python", "bot.py"]));
    let env: Vec<(&str, &str)> = container["env"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| (v["name"].as_str().unwrap(), v["value"].as_str().unwrap()))
        .collect();
    for (name, value) in spec.session.machine_env(&spec.template) {
        assert!(env.contains(&(name, value)), "{name}");
    }
    let labels = env.iter().find(|(n, _)| *n == LABELS_ENV).unwrap().1;
    let labels: Value = serde_json::from_str(labels).unwrap();
    assert_eq!(labels["managed_by"], "botdispatch");
    assert_eq!(
        labels["botdispatch_session"],
        spec.session.labels.session_key.as_str()
    );

    // The execution of another job is found and listed (the listings span every job) and
    // carries the job's own env merged with the overrides.
    let execution = fake.execution(&launched.handle).unwrap();
    assert_eq!(
        execution.env[0],
        ("LOG_LEVEL".to_owned(), "info".to_owned())
    );
    let found = provider
        .find(&spec.session.labels.session_key)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(found.handle, launched.handle);
    assert_eq!(found.labels.as_ref(), Some(&spec.session.labels));
    assert!(provider
        .list_managed()
        .await
        .unwrap()
        .iter()
        .any(|m| m.handle == launched.handle));

    // No image: the configured job.
    let mut spec = spec_for(&peer, "default-job");
    spec.template.workload = provider_config(&fake)
        .workload("default", None, None)
        .unwrap();
    let launched = spec.launch(&*provider).await.unwrap();
    assert!(
        launched.handle.contains("/jobs/bots/executions/bots-"),
        "{}",
        launched.handle
    );
    assert_clean(&fake);
}

#[tokio::test]
async fn specs_cloud_run_cannot_honour_are_refused_before_any_request() {
    let (fake, provider) = start(Auth::Metadata, |_| {}).await;
    let peer = CloudRunPeer {
        fake: fake.clone(),
        provider: provider.clone(),
    };
    let mut image = spec_for(&peer, "image");
    image.template.workload = Workload::Job("us-docker.pkg.dev/p/bots/bot:1".into());
    let mut image_kind = spec_for(&peer, "image-kind");
    image_kind.template.workload = Workload::Image("us-docker.pkg.dev/p/bots/bot:1".into());
    let mut reserved = spec_for(&peer, "reserved");
    reserved.session.env.insert(LABELS_ENV.into(), "{}".into());
    let mut reserved_static = spec_for(&peer, "reserved-static");
    reserved_static
        .template
        .env
        .insert(LABELS_ENV.into(), "{}".into());
    let mut region = spec_for(&peer, "region");
    region.template.region = Some("us-central1".into());
    for spec in [image, image_kind, reserved, reserved_static, region] {
        match spec.launch(&*provider).await {
            Err(ProviderError::Rejected {
                status: 400,
                message,
                ..
            }) => println!("refused: {message}"),
            other => panic!("expected Rejected, got {other:?}"),
        }
    }
    assert!(fake.requests().is_empty());
}

#[tokio::test]
async fn a_bot_that_fails_reads_as_failed_and_cancelling_it_is_success() {
    let (fake, provider) = start(Auth::Metadata, |_| {}).await;
    let peer = CloudRunPeer {
        fake: fake.clone(),
        provider: provider.clone(),
    };
    let launched = spec_for(&peer, "crash").launch(&*provider).await.unwrap();
    provider
        .wait_started(&launched, Deadline::after(Duration::from_secs(5)))
        .await
        .unwrap();
    assert!(fake.exit_bot(&launched.handle, 3));
    let status = provider.status(&launched.handle).await.unwrap().unwrap();
    assert_eq!(status.state, MachineState::Failed);
    assert_eq!(status.provider_state, "FAILED");
    assert!(
        status.detail.as_deref().unwrap().contains("exit code 3"),
        "{status:?}"
    );
    assert!(status.ended_at.is_some() && status.started_at.is_some());

    // Cloud Run refuses to cancel a completed execution; the provider checks and is content.
    provider.terminate(&launched.handle).await.unwrap();
    let cancel = fake
        .requests()
        .into_iter()
        .find(|r| r.path.ends_with(":cancel"))
        .unwrap();
    assert_eq!(cancel.status, 400);
    assert_clean(&fake);
}

#[tokio::test]
async fn an_execution_cancelled_before_it_ran_fails_the_wait_at_once() {
    let (fake, provider) = start(Auth::Metadata, |_| {}).await;
    let peer = CloudRunPeer {
        fake: fake.clone(),
        provider: provider.clone(),
    };
    fake.set_never_start(true);
    let launched = spec_for(&peer, "cancel").launch(&*provider).await.unwrap();
    provider.terminate(&launched.handle).await.unwrap();
    let t = Instant::now();
    match provider
        .wait_started(&launched, Deadline::after(Duration::from_secs(5)))
        .await
    {
        Err(ProviderError::StartFailed { message, .. }) => {
            assert!(message.contains("cancel"), "{message}")
        }
        other => panic!("expected StartFailed, got {other:?}"),
    }
    assert!(t.elapsed() < Duration::from_secs(1));
    tokio::time::sleep(Duration::from_millis(100)).await;
    let status = provider.status(&launched.handle).await.unwrap().unwrap();
    assert_eq!(
        (status.state, status.provider_state.as_str()),
        (MachineState::Ended, "CANCELLED")
    );
    assert!(status.started_at.is_none() && status.ended_at.is_some());
    assert_clean(&fake);
}

#[tokio::test]
async fn unknown_and_malformed_handles() {
    let (fake, provider) = start(Auth::Metadata, |_| {}).await;
    let unknown =
        "projects/botdispatch-test/locations/europe-west1/jobs/bots/executions/bots-zzzzz";
    assert!(provider.status(unknown).await.unwrap().is_none());
    provider.terminate(unknown).await.unwrap();
    for garbage in ["bots-zzzzz", "projects/x/../../v1/secrets"] {
        assert!(matches!(
            provider.status(garbage).await,
            Err(ProviderError::Rejected { status: 400, .. })
        ));
        assert!(provider.terminate(garbage).await.is_err());
    }
    assert_eq!(
        fake.requests()
            .iter()
            .filter(|r| r.path.starts_with("/v2/"))
            .count(),
        2
    );
}

#[tokio::test]
async fn server_errors_are_transient_and_listing_pages_through_everything() {
    let (fake, provider) = start(Auth::Metadata, |_| {}).await;
    let peer = CloudRunPeer {
        fake: fake.clone(),
        provider: provider.clone(),
    };
    let mut handles = Vec::new();
    for i in 0..5 {
        handles.push(
            spec_for(&peer, &format!("page{i}"))
                .launch(&*provider)
                .await
                .unwrap()
                .handle,
        );
    }
    fake.create_foreign_execution(OTHER_JOB);
    let listed = provider.list_managed().await.unwrap();
    assert_eq!(listed.len(), 5, "{listed:?}");
    assert!(handles
        .iter()
        .all(|h| listed.iter().any(|m| &m.handle == h)));
    let pages = fake
        .requests()
        .iter()
        .filter(|r| r.path.ends_with("/jobs/-/executions"))
        .count();
    assert_eq!(pages, 3, "6 executions in pages of 2");

    fake.set_fault(
        CloudRunOp::GetExecution,
        Fault::Status {
            status: 503,
            retry_after: None,
        },
        1,
    );
    let err = provider.status(&handles[0]).await.unwrap_err();
    assert!(matches!(err, ProviderError::Unavailable { .. }), "{err:?}");
    fake.set_fault(CloudRunOp::ListExecutions, Fault::Reset, 1);
    assert!(provider.list_managed().await.unwrap_err().is_transient());
    assert_clean(&fake);
}

#[tokio::test]
async fn check_reads_the_configured_job() {
    let (fake, provider) = start(Auth::Metadata, |_| {}).await;
    provider.check().await.unwrap();
    assert_clean(&fake);
    let mut config = provider_config(&fake);
    config.job = Some("missing".into());
    let provider =
        CloudRunProvider::new(&ctx(), &config, provider_auth(&fake, Auth::Metadata)).unwrap();
    match provider.check().await {
        Err(ProviderError::Rejected {
            status: 404,
            message,
            ..
        }) => {
            assert!(message.contains("does not exist"), "{message}")
        }
        other => panic!("expected Rejected 404, got {other:?}"),
    }
}

#[tokio::test]
async fn configs_are_validated_without_io_and_never_print_secrets() {
    let fake = FakeCloudRun::start(fake_config()).await;
    let config = provider_config(&fake);
    let auth = provider_auth(&fake, Auth::Key);
    let printed = format!("{config:?} {auth:?}");
    assert!(!printed.contains("PRIVATE KEY"), "{printed}");

    let build =
        |c: &CloudRunConfig, auth: CloudRunAuth| match CloudRunProvider::new(&ctx(), c, auth) {
            Err(e @ ProviderError::Config { .. }) => e.to_string(),
            Err(other) => panic!("expected Config, got {other:?}"),
            Ok(_) => panic!("accepted"),
        };
    let broken = |edit: fn(&mut CloudRunConfig)| {
        let mut c = provider_config(&fake);
        edit(&mut c);
        build(&c, provider_auth(&fake, Auth::Key))
    };
    let err = broken(|c| c.api_url = "not a url".into());
    assert!(
        err.contains("cloudrun.api_url (CLOUD_RUN_API_URL)"),
        "{err}"
    );
    let err = broken(|c| c.job = Some("Bots".into()));
    assert!(
        err.contains("cloudrun.job (BOTDISPATCH_CLOUDRUN_JOB)"),
        "{err}"
    );
    let err = broken(|c| c.region = Some(String::new()));
    assert!(
        err.contains("cloudrun.region (BOTDISPATCH_CLOUDRUN_REGION)"),
        "{err}"
    );
    let err = broken(|c| c.project = Some("a/b".into()));
    assert!(
        err.contains(
            "cloudrun.project (BOTDISPATCH_CLOUDRUN_PROJECT) = \"a/b\" is not a project id"
        ),
        "{err}"
    );
    let err = build(
        &provider_config(&fake),
        CloudRunAuth::ServiceAccountKey {
            key_json: Secret::new(KEY.replace("-----END PRIVATE KEY-----", "")),
            token_uri_override: None,
        },
    );
    assert!(!err.contains("MII"), "{err}");
    build(
        &provider_config(&fake),
        CloudRunAuth::StaticToken(Secret::new("")),
    );
    assert!(fake.requests().is_empty());
}

#[tokio::test]
async fn the_fake_refuses_requests_outside_the_discovery_document() {
    let fake = FakeCloudRun::start(fake_config()).await;
    let http = reqwest::Client::new();
    let run = format!(
        "{}/projects/botdispatch-test/locations/europe-west1/jobs/bots:run",
        fake.api_url()
    );
    let send = |body: Value| http.post(&run).bearer_auth(STATIC_TOKEN).json(&body).send();
    // `labels` is no field of RunJobRequest.overrides; `taskCount` is an integer.
    for body in [
        serde_json::json!({"overrides": {"labels": {"a": "b"}}}),
        serde_json::json!({"overrides": {"taskCount": "1"}}),
    ] {
        let answer = send(body).await.unwrap();
        assert_eq!(answer.status(), 400);
        let error: Value = answer.json().await.unwrap();
        assert_eq!(error["error"]["status"], "INVALID_ARGUMENT");
    }
    let violations = fake.spec_violations();
    assert_eq!(violations.len(), 2, "{violations:#?}");
    assert!(
        violations[0].contains("Unknown name \"labels\""),
        "{violations:#?}"
    );
    assert!(fake.executions().is_empty());

    // Well-formed but unauthenticated: 401 in Google's error shape, nothing recorded as a
    // violation.
    let answer = http
        .post(&run)
        .json(&serde_json::json!({}))
        .send()
        .await
        .unwrap();
    assert_eq!(answer.status(), 401);
    let error: Value = answer.json().await.unwrap();
    assert_eq!(error["error"]["status"], "UNAUTHENTICATED");
    assert_eq!(fake.spec_violations().len(), 2);
}
