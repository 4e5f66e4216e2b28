//! The real binary on the `kubernetes` provider, configured by environment alone (a kubeconfig
//! through `KUBECONFIG`), against the fake API server: start (wait) → ready → GET → DELETE, and
//! what the cluster holds at each step. Plus the example configuration, and warm starts on
//! Kubernetes (the `http` handoff to a pod's IP, a hot reserve of pods: filled to its size,
//! claimed by concurrent replicas without a pod handed out twice, rotated on a template change,
//! no pod ever reused; the claim's latency).

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use futures_util::future::join_all;
use providers::testkit::kube_fake::{FakeKube, FakeKubeConfig};
use reqwest::StatusCode;
use serde_json::{json, Value};

use crate::common::*;

const NS: &str = "bots";
const IMAGE: &str = "ghcr.io/acme/bot:1.0";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubernetes_by_configuration() {
    let kube = FakeKube::start(FakeKubeConfig::default()).await;
    let (_, daily) = start_fakes(&Options::default().fly).await;
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = dir.path().join("kubeconfig");
    std::fs::write(&kubeconfig, kube.kubeconfig(NS)).unwrap();
    let env: Vec<(&str, String)> = vec![
        ("BOTDISPATCH_LISTEN", "127.0.0.1:0".into()),
        ("BOTDISPATCH_PROVIDER", "kubernetes".into()),
        ("BOTDISPATCH_ROOMS", "daily".into()),
        ("BOTDISPATCH_JWT_SECRET", JWT_SECRET.into()),
        ("DAILY_API_KEY", DAILY_KEY.into()),
        ("DAILY_API_URL", daily.base_url()),
        ("BOTDISPATCH_BOT_IMAGE", IMAGE.into()),
        ("KUBECONFIG", kubeconfig.display().to_string()),
        ("BOTDISPATCH_K8S_STOP_GRACE_SECS", "1".into()),
    ];
    let refs: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let mut d = Dispatcher::spawn(&refs);
    let base = tokio::task::block_in_place(|| d.wait_ready());
    let http = reqwest::Client::new();
    let token = hs_token("alice");

    let t = Instant::now();
    let resp = http
        .post(format!("{base}/start"))
        .bearer_auth(&token)
        .json(&json!({"body": {"provider": "kubernetes"}}))
        .send()
        .await
        .unwrap();
    let status = resp.status();
    let started: Value = resp.json().await.unwrap();
    assert_eq!(status, StatusCode::OK, "{started}\n{}", d.output());
    println!(
        "kubernetes: /start answered ready in {} ms",
        t.elapsed().as_millis()
    );
    let url = format!("{base}{}", started["statusUrl"].as_str().unwrap());
    let view = get_json(&http, &url, &token).await;
    assert_eq!(view["status"], "ready", "{view}");
    assert_eq!(view["provider"], "kubernetes");
    let pod_name = view["machineId"].as_str().unwrap().to_owned();

    // The cluster holds the session's pod, ready, and its token only in the Secret.
    let pod = kube.pod(NS, &pod_name).expect("the session's pod");
    let pod_json = serde_json::to_value(&pod).unwrap();
    let user_token = started["dailyToken"].as_str().unwrap_or_default();
    let env: BTreeMap<String, Value> = pod_json["spec"]["containers"][0]["env"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| (e["name"].as_str().unwrap().to_owned(), e.clone()))
        .collect();
    assert!(env["DAILY_ROOM_TOKEN"]["valueFrom"]["secretKeyRef"].is_object());
    assert!(env["DAILY_ROOM_TOKEN"].get("value").is_none());
    assert!(env["DAILY_ROOM_URL"]["value"]
        .as_str()
        .unwrap()
        .contains("bd-"));
    assert_eq!(pod_json["spec"]["containers"][0]["image"], IMAGE);
    let secret = kube
        .secret(NS, &format!("{pod_name}-bot-token"))
        .expect("the bot token's Secret");
    let stored = String::from_utf8(secret.data.unwrap()["DAILY_ROOM_TOKEN"].0.clone()).unwrap();
    assert!(stored.starts_with("eyJ"), "a JWT");
    assert_ne!(stored, user_token, "the bot's token, not the user's");
    assert!(
        !pod_json.to_string().contains(&stored),
        "the token is not in the pod"
    );
    // The deadline was confirmed once the client had its answer.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let pod = kube.pod(NS, &pod_name).unwrap();
        let ads = pod.spec.unwrap().active_deadline_seconds.unwrap();
        if ads <= 3600 + 5 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "activeDeadlineSeconds not lowered: {ads}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let resp = http.delete(&url).bearer_auth(&token).send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let view = get_json(&http, &url, &token).await;
        if view["status"] == "ended" {
            break;
        }
        assert!(Instant::now() < deadline, "never ended: {view}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while kube.pod(NS, &pod_name).is_some() || !kube.secrets().is_empty() {
        assert!(Instant::now() < deadline, "the pod or its Secret stayed");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let resp = http.get(format!("{base}/readyz")).send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK, "{}", d.output());
    assert!(
        kube.spec_violations().is_empty(),
        "{:?}",
        kube.spec_violations()
    );
}

