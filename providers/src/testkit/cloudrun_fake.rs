//! Stateful fake of the Cloud Run Admin API v2, with a fake GCE metadata server and a fake Google
//! OAuth token endpoint on the same port: an axum server on `127.0.0.1:0` whose executions go
//! from pending to running on a timer, finish when their "bot exits", and are cancelled on
//! request. Requests and the fake's own answers are checked against the published discovery
//! document (`specs/cloudrun-v2-discovery.json`) by [`DiscoveryValidator`].
//!
//! Routes (everything the `cloudrun` provider calls):
//! * `GET  /v2/projects/{p}/locations/{r}/jobs/{job}`
//! * `POST /v2/projects/{p}/locations/{r}/jobs/{job}:run` → Operation (metadata: the Execution)
//! * `GET  /v2/projects/{p}/locations/{r}/jobs/{job|-}/executions` (pageSize, pageToken)
//! * `GET  /v2/{execution}` and `POST /v2/{execution}:cancel` → Operation
//! * `GET  /computeMetadata/v1/instance/service-accounts/default/token` (`Metadata-Flavor: Google`)
//! * `POST /token`: the OAuth JWT-bearer grant; the RS256 assertion is verified against the
//!   configured public key, with its `kid`, `iss`, `aud` (this endpoint's URL), `scope` and a
//!   lifetime of at most an hour.
//!
//! Order of checks for API requests: discovery validation (violations are recorded and answered
//! 400 `INVALID_ARGUMENT`), bearer token (401 `UNAUTHENTICATED`; the static token of the config,
//! or one minted here and not expired), implemented route (501), project and region (403), job
//! (404), a one-shot run outcome or armed [`Fault`], then the operation itself.
//!
//! Answers follow proto3 JSON: zero counts, `false` and empty lists are left out, as Google does.
//! Not modelled: tasks and their retries, task timeouts, more than one task per execution,
//! `validateOnly`, deletion, IAM.

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::Duration;

use axum::extract::State;
use axum::http::{header, Method};
use axum::response::Response;
use chrono::{DateTime, SecondsFormat, Utc};
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use rand::distr::{Alphanumeric, SampleString};
use serde::Deserialize;
use serde_json::{json, Map, Value};
use tokio::time::Instant;
use uuid::Uuid;

use super::faults::{self, FakeCore};
use super::server::{self, FakeServer, Reply, Request};
use super::validate::discovery::{parse_duration, EXECUTION_TYPE};
use super::{Fault, RecordedRequest};

// The validator and its document live in `validate/`; re-exported where they used to be.
pub use super::validate::discovery::{DiscoveryValidator, CLOUD_RUN_DISCOVERY};

const CLOUD_PLATFORM: &str = "https://www.googleapis.com/auth/cloud-platform";
const JWT_BEARER: &str = "urn:ietf:params:oauth:grant-type:jwt-bearer";
/// Env names Cloud Run sets in job containers itself and refuses in overrides.
const RESERVED_ENV: [&str; 5] = [
    "CLOUD_RUN_JOB",
    "CLOUD_RUN_EXECUTION",
    "CLOUD_RUN_TASK_INDEX",
    "CLOUD_RUN_TASK_ATTEMPT",
    "CLOUD_RUN_TASK_COUNT",
];
/// Cloud Run's limits: an env value of 32 KiB, a task timeout of 24 h.
const MAX_ENV_VALUE_BYTES: usize = 32 * 1024;
const MAX_TIMEOUT_SECS: f64 = 24.0 * 3600.0;

/// Configuration of a [`FakeCloudRun`].
#[derive(Debug, Clone)]
pub struct FakeCloudRunConfig {
    pub project: String,
    pub region: String,
    /// Jobs that exist. Each has one container (image
    /// `us-docker.pkg.dev/{project}/bots/{job}:latest`, env `LOG_LEVEL=info`, no args).
    pub jobs: Vec<String>,
    /// A bearer token always accepted (for `CloudRunAuth::StaticToken`), besides the tokens the
    /// fake's metadata server and OAuth endpoint mint.
    pub static_token: Option<String>,
    /// Lifetime of minted tokens (`expires_in`, whole seconds, at least 1). Expired tokens are
    /// refused with 401.
    pub token_lifetime: Duration,
    /// The service account whose assertions the OAuth endpoint accepts; `None` refuses all.
    pub service_account: Option<FakeServiceAccount>,
    /// Time an execution stays pending before its task runs.
    pub start_delay: Duration,
    /// Time a cancelled execution spends cancelling before it completes.
    pub cancel_delay: Duration,
    /// If set, the bot exits by itself (code 0) this long after it started running.
    pub bot_lifetime: Option<Duration>,
    /// Most executions per list page (and the page size when the request names none).
    pub max_page_size: usize,
}

impl Default for FakeCloudRunConfig {
    fn default() -> Self {
        Self {
            project: "botdispatch-test".to_owned(),
            region: "europe-west1".to_owned(),
            jobs: vec!["bots".to_owned()],
            static_token: None,
            token_lifetime: Duration::from_secs(3600),
            service_account: None,
            start_delay: Duration::from_millis(50),
            cancel_delay: Duration::from_millis(30),
            bot_lifetime: None,
            max_page_size: 100,
        }
    }
}

/// The service account the fake OAuth endpoint trusts.
#[derive(Debug, Clone)]
pub struct FakeServiceAccount {
    pub client_email: String,
    /// Expected `kid` of assertions (the key file's `private_key_id`).
    pub key_id: String,
    /// The public half of the key, PEM (`-----BEGIN PUBLIC KEY-----`).
    pub public_key_pem: String,
}

