//! The `kubernetes` provider: one Pod per session, through the Kubernetes API (kube-rs and the
//! `k8s-openapi` types), on a cluster the operator already runs.
//!
//! **A Pod, not a Job.** A Job with `backoffLimit: 0` and `restartPolicy: Never` would run the
//! same single container, but adds a controller between the create and the pod: the Job
//! controller creates the pod once it has seen the Job (another watch round trip, through its
//! rate-limited work queue, on the start's critical path), the pod's name is generated (so a status read needs a list, or two
//! reads), the pod tracking finalizer must be removed before a delete completes, and a delete
//! orphans the pod unless `propagationPolicy` says otherwise. A bare pod starts one hop sooner,
//! its deterministic name is the machine handle (a retried create answers 409 instead of
//! launching a second bot, and a status poll is one GET), and `restartPolicy: Never` plus
//! `activeDeadlineSeconds` give what a Job would: no restarts, a hard end. What a Job has and a
//! pod lacks is `ttlSecondsAfterFinished`: a pod whose bot exited by itself stays
//! (`Succeeded`/`Failed`, using no node resources, its Secret with it) until it is deleted.
//! `list_managed` reports such pods, as ended or failed, so a reconciler can delete them; the
//! control plane's pod garbage collector (`--terminated-pod-gc-threshold`) bounds them anyway.
//!
//! **A session's calls.** `launch` creates the pod with a scheduling gate, creates the Secret
//! holding the Daily bot token with an `ownerReference` to the pod's uid, then removes the gate
//! (a merge patch). The gate means no node runs the pod before its Secret exists: the kubelet
//! never sees a missing Secret (it would look again only after a back-off of seconds), and a dispatcher that
//! dies half-way leaves a pod that was never scheduled (reaped as stuck starting) whose Secret,
//! if any, the garbage collector deletes with it. The token never appears in the pod spec
//! (`secretKeyRef`), so reading pods does not reveal it; the rest of the bot contract is plain
//! env. `wait_started` watches the one pod (`kube::runtime::wait::await_condition`: a list, then
//! a watch with bookmarks) under the start deadline; after a watch error such as 410 Gone it
//! starts over with a new list. `status` is one GET, `terminate` one DELETE with a short grace
//! period (404 is success), `find` / `list_managed` one list by label selector, `relabel` one GET
//! and one merge patch.
//!
//! **Started** = phase `Running` and condition `Ready` `True`. **Failed** = phase `Failed`, a
//! container that exited non-zero, or a container waiting for a reason that does not clear by
//! itself (`ErrImagePull`, `ImagePullBackOff`, `InvalidImageName`, `CrashLoopBackOff`,
//! `CreateContainerConfigError`, …): the start fails at once with the reason. A pod the scheduler
//! marks `Unschedulable` keeps the wait going (a cluster autoscaler may add a node), and a start
//! that reaches its deadline that way fails with the scheduler's message instead of timing out.
//!
//! **Labels.** `app.kubernetes.io/managed-by=botdispatch`, `botdispatch.io/deployment`,
//! `botdispatch.io/session`, `botdispatch.io/agent` (values through
//! [`LabelCodec::KUBERNETES_LABELS`](crate::LabelCodec::KUBERNETES_LABELS)) and
//! `botdispatch.io/deadline` (unix seconds) are labels, since selectors use them (any other key
//! `botdispatch_<name>` of the shared label set is the label `botdispatch.io/<name>`). The owner
//! (a JWT `sub` of any length), the room and a recorded failure are annotations: never selected
//! on, and an encoded long `sub` would not fit a label's 63 characters. A pod of another
//! deployment, or without the deployment label, is not ours.
//!
//! **Deadlines.** `activeDeadlineSeconds` can only be lowered once set. A pod is launched with a
//! backstop (`max_pod_secs`, or the session deadline if later) and `relabel` lowers it to the
//! session's own deadline, counted from the pod's `startTime`, along with the deadline label.
//!
//! **The `http` handoff and the hot reserve** (`reserve.rs`): a pod's bot is reached at
//! `kubernetes.pod_url` (default the pod IP and the handoff port); a hot reserve of pods
//! (`botdispatch.io/role=reserve`, a readiness probe on `/readyz`) is claimed with one label patch
//! conditional on the listed `resourceVersion`; after the handoff the pod is deleted with a long
//! grace, which is how a bot gets SIGTERM on Kubernetes: it finishes its session and the pod goes.
//! Only the `hot` tier, never a recycle.
//!
//! **Limits.** No outbound rate limits are declared: the API server's limits are its Priority and
//! Fairness settings, not constants; its 429s carry `Retry-After` (and `retryAfterSeconds` in the
//! `Status`, which is what the client reads) and are retried by the resilient wrapper. kube's own
//! retries are off so that every call is counted and bounded by the start deadline once.

