//! A session's Pod and Secret, and a reserve pod, as the `kubernetes` provider writes them, and
//! how it reads a Pod back: its session or reserve labels, its progress towards "started", and
//! its [`MachineStatus`]. Pure functions, no I/O.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use k8s_openapi::api::core::v1::{
    Container, ContainerPort, ContainerStatus, EnvFromSource, EnvVar, EnvVarSource, HTTPGetAction,
    LocalObjectReference, Pod, PodSchedulingGate, PodSpec, Probe, ResourceRequirements, Secret,
    SecretEnvSource, SecretKeySelector, Toleration,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference, Time};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use crate::labels::{key, LabelCodec, MANAGED_BY, ROLE_RESERVE};
use crate::{
    MachineState, MachineStatus, MachineTemplate, ReserveLabels, SessionBinding, SessionLabels,
    Tier, Workload,
};

/// Label keys of a session's pod. Only what a selector may need is a label (values are
/// limited to 63 characters of `[A-Za-z0-9_.-]`, stored through
/// [`LabelCodec::KUBERNETES_LABELS`]). Every other key of [`crate::labels::key`] maps the same
/// way: `botdispatch_<name>` is the label `botdispatch.io/<name>`.
pub mod label {
    /// `botdispatch` on every pod botdispatch launches (the recommended
    /// `app.kubernetes.io/managed-by` label).
    pub const MANAGED_BY: &str = "app.kubernetes.io/managed-by";
    pub const DEPLOYMENT: &str = "botdispatch.io/deployment";
    pub const SESSION: &str = "botdispatch.io/session";
    pub const AGENT: &str = "botdispatch.io/agent";
    /// The session deadline, unix seconds (digits are a valid label value).
    pub const DEADLINE: &str = "botdispatch.io/deadline";
    /// `reserve` on a reserve pod that waits for a session, `session` once claimed.
    pub const ROLE: &str = "botdispatch.io/role";
    /// `1` once the dispatcher's own `/readyz` probe reached a reserve pod's bot.
    pub const READY: &str = "botdispatch.io/ready";
    /// Prefix of botdispatch's own label and annotation keys.
    pub const PREFIX: &str = "botdispatch.io/";
}

/// Annotation keys of a session's pod: what is read back but never selected on, stored as it
/// is. The owner is a JWT `sub` of any length and alphabet (`google-oauth2|1098…`, an email):
/// encoded, a long one would not fit a label value's 63 characters.
pub mod annotation {
    pub const OWNER: &str = "botdispatch.io/owner";
    pub const ROOM: &str = "botdispatch.io/room";
    /// Why the session failed after its pod took it (free text, as the dispatcher recorded it).
    pub const FAILURE: &str = "botdispatch.io/failure";
}