/// The operations of [`FakeCloudRun`] faults can be armed for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CloudRunOp {
    /// `POST …/jobs/{job}:run`
    Run,
    /// `GET …/executions/{e}`
    GetExecution,
    /// `GET …/jobs/{job}/executions`
    ListExecutions,
    /// `POST …/executions/{e}:cancel`
    Cancel,
    /// `GET …/jobs/{job}`
    GetJob,
    /// The metadata server's token endpoint.
    MetadataToken,
    /// The OAuth token endpoint.
    OAuthToken,
}

/// A snapshot of one execution of the fake.
#[derive(Debug, Clone, PartialEq)]
pub struct FakeExecution {
    /// `projects/{p}/locations/{r}/jobs/{job}/executions/{job}-xxxxx`
    pub name: String,
    pub job: String,
    /// `PENDING`, `RUNNING`, `SUCCEEDED`, `FAILED`, `CANCELLING` or `CANCELLED`.
    pub state: String,
    /// The container env after the overrides were merged into the job's, in order.
    pub env: Vec<(String, String)>,
    pub args: Vec<String>,
    /// The task timeout (`"600s"`).
    pub timeout: String,
    pub created_at: DateTime<Utc>,
}

/// A handle on a running fake. Clones share the same server and state; the server stops when
/// the last handle is dropped.
#[derive(Debug, Clone)]
pub struct FakeCloudRun {
    server: FakeServer<Shared>,
}

#[derive(Debug)]
struct Shared {
    config: FakeCloudRunConfig,
    validator: &'static DiscoveryValidator,
    core: FakeCore<CloudRunOp>,
    decoding_key: Option<DecodingKey>,
    /// `http://127.0.0.1:PORT/token`, the `aud` assertions must name; set once bound.
    token_uri: OnceLock<String>,
    state: Mutex<RunState>,
}

#[derive(Debug, Default)]
struct RunState {
    executions: Vec<ExecutionRecord>,
    /// Bumped per execution created; orders listings (newest first) and page cursors.
    ordinal: u64,
    tokens: HashMap<String, Instant>,
    metadata_token_requests: usize,
    oauth_token_requests: usize,
    never_start: bool,
    next_runs: VecDeque<RunOutcome>,
}

/// A one-shot answer to the next `:run`.
#[derive(Debug, Clone)]
enum RunOutcome {
    Refuse(String),
    Throttle(Option<Duration>),
    OperationError { code: i32, message: String },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Pending,
    Running,
    Succeeded,
    Failed(i32),
    Cancelling { was_running: bool },
    Cancelled,
}

impl Phase {
    fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "PENDING",
            Self::Running => "RUNNING",
            Self::Succeeded => "SUCCEEDED",
            Self::Failed(_) => "FAILED",
            Self::Cancelling { .. } => "CANCELLING",
            Self::Cancelled => "CANCELLED",
        }
    }

    fn completed(self) -> bool {
        matches!(self, Self::Succeeded | Self::Failed(_) | Self::Cancelled)
    }
}

#[derive(Debug)]
struct ExecutionRecord {
    name: String,
    uid: String,
    job: String,
    ordinal: u64,
    phase: Phase,
    env: Vec<(String, String)>,
    args: Vec<String>,
    timeout: String,
    created_at: DateTime<Utc>,
    updated_at: DateTime<Utc>,
    started_at: Option<DateTime<Utc>>,
    completed_at: Option<DateTime<Utc>>,
    /// Bumped by every external transition (exit, cancel) so that timers started before it
    /// give up.
    epoch: u64,
    never_start: bool,
}

impl ExecutionRecord {
    fn snapshot(&self) -> FakeExecution {
        FakeExecution {
            name: self.name.clone(),
            job: self.job.clone(),
            state: self.phase.as_str().to_owned(),
            env: self.env.clone(),
            args: self.args.clone(),
            timeout: self.timeout.clone(),
            created_at: self.created_at,
        }
    }

    fn id(&self) -> &str {
        self.name.rsplit('/').next().unwrap_or_default()
    }

    /// The execution as `GoogleCloudRunV2Execution` JSON.
    fn to_json(&self, config: &FakeCloudRunConfig) -> Value {
        let mut out = json!({
            "name": self.name,
            "uid": self.uid,
            "generation": "1",
            "observedGeneration": "1",
            "createTime": rfc3339(self.created_at),
            "updateTime": rfc3339(self.updated_at),
            "launchStage": "GA",
            "job": self.job,
            "parallelism": 1,
            "taskCount": 1,
            "template": {
                "containers": [container_json(&job_image(config, &self.job), &self.env, &self.args)],
                "maxRetries": 0,
                "timeout": self.timeout,
                "serviceAccount": format!("bots@{}.iam.gserviceaccount.com", config.project),
            },
            "conditions": self.conditions(),
            "logUri": format!(
                "https://console.cloud.google.com/logs/viewer?project={}&resource=cloud_run_job/job_name/{}",
                config.project, self.job
            ),
            "etag": format!("\"{}\"", self.epoch),
        });
        let mut set = |key: &str, value: Value| out[key] = value;
        if let Some(at) = self.started_at {
            set("startTime", json!(rfc3339(at)));
        }
        if let Some(at) = self.completed_at {
            set("completionTime", json!(rfc3339(at)));
        }
        let counts = match self.phase {
            Phase::Pending => None,
            Phase::Running | Phase::Cancelling { was_running: true } => Some("runningCount"),
            Phase::Cancelling { was_running: false } => None,
            Phase::Succeeded => Some("succeededCount"),
            Phase::Failed(_) => Some("failedCount"),
            Phase::Cancelled => Some("cancelledCount"),
        };
        if let Some(key) = counts {
            set(key, json!(1));
        }
        if !self.phase.completed() {
            set("reconciling", json!(true));
        }
        out
    }

