//! Stateful fake of the Amazon ECS API (AWS JSON 1.1 protocol) for Fargate tasks: an axum server on
//! `127.0.0.1:0` that runs in-memory tasks through ECS's lifecycle on a timer, validates every
//! request against the official botocore service model (`specs/ecs-service-2.json`), and can
//! inject faults.
//!
//! It models what moto does not: `clientToken` idempotency (same token and parameters → the same
//! task; same token, other parameters → `ConflictException`), the `PROVISIONING → PENDING →
//! RUNNING` progression with configurable delays, tasks that never start or fail to start
//! (`TaskFailedToStart`), placement failures answered as 200 with `failures[]`,
//! `ThrottlingException` (HTTP 400, as ECS sends it), bots exiting by themselves
//! (`EssentialContainerExited`), `StopTask` draining through `DEACTIVATING`/`STOPPING` to
//! `STOPPED` with `UserInitiated` (and deleting the task's tags, as the API reference says),
//! Fargate's task size table, and `ListTasks` filters and pagination (`startedBy` must be the only
//! filter, as the API reference says; the default `desiredStatus` filter is `RUNNING`).
//!
//! Scope: `RunTask`, `DescribeTasks`, `StopTask`, `ListTasks`, `DescribeClusters` and
//! `TagResource` (of tasks), Fargate only (a launch type `FARGATE` or a `FARGATE`/`FARGATE_SPOT`
//! capacity provider strategy). Other operations of the model answer 501. Signatures are not
//! verified; the `Authorization` header must be a SigV4 header for the configured access key,
//! region and service `ecs`.
//!
//! Order of checks for every request: `X-Amz-Target`, `Content-Type` and body against the model
//! (violations are recorded and answered 400), SigV4 header (400 `UnrecognizedClientException`),
//! implemented operation (501), armed [`EcsFault`], then the operation itself.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use axum::extract::State;
use axum::http::{header, HeaderValue, Method};
use axum::response::Response;
use chrono::{DateTime, Utc};
use serde_json::{json, Value};
use uuid::Uuid;

use super::faults::{self, FakeCore};
use super::server::{self, FakeServer, Reply, Request};
use super::Fault;

// The validator and its document live in `validate/`; re-exported where they used to be.
pub use super::validate::botocore::{BotocoreValidator, ECS_SPEC};

const TARGET_PREFIX: &str = "AmazonEC2ContainerServiceV20141113.";
const JSON_11: &str = "application/x-amz-json-1.1";

/// Configuration of a [`FakeEcs`].
#[derive(Debug, Clone)]
pub struct FakeEcsConfig {
    /// Access key id the SigV4 `Authorization` header must name.
    pub access_key_id: String,
    /// Region the credential scope must name; also used in ARNs.
    pub region: String,
    pub account_id: String,
    /// Clusters that exist (names); others answer `ClusterNotFoundException`.
    pub clusters: Vec<String>,
    /// Task definitions that exist.
    pub task_definitions: Vec<FakeTaskDefinition>,
    /// Time a task spends in `PROVISIONING` before `PENDING`.
    pub provisioning_for: Duration,
    /// Time a task spends in `PENDING` before `RUNNING`.
    pub pending_for: Duration,
    /// If set, a task's bot exits by itself (exit code 0) this long after the task started.
    pub bot_lifetime: Option<Duration>,
    /// Time from a stop (or the bot's exit) to `lastStatus == STOPPED`.
    pub stop_delay: Duration,
    /// Largest `ListTasks` page the fake answers (ECS: 100); smaller values exercise pagination.
    pub max_page_size: usize,
}

impl Default for FakeEcsConfig {
    fn default() -> Self {
        Self {
            access_key_id: "AKIDFAKEECS".to_owned(),
            region: "us-east-1".to_owned(),
            account_id: "123456789012".to_owned(),
            clusters: vec!["bots".to_owned()],
            task_definitions: vec![FakeTaskDefinition::default()],
            provisioning_for: Duration::from_millis(30),
            pending_for: Duration::from_millis(30),
            bot_lifetime: None,
            stop_delay: Duration::from_millis(30),
            max_page_size: 100,
        }
    }
}

/// A registered task definition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FakeTaskDefinition {
    pub family: String,
    pub revision: u32,
    /// Container names; the first is the essential one whose exit ends the task.
    pub containers: Vec<String>,
    /// Task-level CPU units and memory (MiB) used when a run does not override them.
    pub cpu: String,
    pub memory: String,
}

impl Default for FakeTaskDefinition {
    fn default() -> Self {
        Self {
            family: "bot".to_owned(),
            revision: 1,
            containers: vec!["bot".to_owned()],
            cpu: "1024".to_owned(),
            memory: "2048".to_owned(),
        }
    }
}

/// The operations of [`FakeEcs`] faults can be armed for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum EcsOp {
    RunTask,
    DescribeTasks,
    StopTask,
    ListTasks,
    DescribeClusters,
    TagResource,
}

impl EcsOp {
    const ALL: [EcsOp; 6] = [
        Self::RunTask,
        Self::DescribeTasks,
        Self::StopTask,
        Self::ListTasks,
        Self::DescribeClusters,
        Self::TagResource,
    ];

    /// The operation's name in the model and in `X-Amz-Target`.
    pub fn name(self) -> &'static str {
        match self {
            Self::RunTask => "RunTask",
            Self::DescribeTasks => "DescribeTasks",
            Self::StopTask => "StopTask",
            Self::ListTasks => "ListTasks",
            Self::DescribeClusters => "DescribeClusters",
            Self::TagResource => "TagResource",
        }
    }

    fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|op| op.name() == name)
    }
}