#[test]
fn the_kubernetes_example_configuration_loads() {
    let env = BTreeMap::from([
        ("BOTDISPATCH_JWT_SECRET", JWT_SECRET.to_owned()),
        ("BOTDISPATCH_SESSION_SECRET", SESSION_SECRET.to_owned()),
        ("DAILY_API_KEY", DAILY_KEY.to_owned()),
    ]);
    let config = config_from(include_str!("../../examples/kubernetes.toml"), &env)
        .unwrap_or_else(|e| panic!("{e}"));
    let debug = format!("{config:?}");
    assert!(debug.contains("Kubernetes"), "{debug}");
}

// ---------------------------------------------------------------------------------------------
// Warm starts on Kubernetes.

/// A dispatcher (in process) on the fake cluster whose default agent hands sessions over HTTP
/// and keeps a hot reserve of `size` pods (none when 0), replenished every 100 ms.
async fn kube_env(kube: &FakeKube, size: u32, mut opts: Options) -> TestEnv {
    opts.background = true;
    let mut env = vec![
        ("BOTDISPATCH_PROVIDER", "kubernetes".to_owned()),
        ("BOTDISPATCH_K8S_API_URL", kube.api_url()),
        ("BOTDISPATCH_K8S_TOKEN", "fake-kube-token".to_owned()),
        ("BOTDISPATCH_K8S_NAMESPACE", NS.to_owned()),
        ("BOTDISPATCH_K8S_POD_URL", kube.pod_url_template()),
        ("BOTDISPATCH_K8S_STOP_GRACE_SECS", "1".to_owned()),
        ("BOTDISPATCH_BOT_IMAGE", IMAGE.to_owned()),
        ("BOTDISPATCH_HANDOFF", "http".to_owned()),
        ("BOTDISPATCH_RESERVE_TIER", "hot".to_owned()),
        ("BOTDISPATCH_RESERVE_SIZE", size.to_string()),
        ("BOTDISPATCH_RESERVE_INTERVAL_MS", "100".to_owned()),
        ("BOTDISPATCH_REAPER_INTERVAL_SECS", "0".to_owned()),
        ("BOTDISPATCH_OUTBOUND_RATE_SCALE", "0".to_owned()),
    ];
    // The test's own settings win.
    env.retain(|(k, _)| !opts.env.iter().any(|(o, _)| o == k));
    opts.env.extend(env);
    TestEnv::with(opts).await
}

/// The fake cluster's pods, as the API shows them.
fn pods(kube: &FakeKube) -> Vec<Value> {
    kube.pods()
        .iter()
        .map(|p| serde_json::to_value(p).unwrap())
        .collect()
}

fn pod(kube: &FakeKube, name: &str) -> Option<Value> {
    kube.pod(NS, name).map(|p| serde_json::to_value(p).unwrap())
}

fn name(pod: &Value) -> &str {
    pod["metadata"]["name"].as_str().unwrap_or_default()
}

fn image(pod: &Value) -> &str {
    pod["spec"]["containers"][0]["image"]
        .as_str()
        .unwrap_or_default()
}

