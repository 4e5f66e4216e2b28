//! Pure parts of the `kubernetes` provider: the pod and Secret of a session, reading pods
//! back, configuration, and the mapping of API errors.

use std::collections::BTreeMap;
use std::time::Duration;

use chrono::{TimeZone, Utc};
use k8s_openapi::api::core::v1::Pod;
use serde_json::{json, Value};

use super::pod::{self, Progress};
use super::*;
use crate::{Deadline, Guest, MachineState, SessionLabels, StartType};

fn template() -> MachineTemplate {
    MachineTemplate {
        workload: Workload::Image("ghcr.io/acme/bot:1.2".into()),
        cmd: Some(vec!["python".into(), "bot.py".into()]),
        guest: Guest {
            cpus: 2,
            memory_mb: 2048,
            cpu_kind: "shared".into(),
        },
        region: None,
        env: BTreeMap::from([("LOG_LEVEL".into(), "info".into())]),
        handoff_port: None,
    }
}

fn session(owner: &str) -> SessionBinding {
    SessionBinding {
        name: "bd-prod-01kabc".into(),
        env: BTreeMap::from([
            (
                "DAILY_ROOM_URL".into(),
                "https://x.daily.co/bd-prod-01kabc".into(),
            ),
            ("DAILY_ROOM_TOKEN".into(), "eyJ.secret.token".into()),
            ("BOTDISPATCH_SESSION_ID".into(), "01kabc".into()),
            ("BOTDISPATCH_BODY".into(), "{}".into()),
        ]),
        labels: SessionLabels {
            session_key: "01kabc".into(),
            owner: owner.into(),
            room: "bd-prod-01kabc".into(),
            agent: "default".into(),
            deployment: "prod".into(),
            start: StartType::Cold,
            deadline: Deadline::from_unix_secs(1_800_000_600).unwrap(),
            timings: None,
        },
        deadline: Deadline::after(Duration::from_secs(30)),
    }
}

fn settings() -> PodSettings {
    KubernetesConfig {
        service_account: Some("bots".into()),
        image_pull_secrets: vec!["ghcr".into()],
        node_selector: BTreeMap::from([("pool".into(), "voice".into())]),
        tolerations: vec![TolerationConfig {
            key: Some("dedicated".into()),
            value: Some("voice".into()),
            effect: Some("NoSchedule".into()),
            ..TolerationConfig::default()
        }],
        labels: BTreeMap::from([("team".into(), "voice".into())]),
        annotations: BTreeMap::from([(
            "cluster-autoscaler.kubernetes.io/safe-to-evict".into(),
            "false".into(),
        )]),
        env_from_secrets: vec!["llm-keys".into()],
        termination_grace_period_secs: Some(3600),
        ..KubernetesConfig::default()
    }
    .pod_settings()
}

fn now() -> chrono::DateTime<Utc> {
    Utc.timestamp_opt(1_800_000_000, 0).unwrap()
}

/// Reading pods of the `prod` deployment with a stop grace of 5 s, now.
fn reading() -> pod::Reading<'static> {
    pod::Reading {
        deployment: "prod",
        stop_grace_secs: 5,
        reserve_max_idle_secs: 3600,
        now: now(),
    }
}