/// A misbehaviour injected into the next requests of one operation (see [`FakeEcs::set_fault`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EcsFault {
    /// One of the shared faults. [`Fault::Status`] and [`Fault::GhostCreate`] answer their HTTP
    /// status with the ECS error body that goes with it: 429 `ThrottlingException`, 503
    /// `ServiceUnavailableException`, other 5xx `ServerException`, other 4xx `ClientException`.
    Http(Fault),
    /// Answers HTTP `status` with `{"__type": kind, "message": message}`; nothing happens.
    Error {
        status: u16,
        kind: String,
        message: String,
    },
    /// `RunTask` only: answers 200 with no task and this one entry in `failures[]` (how ECS
    /// reports placement and capacity failures); nothing is started.
    RunTaskFailure {
        reason: String,
        detail: Option<String>,
    },
}

impl EcsFault {
    /// ECS's throttling answer: HTTP 400 with `ThrottlingException` (the namespaced `__type`
    /// ECS's front end sends).
    pub fn throttling() -> Self {
        Self::Error {
            status: 400,
            kind: "com.amazon.coral.availability#ThrottlingException".to_owned(),
            message: "Rate exceeded".to_owned(),
        }
    }
}

impl From<Fault> for EcsFault {
    fn from(fault: Fault) -> Self {
        Self::Http(fault)
    }
}

/// One request seen by the fake, recorded when it was answered.
#[derive(Debug, Clone, PartialEq)]
pub struct EcsCall {
    /// Operation name from `X-Amz-Target` (empty when the header was missing).
    pub op: String,
    /// The JSON body, if it parsed.
    pub body: Option<Value>,
    /// Status answered; `0` when the connection was reset instead.
    pub status: u16,
}

/// A snapshot of one task of the fake.
#[derive(Debug, Clone, PartialEq)]
pub struct FakeTask {
    pub arn: String,
    pub cluster: String,
    pub task_definition_arn: String,
    pub containers: Vec<String>,
    /// `PROVISIONING`, `PENDING`, `RUNNING`, `DEACTIVATING`, `STOPPING`, `DEPROVISIONING`,
    /// `STOPPED`.
    pub last_status: String,
    /// `RUNNING` or `STOPPED`.
    pub desired_status: String,
    pub started_by: Option<String>,
    /// Tags as sent (deleted by `StopTask`).
    pub tags: Vec<(String, String)>,
    pub client_token: Option<String>,
    /// `FARGATE`, or `None` for a capacity provider strategy.
    pub launch_type: Option<String>,
    /// `FARGATE` or `FARGATE_SPOT`.
    pub capacity_provider: String,
    pub cpu: String,
    pub memory: String,
    pub overrides: Value,
    pub stop_code: Option<String>,
    pub stopped_reason: Option<String>,
    /// Exit code of the essential container once it exited.
    pub exit_code: Option<i32>,
    pub created_at: DateTime<Utc>,
    pub started_at: Option<DateTime<Utc>>,
    pub stopping_at: Option<DateTime<Utc>>,
    pub stopped_at: Option<DateTime<Utc>>,
    pub version: i64,
}

impl FakeTask {
    fn id(&self) -> &str {
        self.arn.rsplit('/').next().unwrap_or_default()
    }

    fn container_status(&self) -> &'static str {
        match self.last_status.as_str() {
            "PROVISIONING" | "PENDING" => "PENDING",
            "RUNNING" => "RUNNING",
            _ if self.exit_code.is_some() || self.last_status == "STOPPED" => "STOPPED",
            _ => "RUNNING",
        }
    }

    /// The task as ECS's `Task` shape.
    fn to_json(&self, region: &str, include_tags: bool) -> Value {
        let containers: Vec<Value> = self
            .containers
            .iter()
            .enumerate()
            .map(|(i, name)| {
                let mut c = json!({
                    "containerArn": format!("{}/{name}", self.arn.replace(":task/", ":container/")),
                    "taskArn": self.arn,
                    "name": name,
                    "image": format!("{name}:latest"),
                    "lastStatus": self.container_status(),
                    "networkInterfaces": [],
                    "healthStatus": "UNKNOWN",
                    "cpu": "0",
                });
                if i == 0 {
                    if let Some(code) = self.exit_code {
                        c["exitCode"] = json!(code);
                    }
                    if self.stop_code.as_deref() == Some("TaskFailedToStart") {
                        c["reason"] = json!(self.stopped_reason);
                    }
                }
                c
            })
            .collect();
        let mut task = json!({
            "taskArn": self.arn,
            "clusterArn": cluster_arn(region, &self.account(), &self.cluster),
            "taskDefinitionArn": self.task_definition_arn,
            "lastStatus": self.last_status,
            "desiredStatus": self.desired_status,
            "cpu": self.cpu,
            "memory": self.memory,
            "containers": containers,
            "overrides": self.overrides,
            "createdAt": epoch(self.created_at),
            "version": self.version,
            "group": format!("family:{}", family_of(&self.task_definition_arn)),
            "availabilityZone": format!("{region}a"),
            "platformVersion": "1.4.0",
            "platformFamily": "Linux",
            "capacityProviderName": self.capacity_provider,
            "connectivity": "CONNECTED",
            "healthStatus": "UNKNOWN",
            "enableExecuteCommand": false,
            "attachments": [],
            "attributes": [{"name": "ecs.cpu-architecture", "value": "x86_64"}],
        });
        let fields: [(&str, Option<Value>); 9] = [
            ("launchType", self.launch_type.clone().map(Value::from)),
            ("startedBy", self.started_by.clone().map(Value::from)),
            ("startedAt", self.started_at.map(epoch)),
            ("pullStartedAt", self.started_at.map(epoch)),
            ("pullStoppedAt", self.started_at.map(epoch)),
            ("stoppingAt", self.stopping_at.map(epoch)),
            ("stoppedAt", self.stopped_at.map(epoch)),
            ("executionStoppedAt", self.stopped_at.map(epoch)),
            ("stopCode", self.stop_code.clone().map(Value::from)),
        ];
        for (name, value) in fields {
            if let Some(value) = value {
                task[name] = value;
            }
        }
        if let Some(reason) = &self.stopped_reason {
            task["stoppedReason"] = json!(reason);
        }
        if include_tags {
            task["tags"] = Value::Array(
                self.tags
                    .iter()
                    .map(|(k, v)| json!({"key": k, "value": v}))
                    .collect(),
            );
        }
        task
    }

    fn account(&self) -> String {
        self.arn.split(':').nth(4).unwrap_or_default().to_owned()
    }
}

