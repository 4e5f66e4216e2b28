//! The provider contract suite: one set of scenarios every [`MachineProvider`] must pass, run
//! against each implementation with a [`ContractPeer`] that drives its test peer (a fake, moto,
//! or the provider itself for `local`).
//!
//! Scenarios: launch → started → status → find → list → terminate → gone; terminate twice;
//! unknown handles; listing only managed machines; launch refused; never starts (deadline);
//! throttled; the bot exiting by itself. A peer that cannot stage a scenario (the local provider
//! cannot be throttled) says so through [`ContractPeer::supports`], and the suite prints what it
//! skipped.

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use chrono::Utc;

use crate::{
    Deadline, Guest, Launched, MachineProvider, MachineState, MachineTemplate, ProviderError,
    SessionBinding, SessionLabels, Workload,
};

/// Scenarios a peer may be unable to stage.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scenario {
    LaunchRefused,
    NeverStarts,
    Throttled,
    BotExits,
    ForeignMachines,
}

/// Drives one provider's test peer.
#[async_trait]
pub trait ContractPeer: Send + Sync {
    fn provider(&self) -> Arc<dyn MachineProvider>;
    /// What launches a well-behaved bot (an image, a task definition, a job, a program).
    fn workload(&self) -> Workload;
    /// Command override for the well-behaved bot, if the provider needs one.
    fn cmd(&self) -> Option<Vec<String>> {
        None
    }
    fn supports(&self, scenario: Scenario) -> bool;
    /// The next launch is refused by the provider (bad image, invalid config).
    async fn refuse_next_launch(&self);
    /// Launched machines stay in their starting state until `set_never_start(false)`.
    async fn set_never_start(&self, on: bool);
    /// The next launch is throttled (429 / ThrottlingException / RESOURCE_EXHAUSTED).
    async fn throttle_next_launch(&self);
    /// The bot of `handle` exits by itself with status 0.
    async fn exit_bot(&self, handle: &str);
    /// Creates a machine that is not managed by botdispatch (no labels).
    async fn create_foreign_machine(&self);
}

/// One launch of the suite: the peer's template and a session with a unique key per call.
#[derive(Debug, Clone)]
pub struct LaunchSpec {
    pub template: MachineTemplate,
    pub session: SessionBinding,
}

impl LaunchSpec {
    /// Launches it on `provider`.
    pub async fn launch(&self, provider: &dyn MachineProvider) -> Result<Launched, ProviderError> {
        provider.launch(&self.template, &self.session).await
    }
}

/// A launch spec for the suite: a unique session key per call.
pub fn spec_for(peer: &dyn ContractPeer, tag: &str) -> LaunchSpec {
    let key = format!(
        "c{}{}",
        tag,
        Utc::now().timestamp_nanos_opt().unwrap_or_default() % 1_000_000_000_000
    );
    LaunchSpec {
        template: MachineTemplate {
            workload: peer.workload(),
            cmd: peer.cmd(),
            guest: Guest::default(),
            region: None,
            env: Default::default(),
            handoff_port: None,
        },
        session: SessionBinding {
            name: format!("bd-{key}"),
            env: [
                (
                    "DAILY_ROOM_URL".to_owned(),
                    "https://x.daily.co/r".to_owned(),
                ),
                ("DAILY_ROOM_TOKEN".to_owned(), "token".to_owned()),
                ("BOTDISPATCH_SESSION_ID".to_owned(), key.clone()),
                ("BOTDISPATCH_BODY".to_owned(), "{}".to_owned()),
            ]
            .into_iter()
            .collect(),
            labels: SessionLabels {
                session_key: key.clone(),
                owner: "contract-owner".to_owned(),
                room: format!("bd-{key}"),
                agent: "default".to_owned(),
                deployment: crate::labels::DEFAULT_DEPLOYMENT.to_owned(),
                start: crate::StartType::Cold,
                // Whole seconds: labels carry unix seconds.
                deadline: Deadline::from_unix_secs(Utc::now().timestamp() + 600)
                    .expect("valid time"),
                timings: None,
            },
            deadline: Deadline::after(Duration::from_secs(60)),
        },
    }
}

/// What the suite ran, for the report a test prints.
#[derive(Debug, Default)]
pub struct ContractReport {
    pub passed: Vec<&'static str>,
    pub skipped: Vec<&'static str>,
    pub elapsed: Duration,
}