    fn conditions(&self) -> Value {
        let since = |at: Option<DateTime<Utc>>| rfc3339(at.unwrap_or(self.updated_at));
        let condition = |kind: &str, state: &str, at: String| json!({"type": kind, "state": state, "lastTransitionTime": at});
        let mut resources = condition(
            "ResourcesAvailable",
            "CONDITION_SUCCEEDED",
            since(self.started_at),
        );
        let mut started = condition("Started", "CONDITION_SUCCEEDED", since(self.started_at));
        let mut completed = condition("Completed", "CONDITION_RECONCILING", since(None));
        match self.phase {
            Phase::Pending => {
                resources = condition(
                    "ResourcesAvailable",
                    "CONDITION_RECONCILING",
                    since(Some(self.created_at)),
                );
                resources["message"] = json!("Provisioning resources.");
                started = condition("Started", "CONDITION_PENDING", since(Some(self.created_at)));
                completed = condition(
                    "Completed",
                    "CONDITION_PENDING",
                    since(Some(self.created_at)),
                );
            }
            Phase::Running => {}
            Phase::Succeeded => {
                completed = condition("Completed", "CONDITION_SUCCEEDED", since(self.completed_at));
                let secs = match (self.started_at, self.completed_at) {
                    (Some(s), Some(c)) => (c - s).num_milliseconds().max(0) as f64 / 1000.0,
                    _ => 0.0,
                };
                completed["message"] =
                    json!(format!("Execution completed successfully in {secs:.2}s."));
            }
            Phase::Failed(code) => {
                completed = condition("Completed", "CONDITION_FAILED", since(self.completed_at));
                completed["executionReason"] = json!("NON_ZERO_EXIT_CODE");
                completed["severity"] = json!("ERROR");
                completed["message"] = json!(format!(
                    "Task {}-task0 failed with message: The container exited with an error (exit code {code}).",
                    self.id()
                ));
            }
            Phase::Cancelling { was_running } => {
                if !was_running {
                    started =
                        condition("Started", "CONDITION_PENDING", since(Some(self.created_at)));
                }
                completed["executionReason"] = json!("CANCELLING");
                completed["message"] = json!("The execution is being cancelled.");
            }
            Phase::Cancelled => {
                if self.started_at.is_none() {
                    started = condition("Started", "CONDITION_FAILED", since(self.completed_at));
                }
                completed = condition("Completed", "CONDITION_FAILED", since(self.completed_at));
                completed["executionReason"] = json!("CANCELLED");
                completed["message"] = json!("The execution was cancelled.");
            }
        }
        json!([resources, started, completed])
    }
}

fn container_json(image: &str, env: &[(String, String)], args: &[String]) -> Value {
    let env: Vec<Value> = env
        .iter()
        .map(|(name, value)| {
            // proto3 JSON leaves out empty strings.
            if value.is_empty() {
                json!({ "name": name })
            } else {
                json!({ "name": name, "value": value })
            }
        })
        .collect();
    let mut container = json!({
        "name": "bot",
        "image": image,
        "env": env,
        "resources": {"limits": {"cpu": "1", "memory": "1Gi"}},
    });
    if !args.is_empty() {
        container["args"] = json!(args);
    }
    container
}

fn job_image(config: &FakeCloudRunConfig, job: &str) -> String {
    format!("us-docker.pkg.dev/{}/bots/{job}:latest", config.project)
}

fn job_env() -> Vec<(String, String)> {
    vec![("LOG_LEVEL".to_owned(), "info".to_owned())]
}

fn rfc3339(at: DateTime<Utc>) -> String {
    at.to_rfc3339_opts(SecondsFormat::Micros, true)
}

/// Google's canonical code name of an HTTP status, for error bodies.
fn rpc_status(http: u16) -> &'static str {
    match http {
        400 => "INVALID_ARGUMENT",
        401 => "UNAUTHENTICATED",
        403 => "PERMISSION_DENIED",
        404 => "NOT_FOUND",
        409 => "ABORTED",
        412 => "FAILED_PRECONDITION",
        429 => "RESOURCE_EXHAUSTED",
        499 => "CANCELLED",
        500 => "INTERNAL",
        501 => "UNIMPLEMENTED",
        503 => "UNAVAILABLE",
        504 => "DEADLINE_EXCEEDED",
        _ => "UNKNOWN",
    }
}

/// Google's error body: `{"error": {"code", "message", "status"[, "details"]}}`.
fn google_error(http: u16, status: &str, message: impl Into<String>, details: Vec<Value>) -> Reply {
    let mut error = json!({"code": http, "message": message.into(), "status": status});
    if !details.is_empty() {
        error["details"] = Value::Array(details);
    }
    Reply::json(http, json!({ "error": error }))
}

fn error(http: u16, message: impl Into<String>) -> Reply {
    google_error(http, rpc_status(http), message, Vec::new())
}

fn invalid(message: impl Into<String>) -> Reply {
    error(400, message)
}

fn oauth_error(status: u16, error: &str, description: &str) -> Reply {
    Reply::json(
        status,
        json!({"error": error, "error_description": description}),
    )
}

enum Route {
    GetJob(String),
    Run(String),
    List(String),
    GetExecution(String),
    Cancel(String),
}