/// A handle on a running fake ECS API. Clones share the same server and state; the server stops
/// when the last handle is dropped.
#[derive(Debug, Clone)]
pub struct FakeEcs {
    server: FakeServer<Shared>,
}

#[derive(Debug)]
struct Shared {
    config: FakeEcsConfig,
    validator: BotocoreValidator,
    core: FakeCore<EcsOp, EcsCall, EcsFault>,
    state: Mutex<EcsState>,
}

#[derive(Debug, Default)]
struct EcsState {
    tasks: Vec<TaskRecord>,
    /// `clientToken` → (the request it came with, the tasks it started).
    tokens: HashMap<String, (Value, Vec<String>)>,
    never_start: bool,
    fail_start: Option<String>,
}

#[derive(Debug)]
struct TaskRecord {
    task: FakeTask,
    /// Bumped by every external transition (stop, exit) so that timers started before it give up.
    epoch: u64,
}

fn ecs_error(status: u16, kind: &str, message: impl Into<String>) -> Reply {
    Reply::json(status, json!({"__type": kind, "message": message.into()}))
}

fn invalid(message: impl Into<String>) -> Reply {
    ecs_error(400, "InvalidParameterException", message)
}

/// The error body that goes with an HTTP status (for [`EcsFault::Http`]).
fn error_for_status(status: u16) -> Value {
    let kind = match status {
        429 => "ThrottlingException",
        503 => "ServiceUnavailableException",
        s if s >= 500 => "ServerException",
        _ => "ClientException",
    };
    json!({"__type": kind, "message": faults::reason(status)})
}

/// Gives a response the headers of ECS's AWS JSON 1.1 protocol.
fn aws_json(mut response: Response) -> Response {
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(JSON_11));
    if let Ok(id) = HeaderValue::from_str(&Uuid::new_v4().to_string()) {
        headers.insert("x-amzn-requestid", id);
    }
    response
}

impl FakeEcs {
    /// Starts the fake on a free local port, on the current tokio runtime.
    ///
    /// # Panics
    ///
    /// Panics outside a tokio runtime or if no local port can be bound.
    pub async fn start(config: FakeEcsConfig) -> FakeEcs {
        let shared = Shared {
            config,
            validator: BotocoreValidator::ecs(),
            core: FakeCore::default(),
            state: Mutex::new(EcsState::default()),
        };
        FakeEcs {
            server: FakeServer::start(shared, handle).await,
        }
    }

    /// `http://127.0.0.1:PORT`: the endpoint URL to give the SDK.
    pub fn endpoint_url(&self) -> String {
        self.server.url("")
    }

    /// The address the fake listens on.
    pub fn addr(&self) -> SocketAddr {
        self.server.addr()
    }

    /// The fake's configuration.
    pub fn config(&self) -> &FakeEcsConfig {
        &self.server.config
    }

    /// Every task ever started (stopped ones included), oldest first.
    pub fn tasks(&self) -> Vec<FakeTask> {
        self.server
            .lock()
            .tasks
            .iter()
            .map(|r| r.task.clone())
            .collect()
    }

    /// One task by ARN or id.
    pub fn task(&self, arn: &str) -> Option<FakeTask> {
        let state = self.server.lock();
        state
            .tasks
            .iter()
            .find(|r| r.task.arn == arn || r.task.id() == arn)
            .map(|r| r.task.clone())
    }

    /// The bot of task `arn` exits with `exit_code`: a `RUNNING` task is stopped with
    /// `EssentialContainerExited` and drains to `STOPPED` (tags kept). Returns whether it ran.
    pub fn exit_task(&self, arn: &str, exit_code: i32) -> bool {
        self.server.exit(arn, exit_code, None)
    }

    /// Every request answered so far, oldest first.
    pub fn calls(&self) -> Vec<EcsCall> {
        self.server.core.calls()
    }

    /// The bodies of the answered requests of `op`, oldest first.
    pub fn bodies(&self, op: EcsOp) -> Vec<Value> {
        self.calls()
            .into_iter()
            .filter(|c| c.op == op.name())
            .filter_map(|c| c.body)
            .collect()
    }

    /// Every model violation seen so far (each was answered 400).
    pub fn spec_violations(&self) -> Vec<String> {
        self.server.core.violations()
    }

    /// While on, tasks started from now on stay `PENDING` (until stopped).
    pub fn set_never_start(&self, never: bool) {
        self.server.lock().never_start = never;
    }

    /// While set, tasks started from now on stop after `PENDING` with `TaskFailedToStart` and
    /// this `stoppedReason` (e.g. `CannotPullContainerError: ...`).
    pub fn set_fail_start(&self, reason: Option<String>) {
        self.server.lock().fail_start = reason;
    }

    /// Arms `fault` for the next `count` requests of `op` (after any fault already armed for it).
    pub fn set_fault(&self, op: EcsOp, fault: impl Into<EcsFault>, count: u32) {
        self.server.core.set_fault(op, fault.into(), count);
    }

