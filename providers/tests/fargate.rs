//! The `fargate` provider against the stateful ECS fake (every contract scenario, idempotency,
//! error mapping, request shapes) and against a real moto server (the scenarios moto can stage).
//!
//! moto is started from the test (`python3 -m moto.server`, installed with
//! `pip install 'moto[server]'`, which ./scripts/test does); without it the moto test fails and
//! says how to install it: it is never reported as passed without running. Two moto gaps are bridged in the test, each where it is
//! defined: numeric container sizes in its answers ([`MotoTypeFix`]) and tasks without
//! timestamps ([`MotoTimestamps`]).

#![cfg(all(feature = "testkit", feature = "fargate"))]

use std::process::Stdio;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use aws_config::{BehaviorVersion, SdkConfig};
use aws_sdk_ecs::config::{Credentials, Region, SharedCredentialsProvider};
use aws_sdk_ecs::types::{
    AssignPublicIp, AwsVpcConfiguration, Compatibility, ContainerDefinition, LaunchType,
    NetworkConfiguration, NetworkMode,
};
use chrono::Utc;
use providers::fargate::{FargateConfig, FargateProvider, STOP_REASON};
use providers::retry::{Op, RateLimit};
use providers::testkit::contract::{
    run_contract_suite, spec_for, ContractPeer, LaunchSpec, Scenario,
};
use providers::testkit::ecs_fake::{EcsFault, EcsOp, FakeEcs, FakeEcsConfig};
use providers::testkit::Fault;
use providers::{
    BuildContext, Deadline, Launched, MachineProvider, MachineState, MachineStatus,
    MachineTemplate, ProviderError, ProviderSettings, Relabel, SessionBinding, Workload,
};
use serde_json::{json, Value};
use tokio::io::AsyncReadExt;

const SECRET: &str = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYFAKEKEY";
const SUBNET: &str = "subnet-0a1b2c3d";

fn sdk_config(key_id: &str) -> SdkConfig {
    SdkConfig::builder()
        .behavior_version(BehaviorVersion::latest())
        .region(Region::new("us-east-1"))
        .credentials_provider(SharedCredentialsProvider::new(Credentials::new(
            key_id, SECRET, None, None, "test",
        )))
        .build()
}

/// The build context of every provider here: each call is bounded by 5 s.
fn ctx() -> BuildContext {
    BuildContext::new(reqwest::Client::new()).with_request_timeout(Duration::from_secs(5))
}

fn fargate_config(endpoint: &str) -> FargateConfig {
    FargateConfig {
        cluster: Some("bots".into()),
        task_definition: Some("bot".into()),
        container_name: "bot".into(),
        subnets: vec![SUBNET.into()],
        security_groups: vec!["sg-0123".into()],
        assign_public_ip: false,
        spot: false,
        region: None,
        endpoint_url: Some(endpoint.into()),
    }
}

fn fake_config() -> FakeEcsConfig {
    FakeEcsConfig {
        provisioning_for: Duration::from_millis(20),
        pending_for: Duration::from_millis(20),
        stop_delay: Duration::from_millis(20),
        ..FakeEcsConfig::default()
    }
}

/// A plain SDK client, for what a test does outside the provider (foreign tasks, moto setup).
fn ecs_client(endpoint: &str, key_id: &str) -> aws_sdk_ecs::Client {
    let config = aws_sdk_ecs::config::Builder::from(&sdk_config(key_id))
        .endpoint_url(endpoint)
        .build();
    aws_sdk_ecs::Client::from_conf(config)
}

/// Starts a task the way someone else would: no botdispatch tags.
async fn run_foreign_task(ecs: &aws_sdk_ecs::Client, subnet: &str) {
    let vpc = AwsVpcConfiguration::builder()
        .subnets(subnet)
        .security_groups("sg-0123")
        .assign_public_ip(AssignPublicIp::Disabled)
        .build()
        .unwrap();
    ecs.run_task()
        .cluster("bots")
        .task_definition("bot")
        .launch_type(LaunchType::Fargate)
        .network_configuration(
            NetworkConfiguration::builder()
                .awsvpc_configuration(vpc)
                .build(),
        )
        .started_by("someone-else")
        .send()
        .await
        .expect("foreign RunTask");
}

struct FakePeer {
    fake: FakeEcs,
    provider: Arc<FargateProvider>,
    /// The provider's settings, for what the configuration layer resolves (default workload).
    config: FargateConfig,
    ecs: aws_sdk_ecs::Client,
}

impl FakePeer {
    async fn start(fake_config: FakeEcsConfig) -> Self {
        Self::with(fake_config, |_| {}).await
    }

    async fn with(fake_config: FakeEcsConfig, edit: impl FnOnce(&mut FargateConfig)) -> Self {
        Self::with_ctx(fake_config, ctx(), edit).await
    }

    async fn with_ctx(
        fake_config: FakeEcsConfig,
        ctx: BuildContext,
        edit: impl FnOnce(&mut FargateConfig),
    ) -> Self {
        let key_id = fake_config.access_key_id.clone();
        let fake = FakeEcs::start(fake_config).await;
        let mut config = fargate_config(&fake.endpoint_url());
        edit(&mut config);
        let provider =
            FargateProvider::from_sdk_config(&ctx, &sdk_config(&key_id), config.clone()).unwrap();
        Self {
            ecs: ecs_client(&fake.endpoint_url(), &key_id),
            fake,
            provider: Arc::new(provider),
            config,
        }
    }