/// Where a key of [`crate::labels::key`] is kept on a pod.
enum Slot {
    Label(String),
    Annotation(&'static str),
}

fn slot(generic: &str) -> Slot {
    match generic {
        key::MANAGED_BY => Slot::Label(label::MANAGED_BY.to_owned()),
        key::OWNER => Slot::Annotation(annotation::OWNER),
        key::ROOM => Slot::Annotation(annotation::ROOM),
        key::FAILURE => Slot::Annotation(annotation::FAILURE),
        other => Slot::Label(match other.strip_prefix("botdispatch_") {
            Some(rest) => format!("{}{}", label::PREFIX, rest.replace('_', "-")),
            None => other.to_owned(),
        }),
    }
}

/// A pod's labels and annotations.
pub(crate) type LabelsAndAnnotations = (BTreeMap<String, String>, BTreeMap<String, String>);

/// Generic labels ([`SessionLabels::to_map`] and the like) as pod labels and annotations.
pub(crate) fn to_pod_labels(
    generic: &BTreeMap<String, String>,
) -> Result<LabelsAndAnnotations, String> {
    let codec = LabelCodec::KUBERNETES_LABELS;
    let mut labels = BTreeMap::new();
    let mut annotations = BTreeMap::new();
    for (k, v) in generic {
        match slot(k) {
            Slot::Label(name) => {
                let value = codec
                    .encode(v)
                    .map_err(|e| format!("the label {k} = {v:?} cannot be stored: {e}"))?;
                labels.insert(name, value);
            }
            Slot::Annotation(name) => {
                annotations.insert(name.to_owned(), v.clone());
            }
        }
    }
    Ok((labels, annotations))
}

/// The inverse of [`to_pod_labels`], for the keys of [`crate::labels::key`] `wanted`.
fn from_pod_labels(pod: &Pod, wanted: &[&str]) -> BTreeMap<String, String> {
    let codec = LabelCodec::KUBERNETES_LABELS;
    let empty = BTreeMap::new();
    let labels = pod.metadata.labels.as_ref().unwrap_or(&empty);
    let annotations = pod.metadata.annotations.as_ref().unwrap_or(&empty);
    wanted
        .iter()
        .filter_map(|k| {
            let value = match slot(k) {
                Slot::Label(name) => codec.decode(labels.get(&name)?),
                Slot::Annotation(name) => annotations.get(name)?.clone(),
            };
            Some(((*k).to_owned(), value))
        })
        .collect()
}

/// The scheduling gate a pod is created with when its bot token is in a Secret that does not
/// exist yet: the pod is not scheduled (and no kubelet looks for the Secret) until the gate is
/// removed, after the Secret was created.
pub const TOKEN_GATE: &str = "botdispatch.io/bot-token";
/// The env var of the bot contract that carries the Daily bot token; it comes from the
/// session's Secret, under the same key.
pub const TOKEN_ENV: &str = "DAILY_ROOM_TOKEN";
/// The node label a start's region hint selects on.
pub const REGION_LABEL: &str = "topology.kubernetes.io/region";
/// Path of the bot's readiness endpoint (DESIGN §4), probed by the kubelet on reserve pods.
pub const READYZ: &str = "/readyz";
/// `provider_state` of a reserve pod that is `Running` and `Ready`: what the service's reserve
/// reads as "up" (the other providers' word for it).
pub(crate) const RESERVE_UP: &str = "running";
/// `provider_state` of a reserve pod that waited longer than the reserve lets a pod wait: no
/// claim takes it, and the reaper retires it.
pub(crate) const RESERVE_EXPIRED: &str = "expired";
/// Suffix of a session Secret's name (`<pod>-bot-token`).
const SECRET_SUFFIX: &str = "-bot-token";
/// The longest pod name: a DNS subdomain (253) that still leaves room for the Secret's suffix.
const MAX_POD_NAME: usize = 253 - SECRET_SUFFIX.len();

/// Container waiting reasons after which the container will not start without a change of
/// image or configuration: the start fails at once, with the reason.
const FATAL_WAITING: [&str; 8] = [
    "ErrImagePull",
    "ImagePullBackOff",
    "InvalidImageName",
    "ErrImageNeverPull",
    "CrashLoopBackOff",
    "CreateContainerConfigError",
    "CreateContainerError",
    "RunContainerError",
];

/// What every pod of this provider has in common, from the `[kubernetes]` section.
#[derive(Debug, Clone, Default)]
pub(crate) struct PodSettings {
    pub container_name: String,
    pub service_account: Option<String>,
    pub image_pull_secrets: Vec<String>,
    pub image_pull_policy: Option<String>,
    pub node_selector: BTreeMap<String, String>,
    pub tolerations: Vec<Toleration>,
    pub labels: BTreeMap<String, String>,
    pub annotations: BTreeMap<String, String>,
    pub env_from_secrets: Vec<String>,
    pub termination_grace_period_secs: Option<i64>,
    pub max_pod_secs: i64,
    /// How long a reserve pod may wait for its session before it is rotated.
    pub reserve_max_idle_secs: i64,
}

/// A session's objects, before they exist.
#[derive(Debug, Clone)]
pub(crate) struct SessionObjects {
    pub pod: Pod,
    /// The bot token's Secret, created once the pod exists (owned by it); `None` when the
    /// session has no room (no token).
    pub secret: Option<Secret>,
}

/// A pod name of `name` (a session's deterministic machine name): lowercase, `_` as `-`.
pub(crate) fn pod_name(name: &str) -> Result<String, String> {
    let candidate = name.to_ascii_lowercase().replace('_', "-");
    if is_pod_name(&candidate) {
        Ok(candidate)
    } else {
        Err(format!(
            "{name:?} cannot be a pod name (a DNS subdomain of at most {MAX_POD_NAME} characters)"
        ))
    }
}

/// A name this provider could have given a pod: a DNS-1123 subdomain without dots (so it can
/// never name a path segment like `..`), short enough for its Secret's name.
pub(crate) fn is_pod_name(name: &str) -> bool {
    let bytes = name.as_bytes();
    (1..=MAX_POD_NAME).contains(&bytes.len())
        && bytes[0].is_ascii_alphanumeric()
        && bytes[bytes.len() - 1].is_ascii_alphanumeric()
        && bytes
            .iter()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || *b == b'-')
}