    /// Disarms every fault.
    pub fn clear_faults(&self) {
        self.server.core.clear_faults();
    }
}

async fn handle(State(shared): State<Arc<Shared>>, request: Request) -> Response {
    let target = request.header("x-amz-target").unwrap_or_default();
    let op_name = target
        .strip_prefix(TARGET_PREFIX)
        .unwrap_or_default()
        .to_owned();
    // Unlike the REST fakes', an empty body is not valid here: AWS JSON sends at least `{}`.
    let body = serde_json::from_slice::<Value>(&request.body);
    let reply = match &body {
        Ok(json) => shared.process(&request, target, &op_name, json).await,
        Err(e) => {
            let message = format!("{op_name}: request body is not valid JSON: {e}");
            shared.core.violation(message.clone());
            ecs_error(400, "SerializationException", message)
        }
    };
    shared.core.record(EcsCall {
        op: op_name,
        body: body.ok(),
        status: reply.status(),
    });
    aws_json(request.respond(reply))
}

fn epoch(at: DateTime<Utc>) -> Value {
    json!(at.timestamp_millis() as f64 / 1000.0)
}

fn cluster_arn(region: &str, account: &str, name: &str) -> String {
    format!("arn:aws:ecs:{region}:{account}:cluster/{name}")
}

/// `family` of a task definition reference (`family`, `family:rev` or ARN).
fn family_of(reference: &str) -> &str {
    let tail = reference
        .rsplit_once(":task-definition/")
        .map_or(reference, |(_, t)| t);
    tail.split(':').next().unwrap_or_default()
}

/// Fargate's valid task sizes (Linux): CPU units → memory sizes (MiB).
fn fargate_memory_ok(cpu: u32, memory: u32) -> bool {
    let within = |from: u32, to: u32, step: u32| {
        (from..=to).contains(&memory) && (memory - from) % step == 0
    };
    match cpu {
        256 => matches!(memory, 512 | 1024 | 2048),
        512 => within(1024, 4096, 1024),
        1024 => within(2048, 8192, 1024),
        2048 => within(4096, 16384, 1024),
        4096 => within(8192, 30720, 1024),
        8192 => within(16384, 61440, 4096),
        16384 => within(32768, 122_880, 8192),
        _ => false,
    }
}

