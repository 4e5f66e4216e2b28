//! The `cloudrun` provider: one Cloud Run job execution per session, through the Cloud Run Admin
//! API v2 (requests and answers follow `testkit/specs/cloudrun-v2-discovery.json`).
//!
//! A session is `POST …/jobs/{job}:run` with `overrides.containerOverrides[0]` carrying the bot
//! contract as env (plus the agent's `cmd` as the container's `args`), `taskCount: 1` and a task
//! `timeout` that ends at the session's deadline. The answer is a long-running Operation whose
//! metadata is the new Execution; the execution's full resource name
//! (`projects/{p}/locations/{r}/jobs/{j}/executions/{e}`) is the machine handle.
//!
//! What Cloud Run cannot do per execution, and how this provider copes:
//! * **No image override.** A job's template fixes its image, so for `cloudrun` an agent's `image`
//!   names the **job** to run (`bots`, not `us-docker.pkg.dev/…`); an empty `image` runs the
//!   configured job. Guest size, retries (`maxRetries`, which should be 0 for bots) and the
//!   service account are the job's too; `guest` is ignored here. Only `args` can be overridden,
//!   not the entrypoint: an agent's `cmd` becomes the container's args (`[]` clears them).
//! * **No labels at run time.** `RunJobRequest` has no `labels` (an execution's labels are
//!   output-only, copied from the job), so the session labels travel as one env var,
//!   [`LABELS_ENV`] (a JSON object), and are read back from the execution's `template` env, which
//!   carries the overrides. The bot sees that variable too.
//! * **No filter on env when listing.** `find` and `list_managed` page through
//!   `…/jobs/-/executions` (every job of the region, so agents naming other jobs are found and
//!   reaped by any replica) and filter on the client. Cloud Run keeps up to 1000 completed
//!   executions per job, each listed with its env, so listing costs grow with that history.
//! * **No idempotent run.** A `:run` whose outcome is unknown (a transport failure, a 5xx, an
//!   unreadable answer) is an [`ProviderError::Unavailable`]; the resilient wrapper then finds
//!   the session's execution by key and adopts it instead of risking a second one on retry.
//!   One the listing does not show yet is missed, and a retry may then run a second execution.
//! * **Region.** A job lives in one region: a start naming another region is refused.
//!
//! States: an execution is *started* when `runningCount >= 1` (the bot's container runs), and
//! *ended* once it completed (`completionTime`), succeeded, was cancelled, or is being cancelled
//! (the `CANCELLING` reason), so a terminated session reads as over at once while Cloud Run stops
//! its container. `failedCount >= 1` reads as failed.
//!
//! No outbound rate limits are declared: the Admin API's request quotas are settings of the
//! Google Cloud project, not constants this code could know; a 429 / `RESOURCE_EXHAUSTED` maps to
//! [`ProviderError::Throttled`] (with `Retry-After` or `google.rpc.RetryInfo` as the hint) and
//! is retried by [`crate::resilient::Resilient`].

mod auth;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use reqwest::{Method, Response, StatusCode};
use serde::Deserialize;
use serde_json::{json, Value};

use crate::config::{check_url, required, BuildContext, ConfigError, ProviderSettings};
use crate::env::Env;
use crate::http::{self, CallFailure, ErrorAnswer, ErrorShape};
use crate::retry::poll_delays;
use crate::{
    Deadline, Launched, MachineProvider, MachineState, MachineStatus, MachineTemplate,
    ProviderError, Secret, SessionBinding, SessionLabels, Workload,
};
use auth::TokenSource;

const NAME: &str = "cloudrun";

/// Default base URL of the Cloud Run Admin API v2 (`CLOUD_RUN_API_URL`).
pub const DEFAULT_API_URL: &str = "https://run.googleapis.com/v2";
/// Default host of the GCE metadata server (`GCE_METADATA_HOST`).
pub const DEFAULT_METADATA_HOST: &str = "metadata.google.internal";
/// Env var of the bot's container that carries the session labels, as a JSON object of
/// [`SessionLabels::to_map`]. Reserved: an agent's env may not set it.
pub const LABELS_ENV: &str = "BOTDISPATCH_LABELS";

/// Cloud Run refuses env values longer than this many bytes.
const MAX_ENV_VALUE_BYTES: usize = 32 * 1024;
/// Cloud Run's upper bound for a task timeout (24 h).
const MAX_TASK_TIMEOUT_SECS: i64 = 24 * 3600;
/// Executions asked for per list page.
const PAGE_SIZE: u32 = 100;
/// A loop guard for listings (100 000 executions), far above Cloud Run's retention.
const MAX_PAGES: usize = 1000;
/// `@type` of an Execution inside an Operation's `metadata` or `response`.
const EXECUTION_TYPE: &str = "type.googleapis.com/google.cloud.run.v2.Execution";

