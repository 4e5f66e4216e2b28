//! The `kubernetes` provider against the fake API server: the contract suite (through an
//! explicit API URL and through a kubeconfig), the shape of what a session creates, the
//! failure modes (image pulls, unschedulable pods, 410 Gone, 429, stale resourceVersions,
//! name conflicts), the bot token's Secret and its garbage collection, and the deploy/kubernetes
//! manifests (typed, no unknown fields, a Role that covers exactly the calls made).

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
    BuildContext, Deadline, MachineProvider, MachineState, ProviderError, Secret, Workload,
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

    // Everything the provider does: the contract suite plus relabelling and checking.
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
    let used = fake.verbs_used();
    assert_eq!(
        allowed, used,
        "the Role allows exactly the calls the provider makes"
    );
}