mod pod;
mod reserve;

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use chrono::Utc;
use k8s_openapi::api::core::v1::{Pod, Secret as K8sSecret, Toleration};
use kube::api::{DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::runtime::wait::{self, await_condition};
use kube::runtime::watcher;
use kube::Api;
use serde::Deserialize;
use serde_json::json;

use crate::config::{check_url, BuildContext, ConfigError, ProviderSettings};
use crate::env::Env;
use crate::http::error_chain;
use crate::retry::{retry, RetryPolicy};
use crate::{
    Deadline, HttpHandoff, Launched, MachineProvider, MachineStatus, MachineTemplate,
    ProviderError, Relabel, Reserve, Secret, SessionBinding, Tier, Workload,
};
pub use pod::{annotation, label, READYZ, REGION_LABEL, TOKEN_ENV, TOKEN_GATE};
use pod::{PodSettings, Progress, Reading};

const NAME: &str = "kubernetes";
/// Default `activeDeadlineSeconds` of a pod whose deadline was not confirmed yet (a day).
pub const DEFAULT_MAX_POD_SECS: i64 = 86_400;
/// Default grace period of a stop (`DELETE … gracePeriodSeconds`).
pub const DEFAULT_STOP_GRACE_SECS: u32 = 5;
/// A pod object is stored in etcd, whose requests are limited to 1.5 MiB by default; the env a
/// session brings must stay well below it.
const MAX_ENV_BYTES: usize = 1024 * 1024;
/// How often a relabel re-reads the pod when its patch loses a `resourceVersion` race.
const RELABEL_ATTEMPTS: usize = 3;
/// Default `kubernetes.pod_url`: the pod's IP on the cluster network.
pub const DEFAULT_POD_URL: &str = "http://{pod_ip}:{port}";
/// Default longest wait of a reserve pod for its session (an hour).
pub const DEFAULT_RESERVE_MAX_IDLE_SECS: u32 = 3600;

/// Settings of the `kubernetes` provider: the `[kubernetes]` section of the configuration file.
///
/// How the client finds the cluster: `api_url` when set (with `token` / `ca_file`); else the
/// kubeconfig files of `kubeconfig` (`KUBECONFIG`), with `context`; else `~/.kube/config`; else
/// the in-cluster service account.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct KubernetesConfig {
    /// Namespace of the bot pods. `BOTDISPATCH_K8S_NAMESPACE`; default: the kubeconfig
    /// context's namespace, or the dispatcher's own namespace in-cluster.
    pub namespace: Option<String>,
    /// The API server's URL, bypassing kubeconfig and in-cluster discovery (a `kubectl proxy`
    /// sidecar, tests). `BOTDISPATCH_K8S_API_URL`.
    pub api_url: Option<String>,
    /// Bearer token for `api_url`. `BOTDISPATCH_K8S_TOKEN`.
    pub token: Option<Secret>,
    /// CA bundle (PEM) that signs `api_url`'s certificate. `BOTDISPATCH_K8S_CA_FILE`.
    pub ca_file: Option<PathBuf>,
    /// Kubeconfig file(s), `:`-separated. `BOTDISPATCH_K8S_KUBECONFIG`, else `KUBECONFIG`.
    pub kubeconfig: Option<String>,
    /// Kubeconfig context; default its `current-context`. `BOTDISPATCH_K8S_CONTEXT`.
    pub context: Option<String>,
    /// Name of the bot's container (default `bot`).
    pub container_name: String,
    /// Service account of bot pods (its token is not mounted). `BOTDISPATCH_K8S_SERVICE_ACCOUNT`.
    pub service_account: Option<String>,
    /// Secrets for pulling the bot image. `BOTDISPATCH_K8S_IMAGE_PULL_SECRETS` (comma list).
    pub image_pull_secrets: Vec<String>,
    /// `Always`, `IfNotPresent` or `Never`; unset: Kubernetes' default for the image's tag.
    pub image_pull_policy: Option<String>,
    /// Node labels bot pods must run on. `BOTDISPATCH_K8S_NODE_SELECTOR` (`key=value,…`).
    pub node_selector: BTreeMap<String, String>,
    pub tolerations: Vec<TolerationConfig>,
    /// Extra labels of bot pods (not botdispatch's own keys).
    pub labels: BTreeMap<String, String>,
    /// Extra annotations of bot pods (e.g. `cluster-autoscaler.kubernetes.io/safe-to-evict`).
    pub annotations: BTreeMap<String, String>,
    /// Secrets whose keys become env of every bot (`envFrom`): the agent's API keys, kept out
    /// of the pod spec. `BOTDISPATCH_K8S_ENV_FROM_SECRETS` (comma list).
    pub env_from_secrets: Vec<String>,
    /// The pod's `terminationGracePeriodSeconds`: how long a drained or evicted bot may finish
    /// its call after SIGTERM (set it to the longest session). Unset: Kubernetes' 30 s.
    /// `BOTDISPATCH_K8S_TERMINATION_GRACE_SECS`.
    pub termination_grace_period_secs: Option<u32>,
    /// `gracePeriodSeconds` of a stop (default 5). `BOTDISPATCH_K8S_STOP_GRACE_SECS`.
    pub stop_grace_secs: u32,
    /// `activeDeadlineSeconds` of a pod until its deadline is confirmed (default 86400); must
    /// be at least the longest session. `BOTDISPATCH_K8S_MAX_POD_SECS`.
    pub max_pod_secs: u32,
    /// Where a pod's bot server is reached for the `http` handoff: a URL template with
    /// `{pod_ip}`, `{port}`, `{pod_name}` and `{namespace}`; `/readyz` and `/bot` are appended
    /// to its path. `BOTDISPATCH_K8S_POD_URL`, default `http://{pod_ip}:{port}` (the
    /// dispatcher runs in the cluster, or on its pod network).
    pub pod_url: String,
    /// How long a hot reserve pod waits for a session before it is rotated (default 3600):
    /// older unclaimed pods are no longer claimed and the reaper replaces them. A reserve pod's
    /// `activeDeadlineSeconds` is this plus `max_pod_secs`.
    /// `BOTDISPATCH_K8S_RESERVE_MAX_IDLE_SECS`.
    pub reserve_max_idle_secs: u32,
}

impl Default for KubernetesConfig {
    fn default() -> Self {
        Self {
            namespace: None,
            api_url: None,
            token: None,
            ca_file: None,
            kubeconfig: None,
            context: None,
            container_name: "bot".to_owned(),
            service_account: None,
            image_pull_secrets: Vec::new(),
            image_pull_policy: None,
            node_selector: BTreeMap::new(),
            tolerations: Vec::new(),
            labels: BTreeMap::new(),
            annotations: BTreeMap::new(),
            env_from_secrets: Vec::new(),
            termination_grace_period_secs: None,
            stop_grace_secs: DEFAULT_STOP_GRACE_SECS,
            max_pod_secs: DEFAULT_MAX_POD_SECS as u32,
            pod_url: DEFAULT_POD_URL.to_owned(),
            reserve_max_idle_secs: DEFAULT_RESERVE_MAX_IDLE_SECS,
        }
    }
}

