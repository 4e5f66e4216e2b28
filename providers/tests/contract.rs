//! The provider contract suite against `fly` (stateful fake) and `local` (real processes).

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use providers::fly::{FlyConfig, FlyProvider};
use providers::local::{LocalConfig, LocalProvider};
use providers::testkit::contract::{run_contract_suite, ContractPeer, Scenario};
use providers::testkit::fly_fake::{FakeFly, FakeFlyConfig, FlyOp};
use providers::testkit::Fault;
use providers::{BuildContext, MachineProvider, Secret, Workload};
use serde_json::json;

struct FlyPeer {
    fake: FakeFly,
    provider: Arc<dyn MachineProvider>,
}

impl FlyPeer {
    async fn new() -> Self {
        let fake = FakeFly::start(FakeFlyConfig {
            token: "t0ken".into(),
            apps: vec!["bots".into()],
            boot_delay: Duration::from_millis(100),
            ..FakeFlyConfig::default()
        })
        .await;
        let ctx =
            BuildContext::new(reqwest::Client::new()).with_request_timeout(Duration::from_secs(5));
        let provider = FlyProvider::new(
            &ctx,
            FlyConfig {
                api_url: fake.base_url(),
                api_token: Some(Secret::new("t0ken")),
                app_name: Some("bots".into()),
                default_region: Some("iad".into()),
                ..FlyConfig::default()
            },
        )
        .unwrap();
        Self {
            fake,
            provider: Arc::new(provider),
        }
    }
}

#[async_trait]
impl ContractPeer for FlyPeer {
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
        self.fake.set_fault(
            FlyOp::Create,
            Fault::Status {
                status: 422,
                retry_after: None,
            },
            1,
        );
    }
    async fn set_never_start(&self, on: bool) {
        self.fake.set_never_start(on);
    }
    async fn throttle_next_launch(&self) {
        self.fake.set_fault(
            FlyOp::Create,
            Fault::Status {
                status: 429,
                retry_after: Some(1),
            },
            1,
        );
    }
    async fn exit_bot(&self, handle: &str) {
        assert!(self.fake.exit_machine(handle, 0));
    }
    async fn create_foreign_machine(&self) {
        let resp = reqwest::Client::new()
            .post(format!("{}/apps/bots/machines", self.fake.base_url()))
            .bearer_auth("t0ken")
            .json(&json!({"name": "someone-elses", "config": {"image": "nginx"}}))
            .send()
            .await
            .unwrap();
        assert!(resp.status().is_success());
    }
}

#[tokio::test]
async fn fly_passes_the_contract() {
    let peer = FlyPeer::new().await;
    let report = run_contract_suite(&peer).await;
    assert!(report.skipped.is_empty());
    let violations = peer.fake.spec_violations();
    assert!(violations.is_empty(), "{violations:#?}");
}

struct LocalPeer {
    provider: Arc<dyn MachineProvider>,
}

#[async_trait]
impl ContractPeer for LocalPeer {
    fn provider(&self) -> Arc<dyn MachineProvider> {
        self.provider.clone()
    }
    fn workload(&self) -> Workload {
        Workload::Program("sh".into())
    }
    fn cmd(&self) -> Option<Vec<String>> {
        // Stays up until signalled; exits 0 on SIGTERM or when told to via a file.
        Some(vec![
            "sh".into(),
            "-c".into(),
            "trap 'exit 0' TERM; while [ ! -e \"/tmp/bd-exit-$BOTDISPATCH_SESSION_ID\" ]; do sleep 0.05; done; rm -f \"/tmp/bd-exit-$BOTDISPATCH_SESSION_ID\"".into(),
        ])
    }
    fn supports(&self, scenario: Scenario) -> bool {
        // A child process is started the moment it spawns and nobody throttles fork(2).
        matches!(scenario, Scenario::BotExits | Scenario::ForeignMachines)
    }
    async fn refuse_next_launch(&self) {}
    async fn set_never_start(&self, _: bool) {}
    async fn throttle_next_launch(&self) {}
    async fn exit_bot(&self, handle: &str) {
        let status = self.provider.status(handle).await.unwrap().unwrap();
        let key = status.labels.unwrap().session_key;
        std::fs::write(format!("/tmp/bd-exit-{key}"), b"").unwrap();
    }
    async fn create_foreign_machine(&self) {}
}