/// Settings of the `cloudrun` provider: the `[cloudrun]` section of the configuration file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CloudRunConfig {
    /// Project id (or number) that owns the jobs. `BOTDISPATCH_CLOUDRUN_PROJECT`.
    pub project: Option<String>,
    /// Region of the jobs (`europe-west1`); every execution runs there.
    /// `BOTDISPATCH_CLOUDRUN_REGION`.
    pub region: Option<String>,
    /// Job run for agents without an image; `check` reads it. `BOTDISPATCH_CLOUDRUN_JOB`.
    pub job: Option<String>,
    /// Base URL including the version. `CLOUD_RUN_API_URL`, default
    /// `https://run.googleapis.com/v2`.
    pub api_url: String,
    /// Service-account JSON key file; unset: the metadata server.
    /// `GOOGLE_APPLICATION_CREDENTIALS`.
    pub service_account_key_file: Option<PathBuf>,
    /// Overrides the key's `token_uri` (private endpoints, tests).
    pub token_uri: Option<String>,
    /// Metadata server host. `GCE_METADATA_HOST`, default `metadata.google.internal`.
    pub metadata_host: String,
}

impl Default for CloudRunConfig {
    fn default() -> Self {
        Self {
            project: None,
            region: None,
            job: None,
            api_url: DEFAULT_API_URL.to_owned(),
            service_account_key_file: None,
            token_uri: None,
            metadata_host: DEFAULT_METADATA_HOST.to_owned(),
        }
    }
}

impl CloudRunConfig {
    /// Where tokens come from: the key file (read now), else the metadata server.
    pub fn auth(&self) -> Result<CloudRunAuth, ProviderError> {
        Ok(match &self.service_account_key_file {
            Some(path) => CloudRunAuth::ServiceAccountKey {
                key_json: Secret::new(std::fs::read_to_string(path).map_err(|e| {
                    ProviderError::Config {
                        provider: NAME,
                        message: format!("cannot read the service-account key {}", path.display()),
                        source: Some(Box::new(e)),
                    }
                })?),
                token_uri_override: self.token_uri.clone(),
            },
            None => CloudRunAuth::MetadataServer {
                host: self.metadata_host.clone(),
            },
        })
    }
}

#[async_trait]
impl ProviderSettings for CloudRunConfig {
    fn name(&self) -> &'static str {
        NAME
    }

    fn apply_env(&mut self, env: &Env) -> Result<(), ConfigError> {
        env.apply("BOTDISPATCH_CLOUDRUN_PROJECT", &mut self.project)?;
        env.apply("BOTDISPATCH_CLOUDRUN_REGION", &mut self.region)?;
        env.apply("BOTDISPATCH_CLOUDRUN_JOB", &mut self.job)?;
        env.apply("CLOUD_RUN_API_URL", &mut self.api_url)?;
        env.apply(
            "GOOGLE_APPLICATION_CREDENTIALS",
            &mut self.service_account_key_file,
        )?;
        env.apply("GCE_METADATA_HOST", &mut self.metadata_host)
    }

    fn validate(&self, _production: bool) -> Result<(), ConfigError> {
        let project = required(
            self.project.as_deref(),
            "cloudrun.project (BOTDISPATCH_CLOUDRUN_PROJECT)",
            NAME,
        )?;
        let region = required(
            self.region.as_deref(),
            "cloudrun.region (BOTDISPATCH_CLOUDRUN_REGION)",
            NAME,
        )?;
        check_url("cloudrun.api_url (CLOUD_RUN_API_URL)", &self.api_url)?;
        if !is_segment(project) {
            return Err(ConfigError::new(format!(
                "cloudrun.project (BOTDISPATCH_CLOUDRUN_PROJECT) = {project:?} is not a project id"
            )));
        }
        if !region
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        {
            return Err(ConfigError::new(format!(
                "cloudrun.region (BOTDISPATCH_CLOUDRUN_REGION) = {region:?} is not a region name"
            )));
        }
        if let Some(job) = &self.job {
            if !is_job_name(job) {
                return Err(ConfigError::new(format!(
                    "cloudrun.job (BOTDISPATCH_CLOUDRUN_JOB) = {job:?} is not a job name (lowercase letters, digits and dashes)"
                )));
            }
        }
        Ok(())
    }

    fn workload(
        &self,
        agent: &str,
        image: Option<&str>,
        _cmd: Option<&[String]>,
    ) -> Result<Workload, ConfigError> {
        match image.or(self.job.as_deref()).map(str::trim).filter(|j| !j.is_empty()) {
            Some(job) if is_job_name(job) => Ok(Workload::Job(job.to_owned())),
            Some(job) => Err(ConfigError::new(format!(
                "agents.{agent}.image = {job:?}: for cloudrun an agent's image names the Cloud Run job to run (lowercase letters, digits and dashes); the job's template decides the container image"
            ))),
            None => Err(ConfigError::new(format!(
                "agents.{agent}.image (its job) or cloudrun.job (BOTDISPATCH_CLOUDRUN_JOB) is required"
            ))),
        }
    }

    async fn build(&self, ctx: &BuildContext) -> Result<Arc<dyn MachineProvider>, ProviderError> {
        Ok(Arc::new(CloudRunProvider::new(ctx, self, self.auth()?)?))
    }
}