pub(crate) fn secret_name(pod: &str) -> String {
    format!("{pod}{SECRET_SUFFIX}")
}

/// Seconds from `now` until `deadline`, rounded up, at least 1.
pub(crate) fn secs_until(deadline: DateTime<Utc>, now: DateTime<Utc>) -> i64 {
    let millis = (deadline - now).num_milliseconds();
    (millis.saturating_add(999) / 1000).max(1)
}

/// The label selector of this deployment's pods (`extra`: more `key=value` terms).
pub(crate) fn selector(deployment: &str, extra: &[(&str, &str)]) -> Result<String, String> {
    let codec = LabelCodec::KUBERNETES_LABELS;
    let mut terms = vec![
        format!("{}={MANAGED_BY}", label::MANAGED_BY),
        format!(
            "{}={}",
            label::DEPLOYMENT,
            codec.encode(deployment).map_err(|e| e.to_string())?
        ),
    ];
    for (k, v) in extra {
        terms.push(format!(
            "{k}={}",
            codec.encode(v).map_err(|e| e.to_string())?
        ));
    }
    Ok(terms.join(","))
}

impl PodSettings {
    /// The session's pod (and Secret) in `namespace`.
    pub(crate) fn objects(
        &self,
        namespace: &str,
        template: &MachineTemplate,
        session: &SessionBinding,
        now: DateTime<Utc>,
    ) -> Result<SessionObjects, String> {
        let name = pod_name(&session.name)?;
        let l = &session.labels;
        let codec = LabelCodec::KUBERNETES_LABELS;
        let secret_name = secret_name(&name);
        let machine_env = session.machine_env(template);
        let token = machine_env.get(TOKEN_ENV).copied();
        let env: Vec<EnvVar> = machine_env
            .iter()
            .map(|(k, v)| match *k {
                TOKEN_ENV => EnvVar {
                    name: TOKEN_ENV.to_owned(),
                    value_from: Some(EnvVarSource {
                        secret_key_ref: Some(SecretKeySelector {
                            name: secret_name.clone(),
                            key: TOKEN_ENV.to_owned(),
                            optional: Some(false),
                        }),
                        ..EnvVarSource::default()
                    }),
                    ..EnvVar::default()
                },
                _ => plain_env(k, v),
            })
            .collect();
        let container = self.container(template, env)?;
        // A hard backstop for a pod whose deadline is never confirmed; `relabel` lowers it to
        // the session's own deadline (Kubernetes lets it decrease, never increase).
        let active_deadline = secs_until(l.deadline.wall(), now).max(self.max_pod_secs.max(1));
        let mut spec = self.spec(template, container, active_deadline);
        spec.scheduling_gates = token.map(|_| {
            vec![PodSchedulingGate {
                name: TOKEN_GATE.to_owned(),
            }]
        });
        let pod = self.pod(namespace, &name, &l.to_map(), spec)?;
        let secret = token.map(|token| Secret {
            metadata: ObjectMeta {
                name: Some(secret_name),
                namespace: Some(namespace.to_owned()),
                labels: Some(BTreeMap::from([
                    (label::MANAGED_BY.to_owned(), MANAGED_BY.to_owned()),
                    (
                        label::DEPLOYMENT.to_owned(),
                        codec.encode(&l.deployment).unwrap_or_default(),
                    ),
                ])),
                ..ObjectMeta::default()
            },
            string_data: Some(BTreeMap::from([(TOKEN_ENV.to_owned(), token.to_owned())])),
            type_: Some("Opaque".to_owned()),
            immutable: Some(true),
            ..Secret::default()
        });
        Ok(SessionObjects { pod, secret })
    }