impl Route {
    /// Parses `v2/projects/{p}/locations/{r}/…`, returning the route with its project and region.
    fn parse(method: &Method, path: &str) -> Option<(Self, String, String)> {
        let segments: Vec<&str> = path.trim_start_matches('/').split('/').collect();
        let ["v2", "projects", project, "locations", region, "jobs", rest @ ..] =
            segments.as_slice()
        else {
            return None;
        };
        let route = match (method.as_str(), rest) {
            ("GET", [job]) => Self::GetJob((*job).to_owned()),
            ("POST", [job_run]) => Self::Run(job_run.strip_suffix(":run")?.to_owned()),
            ("GET", [job, "executions"]) => Self::List((*job).to_owned()),
            ("GET", [_, "executions", _]) => {
                Self::GetExecution(path.trim_start_matches("/v2/").to_owned())
            }
            ("POST", [_, "executions", e]) if e.ends_with(":cancel") => Self::Cancel(
                path.trim_start_matches("/v2/")
                    .trim_end_matches(":cancel")
                    .to_owned(),
            ),
            _ => return None,
        };
        Some((route, (*project).to_owned(), (*region).to_owned()))
    }

    fn op(&self) -> CloudRunOp {
        match self {
            Self::GetJob(_) => CloudRunOp::GetJob,
            Self::Run(_) => CloudRunOp::Run,
            Self::List(_) => CloudRunOp::ListExecutions,
            Self::GetExecution(_) => CloudRunOp::GetExecution,
            Self::Cancel(_) => CloudRunOp::Cancel,
        }
    }

    /// The job the route names, if it names one (`-` names all).
    fn job(&self) -> Option<&str> {
        match self {
            Self::GetJob(job) | Self::Run(job) | Self::List(job) => Some(job),
            Self::GetExecution(name) | Self::Cancel(name) => name.split('/').nth(5),
        }
    }
}

impl FakeCloudRun {
    /// Starts the fake on a free local port, on the current tokio runtime.
    ///
    /// # Panics
    ///
    /// Panics outside a tokio runtime, if no local port can be bound, or if the configured
    /// service account's public key is not an RSA PEM key.
    pub async fn start(config: FakeCloudRunConfig) -> FakeCloudRun {
        let decoding_key = config.service_account.as_ref().map(|sa| {
            DecodingKey::from_rsa_pem(sa.public_key_pem.as_bytes())
                .expect("FakeCloudRun: service_account.public_key_pem is not an RSA public key")
        });
        let shared = Shared {
            config,
            validator: DiscoveryValidator::cloud_run(),
            core: FakeCore::default(),
            decoding_key,
            token_uri: OnceLock::new(),
            state: Mutex::new(RunState::default()),
        };
        let server = FakeServer::start(shared, handle).await;
        let _ = server.token_uri.set(server.url("/token"));
        FakeCloudRun { server }
    }

    /// `http://127.0.0.1:PORT/v2`, for `CloudRunConfig::api_url`.
    pub fn api_url(&self) -> String {
        self.server.url("/v2")
    }

    /// `127.0.0.1:PORT`, for `CloudRunAuth::MetadataServer`.
    pub fn metadata_host(&self) -> String {
        self.addr().to_string()
    }

    /// `http://127.0.0.1:PORT/token`, for `token_uri_override`; also the `aud` assertions need.
    pub fn token_uri(&self) -> String {
        self.server.url("/token")
    }

    /// The address the fake listens on.
    pub fn addr(&self) -> SocketAddr {
        self.server.addr()
    }

    /// Every execution ever created, oldest first.
    pub fn executions(&self) -> Vec<FakeExecution> {
        let state = self.server.lock();
        state
            .executions
            .iter()
            .map(ExecutionRecord::snapshot)
            .collect()
    }

    /// One execution by full name.
    pub fn execution(&self, name: &str) -> Option<FakeExecution> {
        let state = self.server.lock();
        state
            .executions
            .iter()
            .find(|e| e.name == name)
            .map(ExecutionRecord::snapshot)
    }

    /// The bot of a running execution exits with `exit_code`: 0 succeeds the execution, anything
    /// else fails it (no retries). Returns whether the execution was running.
    pub fn exit_bot(&self, name: &str, exit_code: i32) -> bool {
        self.server.exit(name, exit_code, None)
    }

    /// While on, executions created from now on stay pending.
    pub fn set_never_start(&self, never: bool) {
        self.server.lock().never_start = never;
    }

    /// The next `:run` is refused with 400 `INVALID_ARGUMENT` and `message`; nothing is created.
    pub fn refuse_next_run(&self, message: impl Into<String>) {
        self.server
            .lock()
            .next_runs
            .push_back(RunOutcome::Refuse(message.into()));
    }

    /// The next `:run` answers 429 `RESOURCE_EXHAUSTED` (with a `google.rpc.RetryInfo` detail
    /// when `retry_delay` is set); nothing is created.
    pub fn throttle_next_run(&self, retry_delay: Option<Duration>) {
        self.server
            .lock()
            .next_runs
            .push_back(RunOutcome::Throttle(retry_delay));
    }

    /// The next `:run` answers 200 with an Operation that is `done` with `error`
    /// (`google.rpc.Code` `code`); nothing is created.
    pub fn fail_next_run_operation(&self, code: i32, message: impl Into<String>) {
        self.server
            .lock()
            .next_runs
            .push_back(RunOutcome::OperationError {
                code,
                message: message.into(),
            });
    }