    fn spec(&self, tag: &str) -> LaunchSpec {
        spec_for(self, tag)
    }

    async fn launch(&self, spec: &LaunchSpec) -> Result<Launched, ProviderError> {
        spec.launch(&*self.provider).await
    }

    fn assert_no_violations(&self) {
        let violations = self.fake.spec_violations();
        assert!(violations.is_empty(), "{violations:#?}");
    }
}

#[async_trait]
impl ContractPeer for FakePeer {
    fn provider(&self) -> Arc<dyn MachineProvider> {
        self.provider.clone()
    }
    fn workload(&self) -> Workload {
        // For fargate an agent's image names the task definition.
        Workload::TaskDefinition("bot".into())
    }
    fn supports(&self, _: Scenario) -> bool {
        true
    }
    async fn refuse_next_launch(&self) {
        self.fake.set_fault(
            EcsOp::RunTask,
            EcsFault::RunTaskFailure {
                reason: "RESOURCE:ENI".into(),
                detail: Some("no free network interfaces in subnet".into()),
            },
            1,
        );
    }
    async fn set_never_start(&self, on: bool) {
        self.fake.set_never_start(on);
    }
    async fn throttle_next_launch(&self) {
        self.fake
            .set_fault(EcsOp::RunTask, EcsFault::throttling(), 1);
    }
    async fn exit_bot(&self, handle: &str) {
        assert!(self.fake.exit_task(handle, 0), "task {handle} was running");
    }
    async fn create_foreign_machine(&self) {
        run_foreign_task(&self.ecs, SUBNET).await;
    }
}

#[tokio::test]
async fn fargate_passes_the_contract_against_the_fake() {
    let peer = FakePeer::start(fake_config()).await;
    let report = run_contract_suite(&peer).await;
    assert!(report.skipped.is_empty(), "{:?}", report.skipped);
    println!(
        "fargate contract suite against the ECS fake: {:.2} s",
        report.elapsed.as_secs_f64()
    );
    peer.assert_no_violations();
}

#[tokio::test]
async fn a_retried_launch_starts_one_task() {
    let peer = FakePeer::start(fake_config()).await;
    let spec = peer.spec("idem");
    let first = peer.launch(&spec).await.unwrap();
    let second = peer.launch(&spec).await.unwrap();
    assert_eq!(first, second);
    assert_eq!(peer.fake.tasks().len(), 1);
    let tokens: Vec<Value> = peer
        .fake
        .bodies(EcsOp::RunTask)
        .iter()
        .map(|b| b["clientToken"].clone())
        .collect();
    assert_eq!(tokens.len(), 2);
    assert_eq!(tokens[0], tokens[1]);
    assert!(tokens[0].as_str().unwrap().len() <= 64);

    // The same session launched with other parameters is a conflict, not a second task.
    let mut changed = spec.clone();
    changed.session.env.insert("EXTRA".into(), "1".into());
    match peer.launch(&changed).await {
        Err(ProviderError::Conflict { name, .. }) => assert_eq!(name, spec.session.name),
        other => panic!("expected Conflict, got {other:?}"),
    }
    assert_eq!(peer.fake.tasks().len(), 1);

    // ECS started the task but the answer was lost: the retry gets that task, not a second one.
    let lost = peer.spec("lost");
    peer.fake
        .set_fault(EcsOp::RunTask, Fault::GhostCreate { status: 500 }, 1);
    match peer.launch(&lost).await {
        Err(e @ ProviderError::Unavailable { .. }) => assert!(e.is_transient()),
        other => panic!("expected Unavailable, got {other:?}"),
    }
    assert_eq!(peer.fake.tasks().len(), 2);
    let retried = peer.launch(&lost).await.unwrap();
    let tasks = peer.fake.tasks();
    assert_eq!(tasks.len(), 2);
    assert_eq!(tasks[1].arn, retried.handle);
    peer.assert_no_violations();
}