#[test]
fn a_session_is_one_gated_pod_and_an_immutable_token_secret() {
    let objects = settings()
        .objects("bots", &template(), &session("auth0|5f1b"), now())
        .unwrap();
    let pod = serde_json::to_value(&objects.pod).unwrap();
    assert_eq!(pod["metadata"]["name"], "bd-prod-01kabc");
    assert_eq!(pod["metadata"]["namespace"], "bots");
    let labels = &pod["metadata"]["labels"];
    assert_eq!(labels[label::MANAGED_BY], "botdispatch");
    assert_eq!(labels[label::DEPLOYMENT], "prod");
    assert_eq!(labels[label::SESSION], "01kabc");
    assert_eq!(labels[label::AGENT], "default");
    assert_eq!(labels[label::DEADLINE], "1800000600");
    assert_eq!(labels["botdispatch.io/start"], "cold");
    assert_eq!(labels["team"], "voice");
    // The owner and room are annotations, kept as they are.
    assert_eq!(
        pod["metadata"]["annotations"][annotation::OWNER],
        "auth0|5f1b"
    );
    assert_eq!(
        pod["metadata"]["annotations"][annotation::ROOM],
        "bd-prod-01kabc"
    );
    assert!(labels.get("botdispatch.io/owner").is_none());
    let spec = &pod["spec"];
    assert_eq!(spec["restartPolicy"], "Never");
    assert_eq!(spec["automountServiceAccountToken"], false);
    assert_eq!(spec["enableServiceLinks"], false);
    assert_eq!(spec["serviceAccountName"], "bots");
    assert_eq!(spec["terminationGracePeriodSeconds"], 3600);
    assert_eq!(spec["imagePullSecrets"], json!([{"name": "ghcr"}]));
    assert_eq!(spec["nodeSelector"], json!({"pool": "voice"}));
    assert_eq!(spec["tolerations"][0]["key"], "dedicated");
    assert_eq!(spec["schedulingGates"], json!([{"name": TOKEN_GATE}]));
    // The session's deadline is 600 s away, the backstop a day.
    assert_eq!(spec["activeDeadlineSeconds"], DEFAULT_MAX_POD_SECS);
    let container = &spec["containers"][0];
    assert_eq!(container["name"], "bot");
    assert_eq!(container["image"], "ghcr.io/acme/bot:1.2");
    assert_eq!(container["command"], json!(["python", "bot.py"]));
    assert_eq!(
        container["resources"],
        json!({"limits": {"cpu": "2", "memory": "2048Mi"}, "requests": {"cpu": "2", "memory": "2048Mi"}})
    );
    assert_eq!(
        container["envFrom"],
        json!([{"secretRef": {"name": "llm-keys", "optional": false}}])
    );
    let env: BTreeMap<String, Value> = container["env"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| (e["name"].as_str().unwrap().to_owned(), e.clone()))
        .collect();
    assert_eq!(env["LOG_LEVEL"]["value"], "info");
    assert_eq!(env["BOTDISPATCH_SESSION_ID"]["value"], "01kabc");
    assert_eq!(
        env["DAILY_ROOM_TOKEN"],
        json!({"name": "DAILY_ROOM_TOKEN", "valueFrom": {"secretKeyRef": {
            "name": "bd-prod-01kabc-bot-token", "key": "DAILY_ROOM_TOKEN", "optional": false}}})
    );
    assert!(
        !pod.to_string().contains("eyJ.secret.token"),
        "the token is not in the pod"
    );

    let secret = objects.secret.expect("a token secret");
    let secret_json = serde_json::to_value(&secret).unwrap();
    assert_eq!(secret_json["metadata"]["name"], "bd-prod-01kabc-bot-token");
    assert_eq!(secret_json["immutable"], true);
    assert_eq!(secret_json["type"], "Opaque");
    assert_eq!(
        secret_json["stringData"],
        json!({"DAILY_ROOM_TOKEN": "eyJ.secret.token"})
    );
    let mut created = objects.pod.clone();
    created.metadata.uid = Some("uid-1".into());
    let owned = serde_json::to_value(pod::owned_by(secret, &created)).unwrap();
    assert_eq!(
        owned["metadata"]["ownerReferences"],
        json!([{"apiVersion": "v1", "kind": "Pod", "name": "bd-prod-01kabc", "uid": "uid-1"}])
    );
}

#[test]
fn sessions_without_a_room_need_no_secret_and_regions_select_nodes() {
    let mut s = session("alice");
    s.env.remove("DAILY_ROOM_TOKEN");
    let mut t = template();
    t.region = Some("eu-west-1".into());
    let objects = settings().objects("bots", &t, &s, now()).unwrap();
    assert!(objects.secret.is_none());
    let spec = objects.pod.spec.unwrap();
    assert!(spec.scheduling_gates.is_none());
    assert_eq!(
        spec.node_selector
            .unwrap()
            .get(REGION_LABEL)
            .map(String::as_str),
        Some("eu-west-1")
    );
    // A session longer than the backstop keeps its own deadline.
    let mut s = session("alice");
    s.labels.deadline = Deadline::from_unix_secs(1_800_000_000 + 200_000).unwrap();
    let objects = settings().objects("bots", &template(), &s, now()).unwrap();
    assert_eq!(
        objects.pod.spec.unwrap().active_deadline_seconds,
        Some(200_000)
    );
}