/// Where the provider's OAuth access tokens come from.
#[derive(Debug, Clone)]
pub enum CloudRunAuth {
    /// The GCE / Cloud Run metadata server of the VM the dispatcher runs on
    /// (`GCE_METADATA_HOST`, [`DEFAULT_METADATA_HOST`] unless set).
    MetadataServer { host: String },
    /// A service-account JSON key file's content; tokens come from its `token_uri` (or
    /// `token_uri_override`, for private endpoints and tests) with an RS256 JWT assertion.
    ServiceAccountKey {
        key_json: Secret,
        token_uri_override: Option<String>,
    },
    /// A token used as is and never refreshed (tests, `gcloud auth print-access-token`).
    StaticToken(Secret),
}

/// Launches sessions as Cloud Run job executions.
pub struct CloudRunProvider {
    http: reqwest::Client,
    api_url: String,
    project: String,
    region: String,
    deployment: String,
    /// The job `check` reads (the configured default job, if any).
    job: Option<String>,
    request_timeout: Duration,
    tokens: TokenSource,
    /// `projects/{project}/locations/{region}`.
    location: String,
}

impl CloudRunProvider {
    /// Validates the settings without any I/O; tokens come from `auth`.
    pub fn new(
        ctx: &BuildContext,
        config: &CloudRunConfig,
        auth: CloudRunAuth,
    ) -> Result<Self, ProviderError> {
        config
            .validate(ctx.production)
            .map_err(|e| config_error(e.0))?;
        if ctx.request_timeout.is_zero() {
            return Err(config_error("the request timeout is zero"));
        }
        let tokens = TokenSource::new(ctx.http.clone(), &auth, ctx.request_timeout)?;
        let project = config.project.clone().unwrap_or_default();
        let region = config.region.clone().unwrap_or_default();
        Ok(Self {
            http: ctx.http.clone(),
            api_url: config.api_url.trim_end_matches('/').to_owned(),
            location: format!("projects/{project}/locations/{region}"),
            project,
            region,
            deployment: ctx.deployment.clone(),
            job: config.job.clone(),
            request_timeout: ctx.request_timeout,
            tokens,
        })
    }

    /// Sends an authenticated request for `resource` (a path below the API's base URL). A 401 on
    /// a refreshable token is retried once with a new token (revoked or expired early).
    async fn call(
        &self,
        method: Method,
        resource: &str,
        query: &[(&str, String)],
        body: Option<&Value>,
        what: &str,
    ) -> Result<Response, ProviderError> {
        let url = format!("{}/{resource}", self.api_url);
        let mut retried = false;
        loop {
            let token = self.tokens.token().await?;
            let mut req = self
                .http
                .request(method.clone(), &url)
                .bearer_auth(token.expose())
                .timeout(self.request_timeout);
            if !query.is_empty() {
                req = req.query(query);
            }
            if let Some(body) = body {
                req = req.json(body);
            }
            let resp = http::send(req).await.map_err(|f| fail(what, f))?;
            if resp.status() == StatusCode::UNAUTHORIZED && !retried && self.tokens.refreshable() {
                self.tokens.invalidate(&token).await;
                retried = true;
                continue;
            }
            return Ok(resp);
        }
    }

    async fn get_execution(&self, name: &str) -> Result<Option<Execution>, ProviderError> {
        self.check_handle(name)?;
        let resp = self
            .call(Method::GET, name, &[], None, "get execution")
            .await?;
        if resp.status() == StatusCode::NOT_FOUND {
            return Ok(None);
        }
        Ok(Some(read_json(resp, "get execution").await?))
    }

    /// Pages through the executions of every job in the region, newest first, until `visit`
    /// returns `true`.
    async fn scan_executions(
        &self,
        mut visit: impl FnMut(Execution) -> bool,
    ) -> Result<(), ProviderError> {
        let resource = format!("{}/jobs/-/executions", self.location);
        let mut page_token: Option<String> = None;
        for _ in 0..MAX_PAGES {
            let mut query = vec![("pageSize", PAGE_SIZE.to_string())];
            if let Some(t) = page_token.take() {
                query.push(("pageToken", t));
            }
            let resp = self
                .call(Method::GET, &resource, &query, None, "list executions")
                .await?;
            let page: ListExecutions = read_json(resp, "list executions").await?;
            for execution in page.executions {
                if visit(execution) {
                    return Ok(());
                }
            }
            match page.next_page_token.filter(|t| !t.is_empty()) {
                Some(t) => page_token = Some(t),
                None => return Ok(()),
            }
        }
        Err(ProviderError::unavailable(
            NAME,
            format!("list executions: more than {MAX_PAGES} pages"),
        ))
    }

    /// The `RunJobRequest` of a session.
    fn run_body(
        &self,
        template: &MachineTemplate,
        session: &SessionBinding,
    ) -> Result<Value, ProviderError> {
        let env = session.machine_env(template);
        if env.contains_key(LABELS_ENV) {
            return Err(rejected(format!(
                "the env var {LABELS_ENV} is reserved by the cloudrun provider"
            )));
        }
        let labels = serde_json::to_string(&session.labels.to_map())
            .map_err(|e| rejected(format!("the session labels cannot be encoded: {e}")))?;
        let env: Vec<Value> = env
            .iter()
            .map(|(name, value)| json!({ "name": name, "value": value }))
            .chain(std::iter::once(
                json!({ "name": LABELS_ENV, "value": labels }),
            ))
            .collect();
        let mut container = json!({ "env": env });
        match template.cmd.as_deref() {
            Some([]) => container["clearArgs"] = json!(true),
            Some(cmd) => container["args"] = json!(cmd),
            None => {}
        }
        Ok(json!({
            "overrides": {
                "containerOverrides": [container],
                "taskCount": 1,
                "timeout": format!("{}s", task_timeout_secs(session.labels.deadline.wall(), Utc::now())),
            }
        }))
    }