    /// A hot reserve pod named after `name`, of `deployment`, from `template` alone plus `env`
    /// (its handoff secret): no session, no Secret, no scheduling gate. The kubelet probes its
    /// bot's `/readyz` (the pod turns `Ready` once the bot can take a session), and its
    /// `activeDeadlineSeconds` covers the longest wait in the reserve plus the longest pod life
    /// after a claim (a claim lowers it; an unclaimed pod ends by itself if every dispatcher is
    /// gone).
    pub(crate) fn reserve_pod(
        &self,
        namespace: &str,
        template: &MachineTemplate,
        name: &str,
        labels: &ReserveLabels,
        deployment: &str,
        env: &BTreeMap<String, String>,
    ) -> Result<Pod, String> {
        let Some(port) = template.handoff_port else {
            return Err(
                "a reserve pod takes its session over HTTP: the agent needs handoff = \"http\""
                    .to_owned(),
            );
        };
        if labels.tier != Tier::Hot {
            return Err(format!(
                "kubernetes keeps hot reserves only, not {:?}",
                labels.tier.as_str()
            ));
        }
        if labels.recycle {
            return Err(
                "kubernetes never reuses a pod (restartPolicy Never): reserve.recycle is not supported"
                    .to_owned(),
            );
        }
        let pod_name = pod_name(name)?;
        let env: Vec<EnvVar> = template
            .env_with(env)
            .into_iter()
            .map(|(k, v)| plain_env(k, v))
            .collect();
        let mut container = self.container(template, env)?;
        container.readiness_probe = Some(Probe {
            http_get: Some(HTTPGetAction {
                path: Some(READYZ.to_owned()),
                port: IntOrString::Int(i32::from(port)),
                scheme: Some("HTTP".to_owned()),
                ..HTTPGetAction::default()
            }),
            period_seconds: Some(1),
            timeout_seconds: Some(1),
            ..Probe::default()
        });
        let active_deadline = self
            .reserve_max_idle_secs
            .saturating_add(self.max_pod_secs)
            .max(1);
        let spec = self.spec(template, container, active_deadline);
        self.pod(namespace, &pod_name, &labels.to_map(deployment), spec)
    }

    /// The bot's container: the template's image, command, env and size.
    fn container(&self, template: &MachineTemplate, env: Vec<EnvVar>) -> Result<Container, String> {
        let Workload::Image(image) = &template.workload else {
            return Err(format!(
                "kubernetes runs container images, not {:?}",
                template.workload
            ));
        };
        let resources = BTreeMap::from([
            ("cpu".to_owned(), Quantity(template.guest.cpus.to_string())),
            (
                "memory".to_owned(),
                Quantity(format!("{}Mi", template.guest.memory_mb)),
            ),
        ]);
        Ok(Container {
            name: self.container_name.clone(),
            image: Some(image.clone()),
            image_pull_policy: self.image_pull_policy.clone(),
            command: template.cmd.clone(),
            env: Some(env),
            env_from: non_empty(
                self.env_from_secrets
                    .iter()
                    .map(|s| EnvFromSource {
                        secret_ref: Some(SecretEnvSource {
                            name: s.clone(),
                            optional: Some(false),
                        }),
                        ..EnvFromSource::default()
                    })
                    .collect(),
            ),
            // The `http` handoff's port, named for operators (a NetworkPolicy may select it).
            ports: template.handoff_port.map(|port| {
                vec![ContainerPort {
                    container_port: i32::from(port),
                    name: Some("handoff".to_owned()),
                    protocol: Some("TCP".to_owned()),
                    ..ContainerPort::default()
                }]
            }),
            // Requests equal to limits: the Guaranteed QoS class, so a voice bot's CPU is not
            // taken by noisy neighbours mid-call.
            resources: Some(ResourceRequirements {
                limits: Some(resources.clone()),
                requests: Some(resources),
                ..ResourceRequirements::default()
            }),
            ..Container::default()
        })
    }

    /// A pod spec around `container`: one run, never restarted, ending by `active_deadline`
    /// seconds after its start at the latest.
    fn spec(
        &self,
        template: &MachineTemplate,
        container: Container,
        active_deadline: i64,
    ) -> PodSpec {
        let mut node_selector = self.node_selector.clone();
        if let Some(region) = &template.region {
            node_selector.insert(REGION_LABEL.to_owned(), region.clone());
        }
        PodSpec {
            containers: vec![container],
            restart_policy: Some("Never".to_owned()),
            active_deadline_seconds: Some(active_deadline),
            termination_grace_period_seconds: self.termination_grace_period_secs,
            service_account_name: self.service_account.clone(),
            // A bot has no business with the Kubernetes API, and service links add an env
            // var per Service of the namespace to every pod.
            automount_service_account_token: Some(false),
            enable_service_links: Some(false),
            image_pull_secrets: non_empty(
                self.image_pull_secrets
                    .iter()
                    .map(|n| LocalObjectReference { name: n.clone() })
                    .collect(),
            ),
            node_selector: (!node_selector.is_empty()).then_some(node_selector),
            tolerations: non_empty(self.tolerations.clone()),
            ..PodSpec::default()
        }
    }