#[test]
fn names_are_pod_names_or_refused() {
    assert_eq!(pod::pod_name("bd-Prod_x-01k").unwrap(), "bd-prod-x-01k");
    for bad in [
        "",
        "..",
        "a/b",
        "x?y",
        "%2e%2e",
        "-x",
        "a.b",
        &"x".repeat(244),
    ] {
        assert!(!pod::is_pod_name(bad), "{bad:?}");
    }
    assert!(pod::is_pod_name(&"x".repeat(243)));
    let mut t = template();
    t.workload = Workload::Job("bots".into());
    assert!(settings()
        .objects("bots", &t, &session("a"), now())
        .unwrap_err()
        .contains("container images"));
}

fn created_pod(owner: &str) -> Pod {
    let mut pod = settings()
        .objects("bots", &template(), &session(owner), now())
        .unwrap()
        .pod;
    pod.metadata.uid = Some("uid-1".into());
    pod.metadata.creation_timestamp = Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
        k8s_openapi::jiff::Timestamp::from_second(1_800_000_000).unwrap(),
    ));
    pod
}

#[test]
fn labels_read_back_whatever_the_owner_and_only_for_our_deployment() {
    let long = format!("google-oauth2|{}", "9".repeat(80));
    for owner in ["alice", "auth0|5f1b", "ünïcødé 名前", long.as_str()] {
        let pod = created_pod(owner);
        let labels = pod::session_labels(&pod, "prod").expect("ours");
        assert_eq!(labels, session(owner).labels);
        assert!(pod::session_labels(&pod, "staging").is_none());
    }
    let mut foreign = created_pod("alice");
    foreign
        .metadata
        .labels
        .as_mut()
        .unwrap()
        .remove(label::DEPLOYMENT);
    assert!(
        pod::session_labels(&foreign, "default").is_none(),
        "no deployment label: not ours"
    );
    assert_eq!(
        pod::selector("prod", &[(label::SESSION, "01kabc")]).unwrap(),
        "app.kubernetes.io/managed-by=botdispatch,botdispatch.io/deployment=prod,botdispatch.io/session=01kabc"
    );
}

fn with_status(status: Value) -> Pod {
    let mut pod = serde_json::to_value(created_pod("alice")).unwrap();
    pod["status"] = status;
    serde_json::from_value(pod).unwrap()
}