/// A toleration of bot pods (`[[kubernetes.tolerations]]`), as Kubernetes spells it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TolerationConfig {
    pub key: Option<String>,
    /// `Equal` (default) or `Exists`.
    pub operator: Option<String>,
    pub value: Option<String>,
    /// `NoSchedule`, `PreferNoSchedule` or `NoExecute`; unset: all.
    pub effect: Option<String>,
    /// With `NoExecute` only.
    pub toleration_seconds: Option<i64>,
}

impl TolerationConfig {
    fn to_k8s(&self) -> Toleration {
        Toleration {
            key: self.key.clone(),
            operator: self.operator.clone(),
            value: self.value.clone(),
            effect: self.effect.clone(),
            toleration_seconds: self.toleration_seconds,
        }
    }
}

/// `key=value,…` of `BOTDISPATCH_K8S_NODE_SELECTOR`.
fn parse_pairs(name: &str, value: &str) -> Result<BTreeMap<String, String>, ConfigError> {
    value
        .split(',')
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .map(|pair| match pair.split_once('=') {
            Some((k, v)) => Ok((k.trim().to_owned(), v.trim().to_owned())),
            None => Err(ConfigError::new(format!(
                "{name}: {pair:?} is not key=value"
            ))),
        })
        .collect()
}

/// A DNS-1123 label: lowercase letters, digits and `-`, alphanumeric at both ends, ≤ 63.
fn is_dns_label(s: &str) -> bool {
    let b = s.as_bytes();
    (1..=63).contains(&b.len())
        && b[0].is_ascii_alphanumeric()
        && b[b.len() - 1].is_ascii_alphanumeric()
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
}

/// A DNS-1123 subdomain: dot-separated labels, ≤ 253.
fn is_dns_subdomain(s: &str) -> bool {
    s.len() <= 253 && s.split('.').all(is_dns_label)
}

/// A label value: ≤ 63 of `[A-Za-z0-9_.-]`, alphanumeric at both ends (or empty).
fn is_label_value(s: &str) -> bool {
    let b = s.as_bytes();
    b.is_empty()
        || (b.len() <= 63
            && b[0].is_ascii_alphanumeric()
            && b[b.len() - 1].is_ascii_alphanumeric()
            && b.iter()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'_' | b'.')))
}

/// A label or annotation key: an optional DNS-subdomain prefix and `/`, then a name of ≤ 63
/// `[A-Za-z0-9_.-]`, alphanumeric at both ends.
fn is_qualified_name(s: &str) -> bool {
    let (prefix, name) = match s.rsplit_once('/') {
        Some((p, n)) => (Some(p), n),
        None => (None, s),
    };
    prefix.is_none_or(is_dns_subdomain) && !name.is_empty() && is_label_value(name)
}

/// Keys botdispatch writes itself; configured labels and annotations may not use them.
fn is_reserved_key(k: &str) -> bool {
    k == label::MANAGED_BY || k.starts_with("botdispatch.io/")
}

