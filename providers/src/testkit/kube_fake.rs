//! Stateful fake of the Kubernetes API server's core/v1 pods and secrets, with a scheduler, a
//! kubelet and a garbage collector that act on a timer: an axum server on `127.0.0.1:0` that
//! answers in the API server's own shapes (`k8s-openapi` types for bodies, `Status` errors with
//! their reasons).
//!
//! Routes (everything the `kubernetes` provider calls, and a little more for tests):
//! * `POST   /api/v1/namespaces/{ns}/pods` (409 `AlreadyExists`, 422 `Invalid`)
//! * `GET    /api/v1/namespaces/{ns}/pods` (`labelSelector`, `fieldSelector`, `limit`,
//!   `continue`) and the same with `watch=true` (`resourceVersion`, `allowWatchBookmarks`,
//!   `timeoutSeconds`): `ADDED` / `MODIFIED` / `DELETED` / `BOOKMARK` events as JSON lines; a
//!   `resourceVersion` older than the kept history answers one `ERROR` event with a 410
//!   `Expired` `Status`, as the watch cache does
//! * `GET / PATCH / DELETE /api/v1/namespaces/{ns}/pods/{name}`: merge patches (strategic ones
//!   read as merge patches), with the pod update rules that matter here (`activeDeadlineSeconds`
//!   may only be set or lowered, scheduling gates only removed, a stale `resourceVersion` is a
//!   409 `Conflict`); deletes honour `gracePeriodSeconds` (only a shorter one than a deletion
//!   already under way) and `preconditions` (`resourceVersion`, `uid`: 409 `Conflict`)
//! * `POST /api/v1/namespaces/{ns}/secrets`, `GET …/secrets/{name}`
//! * each running pod's bot server (the Pipecat base image's, as the Fly fake has it), at
//!   `/_pods/{podIP}/{port}/readyz` and `…/bot`: the provider's `pod_url` template is
//!   [`FakeKube::pod_url_template`], so a handoff reaches the pod whose IP and port it names
//!   (pods get distinct IPs). A pod listens only on its `PORT` (8080 without one), only while its
//!   container runs and it is not being deleted (a bot refuses new connections after SIGTERM);
//!   otherwise the connection is reset. `/readyz` is 200 once the bot booted
//!   ([`FakeKubeConfig::bot_boot_delay`]), 503 before; `POST /bot` (a JSON object, the
//!   `X-Daily-*` headers, `Authorization: Bearer <BOTDISPATCH_HANDOFF_SECRET>`) runs a session
//!   and answers 200 `{}` when it ends, or resets the connection when the pod dies. A second
//!   session in one pod is accepted, as the base image does, and recorded as a violation.
//!
//! Pods go `Pending` (gated while they carry scheduling gates; `Unschedulable` when no node
//! matches their `nodeSelector`, or on demand) → scheduled → `Running` → `Ready` after the
//! configured delays; a pod with an HTTP `readinessProbe` turns `Ready` only once its bot's
//! server answers the probe's path and port with 200 (probed every
//! [`FakeKubeConfig::probe_period`]). The kubelet part refuses to start a container whose
//! `secretKeyRef` /
//! `envFrom` Secret is missing (`CreateContainerConfigError`, looked for again every
//! `kubelet_retry`), fails pulls of images named with [`FakeKube::refuse_image`] (`ErrImagePull`
//! → `ImagePullBackOff`), and enforces `activeDeadlineSeconds` (`Failed`, `DeadlineExceeded`).
//! A graceful delete sends SIGTERM: a bot in a session finishes it (until the grace ends, then
//! it is killed), an idle one exits; the pod goes once its container stopped.
//! The garbage collector deletes a Secret once no pod with an `ownerReferences` uid of it
//! exists (after the owner's deletion, or at once for an owner that never existed).
//!
//! Order of checks: bearer token (401), route (404 / 405), namespace (404), armed [`Fault`],
//! then the operation with its validation. Requests whose JSON bodies carry fields the
//! `k8s-openapi` types do not know are recorded as spec violations (the API server would warn).
//!
//! Not modelled: other resources, multiple containers' separate fates (all containers of a pod
//! share one), init containers, liveness and exec probes, probe periods and thresholds (an HTTP
//! readiness probe decides `Ready` once, when it first succeeds), `generateName`, dry runs,
//! server-side apply, JSON patches, label changes that move a pod out of a watch's selector,
//! pod IPs reused after a pod is gone.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{header, Method};
use axum::response::Response;
use chrono::Utc;
use k8s_openapi::api::core::v1::{
    ContainerState, ContainerStateRunning, ContainerStateTerminated, ContainerStateWaiting,
    ContainerStatus, Pod, PodCondition, PodStatus, Secret,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use k8s_openapi::ByteString;
use serde_json::{json, Value};
use tokio::sync::{broadcast, oneshot};

use super::faults::{self, FakeCore};
use super::server::{self, FakeServer, Reply, Request};
use super::{Fault, RecordedRequest};

/// Configuration of a [`FakeKube`].
#[derive(Debug, Clone)]
pub struct FakeKubeConfig {
    /// Namespaces that exist; requests for others answer 404.
    pub namespaces: Vec<String>,
    /// The bearer token every request must carry; `None` accepts anonymous requests.
    pub token: Option<String>,
    /// Labels of the fake's one node (`fake-node-1`); a pod whose `nodeSelector` asks for
    /// anything else is `Unschedulable`.
    pub node_labels: BTreeMap<String, String>,
    /// Time from create (or from the last scheduling gate's removal) to scheduling.
    pub schedule_delay: Duration,
    /// Time from scheduling to the container running (phase `Running`).
    pub start_delay: Duration,
    /// Time from running to the `Ready` condition.
    pub ready_delay: Duration,
    /// Longest time a deleted pod takes to go away, whatever its grace period.
    pub termination_delay: Duration,
    /// Time from an owner's disappearance to the deletion of its dependents.
    pub gc_delay: Duration,
    /// How long the kubelet waits before looking again for a missing Secret or retrying a pull.
    pub kubelet_retry: Duration,
    /// If set, the bot exits by itself (code 0) this long after it became ready.
    pub bot_lifetime: Option<Duration>,
    /// How often watches that asked for them get a `BOOKMARK`.
    pub bookmark_interval: Duration,
    /// Events kept for watches that resume from a `resourceVersion`; older ones answer 410.
    pub event_window: usize,
    /// Most items per list page (and the page size when the request names none).
    pub max_page_size: usize,
    /// Time from a container's start until its bot's `/readyz` answers 200.
    pub bot_boot_delay: Duration,
    /// How often the kubelet runs an HTTP readiness probe until it succeeds (the spec's
    /// `periodSeconds` would make tests wait whole seconds).
    pub probe_period: Duration,
    /// If set, a session delivered with `POST /bot` ends by itself this long after delivery;
    /// otherwise on [`FakeKube::end_sessions`], or when its pod dies.
    pub session_duration: Option<Duration>,
}

impl Default for FakeKubeConfig {
    fn default() -> Self {
        Self {
            namespaces: vec!["bots".to_owned()],
            token: Some("fake-kube-token".to_owned()),
            node_labels: BTreeMap::from([
                (
                    "kubernetes.io/hostname".to_owned(),
                    "fake-node-1".to_owned(),
                ),
                ("kubernetes.io/os".to_owned(), "linux".to_owned()),
                (
                    "topology.kubernetes.io/region".to_owned(),
                    "fake-region-1".to_owned(),
                ),
            ]),
            schedule_delay: Duration::from_millis(20),
            start_delay: Duration::from_millis(40),
            ready_delay: Duration::from_millis(20),
            termination_delay: Duration::from_millis(50),
            gc_delay: Duration::from_millis(20),
            kubelet_retry: Duration::from_millis(200),
            bot_lifetime: None,
            bookmark_interval: Duration::from_millis(500),
            event_window: 1000,
            max_page_size: 500,
            bot_boot_delay: Duration::from_millis(30),
            probe_period: Duration::from_millis(20),
            session_duration: None,
        }
    }
}

/// The operations of [`FakeKube`] faults can be armed for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum KubeOp {
    CreatePod,
    GetPod,
    ListPods,
    WatchPods,
    PatchPod,
    DeletePod,
    CreateSecret,
    GetSecret,
}

/// A handle on a running fake. Clones share the same server and state; the server stops when
/// the last handle is dropped.
#[derive(Debug, Clone)]
pub struct FakeKube {
    server: FakeServer<Shared>,
}

#[derive(Debug)]
struct Shared {
    config: FakeKubeConfig,
    core: FakeCore<KubeOp>,
    state: Mutex<Store>,
    events: broadcast::Sender<Arc<Event>>,
}

/// One change of a pod, as watches see it.
#[derive(Debug, Clone)]
enum Event {
    Pod {
        kind: &'static str,
        namespace: String,
        pod: Box<Pod>,
    },
    /// Every open watch ends (a compaction, an API server restart).
    CloseAll,
}

#[derive(Debug, Default)]
struct Store {
    /// The cluster's resourceVersion counter (etcd's revision).
    rv: u64,
    uids: u64,
    pods: BTreeMap<(String, String), Pod>,
    secrets: BTreeMap<(String, String), Secret>,
    /// Recent pod events, oldest first, for watches that resume.
    history: VecDeque<(u64, Arc<Event>)>,
    /// Watches that resume from a resourceVersion below this answer 410.
    oldest_rv: u64,
    never_start: bool,
    unschedulable: bool,
    missing_images: HashSet<String>,
    open_watches: usize,
    /// Pod IPs handed out so far.
    ips: u32,
    /// The bot server of each pod whose container runs, by pod uid.
    bots: HashMap<String, Bot>,
    deliveries: Vec<PodDelivery>,
    sessions: u64,
    bot_violations: Vec<String>,
}

/// A running bot's server.
#[derive(Debug)]
struct Bot {
    up_at: tokio::time::Instant,
    /// Sessions it runs, with who waits for each one's end.
    sessions: Vec<(u64, oneshot::Sender<bool>)>,
}

/// One `POST /bot` a pod's bot server received.
#[derive(Debug, Clone, PartialEq)]
pub struct PodDelivery {
    pub namespace: String,
    pub pod: String,
    pub pod_ip: String,
    /// The pod's uid: one per pod, never reused.
    pub uid: String,
    pub session_id: Option<String>,
    pub room_url: Option<String>,
    pub room_token: Option<String>,
    /// `Authorization: Bearer` carried the pod's `BOTDISPATCH_HANDOFF_SECRET`.
    pub secret_matched: bool,
    pub body: Option<Value>,
    /// `None`: accepted (a session runs); else the status it was refused with.
    pub refused: Option<u16>,
    pub at: chrono::DateTime<Utc>,
}

impl Store {
    fn next_rv(&mut self) -> u64 {
        self.rv += 1;
        self.rv
    }

    fn next_ip(&mut self) -> String {
        self.ips += 1;
        format!("10.244.{}.{}", self.ips / 250, self.ips % 250 + 2)
    }

    /// The pod's bot server goes away (its container stopped): sessions still running are cut.
    fn kill_bot(&mut self, pod: &Pod) {
        let bot = pod.metadata.uid.as_ref().and_then(|u| self.bots.remove(u));
        for (_, done) in bot.into_iter().flat_map(|b| b.sessions) {
            let _ = done.send(false);
        }
    }