#[test]
fn progress_and_states_follow_phase_conditions_and_container_reasons() {
    let gated = created_pod("alice");
    assert!(
        matches!(pod::progress(&gated), Progress::Pending { stuck: Some(s) } if s.contains("gated"))
    );

    let pending = with_status(json!({"phase": "Pending", "conditions": [
        {"type": "PodScheduled", "status": "True"}]}));
    let mut pending_ungated = pending.clone();
    pending_ungated.spec.as_mut().unwrap().scheduling_gates = None;
    assert_eq!(
        pod::progress(&pending_ungated),
        Progress::Pending { stuck: None }
    );
    let s = pod::status_of(&pending_ungated, &reading());
    assert_eq!(
        (s.state, s.provider_state.as_str()),
        (MachineState::Starting, "Pending")
    );
    assert_eq!(s.labels.unwrap().owner, "alice");
    assert!(s.created_at.is_some());

    let unschedulable = with_status(json!({"phase": "Pending", "conditions": [
        {"type": "PodScheduled", "status": "False", "reason": "Unschedulable",
         "message": "0/3 nodes are available: 3 Insufficient cpu."}]}));
    assert!(matches!(pod::progress(&unschedulable),
        Progress::Pending { stuck: Some(s) } if s == "Unschedulable: 0/3 nodes are available: 3 Insufficient cpu."));

    let pull = with_status(
        json!({"phase": "Pending", "containerStatuses": [{"name": "bot",
        "image": "x", "imageID": "", "ready": false, "restartCount": 0,
        "state": {"waiting": {"reason": "ErrImagePull", "message": "not found"}}}]}),
    );
    assert_eq!(
        pod::progress(&pull),
        Progress::Failed("ErrImagePull: not found".into())
    );
    assert_eq!(
        pod::status_of(&pull, &reading()).state,
        MachineState::Failed
    );

    let running = with_status(
        json!({"phase": "Running", "podIP": "10.1.2.3", "conditions": [
        {"type": "Ready", "status": "False"}], "containerStatuses": [{"name": "bot", "image": "x",
        "imageID": "", "ready": false, "restartCount": 0,
        "state": {"running": {"startedAt": "2027-01-15T08:00:05Z"}}}]}),
    );
    assert_eq!(pod::progress(&running), Progress::Running);
    assert_eq!(
        pod::status_of(&running, &reading()).state,
        MachineState::Starting
    );

    let ready = with_status(
        json!({"phase": "Running", "podIP": "10.1.2.3", "conditions": [
        {"type": "Ready", "status": "True"}], "containerStatuses": [{"name": "bot", "image": "x",
        "imageID": "", "ready": true, "restartCount": 0,
        "state": {"running": {"startedAt": "2027-01-15T08:00:05Z"}}}]}),
    );
    assert_eq!(pod::progress(&ready), Progress::Ready);
    let s = pod::status_of(&ready, &reading());
    assert_eq!(s.state, MachineState::Started);
    assert_eq!(s.address.as_deref(), Some("10.1.2.3"));
    assert_eq!(s.started_at.unwrap().timestamp() % 60, 5);

    let done = with_status(
        json!({"phase": "Succeeded", "containerStatuses": [{"name": "bot",
        "image": "x", "imageID": "", "ready": false, "restartCount": 0,
        "state": {"terminated": {"exitCode": 0, "reason": "Completed",
            "startedAt": "2027-01-15T08:00:05Z", "finishedAt": "2027-01-15T08:10:00Z"}}}]}),
    );
    let s = pod::status_of(&done, &reading());
    assert_eq!(
        (s.state, s.provider_state.as_str()),
        (MachineState::Ended, "Succeeded")
    );
    assert!(s.ended_at.is_some());

    let crashed = with_status(
        json!({"phase": "Failed", "containerStatuses": [{"name": "bot",
        "image": "x", "imageID": "", "ready": false, "restartCount": 0,
        "state": {"terminated": {"exitCode": 3, "reason": "Error",
            "startedAt": "2027-01-15T08:00:05Z", "finishedAt": "2027-01-15T08:00:09Z"}}}]}),
    );
    let s = pod::status_of(&crashed, &reading());
    assert_eq!(s.state, MachineState::Failed);
    assert_eq!(
        s.detail.as_deref(),
        Some("container bot exited with code 3 (Error)")
    );

    // activeDeadlineSeconds ended a session that ran: over, not failed.
    let expired = with_status(json!({"phase": "Failed", "reason": "DeadlineExceeded",
        "message": "Pod was active on the node longer than the specified deadline",
        "containerStatuses": [{"name": "bot", "image": "x", "imageID": "", "ready": false,
        "restartCount": 0, "state": {"terminated": {"exitCode": 137,
            "startedAt": "2027-01-15T08:00:05Z", "finishedAt": "2027-01-15T09:00:05Z"}}}]}));
    assert_eq!(
        pod::status_of(&expired, &reading()).state,
        MachineState::Ended
    );

    let mut deleting = ready.clone();
    deleting.metadata.deletion_timestamp = deleting.metadata.creation_timestamp.clone();
    let s = pod::status_of(&deleting, &reading());
    assert_eq!(
        (s.state, s.provider_state.as_str()),
        (MachineState::Ended, "Terminating")
    );
}

fn load(
    vars: &[(&str, &str)],
    toml: Option<KubernetesConfig>,
) -> Result<KubernetesConfig, ConfigError> {
    let map: BTreeMap<String, String> = vars
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect();
    let lookup = move |k: &str| map.get(k).cloned();
    let mut config = toml.unwrap_or_default();
    config.apply_env(&Env::new(&lookup))?;
    config.validate(true)?;
    Ok(config)
}