#[async_trait]
impl ProviderSettings for KubernetesConfig {
    fn name(&self) -> &'static str {
        NAME
    }

    fn apply_env(&mut self, env: &Env) -> Result<(), ConfigError> {
        env.apply("BOTDISPATCH_K8S_NAMESPACE", &mut self.namespace)?;
        env.apply("BOTDISPATCH_K8S_API_URL", &mut self.api_url)?;
        env.apply("BOTDISPATCH_K8S_TOKEN", &mut self.token)?;
        env.apply("BOTDISPATCH_K8S_CA_FILE", &mut self.ca_file)?;
        env.apply("KUBECONFIG", &mut self.kubeconfig)?;
        env.apply("BOTDISPATCH_K8S_KUBECONFIG", &mut self.kubeconfig)?;
        env.apply("BOTDISPATCH_K8S_CONTEXT", &mut self.context)?;
        env.apply("BOTDISPATCH_K8S_SERVICE_ACCOUNT", &mut self.service_account)?;
        env.apply(
            "BOTDISPATCH_K8S_IMAGE_PULL_SECRETS",
            &mut self.image_pull_secrets,
        )?;
        env.apply(
            "BOTDISPATCH_K8S_ENV_FROM_SECRETS",
            &mut self.env_from_secrets,
        )?;
        env.apply(
            "BOTDISPATCH_K8S_TERMINATION_GRACE_SECS",
            &mut self.termination_grace_period_secs,
        )?;
        env.apply("BOTDISPATCH_K8S_STOP_GRACE_SECS", &mut self.stop_grace_secs)?;
        env.apply("BOTDISPATCH_K8S_MAX_POD_SECS", &mut self.max_pod_secs)?;
        env.apply("BOTDISPATCH_K8S_POD_URL", &mut self.pod_url)?;
        env.apply(
            "BOTDISPATCH_K8S_RESERVE_MAX_IDLE_SECS",
            &mut self.reserve_max_idle_secs,
        )?;
        if let Some(v) = env.get("BOTDISPATCH_K8S_NODE_SELECTOR") {
            self.node_selector = parse_pairs("BOTDISPATCH_K8S_NODE_SELECTOR", &v)?;
        }
        Ok(())
    }

    fn validate(&self, production: bool) -> Result<(), ConfigError> {
        let err = |m: String| Err(ConfigError::new(m));
        if let Some(ns) = &self.namespace {
            if !is_dns_label(ns) {
                return err(format!(
                    "kubernetes.namespace (BOTDISPATCH_K8S_NAMESPACE) = {ns:?} is not a namespace name"
                ));
            }
        }
        match &self.api_url {
            Some(url) => {
                check_url("kubernetes.api_url (BOTDISPATCH_K8S_API_URL)", url)?;
                let parsed = url::Url::parse(url).ok();
                let loopback = parsed.as_ref().and_then(|u| u.host_str()).is_some_and(|h| {
                    h == "localhost"
                        || h.trim_matches(['[', ']'])
                            .parse::<std::net::IpAddr>()
                            .is_ok_and(|ip| ip.is_loopback())
                });
                if production && parsed.is_some_and(|u| u.scheme() == "http") && !loopback {
                    return err(format!(
                        "kubernetes.api_url (BOTDISPATCH_K8S_API_URL) = {url:?}: plain http is only for a local proxy (127.0.0.1) when APP_ENV=production"
                    ));
                }
                if self.kubeconfig.is_some() || self.context.is_some() {
                    return err("kubernetes.api_url (BOTDISPATCH_K8S_API_URL) and kubernetes.kubeconfig / kubernetes.context (KUBECONFIG, BOTDISPATCH_K8S_CONTEXT) are alternatives: set one".to_owned());
                }
            }
            None => {
                if self.token.is_some() || self.ca_file.is_some() {
                    return err("kubernetes.token (BOTDISPATCH_K8S_TOKEN) and kubernetes.ca_file (BOTDISPATCH_K8S_CA_FILE) go with kubernetes.api_url (BOTDISPATCH_K8S_API_URL)".to_owned());
                }
            }
        }
        if !is_dns_label(&self.container_name) {
            return err(format!(
                "kubernetes.container_name = {:?} is not a container name",
                self.container_name
            ));
        }
        for (key, names) in [
            (
                "kubernetes.service_account (BOTDISPATCH_K8S_SERVICE_ACCOUNT)",
                self.service_account.iter().cloned().collect::<Vec<_>>(),
            ),
            (
                "kubernetes.image_pull_secrets (BOTDISPATCH_K8S_IMAGE_PULL_SECRETS)",
                self.image_pull_secrets.clone(),
            ),
            (
                "kubernetes.env_from_secrets (BOTDISPATCH_K8S_ENV_FROM_SECRETS)",
                self.env_from_secrets.clone(),
            ),
        ] {
            if let Some(bad) = names.iter().find(|n| !is_dns_subdomain(n)) {
                return err(format!("{key}: {bad:?} is not an object name"));
            }
        }
        if let Some(policy) = &self.image_pull_policy {
            if !matches!(policy.as_str(), "Always" | "IfNotPresent" | "Never") {
                return err(format!(
                    "kubernetes.image_pull_policy = {policy:?} is not Always, IfNotPresent or Never"
                ));
            }
        }
        for (what, map, values_are_labels) in [
            (
                "kubernetes.node_selector (BOTDISPATCH_K8S_NODE_SELECTOR)",
                &self.node_selector,
                true,
            ),
            ("kubernetes.labels", &self.labels, true),
            ("kubernetes.annotations", &self.annotations, false),
        ] {
            for (k, v) in map {
                if !is_qualified_name(k) {
                    return err(format!("{what}: {k:?} is not a valid key"));
                }
                if values_are_labels && !is_label_value(v) {
                    return err(format!(
                        "{what}: the value {v:?} of {k:?} is not a label value (≤ 63 of A-Z a-z 0-9 - _ .)"
                    ));
                }
                if what != "kubernetes.node_selector (BOTDISPATCH_K8S_NODE_SELECTOR)"
                    && is_reserved_key(k)
                {
                    return err(format!("{what}: {k:?} is botdispatch's own key"));
                }
            }
        }
        for (i, t) in self.tolerations.iter().enumerate() {
            let key = format!("kubernetes.tolerations[{i}]");
            let operator = t.operator.as_deref().unwrap_or("Equal");
            if !matches!(operator, "Equal" | "Exists") {
                return err(format!(
                    "{key}.operator = {operator:?} is not Equal or Exists"
                ));
            }
            if operator == "Exists" && t.value.as_deref().is_some_and(|v| !v.is_empty()) {
                return err(format!("{key}: operator Exists takes no value"));
            }
            if t.key.is_none() && operator != "Exists" {
                return err(format!(
                    "{key}: a toleration without a key needs operator Exists"
                ));
            }
            if let Some(effect) = &t.effect {
                if !matches!(
                    effect.as_str(),
                    "NoSchedule" | "PreferNoSchedule" | "NoExecute"
                ) {
                    return err(format!(
                        "{key}.effect = {effect:?} is not NoSchedule, PreferNoSchedule or NoExecute"
                    ));
                }
            }
            if t.toleration_seconds.is_some() && t.effect.as_deref() != Some("NoExecute") {
                return err(format!("{key}.toleration_seconds needs effect NoExecute"));
            }
        }
        if self.max_pod_secs < 60 {
            return err(
                "kubernetes.max_pod_secs (BOTDISPATCH_K8S_MAX_POD_SECS) must be at least 60"
                    .to_owned(),
            );
        }
        if self.reserve_max_idle_secs < 60 {
            return err(
                "kubernetes.reserve_max_idle_secs (BOTDISPATCH_K8S_RESERVE_MAX_IDLE_SECS) must be at least 60"
                    .to_owned(),
            );
        }
        let example = reserve::expand_pod_url(&self.pod_url, "10.244.0.17", "bd-x", "bots", 8080);
        check_url("kubernetes.pod_url (BOTDISPATCH_K8S_POD_URL)", &example)?;
        Ok(())
    }

    fn workload(
        &self,
        agent: &str,
        image: Option<&str>,
        _cmd: Option<&[String]>,
    ) -> Result<Workload, ConfigError> {
        match image.map(str::trim).filter(|i| !i.is_empty()) {
            Some(image) if !image.chars().any(char::is_whitespace) => {
                Ok(Workload::Image(image.to_owned()))
            }
            Some(image) => Err(ConfigError::new(format!(
                "agents.{agent}.image = {image:?} is not an image reference"
            ))),
            None => Err(ConfigError::new(format!(
                "agents.{agent}.image is required (or BOTDISPATCH_BOT_IMAGE for the default agent)"
            ))),
        }
    }

    /// Pods are reached on the cluster network ([`KubernetesConfig::pod_url`]).
    fn http_handoff(&self) -> bool {
        true
    }

    /// Running, ready pods only: Kubernetes can neither suspend a pod nor create one without
    /// running it, and a pod runs once (`restartPolicy: Never`), so it is never recycled.
    fn reserve_tiers(&self) -> &'static [Tier] {
        &[Tier::Hot]
    }

    async fn build(&self, ctx: &BuildContext) -> Result<Arc<dyn MachineProvider>, ProviderError> {
        Ok(Arc::new(KubernetesProvider::connect(ctx, self).await?))
    }
}