#[tokio::test]
async fn launch_sends_the_bot_contract_and_labels_round_trip() {
    let peer = FakePeer::start(fake_config()).await;
    let mut spec = peer.spec("shape");
    spec.template.workload = Workload::TaskDefinition("bot:1".into());
    spec.template.cmd = Some(vec!["python".into(), "bot.py".into()]);
    spec.session.labels.owner = "auth0|alice 🎙".into();
    spec.template.guest.memory_mb = 2500;
    let launched = peer.launch(&spec).await.unwrap();
    assert!(launched.handle.starts_with("arn:aws:ecs:us-east-1:"));
    assert_eq!(launched.region.as_deref(), Some("us-east-1"));
    assert_eq!(launched.version, None);

    let body = peer.fake.bodies(EcsOp::RunTask).remove(0);
    let env: Vec<Value> = spec
        .session
        .machine_env(&spec.template)
        .iter()
        .map(|(k, v)| json!({"name": k, "value": v}))
        .collect();
    assert_eq!(body["cluster"], "bots");
    assert_eq!(body["taskDefinition"], "bot:1");
    assert_eq!(body["launchType"], "FARGATE");
    assert!(body.get("capacityProviderStrategy").is_none());
    assert_eq!(body["count"], 1);
    assert_eq!(
        body["networkConfiguration"],
        json!({"awsvpcConfiguration": {"subnets": [SUBNET], "securityGroups": ["sg-0123"],
            "assignPublicIp": "DISABLED"}})
    );
    assert_eq!(
        body["overrides"],
        json!({"containerOverrides": [{"name": "bot", "environment": env,
            "command": ["python", "bot.py"]}], "cpu": "1024", "memory": "3072"})
    );
    assert_eq!(body["startedBy"], spec.session.labels.session_key.as_str());
    let owner_tag = body["tags"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["key"] == "botdispatch_owner")
        .unwrap()["value"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(owner_tag.starts_with("b64."), "{owner_tag}");

    peer.provider
        .wait_started(&launched, Deadline::after(Duration::from_secs(5)))
        .await
        .unwrap();
    let status = peer
        .provider
        .status(&launched.handle)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(status.state, MachineState::Started);
    assert_eq!(status.provider_state, "RUNNING");
    assert_eq!(status.labels.as_ref(), Some(&spec.session.labels));
    assert!(status.created_at.is_some() && status.started_at.is_some());
    assert!(status.started_at >= status.created_at);

    // An agent without an image runs the configured task definition.
    let mut default_td = peer.spec("default");
    default_td.template.workload = peer.config.workload("default", None, None).unwrap();
    peer.launch(&default_td).await.unwrap();
    assert_eq!(peer.fake.bodies(EcsOp::RunTask)[1]["taskDefinition"], "bot");
    peer.assert_no_violations();
}

#[tokio::test]
async fn spot_runs_on_a_fargate_spot_capacity_provider() {
    let peer = FakePeer::with(fake_config(), |c| {
        c.spot = true;
        c.assign_public_ip = true;
        c.security_groups.clear();
    })
    .await;
    let launched = peer.launch(&peer.spec("spot")).await.unwrap();
    let body = peer.fake.bodies(EcsOp::RunTask).remove(0);
    assert!(body.get("launchType").is_none());
    assert_eq!(
        body["capacityProviderStrategy"],
        json!([{"capacityProvider": "FARGATE_SPOT", "weight": 1, "base": 0}])
    );
    let vpc = &body["networkConfiguration"]["awsvpcConfiguration"];
    assert_eq!(vpc["assignPublicIp"], "ENABLED");
    assert_eq!(vpc["securityGroups"], json!([]));
    assert_eq!(
        peer.fake.task(&launched.handle).unwrap().capacity_provider,
        "FARGATE_SPOT"
    );
    peer.provider
        .wait_started(&launched, Deadline::after(Duration::from_secs(5)))
        .await
        .unwrap();
    peer.assert_no_violations();
}

#[tokio::test]
async fn ecs_failures_map_to_provider_errors() {
    let peer = FakePeer::with_ctx(
        fake_config(),
        ctx().with_request_timeout(Duration::from_millis(300)),
        |_| {},
    )
    .await;
    let provider = &peer.provider;
    let launch = |tag: &str| {
        let spec = peer.spec(tag);
        let peer = &peer;
        async move { peer.launch(&spec).await }
    };

    peer.refuse_next_launch().await;
    match launch("failures").await {
        Err(ProviderError::Rejected { message, .. }) => {
            assert!(message.contains("RESOURCE:ENI"), "{message}");
            assert!(message.contains("no free network interfaces"), "{message}");
        }
        other => panic!("expected Rejected, got {other:?}"),
    }

    peer.throttle_next_launch().await;
    assert!(matches!(
        launch("throttled").await,
        Err(ProviderError::Throttled {
            retry_after: None,
            ..
        })
    ));
    let status = |status: u16, retry_after: Option<u64>| {
        EcsFault::Http(Fault::Status {
            status,
            retry_after,
        })
    };
    peer.fake.set_fault(EcsOp::RunTask, status(429, Some(2)), 1);
    assert!(matches!(
        launch("429").await,
        Err(ProviderError::Throttled { retry_after: Some(d), .. }) if d == Duration::from_secs(2)
    ));
    peer.fake.set_fault(EcsOp::RunTask, status(500, None), 1);
    assert!(matches!(
        launch("500").await,
        Err(ProviderError::Unavailable { .. })
    ));
    peer.fake.set_fault(EcsOp::RunTask, Fault::Reset, 1);
    assert!(matches!(
        launch("reset").await,
        Err(ProviderError::Unavailable { .. })
    ));
    // One request each (the SDK does not retry behind our back) and no task started.
    assert_eq!(peer.fake.bodies(EcsOp::RunTask).len(), 5);
    assert!(peer.fake.tasks().is_empty());
    peer.fake
        .set_fault(EcsOp::RunTask, Fault::Stall(Duration::from_millis(1500)), 1);
    let t = Instant::now();
    match launch("stall").await {
        Err(e @ ProviderError::Unavailable { .. }) => assert!(e.is_transient()),
        other => panic!("expected Unavailable, got {other:?}"),
    }
    assert!(t.elapsed() < Duration::from_secs(1), "{:?}", t.elapsed());

    let mut unknown_td = peer.spec("td");
    unknown_td.template.workload = Workload::TaskDefinition("no-such-family".into());
    match peer.launch(&unknown_td).await {
        Err(ProviderError::Rejected {
            status: 400,
            message,
            ..
        }) => {
            assert!(message.contains("ClientException"), "{message}")
        }
        other => panic!("expected Rejected, got {other:?}"),
    }
    let mut huge = peer.spec("huge");
    huge.template.guest.cpus = 64;
    assert!(matches!(
        peer.launch(&huge).await,
        Err(ProviderError::Rejected { .. })
    ));
    let mut elsewhere = peer.spec("region");
    elsewhere.template.region = Some("eu-west-1".into());
    assert!(matches!(
        peer.launch(&elsewhere).await,
        Err(ProviderError::Rejected { .. })
    ));

    // Bad credentials: refused, and the secret never shows.
    let wrong = FargateProvider::from_sdk_config(
        &ctx(),
        &sdk_config("AKIDSOMEONEELSE"),
        fargate_config(&peer.fake.endpoint_url()),
    )
    .unwrap();
    let err = wrong.check().await.unwrap_err();
    let text = format!("{err} {err:?} {wrong:?}");
    assert!(matches!(err, ProviderError::Rejected { .. }), "{text}");
    assert!(text.contains("UnrecognizedClientException"), "{text}");
    assert!(!text.contains(SECRET), "{text}");

    provider.check().await.unwrap();
    let missing = FargateProvider::from_sdk_config(
        &ctx(),
        &sdk_config(&peer.fake.config().access_key_id),
        FargateConfig {
            cluster: Some("nope".into()),
            ..fargate_config(&peer.fake.endpoint_url())
        },
    )
    .unwrap();
    match missing.check().await {
        Err(ProviderError::Rejected {
            status: 404,
            message,
            ..
        }) => {
            assert!(message.contains("MISSING"), "{message}")
        }
        other => panic!("expected Rejected, got {other:?}"),
    }
    assert!(matches!(
        peer.spec("nocluster").launch(&missing).await,
        Err(ProviderError::Rejected { .. })
    ));

    // Nothing listens here any more.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", closed.local_addr().unwrap());
    drop(closed);
    let gone = FargateProvider::from_sdk_config(
        &ctx(),
        &sdk_config(&peer.fake.config().access_key_id),
        fargate_config(&url),
    )
    .unwrap();
    assert!(matches!(
        gone.check().await,
        Err(ProviderError::Unavailable { .. })
    ));
    peer.assert_no_violations();
}

#[tokio::test]
async fn wait_started_fails_fast_when_a_task_cannot_start() {
    let peer = FakePeer::start(fake_config()).await;
    peer.fake.set_fail_start(Some(
        "CannotPullContainerError: pull access denied for bot".into(),
    ));
    let launched = peer.launch(&peer.spec("pull")).await.unwrap();
    let t = Instant::now();
    match peer
        .provider
        .wait_started(&launched, Deadline::after(Duration::from_secs(10)))
        .await
    {
        Err(ProviderError::StartFailed { message, .. }) => {
            assert!(message.contains("TaskFailedToStart"), "{message}");
            assert!(message.contains("CannotPullContainerError"), "{message}");
        }
        other => panic!("expected StartFailed, got {other:?}"),
    }
    assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
    let status = peer
        .provider
        .status(&launched.handle)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(status.state, MachineState::Failed, "{status:?}");
    assert!(status.started_at.is_none());
    peer.assert_no_violations();
}

#[tokio::test]
async fn wait_started_polls_through_throttling_and_keeps_its_deadline() {
    let peer = FakePeer::start(fake_config()).await;
    let launched = peer.launch(&peer.spec("polls")).await.unwrap();
    peer.fake
        .set_fault(EcsOp::DescribeTasks, EcsFault::throttling(), 2);
    peer.provider
        .wait_started(&launched, Deadline::after(Duration::from_secs(5)))
        .await
        .expect("throttled polls are polled again");

    peer.fake.set_never_start(true);
    let stuck = peer.launch(&peer.spec("stuck")).await.unwrap();
    peer.fake
        .set_fault(EcsOp::DescribeTasks, EcsFault::throttling(), 100);
    let t = Instant::now();
    assert!(matches!(
        peer.provider
            .wait_started(&stuck, Deadline::after(Duration::from_millis(700)))
            .await,
        Err(ProviderError::Timeout { .. })
    ));
    let elapsed = t.elapsed();
    assert!(
        elapsed >= Duration::from_millis(700) && elapsed < Duration::from_millis(1200),
        "{elapsed:?}"
    );
    peer.fake.clear_faults();
    peer.assert_no_violations();
}

#[tokio::test]
async fn status_tells_exits_crashes_and_stops_apart() {
    // Slow drains, so the first reads see tasks that are stopping but not stopped yet.
    let peer = FakePeer::start(FakeEcsConfig {
        stop_delay: Duration::from_millis(400),
        ..fake_config()
    })
    .await;
    let provider = &peer.provider;
    let mut started = Vec::new();
    for tag in ["ok", "crash", "stop"] {
        let launched = peer.launch(&peer.spec(tag)).await.unwrap();
        provider
            .wait_started(&launched, Deadline::after(Duration::from_secs(5)))
            .await
            .unwrap();
        started.push(launched);
    }
    assert!(peer.fake.exit_task(&started[0].handle, 0));
    assert!(peer.fake.exit_task(&started[1].handle, 3));
    provider.terminate(&started[2].handle).await.unwrap();

    let read = |handle: String| async move { provider.status(&handle).await.unwrap().unwrap() };
    // Over at once, while ECS still drains the tasks.
    let ok = read(started[0].handle.clone()).await;
    assert_eq!(ok.state, MachineState::Ended, "{ok:?}");
    assert_ne!(ok.provider_state, "STOPPED");
    assert!(
        ok.labels.is_some(),
        "a task that stopped by itself keeps its tags"
    );
    let crash = read(started[1].handle.clone()).await;
    assert_eq!(crash.state, MachineState::Failed, "{crash:?}");
    assert!(crash
        .detail
        .as_deref()
        .unwrap()
        .contains("bot exited with code 3"));
    let stop = read(started[2].handle.clone()).await;
    assert_eq!(stop.state, MachineState::Ended, "{stop:?}");
    assert!(stop.detail.as_deref().unwrap().contains(STOP_REASON));
    assert!(stop.labels.is_none(), "StopTask deletes the task's tags");
    assert_eq!(peer.fake.bodies(EcsOp::StopTask)[0]["reason"], STOP_REASON);

    tokio::time::sleep(peer.fake.config().stop_delay * 2).await;
    let ok = read(started[0].handle.clone()).await;
    assert_eq!(
        (ok.state, ok.provider_state.as_str()),
        (MachineState::Ended, "STOPPED")
    );
    assert!(ok.ended_at.is_some() && ok.ended_at >= ok.started_at);

    // Terminating what is stopped or unknown is success; unknown reads as gone.
    for handle in [&started[0].handle, &started[2].handle] {
        provider.terminate(handle).await.unwrap();
    }
    let (cluster_part, _) = started[0].handle.rsplit_once('/').unwrap();
    let unknown = format!("{cluster_part}/{}", "0".repeat(32));
    provider.terminate(&unknown).await.unwrap();
    assert!(provider.status(&unknown).await.unwrap().is_none());
    peer.assert_no_violations();
}

#[tokio::test]
async fn find_and_list_read_only_this_dispatchers_tasks() {
    let peer = FakePeer::start(FakeEcsConfig {
        max_page_size: 7,
        ..fake_config()
    })
    .await;
    let provider = &peer.provider;
    let mut handles = Vec::new();
    for i in 0..105 {
        handles.push(
            peer.launch(&peer.spec(&format!("m{i}")))
                .await
                .unwrap()
                .handle,
        );
    }
    peer.create_foreign_machine().await;
    let before = peer.fake.calls().len();
    let listed = provider.list_managed().await.unwrap();
    assert_eq!(listed.len(), 105);
    assert!(listed.iter().all(|m| m.labels.is_some()));
    let calls = &peer.fake.calls()[before..];
    let lists = calls.iter().filter(|c| c.op == "ListTasks").count();
    assert_eq!(lists, 106_usize.div_ceil(7));
    let describes: Vec<usize> = calls
        .iter()
        .filter(|c| c.op == "DescribeTasks")
        .map(|c| c.body.as_ref().unwrap()["tasks"].as_array().unwrap().len())
        .collect();
    assert_eq!(describes, [100, 6]);

    let spec = peer.spec("m7");
    assert!(provider
        .find(&spec.session.labels.session_key)
        .await
        .unwrap()
        .is_none());
    let seventh = peer.fake.task(&handles[7]).unwrap();
    let key = seventh.started_by.unwrap();
    let found = provider.find(&key).await.unwrap().unwrap();
    assert_eq!(found.handle, handles[7]);
    assert!(provider.find("someone-else").await.unwrap().is_none());
    assert!(provider.find("not a key!").await.unwrap().is_none());
    peer.assert_no_violations();
}

#[tokio::test]
async fn set_deadline_moves_the_deadline_tag_only() {
    let peer = FakePeer::start(fake_config()).await;
    let provider: Arc<dyn MachineProvider> = peer.provider.clone();
    assert!(provider.relabel().is_some());
    let limits = provider.rate_limits();
    assert!(limits.contains(&(Op::Launch, RateLimit::app(20.0, 100))));
    let spec = peer.spec("deadline");
    let launched = spec.launch(provider.as_ref()).await.unwrap();
    let later = Deadline::from_unix_secs(spec.session.labels.deadline.unix_secs() + 3600).unwrap();
    provider
        .relabel()
        .unwrap()
        .set_deadline(&launched.handle, later)
        .await
        .unwrap();
    let labels = provider
        .status(&launched.handle)
        .await
        .unwrap()
        .unwrap()
        .labels
        .unwrap();
    assert_eq!(labels.deadline, later);
    assert_eq!(labels.owner, spec.session.labels.owner);
    assert!(provider
        .relabel()
        .unwrap()
        .set_deadline("arn:aws:ecs:us-east-1:123456789012:task/bots/0000", later)
        .await
        .is_err());
    peer.assert_no_violations();
}

#[tokio::test]
async fn the_fake_refuses_what_ecs_would_and_records_client_bugs() {
    let fake = FakeEcs::start(fake_config()).await;
    let http = reqwest::Client::new();
    let signed = "AWS4-HMAC-SHA256 Credential=AKIDFAKEECS/20260101/us-east-1/ecs/aws4_request, \
                  SignedHeaders=host;x-amz-date, Signature=00";
    let call = |op: &str, content_type: &str, auth: &str, body: Value| {
        http.post(fake.endpoint_url())
            .header(
                "x-amz-target",
                format!("AmazonEC2ContainerServiceV20141113.{op}"),
            )
            .header("content-type", content_type)
            .header("x-amz-date", "20260101T000000Z")
            .header("authorization", auth)
            .body(body.to_string())
            .send()
    };
    let answer = |resp: reqwest::Response| async move {
        let status = resp.status().as_u16();
        (status, resp.json::<Value>().await.unwrap())
    };
    let json11 = "application/x-amz-json-1.1";

    let (status, body) = answer(
        call("ListTasks", json11, signed, json!({"cluster": "bots"}))
            .await
            .unwrap(),
    )
    .await;
    assert_eq!((status, body), (200, json!({"taskArns": []})));

    // Client bugs: recorded as violations.
    let (status, body) = answer(
        call(
            "ListTasks",
            json11,
            signed,
            json!({"cluster": "bots", "status": "RUNNING"}),
        )
        .await
        .unwrap(),
    )
    .await;
    assert_eq!(status, 400);
    assert!(
        body["message"]
            .as_str()
            .unwrap()
            .contains("unknown member status"),
        "{body}"
    );
    let (status, _) = answer(
        call("ListTasks", "application/json", signed, json!({}))
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(status, 400);
    assert_eq!(
        fake.spec_violations().len(),
        2,
        "{:?}",
        fake.spec_violations()
    );

    // Refusals ECS makes of well-formed requests: not client bugs of the model's kind.
    let (status, body) = answer(call("ListTasks", json11, "", json!({})).await.unwrap()).await;
    assert_eq!(
        (status, body["__type"].as_str()),
        (400, Some("MissingAuthenticationTokenException"))
    );
    let (status, body) = answer(
        call(
            "ListTasks",
            json11,
            signed,
            json!({"cluster": "bots", "startedBy": "k", "desiredStatus": "STOPPED"}),
        )
        .await
        .unwrap(),
    )
    .await;
    assert_eq!(
        (status, body["__type"].as_str()),
        (400, Some("InvalidParameterException"))
    );
    let (status, body) = answer(
        call(
            "DescribeTasks",
            json11,
            signed,
            json!({"cluster": "nope", "tasks": ["x"]}),
        )
        .await
        .unwrap(),
    )
    .await;
    assert_eq!(
        (status, body["__type"].as_str()),
        (400, Some("ClusterNotFoundException"))
    );
    let mut run = json!({
        "cluster": "bots", "taskDefinition": "bot", "launchType": "FARGATE",
        "networkConfiguration": {"awsvpcConfiguration": {"subnets": [SUBNET]}},
        "overrides": {"cpu": "1024", "memory": "1024"},
    });
    let (status, body) = answer(call("RunTask", json11, signed, run.clone()).await.unwrap()).await;
    assert_eq!(
        (status, body["__type"].as_str()),
        (400, Some("ClientException")),
        "{body}"
    );
    assert!(
        body["message"]
            .as_str()
            .unwrap()
            .contains("No Fargate configuration"),
        "{body}"
    );
    run["overrides"]["containerOverrides"] = json!([{"name": "sidecar"}]);
    run["overrides"]["memory"] = json!("2048");
    let (status, body) = answer(call("RunTask", json11, signed, run).await.unwrap()).await;
    assert_eq!(
        (status, body["__type"].as_str()),
        (400, Some("InvalidParameterException")),
        "{body}"
    );
    let (status, _) = answer(
        call("ListClusters", json11, signed, json!({}))
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(status, 501);
    assert_eq!(fake.spec_violations().len(), 2);
    assert!(fake.tasks().is_empty());
}

// ---------------------------------------------------------------------------------------------
// moto

/// A moto server on a free local port, killed when dropped.
struct Moto {
    url: String,
    _child: tokio::process::Child,
}

impl Moto {
    /// Panics, saying how to install it, when moto cannot run here.
    async fn start() -> Moto {
        let port = {
            let probe = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            probe.local_addr().unwrap().port()
        };
        let spawned = tokio::process::Command::new("python3")
            .args([
                "-m",
                "moto.server",
                "-H",
                "127.0.0.1",
                "-p",
                &port.to_string(),
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn();
        let mut child = match spawned {
            Ok(child) => child,
            Err(e) => moto_missing(&format!("cannot run python3: {e}")),
        };
        // moto logs every request on stderr: keep draining it, remembering the start.
        let log = Arc::new(Mutex::new(String::new()));
        if let Some(mut stderr) = child.stderr.take() {
            let log = log.clone();
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                while let Ok(n @ 1..) = stderr.read(&mut buf).await {
                    let mut log = log.lock().unwrap();
                    if log.len() < 8192 {
                        log.push_str(&String::from_utf8_lossy(&buf[..n]));
                    }
                }
            });
        }
        let url = format!("http://127.0.0.1:{port}");
        let http = reqwest::Client::new();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                tokio::time::sleep(Duration::from_millis(100)).await;
                let log = log.lock().unwrap().clone();
                moto_missing(&format!("moto server exited ({status}): {log}"));
            }
            let up = http
                .get(format!("{url}/moto-api/data.json"))
                .timeout(Duration::from_secs(1))
                .send()
                .await
                .is_ok_and(|r| r.status().is_success());
            if up {
                return Moto { url, _child: child };
            }
            if Instant::now() > deadline {
                panic!("moto did not answer within 30 s");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The first subnet of moto's default VPC, through a raw EC2 Query call (moto does not
    /// check signatures; the credential scope routes the request to EC2).
    async fn default_subnet(&self) -> String {
        let text = reqwest::Client::new()
            .post(format!("{}/", self.url))
            .header("content-type", "application/x-www-form-urlencoded")
            .header(
                "authorization",
                "AWS4-HMAC-SHA256 Credential=testing/20260101/us-east-1/ec2/aws4_request, SignedHeaders=host, Signature=00",
            )
            .body("Action=DescribeSubnets&Version=2016-11-15")
            .send()
            .await
            .expect("DescribeSubnets")
            .text()
            .await
            .unwrap();
        let start = text
            .find("<subnetId>")
            .expect("a subnet in moto's default VPC")
            + 10;
        let end = start + text[start..].find('<').unwrap();
        text[start..end].to_owned()
    }
}

/// Serves moto's API on another local port, fixing the one type error of moto's answers that
/// the SDK's strict deserializer refuses: moto echoes a container definition's `cpu` and
/// `memory` (integers) into its tasks' `containers[]`, where the model has strings ("type
/// mismatch: expected string"). Everything else passes through unchanged.
struct MotoTypeFix {
    url: String,
    _server: tokio::task::JoinHandle<()>,
}

impl MotoTypeFix {
    async fn start(upstream: String) -> Self {
        use axum::body::Bytes;
        use axum::http::{header, HeaderMap, Method, Uri};
        use axum::response::IntoResponse;

        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let http = reqwest::Client::new();
        let forward = move |method: Method, uri: Uri, headers: HeaderMap, body: Bytes| {
            let (http, upstream) = (http.clone(), upstream.clone());
            async move {
                let mut outgoing = headers.clone();
                outgoing.remove(header::HOST);
                let resp = http
                    .request(method, format!("{upstream}{uri}"))
                    .headers(outgoing)
                    .body(body)
                    .send()
                    .await
                    .expect("moto answers");
                let status = resp.status();
                let content_type = resp.headers().get(header::CONTENT_TYPE).cloned();
                let bytes = resp.bytes().await.expect("moto's answer");
                let body = match serde_json::from_slice::<Value>(&bytes) {
                    Ok(mut json) => {
                        stringify_container_sizes(&mut json, false);
                        Bytes::from(json.to_string())
                    }
                    Err(_) => bytes,
                };
                let mut response = (status, body).into_response();
                if let Some(content_type) = content_type {
                    response
                        .headers_mut()
                        .insert(header::CONTENT_TYPE, content_type);
                }
                response
            }
        };
        let app = axum::Router::new().fallback(forward);
        let server = tokio::spawn(async move {
            axum::serve(listener, app).await.expect("proxy serves");
        });
        Self {
            url,
            _server: server,
        }
    }
}

/// Turns numeric `cpu`/`memory`/`memoryReservation` of objects in `containers` arrays into
/// strings.
fn stringify_container_sizes(value: &mut Value, in_containers: bool) {
    match value {
        Value::Array(items) => items
            .iter_mut()
            .for_each(|v| stringify_container_sizes(v, in_containers)),
        Value::Object(map) => {
            for (key, item) in map.iter_mut() {
                let sized = matches!(key.as_str(), "cpu" | "memory" | "memoryReservation");
                if in_containers && sized && item.is_number() {
                    *item = Value::String(item.to_string());
                } else {
                    stringify_container_sizes(item, key == "containers");
                }
            }
        }
        _ => {}
    }
}

fn moto_missing(reason: &str) -> ! {
    panic!("moto cannot run: {reason}; run ./scripts/test (it installs moto[server] with pip)");
}

/// moto leaves `createdAt`/`startedAt` out of its tasks; the contract wants one timestamp of a
/// started machine. This wrapper stamps `created_at` with the time of the read when both are
/// missing, and counts how often it had to.
struct MotoTimestamps {
    inner: FargateProvider,
    patched: AtomicUsize,
}

impl MotoTimestamps {
    fn patch(&self, mut status: MachineStatus) -> MachineStatus {
        if status.created_at.is_none() && status.started_at.is_none() {
            self.patched.fetch_add(1, Ordering::Relaxed);
            status.created_at = Some(Utc::now());
        }
        status
    }
}

#[async_trait]
impl MachineProvider for MotoTimestamps {
    fn name(&self) -> &'static str {
        self.inner.name()
    }
    fn is_handle(&self, handle: &str) -> bool {
        self.inner.is_handle(handle)
    }
    async fn launch(
        &self,
        template: &MachineTemplate,
        session: &SessionBinding,
    ) -> Result<Launched, ProviderError> {
        self.inner.launch(template, session).await
    }
    async fn wait_started(&self, l: &Launched, deadline: Deadline) -> Result<(), ProviderError> {
        self.inner.wait_started(l, deadline).await
    }
    async fn status(&self, handle: &str) -> Result<Option<MachineStatus>, ProviderError> {
        Ok(self.inner.status(handle).await?.map(|s| self.patch(s)))
    }
    async fn terminate(&self, handle: &str) -> Result<(), ProviderError> {
        self.inner.terminate(handle).await
    }
    async fn find(&self, key: &str) -> Result<Option<MachineStatus>, ProviderError> {
        Ok(self.inner.find(key).await?.map(|s| self.patch(s)))
    }
    async fn list_managed(&self) -> Result<Vec<MachineStatus>, ProviderError> {
        let listed = self.inner.list_managed().await?;
        Ok(listed.into_iter().map(|s| self.patch(s)).collect())
    }
    async fn check(&self) -> Result<(), ProviderError> {
        self.inner.check().await
    }
    fn relabel(&self) -> Option<&dyn Relabel> {
        self.inner.relabel()
    }
}

struct MotoPeer {
    provider: Arc<MotoTimestamps>,
    ecs: aws_sdk_ecs::Client,
    subnet: String,
    refuse_next: AtomicBool,
}

#[async_trait]
impl ContractPeer for MotoPeer {
    fn provider(&self) -> Arc<dyn MachineProvider> {
        self.provider.clone()
    }
    fn workload(&self) -> Workload {
        // moto refuses a task definition it does not know, as ECS does.
        if self.refuse_next.swap(false, Ordering::SeqCst) {
            Workload::TaskDefinition("no-such-task-definition".into())
        } else {
            Workload::TaskDefinition("bot".into())
        }
    }
    fn supports(&self, scenario: Scenario) -> bool {
        // moto's tasks are RUNNING from the start and it never throttles.
        !matches!(scenario, Scenario::NeverStarts | Scenario::Throttled)
    }
    async fn refuse_next_launch(&self) {
        self.refuse_next.store(true, Ordering::SeqCst);
    }
    async fn set_never_start(&self, _: bool) {}
    async fn throttle_next_launch(&self) {}
    async fn exit_bot(&self, handle: &str) {
        // moto has no bot to exit: stop the task the way ECS does when its essential container
        // exits (moto records no stop code, and exit code 0).
        self.ecs
            .stop_task()
            .cluster("bots")
            .task(handle)
            .reason("Essential container in task exited")
            .send()
            .await
            .expect("moto StopTask");
    }
    async fn create_foreign_machine(&self) {
        run_foreign_task(&self.ecs, &self.subnet).await;
    }
}

#[tokio::test]
async fn fargate_passes_the_contract_against_moto() {
    let t0 = Instant::now();
    let moto = Moto::start().await;
    let boot = t0.elapsed();
    let http = reqwest::Client::new();
    // Tasks otherwise advance a status on every DescribeTasks (RUNNING → DEACTIVATING → ...):
    // keep them RUNNING until stopped.
    let resp = http
        .post(format!(
            "{}/moto-api/state-manager/set-transition",
            moto.url
        ))
        .json(&json!({"model_name": "ecs::task",
            "transition": {"progression": "manual", "times": 1_000_000}}))
        .send()
        .await
        .unwrap();
    assert!(resp.status().is_success(), "{}", resp.status());

    let fixed = MotoTypeFix::start(moto.url.clone()).await;
    let ecs = ecs_client(&fixed.url, "testing");
    ecs.create_cluster()
        .cluster_name("bots")
        .send()
        .await
        .unwrap();
    ecs.register_task_definition()
        .family("bot")
        .requires_compatibilities(Compatibility::Fargate)
        .network_mode(NetworkMode::Awsvpc)
        .cpu("1024")
        .memory("2048")
        .container_definitions(
            ContainerDefinition::builder()
                .name("bot")
                .image("bot:1")
                .memory(2048)
                .essential(true)
                .build(),
        )
        .send()
        .await
        .unwrap();
    let subnet = moto.default_subnet().await;
    let config = FargateConfig {
        subnets: vec![subnet.clone()],
        ..fargate_config(&fixed.url)
    };
    let provider =
        FargateProvider::from_sdk_config(&ctx(), &sdk_config("testing"), config).unwrap();
    provider.check().await.expect("check against moto");
    let peer = MotoPeer {
        provider: Arc::new(MotoTimestamps {
            inner: provider,
            patched: AtomicUsize::new(0),
        }),
        ecs,
        subnet,
        refuse_next: AtomicBool::new(false),
    };

    let report = run_contract_suite(&peer).await;
    assert!(report.passed.contains(&"lifecycle"));
    assert!(report.passed.contains(&"bot exits"));
    println!(
        "fargate contract suite against moto: {:.2} s (moto start {:.2} s); timestamps patched {} times",
        report.elapsed.as_secs_f64(),
        boot.as_secs_f64(),
        peer.provider.patched.load(Ordering::Relaxed)
    );

    // What moto can check beyond the suite: encoded labels and deadline tags round-trip.
    let provider = &peer.provider;
    let mut spec = spec_for(&peer, "moto");
    spec.session.labels.owner = "auth0|bob".into();
    let launched = spec.launch(&**provider).await.unwrap();
    provider
        .wait_started(&launched, Deadline::after(Duration::from_secs(5)))
        .await
        .unwrap();
    let later = Deadline::from_unix_secs(spec.session.labels.deadline.unix_secs() + 60).unwrap();
    provider
        .relabel()
        .expect("fargate can move a task's deadline")
        .set_deadline(&launched.handle, later)
        .await
        .unwrap();
    let status = provider.status(&launched.handle).await.unwrap().unwrap();
    let mut expected = spec.session.labels.clone();
    expected.deadline = later;
    assert_eq!(status.labels, Some(expected));
    provider.terminate(&launched.handle).await.unwrap();
}