fn str_field<'a>(body: &'a Value, key: &str) -> Option<&'a str> {
    body.get(key).and_then(Value::as_str)
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, EcsState> {
        server::lock(&self.state)
    }

    fn violation(&self, message: String) -> Reply {
        self.core.violation(message.clone());
        invalid(message)
    }

    async fn process(
        self: &Arc<Self>,
        request: &Request,
        target: &str,
        op_name: &str,
        body: &Value,
    ) -> Reply {
        let (method, path) = (&request.method, &request.path);
        if method != Method::POST || path != "/" {
            return self.violation(format!("{method} {path}: ECS takes POST / only"));
        }
        if !target.starts_with(TARGET_PREFIX) {
            return self.violation(format!(
                "X-Amz-Target {target:?} does not start with {TARGET_PREFIX}"
            ));
        }
        let content_type = request.header(header::CONTENT_TYPE).unwrap_or_default();
        if content_type != JSON_11 {
            return self.violation(format!(
                "{op_name}: Content-Type is {content_type:?}, not {JSON_11}"
            ));
        }
        if let Err(violation) = self.validator.validate(op_name, body) {
            return self.violation(violation);
        }
        if let Err(answer) = self.authenticate(request) {
            return answer;
        }
        let Some(op) = EcsOp::from_name(op_name) else {
            return ecs_error(
                501,
                "NotImplemented",
                format!("{op_name} is not implemented by FakeEcs"),
            );
        };

        let http_fault = match self.core.next_fault(op) {
            None => None,
            Some(EcsFault::Http(fault)) => Some(fault),
            Some(EcsFault::Error {
                status,
                kind,
                message,
            }) => return ecs_error(status, &kind, message),
            Some(EcsFault::RunTaskFailure { reason, detail }) if op == EcsOp::RunTask => {
                let mut failure = json!({"reason": reason});
                if let Some(detail) = detail {
                    failure["detail"] = json!(detail);
                }
                return Reply::json(200, json!({"tasks": [], "failures": [failure]}));
            }
            Some(EcsFault::RunTaskFailure { .. }) => None,
        };
        faults::answer(
            http_fault,
            || async { self.execute(op, body) },
            error_for_status,
        )
        .await
    }

    /// Checks the SigV4 `Authorization` header's shape and credential scope (not the signature).
    fn authenticate(&self, request: &Request) -> Result<(), Reply> {
        let auth = request.header(header::AUTHORIZATION).unwrap_or_default();
        let scope = auth
            .strip_prefix("AWS4-HMAC-SHA256 Credential=")
            .and_then(|rest| rest.split(',').next())
            .unwrap_or_default();
        let parts: Vec<&str> = scope.split('/').collect();
        let signed = auth.contains("SignedHeaders=") && auth.contains("Signature=");
        let dated = request.headers.contains_key("x-amz-date");
        let config = &self.config;
        match parts.as_slice() {
            [key, _date, region, "ecs", "aws4_request"] if signed && dated => {
                if *key != config.access_key_id {
                    Err(ecs_error(
                        400,
                        "UnrecognizedClientException",
                        "The security token included in the request is invalid.",
                    ))
                } else if *region != config.region {
                    Err(ecs_error(
                        400,
                        "InvalidSignatureException",
                        format!("Credential should be scoped to a valid region, not '{region}'."),
                    ))
                } else {
                    Ok(())
                }
            }
            _ => Err(ecs_error(
                400,
                "MissingAuthenticationTokenException",
                "Missing Authentication Token",
            )),
        }
    }

    fn execute(self: &Arc<Self>, op: EcsOp, body: &Value) -> Reply {
        match op {
            EcsOp::RunTask => self.run_task(body),
            EcsOp::DescribeTasks => self.describe_tasks(body),
            EcsOp::StopTask => self.stop_task(body),
            EcsOp::ListTasks => self.list_tasks(body),
            EcsOp::DescribeClusters => self.describe_clusters(body),
            EcsOp::TagResource => self.tag_resource(body),
        }
    }

    /// The cluster name a request's `cluster` (name or ARN, default `default`) refers to.
    fn cluster(&self, body: &Value) -> Result<String, Reply> {
        let reference = str_field(body, "cluster").unwrap_or("default");
        let name = reference
            .rsplit_once(":cluster/")
            .map_or(reference, |(_, name)| name);
        if self.config.clusters.iter().any(|c| c == name) {
            Ok(name.to_owned())
        } else {
            Err(ecs_error(
                400,
                "ClusterNotFoundException",
                "Cluster not found.",
            ))
        }
    }

    fn task_definition(&self, reference: &str) -> Option<&FakeTaskDefinition> {
        let tail = reference
            .rsplit_once(":task-definition/")
            .map_or(reference, |(_, t)| t);
        let (family, revision) = match tail.split_once(':') {
            Some((family, revision)) => (family, Some(revision.parse::<u32>().ok()?)),
            None => (tail, None),
        };
        self.config
            .task_definitions
            .iter()
            .filter(|td| td.family == family && revision.is_none_or(|r| r == td.revision))
            .max_by_key(|td| td.revision)
    }

    fn run_task(self: &Arc<Self>, body: &Value) -> Reply {
        let cluster = match self.cluster(body) {
            Ok(c) => c,
            Err(answer) => return answer,
        };
        let token = str_field(body, "clientToken").map(str::to_owned);
        if let Some(token) = &token {
            if token.is_empty()
                || token.chars().count() > 64
                || !token.bytes().all(|b| (33..=126).contains(&b))
            {
                return invalid("clientToken must be 1 to 64 characters in the range 33-126.");
            }
            let state = self.lock();
            if let Some((request, arns)) = state.tokens.get(token) {
                if request != body {
                    return Reply::Json {
                        status: 400,
                        body: json!({
                            "__type": "ConflictException",
                            "message": "The specified client token has already been used in a different request.",
                            "resourceIds": arns,
                        }),
                        retry_after: None,
                    };
                }
                let tasks: Vec<Value> = state
                    .tasks
                    .iter()
                    .filter(|r| arns.contains(&r.task.arn))
                    .map(|r| r.task.to_json(&self.config.region, true))
                    .collect();
                return Reply::json(200, json!({"tasks": tasks, "failures": []}));
            }
        }
        let run = match self.check_run_task(body) {
            Ok(run) => run,
            Err(answer) => return answer,
        };

        let count = body.get("count").and_then(Value::as_u64).unwrap_or(1);
        let now = Utc::now();
        let mut arns = Vec::new();
        let mut answers = Vec::new();
        {
            let mut state = self.lock();
            for _ in 0..count {
                let arn = format!(
                    "arn:aws:ecs:{}:{}:task/{cluster}/{}",
                    self.config.region,
                    self.config.account_id,
                    super::random_string(super::LOWER_HEX, 32)
                );
                let task = FakeTask {
                    arn: arn.clone(),
                    cluster: cluster.clone(),
                    task_definition_arn: run.task_definition_arn.clone(),
                    containers: run.containers.clone(),
                    last_status: "PROVISIONING".to_owned(),
                    desired_status: "RUNNING".to_owned(),
                    started_by: str_field(body, "startedBy").map(str::to_owned),
                    tags: run.tags.clone(),
                    client_token: token.clone(),
                    launch_type: run.launch_type.clone(),
                    capacity_provider: run.capacity_provider.clone(),
                    cpu: run.cpu.clone(),
                    memory: run.memory.clone(),
                    overrides: body.get("overrides").cloned().unwrap_or_else(|| json!({})),
                    stop_code: None,
                    stopped_reason: None,
                    exit_code: None,
                    created_at: now,
                    started_at: None,
                    stopping_at: None,
                    stopped_at: None,
                    version: 1,
                };
                answers.push(task.to_json(&self.config.region, true));
                state.tasks.push(TaskRecord { task, epoch: 0 });
                let plan = (state.never_start, state.fail_start.clone());
                tokio::spawn(self.clone().boot(arn.clone(), plan.0, plan.1));
                arns.push(arn);
            }
            if let Some(token) = token {
                state.tokens.insert(token, (body.clone(), arns));
            }
        }
        Reply::json(200, json!({"tasks": answers, "failures": []}))
    }

    /// The checks ECS makes on a `RunTask` beyond the model's shapes.
    fn check_run_task(&self, body: &Value) -> Result<RunPlan, Reply> {
        let reference = str_field(body, "taskDefinition").unwrap_or_default();
        let td = self.task_definition(reference).ok_or_else(|| {
            ecs_error(
                400,
                "ClientException",
                "Unable to describe task definition.",
            )
        })?;
        let count = body.get("count").and_then(Value::as_i64).unwrap_or(1);
        if !(1..=10).contains(&count) {
            return Err(invalid("count must be between 1 and 10."));
        }
        let launch_type = str_field(body, "launchType");
        let strategy = body
            .get("capacityProviderStrategy")
            .and_then(Value::as_array);
        let capacity_provider = match (launch_type, strategy) {
            (Some(_), Some(_)) => {
                return Err(invalid(
                    "Specifying both a launch type and capacity provider strategy is not supported. Remove one and try again.",
                ))
            }
            (Some("FARGATE"), None) => "FARGATE".to_owned(),
            (None, Some(items)) => {
                let names: Vec<&str> = items
                    .iter()
                    .filter_map(|i| str_field(i, "capacityProvider"))
                    .collect();
                match names.as_slice() {
                    [one] if matches!(*one, "FARGATE" | "FARGATE_SPOT") => (*one).to_owned(),
                    _ => {
                        return Err(invalid(format!(
                            "The fake runs one FARGATE or FARGATE_SPOT capacity provider, not {names:?}."
                        )))
                    }
                }
            }
            _ => {
                return Err(invalid(
                    "The fake runs Fargate tasks only: set launchType FARGATE or a FARGATE/FARGATE_SPOT capacity provider strategy.",
                ))
            }
        };
        let vpc = body.pointer("/networkConfiguration/awsvpcConfiguration");
        let subnets = vpc
            .and_then(|v| v.get("subnets"))
            .and_then(Value::as_array)
            .map_or(0, Vec::len);
        if vpc.is_none() {
            return Err(invalid(
                "Network Configuration must be provided when networkMode 'awsvpc' is specified.",
            ));
        }
        if !(1..=16).contains(&subnets) {
            return Err(invalid("subnets can have at most 16 items and at least 1."));
        }
        let groups = vpc
            .and_then(|v| v.get("securityGroups"))
            .and_then(Value::as_array)
            .map_or(0, Vec::len);
        if groups > 5 {
            return Err(invalid("securityGroups can have at most 5 items."));
        }
        if let Some(started_by) = str_field(body, "startedBy") {
            let valid = started_by.len() <= 128
                && started_by
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'/'));
            if !valid {
                return Err(invalid(
                    "startedBy may have up to 128 letters, numbers, hyphens, forward slashes and underscores.",
                ));
            }
        }
        let mut tags = Vec::new();
        for tag in body
            .get("tags")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            let key = str_field(tag, "key").unwrap_or_default();
            let value = str_field(tag, "value").unwrap_or_default();
            let reserved = |s: &str| s.get(..4).is_some_and(|p| p.eq_ignore_ascii_case("aws:"));
            if reserved(key) || reserved(value) {
                return Err(invalid("Tag keys and values may not start with 'aws:'."));
            }
            if tags.iter().any(|(k, _): &(String, String)| k == key) {
                return Err(invalid(format!("Duplicate tag key {key:?}.")));
            }
            tags.push((key.to_owned(), value.to_owned()));
        }
        let overrides = body.get("overrides");
        for container in overrides
            .and_then(|o| o.get("containerOverrides"))
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            let name = str_field(container, "name").unwrap_or_default();
            if !td.containers.iter().any(|c| c == name) {
                return Err(invalid(format!(
                    "Override for container named {name} is not a container in the TaskDefinition."
                )));
            }
        }
        let cpu = overrides
            .and_then(|o| str_field(o, "cpu"))
            .unwrap_or(&td.cpu)
            .to_owned();
        let memory = overrides
            .and_then(|o| str_field(o, "memory"))
            .unwrap_or(&td.memory)
            .to_owned();
        let valid_size = match (cpu.parse::<u32>(), memory.parse::<u32>()) {
            (Ok(c), Ok(m)) => fargate_memory_ok(c, m),
            _ => false,
        };
        if !valid_size {
            return Err(ecs_error(
                400,
                "ClientException",
                format!("No Fargate configuration exists for given values: {cpu} CPU, {memory} memory. See the Amazon ECS documentation for the valid values."),
            ));
        }
        Ok(RunPlan {
            task_definition_arn: format!(
                "arn:aws:ecs:{}:{}:task-definition/{}:{}",
                self.config.region, self.config.account_id, td.family, td.revision
            ),
            containers: td.containers.clone(),
            launch_type: launch_type.map(str::to_owned),
            capacity_provider,
            cpu,
            memory,
            tags,
        })
    }

    /// Background lifecycle of a started task: PROVISIONING → PENDING → RUNNING (→ bot exits).
    async fn boot(self: Arc<Self>, arn: String, never_start: bool, fail_start: Option<String>) {
        tokio::time::sleep(self.config.provisioning_for).await;
        if !self.advance(&arn, "PROVISIONING", "PENDING") || never_start {
            return;
        }
        tokio::time::sleep(self.config.pending_for).await;
        if let Some(reason) = fail_start {
            let stop = {
                let mut state = self.lock();
                state
                    .tasks
                    .iter_mut()
                    .find(|r| r.task.arn == arn && r.epoch == 0 && r.task.last_status == "PENDING")
                    .map(|record| begin_stop(record, "TaskFailedToStart", &reason, None, false))
            };
            if let Some(epoch) = stop {
                self.finish_stop(arn, epoch).await;
            }
            return;
        }
        if !self.advance(&arn, "PENDING", "RUNNING") {
            return;
        }
        if let Some(lifetime) = self.config.bot_lifetime {
            tokio::time::sleep(lifetime).await;
            self.exit(&arn, 0, Some(0));
        }
    }

    /// Moves task `arn` from `from` to `to` if nothing else touched it since it started.
    fn advance(&self, arn: &str, from: &str, to: &str) -> bool {
        let mut state = self.lock();
        let Some(record) = state.tasks.iter_mut().find(|r| r.task.arn == arn) else {
            return false;
        };
        if record.epoch != 0 || record.task.last_status != from {
            return false;
        }
        record.task.last_status = to.to_owned();
        record.task.version += 1;
        if to == "RUNNING" {
            record.task.started_at = Some(Utc::now());
        }
        true
    }

    /// The essential container exits; see [`FakeEcs::exit_task`].
    fn exit(self: &Arc<Self>, arn: &str, exit_code: i32, epoch: Option<u64>) -> bool {
        let stop = {
            let mut state = self.lock();
            state
                .tasks
                .iter_mut()
                .find(|r| {
                    (r.task.arn == arn || r.task.id() == arn)
                        && epoch.is_none_or(|e| e == r.epoch)
                        && r.task.last_status == "RUNNING"
                        && r.task.desired_status == "RUNNING"
                })
                .map(|record| {
                    let epoch = begin_stop(
                        record,
                        "EssentialContainerExited",
                        "Essential container in task exited",
                        Some(exit_code),
                        false,
                    );
                    (record.task.arn.clone(), epoch)
                })
        };
        match stop {
            Some((arn, epoch)) => {
                tokio::spawn(self.clone().finish_stop(arn, epoch));
                true
            }
            None => false,
        }
    }

    /// Drains a stopping task to `STOPPED` unless something else touched it meanwhile.
    async fn finish_stop(self: Arc<Self>, arn: String, epoch: u64) {
        let half = self.config.stop_delay / 2;
        tokio::time::sleep(half).await;
        {
            let mut state = self.lock();
            let Some(record) = state.tasks.iter_mut().find(|r| r.task.arn == arn) else {
                return;
            };
            if record.epoch != epoch {
                return;
            }
            if record.task.last_status == "DEACTIVATING" {
                record.task.last_status = "STOPPING".to_owned();
                record.task.version += 1;
            }
        }
        tokio::time::sleep(self.config.stop_delay.saturating_sub(half)).await;
        let mut state = self.lock();
        let Some(record) = state.tasks.iter_mut().find(|r| r.task.arn == arn) else {
            return;
        };
        if record.epoch != epoch {
            return;
        }
        let task = &mut record.task;
        task.last_status = "STOPPED".to_owned();
        task.stopped_at = Some(Utc::now());
        if task.exit_code.is_none() && task.started_at.is_some() {
            // The bot handled SIGTERM.
            task.exit_code = Some(0);
        }
        task.version += 1;
    }

    fn find_task<'a>(
        state: &'a mut EcsState,
        cluster: &str,
        reference: &str,
    ) -> Option<&'a mut TaskRecord> {
        state.tasks.iter_mut().find(|r| {
            r.task.cluster == cluster && (r.task.arn == reference || r.task.id() == reference)
        })
    }

    fn describe_tasks(&self, body: &Value) -> Reply {
        let cluster = match self.cluster(body) {
            Ok(c) => c,
            Err(answer) => return answer,
        };
        let wanted: Vec<&str> = body
            .get("tasks")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .filter_map(Value::as_str)
            .collect();
        if wanted.is_empty() {
            return invalid("Tasks cannot be empty.");
        }
        if wanted.len() > 100 {
            return invalid("Tasks can have at most 100 items.");
        }
        let include_tags = body
            .get("include")
            .and_then(Value::as_array)
            .is_some_and(|i| i.iter().any(|f| f == "TAGS"));
        let mut state = self.lock();
        let mut tasks = Vec::new();
        let mut failures = Vec::new();
        for reference in wanted {
            match Self::find_task(&mut state, &cluster, reference) {
                Some(record) => tasks.push(record.task.to_json(&self.config.region, include_tags)),
                None => failures.push(json!({"arn": reference, "reason": "MISSING"})),
            }
        }
        Reply::json(200, json!({"tasks": tasks, "failures": failures}))
    }

    fn stop_task(self: &Arc<Self>, body: &Value) -> Reply {
        let cluster = match self.cluster(body) {
            Ok(c) => c,
            Err(answer) => return answer,
        };
        let reference = str_field(body, "task").unwrap_or_default();
        let reason = str_field(body, "reason").unwrap_or("Task stopped by user");
        let (snapshot, stop) = {
            let mut state = self.lock();
            let Some(record) = Self::find_task(&mut state, &cluster, reference) else {
                return invalid("The referenced task was not found.");
            };
            let stop = (record.task.desired_status != "STOPPED")
                .then(|| begin_stop(record, "UserInitiated", reason, None, true));
            (
                record.task.to_json(&self.config.region, false),
                stop.map(|e| (record.task.arn.clone(), e)),
            )
        };
        if let Some((arn, epoch)) = stop {
            tokio::spawn(self.clone().finish_stop(arn, epoch));
        }
        Reply::json(200, json!({"task": snapshot}))
    }

    fn list_tasks(&self, body: &Value) -> Reply {
        let cluster = match self.cluster(body) {
            Ok(c) => c,
            Err(answer) => return answer,
        };
        let started_by = str_field(body, "startedBy");
        let others = [
            "family",
            "containerInstance",
            "serviceName",
            "launchType",
            "desiredStatus",
            "daemonName",
        ];
        if started_by.is_some() {
            if let Some(other) = others.iter().find(|k| body.get(**k).is_some()) {
                return invalid(format!(
                    "startedBy must be the only filter of ListTasks, not combined with {other}."
                ));
            }
        }
        let desired = str_field(body, "desiredStatus").unwrap_or("RUNNING");
        let page = match body.get("maxResults").and_then(Value::as_i64) {
            None => 100,
            Some(n @ 1..=100) => n as usize,
            Some(_) => return invalid("maxResults must be between 1 and 100."),
        }
        .min(self.config.max_page_size.max(1));
        let offset = match str_field(body, "nextToken") {
            None => 0,
            Some(token) => match token
                .strip_prefix("fake-ecs-page-")
                .and_then(|n| n.parse::<usize>().ok())
            {
                Some(n) => n,
                None => return invalid("Invalid nextToken."),
            },
        };
        let family = str_field(body, "family");
        let launch_type = str_field(body, "launchType");
        let state = self.lock();
        let arns: Vec<&str> = state
            .tasks
            .iter()
            .map(|r| &r.task)
            .filter(|t| t.cluster == cluster && t.desired_status == desired)
            .filter(|t| started_by.is_none_or(|s| t.started_by.as_deref() == Some(s)))
            .filter(|t| family.is_none_or(|f| family_of(&t.task_definition_arn) == f))
            .filter(|t| launch_type.is_none_or(|l| t.launch_type.as_deref() == Some(l)))
            .map(|t| t.arn.as_str())
            .collect();
        let end = (offset + page).min(arns.len());
        let mut answer = json!({"taskArns": arns.get(offset..end).unwrap_or_default()});
        if end < arns.len() {
            answer["nextToken"] = json!(format!("fake-ecs-page-{end}"));
        }
        Reply::json(200, answer)
    }

    /// `TagResource` on a task (the only resource the fake tags): adds or overwrites tags.
    fn tag_resource(&self, body: &Value) -> Reply {
        let arn = str_field(body, "resourceArn").unwrap_or_default();
        let new: Vec<(String, String)> = body
            .get("tags")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .map(|t| {
                let field = |k| str_field(t, k).unwrap_or_default().to_owned();
                (field("key"), field("value"))
            })
            .collect();
        let reserved = |s: &str| s.get(..4).is_some_and(|p| p.eq_ignore_ascii_case("aws:"));
        if new.iter().any(|(k, v)| reserved(k) || reserved(v)) {
            return invalid("Tag keys and values may not start with 'aws:'.");
        }
        let mut state = self.lock();
        let Some(record) = state.tasks.iter_mut().find(|r| r.task.arn == arn) else {
            return ecs_error(
                400,
                "ResourceNotFoundException",
                "The specified resource could not be found.",
            );
        };
        if record.task.last_status == "STOPPED" {
            return invalid("The specified task is stopped.");
        }
        let mut tags = record.task.tags.clone();
        for (key, value) in new {
            match tags.iter_mut().find(|(k, _)| *k == key) {
                Some(existing) => existing.1 = value,
                None => tags.push((key, value)),
            }
        }
        if tags.len() > 50 {
            return invalid("A resource can have at most 50 tags.");
        }
        record.task.tags = tags;
        Reply::json(200, json!({}))
    }

    fn describe_clusters(&self, body: &Value) -> Reply {
        let names: Vec<&str> = match body.get("clusters").and_then(Value::as_array) {
            Some(list) => list.iter().filter_map(Value::as_str).collect(),
            None => vec!["default"],
        };
        if names.len() > 100 {
            return invalid("clusters can have at most 100 items.");
        }
        let (region, account) = (&self.config.region, &self.config.account_id);
        let state = self.lock();
        let mut clusters = Vec::new();
        let mut failures = Vec::new();
        for reference in names {
            let name = reference
                .rsplit_once(":cluster/")
                .map_or(reference, |(_, name)| name);
            if !self.config.clusters.iter().any(|c| c == name) {
                failures
                    .push(json!({"arn": cluster_arn(region, account, name), "reason": "MISSING"}));
                continue;
            }
            let count = |status: &str| {
                state
                    .tasks
                    .iter()
                    .filter(|r| r.task.cluster == name && r.task.last_status == status)
                    .count()
            };
            clusters.push(json!({
                "clusterArn": cluster_arn(region, account, name),
                "clusterName": name,
                "status": "ACTIVE",
                "registeredContainerInstancesCount": 0,
                "runningTasksCount": count("RUNNING"),
                "pendingTasksCount": count("PENDING") + count("PROVISIONING"),
                "activeServicesCount": 0,
                "capacityProviders": ["FARGATE", "FARGATE_SPOT"],
                "statistics": [],
                "tags": [],
                "settings": [{"name": "containerInsights", "value": "disabled"}],
            }));
        }
        Reply::json(200, json!({"clusters": clusters, "failures": failures}))
    }
}