    /// Arms `fault` for the next `count` requests of `op` (after any fault already armed for it).
    pub fn set_fault(&self, op: CloudRunOp, fault: Fault, count: u32) {
        self.server.core.set_fault(op, fault, count);
    }

    /// Disarms every fault and one-shot run outcome.
    pub fn clear_faults(&self) {
        self.server.core.clear_faults();
        self.server.lock().next_runs.clear();
    }

    /// Runs `job` (which must exist) the way someone else would: no botdispatch labels, running
    /// at once. Returns the execution's name.
    pub fn create_foreign_execution(&self, job: &str) -> String {
        let name = self
            .server
            .create_execution(job, job_env(), Vec::new(), "600s".to_owned());
        {
            let mut state = self.server.lock();
            if let Some(record) = state.executions.iter_mut().find(|e| e.name == name) {
                record.phase = Phase::Running;
                record.started_at = Some(Utc::now());
                record.epoch += 1;
            }
        }
        name
    }

    /// Forgets every minted token: requests carrying one get 401 until a new one is fetched.
    pub fn revoke_tokens(&self) {
        self.server.lock().tokens.clear();
    }

    /// Requests to the metadata server's token endpoint so far (accepted or not).
    pub fn metadata_token_requests(&self) -> usize {
        self.server.lock().metadata_token_requests
    }

    /// Requests to the OAuth token endpoint so far (accepted or not).
    pub fn oauth_token_requests(&self) -> usize {
        self.server.lock().oauth_token_requests
    }

    /// Every request answered so far, oldest first (token requests without their bodies).
    pub fn requests(&self) -> Vec<RecordedRequest> {
        self.server.core.calls()
    }

    /// Every discovery violation seen so far: of requests (each answered 400) and of the fake's
    /// own answers (prefixed `fake answer`).
    pub fn spec_violations(&self) -> Vec<String> {
        self.server.core.violations()
    }
}

async fn handle(State(shared): State<Arc<Shared>>, request: Request) -> Response {
    // Token requests are recorded without their bodies (a form, not JSON).
    let (reply, recorded_body) = if request.path.starts_with("/computeMetadata/") {
        (shared.metadata_token(&request).await, None)
    } else if request.path == "/token" {
        (shared.oauth_token(&request).await, None)
    } else {
        match request.json_body() {
            Ok(json) => (shared.api(&request, json.as_ref()).await, json),
            Err(e) => {
                let message = format!("Invalid JSON payload received. {e}");
                shared
                    .core
                    .violation(format!("{} {}: {message}", request.method, request.path));
                (invalid(message), None)
            }
        }
    };
    shared.core.record(request.recorded(recorded_body, &reply));
    request.respond(reply)
}

/// Claims of an OAuth JWT-bearer assertion, as Google reads them.
#[derive(Deserialize)]
struct AssertionClaims {
    #[serde(default)]
    scope: String,
    iat: i64,
    exp: i64,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, RunState> {
        server::lock(&self.state)
    }

    fn mint_token(&self) -> Value {
        let token = format!(
            "ya29.fake-{}",
            Alphanumeric.sample_string(&mut rand::rng(), 40)
        );
        let secs = self.config.token_lifetime.as_secs().max(1);
        self.lock()
            .tokens
            .insert(token.clone(), Instant::now() + Duration::from_secs(secs));
        json!({"access_token": token, "expires_in": secs, "token_type": "Bearer"})
    }

    /// Mints a token, unless a fault armed for `op` decides otherwise.
    async fn issue_token(&self, op: CloudRunOp) -> Reply {
        faults::answer(
            self.core.next_fault(op),
            || async { Reply::json(200, self.mint_token()) },
            |status| json!({"error": faults::reason(status).to_ascii_lowercase()}),
        )
        .await
    }

    async fn metadata_token(&self, request: &Request) -> Reply {
        self.lock().metadata_token_requests += 1;
        let (method, path) = (&request.method, &request.path);
        if method != Method::GET
            || path != "/computeMetadata/v1/instance/service-accounts/default/token"
        {
            return Reply::json(
                404,
                json!({"error": format!("{method} {path} is not served here")}),
            );
        }
        if request.header("metadata-flavor") != Some("Google") {
            return Reply::json(
                403,
                json!({"error": "Missing required header \"Metadata-Flavor\": \"Google\""}),
            );
        }
        self.issue_token(CloudRunOp::MetadataToken).await
    }

    async fn oauth_token(&self, request: &Request) -> Reply {
        self.lock().oauth_token_requests += 1;
        if request.method != Method::POST {
            return oauth_error(405, "invalid_request", "use POST");
        }
        let form_encoded = request
            .header(header::CONTENT_TYPE)
            .is_some_and(|v| v.starts_with("application/x-www-form-urlencoded"));
        if !form_encoded {
            return oauth_error(
                400,
                "invalid_request",
                "Content-Type must be application/x-www-form-urlencoded",
            );
        }
        let form: HashMap<String, String> = url::form_urlencoded::parse(&request.body)
            .into_owned()
            .collect();
        if form.get("grant_type").map(String::as_str) != Some(JWT_BEARER) {
            return oauth_error(400, "unsupported_grant_type", "Invalid grant_type.");
        }
        let Some(assertion) = form.get("assertion") else {
            return oauth_error(
                400,
                "invalid_request",
                "Missing required parameter: assertion",
            );
        };
        if let Err(description) = self.verify_assertion(assertion) {
            return oauth_error(400, "invalid_grant", &description);
        }
        self.issue_token(CloudRunOp::OAuthToken).await
    }