    /// The pod `name` with `spec`, carrying the configured labels and annotations and
    /// botdispatch's own (`generic`: keys of [`crate::labels::key`]).
    fn pod(
        &self,
        namespace: &str,
        name: &str,
        generic: &BTreeMap<String, String>,
        spec: PodSpec,
    ) -> Result<Pod, String> {
        let (own_labels, own_annotations) = to_pod_labels(generic)?;
        let mut labels = self.labels.clone();
        labels.extend(own_labels);
        let mut annotations = self.annotations.clone();
        annotations.extend(own_annotations);
        Ok(Pod {
            metadata: ObjectMeta {
                name: Some(name.to_owned()),
                namespace: Some(namespace.to_owned()),
                labels: Some(labels),
                annotations: Some(annotations),
                ..ObjectMeta::default()
            },
            spec: Some(spec),
            status: None,
        })
    }
}

fn plain_env(name: &str, value: &str) -> EnvVar {
    EnvVar {
        name: name.to_owned(),
        value: Some(value.to_owned()),
        ..EnvVar::default()
    }
}

fn non_empty<T>(items: Vec<T>) -> Option<Vec<T>> {
    (!items.is_empty()).then_some(items)
}

/// `secret`, owned by `pod`: deleting the pod deletes it (the garbage collector also deletes
/// it when the pod is gone before the Secret exists).
pub(crate) fn owned_by(mut secret: Secret, pod: &Pod) -> Secret {
    secret.metadata.owner_references = Some(vec![OwnerReference {
        api_version: "v1".to_owned(),
        kind: "Pod".to_owned(),
        name: pod.metadata.name.clone().unwrap_or_default(),
        uid: pod.metadata.uid.clone().unwrap_or_default(),
        block_owner_deletion: None,
        controller: None,
    }]);
    secret
}

/// Whether the pod still waits for its bot token's Secret.
pub(crate) fn is_gated(pod: &Pod) -> bool {
    pod.spec
        .as_ref()
        .and_then(|s| s.scheduling_gates.as_ref())
        .is_some_and(|gates| gates.iter().any(|g| g.name == TOKEN_GATE))
}

/// The pod's session labels, if it is one of `deployment`'s. A pod without the deployment
/// label is not "the default deployment's": it is not ours.
pub(crate) fn session_labels(pod: &Pod, deployment: &str) -> Option<SessionLabels> {
    pod.metadata.labels.as_ref()?.get(label::DEPLOYMENT)?;
    let map = from_pod_labels(
        pod,
        &[
            key::MANAGED_BY,
            key::DEPLOYMENT,
            key::SESSION,
            key::OWNER,
            key::ROOM,
            key::AGENT,
            key::DEADLINE,
            key::START,
        ],
    );
    SessionLabels::from_map_of(&map, deployment)
}

/// The pod's reserve labels, if it is an unclaimed reserve pod of `deployment`. `ready` is the
/// dispatcher's own probe's mark (the `botdispatch.io/ready` label); the kubelet's readiness is
/// the pod's `Ready` condition, read by [`status_of`].
pub(crate) fn reserve_labels(pod: &Pod, deployment: &str) -> Option<ReserveLabels> {
    let labels = pod.metadata.labels.as_ref()?;
    labels.get(label::DEPLOYMENT)?;
    if labels.get(label::ROLE).map(String::as_str) != Some(ROLE_RESERVE) {
        return None;
    }
    let map = from_pod_labels(
        pod,
        &[
            key::MANAGED_BY,
            key::DEPLOYMENT,
            key::ROLE,
            key::NAME,
            key::SLOT,
            key::AGENT,
            key::FINGERPRINT,
            key::TIER,
            key::READY,
            key::RECYCLE,
            key::RECYCLED_AT,
        ],
    );
    ReserveLabels::from_map_of(&map, deployment)
}