#[test]
fn configuration_comes_from_the_environment_and_is_validated_by_name() {
    let c = load(
        &[
            ("BOTDISPATCH_K8S_NAMESPACE", "bots"),
            ("KUBECONFIG", "/etc/a:/etc/b"),
            ("BOTDISPATCH_K8S_CONTEXT", "prod"),
            (
                "BOTDISPATCH_K8S_NODE_SELECTOR",
                "pool=voice, kubernetes.io/arch=amd64",
            ),
            ("BOTDISPATCH_K8S_IMAGE_PULL_SECRETS", "ghcr,ecr"),
            ("BOTDISPATCH_K8S_STOP_GRACE_SECS", "2"),
        ],
        None,
    )
    .unwrap();
    assert_eq!(c.namespace.as_deref(), Some("bots"));
    assert_eq!(c.kubeconfig.as_deref(), Some("/etc/a:/etc/b"));
    assert_eq!(c.node_selector.len(), 2);
    assert_eq!(c.image_pull_secrets, ["ghcr", "ecr"]);
    assert_eq!(c.stop_grace_secs, 2);
    // BOTDISPATCH_K8S_KUBECONFIG wins over KUBECONFIG.
    let c = load(
        &[("KUBECONFIG", "/a"), ("BOTDISPATCH_K8S_KUBECONFIG", "/b")],
        None,
    )
    .unwrap();
    assert_eq!(c.kubeconfig.as_deref(), Some("/b"));

    let error = |vars: &[(&str, &str)], toml: Option<KubernetesConfig>| {
        load(vars, toml).unwrap_err().to_string()
    };
    let m = error(&[("BOTDISPATCH_K8S_NAMESPACE", "Bots!")], None);
    assert!(m.contains("BOTDISPATCH_K8S_NAMESPACE"), "{m}");
    let m = error(&[("BOTDISPATCH_K8S_API_URL", "http://10.0.0.1:6443")], None);
    assert!(m.contains("plain http"), "{m}");
    load(
        &[("BOTDISPATCH_K8S_API_URL", "http://127.0.0.1:8001")],
        None,
    )
    .unwrap();
    let m = error(&[("BOTDISPATCH_K8S_TOKEN", "t")], None);
    assert!(m.contains("go with kubernetes.api_url"), "{m}");
    let m = error(
        &[
            ("BOTDISPATCH_K8S_API_URL", "https://k8s:6443"),
            ("KUBECONFIG", "/a"),
        ],
        None,
    );
    assert!(m.contains("alternatives"), "{m}");
    let m = error(&[("BOTDISPATCH_K8S_NODE_SELECTOR", "pool")], None);
    assert!(m.contains("not key=value"), "{m}");
    let m = error(&[("BOTDISPATCH_K8S_MAX_POD_SECS", "10")], None);
    assert!(m.contains("BOTDISPATCH_K8S_MAX_POD_SECS"), "{m}");
    let reserved = KubernetesConfig {
        labels: BTreeMap::from([(label::SESSION.into(), "x".into())]),
        ..KubernetesConfig::default()
    };
    assert!(error(&[], Some(reserved)).contains("botdispatch's own key"));
    let bad_value = KubernetesConfig {
        labels: BTreeMap::from([("team".into(), "a|b".into())]),
        ..KubernetesConfig::default()
    };
    assert!(error(&[], Some(bad_value)).contains("not a label value"));
    let toleration = KubernetesConfig {
        tolerations: vec![TolerationConfig {
            operator: Some("Exists".into()),
            value: Some("x".into()),
            ..TolerationConfig::default()
        }],
        ..KubernetesConfig::default()
    };
    assert!(error(&[], Some(toleration)).contains("kubernetes.tolerations[0]"));
    let policy = KubernetesConfig {
        image_pull_policy: Some("Sometimes".into()),
        ..KubernetesConfig::default()
    };
    assert!(error(&[], Some(policy)).contains("image_pull_policy"));

    let c = KubernetesConfig::default();
    assert_eq!(
        c.workload("default", Some(" ghcr.io/acme/bot:1 "), None)
            .unwrap(),
        Workload::Image("ghcr.io/acme/bot:1".into())
    );
    assert!(c
        .workload("default", None, None)
        .unwrap_err()
        .0
        .contains("BOTDISPATCH_BOT_IMAGE"));
}