    /// `:run`, reading the new execution's name from the Operation.
    async fn run_job(&self, job: &str, body: &Value) -> Result<String, ProviderError> {
        let resource = format!("{}/jobs/{job}:run", self.location);
        let resp = self
            .call(Method::POST, &resource, &[], Some(body), "run job")
            .await?;
        let operation: Operation = read_json(resp, "run job").await?;
        if let Some(error) = operation.error.as_ref().filter(|_| operation.done) {
            return Err(operation_error(error, "run job"));
        }
        operation
            .execution_name(|name| self.check_handle(name).is_ok())
            .ok_or_else(|| {
                ProviderError::unavailable(
                    NAME,
                    format!("run job: operation {:?} names no execution", operation.name),
                )
            })
    }

    /// Polls until the execution runs (or can no longer run); no deadline of its own.
    async fn poll_until_running(&self, handle: &str) -> Result<(), ProviderError> {
        for delay in poll_delays() {
            let Some(execution) = self.get_execution(handle).await? else {
                return Err(ProviderError::StartFailed {
                    provider: NAME,
                    message: "the execution disappeared while starting".into(),
                });
            };
            match execution.phase() {
                // Succeeded: it ran (and is over already; status says so).
                Phase::Running | Phase::Succeeded => return Ok(()),
                Phase::Pending => {}
                phase => {
                    return Err(ProviderError::StartFailed {
                        provider: NAME,
                        message: execution.detail(phase).unwrap_or_else(|| {
                            format!("the execution is {} and never ran", phase.as_str())
                        }),
                    })
                }
            }
            tokio::time::sleep(delay).await;
        }
        unreachable!("poll_delays never ends")
    }

    fn status_of(&self, execution: Execution) -> MachineStatus {
        let region = region_of(&execution.name)
            .unwrap_or(&self.region)
            .to_owned();
        execution.into_status(region, &self.deployment)
    }

    /// Refuses anything but `projects/{project}/locations/{region}/jobs/{job}/executions/{e}`
    /// of this provider's project and region, so that a handle can never make a request leave
    /// an execution's own path.
    fn check_handle(&self, handle: &str) -> Result<(), ProviderError> {
        let segments: Vec<&str> = handle.split('/').collect();
        let ok = matches!(
            segments.as_slice(),
            ["projects", p, "locations", r, "jobs", j, "executions", e]
                if *p == self.project && *r == self.region && is_job_name(j) && is_execution_id(e)
        );
        if ok {
            Ok(())
        } else {
            Err(rejected(format!(
                "{handle:?} is not a Cloud Run execution of {}",
                self.location
            )))
        }
    }
}