/// What a valid `RunTask` starts.
struct RunPlan {
    task_definition_arn: String,
    containers: Vec<String>,
    launch_type: Option<String>,
    capacity_provider: String,
    cpu: String,
    memory: String,
    tags: Vec<(String, String)>,
}

/// Marks a task as wanted stopped and starts its drain; returns its new epoch.
fn begin_stop(
    record: &mut TaskRecord,
    code: &str,
    reason: &str,
    exit_code: Option<i32>,
    delete_tags: bool,
) -> u64 {
    let task = &mut record.task;
    task.desired_status = "STOPPED".to_owned();
    task.stop_code = Some(code.to_owned());
    task.stopped_reason = Some(reason.to_owned());
    task.stopping_at = Some(Utc::now());
    task.exit_code = exit_code;
    task.last_status = if task.last_status == "RUNNING" {
        "DEACTIVATING".to_owned()
    } else {
        "DEPROVISIONING".to_owned()
    };
    if delete_tags {
        // "Any tags associated with the task will be deleted." (StopTask API reference)
        task.tags.clear();
    }
    task.version += 1;
    record.epoch += 1;
    record.epoch
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fargate_sizes_follow_the_table() {
        assert!(fargate_memory_ok(1024, 2048));
        assert!(!fargate_memory_ok(1024, 1024));
        assert!(fargate_memory_ok(256, 512));
        assert!(!fargate_memory_ok(256, 1536));
        assert!(fargate_memory_ok(8192, 20480));
        assert!(!fargate_memory_ok(8192, 18432));
        assert!(!fargate_memory_ok(3000, 8192));
        assert_eq!(
            family_of("arn:aws:ecs:us-east-1:1:task-definition/bot:3"),
            "bot"
        );
        assert_eq!(family_of("bot:3"), "bot");
    }
}