    /// Whether the pod's bot runs a session.
    fn in_session(&self, pod: &Pod) -> bool {
        pod.metadata
            .uid
            .as_ref()
            .and_then(|u| self.bots.get(u))
            .is_some_and(|b| !b.sessions.is_empty())
    }
}

fn now_time() -> Time {
    Time(
        k8s_openapi::jiff::Timestamp::from_second(Utc::now().timestamp())
            .unwrap_or(k8s_openapi::jiff::Timestamp::UNIX_EPOCH),
    )
}

/// A `Status` error body, as the API server sends it.
fn status_body(code: u16, reason: &str, message: &str, details: Option<Value>) -> Value {
    let mut body = json!({
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code,
    });
    if let Some(details) = details {
        body["details"] = details;
    }
    body
}

fn status_reply(code: u16, reason: &str, message: impl Into<String>) -> Reply {
    Reply::json(code, status_body(code, reason, &message.into(), None))
}

/// The `Status` reason the API server gives a bare HTTP status.
fn reason_of(code: u16) -> &'static str {
    match code {
        400 => "BadRequest",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "NotFound",
        405 => "MethodNotAllowed",
        409 => "Conflict",
        410 => "Expired",
        415 => "UnsupportedMediaType",
        422 => "Invalid",
        429 => "TooManyRequests",
        500 => "InternalError",
        503 => "ServiceUnavailable",
        504 => "Timeout",
        _ => "Unknown",
    }
}

fn not_found(kind: &str, name: &str) -> Reply {
    Reply::json(
        404,
        status_body(
            404,
            "NotFound",
            &format!("{kind} \"{name}\" not found"),
            Some(json!({"name": name, "kind": kind})),
        ),
    )
}

/// 422 `Invalid` with one cause per problem.
fn invalid(kind: &str, name: &str, causes: Vec<(String, &'static str, String)>) -> Reply {
    let message = causes
        .iter()
        .map(|(field, _, m)| format!("{field}: {m}"))
        .collect::<Vec<_>>()
        .join(", ");
    let kind_title = if kind == "pods" { "Pod" } else { "Secret" };
    let causes: Vec<Value> = causes
        .into_iter()
        .map(|(field, reason, message)| json!({"reason": reason, "message": message, "field": field}))
        .collect();
    Reply::json(
        422,
        status_body(
            422,
            "Invalid",
            &format!("{kind_title} \"{name}\" is invalid: [{message}]"),
            Some(json!({"name": name, "kind": kind, "causes": causes})),
        ),
    )
}

/// A DNS-1123 subdomain.
fn is_subdomain(s: &str) -> bool {
    s.len() <= 253
        && s.split('.').all(|l| {
            let b = l.as_bytes();
            (1..=63).contains(&b.len())
                && b[0].is_ascii_alphanumeric()
                && b[b.len() - 1].is_ascii_alphanumeric()
                && b.iter()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
        })
}

fn is_dns_label(s: &str) -> bool {
    !s.contains('.') && is_subdomain(s) && s.len() <= 63
}

fn is_label_value(s: &str) -> bool {
    let b = s.as_bytes();
    b.is_empty()
        || (b.len() <= 63
            && b[0].is_ascii_alphanumeric()
            && b[b.len() - 1].is_ascii_alphanumeric()
            && b.iter()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'_' | b'.')))
}

fn is_qualified_name(s: &str) -> bool {
    let (prefix, name) = match s.rsplit_once('/') {
        Some((p, n)) => (Some(p), n),
        None => (None, s),
    };
    prefix.is_none_or(is_subdomain) && !name.is_empty() && is_label_value(name)
}

/// A C-ish identifier as env var names must be (`[-._a-zA-Z][-._a-zA-Z0-9]*`).
fn is_env_name(s: &str) -> bool {
    let mut chars = s.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || matches!(c, '-' | '.' | '_'))
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_'))
}

/// A resource quantity (`1`, `500m`, `1Gi`, `1.5`).
fn is_quantity(s: &str) -> bool {
    let digits_end = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (number, suffix) = s.split_at(digits_end);
    !number.is_empty()
        && number.parse::<f64>().is_ok()
        && matches!(
            suffix,
            "" | "m" | "k" | "M" | "G" | "T" | "Ki" | "Mi" | "Gi" | "Ti"
        )
}

/// One requirement of a label selector.
#[derive(Debug, Clone)]
enum Requirement {
    Equals(String, String),
    NotEquals(String, String),
    In(String, Vec<String>),
    NotIn(String, Vec<String>),
    Exists(String),
    NotExists(String),
}

impl Requirement {
    fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        match self {
            Self::Equals(k, v) => labels.get(k) == Some(v),
            Self::NotEquals(k, v) => labels.get(k) != Some(v),
            Self::In(k, vs) => labels.get(k).is_some_and(|v| vs.contains(v)),
            Self::NotIn(k, vs) => labels.get(k).is_none_or(|v| !vs.contains(v)),
            Self::Exists(k) => labels.contains_key(k),
            Self::NotExists(k) => !labels.contains_key(k),
        }
    }
}