/// Where a pod is on its way to "started".
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Progress {
    /// Not running yet; `stuck` says why when Kubernetes gave a reason that may not clear
    /// (unschedulable, still gated).
    Pending { stuck: Option<String> },
    /// Running and Ready.
    Ready,
    /// Running, not (yet) Ready.
    Running,
    /// It ran and is over (`Succeeded`).
    Over,
    /// It cannot start any more (or crashed); why, in Kubernetes' words.
    Failed(String),
    /// Being deleted.
    Deleting,
}

fn condition<'a>(pod: &'a Pod, kind: &str) -> Option<&'a k8s_openapi::api::core::v1::PodCondition> {
    pod.status
        .as_ref()?
        .conditions
        .as_ref()?
        .iter()
        .find(|c| c.type_ == kind)
}

fn containers(pod: &Pod) -> &[ContainerStatus] {
    pod.status
        .as_ref()
        .and_then(|s| s.container_statuses.as_deref())
        .unwrap_or_default()
}

fn reason_message(reason: Option<&str>, message: Option<&str>) -> String {
    match (
        reason.filter(|r| !r.is_empty()),
        message.filter(|m| !m.is_empty()),
    ) {
        (Some(r), Some(m)) => format!("{r}: {m}"),
        (Some(r), None) => r.to_owned(),
        (None, Some(m)) => m.to_owned(),
        (None, None) => String::new(),
    }
}

/// A container that terminated with a non-zero code, said in words.
fn crashed(pod: &Pod) -> Option<String> {
    containers(pod).iter().find_map(|c| {
        let t = c.state.as_ref()?.terminated.as_ref()?;
        (t.exit_code != 0).then(|| {
            let why = reason_message(t.reason.as_deref(), t.message.as_deref());
            if why.is_empty() {
                format!("container {} exited with code {}", c.name, t.exit_code)
            } else {
                format!(
                    "container {} exited with code {} ({why})",
                    c.name, t.exit_code
                )
            }
        })
    })
}

pub(crate) fn progress(pod: &Pod) -> Progress {
    if pod.metadata.deletion_timestamp.is_some() {
        return Progress::Deleting;
    }
    let status = pod.status.as_ref();
    let phase = status.and_then(|s| s.phase.as_deref()).unwrap_or("Pending");
    match phase {
        "Succeeded" => return Progress::Over,
        "Failed" => {
            let why = status
                .map(|s| reason_message(s.reason.as_deref(), s.message.as_deref()))
                .filter(|w| !w.is_empty())
                .or_else(|| crashed(pod))
                .unwrap_or_else(|| "the pod failed".to_owned());
            return Progress::Failed(why);
        }
        _ => {}
    }
    if let Some(why) = crashed(pod) {
        return Progress::Failed(why);
    }
    for c in containers(pod) {
        if let Some(w) = c.state.as_ref().and_then(|s| s.waiting.as_ref()) {
            if let Some(reason) = w.reason.as_deref().filter(|r| FATAL_WAITING.contains(r)) {
                return Progress::Failed(reason_message(Some(reason), w.message.as_deref()));
            }
        }
    }
    if phase == "Running" {
        let ready = condition(pod, "Ready").is_some_and(|c| c.status == "True");
        return if ready {
            Progress::Ready
        } else {
            Progress::Running
        };
    }
    let stuck = match condition(pod, "PodScheduled") {
        Some(c) if c.status == "False" && c.reason.as_deref() == Some("Unschedulable") => {
            Some(reason_message(c.reason.as_deref(), c.message.as_deref()))
        }
        _ if is_gated(pod) => Some(
            "the pod is still gated: its launch did not get to create the bot token's Secret"
                .to_owned(),
        ),
        _ => None,
    };
    Progress::Pending { stuck }
}

fn at(t: &Time) -> Option<DateTime<Utc>> {
    DateTime::from_timestamp(t.0.as_second(), t.0.subsec_nanosecond().max(0) as u32)
}

/// How a pod is read back: whose pods are ours, and the rules that depend on settings.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Reading<'a> {
    pub deployment: &'a str,
    /// A deletion whose grace is at most this is a stop: the pod counts as over at once. A
    /// longer one (the SIGTERM after a handoff, a node drain) lets the bot finish its call:
    /// while its container runs, the pod still serves its session.
    pub stop_grace_secs: i64,
    /// A reserve pod older than this is expired: no claim takes it, the reaper retires it.
    pub reserve_max_idle_secs: i64,
    pub now: DateTime<Utc>,
}