    /// Verifies an assertion like Google's token endpoint: RS256 signature by the trusted key,
    /// `kid`, `iss`, `aud`, `scope`, and a lifetime of at most an hour.
    fn verify_assertion(&self, assertion: &str) -> Result<(), String> {
        let (Some(account), Some(key)) = (&self.config.service_account, &self.decoding_key) else {
            return Err("Invalid JWT Signature.".to_owned());
        };
        let header = jsonwebtoken::decode_header(assertion)
            .map_err(|_| "Invalid JWT: the assertion is not a JWT.".to_owned())?;
        if header.alg != Algorithm::RS256 {
            return Err(format!(
                "Invalid JWT: algorithm {:?} is not RS256.",
                header.alg
            ));
        }
        if header.kid.as_deref() != Some(account.key_id.as_str()) {
            return Err("Invalid JWT Signature.".to_owned());
        }
        let token_uri = self.token_uri.get().cloned().unwrap_or_default();
        let mut validation = Validation::new(Algorithm::RS256);
        validation.set_audience(&[token_uri]);
        validation.set_issuer(&[&account.client_email]);
        validation.set_required_spec_claims(&["exp", "iss", "aud"]);
        let claims = jsonwebtoken::decode::<AssertionClaims>(assertion, key, &validation)
            .map_err(|e| match e.kind() {
                jsonwebtoken::errors::ErrorKind::InvalidSignature => {
                    "Invalid JWT Signature.".to_owned()
                }
                kind => format!("Invalid JWT: {kind:?}"),
            })?
            .claims;
        if !claims.scope.split(' ').any(|s| s == CLOUD_PLATFORM) {
            return Err(format!(
                "Invalid JWT: scope {:?} lacks cloud-platform.",
                claims.scope
            ));
        }
        let now = Utc::now().timestamp();
        if claims.exp - claims.iat > 3600 || claims.iat > now + 60 {
            return Err(
                "Invalid JWT: Token must be a short-lived token (60 minutes) and in a reasonable timeframe."
                    .to_owned(),
            );
        }
        Ok(())
    }

    fn authorized(&self, request: &Request) -> bool {
        let Some(token) = request.bearer_token() else {
            return false;
        };
        if self.config.static_token.as_deref() == Some(token) {
            return true;
        }
        self.lock()
            .tokens
            .get(token)
            .is_some_and(|expires| Instant::now() < *expires)
    }

    async fn api(self: &Arc<Self>, request: &Request, body: Option<&Value>) -> Reply {
        let (method, path, query) = (&request.method, &request.path, &request.query);
        let api_path = path.trim_start_matches('/');
        if let Err(violation) =
            self.validator
                .validate_request(method.as_str(), api_path, query, body)
        {
            self.core.violation(format!("{method} {path}: {violation}"));
            return invalid(violation);
        }
        if !self.authorized(request) {
            return error(
                401,
                "Request had invalid authentication credentials. Expected OAuth 2 access token, \
                 login cookie or other valid authentication credential.",
            );
        }
        let Some((route, project, region)) = Route::parse(method, path) else {
            return error(
                501,
                format!("{method} {path} is not implemented by FakeCloudRun"),
            );
        };
        if project != self.config.project || region != self.config.region {
            return error(
                403,
                format!(
                    "Permission denied on resource project {project} in region {region} (or it may not exist)."
                ),
            );
        }
        if let Some(job) = route.job().filter(|j| *j != "-") {
            if !self.config.jobs.iter().any(|j| j == job) {
                return error(
                    404,
                    format!(
                        "Resource '{job}' of kind 'JOB' in region '{region}' in project '{project}' does not exist."
                    ),
                );
            }
        }
        let reply = faults::answer(
            self.core.next_fault(route.op()),
            || async { self.execute(&route, request, body) },
            |status| {
                json!({"error": {"code": status, "message": faults::reason(status),
                                 "status": rpc_status(status)}})
            },
        )
        .await;
        if let Reply::Json {
            status: 200,
            body: answer,
            ..
        } = &reply
        {
            if let Err(violations) =
                self.validator
                    .validate_response(method.as_str(), api_path, answer)
            {
                for v in violations {
                    self.core
                        .violation(format!("fake answer to {method} {path}: {v}"));
                }
            }
        }
        reply
    }

    fn execute(self: &Arc<Self>, route: &Route, request: &Request, body: Option<&Value>) -> Reply {
        match route {
            Route::GetJob(job) => self.get_job(job),
            Route::Run(job) => self.run(job, body),
            Route::List(job) => self.list(job, request),
            Route::GetExecution(name) => {
                let state = self.lock();
                match state.executions.iter().find(|e| &e.name == name) {
                    Some(e) => Reply::json(200, e.to_json(&self.config)),
                    None => self.execution_not_found(name),
                }
            }
            Route::Cancel(name) => self.cancel(name),
        }
    }

    fn execution_not_found(&self, name: &str) -> Reply {
        let id = name.rsplit('/').next().unwrap_or_default();
        error(
            404,
            format!(
                "Resource '{id}' of kind 'EXECUTION' in region '{}' in project '{}' does not exist.",
                self.config.region, self.config.project
            ),
        )
    }

    fn operation(&self, execution: Value) -> Value {
        let mut metadata = json!({ "@type": EXECUTION_TYPE });
        if let (Some(m), Value::Object(e)) = (metadata.as_object_mut(), execution) {
            m.extend(e);
        }
        json!({
            "name": format!(
                "projects/{}/locations/{}/operations/{}",
                self.config.project,
                self.config.region,
                Uuid::new_v4()
            ),
            "metadata": metadata,
        })
    }