#[async_trait]
impl MachineProvider for CloudRunProvider {
    fn name(&self) -> &'static str {
        NAME
    }

    fn is_handle(&self, handle: &str) -> bool {
        self.check_handle(handle).is_ok()
    }

    /// A Cloud Run env value holds at most 32,768 bytes.
    fn fits(
        &self,
        template: &MachineTemplate,
        session_env: &BTreeMap<String, String>,
    ) -> Result<(), String> {
        match template
            .env
            .iter()
            .chain(session_env)
            .find(|(_, value)| value.len() > MAX_ENV_VALUE_BYTES)
        {
            Some((name, value)) => Err(format!(
                "a Cloud Run env value holds at most {MAX_ENV_VALUE_BYTES} bytes; {name} has {}",
                value.len()
            )),
            None => Ok(()),
        }
    }

    async fn launch(
        &self,
        template: &MachineTemplate,
        session: &SessionBinding,
    ) -> Result<Launched, ProviderError> {
        let Workload::Job(job) = &template.workload else {
            return Err(rejected(format!(
                "cloudrun runs jobs, not {:?}",
                template.workload
            )));
        };
        if !is_job_name(job) {
            return Err(rejected(format!("{job:?} is not a Cloud Run job name")));
        }
        if let Some(region) = template.region.as_deref().filter(|r| *r != self.region) {
            return Err(rejected(format!(
                "cloudrun runs sessions in {} only, not in {region:?}",
                self.region
            )));
        }
        let body = self.run_body(template, session)?;
        // Get (or reuse) the token first, so that an auth failure is never taken for a run whose
        // outcome is unknown.
        self.tokens.token().await?;
        let handle = self.run_job(job, &body).await?;
        tracing::debug!(machine.id = %handle, job, env = ?session.env_names(template), "ran Cloud Run job");
        Ok(Launched {
            region: Some(region_of(&handle).unwrap_or(&self.region).to_owned()),
            handle,
            version: None,
            address: None,
        })
    }

    async fn wait_started(
        &self,
        launched: &Launched,
        deadline: Deadline,
    ) -> Result<(), ProviderError> {
        tokio::time::timeout_at(
            deadline.instant(),
            self.poll_until_running(&launched.handle),
        )
        .await
        .unwrap_or(Err(ProviderError::Timeout { provider: NAME }))
    }

    async fn status(&self, handle: &str) -> Result<Option<MachineStatus>, ProviderError> {
        Ok(self.get_execution(handle).await?.map(|e| self.status_of(e)))
    }

    async fn terminate(&self, handle: &str) -> Result<(), ProviderError> {
        self.check_handle(handle)?;
        let resp = self
            .call(
                Method::POST,
                &format!("{handle}:cancel"),
                &[],
                Some(&json!({})),
                "cancel execution",
            )
            .await?;
        let status = resp.status();
        if status.is_success() || status == StatusCode::NOT_FOUND {
            return Ok(());
        }
        let error = ErrorAnswer::read(resp, GOOGLE_ERRORS).await;
        if error.code.as_deref() == Some("FAILED_PRECONDITION") {
            // Typically "already completed": fine if the execution is indeed over (or gone).
            match self.get_execution(handle).await? {
                None => return Ok(()),
                Some(e) if e.phase().state().is_terminal() => return Ok(()),
                Some(_) => {}
            }
        }
        Err(fail("cancel execution", CallFailure::Answer(error)))
    }

    async fn find(&self, session_key: &str) -> Result<Option<MachineStatus>, ProviderError> {
        let mut found = None;
        self.scan_executions(|e| {
            if e.labels(&self.deployment)
                .is_some_and(|l| l.session_key == session_key)
            {
                found = Some(e);
                return true;
            }
            false
        })
        .await?;
        Ok(found.map(|e| self.status_of(e)))
    }

    async fn list_managed(&self) -> Result<Vec<MachineStatus>, ProviderError> {
        let mut live = Vec::new();
        self.scan_executions(|e| {
            if e.completion_time.is_none() && e.labels(&self.deployment).is_some() {
                live.push(e);
            }
            false
        })
        .await?;
        Ok(live.into_iter().map(|e| self.status_of(e)).collect())
    }

    /// Reads the configured job, or (with none) lists the region's jobs: proves the token and
    /// the project.
    async fn check(&self) -> Result<(), ProviderError> {
        let (resource, what) = match &self.job {
            Some(job) => (format!("{}/jobs/{job}", self.location), "get job"),
            None => (format!("{}/jobs", self.location), "list jobs"),
        };
        let query = match self.job {
            Some(_) => Vec::new(),
            None => vec![("pageSize", "1".to_owned())],
        };
        let resp = self
            .call(Method::GET, &resource, &query, None, what)
            .await?;
        http::expect_success(resp, GOOGLE_ERRORS)
            .await
            .map(drop)
            .map_err(|f| fail(what, f))
    }
}

/// The fields of a `GoogleCloudRunV2Execution` that botdispatch reads. proto3 JSON leaves out
/// zero counts and empty lists, hence the defaults.
#[derive(Debug, Default, Deserialize)]
#[serde(default, rename_all = "camelCase")]
struct Execution {
    name: String,
    create_time: Option<String>,
    start_time: Option<String>,
    completion_time: Option<String>,
    running_count: i64,
    succeeded_count: i64,
    failed_count: i64,
    cancelled_count: i64,
    conditions: Vec<Condition>,
    template: Option<TaskTemplate>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct TaskTemplate {
    containers: Vec<Container>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct Container {
    env: Vec<EnvVar>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct EnvVar {
    name: String,
    value: String,
}

/// A `GoogleCloudRunV2Condition`.
#[derive(Debug, Default, Deserialize)]
#[serde(default, rename_all = "camelCase")]
struct Condition {
    #[serde(rename = "type")]
    kind: String,
    state: String,
    message: String,
    execution_reason: String,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default, rename_all = "camelCase")]
struct ListExecutions {
    executions: Vec<Execution>,
    next_page_token: Option<String>,
}

/// A `GoogleLongrunningOperation`.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct Operation {
    name: String,
    done: bool,
    error: Option<RpcStatus>,
    metadata: Option<Value>,
    response: Option<Value>,
}

impl Operation {
    /// The execution's resource name, from the metadata (an Execution while running) or the
    /// response (the Execution once done); only a name `valid` accepts.
    fn execution_name(&self, valid: impl Fn(&str) -> bool) -> Option<String> {
        [&self.metadata, &self.response]
            .into_iter()
            .flatten()
            .filter(|v| {
                v.get("@type")
                    .and_then(Value::as_str)
                    .is_none_or(|t| t == EXECUTION_TYPE)
            })
            .filter_map(|v| v.get("name").and_then(Value::as_str))
            .find(|name| valid(name))
            .map(str::to_owned)
    }
}

/// A `GoogleRpcStatus`, also the `error` of Google's HTTP error bodies (where `code` is the HTTP
/// status and `status` the canonical code's name).
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct RpcStatus {
    code: i64,
    message: String,
    status: String,
    details: Vec<Value>,
}

impl RpcStatus {
    /// `retryDelay` of a `google.rpc.RetryInfo` detail, if any.
    fn retry_delay(&self) -> Option<Duration> {
        self.details
            .iter()
            .filter(|d| {
                d.get("@type").and_then(Value::as_str)
                    == Some("type.googleapis.com/google.rpc.RetryInfo")
            })
            .find_map(|d| d.get("retryDelay").and_then(Value::as_str))
            .and_then(parse_google_duration)
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct ErrorBody {
    error: Option<RpcStatus>,
}

/// Where an execution is, in the words of `MachineStatus::provider_state`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Pending,
    Running,
    Cancelling,
    Succeeded,
    Failed,
    Cancelled,
    /// Completed without any task count saying how (nor a failed condition).
    Completed,
}

impl Phase {
    fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "PENDING",
            Self::Running => "RUNNING",
            Self::Cancelling => "CANCELLING",
            Self::Succeeded => "SUCCEEDED",
            Self::Failed => "FAILED",
            Self::Cancelled => "CANCELLED",
            Self::Completed => "COMPLETED",
        }
    }