fn api(code: u16, reason: &str, retry_after: Option<u32>) -> kube::Error {
    let mut status = json!({"status": "Failure", "code": code, "reason": reason, "message": "m"});
    if let Some(s) = retry_after {
        status["details"] = json!({"retryAfterSeconds": s});
    }
    kube::Error::Api(Box::new(serde_json::from_value(status).unwrap()))
}

#[test]
fn api_errors_map_by_status_and_reason() {
    match api_error("x", api(429, "TooManyRequests", Some(3))) {
        ProviderError::Throttled { retry_after, .. } => {
            assert_eq!(retry_after, Some(Duration::from_secs(3)))
        }
        other => panic!("{other:?}"),
    }
    assert!(matches!(
        api_error("x", api(409, "AlreadyExists", None)),
        ProviderError::Rejected { status: 409, .. }
    ));
    for (code, reason) in [
        (409, "Conflict"),
        (410, "Expired"),
        (500, "InternalError"),
        (504, "Timeout"),
    ] {
        let e = api_error("x", api(code, reason, None));
        assert!(matches!(e, ProviderError::Unavailable { .. }), "{e:?}");
        assert!(
            std::error::Error::source(&e).is_some(),
            "the Status is kept"
        );
    }
    let e = api_error("create pod", api(403, "Forbidden", None));
    assert!(
        matches!(&e, ProviderError::Rejected { status: 403, message, .. } if message.starts_with("create pod: HTTP 403 Forbidden")),
        "{e:?}"
    );
}

#[test]
fn deadlines_round_up() {
    let now = now();
    assert_eq!(
        pod::secs_until(now + chrono::Duration::milliseconds(600_001), now),
        601
    );
    assert_eq!(pod::secs_until(now - chrono::Duration::seconds(5), now), 1);
}

fn http_template() -> MachineTemplate {
    let mut t = template();
    t.handoff_port = Some(8080);
    t.env.insert("PORT".into(), "8080".into());
    t
}

fn reserve(tier: crate::Tier) -> crate::ReserveLabels {
    crate::ReserveLabels {
        name: "bd-prod-r3-0123456789-360000".into(),
        slot: 3,
        agent: "default".into(),
        fingerprint: "0123456789".into(),
        tier,
        ready: false,
        recycle: false,
        recycled_at: None,
    }
}

fn reserve_pod() -> Pod {
    let env = BTreeMap::from([(crate::HANDOFF_SECRET_ENV.to_owned(), "s3cret".to_owned())]);
    settings()
        .reserve_pod(
            "bots",
            &http_template(),
            "bd-prod-r3-0123456789-360000",
            &reserve(crate::Tier::Hot),
            "prod",
            &env,
        )
        .unwrap()
}