impl KubernetesConfig {
    /// The kube client configuration these settings describe (reads kubeconfig files, or the
    /// in-cluster service account's files).
    pub async fn client_config(&self) -> Result<kube::Config, ProviderError> {
        let mut config = if let Some(url) = &self.api_url {
            let uri: http::Uri = url.parse().map_err(|e: http::uri::InvalidUri| {
                config_error_from(format!("kubernetes.api_url {url:?}"), e)
            })?;
            let mut config = kube::Config::new(uri);
            if let Some(token) = &self.token {
                config.auth_info = serde_json::from_value(json!({ "token": token.expose() }))
                    .map_err(|e| config_error_from("kubernetes.token".to_owned(), e))?;
            }
            config.root_cert_file = self.ca_file.clone();
            config
        } else {
            let options = KubeConfigOptions {
                context: self.context.clone(),
                ..KubeConfigOptions::default()
            };
            match self
                .kubeconfig
                .as_deref()
                .map(str::trim)
                .filter(|k| !k.is_empty())
            {
                Some(paths) => {
                    let mut merged: Option<Kubeconfig> = None;
                    for path in paths.split(':').filter(|p| !p.is_empty()) {
                        let file = Kubeconfig::read_from(path).map_err(|e| {
                            config_error_from(format!("cannot read the kubeconfig {path}"), e)
                        })?;
                        merged = Some(match merged {
                            None => file,
                            Some(m) => m.merge(file).map_err(|e| {
                                config_error_from(format!("cannot merge the kubeconfig {path}"), e)
                            })?,
                        });
                    }
                    let kubeconfig = merged.ok_or_else(|| {
                        ProviderError::config(NAME, "kubernetes.kubeconfig names no file")
                    })?;
                    kube::Config::from_custom_kubeconfig(kubeconfig, &options)
                        .await
                        .map_err(|e| config_error_from("kubeconfig".to_owned(), e))?
                }
                None if self.context.is_some() => kube::Config::from_kubeconfig(&options)
                    .await
                    .map_err(|e| config_error_from("kubeconfig".to_owned(), e))?,
                None => kube::Config::infer().await.map_err(|e| {
                    config_error_from(
                        "no kubeconfig and no in-cluster service account".to_owned(),
                        e,
                    )
                })?,
            }
        };
        // Retries are the resilient wrapper's, bounded by each call's deadline.
        config.default_retry = false;
        if let Some(ns) = &self.namespace {
            config.default_namespace = ns.clone();
        }
        Ok(config)
    }

    fn pod_settings(&self) -> PodSettings {
        PodSettings {
            container_name: self.container_name.clone(),
            service_account: self.service_account.clone(),
            image_pull_secrets: self.image_pull_secrets.clone(),
            image_pull_policy: self.image_pull_policy.clone(),
            node_selector: self.node_selector.clone(),
            tolerations: self
                .tolerations
                .iter()
                .map(TolerationConfig::to_k8s)
                .collect(),
            labels: self.labels.clone(),
            annotations: self.annotations.clone(),
            env_from_secrets: self.env_from_secrets.clone(),
            termination_grace_period_secs: self.termination_grace_period_secs.map(i64::from),
            max_pod_secs: i64::from(self.max_pod_secs),
            reserve_max_idle_secs: i64::from(self.reserve_max_idle_secs),
        }
    }
}

/// Launches sessions as pods.
pub struct KubernetesProvider {
    pods: Api<Pod>,
    secrets: Api<K8sSecret>,
    namespace: String,
    deployment: String,
    settings: PodSettings,
    stop_grace_secs: u32,
    request_timeout: Duration,
    /// [`KubernetesConfig::pod_url`].
    pod_url: String,
    /// The reserve's pods as last listed, by name: a claim names the `resourceVersion` it saw
    /// without reading the pod again. Only a cache: a stale entry costs a 409 and a read.
    reserve_pods: Mutex<HashMap<String, Pod>>,
    /// Pod IPs this replica saw while waiting for pods to start, by name: a cold start's
    /// [`Launched`] comes back from the create, before the pod has an IP, and the handoff
    /// follows the wait on the same replica.
    addresses: Mutex<HashMap<String, (String, tokio::time::Instant)>>,
}

impl KubernetesProvider {
    /// Validates `config` (no I/O), then builds the client from it (reading kubeconfig or
    /// in-cluster files).
    pub async fn connect(
        ctx: &BuildContext,
        config: &KubernetesConfig,
    ) -> Result<Self, ProviderError> {
        config
            .validate(ctx.production)
            .map_err(|e| ProviderError::config(NAME, e.0))?;
        let mut client_config = config.client_config().await?;
        client_config.connect_timeout = Some(ctx.request_timeout);
        let namespace = client_config.default_namespace.clone();
        let client = kube::Client::try_from(client_config)
            .map_err(|e| config_error_from("cannot build the Kubernetes client".to_owned(), e))?;
        Ok(Self::with_client(ctx, config, client, &namespace))
    }

    /// A provider on an existing client, for pods in `namespace`.
    pub fn with_client(
        ctx: &BuildContext,
        config: &KubernetesConfig,
        client: kube::Client,
        namespace: &str,
    ) -> Self {
        Self {
            pods: Api::namespaced(client.clone(), namespace),
            secrets: Api::namespaced(client, namespace),
            namespace: namespace.to_owned(),
            deployment: ctx.deployment.clone(),
            settings: config.pod_settings(),
            stop_grace_secs: config.stop_grace_secs,
            request_timeout: ctx.request_timeout,
            pod_url: config.pod_url.clone(),
            reserve_pods: Mutex::default(),
            addresses: Mutex::default(),
        }
    }