    fn state(self) -> MachineState {
        match self {
            Self::Pending => MachineState::Starting,
            Self::Running => MachineState::Started,
            Self::Failed => MachineState::Failed,
            Self::Cancelling | Self::Succeeded | Self::Cancelled | Self::Completed => {
                MachineState::Ended
            }
        }
    }
}

impl Execution {
    fn reason(&self, reason: &str) -> bool {
        self.conditions.iter().any(|c| c.execution_reason == reason)
    }

    fn completed_condition(&self) -> Option<&Condition> {
        self.conditions.iter().find(|c| c.kind == "Completed")
    }

    fn phase(&self) -> Phase {
        if self.completion_time.is_some() {
            return if self.succeeded_count > 0 {
                Phase::Succeeded
            } else if self.failed_count > 0 {
                Phase::Failed
            } else if self.cancelled_count > 0 || self.reason("CANCELLED") {
                Phase::Cancelled
            } else if self
                .completed_condition()
                .is_some_and(|c| c.state == "CONDITION_FAILED")
            {
                Phase::Failed
            } else {
                Phase::Completed
            };
        }
        if self.cancelled_count > 0 || self.reason("CANCELLING") || self.reason("CANCELLED") {
            Phase::Cancelling
        } else if self.running_count > 0 {
            Phase::Running
        } else if self.succeeded_count > 0 {
            Phase::Succeeded
        } else if self.failed_count > 0 {
            Phase::Failed
        } else {
            Phase::Pending
        }
    }

    /// A failed condition's message, else (once over) the `Completed` condition's.
    fn detail(&self, phase: Phase) -> Option<String> {
        let failed = self
            .conditions
            .iter()
            .find(|c| c.state == "CONDITION_FAILED" && !c.message.is_empty());
        let completed = self
            .completed_condition()
            .filter(|c| phase.state().is_terminal() && !c.message.is_empty());
        failed.or(completed).map(|c| c.message.clone())
    }

    /// The session labels stored in the container env, if this is one of `deployment`'s.
    fn labels(&self, deployment: &str) -> Option<SessionLabels> {
        let raw = self
            .template
            .as_ref()?
            .containers
            .iter()
            .flat_map(|c| &c.env)
            .find(|v| v.name == LABELS_ENV)?;
        let map: BTreeMap<String, String> = serde_json::from_str(&raw.value).ok()?;
        SessionLabels::from_map_of(&map, deployment)
    }

    fn into_status(self, region: String, deployment: &str) -> MachineStatus {
        let phase = self.phase();
        let labels = self.labels(deployment);
        let detail = self.detail(phase);
        MachineStatus {
            state: phase.state(),
            provider_state: phase.as_str().to_owned(),
            region: Some(region),
            created_at: parse_time(self.create_time.as_deref()),
            started_at: parse_time(self.start_time.as_deref()),
            ended_at: parse_time(self.completion_time.as_deref()),
            labels,
            reserve: None,
            address: None,
            detail,
            failure: None,
            held: None,
            handle: self.name,
        }
    }
}

fn parse_time(value: Option<&str>) -> Option<DateTime<Utc>> {
    value
        .and_then(|s| DateTime::parse_from_rfc3339(s).ok())
        .map(|d| d.with_timezone(&Utc))
}

/// A `google-duration` (`"1.5s"`).
fn parse_google_duration(value: &str) -> Option<Duration> {
    let secs: f64 = value.strip_suffix('s')?.parse().ok()?;
    Duration::try_from_secs_f64(secs).ok()
}

/// Seconds from `now` to the session's deadline, rounded up, between 1 s and Cloud Run's 24 h.
fn task_timeout_secs(deadline: DateTime<Utc>, now: DateTime<Utc>) -> i64 {
    let millis = (deadline - now).num_milliseconds();
    (millis.saturating_add(999) / 1000).clamp(1, MAX_TASK_TIMEOUT_SECS)
}

/// A Cloud Run job name: lowercase letters, digits and dashes, starting with a letter, not
/// ending with a dash, at most 63 characters.
fn is_job_name(name: &str) -> bool {
    let bytes = name.as_bytes();
    (1..=63).contains(&bytes.len())
        && bytes[0].is_ascii_lowercase()
        && bytes[bytes.len() - 1] != b'-'
        && bytes
            .iter()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || *b == b'-')
}

