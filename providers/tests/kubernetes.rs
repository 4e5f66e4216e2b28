//! The `kubernetes` provider against the fake API server: the contract suite (through an
//! explicit API URL and through a kubeconfig), the shape of what a session creates, the
//! failure modes (image pulls, unschedulable pods, 410 Gone, 429, stale resourceVersions,
//! name conflicts), the bot token's Secret and its garbage collection, the `http` handoff and
//! the hot reserve (claims racing across replicas, the drain after a handoff, retiring,
//! claim latency), and the deploy/kubernetes manifests (typed, no unknown fields, a Role that
//! covers exactly the calls made).

#![cfg(all(feature = "kubernetes", feature = "testkit"))]

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Service, ServiceAccount};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::api::rbac::v1::{Role, RoleBinding};
use providers::kubernetes::{label, KubernetesConfig, KubernetesProvider};
use providers::testkit::contract::{
    run_contract_suite, spec_for, ContractPeer, LaunchSpec, Scenario,
};
use providers::testkit::kube_fake::{FakeKube, FakeKubeConfig, KubeOp};
use providers::testkit::Fault;
use providers::{
    BuildContext, Deadline, MachineProvider, MachineState, MachineTemplate, ProviderError,
    ReserveLabels, Secret, SessionLabels, StartType, Tier, Workload,
};
use serde_json::{json, Value};

const NS: &str = "bots";
const TOKEN: &str = "fake-kube-token";
const IMAGE: &str = "ghcr.io/acme/bot:1.0";

fn ctx() -> BuildContext {
    BuildContext::new(reqwest::Client::new()).with_request_timeout(Duration::from_secs(5))
}

fn config(fake: &FakeKube) -> KubernetesConfig {
    KubernetesConfig {
        api_url: Some(fake.api_url()),
        token: Some(Secret::new(TOKEN)),
        namespace: Some(NS.into()),
        stop_grace_secs: 2,
        ..KubernetesConfig::default()
    }
}

async fn start(tweak: impl FnOnce(&mut FakeKubeConfig)) -> (FakeKube, Arc<KubernetesProvider>) {
    let mut fake_config = FakeKubeConfig::default();
    tweak(&mut fake_config);
    let fake = FakeKube::start(fake_config).await;
    let provider = KubernetesProvider::connect(&ctx(), &config(&fake))
        .await
        .expect("connects");
    (fake, Arc::new(provider))
}

fn assert_clean(fake: &FakeKube) {
    let violations = fake.spec_violations();
    assert!(violations.is_empty(), "{violations:#?}");
}

struct KubePeer {
    fake: FakeKube,
    provider: Arc<dyn MachineProvider>,
}