    /// How pods are read back, now.
    fn reading(&self) -> Reading<'_> {
        Reading {
            deployment: &self.deployment,
            stop_grace_secs: i64::from(self.stop_grace_secs),
            reserve_max_idle_secs: self.settings.reserve_max_idle_secs,
            now: Utc::now(),
        }
    }

    fn status_of(&self, pod: &Pod) -> MachineStatus {
        pod::status_of(pod, &self.reading())
    }

    /// The namespace the pods run in.
    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    /// One API call of `what`, bounded by the request timeout and by `deadline`.
    async fn call<T>(
        &self,
        what: &str,
        deadline: Option<Deadline>,
        fut: impl std::future::Future<Output = Result<T, kube::Error>>,
    ) -> Result<T, ProviderError> {
        let mut until = tokio::time::Instant::now() + self.request_timeout;
        if let Some(d) = deadline {
            until = until.min(d.instant());
        }
        match tokio::time::timeout_at(until, fut).await {
            Ok(result) => result.map_err(|e| api_error(what, e)),
            Err(_) => Err(ProviderError::unavailable(
                NAME,
                format!("{what}: no answer in time"),
            )),
        }
    }

    fn check_handle(&self, handle: &str) -> Result<(), ProviderError> {
        if pod::is_pod_name(handle) {
            Ok(())
        } else {
            Err(ProviderError::rejected(
                NAME,
                format!("{handle:?} is not a pod name"),
            ))
        }
    }

    async fn get_pod(&self, name: &str) -> Result<Option<Pod>, ProviderError> {
        self.check_handle(name)?;
        self.call("get pod", None, self.pods.get_opt(name)).await
    }

    async fn list(&self, extra: &[(&str, &str)]) -> Result<Vec<Pod>, ProviderError> {
        let selector =
            pod::selector(&self.deployment, extra).map_err(|e| ProviderError::rejected(NAME, e))?;
        let mut pods = Vec::new();
        let mut params = ListParams::default().labels(&selector).limit(500);
        loop {
            let page = self
                .call("list pods", None, self.pods.list(&params))
                .await?;
            pods.extend(page.items);
            match page.metadata.continue_.filter(|c| !c.is_empty()) {
                Some(token) => params = params.continue_token(&token),
                None => return Ok(pods),
            }
        }
    }

    /// Whether `pod` is this very session's (a retried or duplicated create), and alive.
    fn is_session_pod(&self, pod: &Pod, session: &SessionBinding) -> bool {
        pod.metadata.deletion_timestamp.is_none()
            && pod::session_labels(pod, &self.deployment).is_some_and(|l| {
                l.session_key == session.labels.session_key && l.owner == session.labels.owner
            })
    }

    /// Creates the pod; a pod of the same name that is this session's (an earlier attempt
    /// whose answer was lost) is taken as created.
    async fn create_pod(&self, pod: &Pod, session: &SessionBinding) -> Result<Pod, ProviderError> {
        let name = pod.metadata.name.clone().unwrap_or_default();
        let deadline = Some(session.deadline);
        let created = tokio::time::timeout_at(
            (tokio::time::Instant::now() + self.request_timeout).min(session.deadline.instant()),
            self.pods.create(&PostParams::default(), pod),
        )
        .await;
        let error = match created {
            Ok(Ok(pod)) => return Ok(pod),
            Ok(Err(kube::Error::Api(status))) if status.code == 409 => {
                let existing = self
                    .call("get pod", deadline, self.pods.get_opt(&name))
                    .await?;
                return match existing {
                    Some(p) if self.is_session_pod(&p, session) => Ok(p),
                    _ => Err(ProviderError::Conflict {
                        provider: NAME,
                        name,
                    }),
                };
            }
            Ok(Err(e)) => api_error("create pod", e),
            Err(_) => ProviderError::unavailable(NAME, "create pod: no answer in time"),
        };
        // The create may have happened anyway: look before anyone creates again.
        if error.is_ambiguous_create() {
            if let Ok(Some(p)) = self
                .call("get pod", deadline, self.pods.get_opt(&name))
                .await
            {
                if self.is_session_pod(&p, session) {
                    return Ok(p);
                }
            }
        }
        Err(error)
    }

    /// Creates the bot token's Secret (owned by `pod`), then lets the pod be scheduled. Both
    /// steps are idempotent and retried until the launch's deadline: a pod left gated would
    /// only wait for its start deadline.
    async fn release(
        &self,
        pod: &Pod,
        secret: K8sSecret,
        deadline: Deadline,
    ) -> Result<(), ProviderError> {
        let name = pod.metadata.name.clone().unwrap_or_default();
        let secret = pod::owned_by(secret, pod);
        let policy = RetryPolicy {
            min_delay: Duration::from_millis(50),
            max_delay: Duration::from_secs(1),
            ..RetryPolicy::default()
        };
        let attempt = || async {
            match self
                .call(
                    "create secret",
                    Some(deadline),
                    self.secrets.create(&PostParams::default(), &secret),
                )
                .await
            {
                Ok(_) => {}
                // An earlier attempt created it (the Secret of an earlier pod of the same name
                // would have been deleted with that pod).
                Err(ProviderError::Rejected { status: 409, .. }) => {}
                Err(e) => return Err(e),
            }
            let ungate = Patch::Merge(json!({ "spec": { "schedulingGates": null } }));
            self.call(
                "remove scheduling gate",
                Some(deadline),
                self.pods.patch(&name, &PatchParams::default(), &ungate),
            )
            .await
            .map(drop)
        };
        retry(&policy, deadline.instant(), attempt, |e, delay| {
            tracing::debug!(error = %e, delay_ms = delay.as_millis() as u64, "retrying the bot token's Secret");
        })
        .await
    }
}