/// Parses a label selector (`a=b,c!=d,e in (f,g),!h`).
fn parse_label_selector(selector: &str) -> Result<Vec<Requirement>, String> {
    let mut terms = Vec::new();
    let (mut depth, mut start) = (0, 0);
    for (i, c) in selector.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => depth -= 1,
            ',' if depth == 0 => {
                terms.push(&selector[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    terms.push(&selector[start..]);
    let mut out = Vec::new();
    for term in terms.into_iter().map(str::trim).filter(|t| !t.is_empty()) {
        let bad = || format!("unable to parse requirement: {term:?}");
        let set = |rest: &str| -> Result<Vec<String>, String> {
            let inner = rest
                .trim()
                .strip_prefix('(')
                .and_then(|r| r.strip_suffix(')'))
                .ok_or_else(bad)?;
            Ok(inner.split(',').map(|v| v.trim().to_owned()).collect())
        };
        let requirement = if let Some(k) = term.strip_prefix('!') {
            Requirement::NotExists(k.trim().to_owned())
        } else if let Some((k, rest)) = term.split_once(" notin ") {
            Requirement::NotIn(k.trim().to_owned(), set(rest)?)
        } else if let Some((k, rest)) = term.split_once(" in ") {
            Requirement::In(k.trim().to_owned(), set(rest)?)
        } else if let Some((k, v)) = term.split_once("!=") {
            Requirement::NotEquals(k.trim().to_owned(), v.trim().to_owned())
        } else if let Some((k, v)) = term.split_once("==").or_else(|| term.split_once('=')) {
            Requirement::Equals(k.trim().to_owned(), v.trim().to_owned())
        } else {
            Requirement::Exists(term.to_owned())
        };
        let key = match &requirement {
            Requirement::Equals(k, v) | Requirement::NotEquals(k, v) => {
                if !is_label_value(v) {
                    return Err(bad());
                }
                k
            }
            Requirement::In(k, _)
            | Requirement::NotIn(k, _)
            | Requirement::Exists(k)
            | Requirement::NotExists(k) => k,
        };
        if !is_qualified_name(key) {
            return Err(bad());
        }
        out.push(requirement);
    }
    Ok(out)
}

/// Parses a pod field selector (`metadata.name=x`, `status.phase!=Failed`, …).
fn parse_field_selector(selector: &str) -> Result<Vec<(String, bool, String)>, String> {
    selector
        .split(',')
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .map(|term| {
            let (field, equal, value) = if let Some((f, v)) = term.split_once("!=") {
                (f, false, v)
            } else if let Some((f, v)) = term.split_once("==").or_else(|| term.split_once('=')) {
                (f, true, v)
            } else {
                return Err(format!("invalid selector: {term:?}"));
            };
            match field {
                "metadata.name" | "metadata.namespace" | "status.phase" | "spec.nodeName" => {
                    Ok((field.to_owned(), equal, value.to_owned()))
                }
                other => Err(format!("field label not supported: {other}")),
            }
        })
        .collect()
}

/// What a list or a watch selects.
#[derive(Debug, Clone, Default)]
struct Selection {
    labels: Vec<Requirement>,
    fields: Vec<(String, bool, String)>,
}

impl Selection {
    fn from_request(request: &Request) -> Result<Self, Reply> {
        let bad = |m: String| status_reply(400, "BadRequest", m);
        Ok(Self {
            labels: request
                .query("labelSelector")
                .map(parse_label_selector)
                .transpose()
                .map_err(bad)?
                .unwrap_or_default(),
            fields: request
                .query("fieldSelector")
                .map(parse_field_selector)
                .transpose()
                .map_err(bad)?
                .unwrap_or_default(),
        })
    }

    fn matches(&self, pod: &Pod) -> bool {
        let empty = BTreeMap::new();
        let labels = pod.metadata.labels.as_ref().unwrap_or(&empty);
        self.labels.iter().all(|r| r.matches(labels))
            && self.fields.iter().all(|(field, equal, value)| {
                let actual = match field.as_str() {
                    "metadata.name" => pod.metadata.name.clone(),
                    "metadata.namespace" => pod.metadata.namespace.clone(),
                    "status.phase" => pod.status.as_ref().and_then(|s| s.phase.clone()),
                    _ => pod.spec.as_ref().and_then(|s| s.node_name.clone()),
                }
                .unwrap_or_default();
                (actual == *value) == *equal
            })
    }
}

/// RFC 7386 JSON merge patch.
fn merge_patch(target: &mut Value, patch: &Value) {
    match patch {
        Value::Object(fields) => {
            if !target.is_object() {
                *target = json!({});
            }
            if let Some(obj) = target.as_object_mut() {
                for (k, v) in fields {
                    if v.is_null() {
                        obj.remove(k);
                    } else {
                        merge_patch(obj.entry(k.clone()).or_insert(Value::Null), v);
                    }
                }
            }
        }
        other => *target = other.clone(),
    }
}

/// Drops nulls and empty objects/lists, so two serialisations of one object compare equal.
fn normalized(value: &Value) -> Value {
    match value {
        Value::Object(m) => Value::Object(
            m.iter()
                .map(|(k, v)| (k.clone(), normalized(v)))
                .filter(|(_, v)| !v.is_null())
                .collect(),
        ),
        Value::Array(a) => Value::Array(a.iter().map(normalized).collect()),
        other => other.clone(),
    }
}

/// Paths (JSON pointers) of fields in `sent` that are not in `kept` (what the typed
/// deserialisation dropped: unknown fields).
fn unknown_fields(sent: &Value, kept: &Value, at: &str, out: &mut Vec<String>) {
    match (sent, kept) {
        (Value::Object(s), Value::Object(k)) => {
            for (key, v) in s {
                let path = format!("{at}/{key}");
                match k.get(key) {
                    Some(kv) => unknown_fields(v, kv, &path, out),
                    None if v.is_null() => {}
                    None => out.push(path),
                }
            }
        }
        (Value::Array(s), Value::Array(k)) => {
            for (i, (sv, kv)) in s.iter().zip(k).enumerate() {
                unknown_fields(sv, kv, &format!("{at}/{i}"), out);
            }
        }
        _ => {}
    }
}

impl FakeKube {
    /// Starts the fake on a free local port, on the current tokio runtime.
    ///
    /// # Panics
    ///
    /// Panics outside a tokio runtime or if no local port can be bound.
    pub async fn start(config: FakeKubeConfig) -> FakeKube {
        let (events, _) = broadcast::channel(4096);
        let shared = Shared {
            config,
            core: FakeCore::default(),
            state: Mutex::new(Store::default()),
            events,
        };
        FakeKube {
            server: FakeServer::start(shared, handle).await,
        }
    }

    /// `http://127.0.0.1:PORT`, the cluster's server URL.
    pub fn api_url(&self) -> String {
        self.server.url("")
    }

    /// A kubeconfig whose current context points at this fake, in `namespace`, with the
    /// configured token.
    pub fn kubeconfig(&self, namespace: &str) -> String {
        let user = match &self.server.config.token {
            Some(token) => format!("  user:\n    token: {token}\n"),
            None => "  user: {}\n".to_owned(),
        };
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: fake\n  cluster:\n    server: {}\ncontexts:\n- name: fake\n  context:\n    cluster: fake\n    user: fake\n    namespace: {namespace}\ncurrent-context: fake\nusers:\n- name: fake\n{user}",
            self.api_url()
        )
    }

    /// A pod by namespace and name.
    pub fn pod(&self, namespace: &str, name: &str) -> Option<Pod> {
        self.server
            .lock()
            .pods
            .get(&(namespace.to_owned(), name.to_owned()))
            .cloned()
    }

    /// Every pod that exists, by namespace and name.
    pub fn pods(&self) -> Vec<Pod> {
        self.server.lock().pods.values().cloned().collect()
    }

    /// A secret by namespace and name.
    pub fn secret(&self, namespace: &str, name: &str) -> Option<Secret> {
        self.server
            .lock()
            .secrets
            .get(&(namespace.to_owned(), name.to_owned()))
            .cloned()
    }

    /// Every secret that exists.
    pub fn secrets(&self) -> Vec<Secret> {
        self.server.lock().secrets.values().cloned().collect()
    }

    /// While on, pods scheduled from now on never get their container started.
    pub fn set_never_start(&self, on: bool) {
        self.server.lock().never_start = on;
    }

    /// While on, pods that reach the scheduler stay `Unschedulable`.
    pub fn set_unschedulable(&self, on: bool) {
        self.server.lock().unschedulable = on;
    }

    /// Pulls of `image` fail (`ErrImagePull`, then `ImagePullBackOff`).
    pub fn refuse_image(&self, image: &str) {
        self.server.lock().missing_images.insert(image.to_owned());
    }

    /// The containers of a running pod exit with `code`: 0 succeeds it, anything else fails
    /// it. Returns whether the pod was running.
    pub fn exit_pod(&self, namespace: &str, name: &str, code: i32) -> bool {
        self.server.exit(namespace, name, code)
    }

    /// Creates a running pod without botdispatch's labels, as someone else would.
    pub fn create_foreign_pod(&self, namespace: &str, name: &str) {
        let pod: Pod = serde_json::from_value(json!({
            "metadata": {"name": name, "namespace": namespace, "labels": {"app": "someone-else"}},
            "spec": {"containers": [{"name": "web", "image": "nginx:1.27"}]},
        }))
        .expect("a valid pod");
        let mut state = self.server.lock();
        let pod = self.server.admit(&mut state, pod);
        let key = (namespace.to_owned(), name.to_owned());
        state.pods.insert(key.clone(), pod);
        self.server.emit(&mut state, "ADDED", &key);
        drop(state);
        self.server.clone_arc().spawn_lifecycle(key);
    }

    /// Forgets the event history and ends every open watch: a watch that resumes from its last
    /// `resourceVersion` gets 410 `Expired` and must list again.
    pub fn expire_watches(&self) {
        let mut state = self.server.lock();
        state.history.clear();
        state.oldest_rv = state.rv + 1;
        drop(state);
        let _ = self.server.events.send(Arc::new(Event::CloseAll));
    }

    /// Watches open right now.
    pub fn open_watches(&self) -> usize {
        self.server.lock().open_watches
    }

    /// Arms `fault` for the next `count` requests of `op` (after any fault already armed for
    /// it). [`Fault::Status`] answers a `Status` with the status' reason; a 429 carries
    /// `Retry-After` and `details.retryAfterSeconds`.
    pub fn set_fault(&self, op: KubeOp, fault: Fault, count: u32) {
        self.server.core.set_fault(op, fault, count);
    }

    pub fn clear_faults(&self) {
        self.server.core.clear_faults();
    }

    /// Every request answered so far, oldest first.
    pub fn requests(&self) -> Vec<RecordedRequest> {
        self.server.core.calls()
    }

    /// The `(resource, verb)` pairs of the requests answered so far, as RBAC names them
    /// (`pods`/`get`, `pods`/`watch`, `secrets`/`create`, …).
    pub fn verbs_used(&self) -> BTreeSet<(String, String)> {
        self.requests()
            .iter()
            .filter_map(|r| {
                let segments: Vec<&str> = r.path.trim_matches('/').split('/').collect();
                let (resource, named) = match segments.as_slice() {
                    ["api", "v1", "namespaces", _, resource] => (*resource, false),
                    ["api", "v1", "namespaces", _, resource, _] => (*resource, true),
                    _ => return None,
                };
                let watch = r.query.iter().any(|(k, v)| k == "watch" && v == "true");
                let verb = match (r.method.as_str(), named, watch) {
                    ("GET", _, true) => "watch",
                    ("GET", true, false) => "get",
                    ("GET", false, false) => "list",
                    ("POST", _, _) => "create",
                    ("PATCH", _, _) => "patch",
                    ("PUT", _, _) => "update",
                    ("DELETE", true, _) => "delete",
                    ("DELETE", false, _) => "deletecollection",
                    _ => return None,
                };
                Some((resource.to_owned(), verb.to_owned()))
            })
            .collect()
    }

    /// Requests the fake found fault with (unknown fields): a client bug.
    pub fn spec_violations(&self) -> Vec<String> {
        self.server.core.violations()
    }

    /// The `kubernetes.pod_url` that reaches the fake pods' bot servers.
    pub fn pod_url_template(&self) -> String {
        format!("{}/_pods/{{pod_ip}}/{{port}}", self.api_url())
    }

    /// Every `POST /bot` the pods' bots received, oldest first.
    pub fn deliveries(&self) -> Vec<PodDelivery> {
        self.server.lock().deliveries.clone()
    }

    /// What no dispatcher may ever cause: a second session in one pod.
    pub fn bot_violations(&self) -> Vec<String> {
        self.server.lock().bot_violations.clone()
    }

    /// Ends the sessions the pod's bot runs (the call is over). A bot that got SIGTERM then
    /// exits; one that did not stays up, as the Pipecat base image does. Returns how many ended.
    pub fn end_sessions(&self, namespace: &str, name: &str) -> usize {
        let mut state = self.server.lock();
        let uid = state
            .pods
            .get(&(namespace.to_owned(), name.to_owned()))
            .and_then(|p| p.metadata.uid.clone());
        let sessions = uid
            .and_then(|u| state.bots.get_mut(&u))
            .map(|b| std::mem::take(&mut b.sessions))
            .unwrap_or_default();
        let ended = sessions.len();
        for (_, done) in sessions {
            let _ = done.send(true);
        }
        ended
    }
}

async fn handle(State(shared): State<Arc<Shared>>, request: Request) -> Response {
    if let Some(rest) = request.path.strip_prefix("/_pods/") {
        let reply = shared.serve_bot(&request, rest).await;
        return request.respond(reply);
    }
    let body = request.json_body().ok().flatten();
    if let Some(response) = shared.clone().watch_if_asked(&request).await {
        return response;
    }
    let reply = shared.clone().api(&request, body.as_ref()).await;
    shared.core.record(request.recorded(body, &reply));
    request.respond(reply)
}

enum Route {
    Pods(String),
    Pod(String, String),
    Secrets(String),
    Secret(String, String),
}

impl Route {
    fn parse(path: &str) -> Option<Self> {
        let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
        Some(match segments.as_slice() {
            ["api", "v1", "namespaces", ns, "pods"] => Self::Pods((*ns).to_owned()),
            ["api", "v1", "namespaces", ns, "pods", name] => {
                Self::Pod((*ns).to_owned(), (*name).to_owned())
            }
            ["api", "v1", "namespaces", ns, "secrets"] => Self::Secrets((*ns).to_owned()),
            ["api", "v1", "namespaces", ns, "secrets", name] => {
                Self::Secret((*ns).to_owned(), (*name).to_owned())
            }
            _ => return None,
        })
    }

    fn namespace(&self) -> &str {
        match self {
            Self::Pods(ns) | Self::Pod(ns, _) | Self::Secrets(ns) | Self::Secret(ns, _) => ns,
        }
    }
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Store> {
        server::lock(&self.state)
    }

    fn clone_arc(self: &Arc<Self>) -> Arc<Self> {
        Arc::clone(self)
    }

    /// Authentication, route and namespace: the answer when the request cannot go on.
    fn gate(&self, request: &Request) -> Result<Route, Reply> {
        if let Some(token) = &self.config.token {
            if request.bearer_token() != Some(token.as_str()) {
                return Err(status_reply(401, "Unauthorized", "Unauthorized"));
            }
        }
        let route = Route::parse(&request.path).ok_or_else(|| {
            status_reply(
                404,
                "NotFound",
                "the server could not find the requested resource",
            )
        })?;
        if !self
            .config
            .namespaces
            .iter()
            .any(|n| n == route.namespace())
        {
            return Err(not_found("namespaces", route.namespace()));
        }
        Ok(route)
    }

    /// The answer of an armed fault, if one is armed for `op`; `Ok(())` to go on (a ghost
    /// create is the caller's to handle).
    async fn fault(&self, op: KubeOp) -> Result<(), Reply> {
        self.apply_fault(self.core.next_fault(op)).await
    }

    async fn apply_fault(&self, fault: Option<Fault>) -> Result<(), Reply> {
        match fault {
            None | Some(Fault::GhostCreate { .. }) => Ok(()),
            Some(Fault::Status {
                status,
                retry_after,
            }) => {
                let message = match status {
                    429 => "Too many requests, please try again later.".to_owned(),
                    _ => format!("fault injection: {}", faults::reason(status)),
                };
                let details = retry_after.map(|s| json!({"retryAfterSeconds": s}));
                Err(Reply::Json {
                    status,
                    body: status_body(status, reason_of(status), &message, details),
                    retry_after,
                })
            }
            Some(Fault::Stall(duration)) => {
                tokio::time::sleep(duration).await;
                Ok(())
            }
            Some(Fault::Reset) => Err(Reply::Reset),
        }
    }

    async fn api(self: Arc<Self>, request: &Request, body: Option<&Value>) -> Reply {
        let route = match self.gate(request) {
            Ok(route) => route,
            Err(reply) => return reply,
        };
        let method = &request.method;
        let op = match (&route, method.as_str()) {
            (Route::Pods(_), "POST") => KubeOp::CreatePod,
            (Route::Pods(_), "GET") => KubeOp::ListPods,
            (Route::Pod(..), "GET") => KubeOp::GetPod,
            (Route::Pod(..), "PATCH") => KubeOp::PatchPod,
            (Route::Pod(..), "DELETE") => KubeOp::DeletePod,
            (Route::Secrets(_), "POST") => KubeOp::CreateSecret,
            (Route::Secret(..), "GET") => KubeOp::GetSecret,
            _ => {
                return status_reply(
                    405,
                    "MethodNotAllowed",
                    format!(
                        "the server does not allow this method on the requested resource: {method}"
                    ),
                )
            }
        };
        // A ghost create runs the operation, then answers its error.
        let fault = self.core.next_fault(op);
        let ghost = match fault {
            Some(Fault::GhostCreate { status }) => Some(status),
            _ => None,
        };
        if let Err(reply) = self.apply_fault(fault).await {
            return reply;
        }
        let reply = match route {
            Route::Pods(ns) if op == KubeOp::CreatePod => self.create_pod(&ns, body),
            Route::Pods(ns) => self.list_pods(&ns, request),
            Route::Pod(ns, name) => match op {
                KubeOp::GetPod => match self.lock().pods.get(&(ns, name.clone())) {
                    Some(pod) => Reply::json(200, to_json(pod)),
                    None => not_found("pods", &name),
                },
                KubeOp::PatchPod => self.patch_pod(&ns, &name, request, body),
                _ => self.delete_pod(&ns, &name, request, body),
            },
            Route::Secrets(ns) => self.create_secret(&ns, body),
            Route::Secret(ns, name) => match self.lock().secrets.get(&(ns, name.clone())) {
                Some(secret) => Reply::json(200, to_json(secret)),
                None => not_found("secrets", &name),
            },
        };
        match ghost {
            Some(status) => Reply::json(
                status,
                status_body(status, reason_of(status), faults::reason(status), None),
            ),
            None => reply,
        }
    }

    /// Server-side defaults and status of a new pod; its uid, resourceVersion and timestamps.
    fn admit(&self, state: &mut Store, mut pod: Pod) -> Pod {
        state.uids += 1;
        let uid = format!("00000000-0000-4000-8000-{:012x}", state.uids);
        pod.metadata.uid = Some(uid);
        pod.metadata.creation_timestamp = Some(now_time());
        pod.metadata.generation = Some(1);
        if let Some(spec) = pod.spec.as_mut() {
            spec.dns_policy
                .get_or_insert_with(|| "ClusterFirst".to_owned());
            spec.restart_policy
                .get_or_insert_with(|| "Always".to_owned());
            spec.scheduler_name
                .get_or_insert_with(|| "default-scheduler".to_owned());
            spec.service_account_name
                .get_or_insert_with(|| "default".to_owned());
            spec.termination_grace_period_seconds.get_or_insert(30);
            spec.enable_service_links.get_or_insert(true);
            for c in &mut spec.containers {
                c.termination_message_path
                    .get_or_insert_with(|| "/dev/termination-log".to_owned());
                c.termination_message_policy
                    .get_or_insert_with(|| "File".to_owned());
                let latest = c.image.as_deref().is_some_and(|i| {
                    i.ends_with(":latest") || !i.rsplit('/').next().unwrap_or(i).contains(':')
                });
                c.image_pull_policy.get_or_insert_with(|| {
                    if latest { "Always" } else { "IfNotPresent" }.to_owned()
                });
            }
        }
        let gated = pod
            .spec
            .as_ref()
            .and_then(|s| s.scheduling_gates.as_ref())
            .is_some_and(|g| !g.is_empty());
        pod.status = Some(PodStatus {
            phase: Some("Pending".to_owned()),
            qos_class: Some("Guaranteed".to_owned()),
            conditions: gated.then(|| {
                vec![PodCondition {
                    type_: "PodScheduled".to_owned(),
                    status: "False".to_owned(),
                    reason: Some("SchedulingGated".to_owned()),
                    message: Some(
                        "Scheduling is blocked due to non-empty scheduling gates".to_owned(),
                    ),
                    last_transition_time: Some(now_time()),
                    ..PodCondition::default()
                }]
            }),
            ..PodStatus::default()
        });
        pod
    }

    /// Records a change of the pod at `key`: a new resourceVersion, an event for watches.
    fn emit(&self, state: &mut Store, kind: &'static str, key: &(String, String)) {
        let rv = state.next_rv();
        let pod = match kind {
            "DELETED" => None,
            _ => state.pods.get_mut(key),
        };
        let snapshot = match pod {
            Some(pod) => {
                pod.metadata.resource_version = Some(rv.to_string());
                pod.clone()
            }
            None => return,
        };
        self.publish(state, rv, kind, key, snapshot);
    }

    fn publish(
        &self,
        state: &mut Store,
        rv: u64,
        kind: &'static str,
        key: &(String, String),
        pod: Pod,
    ) {
        let event = Arc::new(Event::Pod {
            kind,
            namespace: key.0.clone(),
            pod: Box::new(pod),
        });
        state.history.push_back((rv, event.clone()));
        while state.history.len() > self.config.event_window.max(1) {
            if let Some((old, _)) = state.history.pop_front() {
                // A resume from `old` needs events after it only: still possible.
                state.oldest_rv = old;
            }
        }
        let _ = self.events.send(event);
    }

    /// Removes a pod for good: a `DELETED` event, then the garbage collector's turn.
    fn remove_pod(self: &Arc<Self>, state: &mut Store, key: &(String, String)) {
        let Some(mut pod) = state.pods.remove(key) else {
            return;
        };
        state.kill_bot(&pod);
        let rv = state.next_rv();
        pod.metadata.resource_version = Some(rv.to_string());
        self.publish(state, rv, "DELETED", key, pod);
        self.collect_garbage_later();
    }

    fn collect_garbage_later(self: &Arc<Self>) {
        let this = self.clone();
        tokio::spawn(async move {
            tokio::time::sleep(this.config.gc_delay).await;
            let mut state = this.lock();
            let uids: HashSet<String> = state
                .pods
                .values()
                .filter_map(|p| p.metadata.uid.clone())
                .collect();
            state
                .secrets
                .retain(|_, s| match &s.metadata.owner_references {
                    Some(owners) if !owners.is_empty() => {
                        owners.iter().any(|o| uids.contains(&o.uid))
                    }
                    _ => true,
                });
        });
    }

    fn create_pod(self: &Arc<Self>, ns: &str, body: Option<&Value>) -> Reply {
        let Some(body) = body else {
            return status_reply(400, "BadRequest", "the request body is empty");
        };
        let pod: Pod = match serde_json::from_value(body.clone()) {
            Ok(p) => p,
            Err(e) => {
                return status_reply(
                    400,
                    "BadRequest",
                    format!("the object provided is unrecognized: {e}"),
                )
            }
        };
        self.check_unknown_fields("POST pods", body, &to_json(&pod));
        if pod.metadata.namespace.as_deref().is_some_and(|n| n != ns) {
            return status_reply(
                400,
                "BadRequest",
                "the namespace of the provided object does not match the namespace sent on the request",
            );
        }
        let name = pod.metadata.name.clone().unwrap_or_default();
        if let Some(problems) = validate_pod(&pod) {
            return invalid("pods", &name, problems);
        }
        let key = (ns.to_owned(), name.clone());
        let mut state = self.lock();
        if state.pods.contains_key(&key) {
            return Reply::json(
                409,
                status_body(
                    409,
                    "AlreadyExists",
                    &format!("pods \"{name}\" already exists"),
                    Some(json!({"name": name, "kind": "pods"})),
                ),
            );
        }
        let mut pod = self.admit(&mut state, pod);
        pod.metadata.namespace = Some(ns.to_owned());
        state.pods.insert(key.clone(), pod);
        self.emit(&mut state, "ADDED", &key);
        let answer = to_json(&state.pods[&key]);
        drop(state);
        self.clone().spawn_lifecycle(key);
        Reply::json(201, answer)
    }

    fn list_pods(&self, ns: &str, request: &Request) -> Reply {
        let selection = match Selection::from_request(request) {
            Ok(s) => s,
            Err(reply) => return reply,
        };
        let max = self.config.max_page_size.max(1);
        let limit = request
            .query("limit")
            .and_then(|l| l.parse::<usize>().ok())
            .filter(|l| *l > 0)
            .map_or(max, |l| l.min(max));
        let after = request.query("continue").filter(|c| !c.is_empty());
        let state = self.lock();
        let mut items: Vec<&Pod> = state
            .pods
            .iter()
            .filter(|((n, name), _)| n == ns && after.is_none_or(|a| name.as_str() > a))
            .map(|(_, p)| p)
            .filter(|p| selection.matches(p))
            .collect();
        let more = items.len() > limit;
        items.truncate(limit);
        let mut metadata = json!({"resourceVersion": state.rv.to_string()});
        if let (true, Some(last)) = (more, items.last()) {
            metadata["continue"] = json!(last.metadata.name.clone().unwrap_or_default());
        }
        let items: Vec<Value> = items
            .into_iter()
            .map(|p| {
                let mut v = to_json(p);
                if let Some(o) = v.as_object_mut() {
                    o.remove("apiVersion");
                    o.remove("kind");
                }
                v
            })
            .collect();
        Reply::json(
            200,
            json!({"kind": "PodList", "apiVersion": "v1", "metadata": metadata, "items": items}),
        )
    }

    fn patch_pod(
        self: &Arc<Self>,
        ns: &str,
        name: &str,
        request: &Request,
        body: Option<&Value>,
    ) -> Reply {
        let content_type = request.header(header::CONTENT_TYPE).unwrap_or_default();
        if !matches!(
            content_type,
            "application/merge-patch+json" | "application/strategic-merge-patch+json"
        ) {
            return status_reply(
                415,
                "UnsupportedMediaType",
                format!("the fake models merge patches only, not {content_type:?}"),
            );
        }
        let Some(patch) = body else {
            return status_reply(400, "BadRequest", "the patch is empty");
        };
        let key = (ns.to_owned(), name.to_owned());
        let mut state = self.lock();
        let Some(current) = state.pods.get(&key).cloned() else {
            return not_found("pods", name);
        };
        let before = to_json(&current);
        if let Some(rv) = patch
            .pointer("/metadata/resourceVersion")
            .and_then(Value::as_str)
        {
            if Some(rv) != current.metadata.resource_version.as_deref() {
                return Reply::json(
                    409,
                    status_body(
                        409,
                        "Conflict",
                        &format!("Operation cannot be fulfilled on pods \"{name}\": the object has been modified; please apply your changes to the latest version and try again"),
                        Some(json!({"name": name, "kind": "pods"})),
                    ),
                );
            }
        }
        let mut after = before.clone();
        merge_patch(&mut after, patch);
        let updated: Pod = match serde_json::from_value(after.clone()) {
            Ok(p) => p,
            Err(e) => {
                return status_reply(
                    400,
                    "BadRequest",
                    format!("the patched object is unreadable: {e}"),
                )
            }
        };
        self.check_unknown_fields("PATCH pods", &after, &to_json(&updated));
        if let Some(problems) = validate_pod_update(&current, &updated) {
            return invalid("pods", name, problems);
        }
        // Status is a subresource: a patch of the pod leaves it alone.
        let mut stored = updated;
        stored.status = current.status.clone();
        stored.metadata.resource_version = current.metadata.resource_version.clone();
        let ungated = gates(&current) > 0 && gates(&stored) == 0;
        let deadline_changed =
            spec_of(&current).active_deadline_seconds != spec_of(&stored).active_deadline_seconds;
        state.pods.insert(key.clone(), stored);
        if ungated {
            if let Some(conditions) = state
                .pods
                .get_mut(&key)
                .and_then(|p| p.status.as_mut())
                .and_then(|s| s.conditions.as_mut())
            {
                conditions.retain(|c| c.type_ != "PodScheduled");
            }
        }
        self.emit(&mut state, "MODIFIED", &key);
        let answer = to_json(&state.pods[&key]);
        drop(state);
        if ungated {
            self.clone().spawn_lifecycle(key.clone());
        }
        if deadline_changed {
            self.clone().enforce_deadline(key);
        }
        Reply::json(200, answer)
    }

    fn delete_pod(
        self: &Arc<Self>,
        ns: &str,
        name: &str,
        request: &Request,
        body: Option<&Value>,
    ) -> Reply {
        let grace = request
            .query("gracePeriodSeconds")
            .and_then(|g| g.parse::<i64>().ok())
            .or_else(|| {
                body.and_then(|b| b.get("gracePeriodSeconds"))
                    .and_then(Value::as_i64)
            });
        let key = (ns.to_owned(), name.to_owned());
        let mut state = self.lock();
        let Some(pod) = state.pods.get(&key) else {
            return not_found("pods", name);
        };
        let precondition = |field: &str| {
            body.and_then(|b| b.pointer(&format!("/preconditions/{field}")))
                .and_then(Value::as_str)
                .map(str::to_owned)
        };
        let failed = [
            ("resourceVersion", pod.metadata.resource_version.clone()),
            ("uid", pod.metadata.uid.clone()),
        ]
        .into_iter()
        .find(|(field, actual)| precondition(field).is_some_and(|wanted| Some(wanted) != *actual));
        if let Some((field, actual)) = failed {
            let message = format!(
                "Operation cannot be fulfilled on pods \"{name}\": Precondition failed: {field}: {:?}, {field} in object meta: {}",
                precondition(field).unwrap_or_default(),
                actual.unwrap_or_default()
            );
            return Reply::json(
                409,
                status_body(
                    409,
                    "Conflict",
                    &message,
                    Some(json!({"name": name, "kind": "pods"})),
                ),
            );
        }
        let grace = grace
            .or_else(|| spec_of(pod).termination_grace_period_seconds)
            .unwrap_or(30)
            .max(0);
        let scheduled = spec_of(pod).node_name.is_some();
        let finished = matches!(
            pod.status.as_ref().and_then(|s| s.phase.as_deref()),
            Some("Succeeded" | "Failed")
        );
        if !scheduled || finished || grace == 0 {
            // Nothing runs on a node: the pod goes at once.
            let answer = to_json(pod);
            self.remove_pod(&mut state, &key);
            return Reply::json(200, answer);
        }
        let shorter = pod
            .metadata
            .deletion_grace_period_seconds
            .is_none_or(|g| grace < g);
        if shorter {
            if let Some(pod) = state.pods.get_mut(&key) {
                pod.metadata.deletion_grace_period_seconds = Some(grace);
                pod.metadata.deletion_timestamp = Some(Time(
                    k8s_openapi::jiff::Timestamp::from_second(Utc::now().timestamp() + grace)
                        .unwrap_or(k8s_openapi::jiff::Timestamp::UNIX_EPOCH),
                ));
            }
            self.emit(&mut state, "MODIFIED", &key);
            let uid = state.pods[&key].metadata.uid.clone();
            let delay = self
                .config
                .termination_delay
                .min(Duration::from_secs(grace as u64));
            let this = self.clone();
            let key2 = key.clone();
            let kill_at = tokio::time::Instant::now() + Duration::from_secs(grace as u64);
            tokio::spawn(async move {
                tokio::time::sleep(delay).await;
                // SIGTERM: a bot in a session finishes it first, until the grace ends.
                let busy = loop {
                    let busy = {
                        let state = this.lock();
                        match state.pods.get(&key2) {
                            Some(p) if p.metadata.uid == uid => state.in_session(p),
                            _ => return,
                        }
                    };
                    if !busy || tokio::time::Instant::now() >= kill_at {
                        break busy;
                    }
                    tokio::time::sleep(Duration::from_millis(10)).await;
                };
                let mut state = this.lock();
                if state.pods.get(&key2).and_then(|p| p.metadata.uid.clone()) != uid {
                    return;
                }
                // The bot exits (0), or is killed at the grace's end; then the kubelet removes
                // the pod.
                if let Some(pod) = state.pods.get_mut(&key2) {
                    match busy {
                        false => terminate_containers(pod, 0, "Completed"),
                        true => terminate_containers(pod, 137, "Error"),
                    }
                }
                this.emit(&mut state, "MODIFIED", &key2);
                this.remove_pod(&mut state, &key2);
            });
        }
        Reply::json(200, to_json(&state.pods[&key]))
    }

    fn create_secret(self: &Arc<Self>, ns: &str, body: Option<&Value>) -> Reply {
        let Some(body) = body else {
            return status_reply(400, "BadRequest", "the request body is empty");
        };
        let mut secret: Secret = match serde_json::from_value(body.clone()) {
            Ok(s) => s,
            Err(e) => {
                return status_reply(
                    400,
                    "BadRequest",
                    format!("the object provided is unrecognized: {e}"),
                )
            }
        };
        self.check_unknown_fields("POST secrets", body, &to_json(&secret));
        let name = secret.metadata.name.clone().unwrap_or_default();
        let mut problems = Vec::new();
        if !is_subdomain(&name) {
            problems.push(("metadata.name".to_owned(), "FieldValueInvalid", format!("Invalid value: {name:?}: a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, '-' or '.'")));
        }
        for (i, owner) in secret
            .metadata
            .owner_references
            .iter()
            .flatten()
            .enumerate()
        {
            if owner.api_version.is_empty()
                || owner.kind.is_empty()
                || owner.name.is_empty()
                || owner.uid.is_empty()
            {
                problems.push((
                    format!("metadata.ownerReferences[{i}]"),
                    "FieldValueRequired",
                    "Required value: apiVersion, kind, name and uid must be set".to_owned(),
                ));
            }
        }
        // stringData is write-only: merged into data.
        let mut data = secret.data.take().unwrap_or_default();
        for (k, v) in secret.string_data.take().unwrap_or_default() {
            data.insert(k, ByteString(v.into_bytes()));
        }
        let size: usize = data.iter().map(|(k, v)| k.len() + v.0.len()).sum();
        for k in data.keys() {
            if k.is_empty()
                || !k
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
            {
                problems.push((
                    format!("data[{k}]"),
                    "FieldValueInvalid",
                    "a valid config key must consist of alphanumeric characters, '-', '_' or '.'"
                        .to_owned(),
                ));
            }
        }
        if size > 1024 * 1024 {
            problems.push((
                "data".to_owned(),
                "FieldValueTooLong",
                "Too long: must have at most 1048576 bytes".to_owned(),
            ));
        }
        if !problems.is_empty() {
            return invalid("secrets", &name, problems);
        }
        secret.data = Some(data);
        secret.type_.get_or_insert_with(|| "Opaque".to_owned());
        secret.metadata.namespace = Some(ns.to_owned());
        let key = (ns.to_owned(), name.clone());
        let mut state = self.lock();
        if state.secrets.contains_key(&key) {
            return Reply::json(
                409,
                status_body(
                    409,
                    "AlreadyExists",
                    &format!("secrets \"{name}\" already exists"),
                    Some(json!({"name": name, "kind": "secrets"})),
                ),
            );
        }
        state.uids += 1;
        secret.metadata.uid = Some(format!("00000000-0000-4000-9000-{:012x}", state.uids));
        secret.metadata.creation_timestamp = Some(now_time());
        let rv = state.next_rv();
        secret.metadata.resource_version = Some(rv.to_string());
        let answer = to_json(&secret);
        state.secrets.insert(key, secret);
        drop(state);
        // An owner that does not exist (any more) makes the Secret garbage at once.
        self.collect_garbage_later();
        Reply::json(201, answer)
    }

    fn check_unknown_fields(&self, what: &str, sent: &Value, kept: &Value) {
        let mut unknown = Vec::new();
        unknown_fields(&normalized(sent), &normalized(kept), "", &mut unknown);
        if !unknown.is_empty() {
            self.core
                .violation(format!("{what}: unknown fields {}", unknown.join(", ")));
        }
    }

    /// Scheduler and kubelet for one pod: each step after its delay, as long as the pod (same
    /// uid) is still there, not being deleted, and not gated.
    fn spawn_lifecycle(self: Arc<Self>, key: (String, String)) {
        tokio::spawn(async move { self.lifecycle(key).await });
    }

    /// Runs `step` on the pod if it is still the same one and still alive; `false` otherwise.
    fn step(
        &self,
        key: &(String, String),
        uid: &Option<String>,
        step: impl FnOnce(&mut Pod, &mut Store),
    ) -> bool {
        let mut state = self.lock();
        let Some(mut pod) = state.pods.get(key).cloned() else {
            return false;
        };
        if &pod.metadata.uid != uid || pod.metadata.deletion_timestamp.is_some() {
            return false;
        }
        step(&mut pod, &mut state);
        state.pods.insert(key.clone(), pod);
        self.emit(&mut state, "MODIFIED", key);
        true
    }

    async fn lifecycle(self: Arc<Self>, key: (String, String)) {
        let (uid, gated) = match self.lock().pods.get(&key) {
            Some(p) => (p.metadata.uid.clone(), gates(p) > 0),
            None => return,
        };
        if gated {
            return;
        }
        tokio::time::sleep(self.config.schedule_delay).await;
        let (unschedulable, never_start) = {
            let state = self.lock();
            let Some(pod) = state.pods.get(&key) else {
                return;
            };
            let selector = spec_of(pod).node_selector.clone().unwrap_or_default();
            let fits = selector
                .iter()
                .all(|(k, v)| self.config.node_labels.get(k) == Some(v));
            (state.unschedulable || !fits, state.never_start)
        };
        if unschedulable {
            self.step(&key, &uid, |pod, _| {
                set_condition(
                    pod,
                    "PodScheduled",
                    "False",
                    Some("Unschedulable"),
                    Some("0/1 nodes are available: 1 node(s) didn't match Pod's node affinity/selector. preemption: 0/1 nodes are available: 1 Preemption is not helpful for scheduling."),
                );
            });
            return;
        }
        let scheduled = self.step(&key, &uid, |pod, _| {
            if let Some(spec) = pod.spec.as_mut() {
                spec.node_name = Some("fake-node-1".to_owned());
            }
            set_condition(pod, "PodScheduled", "True", None, None);
            let status = pod.status.get_or_insert_with(PodStatus::default);
            status.host_ip = Some("10.0.0.11".to_owned());
            status.start_time = Some(now_time());
            set_condition(pod, "Initialized", "True", None, None);
            set_condition(pod, "PodReadyToStartContainers", "False", None, None);
            set_condition(
                pod,
                "ContainersReady",
                "False",
                Some("ContainersNotReady"),
                Some("containers with unready status: [bot]"),
            );
            set_condition(
                pod,
                "Ready",
                "False",
                Some("ContainersNotReady"),
                Some("containers with unready status: [bot]"),
            );
            set_waiting(pod, "ContainerCreating", None);
        });
        if !scheduled || never_start {
            return;
        }
        self.clone().enforce_deadline(key.clone());
        // The image.
        let image = self
            .lock()
            .pods
            .get(&key)
            .and_then(|p| spec_of(p).containers.first().and_then(|c| c.image.clone()))
            .unwrap_or_default();
        if self.lock().missing_images.contains(&image) {
            let message = format!("failed to pull and unpack image \"{image}\": not found");
            self.step(&key, &uid, |pod, _| {
                set_waiting(pod, "ErrImagePull", Some(&message))
            });
            tokio::time::sleep(self.config.kubelet_retry).await;
            self.step(&key, &uid, |pod, _| {
                set_waiting(
                    pod,
                    "ImagePullBackOff",
                    Some(&format!("Back-off pulling image \"{image}\"")),
                )
            });
            return;
        }
        // The Secrets its env needs.
        loop {
            let missing = {
                let state = self.lock();
                let Some(pod) = state.pods.get(&key) else {
                    return;
                };
                missing_secret(pod, &state)
            };
            let Some(missing) = missing else { break };
            if !self.step(&key, &uid, |pod, _| {
                set_waiting(pod, "CreateContainerConfigError", Some(&missing))
            }) {
                return;
            }
            tokio::time::sleep(self.config.kubelet_retry).await;
        }
        tokio::time::sleep(self.config.start_delay).await;
        let running = self.step(&key, &uid, |pod, state| {
            if let Some(uid) = pod.metadata.uid.clone() {
                state.bots.insert(
                    uid,
                    Bot {
                        up_at: tokio::time::Instant::now(),
                        sessions: Vec::new(),
                    },
                );
            }
            let ip = state.next_ip();
            let status = pod.status.get_or_insert_with(PodStatus::default);
            status.phase = Some("Running".to_owned());
            status.pod_ip = Some(ip);
            set_condition(pod, "PodReadyToStartContainers", "True", None, None);
            set_state(
                pod,
                ContainerState {
                    running: Some(ContainerStateRunning {
                        started_at: Some(now_time()),
                    }),
                    ..ContainerState::default()
                },
                false,
            );
        });
        if !running {
            return;
        }
        tokio::time::sleep(self.config.ready_delay).await;
        // An HTTP readiness probe passes once the bot answers it.
        loop {
            let passes = {
                let state = self.lock();
                match state.pods.get(&key) {
                    Some(p) if p.metadata.uid == uid && p.metadata.deletion_timestamp.is_none() => {
                        self.probe_passes(&state, p)
                    }
                    _ => return,
                }
            };
            if passes {
                break;
            }
            tokio::time::sleep(self.config.probe_period).await;
        }
        let ready = self.step(&key, &uid, |pod, _| {
            if pod.status.as_ref().and_then(|s| s.phase.as_deref()) != Some("Running") {
                return;
            }
            set_condition(pod, "ContainersReady", "True", None, None);
            set_condition(pod, "Ready", "True", None, None);
            for c in pod
                .status
                .iter_mut()
                .flat_map(|s| s.container_statuses.iter_mut().flatten())
            {
                c.ready = true;
            }
        });
        if let (true, Some(lifetime)) = (ready, self.config.bot_lifetime) {
            tokio::time::sleep(lifetime).await;
            self.exit(&key.0, &key.1, 0);
        }
    }

    /// Fails the pod once `activeDeadlineSeconds` after its start time have passed.
    fn enforce_deadline(self: Arc<Self>, key: (String, String)) {
        tokio::spawn(async move {
            let (uid, due) = {
                let state = self.lock();
                let Some(pod) = state.pods.get(&key) else {
                    return;
                };
                let start = pod
                    .status
                    .as_ref()
                    .and_then(|s| s.start_time.as_ref())
                    .map(|t| t.0.as_second());
                let Some((start, ads)) = start.zip(spec_of(pod).active_deadline_seconds) else {
                    return;
                };
                (pod.metadata.uid.clone(), start + ads)
            };
            let wait = (due - Utc::now().timestamp()).max(0) as u64;
            tokio::time::sleep(Duration::from_secs(wait)).await;
            self.step(&key, &uid, |pod, state| {
                let still_due = pod
                    .status
                    .as_ref()
                    .and_then(|s| s.start_time.as_ref())
                    .zip(spec_of(pod).active_deadline_seconds)
                    .is_some_and(|(t, ads)| t.0.as_second() + ads <= Utc::now().timestamp());
                let phase = pod.status.as_ref().and_then(|s| s.phase.clone());
                if !still_due || matches!(phase.as_deref(), Some("Succeeded" | "Failed")) {
                    return;
                }
                state.kill_bot(pod);
                terminate_containers(pod, 137, "Error");
                let status = pod.status.get_or_insert_with(PodStatus::default);
                status.phase = Some("Failed".to_owned());
                status.reason = Some("DeadlineExceeded".to_owned());
                status.message = Some(
                    "Pod was active on the node longer than the specified deadline".to_owned(),
                );
            });
        });
    }

    fn exit(&self, ns: &str, name: &str, code: i32) -> bool {
        let key = (ns.to_owned(), name.to_owned());
        let uid = match self.lock().pods.get(&key) {
            Some(p) if p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running") => {
                p.metadata.uid.clone()
            }
            _ => return false,
        };
        self.step(&key, &uid, |pod, state| {
            state.kill_bot(pod);
            terminate_containers(pod, code, if code == 0 { "Completed" } else { "Error" });
            let status = pod.status.get_or_insert_with(PodStatus::default);
            status.phase = Some(if code == 0 { "Succeeded" } else { "Failed" }.to_owned());
        })
    }

    /// Answers `?watch=true` requests (a stream); `None` for every other request.
    async fn watch_if_asked(self: Arc<Self>, request: &Request) -> Option<Response> {
        if request.method != Method::GET || request.query("watch") != Some("true") {
            return None;
        }
        let route = match self.gate(request) {
            Ok(route @ Route::Pods(_)) => route,
            Ok(_) => Err(status_reply(
                405,
                "MethodNotAllowed",
                "watch is served for pod collections only",
            ))
            .ok()?,
            Err(reply) => {
                self.core.record(request.recorded(None, &reply));
                return Some(request.respond(reply));
            }
        };
        if let Err(reply) = self.fault(KubeOp::WatchPods).await {
            self.core.record(request.recorded(None, &reply));
            return Some(request.respond(reply));
        }
        let selection = match Selection::from_request(request) {
            Ok(s) => s,
            Err(reply) => {
                self.core.record(request.recorded(None, &reply));
                return Some(request.respond(reply));
            }
        };
        let ns = route.namespace().to_owned();
        let bookmarks = request.query("allowWatchBookmarks") == Some("true");
        let timeout = request
            .query("timeoutSeconds")
            .and_then(|t| t.parse::<u64>().ok())
            .map_or(Duration::from_secs(1800), Duration::from_secs);
        let from = request
            .query("resourceVersion")
            .unwrap_or_default()
            .to_owned();
        let (initial, receiver, expired) = {
            let mut state = self.lock();
            let receiver = self.events.subscribe();
            let mut initial: Vec<Value> = Vec::new();
            let mut expired = false;
            match from.parse::<u64>() {
                Ok(rv) if rv > 0 => {
                    if rv < state.oldest_rv {
                        expired = true;
                        let message = format!(
                            "too old resource version: {rv} ({})",
                            state.oldest_rv.saturating_sub(1)
                        );
                        initial.push(json!({"type": "ERROR", "object": status_body(410, "Expired", &message, None)}));
                    } else {
                        for (_, event) in state.history.iter().filter(|(erv, _)| *erv > rv) {
                            if let Some(line) = event_line(event, &ns, &selection) {
                                initial.push(line);
                            }
                        }
                    }
                }
                // "" or "0": start with the current state.
                _ => {
                    for ((pns, _), pod) in &state.pods {
                        if *pns == ns && selection.matches(pod) {
                            initial.push(json!({"type": "ADDED", "object": to_json(pod)}));
                        }
                    }
                }
            }
            if !expired {
                state.open_watches += 1;
            }
            (initial, receiver, expired)
        };
        self.core.record(RecordedRequest {
            method: request.method.to_string(),
            path: request.path.clone(),
            query: request.query.clone(),
            body: None,
            status: 200,
        });
        let lines = initial
            .into_iter()
            .map(|v| Ok::<Bytes, std::io::Error>(Bytes::from(format!("{v}\n"))));
        let initial_stream = futures_util::stream::iter(lines.collect::<Vec<_>>());
        let body: Body = if expired {
            Body::from_stream(initial_stream)
        } else {
            let live = WatchStream {
                shared: self.clone(),
                receiver,
                namespace: ns,
                selection,
                bookmarks,
                until: tokio::time::Instant::now() + timeout,
                done: false,
            };
            Body::from_stream(futures_util::StreamExt::chain(
                initial_stream,
                live.into_stream(),
            ))
        };
        Some(
            Response::builder()
                .status(200)
                .header(header::CONTENT_TYPE, "application/json")
                .body(body)
                .unwrap_or_default(),
        )
    }
}

/// The port a pod's bot listens on: its `PORT` (the bot contract), else 8080.
fn bot_port(pod: &Pod) -> u16 {
    spec_of(pod)
        .containers
        .first()
        .and_then(|c| c.env.as_ref())
        .and_then(|env| env.iter().find(|e| e.name == "PORT"))
        .and_then(|e| e.value.as_deref())
        .and_then(|v| v.parse().ok())
        .unwrap_or(8080)
}

/// An env value of the pod's container.
fn env_value(pod: &Pod, name: &str) -> Option<String> {
    spec_of(pod)
        .containers
        .first()?
        .env
        .as_ref()?
        .iter()
        .find(|e| e.name == name)?
        .value
        .clone()
}

/// What a bot request gets: an answer now, or one when its session ends.
enum BotAnswer {
    Now(Reply),
    Session(oneshot::Receiver<bool>),
}

impl Shared {
    /// Whether the bot of `pod` is up and has booted.
    fn bot_ready(&self, state: &Store, pod: &Pod) -> bool {
        pod.metadata
            .uid
            .as_ref()
            .and_then(|u| state.bots.get(u))
            .is_some_and(|b| b.up_at.elapsed() >= self.config.bot_boot_delay)
    }

    /// Whether the pod's readiness probe passes now: none, or an HTTP one on the bot's port and
    /// `/readyz`, answered 200.
    fn probe_passes(&self, state: &Store, pod: &Pod) -> bool {
        let probe = spec_of(pod)
            .containers
            .first()
            .and_then(|c| c.readiness_probe.clone());
        let Some(probe) = probe else { return true };
        let Some(get) = probe.http_get else {
            // Exec and TCP probes are not modelled: they pass.
            return true;
        };
        let port_matches = match &get.port {
            IntOrString::Int(p) => u16::try_from(*p).ok() == Some(bot_port(pod)),
            IntOrString::String(name) => spec_of(pod)
                .containers
                .first()
                .and_then(|c| c.ports.as_ref())
                .and_then(|ports| ports.iter().find(|p| p.name.as_deref() == Some(name)))
                .is_some_and(|p| u16::try_from(p.container_port).ok() == Some(bot_port(pod))),
        };
        port_matches && get.path.as_deref() == Some("/readyz") && self.bot_ready(state, pod)
    }

    /// A request to a pod's bot server, `/_pods/{ip}/{port}/{path}`.
    async fn serve_bot(self: &Arc<Self>, request: &Request, rest: &str) -> Reply {
        let mut parts = rest.splitn(3, '/');
        let (ip, port, path) = (
            parts.next().unwrap_or_default(),
            parts.next().unwrap_or_default(),
            parts.next().unwrap_or_default(),
        );
        match self.bot_request(request, ip, port, path) {
            BotAnswer::Now(reply) => reply,
            BotAnswer::Session(done) => match done.await {
                Ok(true) => Reply::json(200, json!({})),
                Ok(false) | Err(_) => Reply::Reset,
            },
        }
    }

    fn bot_request(
        self: &Arc<Self>,
        request: &Request,
        ip: &str,
        port: &str,
        path: &str,
    ) -> BotAnswer {
        let mut state = self.lock();
        let pod = state
            .pods
            .values()
            .find(|p| p.status.as_ref().and_then(|s| s.pod_ip.as_deref()) == Some(ip))
            .cloned();
        // Nothing listens: no such pod, another port, a container that does not run, or a bot
        // that got SIGTERM and takes no new connection.
        let Some(pod) = pod.filter(|p| {
            port.parse::<u16>().ok() == Some(bot_port(p))
                && p.metadata.deletion_timestamp.is_none()
                && p.metadata
                    .uid
                    .as_ref()
                    .is_some_and(|u| state.bots.contains_key(u))
        }) else {
            return BotAnswer::Now(Reply::Reset);
        };
        let ready = self.bot_ready(&state, &pod);
        match (request.method.as_str(), path) {
            ("GET", "readyz") => {
                return BotAnswer::Now(if ready {
                    Reply::json(200, json!({"status": "ok"}))
                } else {
                    Reply::json(503, json!({"status": "not ready"}))
                })
            }
            ("POST", "bot") => {}
            (_, "readyz" | "bot") => {
                return BotAnswer::Now(Reply::json(405, json!({"detail": "Method Not Allowed"})))
            }
            _ => return BotAnswer::Now(Reply::json(404, json!({"detail": "Not Found"}))),
        }
        let sent = |name: &str| request.header(name).map(str::to_owned);
        let body = request.json_body().ok().flatten();
        let secret = env_value(&pod, "BOTDISPATCH_HANDOFF_SECRET");
        let secret_matched = secret.is_some_and(|s| {
            request
                .header(header::AUTHORIZATION)
                .and_then(|h| h.strip_prefix("Bearer "))
                == Some(s.as_str())
        });
        let uid = pod.metadata.uid.clone().unwrap_or_default();
        let mut delivery = PodDelivery {
            namespace: pod.metadata.namespace.clone().unwrap_or_default(),
            pod: pod.metadata.name.clone().unwrap_or_default(),
            pod_ip: ip.to_owned(),
            uid: uid.clone(),
            session_id: sent("x-daily-session-id"),
            room_url: sent("x-daily-room-url"),
            room_token: sent("x-daily-room-token"),
            secret_matched,
            body: body.clone(),
            refused: None,
            at: Utc::now(),
        };
        let refusal = if !ready {
            Some((503, json!({"status": "not ready"})))
        } else if !body.as_ref().is_some_and(Value::is_object) {
            Some((
                422,
                json!({"detail": [{"type": "dict_type", "loc": ["body"], "msg": "Input should be a valid dictionary"}]}),
            ))
        } else {
            None
        };
        if let Some((status, answer)) = refusal {
            delivery.refused = Some(status);
            state.deliveries.push(delivery);
            return BotAnswer::Now(Reply::json(status, answer));
        }
        let earlier = state
            .deliveries
            .iter()
            .filter(|d| d.uid == uid && d.refused.is_none())
            .count();
        if earlier > 0 {
            let violation = format!(
                "pod {} took a second session ({:?}) after {earlier} earlier one(s)",
                delivery.pod, delivery.session_id
            );
            state.bot_violations.push(violation);
        }
        state.deliveries.push(delivery);
        state.sessions += 1;
        let id = state.sessions;
        let (done, waiting) = oneshot::channel();
        if let Some(bot) = state.bots.get_mut(&uid) {
            bot.sessions.push((id, done));
        }
        drop(state);
        if let Some(duration) = self.config.session_duration {
            let this = self.clone();
            tokio::spawn(async move {
                tokio::time::sleep(duration).await;
                let mut state = this.lock();
                if let Some(bot) = state.bots.get_mut(&uid) {
                    if let Some(i) = bot.sessions.iter().position(|(s, _)| *s == id) {
                        let (_, done) = bot.sessions.remove(i);
                        let _ = done.send(true);
                    }
                }
            });
        }
        BotAnswer::Session(waiting)
    }
}

/// The live part of a watch.
struct WatchStream {
    shared: Arc<Shared>,
    receiver: broadcast::Receiver<Arc<Event>>,
    namespace: String,
    selection: Selection,
    bookmarks: bool,
    until: tokio::time::Instant,
    done: bool,
}

impl WatchStream {
    fn into_stream(self) -> impl futures_util::Stream<Item = Result<Bytes, std::io::Error>> + Send {
        futures_util::stream::unfold(self, |mut w| async move {
            if w.done {
                return None;
            }
            loop {
                let tick = tokio::time::sleep(w.shared.config.bookmark_interval);
                tokio::select! {
                    () = tokio::time::sleep_until(w.until) => {
                        w.done = true;
                        return Some((Ok(Bytes::new()), w));
                    }
                    () = tick, if w.bookmarks => {
                        let rv = w.shared.lock().rv;
                        let line = json!({"type": "BOOKMARK", "object": {"kind": "Pod", "apiVersion": "v1", "metadata": {"resourceVersion": rv.to_string()}}});
                        return Some((Ok(Bytes::from(format!("{line}\n"))), w));
                    }
                    received = w.receiver.recv() => match received {
                        Ok(event) => {
                            if matches!(*event, Event::CloseAll) {
                                w.done = true;
                                return Some((Ok(Bytes::new()), w));
                            }
                            if let Some(line) = event_line(&event, &w.namespace, &w.selection) {
                                return Some((Ok(Bytes::from(format!("{line}\n"))), w));
                            }
                        }
                        // A watcher too slow for the event rate is cut off with 410, as the
                        // watch cache does.
                        Err(broadcast::error::RecvError::Lagged(_)) => {
                            w.done = true;
                            let line = json!({"type": "ERROR", "object": status_body(410, "Expired", "the watch fell behind", None)});
                            return Some((Ok(Bytes::from(format!("{line}\n"))), w));
                        }
                        Err(broadcast::error::RecvError::Closed) => {
                            w.done = true;
                            return Some((Ok(Bytes::new()), w));
                        }
                    }
                }
            }
        })
    }
}

impl Drop for WatchStream {
    fn drop(&mut self) {
        let mut state = self.shared.lock();
        state.open_watches = state.open_watches.saturating_sub(1);
    }
}

fn event_line(event: &Event, ns: &str, selection: &Selection) -> Option<Value> {
    match event {
        Event::Pod {
            kind,
            namespace,
            pod,
            ..
        } if namespace == ns && selection.matches(pod) => {
            Some(json!({"type": kind, "object": to_json(pod.as_ref())}))
        }
        _ => None,
    }
}

fn to_json<T: serde::Serialize>(value: &T) -> Value {
    serde_json::to_value(value).unwrap_or(Value::Null)
}

fn spec_of(pod: &Pod) -> k8s_openapi::api::core::v1::PodSpec {
    pod.spec.clone().unwrap_or_default()
}

fn gates(pod: &Pod) -> usize {
    pod.spec
        .as_ref()
        .and_then(|s| s.scheduling_gates.as_ref())
        .map_or(0, Vec::len)
}

fn set_condition(
    pod: &mut Pod,
    kind: &str,
    status: &str,
    reason: Option<&str>,
    message: Option<&str>,
) {
    let conditions = pod
        .status
        .get_or_insert_with(PodStatus::default)
        .conditions
        .get_or_insert_with(Vec::new);
    let condition = PodCondition {
        type_: kind.to_owned(),
        status: status.to_owned(),
        reason: reason.map(str::to_owned),
        message: message.map(str::to_owned),
        last_transition_time: Some(now_time()),
        ..PodCondition::default()
    };
    match conditions.iter_mut().find(|c| c.type_ == kind) {
        Some(c) => *c = condition,
        None => conditions.push(condition),
    }
}

/// Every container of the pod in `state`.
fn set_state(pod: &mut Pod, state: ContainerState, ready: bool) {
    let containers: Vec<(String, String)> = spec_of(pod)
        .containers
        .iter()
        .map(|c| (c.name.clone(), c.image.clone().unwrap_or_default()))
        .collect();
    let started = state.running.is_some();
    let status = pod.status.get_or_insert_with(PodStatus::default);
    status.container_statuses = Some(
        containers
            .into_iter()
            .map(|(name, image)| ContainerStatus {
                name,
                image_id: if started {
                    format!("docker.io/library/{image}@sha256:0000")
                } else {
                    String::new()
                },
                image,
                ready,
                started: Some(started),
                restart_count: 0,
                state: Some(state.clone()),
                ..ContainerStatus::default()
            })
            .collect(),
    );
}

fn set_waiting(pod: &mut Pod, reason: &str, message: Option<&str>) {
    set_state(
        pod,
        ContainerState {
            waiting: Some(ContainerStateWaiting {
                reason: Some(reason.to_owned()),
                message: message.map(str::to_owned),
            }),
            ..ContainerState::default()
        },
        false,
    );
}

fn terminate_containers(pod: &mut Pod, code: i32, reason: &str) {
    let started_at = pod
        .status
        .as_ref()
        .and_then(|s| s.container_statuses.as_ref())
        .and_then(|c| c.first())
        .and_then(|c| c.state.as_ref()?.running.as_ref()?.started_at.clone());
    set_state(
        pod,
        ContainerState {
            terminated: Some(ContainerStateTerminated {
                exit_code: code,
                reason: Some(reason.to_owned()),
                started_at,
                finished_at: Some(now_time()),
                ..ContainerStateTerminated::default()
            }),
            ..ContainerState::default()
        },
        false,
    );
    set_condition(pod, "ContainersReady", "False", Some("PodCompleted"), None);
    set_condition(pod, "Ready", "False", Some("PodCompleted"), None);
}

/// The kubelet's complaint about the first Secret the pod's env needs and cannot find.
fn missing_secret(pod: &Pod, state: &Store) -> Option<String> {
    let ns = pod.metadata.namespace.clone().unwrap_or_default();
    let secret = |name: &str| state.secrets.get(&(ns.clone(), name.to_owned()));
    for c in &spec_of(pod).containers {
        for var in c.env.iter().flatten() {
            let Some(r) = var
                .value_from
                .as_ref()
                .and_then(|f| f.secret_key_ref.as_ref())
            else {
                continue;
            };
            if r.optional == Some(true) {
                continue;
            }
            match secret(&r.name) {
                None => return Some(format!("secret \"{}\" not found", r.name)),
                Some(s) => {
                    if !s.data.as_ref().is_some_and(|d| d.contains_key(&r.key)) {
                        return Some(format!(
                            "couldn't find key {} in Secret {ns}/{}",
                            r.key, r.name
                        ));
                    }
                }
            }
        }
        for from in c.env_from.iter().flatten() {
            if let Some(r) = &from.secret_ref {
                if r.optional != Some(true) && secret(&r.name).is_none() {
                    return Some(format!("secret \"{}\" not found", r.name));
                }
            }
        }
    }
    None
}

/// What the API server's validation of a new pod would refuse (the part that matters here).
fn validate_pod(pod: &Pod) -> Option<Vec<(String, &'static str, String)>> {
    let mut problems: Vec<(String, &'static str, String)> = Vec::new();
    macro_rules! bad {
        ($field:expr, $reason:expr, $message:expr) => {
            problems.push(($field, $reason, $message))
        };
    }
    let name = pod.metadata.name.clone().unwrap_or_default();
    if name.is_empty() {
        bad!(
            "metadata.name".into(),
            "FieldValueRequired",
            "Required value: name or generateName is required".into()
        );
    } else if !is_subdomain(&name) {
        bad!("metadata.name".into(), "FieldValueInvalid", format!("Invalid value: {name:?}: a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, '-' or '.'"));
    }
    for (k, v) in pod.metadata.labels.iter().flatten() {
        if !is_qualified_name(k) {
            bad!("metadata.labels".into(), "FieldValueInvalid", format!("Invalid value: {k:?}: name part must consist of alphanumeric characters, '-', '_' or '.'"));
        }
        if !is_label_value(v) {
            bad!("metadata.labels".into(), "FieldValueInvalid", format!("Invalid value: {v:?}: a valid label must be an empty string or consist of alphanumeric characters, '-', '_' or '.', and must start and end with an alphanumeric character (at most 63)"));
        }
    }
    let annotation_bytes: usize = pod
        .metadata
        .annotations
        .iter()
        .flatten()
        .map(|(k, v)| k.len() + v.len())
        .sum();
    if annotation_bytes > 256 * 1024 {
        bad!(
            "metadata.annotations".into(),
            "FieldValueTooLong",
            "Too long: must have at most 262144 bytes".into()
        );
    }
    for k in pod.metadata.annotations.iter().flatten().map(|(k, _)| k) {
        if !is_qualified_name(k) {
            bad!(
                "metadata.annotations".into(),
                "FieldValueInvalid",
                format!("Invalid value: {k:?}")
            );
        }
    }
    let Some(spec) = &pod.spec else {
        bad!("spec".into(), "FieldValueRequired", "Required value".into());
        return Some(problems);
    };
    if spec.containers.is_empty() {
        bad!(
            "spec.containers".into(),
            "FieldValueRequired",
            "Required value".into()
        );
    }
    let mut names = HashSet::new();
    for (i, c) in spec.containers.iter().enumerate() {
        let at = format!("spec.containers[{i}]");
        if !is_dns_label(&c.name) || !names.insert(c.name.clone()) {
            bad!(
                format!("{at}.name"),
                "FieldValueInvalid",
                format!("Invalid value: {:?}", c.name)
            );
        }
        match c.image.as_deref() {
            None | Some("") => bad!(
                format!("{at}.image"),
                "FieldValueRequired",
                "Required value".into()
            ),
            Some(image) if image.trim() != image || image.contains(' ') => {
                bad!(
                    format!("{at}.image"),
                    "FieldValueInvalid",
                    "Invalid value: must not have leading or trailing whitespace".into()
                )
            }
            _ => {}
        }
        for (j, var) in c.env.iter().flatten().enumerate() {
            let at = format!("{at}.env[{j}]");
            if !is_env_name(&var.name) {
                bad!(format!("{at}.name"), "FieldValueInvalid", format!("Invalid value: {:?}: a valid environment variable name must consist of alphabetic characters, digits, '_', '-', or '.', and must not start with a digit", var.name));
            }
            if var.value.as_deref().is_some_and(|v| !v.is_empty()) && var.value_from.is_some() {
                bad!(
                    format!("{at}.valueFrom"),
                    "FieldValueInvalid",
                    "Invalid value: may not be specified when `value` is not empty".into()
                );
            }
            if let Some(r) = var
                .value_from
                .as_ref()
                .and_then(|f| f.secret_key_ref.as_ref())
            {
                if !is_subdomain(&r.name) || r.key.is_empty() {
                    bad!(
                        format!("{at}.valueFrom.secretKeyRef"),
                        "FieldValueInvalid",
                        "Invalid value: name and key are required".into()
                    );
                }
            }
        }
        for (kind, quantities) in c
            .resources
            .iter()
            .flat_map(|r| [("limits", &r.limits), ("requests", &r.requests)])
        {
            for (resource, q) in quantities.iter().flatten() {
                if !is_quantity(&q.0) {
                    bad!(
                        format!("{at}.resources.{kind}[{resource}]"),
                        "FieldValueInvalid",
                        format!(
                            "Invalid value: {:?}: quantities must match the regular expression",
                            q.0
                        )
                    );
                }
            }
        }
    }
    if let Some(policy) = &spec.restart_policy {
        if !matches!(policy.as_str(), "Always" | "OnFailure" | "Never") {
            bad!(
                "spec.restartPolicy".into(),
                "FieldValueNotSupported",
                format!("Unsupported value: {policy:?}")
            );
        }
    }
    if spec.active_deadline_seconds.is_some_and(|s| s < 1) {
        bad!(
            "spec.activeDeadlineSeconds".into(),
            "FieldValueInvalid",
            "Invalid value: must be between 1 and 2147483647, inclusive".into()
        );
    }
    let mut gate_names = HashSet::new();
    for (i, g) in spec.scheduling_gates.iter().flatten().enumerate() {
        if !is_qualified_name(&g.name) || !gate_names.insert(g.name.clone()) {
            bad!(
                format!("spec.schedulingGates[{i}].name"),
                "FieldValueInvalid",
                format!("Invalid value: {:?}", g.name)
            );
        }
    }
    for (k, v) in spec.node_selector.iter().flatten() {
        if !is_qualified_name(k) || !is_label_value(v) {
            bad!(
                "spec.nodeSelector".into(),
                "FieldValueInvalid",
                format!("Invalid value: {k}={v}")
            );
        }
    }
    (!problems.is_empty()).then_some(problems)
}

/// The pod update rules that matter here: only labels, annotations, a lowered
/// `activeDeadlineSeconds`, removed scheduling gates, added tolerations and container images
/// may change.
fn validate_pod_update(old: &Pod, new: &Pod) -> Option<Vec<(String, &'static str, String)>> {
    let mut problems = Vec::new();
    if new.metadata.name != old.metadata.name || new.metadata.uid != old.metadata.uid {
        problems.push((
            "metadata.name".to_owned(),
            "FieldValueInvalid",
            "field is immutable".to_owned(),
        ));
    }
    let (old_spec, new_spec) = (spec_of(old), spec_of(new));
    match (
        old_spec.active_deadline_seconds,
        new_spec.active_deadline_seconds,
    ) {
        (Some(_), None) => problems.push((
            "spec.activeDeadlineSeconds".to_owned(),
            "FieldValueInvalid",
            "Invalid value: \"null\": must not update from a positive integer to nil value"
                .to_owned(),
        )),
        (Some(o), Some(n)) if n > o => problems.push((
            "spec.activeDeadlineSeconds".to_owned(),
            "FieldValueInvalid",
            format!("Invalid value: {n}: must be less than or equal to previous value"),
        )),
        (_, Some(n)) if n < 1 => problems.push((
            "spec.activeDeadlineSeconds".to_owned(),
            "FieldValueInvalid",
            format!("Invalid value: {n}: must be between 1 and 2147483647, inclusive"),
        )),
        _ => {}
    }
    let old_gates: Vec<String> = old_spec
        .scheduling_gates
        .iter()
        .flatten()
        .map(|g| g.name.clone())
        .collect();
    if new_spec
        .scheduling_gates
        .iter()
        .flatten()
        .any(|g| !old_gates.contains(&g.name))
    {
        problems.push((
            "spec.schedulingGates".to_owned(),
            "FieldValueForbidden",
            "Forbidden: only deletion is allowed, but found new scheduling gate".to_owned(),
        ));
    }
    let mut comparable_old = old_spec.clone();
    let mut comparable_new = new_spec.clone();
    for spec in [&mut comparable_old, &mut comparable_new] {
        spec.active_deadline_seconds = None;
        spec.scheduling_gates = None;
        spec.tolerations = None;
        for c in &mut spec.containers {
            c.image = None;
        }
    }
    if comparable_old != comparable_new {
        problems.push(("spec".to_owned(), "FieldValueForbidden", "Forbidden: pod updates may not change fields other than `spec.containers[*].image`,`spec.initContainers[*].image`,`spec.activeDeadlineSeconds`,`spec.tolerations` (only additions to existing tolerations),`spec.terminationGracePeriodSeconds` (allow it to be set to 1 if it was previously negative)".to_owned()));
    }
    for (k, v) in new.metadata.labels.iter().flatten() {
        if !is_qualified_name(k) || !is_label_value(v) {
            problems.push((
                "metadata.labels".to_owned(),
                "FieldValueInvalid",
                format!("Invalid value: {k}={v}"),
            ));
        }
    }
    (!problems.is_empty()).then_some(problems)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn label_selectors_parse_and_match() {
        let labels = BTreeMap::from([
            ("app".to_owned(), "bot".to_owned()),
            ("tier".to_owned(), "a".to_owned()),
        ]);
        let matches = |s: &str| {
            parse_label_selector(s)
                .unwrap()
                .iter()
                .all(|r| r.matches(&labels))
        };
        assert!(matches("app=bot,tier in (a,b)"));
        assert!(matches("app==bot,!missing,tier"));
        assert!(!matches("app!=bot"));
        assert!(!matches("tier notin (a)"));
        assert!(matches(""));
        assert!(parse_label_selector("a=b c").is_err());
        assert!(parse_field_selector("spec.image=x").is_err());
    }

    #[test]
    fn merge_patches_follow_rfc_7386() {
        let mut target = json!({"a": {"b": 1, "c": 2}, "d": [1]});
        merge_patch(&mut target, &json!({"a": {"b": null, "e": 3}, "d": [2]}));
        assert_eq!(target, json!({"a": {"c": 2, "e": 3}, "d": [2]}));
    }

    #[test]
    fn quantities_and_names() {
        for q in ["1", "500m", "1Gi", "1.5", "1024Mi"] {
            assert!(is_quantity(q), "{q}");
        }
        for q in ["", "one", "1Q", "-1"] {
            assert!(!is_quantity(q), "{q}");
        }
        assert!(is_qualified_name("botdispatch.io/session"));
        assert!(!is_qualified_name("bad key"));
        assert!(is_env_name("DAILY_ROOM_URL") && !is_env_name("1X"));
    }
}