/// Whether a pod being deleted still runs its session: a graceful deletion longer than a
/// stop's, and a container that has not terminated.
fn draining(pod: &Pod, stop_grace_secs: i64) -> bool {
    let long_grace = pod
        .metadata
        .deletion_grace_period_seconds
        .is_some_and(|g| g > stop_grace_secs);
    let running = containers(pod)
        .iter()
        .any(|c| c.state.as_ref().is_some_and(|s| s.running.is_some()));
    pod.metadata.deletion_timestamp.is_some() && long_grace && running
}

/// The pod as botdispatch reports it; labels only when it is `deployment`'s. A reserve pod's
/// `provider_state` is the reserve's word: [`RESERVE_UP`] once `Running` and `Ready` (the
/// kubelet's probe of `/readyz`), [`RESERVE_EXPIRED`] past the reserve's idle limit.
pub(crate) fn status_of(pod: &Pod, reading: &Reading<'_>) -> MachineStatus {
    let deployment = reading.deployment;
    let progress = progress(pod);
    let phase = pod
        .status
        .as_ref()
        .and_then(|s| s.phase.clone())
        .unwrap_or_else(|| "Pending".to_owned());
    let started_at = containers(pod)
        .iter()
        .filter_map(|c| {
            let s = c.state.as_ref()?;
            s.running
                .as_ref()
                .and_then(|r| r.started_at.as_ref())
                .or_else(|| s.terminated.as_ref().and_then(|t| t.started_at.as_ref()))
        })
        .filter_map(at)
        .min();
    let finished_at = containers(pod)
        .iter()
        .filter_map(|c| c.state.as_ref()?.terminated.as_ref()?.finished_at.as_ref())
        .filter_map(at)
        .max();
    let (state, provider_state, detail) = match &progress {
        Progress::Pending { stuck } => (MachineState::Starting, phase, stuck.clone()),
        Progress::Running => (MachineState::Starting, "Running".to_owned(), None),
        Progress::Ready => (MachineState::Started, "Running".to_owned(), None),
        Progress::Over => (
            MachineState::Ended,
            phase,
            Some("the bot exited with code 0".to_owned()),
        ),
        Progress::Failed(why)
            if phase == "Failed" && started_at.is_some() && why.contains("DeadlineExceeded") =>
        {
            (MachineState::Ended, phase, Some(why.clone()))
        }
        Progress::Failed(why) => (MachineState::Failed, phase, Some(why.clone())),
        Progress::Deleting if draining(pod, reading.stop_grace_secs) => (
            MachineState::Started,
            "Terminating".to_owned(),
            Some("SIGTERM sent: the bot finishes its session, then the pod goes".to_owned()),
        ),
        Progress::Deleting => (MachineState::Ended, "Terminating".to_owned(), None),
    };
    let created_at = pod.metadata.creation_timestamp.as_ref().and_then(at);
    let reserve = reserve_labels(pod, deployment);
    let provider_state = match &reserve {
        Some(_) if progress == Progress::Ready => {
            let age = created_at.map_or(i64::MAX, |c| (reading.now - c).num_seconds());
            if age > reading.reserve_max_idle_secs {
                RESERVE_EXPIRED.to_owned()
            } else {
                RESERVE_UP.to_owned()
            }
        }
        _ => provider_state,
    };
    let ended_at = match state {
        MachineState::Ended | MachineState::Failed => {
            finished_at.or_else(|| pod.metadata.deletion_timestamp.as_ref().and_then(at))
        }
        _ => None,
    };
    MachineStatus {
        handle: pod.metadata.name.clone().unwrap_or_default(),
        state,
        provider_state,
        region: pod
            .spec
            .as_ref()
            .and_then(|s| s.node_selector.as_ref()?.get(REGION_LABEL).cloned()),
        created_at,
        started_at,
        ended_at,
        labels: session_labels(pod, deployment),
        reserve,
        address: pod.status.as_ref().and_then(|s| s.pod_ip.clone()),
        detail,
        failure: crate::labels::failure_of(&from_pod_labels(pod, &[key::FAILURE])),
        held: None,
    }
}