#[async_trait]
impl MachineProvider for KubernetesProvider {
    fn name(&self) -> &'static str {
        NAME
    }

    fn is_handle(&self, handle: &str) -> bool {
        pod::is_pod_name(handle)
    }

    /// A pod is stored in etcd (1.5 MiB per request by default) and the bot token's Secret holds
    /// at most 1 MiB: a session's env may take up to 1 MiB in all. Env values themselves have
    /// no smaller limit.
    fn fits(
        &self,
        template: &MachineTemplate,
        session_env: &BTreeMap<String, String>,
    ) -> Result<(), String> {
        let bytes: usize = template
            .env
            .iter()
            .chain(session_env)
            .map(|(k, v)| k.len() + v.len())
            .sum();
        if bytes > MAX_ENV_BYTES {
            return Err(format!(
                "a pod's env may take {MAX_ENV_BYTES} bytes in all (etcd stores the whole pod); this one takes {bytes}"
            ));
        }
        Ok(())
    }

    async fn launch(
        &self,
        template: &MachineTemplate,
        session: &SessionBinding,
    ) -> Result<Launched, ProviderError> {
        let objects = self
            .settings
            .objects(&self.namespace, template, session, Utc::now())
            .map_err(|e| ProviderError::rejected(NAME, e))?;
        let pod = self.create_pod(&objects.pod, session).await?;
        if let Some(secret) = objects.secret.filter(|_| pod::is_gated(&pod)) {
            self.release(&pod, secret, session.deadline).await?;
        }
        let handle = pod.metadata.name.clone().unwrap_or_default();
        tracing::debug!(machine.id = %handle, namespace = %self.namespace, env = ?session.env_names(template), "created pod");
        Ok(Launched {
            handle,
            region: template.region.clone(),
            version: pod.metadata.uid,
            address: None,
        })
    }

    async fn wait_started(
        &self,
        launched: &Launched,
        deadline: Deadline,
    ) -> Result<(), ProviderError> {
        let name = launched.handle.as_str();
        self.check_handle(name)?;
        // The watch's first list may come from the API server's cache and miss a pod created a
        // moment ago: "not found" counts only once the pod was seen.
        let seen = AtomicBool::new(false);
        let stuck: Mutex<Option<String>> = Mutex::new(None);
        let done = |pod: Option<&Pod>| match pod {
            None => seen.load(Ordering::SeqCst),
            Some(pod) => {
                seen.store(true, Ordering::SeqCst);
                let progress = pod::progress(pod);
                let mut last = stuck.lock().unwrap_or_else(|e| e.into_inner());
                *last = match &progress {
                    Progress::Pending { stuck } => stuck.clone(),
                    _ => None,
                };
                !matches!(progress, Progress::Pending { .. } | Progress::Running)
            }
        };
        let mut delays = crate::retry::poll_delays();
        loop {
            let watched = tokio::time::timeout_at(
                deadline.instant(),
                await_condition(self.pods.clone(), name, &done),
            )
            .await;
            let failed = |message: String| ProviderError::StartFailed {
                provider: NAME,
                message,
            };
            let error = match watched {
                Err(_) => {
                    let last = stuck.lock().unwrap_or_else(|e| e.into_inner()).take();
                    return Err(match last {
                        Some(why) => {
                            failed(format!("still not running at the start deadline: {why}"))
                        }
                        None => ProviderError::Timeout { provider: NAME },
                    });
                }
                Ok(Ok(None)) => return Err(failed("the pod disappeared while starting".into())),
                Ok(Ok(Some(pod))) => {
                    return match pod::progress(&pod) {
                        Progress::Ready => {
                            self.remember_address(&pod);
                            Ok(())
                        }
                        Progress::Over => Ok(()),
                        Progress::Failed(why) => Err(failed(why)),
                        Progress::Deleting => Err(failed("the pod is being deleted".into())),
                        Progress::Pending { .. } | Progress::Running => {
                            unreachable!("the condition only ends the wait on a final state")
                        }
                    }
                }
                Ok(Err(wait::Error::ProbeFailed(e))) => watcher_error(e),
            };
            if !error.is_transient() {
                return Err(error);
            }
            // A 410 Gone, a dropped watch, a throttled list: list and watch again.
            let mut delay = delays.next().unwrap_or(Duration::from_secs(1));
            if let ProviderError::Throttled {
                retry_after: Some(hint),
                ..
            } = &error
            {
                delay = delay.max(*hint);
            }
            if deadline.remaining() <= delay {
                return Err(error);
            }
            tracing::debug!(machine.id = %name, %error, "watching the pod again");
            tokio::time::sleep(delay).await;
        }
    }

    async fn status(&self, handle: &str) -> Result<Option<MachineStatus>, ProviderError> {
        Ok(self.get_pod(handle).await?.map(|p| self.status_of(&p)))
    }

    async fn terminate(&self, handle: &str) -> Result<(), ProviderError> {
        self.check_handle(handle)?;
        self.forget_address(handle);
        let params = DeleteParams {
            grace_period_seconds: Some(self.stop_grace_secs),
            ..DeleteParams::background()
        };
        match self
            .call("delete pod", None, self.pods.delete(handle, &params))
            .await
        {
            Ok(_) | Err(ProviderError::Rejected { status: 404, .. }) => Ok(()),
            Err(e) => Err(e),
        }
    }

    async fn find(&self, session_key: &str) -> Result<Option<MachineStatus>, ProviderError> {
        let pods = self.list(&[(label::SESSION, session_key)]).await?;
        let mut ours: Vec<MachineStatus> = pods
            .iter()
            .map(|p| self.status_of(p))
            .filter(|m| {
                m.labels
                    .as_ref()
                    .is_some_and(|l| l.session_key == session_key)
            })
            .collect();
        ours.sort_by_key(|m| m.state.is_terminal());
        Ok(ours.into_iter().next())
    }

    /// Every pod of this deployment, finished ones included (reported as ended or failed):
    /// bare pods stay until deleted.
    async fn list_managed(&self) -> Result<Vec<MachineStatus>, ProviderError> {
        Ok(self
            .list(&[])
            .await?
            .iter()
            .map(|p| self.status_of(p))
            .filter(|m| m.labels.is_some())
            .collect())
    }

    /// Lists one pod of this deployment: proves the credentials, the namespace and the `list`
    /// permission.
    async fn check(&self) -> Result<(), ProviderError> {
        let selector =
            pod::selector(&self.deployment, &[]).map_err(|e| ProviderError::rejected(NAME, e))?;
        self.call(
            "list pods",
            None,
            self.pods
                .list(&ListParams::default().labels(&selector).limit(1)),
        )
        .await
        .map(drop)
    }

    fn relabel(&self) -> Option<&dyn Relabel> {
        Some(self)
    }

    fn handoff(&self) -> Option<&dyn HttpHandoff> {
        Some(self)
    }

    fn reserve(&self) -> Option<&dyn Reserve> {
        Some(self)
    }
}

