//! The real binary on the `kubernetes` provider, configured by environment alone (a kubeconfig
//! through `KUBECONFIG`), against the fake API server: start (wait) → ready → GET → DELETE, and
//! what the cluster holds at each step. Plus the example configuration.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

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