/// A non-empty resource-name segment that needs no escaping in a URL path.
fn is_segment(segment: &str) -> bool {
    !segment.is_empty()
        && segment
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b':'))
}

/// An execution's id: a job name plus a generated suffix (lowercase letters, digits, dashes).
fn is_execution_id(id: &str) -> bool {
    (1..=128).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
}

/// The region segment of an execution name.
fn region_of(name: &str) -> Option<&str> {
    let mut segments = name.split('/');
    (segments.next() == Some("projects"))
        .then(|| segments.nth(2))
        .flatten()
        .filter(|r| !r.is_empty())
}

fn config_error(message: impl Into<String>) -> ProviderError {
    ProviderError::config(NAME, message)
}

/// A refusal decided here, before any request (status 400, as Cloud Run would answer).
fn rejected(message: String) -> ProviderError {
    ProviderError::rejected(NAME, message)
}

/// Google's HTTP error body: `{"error": {"code", "message", "status", "details"}}`; the
/// canonical code's name (`status`) is the error code. `RESOURCE_EXHAUSTED` means over quota.
const GOOGLE_ERRORS: ErrorShape = ErrorShape {
    parse: |text| {
        let status = serde_json::from_str::<ErrorBody>(text).ok()?.error?;
        Some(http::ParsedError {
            retry_after: status.retry_delay(),
            code: Some(status.status).filter(|s| !s.is_empty()),
            message: status.message,
        })
    },
    throttling_codes: &["RESOURCE_EXHAUSTED"],
};

/// The provider error of a failed call of `what`.
fn fail(what: &str, failure: CallFailure) -> ProviderError {
    ProviderError::from_call(NAME, what, failure)
}

/// The answer's JSON, or the provider error of a failed `what`.
async fn read_json<T: serde::de::DeserializeOwned>(
    resp: Response,
    what: &str,
) -> Result<T, ProviderError> {
    http::read_json(resp, GOOGLE_ERRORS)
        .await
        .map_err(|f| fail(what, f))
}