#[async_trait]
impl ContractPeer for KubePeer {
    fn provider(&self) -> Arc<dyn MachineProvider> {
        self.provider.clone()
    }
    fn workload(&self) -> Workload {
        Workload::Image(IMAGE.into())
    }
    fn supports(&self, _: Scenario) -> bool {
        true
    }
    async fn refuse_next_launch(&self) {
        // A ResourceQuota refusal is a 403 Forbidden.
        self.fake.set_fault(
            KubeOp::CreatePod,
            Fault::Status {
                status: 403,
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
            KubeOp::CreatePod,
            Fault::Status {
                status: 429,
                retry_after: Some(1),
            },
            1,
        );
    }
    async fn exit_bot(&self, handle: &str) {
        assert!(self.fake.exit_pod(NS, handle, 0), "{handle} was running");
    }
    async fn create_foreign_machine(&self) {
        self.fake.create_foreign_pod(NS, "someone-elses-web");
    }
}

#[tokio::test]
async fn kubernetes_passes_the_contract() {
    let (fake, provider) = start(|_| {}).await;
    let peer = KubePeer {
        fake: fake.clone(),
        provider,
    };
    let report = run_contract_suite(&peer).await;
    assert!(report.skipped.is_empty(), "{:?}", report.skipped);
    println!(
        "kubernetes contract suite: {} API requests",
        fake.requests().len()
    );
    assert_clean(&fake);
}

#[tokio::test]
async fn kubernetes_passes_the_contract_through_a_kubeconfig() {
    let fake = FakeKube::start(FakeKubeConfig::default()).await;
    let path = std::env::temp_dir().join(format!(
        "botdispatch-kubeconfig-{}-{}.yaml",
        std::process::id(),
        chrono::Utc::now().timestamp_nanos_opt().unwrap_or_default()
    ));
    std::fs::write(&path, fake.kubeconfig(NS)).unwrap();
    let config = KubernetesConfig {
        kubeconfig: Some(path.display().to_string()),
        ..KubernetesConfig::default()
    };
    let provider = KubernetesProvider::connect(&ctx(), &config).await;
    let _ = std::fs::remove_file(&path);
    let provider = provider.expect("connects through the kubeconfig");
    assert_eq!(provider.namespace(), NS, "the context's namespace");
    let peer = KubePeer {
        fake: fake.clone(),
        provider: Arc::new(provider),
    };
    run_contract_suite(&peer).await;
    assert_clean(&fake);
}

async fn launch(provider: &KubernetesProvider, spec: &LaunchSpec) -> providers::Launched {
    spec.launch(provider).await.expect("launch")
}

fn peer_spec(tag: &str) -> LaunchSpec {
    struct Spec;
    #[async_trait]
    impl ContractPeer for Spec {
        fn provider(&self) -> Arc<dyn MachineProvider> {
            unreachable!()
        }
        fn workload(&self) -> Workload {
            Workload::Image(IMAGE.into())
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
    let mut spec = spec_for(&Spec, tag);
    spec.session.labels.owner = "auth0|5f7c8ec7c33c6c004bbafe82".into();
    spec.session
        .env
        .insert("DAILY_ROOM_TOKEN".into(), "eyJ.bot-token.sig".into());
    spec
}

fn requests_after(fake: &FakeKube, n: usize) -> Vec<(String, String)> {
    fake.requests()[n..]
        .iter()
        .map(|r| {
            let watch = r.query.iter().any(|(k, v)| k == "watch" && v == "true");
            let what = if watch { " watch" } else { "" };
            (format!("{}{what}", r.method), r.path.clone())
        })
        .collect()
}

#[tokio::test]
async fn a_session_is_a_pod_and_its_token_secret_and_nothing_else() {
    let (fake, provider) = start(|_| {}).await;
    let spec = peer_spec("shape");
    let launched = launch(&provider, &spec).await;
    let name = launched.handle.clone();
    assert_eq!(name, spec.session.name);
    assert_eq!(
        requests_after(&fake, 0),
        [
            ("POST".into(), format!("/api/v1/namespaces/{NS}/pods")),
            ("POST".into(), format!("/api/v1/namespaces/{NS}/secrets")),
            (
                "PATCH".into(),
                format!("/api/v1/namespaces/{NS}/pods/{name}")
            ),
        ],
        "create the pod gated, its Secret, then ungate"
    );
    let pod = fake.pod(NS, &name).expect("the pod");
    let pod_json = serde_json::to_value(&pod).unwrap();
    assert!(
        !pod_json.to_string().contains("eyJ.bot-token.sig"),
        "the token is not in the pod: {pod_json}"
    );
    assert!(pod_json["spec"].get("schedulingGates").is_none(), "ungated");
    assert_eq!(pod_json["spec"]["restartPolicy"], "Never");
    assert_eq!(
        pod_json["metadata"]["labels"][label::MANAGED_BY],
        "botdispatch"
    );
    assert_eq!(
        pod_json["metadata"]["annotations"]["botdispatch.io/owner"],
        "auth0|5f7c8ec7c33c6c004bbafe82"
    );
    let secret = fake
        .secret(NS, &format!("{name}-bot-token"))
        .expect("the token's Secret");
    let owners = secret.metadata.owner_references.clone().unwrap_or_default();
    assert_eq!(owners.len(), 1);
    assert_eq!(owners[0].kind, "Pod");
    assert_eq!(Some(owners[0].uid.clone()), pod.metadata.uid);
    assert_eq!(
        secret.data.as_ref().unwrap()["DAILY_ROOM_TOKEN"].0,
        b"eyJ.bot-token.sig"
    );
    assert_eq!(secret.immutable, Some(true));

    let n = fake.requests().len();
    provider
        .wait_started(&launched, Deadline::after(Duration::from_secs(10)))
        .await
        .expect("ready");
    let waits = requests_after(&fake, n);
    assert_eq!(waits[0].0, "GET", "a list first: {waits:?}");
    assert!(
        waits.iter().any(|(m, _)| m == "GET watch"),
        "then a watch, not polls: {waits:?}"
    );
    assert!(waits.len() <= 3, "{waits:?}");
    let status = provider.status(&name).await.unwrap().unwrap();
    assert_eq!(status.state, MachineState::Started);
    assert_eq!(status.labels.as_ref(), Some(&spec.session.labels));
    assert!(status.address.is_some(), "the pod IP");

    // Stop: the pod goes, and the garbage collector takes its Secret.
    provider.terminate(&name).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while fake.pod(NS, &name).is_some() || !fake.secrets().is_empty() {
        assert!(Instant::now() < deadline, "pod or secret left behind");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    provider.terminate(&name).await.expect("404 is success");
    assert_clean(&fake);
}

#[tokio::test]
async fn a_retried_create_adopts_its_own_pod_and_a_stranger_conflicts() {
    let (fake, provider) = start(|_| {}).await;
    let spec = peer_spec("retry");
    let first = launch(&provider, &spec).await;
    let again = launch(&provider, &spec).await;
    assert_eq!(first, again, "the same pod, not a second one");
    assert_eq!(fake.pods().len(), 1);
    let mut stranger = spec.clone();
    stranger.session.labels.owner = "mallory".into();
    match stranger.launch(provider.as_ref()).await {
        Err(ProviderError::Conflict { name, .. }) => assert_eq!(name, spec.session.name),
        other => panic!("{other:?}"),
    }
    // A create whose answer was lost: the pod exists, the launch finds it and goes on.
    let lost = peer_spec("lost");
    fake.set_fault(KubeOp::CreatePod, Fault::GhostCreate { status: 503 }, 1);
    let launched = launch(&provider, &lost).await;
    provider
        .wait_started(&launched, Deadline::after(Duration::from_secs(10)))
        .await
        .expect("the adopted pod starts");
    assert_clean(&fake);
}

#[tokio::test]
async fn a_pod_whose_dispatcher_died_before_its_secret_is_never_scheduled() {
    let (fake, provider) = start(|_| {}).await;
    let mut spec = peer_spec("halfway");
    spec.session.deadline = Deadline::after(Duration::from_millis(600));
    fake.set_fault(
        KubeOp::CreateSecret,
        Fault::Status {
            status: 500,
            retry_after: None,
        },
        100,
    );
    let err = spec.launch(provider.as_ref()).await.unwrap_err();
    assert!(err.is_transient(), "{err:?}");
    fake.clear_faults();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let pod = fake.pod(NS, &spec.session.name).expect("the gated pod");
    assert!(
        pod.spec.as_ref().unwrap().node_name.is_none(),
        "never scheduled, so nothing runs"
    );
    let status = provider.status(&spec.session.name).await.unwrap().unwrap();
    assert_eq!(status.state, MachineState::Starting, "reaped as stuck");
    assert!(status.detail.unwrap().contains("gated"));
    provider.terminate(&spec.session.name).await.unwrap();
    assert!(fake.pod(NS, &spec.session.name).is_none(), "gone at once");
    assert!(fake.secrets().is_empty());
}

#[tokio::test]
async fn image_pull_failures_fail_the_start_at_once_with_the_reason() {
    let (fake, provider) = start(|_| {}).await;
    fake.refuse_image(IMAGE);
    let spec = peer_spec("pull");
    let launched = launch(&provider, &spec).await;
    let t = Instant::now();
    let err = provider
        .wait_started(&launched, Deadline::after(Duration::from_secs(20)))
        .await
        .unwrap_err();
    assert!(
        matches!(&err, ProviderError::StartFailed { message, .. } if message.starts_with("ErrImagePull: failed to pull")),
        "{err:?}"
    );
    assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
    let status = provider.status(&launched.handle).await.unwrap().unwrap();
    assert_eq!(status.state, MachineState::Failed);
    assert!(status.detail.unwrap().contains("Image"));
}

#[tokio::test]
async fn an_unschedulable_pod_fails_at_the_deadline_with_the_schedulers_words() {
    let (fake, provider) = start(|_| {}).await;
    fake.set_unschedulable(true);
    let spec = peer_spec("unsched");
    let launched = launch(&provider, &spec).await;
    let t = Instant::now();
    let err = provider
        .wait_started(&launched, Deadline::after(Duration::from_millis(800)))
        .await
        .unwrap_err();
    assert!(
        matches!(&err, ProviderError::StartFailed { message, .. } if message.contains("Unschedulable: 0/1 nodes are available")),
        "{err:?}"
    );
    assert!(
        t.elapsed() >= Duration::from_millis(700),
        "waited for a node"
    );
    let status = provider.status(&launched.handle).await.unwrap().unwrap();
    assert_eq!(status.state, MachineState::Starting);
    assert!(status.detail.unwrap().contains("Unschedulable"));
}

#[tokio::test]
async fn a_node_selector_no_node_matches_is_unschedulable() {
    let fake = FakeKube::start(FakeKubeConfig::default()).await;
    let mut config = config(&fake);
    config.node_selector = BTreeMap::from([("pool".into(), "gpu".into())]);
    let provider = KubernetesProvider::connect(&ctx(), &config).await.unwrap();
    let launched = launch(&provider, &peer_spec("selector")).await;
    let err = provider
        .wait_started(&launched, Deadline::after(Duration::from_millis(500)))
        .await
        .unwrap_err();
    assert!(matches!(err, ProviderError::StartFailed { .. }), "{err:?}");
}

#[tokio::test]
async fn an_expired_watch_is_listed_again_and_the_wait_goes_on() {
    let (fake, provider) = start(|c| c.start_delay = Duration::from_millis(600)).await;
    let spec = peer_spec("gone410");
    let launched = launch(&provider, &spec).await;
    let n = fake.requests().len();
    let waiting = {
        let provider = provider.clone();
        let launched = launched.clone();
        tokio::spawn(async move {
            provider
                .wait_started(&launched, Deadline::after(Duration::from_secs(10)))
                .await
        })
    };
    // Let the watch open, then expire the history under it.
    let t = Instant::now();
    while fake.open_watches() == 0 {
        assert!(t.elapsed() < Duration::from_secs(5));
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    fake.expire_watches();
    waiting.await.unwrap().expect("ready after a re-list");
    let calls = requests_after(&fake, n);
    let lists = calls.iter().filter(|(m, _)| m == "GET").count();
    let watches = calls.iter().filter(|(m, _)| m == "GET watch").count();
    assert!(lists >= 2 && watches >= 2, "re-listed: {calls:?}");
    assert_clean(&fake);
}

#[tokio::test]
async fn throttling_carries_retry_after_and_a_throttled_watch_is_waited_out() {
    let (fake, provider) = start(|_| {}).await;
    fake.set_fault(
        KubeOp::CreatePod,
        Fault::Status {
            status: 429,
            retry_after: Some(2),
        },
        1,
    );
    match peer_spec("t1").launch(provider.as_ref()).await {
        Err(ProviderError::Throttled { retry_after, .. }) => {
            assert_eq!(retry_after, Some(Duration::from_secs(2)))
        }
        other => panic!("{other:?}"),
    }
    let launched = launch(&provider, &peer_spec("t2")).await;
    fake.set_fault(
        KubeOp::ListPods,
        Fault::Status {
            status: 429,
            retry_after: Some(1),
        },
        1,
    );
    let t = Instant::now();
    provider
        .wait_started(&launched, Deadline::after(Duration::from_secs(10)))
        .await
        .expect("started after the throttle");
    assert!(
        t.elapsed() >= Duration::from_secs(1),
        "honoured Retry-After"
    );
    // With less time left than the hint, the throttle is the answer.
    fake.set_fault(
        KubeOp::ListPods,
        Fault::Status {
            status: 429,
            retry_after: Some(5),
        },
        1,
    );
    let err = provider
        .wait_started(&launched, Deadline::after(Duration::from_secs(1)))
        .await
        .unwrap_err();
    assert!(matches!(err, ProviderError::Throttled { .. }), "{err:?}");
}

#[tokio::test]
async fn relabel_moves_the_deadline_label_and_lowers_the_active_deadline() {
    let (fake, provider) = start(|_| {}).await;
    let launched = launch(&provider, &peer_spec("relabel")).await;
    provider
        .wait_started(&launched, Deadline::after(Duration::from_secs(10)))
        .await
        .unwrap();
    let relabel = provider.relabel().expect("kubernetes relabels");
    let session_end = chrono::Utc::now().timestamp() + 1800;
    relabel
        .set_deadline(
            &launched.handle,
            Deadline::from_unix_secs(session_end).unwrap(),
        )
        .await
        .unwrap();
    let pod = fake.pod(NS, &launched.handle).unwrap();
    assert_eq!(
        pod.metadata.labels.as_ref().unwrap()[label::DEADLINE],
        session_end.to_string()
    );
    let start = pod
        .status
        .as_ref()
        .unwrap()
        .start_time
        .as_ref()
        .unwrap()
        .0
        .as_second();
    let ads = pod.spec.as_ref().unwrap().active_deadline_seconds.unwrap();
    assert!(
        (start + ads - session_end).abs() <= 1,
        "ends at the session's end"
    );

    // A later deadline moves the label; activeDeadlineSeconds cannot grow.
    relabel
        .set_deadline(
            &launched.handle,
            Deadline::from_unix_secs(session_end + 600).unwrap(),
        )
        .await
        .unwrap();
    let pod = fake.pod(NS, &launched.handle).unwrap();
    assert_eq!(
        pod.spec.as_ref().unwrap().active_deadline_seconds,
        Some(ads)
    );
    assert_eq!(
        pod.metadata.labels.as_ref().unwrap()[label::DEADLINE],
        (session_end + 600).to_string()
    );
    let status = provider.status(&launched.handle).await.unwrap().unwrap();
    assert_eq!(
        status.labels.unwrap().deadline.unix_secs(),
        session_end + 600
    );

    // A patch that loses a resourceVersion race is made again from a fresh read.
    fake.set_fault(
        KubeOp::PatchPod,
        Fault::Status {
            status: 409,
            retry_after: None,
        },
        1,
    );
    let n = fake.requests().len();
    relabel
        .set_deadline(
            &launched.handle,
            Deadline::from_unix_secs(session_end + 60).unwrap(),
        )
        .await
        .unwrap();
    let calls = requests_after(&fake, n);
    assert_eq!(
        calls.iter().filter(|(m, _)| m == "PATCH").count(),
        2,
        "{calls:?}"
    );
    assert_eq!(
        calls.iter().filter(|(m, _)| m == "GET").count(),
        2,
        "{calls:?}"
    );

    // Relabelling a pod that is gone is nothing to do.
    relabel
        .set_deadline("bd-gone", Deadline::from_unix_secs(session_end).unwrap())
        .await
        .unwrap();
    assert_clean(&fake);
}

#[tokio::test]
async fn the_fake_refuses_stale_updates_and_expired_watches_like_the_api_server() {
    let (fake, provider) = start(|_| {}).await;
    let launched = launch(&provider, &peer_spec("stale")).await;
    let http = reqwest::Client::new();
    let url = format!(
        "{}/api/v1/namespaces/{NS}/pods/{}",
        fake.api_url(),
        launched.handle
    );
    let resp = http
        .patch(&url)
        .bearer_auth(TOKEN)
        .header("content-type", "application/merge-patch+json")
        .json(&json!({"metadata": {"resourceVersion": "1", "labels": {"x": "y"}}}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 409);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["kind"], "Status");
    assert_eq!(body["reason"], "Conflict");
    // activeDeadlineSeconds may not grow.
    let resp = http
        .patch(&url)
        .bearer_auth(TOKEN)
        .header("content-type", "application/merge-patch+json")
        .json(&json!({"spec": {"activeDeadlineSeconds": 999_999_999}}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 422);
    // A watch from a forgotten resourceVersion: one ERROR event with 410 Expired.
    fake.expire_watches();
    let text = http
        .get(format!(
            "{}/api/v1/namespaces/{NS}/pods?watch=true&resourceVersion=1",
            fake.api_url()
        ))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let event: Value = serde_json::from_str(text.lines().next().unwrap()).unwrap();
    assert_eq!(event["type"], "ERROR");
    assert_eq!(event["object"]["code"], 410);
    assert_eq!(event["object"]["reason"], "Expired");
    // Unauthenticated and unknown namespaces.
    let resp = http.get(&url).send().await.unwrap();
    assert_eq!(resp.status(), 401);
    let resp = http
        .get(format!("{}/api/v1/namespaces/nope/pods", fake.api_url()))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 404);
    // A Secret whose owner never existed is collected.
    let resp = http
        .post(format!("{}/api/v1/namespaces/{NS}/secrets", fake.api_url()))
        .bearer_auth(TOKEN)
        .json(&json!({"metadata": {"name": "orphan", "ownerReferences": [
            {"apiVersion": "v1", "kind": "Pod", "name": "ghost", "uid": "no-such-uid"}]},
            "stringData": {"k": "v"}}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 201);
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(fake.secret(NS, "orphan").is_none());
}

#[tokio::test]
async fn bad_credentials_and_namespaces_are_refused_by_check() {
    let fake = FakeKube::start(FakeKubeConfig::default()).await;
    let mut bad_token = config(&fake);
    bad_token.token = Some(Secret::new("wrong"));
    let provider = KubernetesProvider::connect(&ctx(), &bad_token)
        .await
        .unwrap();
    let err = provider.check().await.unwrap_err();
    assert!(
        matches!(err, ProviderError::Rejected { status: 401, .. }),
        "{err:?}"
    );
    let mut bad_ns = config(&fake);
    bad_ns.namespace = Some("elsewhere".into());
    let provider = KubernetesProvider::connect(&ctx(), &bad_ns).await.unwrap();
    let err = provider.check().await.unwrap_err();
    assert!(
        matches!(err, ProviderError::Rejected { status: 404, .. }),
        "{err:?}"
    );
    let provider = KubernetesProvider::connect(&ctx(), &config(&fake))
        .await
        .unwrap();
    provider.check().await.unwrap();
    // Nothing listens: unavailable, with the transport error kept.
    let mut nowhere = config(&fake);
    nowhere.api_url = Some("http://127.0.0.1:9".into());
    let provider = KubernetesProvider::connect(&ctx(), &nowhere).await.unwrap();
    let err = provider.check().await.unwrap_err();
    assert!(matches!(err, ProviderError::Unavailable { .. }), "{err:?}");
    assert!(std::error::Error::source(&err).is_some());
}

/// Each document of `deploy/kubernetes/*.yaml`, by kind.
fn manifests() -> Vec<(String, Value)> {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/kubernetes");
    let mut files: Vec<_> = std::fs::read_dir(dir)
        .expect("deploy/kubernetes")
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    let mut docs = Vec::new();
    for file in files {
        let text = std::fs::read_to_string(&file).unwrap();
        let parsed: Vec<Value> = serde_saphyr::from_multiple(&text)
            .unwrap_or_else(|e| panic!("{}: {e}", file.display()));
        for doc in parsed.into_iter().filter(|d| !d.is_null()) {
            let kind = doc["kind"].as_str().unwrap_or_default().to_owned();
            docs.push((kind, doc));
        }
    }
    docs
}

/// Drops nulls (YAML's empty values) so a document and its typed round trip compare.
fn normalized(value: &Value) -> Value {
    match value {
        Value::Object(m) => Value::Object(
            m.iter()
                .filter(|(_, v)| !v.is_null())
                .map(|(k, v)| (k.clone(), normalized(v)))
                .collect(),
        ),
        Value::Array(a) => Value::Array(a.iter().map(normalized).collect()),
        other => other.clone(),
    }
}

/// `doc` read as `T` and written back is `doc` again: no field unknown to Kubernetes (a typo)
/// was dropped on the way.
fn typed<T: serde::de::DeserializeOwned + serde::Serialize>(kind: &str, doc: &Value) -> T {
    let typed: T = serde_json::from_value(doc.clone()).unwrap_or_else(|e| panic!("{kind}: {e}"));
    let back = serde_json::to_value(&typed).unwrap();
    assert_eq!(
        normalized(&back),
        normalized(doc),
        "{kind}: a field Kubernetes does not know, or a value of the wrong type"
    );
    typed
}

#[tokio::test]
async fn the_manifests_are_valid_and_the_role_allows_exactly_what_the_provider_calls() {
    let docs = manifests();
    let kinds: BTreeSet<&str> = docs.iter().map(|(k, _)| k.as_str()).collect();
    assert_eq!(
        kinds,
        BTreeSet::from([
            "Deployment",
            "PodDisruptionBudget",
            "Role",
            "RoleBinding",
            "Service",
            "ServiceAccount"
        ])
    );
    let mut role = None;
    for (kind, doc) in &docs {
        match kind.as_str() {
            "Deployment" => {
                let d: Deployment = typed(kind, doc);
                let spec = d.spec.unwrap();
                assert_eq!(spec.replicas, Some(2));
                let pod = spec.template.spec.unwrap();
                let c = &pod.containers[0];
                let probe = |p: &Option<k8s_openapi::api::core::v1::Probe>| {
                    p.as_ref().unwrap().http_get.as_ref().unwrap().path.clone()
                };
                assert_eq!(probe(&c.liveness_probe).as_deref(), Some("/healthz"));
                assert_eq!(probe(&c.readiness_probe).as_deref(), Some("/readyz"));
                let env: BTreeMap<String, Option<String>> = c
                    .env
                    .iter()
                    .flatten()
                    .map(|e| (e.name.clone(), e.value.clone()))
                    .collect();
                assert_eq!(env["BOTDISPATCH_PROVIDER"].as_deref(), Some("kubernetes"));
                let shutdown: i64 = env["BOTDISPATCH_SHUTDOWN_GRACE_SECS"]
                    .as_deref()
                    .unwrap()
                    .parse()
                    .unwrap();
                let pre_stop = c
                    .lifecycle
                    .as_ref()
                    .and_then(|l| l.pre_stop.as_ref())
                    .and_then(|h| h.sleep.as_ref())
                    .map_or(0, |s| s.seconds);
                // Connections are closed 2 s after the shutdown grace.
                assert!(
                    pod.termination_grace_period_seconds.unwrap() > shutdown + 2 + pre_stop,
                    "terminationGracePeriodSeconds above the shutdown grace"
                );
                assert_eq!(pod.service_account_name.as_deref(), Some("botdispatch"));
            }
            "Service" => {
                typed::<Service>(kind, doc);
            }
            "ServiceAccount" => {
                typed::<ServiceAccount>(kind, doc);
            }
            "RoleBinding" => {
                let b: RoleBinding = typed(kind, doc);
                assert_eq!(b.role_ref.name, "botdispatch");
                assert_eq!(b.subjects.unwrap()[0].name, "botdispatch");
            }
            "PodDisruptionBudget" => {
                typed::<PodDisruptionBudget>(kind, doc);
            }
            "Role" => role = Some(typed::<Role>(kind, doc)),
            other => panic!("unexpected kind {other}"),
        }
    }
    let allowed: BTreeSet<(String, String)> = role
        .expect("a Role")
        .rules
        .unwrap_or_default()
        .into_iter()
        .flat_map(|rule| {
            assert_eq!(
                rule.api_groups.as_deref(),
                Some(&[String::new()][..]),
                "core API group only"
            );
            let verbs = rule.verbs.clone();
            rule.resources
                .unwrap_or_default()
                .into_iter()
                .flat_map(move |r| verbs.clone().into_iter().map(move |v| (r.clone(), v)))
        })
        .collect();

    // Everything the provider does: the contract suite plus relabelling, checking and the
    // reserve.
    let (fake, provider) = start(|_| {}).await;
    let peer = KubePeer {
        fake: fake.clone(),
        provider: provider.clone(),
    };
    run_contract_suite(&peer).await;
    let launched = launch(&provider, &peer_spec("rbac")).await;
    provider
        .wait_started(&launched, Deadline::after(Duration::from_secs(10)))
        .await
        .unwrap();
    provider
        .relabel()
        .unwrap()
        .set_deadline(&launched.handle, Deadline::after(Duration::from_secs(600)))
        .await
        .unwrap();
    provider.check().await.unwrap();
    provider.terminate(&launched.handle).await.unwrap();
    // And the warm side: reserve pods made, listed, marked, one claimed and handed off (its
    // drain shortened by the confirmed deadline), one retired.
    let warm = replica(&fake).await;
    let handles = ready_reserve(&warm, 2).await;
    let reserve = warm.reserve().unwrap();
    reserve.list_reserve().await.unwrap();
    reserve
        .claim(&handles[0], &session_labels("rbac"))
        .await
        .unwrap();
    warm.handoff()
        .unwrap()
        .end_after_session(&handles[0], None)
        .await
        .unwrap();
    warm.relabel()
        .unwrap()
        .set_deadline(&handles[0], Deadline::after(Duration::from_secs(60)))
        .await
        .unwrap();
    reserve.retire(&handles[1]).await.unwrap();
    let used = fake.verbs_used();
    assert_eq!(
        allowed, used,
        "the Role allows exactly the calls the provider makes"
    );
}

// ---------------------------------------------------------------------------------------------
// The `http` handoff and the hot reserve.

const SECRET: &str = "handoff-secret-0123";

/// The agent's template with the `http` handoff on port 8080.
fn http_template() -> MachineTemplate {
    MachineTemplate {
        workload: Workload::Image(IMAGE.into()),
        cmd: None,
        guest: providers::Guest::default(),
        region: None,
        env: BTreeMap::from([("PORT".to_owned(), "8080".to_owned())]),
        handoff_port: Some(8080),
    }
}

/// Reserve labels of `slot`, under a name no other call gives (its "window" counts up).
fn reserve_labels(slot: u32, tier: Tier) -> ReserveLabels {
    static WINDOW: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(1);
    let window = WINDOW.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    ReserveLabels {
        name: format!("bd-default-r{slot}-0123456789-{window}"),
        slot,
        agent: "default".into(),
        fingerprint: "0123456789".into(),
        tier,
        ready: false,
        recycle: false,
        recycled_at: None,
    }
}

/// A provider (a dispatcher replica) whose pods' bots are reached on the fake's bot servers.
async fn replica(fake: &FakeKube) -> Arc<KubernetesProvider> {
    let config = KubernetesConfig {
        pod_url: fake.pod_url_template(),
        ..config(fake)
    };
    Arc::new(KubernetesProvider::connect(&ctx(), &config).await.unwrap())
}

/// Prepares `n` reserve pods, waits until the kubelet says they are Ready and marks them
/// (the dispatcher's own probe), as replenishment does. Their handles.
async fn ready_reserve(provider: &KubernetesProvider, n: u32) -> Vec<String> {
    let reserve = provider.reserve().unwrap();
    let env = BTreeMap::from([(providers::HANDOFF_SECRET_ENV.to_owned(), SECRET.to_owned())]);
    let mut handles = Vec::new();
    for slot in 0..n {
        let labels = reserve_labels(slot, Tier::Hot);
        let launched = reserve
            .prepare(&http_template(), &labels.name, &labels, &env)
            .await
            .expect("prepare");
        handles.push(launched.handle);
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let listed = reserve.list_reserve().await.unwrap();
        let up = listed
            .iter()
            .filter(|m| m.provider_state == "running")
            .count();
        if up == n as usize {
            break;
        }
        assert!(Instant::now() < deadline, "reserve not up: {listed:#?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for h in &handles {
        reserve.mark_ready(h).await.unwrap();
    }
    handles
}

fn session_labels(key: &str) -> SessionLabels {
    SessionLabels {
        session_key: key.into(),
        owner: "auth0|5f7c8ec7c33c6c004bbafe82".into(),
        room: format!("bd-{key}"),
        agent: "default".into(),
        deployment: "default".into(),
        start: StartType::Warm(Tier::Hot),
        deadline: Deadline::from_unix_secs(chrono::Utc::now().timestamp() + 60).unwrap(),
        timings: None,
    }
}

async fn post_bot(url: &url::Url, secret: &str, key: &str) -> reqwest::Result<reqwest::Response> {
    reqwest::Client::new()
        .post(format!("{}/bot", url.as_str().trim_end_matches('/')))
        .bearer_auth(secret)
        .header("x-daily-session-id", key)
        .header("x-daily-room-url", "https://x.daily.co/bd-k")
        .json(&json!({"hello": "world"}))
        .timeout(Duration::from_secs(10))
        .send()
        .await
}

/// Two replicas claim the same pods at once, each from its own listing: every pod goes to
/// exactly one of them, the other gets `Conflict` (and would try its next candidate).
#[tokio::test]
async fn two_replicas_claiming_one_pod_never_both_win() {
    const PODS: u32 = 12;
    let fake = FakeKube::start(FakeKubeConfig::default()).await;
    let (a, b) = (replica(&fake).await, replica(&fake).await);
    let handles = ready_reserve(&a, PODS).await;
    a.reserve().unwrap().list_reserve().await.unwrap();
    b.reserve().unwrap().list_reserve().await.unwrap();
    let races = handles.iter().map(|h| {
        let (a, b) = (a.clone(), b.clone());
        async move {
            let (la, lb) = (
                session_labels(&format!("a{h}")),
                session_labels(&format!("b{h}")),
            );
            let (ra, rb) = tokio::join!(
                a.reserve().unwrap().claim(h, &la),
                b.reserve().unwrap().claim(h, &lb),
            );
            (h.clone(), ra, rb)
        }
    });
    for (h, ra, rb) in futures_util::future::join_all(races).await {
        let won: Vec<&str> = [("a", &ra), ("b", &rb)]
            .into_iter()
            .filter(|(_, r)| r.is_ok())
            .map(|(who, _)| who)
            .collect();
        assert_eq!(won.len(), 1, "pod {h}: {ra:?} / {rb:?}");
        let lost = if won[0] == "a" { rb } else { ra };
        assert!(
            matches!(lost, Err(ProviderError::Conflict { .. })),
            "pod {h}: the loser gets Conflict: {lost:?}"
        );
        // The pod carries the winner's session, and is no reserve pod any more.
        let status = a.status(&h).await.unwrap().unwrap();
        let labels = status.labels.expect("a session's");
        assert_eq!(labels.session_key, format!("{}{h}", won[0]));
        assert_eq!(labels.start, StartType::Warm(Tier::Hot));
        assert!(status.reserve.is_none());
        let pod = fake.pod(NS, &h).unwrap();
        assert_eq!(
            pod.metadata.labels.as_ref().unwrap()[label::ROLE],
            "session"
        );
    }
    assert!(a
        .reserve()
        .unwrap()
        .list_reserve()
        .await
        .unwrap()
        .is_empty());
    // A claim on a pod that is a session's already is a Conflict, whatever the listing said.
    let err = b
        .reserve()
        .unwrap()
        .claim(&handles[0], &session_labels("late"))
        .await
        .unwrap_err();
    assert!(matches!(err, ProviderError::Conflict { .. }), "{err:?}");
    assert_clean(&fake);
}

/// The claim itself: one patch from the listing; after only the pod's status moved, one read
/// and a second patch; a pod not marked ready or not a reserve pod is never taken.
#[tokio::test]
async fn a_claim_is_one_conditional_patch_and_survives_a_status_change() {
    let fake = FakeKube::start(FakeKubeConfig::default()).await;
    let provider = replica(&fake).await;
    let reserve = provider.reserve().unwrap();
    let handles = ready_reserve(&provider, 3).await;
    reserve.list_reserve().await.unwrap();

    let n = fake.requests().len();
    reserve
        .claim(&handles[0], &session_labels("k0"))
        .await
        .unwrap();
    let calls = requests_after(&fake, n);
    assert_eq!(
        calls,
        [(
            "PATCH".into(),
            format!("/api/v1/namespaces/{NS}/pods/{}", handles[0])
        )],
        "one call on the critical path"
    );
    let patch = fake.requests().last().unwrap().body.clone().unwrap();
    assert!(
        patch["metadata"]["resourceVersion"].is_string(),
        "conditional on the listed version: {patch}"
    );
    // The claimed pod's deadline comes down to a cold pod's backstop.
    let pod = fake.pod(NS, &handles[0]).unwrap();
    let ads = pod.spec.as_ref().unwrap().active_deadline_seconds.unwrap();
    assert!(ads <= 86_400 + 5, "{ads}");
    assert_eq!(
        pod.metadata.annotations.as_ref().unwrap()["botdispatch.io/owner"],
        "auth0|5f7c8ec7c33c6c004bbafe82"
    );

    // Another replica touches the pod after this one listed it (its resourceVersion moves):
    // the claim reads it again and still takes it.
    let other = replica(&fake).await;
    other
        .reserve()
        .unwrap()
        .mark_ready(&handles[1])
        .await
        .unwrap();
    let n = fake.requests().len();
    reserve
        .claim(&handles[1], &session_labels("k1"))
        .await
        .unwrap();
    let methods: Vec<String> = requests_after(&fake, n)
        .into_iter()
        .map(|(m, _)| m)
        .collect();
    assert_eq!(methods, ["PATCH", "GET", "PATCH"]);
    assert_eq!(fake.requests()[fake.requests().len() - 2].status, 200);

    // Not marked ready by any dispatcher: not claimable.
    let labels = reserve_labels(7, Tier::Hot);
    let env = BTreeMap::new();
    let fresh = reserve
        .prepare(&http_template(), &labels.name, &labels, &env)
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let err = reserve
        .claim(&fresh.handle, &session_labels("k7"))
        .await
        .unwrap_err();
    assert!(matches!(err, ProviderError::Conflict { .. }), "{err:?}");
    // A pod that does not exist: Conflict (try the next).
    let err = reserve
        .claim("bd-nope", &session_labels("kx"))
        .await
        .unwrap_err();
    assert!(matches!(err, ProviderError::Conflict { .. }), "{err:?}");
    assert_clean(&fake);
}

/// After the claim: the session goes to the pod's IP, the pod is deleted with a long grace
/// (SIGTERM: the bot finishes its call) and reported started meanwhile, the confirmed
/// deadline shortens that grace, no second session reaches the pod, and the pod goes once its
/// session is over.
#[tokio::test]
async fn the_handoff_reaches_the_pod_ip_and_the_pod_drains_after_its_one_session() {
    let fake = FakeKube::start(FakeKubeConfig::default()).await;
    let provider = replica(&fake).await;
    let reserve = provider.reserve().unwrap();
    let handoff = provider
        .handoff()
        .expect("kubernetes hands sessions over HTTP");
    let handles = ready_reserve(&provider, 1).await;
    let listed = reserve.list_reserve().await.unwrap();
    let machine = listed[0].clone();
    let h = handles[0].clone();
    reserve.claim(&h, &session_labels("k1")).await.unwrap();

    let url = handoff.bot_url(&machine.as_launched(), 8080).unwrap();
    let ip = machine.address.clone().unwrap();
    assert!(ip.starts_with("10.244."), "{ip}");
    assert_eq!(url.as_str(), format!("{}/_pods/{ip}/8080", fake.api_url()));
    let ready = reqwest::get(format!("{url}/readyz")).await.unwrap();
    assert_eq!(ready.status(), 200);
    let session = tokio::spawn({
        let url = url.clone();
        async move { post_bot(&url, SECRET, "k1").await }
    });
    let deadline = Instant::now() + Duration::from_secs(5);
    while fake.deliveries().is_empty() {
        assert!(Instant::now() < deadline, "no delivery");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let d = &fake.deliveries()[0];
    assert_eq!((d.pod.as_str(), d.refused), (h.as_str(), None));
    assert!(d.secret_matched);
    assert_eq!(d.session_id.as_deref(), Some("k1"));

    handoff.end_after_session(&h, None).await.unwrap();
    let pod = fake.pod(NS, &h).unwrap();
    assert!(pod.metadata.deletion_timestamp.is_some());
    assert_eq!(pod.metadata.deletion_grace_period_seconds, Some(86_400));
    let status = provider.status(&h).await.unwrap().unwrap();
    assert_eq!(status.state, MachineState::Started, "{status:?}");
    assert_eq!(status.provider_state, "Terminating");
    assert!(
        provider
            .list_managed()
            .await
            .unwrap()
            .iter()
            .any(|m| m.handle == h && m.state == MachineState::Started),
        "capacity counts it"
    );
    // No second session: the bot takes no new connection after SIGTERM.
    let second = post_bot(&url, SECRET, "k2").await;
    assert!(second.is_err(), "{second:?}");

    // The session's real deadline: the drain ends there at the latest.
    let end = chrono::Utc::now().timestamp() + 30;
    provider
        .relabel()
        .unwrap()
        .set_deadline(&h, Deadline::from_unix_secs(end).unwrap())
        .await
        .unwrap();
    let pod = fake.pod(NS, &h).unwrap();
    let grace = pod.metadata.deletion_grace_period_seconds.unwrap();
    assert!((29..=31).contains(&grace), "{grace}");
    assert_eq!(
        pod.metadata.labels.as_ref().unwrap()[label::DEADLINE],
        end.to_string()
    );
    let ads = pod.spec.as_ref().unwrap().active_deadline_seconds.unwrap();
    assert!(ads <= 60, "activeDeadlineSeconds lowered too: {ads}");

    // The call ends: the bot exits and the pod goes; the session's /bot is answered.
    assert_eq!(fake.end_sessions(NS, &h), 1);
    let answer = session.await.unwrap().unwrap();
    assert_eq!(answer.status(), 200);
    let deadline = Instant::now() + Duration::from_secs(5);
    while fake.pod(NS, &h).is_some() {
        assert!(
            Instant::now() < deadline,
            "the pod stayed after its session"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(fake.deliveries().len(), 1);
    assert!(
        fake.bot_violations().is_empty(),
        "{:?}",
        fake.bot_violations()
    );
    handoff
        .end_after_session(&h, None)
        .await
        .expect("404 is success");
    assert_clean(&fake);
}

/// A cold `http` pod: its launch answers before the pod has an IP; the wait on this replica
/// sees it, and the handoff goes there. Another replica knows no IP for it.
#[tokio::test]
async fn a_cold_http_pod_is_reached_at_the_ip_its_wait_saw() {
    let fake = FakeKube::start(FakeKubeConfig::default()).await;
    let provider = replica(&fake).await;
    let mut spec = peer_spec("coldhttp");
    spec.template = http_template();
    spec.session.env =
        BTreeMap::from([(providers::HANDOFF_SECRET_ENV.to_owned(), SECRET.to_owned())]);
    let launched = launch(&provider, &spec).await;
    assert!(launched.address.is_none());
    let pod = fake.pod(NS, &launched.handle).unwrap();
    let container = &pod.spec.as_ref().unwrap().containers[0];
    assert!(
        container.readiness_probe.is_none(),
        "a cold start polls /readyz itself"
    );
    assert!(fake.secrets().is_empty(), "no room token, no Secret");
    let handoff = provider.handoff().unwrap();
    provider
        .wait_started(&launched, Deadline::after(Duration::from_secs(10)))
        .await
        .unwrap();
    let url = handoff.bot_url(&launched, 8080).unwrap();
    let ip = fake
        .pod(NS, &launched.handle)
        .unwrap()
        .status
        .unwrap()
        .pod_ip
        .unwrap();
    assert!(url.as_str().contains(&format!("/_pods/{ip}/8080")), "{url}");
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let r = reqwest::get(format!("{url}/readyz")).await.unwrap();
        if r.status() == 200 {
            break;
        }
        assert!(Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let other = replica(&fake).await;
    let err = other
        .handoff()
        .unwrap()
        .bot_url(&launched, 8080)
        .unwrap_err();
    assert!(matches!(err, ProviderError::Unavailable { .. }), "{err:?}");
    // A handle that is no pod name never reaches the URL.
    let mut bad = launched.clone();
    bad.handle = "../../x".into();
    assert!(handoff.bot_url(&bad, 8080).is_err());
    assert_clean(&fake);
}

/// Retiring deletes an unclaimed reserve pod, conditionally on the version it read; a pod
/// claimed since the listing is left alone.
#[tokio::test]
async fn retire_deletes_only_unclaimed_reserve_pods() {
    let fake = FakeKube::start(FakeKubeConfig::default()).await;
    let provider = replica(&fake).await;
    let reserve = provider.reserve().unwrap();
    let handles = ready_reserve(&provider, 2).await;
    reserve.list_reserve().await.unwrap();
    reserve
        .claim(&handles[0], &session_labels("k0"))
        .await
        .unwrap();
    let err = reserve.retire(&handles[0]).await.unwrap_err();
    assert!(matches!(err, ProviderError::Conflict { .. }), "{err:?}");
    assert!(fake
        .pod(NS, &handles[0])
        .unwrap()
        .metadata
        .deletion_timestamp
        .is_none());

    reserve.retire(&handles[1]).await.unwrap();
    let delete = fake
        .requests()
        .into_iter()
        .rev()
        .find(|r| r.method == "DELETE")
        .unwrap();
    let body = delete.body.unwrap();
    assert!(
        body["preconditions"]["resourceVersion"].is_string(),
        "{body}"
    );
    assert_eq!(body["gracePeriodSeconds"], 2, "the stop grace");
    let deadline = Instant::now() + Duration::from_secs(5);
    while fake.pod(NS, &handles[1]).is_some() {
        assert!(Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    reserve.retire(&handles[1]).await.expect("gone is success");

    // The precondition itself, as the API server applies it: a stale version is a 409.
    let labels = reserve_labels(5, Tier::Hot);
    let env = BTreeMap::new();
    let p = reserve
        .prepare(&http_template(), &labels.name, &labels, &env)
        .await
        .unwrap();
    let resp = reqwest::Client::new()
        .delete(format!(
            "{}/api/v1/namespaces/{NS}/pods/{}",
            fake.api_url(),
            p.handle
        ))
        .bearer_auth(TOKEN)
        .json(&json!({"preconditions": {"resourceVersion": "1"}}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 409);
    let status: Value = resp.json().await.unwrap();
    assert_eq!(status["reason"], "Conflict");
    assert!(fake.pod(NS, &p.handle).is_some());
    assert_clean(&fake);
}

/// What a pod cannot do is refused before any call: other tiers, suspending, starting,
/// recycling.
#[tokio::test]
async fn kubernetes_keeps_hot_pods_only_and_never_recycles() {
    let fake = FakeKube::start(FakeKubeConfig::default()).await;
    let provider = replica(&fake).await;
    let reserve = provider.reserve().unwrap();
    assert_eq!(reserve.tiers(), [Tier::Hot]);
    let env = BTreeMap::new();
    for tier in [Tier::Suspended, Tier::Stopped] {
        let labels = reserve_labels(0, tier);
        let err = reserve
            .prepare(&http_template(), &labels.name, &labels, &env)
            .await
            .unwrap_err();
        assert!(matches!(err, ProviderError::Rejected { .. }), "{err:?}");
    }
    let mut recycled = reserve_labels(0, Tier::Hot);
    recycled.recycle = true;
    let err = reserve
        .prepare(&http_template(), &recycled.name, &recycled, &env)
        .await
        .unwrap_err();
    assert!(matches!(err, ProviderError::Rejected { .. }), "{err:?}");
    assert!(reserve.suspend("bd-x").await.is_err());
    assert!(reserve.start("bd-x", None).await.is_err());
    let err = reserve
        .recycle("bd-x", &reserve_labels(0, Tier::Hot))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("never recycled"), "{err}");
    assert!(fake.requests().is_empty(), "{:?}", fake.requests());
}

/// The fake's kubelet: a readiness probe passes only once the bot answers it on its port; pods
/// get IPs of their own.
#[tokio::test]
async fn the_fake_kubelet_probes_readiness_and_gives_each_pod_its_ip() {
    let fake = FakeKube::start(FakeKubeConfig {
        bot_boot_delay: Duration::from_millis(400),
        ..FakeKubeConfig::default()
    })
    .await;
    let provider = replica(&fake).await;
    let reserve = provider.reserve().unwrap();
    let env = BTreeMap::new();
    let t0 = Instant::now();
    let mut names = Vec::new();
    for slot in 0..2 {
        let labels = reserve_labels(slot, Tier::Hot);
        names.push(
            reserve
                .prepare(&http_template(), &labels.name, &labels, &env)
                .await
                .unwrap()
                .handle,
        );
    }
    // A probe on a port the bot does not listen on never passes.
    let mut wrong = http_template();
    wrong.env.insert("PORT".into(), "9000".into());
    let labels = reserve_labels(2, Tier::Hot);
    let deaf = reserve
        .prepare(&wrong, &labels.name, &labels, &env)
        .await
        .unwrap()
        .handle;
    let ready = |name: &str| {
        fake.pod(NS, name)
            .and_then(|p| p.status)
            .and_then(|s| s.conditions)
            .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
    };
    let deadline = Instant::now() + Duration::from_secs(5);
    while !names.iter().all(|n| ready(n)) {
        assert!(Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(
        t0.elapsed() >= Duration::from_millis(400),
        "Ready before the bot booted"
    );
    assert!(!ready(&deaf));
    let ip = |name: &str| fake.pod(NS, name).unwrap().status.unwrap().pod_ip.unwrap();
    assert_ne!(ip(&names[0]), ip(&names[1]));
    assert_clean(&fake);
}

/// How long a claim takes against the fake: the listing, then one patch per claim. Printed,
/// with a generous bound (the fake answers in well under a millisecond).
#[tokio::test]
async fn claim_latency_of_the_hot_reserve() {
    const PODS: u32 = 60;
    let fake = FakeKube::start(FakeKubeConfig::default()).await;
    let provider = replica(&fake).await;
    let reserve = provider.reserve().unwrap();
    let handles = ready_reserve(&provider, PODS).await;
    reserve.list_reserve().await.unwrap();
    let mut took = Vec::new();
    for (i, h) in handles.iter().enumerate() {
        let t = Instant::now();
        reserve
            .claim(h, &session_labels(&format!("k{i}")))
            .await
            .unwrap();
        took.push(t.elapsed());
    }
    took.sort();
    let pct = |p: usize| took[(took.len() * p / 100).min(took.len() - 1)];
    println!(
        "kubernetes hot reserve claim against the fake, {PODS} sequential claims: p50 {:?}, p95 {:?}, max {:?}",
        pct(50),
        pct(95),
        took[took.len() - 1]
    );
    assert!(pct(95) < Duration::from_millis(500), "{took:?}");

    // Worst-case contention: two replicas walk the same listing in the same order, each taking
    // the next pod when it loses one, until the reserve is empty. Per claim that succeeded:
    // the time from its first attempt, lost races included.
    let (a, b) = (replica(&fake).await, replica(&fake).await);
    let handles = ready_reserve(&a, PODS).await;
    a.reserve().unwrap().list_reserve().await.unwrap();
    b.reserve().unwrap().list_reserve().await.unwrap();
    let t0 = Instant::now();
    let walk = |p: Arc<KubernetesProvider>, who: &'static str| {
        let handles = handles.clone();
        async move {
            let mut took = Vec::new();
            let mut lost = 0;
            let mut t = Instant::now();
            for h in &handles {
                match p
                    .reserve()
                    .unwrap()
                    .claim(h, &session_labels(&format!("{who}{h}")))
                    .await
                {
                    Ok(_) => {
                        took.push(t.elapsed());
                        t = Instant::now();
                    }
                    Err(ProviderError::Conflict { .. }) => lost += 1,
                    Err(e) => panic!("{e:?}"),
                }
            }
            (took, lost)
        }
    };
    let ((mut took, lost_a), (took_b, lost_b)) = tokio::join!(walk(a, "a"), walk(b, "b"));
    let elapsed = t0.elapsed();
    assert_eq!(
        took.len() + took_b.len(),
        PODS as usize,
        "every pod claimed once"
    );
    took.extend(took_b);
    took.sort();
    let pct = |p: usize| took[(took.len() * p / 100).min(took.len() - 1)];
    println!(
        "kubernetes hot reserve claim against the fake, 2 replicas racing over {PODS} pods in the same order: p50 {:?}, p95 {:?}, {} lost races, {:.0} claims/s",
        pct(50),
        pct(95),
        lost_a + lost_b,
        PODS as f64 / elapsed.as_secs_f64()
    );
}