#[test]
fn a_reserve_pod_is_hot_probed_labelled_and_holds_no_session() {
    let pod = reserve_pod();
    let v = serde_json::to_value(&pod).unwrap();
    let labels = &v["metadata"]["labels"];
    assert_eq!(labels[label::ROLE], "reserve");
    assert_eq!(labels[label::MANAGED_BY], "botdispatch");
    assert_eq!(labels[label::DEPLOYMENT], "prod");
    assert_eq!(labels["botdispatch.io/slot"], "3");
    assert_eq!(labels["botdispatch.io/tier"], "hot");
    assert_eq!(labels["botdispatch.io/fingerprint"], "0123456789");
    assert_eq!(labels["team"], "voice", "the configured labels too");
    assert!(labels.get(label::SESSION).is_none());
    let spec = &v["spec"];
    assert_eq!(spec["restartPolicy"], "Never");
    assert!(spec.get("schedulingGates").is_none(), "nothing to wait for");
    // Waits up to an hour, then lives up to max_pod_secs after its claim.
    assert_eq!(spec["activeDeadlineSeconds"], 3600 + 86_400);
    let c = &spec["containers"][0];
    assert_eq!(
        c["readinessProbe"],
        json!({"httpGet": {"path": "/readyz", "port": 8080, "scheme": "HTTP"},
               "periodSeconds": 1, "timeoutSeconds": 1})
    );
    assert_eq!(
        c["ports"],
        json!([{"containerPort": 8080, "name": "handoff", "protocol": "TCP"}])
    );
    let env: BTreeMap<&str, &Value> = c["env"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| (e["name"].as_str().unwrap(), &e["value"]))
        .collect();
    assert_eq!(
        env.keys().copied().collect::<Vec<_>>(),
        ["BOTDISPATCH_HANDOFF_SECRET", "LOG_LEVEL", "PORT"]
    );
    assert_eq!(env["PORT"], "8080");
    // Read back: a reserve pod, not a session's.
    let read = pod::reserve_labels(&pod, "prod").unwrap();
    assert_eq!(read, reserve(crate::Tier::Hot));
    assert!(pod::reserve_labels(&pod, "staging").is_none());
    assert!(pod::session_labels(&pod, "prod").is_none());

    // What Kubernetes cannot keep is refused before any call.
    let env = BTreeMap::new();
    let refused = |t: &MachineTemplate, l: &crate::ReserveLabels| {
        settings()
            .reserve_pod("bots", t, "bd-prod-r0-x-1", l, "prod", &env)
            .unwrap_err()
    };
    assert!(refused(&http_template(), &reserve(crate::Tier::Suspended)).contains("hot"));
    let mut recycled = reserve(crate::Tier::Hot);
    recycled.recycle = true;
    assert!(refused(&http_template(), &recycled).contains("never reuses"));
    assert!(refused(&template(), &reserve(crate::Tier::Hot)).contains("handoff"));
}

fn with_pod_status(pod: &Pod, status: Value) -> Pod {
    let mut v = serde_json::to_value(pod).unwrap();
    v["metadata"]["creationTimestamp"] = json!("2027-01-15T08:00:00Z");
    v["status"] = status;
    serde_json::from_value(v).unwrap()
}

fn running_status(ready: bool) -> Value {
    json!({"phase": "Running", "podIP": "10.1.2.3", "startTime": "2027-01-15T08:00:01Z",
        "conditions": [{"type": "Ready", "status": if ready { "True" } else { "False" }}],
        "containerStatuses": [{"name": "bot", "image": "x", "imageID": "", "ready": ready,
            "restartCount": 0, "state": {"running": {"startedAt": "2027-01-15T08:00:05Z"}}}]})
}

#[test]
fn a_reserve_pod_is_up_once_running_and_ready_and_expires_after_its_idle_limit() {
    let created = Utc.with_ymd_and_hms(2027, 1, 15, 8, 0, 0).unwrap();
    let at = |secs: i64| pod::Reading {
        now: created + chrono::Duration::seconds(secs),
        ..reading()
    };
    let unready = with_pod_status(&reserve_pod(), running_status(false));
    let s = pod::status_of(&unready, &at(10));
    assert!(s.reserve.is_some());
    assert!(s.labels.is_none(), "no session's");
    assert_ne!(
        s.provider_state, "running",
        "the kubelet's probe did not pass"
    );
    let ready = with_pod_status(&reserve_pod(), running_status(true));
    let s = pod::status_of(&ready, &at(10));
    assert_eq!(s.provider_state, "running");
    assert_eq!(s.address.as_deref(), Some("10.1.2.3"));
    assert!(!s.reserve.unwrap().ready, "not yet marked by a dispatcher");
    assert_eq!(pod::status_of(&ready, &at(3601)).provider_state, "expired");
    let mut marked = ready.clone();
    marked
        .metadata
        .labels
        .as_mut()
        .unwrap()
        .insert(label::READY.into(), "1".into());
    assert!(pod::status_of(&marked, &at(10)).reserve.unwrap().ready);
    // A session pod in a Running, Ready state keeps Kubernetes' word.
    let session = with_pod_status(&created_pod("alice"), running_status(true));
    assert_eq!(pod::status_of(&session, &at(10)).provider_state, "Running");
}