/// Maps a finished Operation's error (a `google.rpc.Code`) like the HTTP status it stands for.
fn operation_error(status: &RpcStatus, what: &str) -> ProviderError {
    let message = format!(
        "{what}: operation failed with code {}: {}",
        status.code, status.message
    );
    match status.code {
        // RESOURCE_EXHAUSTED
        8 => ProviderError::Throttled {
            provider: NAME,
            retry_after: status.retry_delay(),
        },
        // DEADLINE_EXCEEDED, ABORTED, INTERNAL, UNAVAILABLE
        4 | 10 | 13 | 14 => ProviderError::unavailable(NAME, message),
        code => ProviderError::Rejected {
            provider: NAME,
            status: match code {
                5 => 404,
                6 => 409,
                7 => 403,
                12 => 501,
                16 => 401,
                _ => 400,
            },
            message,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NAME_OF: &str = "projects/p/locations/europe-west1/jobs/bots/executions/bots-x7k2p";

    fn labels_env() -> String {
        json!({"managed_by": "botdispatch", "botdispatch_session": "k",
               "botdispatch_owner": "alice", "botdispatch_room": "bd-k",
               "botdispatch_agent": "default", "botdispatch_deadline": "1800000000"})
        .to_string()
    }

    fn execution(fields: Value) -> Execution {
        let mut base = json!({
            "name": NAME_OF,
            "createTime": "2026-11-22T10:00:00.123456Z",
            "template": {"containers": [{"image": "x", "env": [
                {"name": "LOG_LEVEL", "value": "info"},
                {"name": LABELS_ENV, "value": labels_env()},
            ]}]},
        });
        if let (Some(base), Some(fields)) = (base.as_object_mut(), fields.as_object()) {
            base.extend(fields.clone());
        }
        serde_json::from_value(base).unwrap()
    }

    fn status(fields: Value) -> MachineStatus {
        execution(fields).into_status("europe-west1".into(), "default")
    }

    #[test]
    fn maps_execution_counts_and_conditions_to_states() {
        let s = status(json!({}));
        assert_eq!(
            (s.state, s.provider_state.as_str()),
            (MachineState::Starting, "PENDING")
        );
        assert_eq!(s.labels.unwrap().owner, "alice");
        assert!(s.created_at.is_some());

        let s = status(json!({"runningCount": 1, "startTime": "2026-11-22T10:00:05Z"}));
        assert_eq!(s.state, MachineState::Started);
        assert_eq!(s.started_at.unwrap().timestamp() % 60, 5);

        let s = status(
            json!({"succeededCount": 1, "completionTime": "2026-11-22T10:05:00Z",
            "conditions": [{"type": "Completed", "state": "CONDITION_SUCCEEDED",
                            "message": "Execution completed successfully."}]}),
        );
        assert_eq!(
            (s.state, s.provider_state.as_str()),
            (MachineState::Ended, "SUCCEEDED")
        );
        assert!(s.ended_at.is_some());
        assert_eq!(
            s.detail.as_deref(),
            Some("Execution completed successfully.")
        );

        let s = status(
            json!({"failedCount": 1, "completionTime": "2026-11-22T10:05:00Z",
            "conditions": [{"type": "Completed", "state": "CONDITION_FAILED",
                            "executionReason": "NON_ZERO_EXIT_CODE", "message": "Task failed."}]}),
        );
        assert_eq!(s.state, MachineState::Failed);
        assert_eq!(s.detail.as_deref(), Some("Task failed."));

        // Being cancelled reads as over at once, even while the container still runs.
        let s = status(
            json!({"runningCount": 1, "conditions": [{"type": "Completed",
            "state": "CONDITION_RECONCILING", "executionReason": "CANCELLING"}]}),
        );
        assert_eq!(
            (s.state, s.provider_state.as_str()),
            (MachineState::Ended, "CANCELLING")
        );
        assert!(s.ended_at.is_none());

        let s = status(json!({"cancelledCount": 1, "completionTime": "2026-11-22T10:05:00Z"}));
        assert_eq!(
            (s.state, s.provider_state.as_str()),
            (MachineState::Ended, "CANCELLED")
        );

        let s = status(json!({"completionTime": "2026-11-22T10:05:00Z"}));
        assert_eq!(
            (s.state, s.provider_state.as_str()),
            (MachineState::Ended, "COMPLETED")
        );
    }

    #[test]
    fn foreign_or_garbled_labels_are_not_ours() {
        let mut e = execution(json!({}));
        e.template = None;
        assert!(e.labels("default").is_none());
        let e = execution(json!({"template": {"containers": [{"env": [
            {"name": LABELS_ENV, "value": "not json"}]}]}}));
        assert!(e.labels("default").is_none());
        let e = execution(json!({"template": {"containers": [{"env": [
            {"name": LABELS_ENV, "value": "{\"managed_by\": \"someone\"}"}]}]}}));
        assert!(e.labels("default").is_none());
    }

    #[test]
    fn operation_names_its_execution() {
        let op: Operation = serde_json::from_value(json!({
            "name": "projects/p/locations/r/operations/1",
            "metadata": {"@type": EXECUTION_TYPE, "name": NAME_OF},
        }))
        .unwrap();
        assert_eq!(op.execution_name(|_| true).as_deref(), Some(NAME_OF));
        assert_eq!(op.execution_name(|_| false), None);
        let op: Operation = serde_json::from_value(json!({
            "metadata": {"@type": "type.googleapis.com/other", "name": NAME_OF},
        }))
        .unwrap();
        assert_eq!(op.execution_name(|_| true), None);
    }

    #[test]
    fn names_timeouts_and_durations() {
        assert!(is_job_name("bots"));
        assert!(is_job_name("voice-bot-2"));
        for bad in [
            "",
            "Bots",
            "2bots",
            "bots-",
            "us-docker.pkg.dev/p/r/bot:1",
            "a/b",
        ] {
            assert!(!is_job_name(bad), "{bad}");
        }
        let provider = CloudRunProvider::new(
            &BuildContext::new(reqwest::Client::new()),
            &CloudRunConfig {
                project: Some("p".into()),
                region: Some("europe-west1".into()),
                ..CloudRunConfig::default()
            },
            CloudRunAuth::StaticToken(Secret::new("t")),
        )
        .unwrap();
        assert!(provider.check_handle(NAME_OF).is_ok() && provider.is_handle(NAME_OF));
        for bad in [
            "bots-x7k2p",
            "projects/p/locations/europe-west1/jobs/bots/executions/e:cancel",
            "projects/p/locations/europe-west1/jobs/bots/executions/../../x",
            "projects/p/locations/europe-west1/jobs/../executions/bots-x7k2p",
            "projects/p/locations/europe-west1/jobs/bots/executions/..",
            "projects/p/locations/europe-west1/jobs/bots/executions/",
            "projects/other/locations/europe-west1/jobs/bots/executions/bots-x7k2p",
            "projects/p/locations/us-east1/jobs/bots/executions/bots-x7k2p",
        ] {
            assert!(provider.check_handle(bad).is_err(), "{bad}");
        }
        assert_eq!(region_of(NAME_OF), Some("europe-west1"));

        let now = Utc::now();
        assert_eq!(
            task_timeout_secs(now + chrono::Duration::milliseconds(600_001), now),
            601
        );
        assert_eq!(
            task_timeout_secs(now - chrono::Duration::seconds(5), now),
            1
        );
        assert_eq!(
            task_timeout_secs(now + chrono::Duration::days(3), now),
            86_400
        );

        assert_eq!(
            parse_google_duration("1.5s"),
            Some(Duration::from_millis(1500))
        );
        assert_eq!(parse_google_duration("30"), None);
        assert_eq!(parse_google_duration("-1s"), None);
    }

    #[test]
    fn operation_errors_map_by_code() {
        let status = |code| RpcStatus {
            code,
            message: "m".into(),
            ..RpcStatus::default()
        };
        assert!(matches!(
            operation_error(&status(8), "x"),
            ProviderError::Throttled { .. }
        ));
        assert!(matches!(
            operation_error(&status(14), "x"),
            ProviderError::Unavailable { .. }
        ));
        assert!(matches!(
            operation_error(&status(9), "x"),
            ProviderError::Rejected { status: 400, .. }
        ));
        assert!(matches!(
            operation_error(&status(7), "x"),
            ProviderError::Rejected { status: 403, .. }
        ));
    }
}