#[tokio::test]
async fn local_passes_the_contract() {
    let peer = LocalPeer {
        provider: Arc::new(LocalProvider::new(LocalConfig { stop_grace_secs: 2 })),
    };
    run_contract_suite(&peer).await;
}

#[tokio::test]
async fn local_refuses_a_program_that_does_not_exist() {
    let provider = LocalProvider::new(LocalConfig::default());
    struct Missing;
    #[async_trait]
    impl ContractPeer for Missing {
        fn provider(&self) -> Arc<dyn MachineProvider> {
            unreachable!()
        }
        fn workload(&self) -> Workload {
            Workload::Program("/nonexistent/bot".into())
        }
        fn supports(&self, _: Scenario) -> bool {
            false
        }
        async fn refuse_next_launch(&self) {}
        async fn set_never_start(&self, _: bool) {}
        async fn throttle_next_launch(&self) {}
        async fn exit_bot(&self, _: &str) {}
        async fn create_foreign_machine(&self) {}
    }
    let spec = providers::testkit::contract::spec_for(&Missing, "missing");
    let err = spec.launch(&provider).await.unwrap_err();
    assert!(
        matches!(err, providers::ProviderError::Rejected { .. }),
        "{err:?}"
    );
}

#[tokio::test]
async fn local_bots_get_only_path_home_and_their_contract() {
    // The dispatcher's own environment (JWT secret, Daily key, cloud credentials) must not
    // reach a bot.
    std::env::set_var("BOTDISPATCH_TEST_CANARY", "dispatcher-secret");
    let out = std::env::temp_dir().join(format!(
        "botdispatch-env-{}-{}.txt",
        std::process::id(),
        chrono::Utc::now().timestamp_nanos_opt().unwrap_or_default()
    ));
    let provider = LocalProvider::new(LocalConfig::default());
    struct EnvDump;
    #[async_trait]
    impl ContractPeer for EnvDump {
        fn provider(&self) -> Arc<dyn MachineProvider> {
            unreachable!()
        }
        fn workload(&self) -> Workload {
            Workload::Program("sh".into())
        }
        fn cmd(&self) -> Option<Vec<String>> {
            Some(vec!["sh".into(), "-c".into(), "env > \"$ENV_OUT\"".into()])
        }
        fn supports(&self, _: Scenario) -> bool {
            false
        }
        async fn refuse_next_launch(&self) {}
        async fn set_never_start(&self, _: bool) {}
        async fn throttle_next_launch(&self) {}
        async fn exit_bot(&self, _: &str) {}
        async fn create_foreign_machine(&self) {}
    }
    let mut spec = providers::testkit::contract::spec_for(&EnvDump, "env");
    spec.template
        .env
        .insert("ENV_OUT".into(), out.display().to_string());
    let launched = spec.launch(&provider).await.unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while provider
        .status(&launched.handle)
        .await
        .unwrap()
        .is_some_and(|s| !s.state.is_terminal())
    {
        assert!(std::time::Instant::now() < deadline, "the bot never ended");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let dumped = std::fs::read_to_string(&out).unwrap();
    let _ = std::fs::remove_file(&out);
    let names: Vec<&str> = dumped
        .lines()
        .filter_map(|l| l.split_once('=').map(|(k, _)| k))
        .collect();
    assert!(!dumped.contains("BOTDISPATCH_TEST_CANARY"), "{dumped}");
    for expected in [
        "PATH",
        "DAILY_ROOM_URL",
        "DAILY_ROOM_TOKEN",
        "BOTDISPATCH_SESSION_ID",
        "BOTDISPATCH_BODY",
        "ENV_OUT",
    ] {
        assert!(names.contains(&expected), "{expected} missing: {names:?}");
    }
    // Besides PATH, HOME and the contract only what `sh` itself sets.
    let allowed = [
        "PATH",
        "HOME",
        "DAILY_ROOM_URL",
        "DAILY_ROOM_TOKEN",
        "BOTDISPATCH_SESSION_ID",
        "BOTDISPATCH_BODY",
        "ENV_OUT",
        "PWD",
        "SHLVL",
        "_",
        "OLDPWD",
    ];
    for name in names {
        assert!(
            allowed.contains(&name),
            "the bot inherited {name}: {dumped}"
        );
    }
}