#[test]
fn a_pod_draining_after_its_handoff_still_serves_its_session_but_a_stop_ends_it() {
    let ready = with_pod_status(&created_pod("alice"), running_status(true));
    let deleted = |grace: i64| {
        let mut pod = ready.clone();
        pod.metadata.deletion_timestamp = pod.metadata.creation_timestamp.clone();
        pod.metadata.deletion_grace_period_seconds = Some(grace);
        pod
    };
    // SIGTERM with a grace longer than a stop's: the bot finishes its call.
    let s = pod::status_of(&deleted(86_400), &reading());
    assert_eq!(
        (s.state, s.provider_state.as_str()),
        (MachineState::Started, "Terminating")
    );
    assert!(s.labels.is_some());
    // A stop (the stop grace, 5 s) is over at once.
    let s = pod::status_of(&deleted(5), &reading());
    assert_eq!(s.state, MachineState::Ended);
    // Once its container stopped, a draining pod is over too.
    let mut exited = with_pod_status(
        &created_pod("alice"),
        json!({"phase": "Running", "containerStatuses": [{"name": "bot", "image": "x",
            "imageID": "", "ready": false, "restartCount": 0, "state": {"terminated": {
            "exitCode": 0, "startedAt": "2027-01-15T08:00:05Z", "finishedAt": "2027-01-15T08:10:00Z"}}}]}),
    );
    exited.metadata.deletion_timestamp = exited.metadata.creation_timestamp.clone();
    exited.metadata.deletion_grace_period_seconds = Some(86_400);
    assert!(pod::status_of(&exited, &reading()).state.is_terminal());
}

#[test]
fn pod_urls_fill_their_placeholders() {
    assert_eq!(
        reserve::expand_pod_url(DEFAULT_POD_URL, "10.244.1.7", "bd-a", "bots", 8080),
        "http://10.244.1.7:8080"
    );
    assert_eq!(
        reserve::expand_pod_url(DEFAULT_POD_URL, "fd00::7", "bd-a", "bots", 8080),
        "http://[fd00::7]:8080"
    );
    assert_eq!(
        reserve::expand_pod_url(
            "http://127.0.0.1:8001/api/v1/namespaces/{namespace}/pods/{pod_name}:{port}/proxy",
            "",
            "bd-a",
            "bots",
            7860
        ),
        "http://127.0.0.1:8001/api/v1/namespaces/bots/pods/bd-a:7860/proxy"
    );
}

#[test]
fn warm_settings_are_read_and_validated() {
    let c = load(
        &[
            (
                "BOTDISPATCH_K8S_POD_URL",
                "http://gw.internal/{pod_ip}/{port}",
            ),
            ("BOTDISPATCH_K8S_RESERVE_MAX_IDLE_SECS", "600"),
        ],
        None,
    )
    .unwrap();
    assert_eq!(c.pod_url, "http://gw.internal/{pod_ip}/{port}");
    assert_eq!(c.reserve_max_idle_secs, 600);
    assert_eq!(c.pod_settings().reserve_max_idle_secs, 600);
    let d = KubernetesConfig::default();
    assert_eq!(d.pod_url, "http://{pod_ip}:{port}");
    assert_eq!(d.reserve_max_idle_secs, 3600);
    let m = load(&[("BOTDISPATCH_K8S_POD_URL", "{pod_ip}:{port}")], None)
        .unwrap_err()
        .to_string();
    assert!(m.contains("BOTDISPATCH_K8S_POD_URL"), "{m}");
    let m = load(&[("BOTDISPATCH_K8S_RESERVE_MAX_IDLE_SECS", "5")], None)
        .unwrap_err()
        .to_string();
    assert!(m.contains("BOTDISPATCH_K8S_RESERVE_MAX_IDLE_SECS"), "{m}");
    // Pods are reached over HTTP; the reserve is hot only, never recycled.
    assert!(d.http_handoff());
    assert_eq!(d.reserve_tiers(), [crate::Tier::Hot]);
    assert!(!d.recycles());
}