#[async_trait]
impl Relabel for KubernetesProvider {
    /// The labels (and, for the owner and room, annotations) in one merge patch that names the
    /// `resourceVersion` it was computed from. A new deadline also lowers
    /// `activeDeadlineSeconds` to end at it (counted from the pod's `startTime`, or from now
    /// before it has one), and, for a pod that is draining after its handoff
    /// ([`HttpHandoff::end_after_session`]) with a longer grace, shortens that grace to end at
    /// the deadline too (a second DELETE).
    async fn set_labels(
        &self,
        handle: &str,
        labels: &BTreeMap<String, String>,
    ) -> Result<(), ProviderError> {
        let (pod_labels, pod_annotations) =
            pod::to_pod_labels(labels).map_err(|e| ProviderError::rejected(NAME, e))?;
        let deadline = labels
            .get(crate::labels::key::DEADLINE)
            .and_then(|s| s.parse::<i64>().ok())
            .and_then(|secs| chrono::DateTime::from_timestamp(secs, 0));
        for attempt in 1..=RELABEL_ATTEMPTS {
            let Some(pod) = self.get_pod(handle).await? else {
                // Gone: nothing left to label.
                return Ok(());
            };
            let mut patch = json!({
                "metadata": {
                    "labels": pod_labels,
                    "resourceVersion": pod.metadata.resource_version,
                },
            });
            if !pod_annotations.is_empty() {
                patch["metadata"]["annotations"] = json!(pod_annotations);
            }
            if let Some(deadline) = deadline {
                let start = pod
                    .status
                    .as_ref()
                    .and_then(|s| s.start_time.as_ref())
                    .and_then(|t| chrono::DateTime::from_timestamp(t.0.as_second(), 0))
                    .unwrap_or_else(Utc::now);
                let wanted = pod::secs_until(deadline, start);
                match pod.spec.as_ref().and_then(|s| s.active_deadline_seconds) {
                    Some(current) if current < wanted => {
                        tracing::warn!(machine.id = %handle, active_deadline_secs = current, wanted_secs = wanted, "a pod's activeDeadlineSeconds cannot be raised: kubernetes.max_pod_secs is shorter than the session");
                    }
                    Some(current) if current == wanted => {}
                    _ => patch["spec"] = json!({ "activeDeadlineSeconds": wanted }),
                }
            }
            match self
                .call(
                    "patch pod",
                    None,
                    self.pods
                        .patch(handle, &PatchParams::default(), &Patch::Merge(&patch)),
                )
                .await
            {
                Ok(patched) => {
                    if let Some(deadline) = deadline {
                        self.drain_until(&patched, deadline).await?;
                    }
                    return Ok(());
                }
                Err(ProviderError::Rejected { status: 404, .. }) => return Ok(()),
                // Someone (the kubelet) updated the pod in between: read it again.
                Err(ProviderError::Unavailable { message, .. })
                    if message.contains("HTTP 409") && attempt < RELABEL_ATTEMPTS => {}
                Err(e) => return Err(e),
            }
        }
        Err(ProviderError::unavailable(
            NAME,
            "patch pod: the pod kept changing",
        ))
    }
}

fn config_error_from(
    message: String,
    e: impl std::error::Error + Send + Sync + 'static,
) -> ProviderError {
    ProviderError::Config {
        provider: NAME,
        message: format!("{message}: {}", error_chain(&e)),
        source: Some(Box::new(e)),
    }
}

/// The provider error of a failed call of `what`, sources kept. The API server answers errors
/// with a `Status`: its `code`, `reason` and `details.retryAfterSeconds` decide.
fn api_error(what: &str, e: kube::Error) -> ProviderError {
    match e {
        kube::Error::Api(status) => {
            let message = format!(
                "{what}: HTTP {} {}: {}",
                status.code, status.reason, status.message
            );
            let retry_after = status
                .details
                .as_ref()
                .map(|d| d.retry_after_seconds)
                .filter(|s| *s > 0)
                .map(|s| Duration::from_secs(u64::from(s)));
            match (status.code, status.reason.as_str()) {
                (429, _) | (_, "TooManyRequests") => ProviderError::Throttled {
                    provider: NAME,
                    retry_after,
                },
                // Stale resourceVersion, expired watch, timeouts and server failures: the same
                // call (after a fresh read) may succeed.
                (409, "Conflict")
                | (410, _)
                | (408 | 500.., _)
                | (_, "Timeout" | "ServerTimeout")
                | (_, "InternalError" | "ServiceUnavailable") => ProviderError::Unavailable {
                    provider: NAME,
                    message,
                    source: Some(Box::new(kube::Error::Api(status))),
                },
                (code, _) => ProviderError::Rejected {
                    provider: NAME,
                    status: code,
                    message,
                },
            }
        }
        kube::Error::Auth(e) => ProviderError::Config {
            provider: NAME,
            message: format!("{what}: cannot authenticate: {}", error_chain(&e)),
            source: Some(Box::new(e)),
        },
        other => ProviderError::Unavailable {
            provider: NAME,
            message: format!("{what}: {}", error_chain(&other)),
            source: Some(Box::new(other)),
        },
    }
}

/// The provider error of a failed watch.
fn watcher_error(e: watcher::Error) -> ProviderError {
    match e {
        watcher::Error::InitialListFailed(e) => api_error("list pod", e),
        watcher::Error::WatchStartFailed(e) => api_error("watch pod", e),
        watcher::Error::WatchFailed(e) => api_error("watch pod", e),
        watcher::Error::WatchError(status) => api_error("watch pod", kube::Error::Api(status)),
        other => ProviderError::Unavailable {
            provider: NAME,
            message: format!("watch pod: {}", error_chain(&other)),
            source: Some(Box::new(other)),
        },
    }
}

#[cfg(test)]
mod tests;