    fn get_job(&self, job: &str) -> Reply {
        let state = self.lock();
        let ours: Vec<&ExecutionRecord> =
            state.executions.iter().filter(|e| e.job == job).collect();
        let created = Utc::now() - chrono::Duration::days(1);
        let mut out = json!({
            "name": format!("projects/{}/locations/{}/jobs/{job}", self.config.project, self.config.region),
            "uid": "00000000-0000-4000-8000-000000000001",
            "generation": "1",
            "observedGeneration": "1",
            "createTime": rfc3339(created),
            "updateTime": rfc3339(created),
            "creator": format!("deployer@{}.iam.gserviceaccount.com", self.config.project),
            "lastModifier": format!("deployer@{}.iam.gserviceaccount.com", self.config.project),
            "launchStage": "GA",
            "template": {
                "taskCount": 1,
                "template": {
                    "containers": [container_json(&job_image(&self.config, job), &job_env(), &[])],
                    "maxRetries": 0,
                    "timeout": "3600s",
                    "serviceAccount": format!("bots@{}.iam.gserviceaccount.com", self.config.project),
                },
            },
            "terminalCondition": {"type": "Ready", "state": "CONDITION_SUCCEEDED",
                                  "lastTransitionTime": rfc3339(created)},
            "etag": "\"1\"",
        });
        if !ours.is_empty() {
            out["executionCount"] = json!(ours.len());
        }
        if let Some(latest) = ours.iter().max_by_key(|e| e.ordinal) {
            let mut reference =
                json!({"name": latest.name, "createTime": rfc3339(latest.created_at)});
            if let Some(at) = latest.completed_at {
                reference["completionTime"] = json!(rfc3339(at));
            }
            out["latestCreatedExecution"] = reference;
        }
        Reply::json(200, out)
    }

    fn run(self: &Arc<Self>, job: &str, body: Option<&Value>) -> Reply {
        let outcome = self.lock().next_runs.pop_front();
        match outcome {
            None => {}
            Some(RunOutcome::Refuse(message)) => return invalid(message),
            Some(RunOutcome::Throttle(delay)) => {
                let details = delay
                    .map(|d| {
                        vec![json!({"@type": "type.googleapis.com/google.rpc.RetryInfo",
                                    "retryDelay": format!("{}s", d.as_secs_f64())})]
                    })
                    .unwrap_or_default();
                return google_error(
                    429,
                    "RESOURCE_EXHAUSTED",
                    format!("Quota exceeded for quota metric 'Job run requests' of service 'run.googleapis.com' for job {job}."),
                    details,
                );
            }
            Some(RunOutcome::OperationError { code, message }) => {
                let mut op = self.operation(json!({}));
                op["done"] = json!(true);
                op["error"] = json!({"code": code, "message": message});
                if let Some(o) = op.as_object_mut() {
                    o.remove("metadata");
                }
                return Reply::json(200, op);
            }
        }
        let empty = Value::Object(Map::new());
        let body = body.unwrap_or(&empty);
        if body.get("validateOnly").and_then(Value::as_bool) == Some(true) {
            return error(501, "FakeCloudRun does not model validateOnly");
        }
        let overrides = body.get("overrides").unwrap_or(&empty);
        let containers = overrides
            .get("containerOverrides")
            .and_then(Value::as_array)
            .map(Vec::as_slice)
            .unwrap_or_default();
        if containers.len() > 1 {
            return invalid(
                "The job has one container: at most one container override is allowed.",
            );
        }
        let mut env = job_env();
        let mut args: Vec<String> = Vec::new();
        if let Some(container) = containers.first() {
            if let Some(name) = container.get("name").and_then(Value::as_str) {
                if !name.is_empty() && name != "bot" {
                    return invalid(format!(
                        "Container override {name:?} does not name a container of the job."
                    ));
                }
            }
            for var in container
                .get("env")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
            {
                let name = var.get("name").and_then(Value::as_str).unwrap_or_default();
                let value = var.get("value").and_then(Value::as_str).unwrap_or_default();
                if RESERVED_ENV.contains(&name) {
                    return invalid(format!(
                        "The following reserved env names were provided: {name}. These values are automatically set by the system."
                    ));
                }
                if value.len() > MAX_ENV_VALUE_BYTES {
                    return invalid(format!("The value of env var {name} exceeds 32768 bytes."));
                }
                match env.iter_mut().find(|(n, _)| n == name) {
                    Some(slot) => slot.1 = value.to_owned(),
                    None => env.push((name.to_owned(), value.to_owned())),
                }
            }
            if container.get("clearArgs").and_then(Value::as_bool) != Some(true) {
                args = container
                    .get("args")
                    .and_then(Value::as_array)
                    .into_iter()
                    .flatten()
                    .filter_map(Value::as_str)
                    .map(str::to_owned)
                    .collect();
            }
        }
        if let Some(count) = overrides.get("taskCount").and_then(Value::as_i64) {
            if count != 1 {
                return error(501, "FakeCloudRun models executions of exactly one task");
            }
        }
        let timeout = match overrides.get("timeout").and_then(Value::as_str) {
            None => "3600s".to_owned(),
            Some(t) => match parse_duration(t) {
                Some(secs) if secs > 0.0 && secs <= MAX_TIMEOUT_SECS => t.to_owned(),
                _ => {
                    return invalid(format!(
                        "Invalid timeout {t:?}: must be between 1s and 24h."
                    ))
                }
            },
        };
        let name = self.create_execution(job, env, args, timeout);
        let snapshot = {
            let state = self.lock();
            state
                .executions
                .iter()
                .find(|e| e.name == name)
                .map(|e| e.to_json(&self.config))
                .unwrap_or_default()
        };
        tokio::spawn(self.clone().start_later(name));
        Reply::json(200, self.operation(snapshot))
    }