/// Runs every scenario; panics with the scenario's name on the first broken promise.
pub async fn run_contract_suite(peer: &dyn ContractPeer) -> ContractReport {
    let started = Instant::now();
    let mut report = ContractReport::default();
    lifecycle(peer).await;
    report.passed.push("lifecycle");
    unknown_handles(peer).await;
    report.passed.push("unknown handles");
    other_deployments(peer).await;
    report.passed.push("other deployments' machines");
    let scenarios: [(&'static str, Scenario); 5] = [
        ("listing only managed machines", Scenario::ForeignMachines),
        ("launch refused", Scenario::LaunchRefused),
        ("never starts", Scenario::NeverStarts),
        ("throttled", Scenario::Throttled),
        ("bot exits", Scenario::BotExits),
    ];
    for (name, scenario) in scenarios {
        if !peer.supports(scenario) {
            report.skipped.push(name);
            continue;
        }
        match scenario {
            Scenario::ForeignMachines => only_managed(peer).await,
            Scenario::LaunchRefused => launch_refused(peer).await,
            Scenario::NeverStarts => never_starts(peer).await,
            Scenario::Throttled => throttled(peer).await,
            Scenario::BotExits => bot_exits(peer).await,
        }
        report.passed.push(name);
    }
    report.elapsed = started.elapsed();
    let provider = peer.provider();
    println!(
        "contract suite for {}: {} passed ({}), {} skipped ({}), {:.2} s",
        provider.name(),
        report.passed.len(),
        report.passed.join(", "),
        report.skipped.len(),
        report.skipped.join(", "),
        report.elapsed.as_secs_f64()
    );
    report
}

const START: Duration = Duration::from_secs(20);

async fn launch_started(peer: &dyn ContractPeer, tag: &str) -> (LaunchSpec, Launched) {
    let provider = peer.provider();
    let spec = spec_for(peer, tag);
    let launched = spec
        .launch(provider.as_ref())
        .await
        .unwrap_or_else(|e| panic!("[{tag}] launch: {e}"));
    provider
        .wait_started(&launched, Deadline::after(START))
        .await
        .unwrap_or_else(|e| panic!("[{tag}] wait_started: {e}"));
    (spec, launched)
}

async fn lifecycle(peer: &dyn ContractPeer) {
    let provider = peer.provider();
    let (spec, launched) = launch_started(peer, "life").await;
    let status = provider
        .status(&launched.handle)
        .await
        .expect("[lifecycle] status")
        .expect("[lifecycle] a started machine is known");
    assert_eq!(
        status.state,
        MachineState::Started,
        "[lifecycle] {status:?}"
    );
    assert_eq!(status.handle, launched.handle);
    assert_eq!(
        status.labels.as_ref(),
        Some(&spec.session.labels),
        "[lifecycle] labels read back from the machine"
    );
    assert!(
        status.started_at.is_some() || status.created_at.is_some(),
        "[lifecycle] {status:?}"
    );

    let found = provider
        .find(&spec.session.labels.session_key)
        .await
        .expect("[lifecycle] find")
        .expect("[lifecycle] find by session key without the handle");
    assert_eq!(found.handle, launched.handle);

    let listed = provider.list_managed().await.expect("[lifecycle] list");
    assert!(
        listed.iter().any(|m| m.handle == launched.handle),
        "[lifecycle] list_managed shows the machine: {listed:?}"
    );

    provider
        .terminate(&launched.handle)
        .await
        .expect("[lifecycle] terminate");
    let after = provider
        .status(&launched.handle)
        .await
        .expect("[lifecycle] status after terminate");
    assert!(
        after.as_ref().is_none_or(|s| s.state.is_terminal()),
        "[lifecycle] terminated machine is gone or over: {after:?}"
    );
    let listed = provider.list_managed().await.expect("[lifecycle] list");
    assert!(
        !listed
            .iter()
            .any(|m| m.handle == launched.handle && !m.state.is_terminal()),
        "[lifecycle] a terminated machine is not listed as live: {listed:?}"
    );
    provider
        .terminate(&launched.handle)
        .await
        .expect("[lifecycle] terminate twice is success");
}

async fn unknown_handles(peer: &dyn ContractPeer) {
    let provider = peer.provider();
    for hostile in [
        "",
        "..",
        "../../other-app/machines/x",
        "a/b",
        "x?y",
        "%2e%2e",
    ] {
        assert!(
            !provider.is_handle(hostile),
            "[unknown] {hostile:?} is not a handle"
        );
    }
    let unknown = spec_for(peer, "unknown");
    assert!(
        provider
            .find(&unknown.session.labels.session_key)
            .await
            .expect("[unknown] find")
            .is_none(),
        "[unknown] find of a session that never launched"
    );
}

/// A machine labelled for another deployment (staging sharing production's app or cluster)
/// is launched, but never read, found or listed as this deployment's.
async fn other_deployments(peer: &dyn ContractPeer) {
    let provider = peer.provider();
    let mut spec = spec_for(peer, "otherdep");
    spec.session.labels.deployment = "someone-else".to_owned();
    let launched = spec
        .launch(provider.as_ref())
        .await
        .expect("[other deployments] launch");
    assert!(
        provider.is_handle(&launched.handle),
        "[other deployments] a launched handle is a handle: {launched:?}"
    );
    let status = provider
        .status(&launched.handle)
        .await
        .expect("[other deployments] status");
    assert!(
        status.as_ref().is_none_or(|s| s.labels.is_none()),
        "[other deployments] read as not ours: {status:?}"
    );
    let found = provider
        .find(&spec.session.labels.session_key)
        .await
        .expect("[other deployments] find");
    assert!(found.is_none(), "[other deployments] not found: {found:?}");
    let listed = provider
        .list_managed()
        .await
        .expect("[other deployments] list");
    assert!(
        !listed.iter().any(|m| m.handle == launched.handle),
        "[other deployments] not listed: {listed:?}"
    );
    provider
        .terminate(&launched.handle)
        .await
        .expect("[other deployments] terminate");
}

async fn only_managed(peer: &dyn ContractPeer) {
    peer.create_foreign_machine().await;
    let listed = peer
        .provider()
        .list_managed()
        .await
        .expect("[foreign] list");
    assert!(
        listed.iter().all(|m| m.labels.is_some()),
        "[foreign] list_managed returns only botdispatch's machines: {listed:?}"
    );
}

async fn launch_refused(peer: &dyn ContractPeer) {
    peer.refuse_next_launch().await;
    let provider = peer.provider();
    let spec = spec_for(peer, "refused");
    match spec.launch(provider.as_ref()).await {
        Err(ProviderError::Rejected { .. }) => {}
        other => panic!("[launch refused] expected Rejected, got {other:?}"),
    }
    let found = provider
        .find(&spec.session.labels.session_key)
        .await
        .expect("[launch refused] find");
    assert!(
        found.is_none_or(|m| m.state.is_terminal()),
        "[launch refused] nothing runs"
    );
}

async fn never_starts(peer: &dyn ContractPeer) {
    peer.set_never_start(true).await;
    let provider = peer.provider();
    let spec = spec_for(peer, "never");
    let launched = spec
        .launch(provider.as_ref())
        .await
        .expect("[never starts] launch");
    let t = Instant::now();
    let result = provider
        .wait_started(&launched, Deadline::after(Duration::from_secs(2)))
        .await;
    peer.set_never_start(false).await;
    match result {
        Err(ProviderError::Timeout { .. }) => {}
        other => panic!("[never starts] expected Timeout, got {other:?}"),
    }
    assert!(
        t.elapsed() < Duration::from_secs(5),
        "[never starts] the wait honours its deadline: {:?}",
        t.elapsed()
    );
    let status = provider
        .status(&launched.handle)
        .await
        .expect("[never starts] status");
    assert!(
        status
            .as_ref()
            .is_some_and(|s| s.state == MachineState::Starting),
        "[never starts] reads as starting: {status:?}"
    );
    provider
        .terminate(&launched.handle)
        .await
        .expect("[never starts] terminate a machine that never started");
    let status = provider
        .status(&launched.handle)
        .await
        .expect("[never starts] status");
    assert!(status.is_none_or(|s| s.state.is_terminal()));
}

async fn throttled(peer: &dyn ContractPeer) {
    peer.throttle_next_launch().await;
    let spec = spec_for(peer, "throttled");
    match spec.launch(peer.provider().as_ref()).await {
        Err(e @ ProviderError::Throttled { .. }) => assert!(e.is_transient()),
        other => panic!("[throttled] expected Throttled, got {other:?}"),
    }
}

async fn bot_exits(peer: &dyn ContractPeer) {
    let provider = peer.provider();
    let (_, launched) = launch_started(peer, "exits").await;
    peer.exit_bot(&launched.handle).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let status = provider
            .status(&launched.handle)
            .await
            .expect("[bot exits] status");
        match status {
            None => break,
            Some(s) if s.state == MachineState::Ended => break,
            Some(s) if Instant::now() > deadline => {
                panic!("[bot exits] expected ended, still {s:?}")
            }
            Some(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
    provider
        .terminate(&launched.handle)
        .await
        .expect("[bot exits] terminate after exit is success");
}