/// Unclaimed reserve pods that a claim can take: Ready (the kubelet's probe of `/readyz`) and
/// marked ready by a dispatcher's own probe.
fn ready_reserve(kube: &FakeKube) -> Vec<Value> {
    pods(kube)
        .into_iter()
        .filter(|p| {
            let l = &p["metadata"]["labels"];
            let ready = p["status"]["conditions"].as_array().is_some_and(|c| {
                c.iter()
                    .any(|c| c["type"] == "Ready" && c["status"] == "True")
            });
            l["botdispatch.io/role"] == "reserve"
                && l["botdispatch.io/ready"] == "1"
                && ready
                && p["metadata"].get("deletionTimestamp").is_none()
        })
        .collect()
}

/// Waits until `n` reserve pods are ready, then until the dispatchers listed them.
async fn wait_reserve_ready(kube: &FakeKube, n: usize) -> Vec<Value> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let ready = ready_reserve(kube);
        if ready.len() >= n {
            tokio::time::sleep(Duration::from_millis(300)).await;
            return ready;
        }
        assert!(
            Instant::now() < deadline,
            "reserve not ready: {} of {n}: {:#?}",
            ready.len(),
            pods(kube)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The pod's one session, delivered as the start answered it.
fn assert_delivered(kube: &FakeKube, pod: &str, resp: &Value) {
    let deliveries: Vec<_> = kube
        .deliveries()
        .into_iter()
        .filter(|d| d.pod == pod)
        .collect();
    assert_eq!(deliveries.len(), 1, "{deliveries:#?}");
    let d = &deliveries[0];
    assert_eq!(d.refused, None, "{d:?}");
    assert!(d.secret_matched, "the pod's own handoff secret");
    let key = session_key(resp["sessionId"].as_str().unwrap());
    assert_eq!(d.session_id.as_deref(), Some(key));
    assert_eq!(d.room_url.as_deref(), resp["dailyRoom"].as_str());
    assert_eq!(d.body, Some(json!({"hello": "world"})));
    let room = resp["dailyRoom"]
        .as_str()
        .unwrap()
        .rsplit('/')
        .next()
        .unwrap();
    let bot = decode_hs256(d.room_token.as_deref().unwrap(), DAILY_KEY);
    assert_eq!(
        (bot["r"].as_str(), bot["o"].as_bool()),
        (Some(room), Some(true))
    );
    // Delivered to the pod's own IP (and its handoff port).
    let ip = kube
        .pod(NS, pod)
        .and_then(|p| p.status?.pod_ip)
        .unwrap_or_default();
    assert!(!ip.is_empty());
    assert_eq!(d.pod_ip, ip);
}

fn uid(kube: &FakeKube, pod: &str) -> String {
    kube.pod(NS, pod)
        .and_then(|p| p.metadata.uid)
        .unwrap_or_default()
}

fn exists(kube: &FakeKube, uid: &str) -> bool {
    kube.pods()
        .iter()
        .any(|p| p.metadata.uid.as_deref() == Some(uid))
}

/// Waits until the pod of `uid` is gone. (By uid: a reserve pod's name is its slot's and
/// creation window's, so a new pod may take the name of one that went.)
async fn wait_gone(kube: &FakeKube, uid: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while exists(kube, uid) {
        assert!(Instant::now() < deadline, "pod {uid} stayed");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn a_hot_reserve_of_pods_fills_and_serves_a_start_over_http() {
    let kube = FakeKube::start(FakeKubeConfig::default()).await;
    let env = kube_env(&kube, 2, Options::default()).await;
    let reserve = wait_reserve_ready(&kube, 2).await;
    assert_eq!(kube.pods().len(), 2, "filled to its size, no more");
    assert!(kube.secrets().is_empty(), "a reserve pod holds no session");
    for p in &reserve {
        assert_eq!(
            p["spec"]["containers"][0]["readinessProbe"]["httpGet"]["path"],
            "/readyz"
        );
    }

    let (status, resp) = env.post_start("alice", start_body()).await;
    assert_eq!(status, StatusCode::OK, "{resp}");
    assert_eq!(resp["status"], "ready");
    assert_eq!(resp["startType"], "hot");
    let pod_name = session_handle(resp["sessionId"].as_str().unwrap());
    assert!(
        reserve.iter().any(|p| name(p) == pod_name),
        "{pod_name} is not a reserve pod"
    );
    assert_delivered(&kube, &pod_name, &resp);
    let claimed_uid = uid(&kube, &pod_name);
    let claimed = pod(&kube, &pod_name).unwrap();
    let l = &claimed["metadata"]["labels"];
    assert_eq!(l["botdispatch.io/role"], "session");
    assert_eq!(l["botdispatch.io/start"], "hot");
    assert_eq!(
        l["botdispatch.io/session"],
        session_key(resp["sessionId"].as_str().unwrap())
    );

    // SIGTERM after the handoff: the pod is being deleted with a grace that ends at the
    // session's deadline (confirmed in the background), and the session is live meanwhile.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let p = pod(&kube, &pod_name).unwrap();
        let meta = &p["metadata"];
        let grace = meta["deletionGracePeriodSeconds"].as_i64();
        let confirmed = meta["labels"]["botdispatch.io/deadline"]
            .as_str()
            .and_then(|d| d.parse::<i64>().ok())
            .is_some_and(|d| d > now() + 600);
        if meta.get("deletionTimestamp").is_some()
            && grace.is_some_and(|g| g <= 3600 + 5)
            && confirmed
        {
            break;
        }
        assert!(Instant::now() < deadline, "{meta}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (_, view) = env
        .get_session("alice", resp["statusUrl"].as_str().unwrap())
        .await;
    assert_eq!(view["status"], "ready", "{view}");
    assert_eq!(view["startType"], "hot", "{view}");

    // The reserve refills to its size with new pods.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let ready = ready_reserve(&kube);
        if ready.len() == 2
            && ready
                .iter()
                .all(|p| p["metadata"]["uid"] != claimed_uid.as_str())
        {
            break;
        }
        assert!(Instant::now() < deadline, "the reserve did not refill");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // The call ends: the bot exits and its pod goes; the session is over.
    assert_eq!(kube.end_sessions(NS, &pod_name), 1);
    wait_gone(&kube, &claimed_uid).await;
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let (_, view) = env
            .get_session("alice", resp["statusUrl"].as_str().unwrap())
            .await;
        if view["status"] == "ended" {
            break;
        }
        assert!(Instant::now() < deadline, "{view}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        kube.bot_violations().is_empty(),
        "{:?}",
        kube.bot_violations()
    );
    assert!(
        kube.spec_violations().is_empty(),
        "{:?}",
        kube.spec_violations()
    );
    env.app.shutdown.cancel();
}

#[tokio::test]
async fn a_cold_http_start_on_kubernetes_reaches_its_pod_by_ip() {
    let kube = FakeKube::start(FakeKubeConfig::default()).await;
    let env = kube_env(&kube, 0, Options::default()).await;
    let (status, resp) = env.post_start("alice", start_body()).await;
    assert_eq!(status, StatusCode::OK, "{resp}");
    assert_eq!(resp["startType"], "cold");
    let pod_name = session_handle(resp["sessionId"].as_str().unwrap());
    assert_delivered(&kube, &pod_name, &resp);
    let p = pod(&kube, &pod_name).unwrap();
    let env_vars: BTreeMap<&str, &Value> = p["spec"]["containers"][0]["env"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| (e["name"].as_str().unwrap(), &e["value"]))
        .collect();
    assert!(
        !env_vars.contains_key("DAILY_ROOM_URL"),
        "no session in the pod: {env_vars:?}"
    );
    assert_eq!(env_vars["PORT"], "8080");
    let cold_uid = uid(&kube, &pod_name);
    kube.end_sessions(NS, &pod_name);
    wait_gone(&kube, &cold_uid).await;
    assert!(
        kube.bot_violations().is_empty(),
        "{:?}",
        kube.bot_violations()
    );
    env.app.shutdown.cancel();
}

#[tokio::test]
async fn two_replicas_claiming_from_one_hot_reserve_never_take_the_same_pod() {
    const SIZE: u32 = 6;
    const STARTS: usize = 16;
    let kube = FakeKube::start(FakeKubeConfig {
        session_duration: Some(Duration::from_millis(1500)),
        ..FakeKubeConfig::default()
    })
    .await;
    let first = Options::default();
    let (fly, daily) = start_fakes_with(&first.fly, &first.fly_warm).await;
    let mut replicas = Vec::new();
    for _ in 0..2 {
        let opts = Options {
            shared: Some((fly.clone(), daily.clone())),
            ..Options::default()
        };
        replicas.push(kube_env(&kube, SIZE, opts).await);
    }
    wait_reserve_ready(&kube, SIZE as usize).await;
    let calls = (0..STARTS).map(|i| {
        let env = &replicas[i % 2];
        async move { env.post_start(&format!("user{i}"), start_body()).await }
    });
    let answers = join_all(calls).await;
    // Each start's pod, by uid (a reserve pod's name can come back once its pod is gone).
    let deliveries = kube.deliveries();
    let mut served = BTreeSet::new();
    let mut types: BTreeMap<String, usize> = BTreeMap::new();
    for (status, resp) in &answers {
        assert_eq!(*status, StatusCode::OK, "{resp}");
        let key = session_key(resp["sessionId"].as_str().unwrap());
        let d = deliveries
            .iter()
            .find(|d| d.session_id.as_deref() == Some(key) && d.refused.is_none())
            .unwrap_or_else(|| panic!("session {key} was never delivered"));
        assert_eq!(d.pod, session_handle(resp["sessionId"].as_str().unwrap()));
        assert!(
            served.insert(d.uid.clone()),
            "pod {} handed out twice",
            d.pod
        );
        *types
            .entry(resp["startType"].as_str().unwrap().to_owned())
            .or_default() += 1;
    }
    println!("kubernetes, two replicas: start types {types:?}");
    assert!(
        types.get("hot").copied().unwrap_or(0) >= SIZE as usize / 2,
        "{types:?}"
    );
    // Every pod took exactly one session, never a second.
    for uid in &served {
        let sessions = deliveries
            .iter()
            .filter(|d| &d.uid == uid && d.refused.is_none())
            .count();
        assert_eq!(sessions, 1, "pod {uid}: {sessions} sessions");
    }
    assert!(
        kube.bot_violations().is_empty(),
        "{:?}",
        kube.bot_violations()
    );
    // The sessions end by themselves and their pods go; the reserve is back, and no pod that
    // served a session is in it.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let left = served.iter().filter(|u| exists(&kube, u)).count();
        let ready = ready_reserve(&kube);
        if left == 0 && ready.len() >= SIZE as usize {
            assert!(ready
                .iter()
                .all(|p| !served.contains(p["metadata"]["uid"].as_str().unwrap_or_default())));
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{left} session pods left, {} ready",
            ready.len()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Within the documented overshoot bound: at most one pod per slot per replica too many.
    assert!(
        kube.pods().len() <= SIZE as usize * 2,
        "{}",
        kube.pods().len()
    );
    assert!(
        kube.spec_violations().is_empty(),
        "{:?}",
        kube.spec_violations()
    );
    for env in &replicas {
        env.app.shutdown.cancel();
    }
}

#[tokio::test]
async fn a_template_change_rotates_the_reserve_pods() {
    let kube = FakeKube::start(FakeKubeConfig::default()).await;
    let first = Options::default();
    let (fly, daily) = start_fakes_with(&first.fly, &first.fly_warm).await;
    let v1 = kube_env(
        &kube,
        2,
        Options {
            shared: Some((fly.clone(), daily.clone())),
            ..Options::default()
        },
    )
    .await;
    let old: Vec<String> = wait_reserve_ready(&kube, 2)
        .await
        .iter()
        .map(|p| name(p).to_owned())
        .collect();
    v1.app.shutdown.cancel();
    tokio::time::sleep(Duration::from_millis(300)).await;

    // The agent's image changes: a new fingerprint.
    let mut opts = Options {
        shared: Some((fly.clone(), daily.clone())),
        ..Options::default()
    };
    opts.env
        .push(("BOTDISPATCH_BOT_IMAGE", "ghcr.io/acme/bot:2.0".to_owned()));
    let v2 = kube_env(&kube, 2, opts).await;
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        v2.app.reaper.pass().await;
        let ready = ready_reserve(&kube);
        let stale_left = old.iter().filter(|n| kube.pod(NS, n).is_some()).count();
        if stale_left == 0
            && ready.len() == 2
            && ready.iter().all(|p| image(p) == "ghcr.io/acme/bot:2.0")
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{stale_left} stale pods left, {} ready",
            ready.len()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (status, resp) = v2.post_start("alice", start_body()).await;
    assert_eq!(status, StatusCode::OK, "{resp}");
    assert_eq!(resp["startType"], "hot");
    let claimed = pod(&kube, &session_handle(resp["sessionId"].as_str().unwrap())).unwrap();
    assert_eq!(image(&claimed), "ghcr.io/acme/bot:2.0");
    v2.app.shutdown.cancel();
}

/// Sequential hot starts (room, claim, `/readyz`, `POST /bot`) against the fakes: the
/// client-visible latency of a hot start on Kubernetes, printed.
#[tokio::test]
async fn hot_start_latency_on_kubernetes() {
    const STARTS: usize = 10;
    let kube = FakeKube::start(FakeKubeConfig::default()).await;
    let env = kube_env(&kube, STARTS as u32, Options::default()).await;
    wait_reserve_ready(&kube, STARTS).await;
    let mut took = Vec::new();
    for i in 0..STARTS {
        let t = Instant::now();
        let (status, resp) = env.post_start(&format!("u{i}"), start_body()).await;
        assert_eq!(status, StatusCode::OK, "{resp}");
        if resp["startType"] == "hot" {
            took.push(t.elapsed());
        }
    }
    took.sort();
    assert!(took.len() >= STARTS / 2, "{} hot of {STARTS}", took.len());
    let pct = |p: usize| took[(took.len() * p / 100).min(took.len() - 1)];
    println!(
        "kubernetes: hot /start (wait) against the fakes, {} starts: p50 {:?}, p95 {:?}",
        took.len(),
        pct(50),
        pct(95)
    );
    env.app.shutdown.cancel();
}

#[test]
fn warm_settings_on_kubernetes_are_checked() {
    let base = |extra: &[(&'static str, &str)]| {
        let mut env = BTreeMap::from([
            ("BOTDISPATCH_JWT_SECRET", JWT_SECRET.to_owned()),
            ("BOTDISPATCH_SESSION_SECRET", SESSION_SECRET.to_owned()),
            ("BOTDISPATCH_PROVIDER", "kubernetes".to_owned()),
            ("BOTDISPATCH_K8S_NAMESPACE", NS.to_owned()),
            ("BOTDISPATCH_BOT_IMAGE", IMAGE.to_owned()),
        ]);
        env.extend(extra.iter().map(|(k, v)| (*k, (*v).to_owned())));
        config_from("", &env)
    };
    let c = base(&[
        ("BOTDISPATCH_HANDOFF", "http"),
        ("BOTDISPATCH_RESERVE_TIER", "hot"),
        ("BOTDISPATCH_RESERVE_SIZE", "3"),
    ])
    .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(c.agents["default"].reserve.as_ref().unwrap().size, 3);
    for tier in ["suspended", "stopped"] {
        let m = base(&[
            ("BOTDISPATCH_HANDOFF", "http"),
            ("BOTDISPATCH_RESERVE_TIER", tier),
            ("BOTDISPATCH_RESERVE_SIZE", "3"),
        ])
        .unwrap_err();
        assert!(
            m.contains("BOTDISPATCH_RESERVE_TIER") && m.contains("kubernetes"),
            "{m}"
        );
    }
    let m = base(&[
        ("BOTDISPATCH_RESERVE_TIER", "hot"),
        ("BOTDISPATCH_RESERVE_SIZE", "3"),
    ])
    .unwrap_err();
    assert!(m.contains("handoff = \"http\""), "{m}");
    let m = base(&[("BOTDISPATCH_K8S_POD_URL", "not a url {pod_ip}")]).unwrap_err();
    assert!(m.contains("BOTDISPATCH_K8S_POD_URL"), "{m}");
}