    fn create_execution(
        &self,
        job: &str,
        env: Vec<(String, String)>,
        args: Vec<String>,
        timeout: String,
    ) -> String {
        let mut state = self.lock();
        state.ordinal += 1;
        let ordinal = state.ordinal;
        let name = loop {
            let suffix = super::random_string(b"0123456789abcdefghijklmnopqrstuvwxyz", 5);
            let name = format!(
                "projects/{}/locations/{}/jobs/{job}/executions/{job}-{suffix}",
                self.config.project, self.config.region
            );
            if !state.executions.iter().any(|e| e.name == name) {
                break name;
            }
        };
        let now = Utc::now();
        let never_start = state.never_start;
        state.executions.push(ExecutionRecord {
            name: name.clone(),
            uid: Uuid::new_v4().to_string(),
            job: job.to_owned(),
            ordinal,
            phase: Phase::Pending,
            env,
            args,
            timeout,
            created_at: now,
            updated_at: now,
            started_at: None,
            completed_at: None,
            epoch: 0,
            never_start,
        });
        name
    }

    /// Pending → running after the start delay, then (with a bot lifetime) → succeeded.
    async fn start_later(self: Arc<Self>, name: String) {
        tokio::time::sleep(self.config.start_delay).await;
        {
            let mut state = self.lock();
            let Some(record) = state.executions.iter_mut().find(|e| e.name == name) else {
                return;
            };
            if record.epoch != 0 || record.phase != Phase::Pending || record.never_start {
                return;
            }
            let now = Utc::now();
            record.phase = Phase::Running;
            record.started_at = Some(now);
            record.updated_at = now;
        }
        if let Some(lifetime) = self.config.bot_lifetime {
            tokio::time::sleep(lifetime).await;
            self.exit(&name, 0, Some(0));
        }
    }

    /// See [`FakeCloudRun::exit_bot`]; with `epoch`, only if nothing touched the execution since.
    fn exit(&self, name: &str, exit_code: i32, epoch: Option<u64>) -> bool {
        let mut state = self.lock();
        let Some(record) = state.executions.iter_mut().find(|e| e.name == name) else {
            return false;
        };
        if epoch.is_some_and(|e| e != record.epoch) || record.phase != Phase::Running {
            return false;
        }
        let now = Utc::now();
        record.epoch += 1;
        record.phase = if exit_code == 0 {
            Phase::Succeeded
        } else {
            Phase::Failed(exit_code)
        };
        record.completed_at = Some(now);
        record.updated_at = now;
        true
    }

    fn cancel(self: &Arc<Self>, name: &str) -> Reply {
        let (snapshot, epoch) = {
            let mut state = self.lock();
            let Some(record) = state.executions.iter_mut().find(|e| e.name == name) else {
                return self.execution_not_found(name);
            };
            match record.phase {
                phase if phase.completed() => {
                    return google_error(
                        400,
                        "FAILED_PRECONDITION",
                        format!("Execution {} has already completed.", record.id()),
                        Vec::new(),
                    )
                }
                Phase::Cancelling { .. } => {
                    return Reply::json(200, self.operation(record.to_json(&self.config)))
                }
                phase => {
                    record.epoch += 1;
                    record.phase = Phase::Cancelling {
                        was_running: phase == Phase::Running,
                    };
                    record.updated_at = Utc::now();
                }
            }
            (record.to_json(&self.config), record.epoch)
        };
        let this = self.clone();
        let name = name.to_owned();
        tokio::spawn(async move {
            tokio::time::sleep(this.config.cancel_delay).await;
            let mut state = this.lock();
            if let Some(record) = state.executions.iter_mut().find(|e| e.name == name) {
                if record.epoch == epoch {
                    let now = Utc::now();
                    record.phase = Phase::Cancelled;
                    record.completed_at = Some(now);
                    record.updated_at = now;
                }
            }
        });
        Reply::json(200, self.operation(snapshot))
    }

    fn list(&self, job: &str, request: &Request) -> Reply {
        let max = self.config.max_page_size.max(1);
        let page_size = request
            .query("pageSize")
            .and_then(|s| s.parse::<usize>().ok())
            .filter(|n| *n > 0)
            .map_or(max, |n| n.min(max));
        // The token is a cursor: the ordinal of the last execution of the previous page, so
        // executions created while paging neither repeat nor shift the pages.
        let cursor = match request.query("pageToken").filter(|t| !t.is_empty()) {
            None => u64::MAX,
            Some(token) => match token.strip_prefix("after-").and_then(|n| n.parse().ok()) {
                Some(n) => n,
                None => return invalid(format!("Invalid page token {token:?}.")),
            },
        };
        let state = self.lock();
        let mut matching: Vec<&ExecutionRecord> = state
            .executions
            .iter()
            .filter(|e| job == "-" || e.job == job)
            .filter(|e| e.ordinal < cursor)
            .collect();
        matching.sort_by_key(|e| std::cmp::Reverse(e.ordinal));
        let more = matching.len() > page_size;
        matching.truncate(page_size);
        let mut out = json!({});
        if !matching.is_empty() {
            out["executions"] = matching.iter().map(|e| e.to_json(&self.config)).collect();
        }
        if let (true, Some(last)) = (more, matching.last()) {
            out["nextPageToken"] = json!(format!("after-{}", last.ordinal));
        }
        Reply::json(200, out)
    }
}
