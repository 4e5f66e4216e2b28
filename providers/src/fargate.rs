//! The `fargate` provider: one ECS task on AWS Fargate per session, through the official AWS SDK.
//!
//! A session's task is started with `RunTask` (launch type `FARGATE`, or a `FARGATE_SPOT` capacity
//! provider strategy) from a task definition the operator registered beforehand. ECS cannot swap a
//! container's image per run, so for this provider an agent's `image` names the **task
//! definition** (`family`, `family:revision` or its ARN); an agent without one uses
//! [`FargateConfig::task_definition`] ([`Workload::TaskDefinition`]). Everything per-session travels in the run's overrides: the
//! bot contract as the bot container's environment, the agent's `cmd` as its command, and the
//! guest size as task-level `cpu`/`memory`, rounded up to the smallest Fargate size that fits.
//!
//! The task carries the session labels as ECS tags and the session key as `startedBy` (so session
//! keys must be 1 to 36 letters, digits, `-` or `_`; botdispatch's are 26-character ULIDs), so any
//! replica can find it again without local memory. `clientToken` is derived from the session key:
//! a retried `RunTask` returns the task the first attempt started instead of a second one, and a
//! launch of the same session with other parameters is a [`ProviderError::Conflict`]. The
//! deadline label can be moved later (`TagResource`).
//! ECS tag values only allow letters, digits, spaces and `_ . : / = + - @`: label values go
//! through [`LabelCodec::ECS_TAGS`], so any JWT `sub` round-trips.
//!
//! "Started" means the task's `lastStatus` reached `RUNNING` (its containers run). A task is over
//! as soon as ECS wants it stopped (`desiredStatus == STOPPED`), even while it still drains:
//! `Ended` when the bot exited with 0 or someone stopped it, `Failed` when it never started or a
//! container exited non-zero. ECS deletes a task's tags when `StopTask` stops it, so a task
//! botdispatch stopped reads back without labels.
//!
//! The SDK's own retries are disabled: botdispatch retries transient failures
//! ([`ProviderError::is_transient`]) in its own deadline-bounded layer, under the documented ECS
//! rate limits ([`MachineProvider::rate_limits`]). Every call is bounded by the request timeout
//! of the [`BuildContext`]. Error messages carry ECS's error code and the first line of
//! its message only, never credentials or signatures.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use aws_config::retry::RetryConfig;
use aws_config::timeout::TimeoutConfig;
use aws_config::{BehaviorVersion, Region, SdkConfig};
use aws_sdk_ecs::config::http::HttpResponse;
use aws_sdk_ecs::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_ecs::types::{
    AssignPublicIp, AwsVpcConfiguration, CapacityProviderStrategyItem, ContainerOverride,
    DesiredStatus, Failure, KeyValuePair, LaunchType, NetworkConfiguration, Tag, Task, TaskField,
    TaskOverride,
};
use chrono::{DateTime, Utc};
use serde::Deserialize;
use tokio::time::Instant;

use crate::config::{check_url, required, BuildContext, ConfigError, ProviderSettings};
use crate::env::Env;
use crate::http::{error_chain, parse_retry_after, truncate};
use crate::retry::{poll_delays, Op, RateLimit};
use crate::{
    Deadline, LabelCodec, Launched, MachineProvider, MachineState, MachineStatus, MachineTemplate,
    ProviderError, Relabel, SessionBinding, SessionLabels, Workload,
};

const NAME: &str = "fargate";
/// `reason` of every `StopTask` botdispatch sends; shows up as the task's `stoppedReason`.
pub const STOP_REASON: &str = "botdispatch: session ended";
/// Prefix of the `clientToken` of a session's `RunTask`.
const CLIENT_TOKEN_PREFIX: &str = "botdispatch-";
/// Longest session key used as `startedBy` as is.
const MAX_STARTED_BY: usize = 36;
/// ECS refuses `RunTask` overrides longer than this many characters.
const MAX_OVERRIDES_CHARS: usize = 8192;
/// `DescribeTasks` takes at most this many tasks per call; `ListTasks` pages are as large.
const PAGE: usize = 100;
/// ECS is eventually consistent: a task `RunTask` just returned may read as `MISSING` for a moment.
const MISSING_GRACE: Duration = Duration::from_secs(10);

/// Settings of the `fargate` provider: the `[fargate]` section of the configuration file.
/// Credentials and (unless set here) the region come from the AWS SDK's standard chain
/// (`AWS_REGION`, `AWS_ACCESS_KEY_ID`/`AWS_SECRET_ACCESS_KEY`, profiles, web identity, container
/// and instance roles).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FargateConfig {
    /// ECS cluster name or ARN. `BOTDISPATCH_FARGATE_CLUSTER`.
    pub cluster: Option<String>,
    /// Task definition (`family`, `family:revision` or ARN) of agents without an image.
    /// `BOTDISPATCH_FARGATE_TASK_DEFINITION`.
    pub task_definition: Option<String>,
    /// Name of the bot's container in the task definition; it receives the env and command.
    /// `BOTDISPATCH_FARGATE_CONTAINER`, default `bot`.
    pub container_name: String,
    /// Subnets of the tasks' network interfaces (`awsvpc` networking); at least one.
    /// `BOTDISPATCH_FARGATE_SUBNETS` (comma separated).
    pub subnets: Vec<String>,
    /// Security groups of the tasks' network interfaces; empty means the VPC's default group.
    /// `BOTDISPATCH_FARGATE_SECURITY_GROUPS` (comma separated).
    pub security_groups: Vec<String>,
    /// Gives each task a public IP (needed in public subnets without a NAT to pull images and
    /// reach Daily). `BOTDISPATCH_FARGATE_PUBLIC_IP`.
    pub assign_public_ip: bool,
    /// Runs tasks on Fargate Spot (cheaper, may be interrupted with two minutes' notice).
    /// `BOTDISPATCH_FARGATE_SPOT`.
    pub spot: bool,
    /// AWS region; unset takes it from the SDK's chain.
    pub region: Option<String>,
    /// Overrides the ECS endpoint (tests, private endpoints). The SDK also honours
    /// `AWS_ENDPOINT_URL_ECS` by itself.
    pub endpoint_url: Option<String>,
}

impl Default for FargateConfig {
    fn default() -> Self {
        Self {
            cluster: None,
            task_definition: None,
            container_name: "bot".to_owned(),
            subnets: Vec::new(),
            security_groups: Vec::new(),
            assign_public_ip: false,
            spot: false,
            region: None,
            endpoint_url: None,
        }
    }
}

#[async_trait]
impl ProviderSettings for FargateConfig {
    fn name(&self) -> &'static str {
        NAME
    }

    fn apply_env(&mut self, env: &Env) -> Result<(), ConfigError> {
        env.apply("BOTDISPATCH_FARGATE_CLUSTER", &mut self.cluster)?;
        env.apply(
            "BOTDISPATCH_FARGATE_TASK_DEFINITION",
            &mut self.task_definition,
        )?;
        env.apply("BOTDISPATCH_FARGATE_CONTAINER", &mut self.container_name)?;
        env.apply("BOTDISPATCH_FARGATE_SUBNETS", &mut self.subnets)?;
        env.apply(
            "BOTDISPATCH_FARGATE_SECURITY_GROUPS",
            &mut self.security_groups,
        )?;
        env.apply("BOTDISPATCH_FARGATE_PUBLIC_IP", &mut self.assign_public_ip)?;
        env.apply("BOTDISPATCH_FARGATE_SPOT", &mut self.spot)
    }

    fn validate(&self, _production: bool) -> Result<(), ConfigError> {
        required(
            self.cluster.as_deref(),
            "fargate.cluster (BOTDISPATCH_FARGATE_CLUSTER)",
            NAME,
        )?;
        if self.subnets.is_empty() {
            return Err(ConfigError::new(
                "fargate.subnets (BOTDISPATCH_FARGATE_SUBNETS) needs at least one subnet",
            ));
        }
        if self.container_name.is_empty() {
            return Err(ConfigError::new(
                "fargate.container_name (BOTDISPATCH_FARGATE_CONTAINER) is empty",
            ));
        }
        if let Some(url) = &self.endpoint_url {
            check_url("fargate.endpoint_url", url)?;
        }
        Ok(())
    }

    fn workload(
        &self,
        agent: &str,
        image: Option<&str>,
        _cmd: Option<&[String]>,
    ) -> Result<Workload, ConfigError> {
        image
            .or(self.task_definition.as_deref())
            .map(str::trim)
            .filter(|t| !t.is_empty())
            .map(|t| Workload::TaskDefinition(t.to_owned()))
            .ok_or_else(|| {
                ConfigError::new(format!(
                    "agents.{agent}.image (its task definition) or fargate.task_definition (BOTDISPATCH_FARGATE_TASK_DEFINITION) is required"
                ))
            })
    }

    async fn build(&self, ctx: &BuildContext) -> Result<Arc<dyn MachineProvider>, ProviderError> {
        Ok(Arc::new(FargateProvider::new(ctx, self.clone()).await?))
    }
}

/// Launches sessions as ECS tasks on AWS Fargate.
pub struct FargateProvider {
    client: aws_sdk_ecs::Client,
    config: FargateConfig,
    /// `config.cluster`, validated.
    cluster: String,
    region: String,
    deployment: String,
}

impl fmt::Debug for FargateProvider {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The SDK client is left out: it holds the credentials provider.
        f.debug_struct("FargateProvider")
            .field("config", &self.config)
            .field("region", &self.region)
            .finish_non_exhaustive()
    }
}

impl FargateProvider {
    /// Loads credentials and region from the AWS SDK's standard chain.
    pub async fn new(ctx: &BuildContext, config: FargateConfig) -> Result<Self, ProviderError> {
        config
            .validate(ctx.production)
            .map_err(|e| config_error(e.0))?;
        let mut loader = aws_config::defaults(BehaviorVersion::latest());
        if let Some(region) = &config.region {
            loader = loader.region(Region::new(region.clone()));
        }
        Self::from_sdk_config(ctx, &loader.load().await, config)
    }

    /// Builds the provider on an already loaded SDK configuration (tests pass static
    /// credentials this way). `config.region` and `config.endpoint_url` win over `sdk`'s.
    pub fn from_sdk_config(
        ctx: &BuildContext,
        sdk: &SdkConfig,
        config: FargateConfig,
    ) -> Result<Self, ProviderError> {
        config
            .validate(ctx.production)
            .map_err(|e| config_error(e.0))?;
        if ctx.request_timeout.is_zero() {
            return Err(config_error("the request timeout is zero".into()));
        }
        let timeouts = TimeoutConfig::builder()
            .connect_timeout(ctx.request_timeout)
            .operation_attempt_timeout(ctx.request_timeout)
            .operation_timeout(ctx.request_timeout)
            .build();
        let mut builder = aws_sdk_ecs::config::Builder::from(sdk)
            .retry_config(RetryConfig::disabled())
            .timeout_config(timeouts);
        if let Some(region) = &config.region {
            builder = builder.region(Region::new(region.clone()));
        }
        if let Some(url) = &config.endpoint_url {
            builder = builder.endpoint_url(url.clone());
        }
        let ecs_config = builder.build();
        let region = ecs_config
            .region()
            .map(ToString::to_string)
            .ok_or_else(|| {
                config_error("no AWS region: set AWS_REGION or the provider's region".into())
            })?;
        Ok(Self {
            client: aws_sdk_ecs::Client::from_conf(ecs_config),
            cluster: config.cluster.clone().unwrap_or_default(),
            config,
            region,
            deployment: ctx.deployment.clone(),
        })
    }

    /// The region tasks run in.
    pub fn region(&self) -> &str {
        &self.region
    }

    /// Describes tasks (any number, in calls of [`PAGE`]); the second list holds the `failures`.
    async fn describe(
        &self,
        arns: &[String],
        with_tags: bool,
    ) -> Result<(Vec<Task>, Vec<Failure>), ProviderError> {
        let mut tasks = Vec::new();
        let mut failures = Vec::new();
        for chunk in arns.chunks(PAGE) {
            let mut req = self
                .client
                .describe_tasks()
                .cluster(&self.cluster)
                .set_tasks(Some(chunk.to_vec()));
            if with_tags {
                req = req.include(TaskField::Tags);
            }
            let out = req
                .send()
                .await
                .map_err(|e| map_sdk_error(e, "describe tasks"))?;
            tasks.extend_from_slice(out.tasks());
            failures.extend_from_slice(out.failures());
        }
        Ok((tasks, failures))
    }

    /// One task by ARN; `None` when ECS reports it `MISSING` (or does not mention it at all).
    async fn describe_one(
        &self,
        arn: &str,
        with_tags: bool,
    ) -> Result<Option<Task>, ProviderError> {
        let (tasks, failures) = self.describe(&[arn.to_owned()], with_tags).await?;
        // One task asked for: an answer that spells its ARN differently is still that task.
        if let Some(task) = tasks.into_iter().next() {
            return Ok(Some(task));
        }
        match failures.iter().find(|f| f.reason() != Some("MISSING")) {
            Some(failure) => Err(ProviderError::Rejected {
                provider: NAME,
                status: 200,
                message: format!("describe tasks: {}", describe_failure(failure)),
            }),
            None => Ok(None),
        }
    }

    /// Every task ARN matching the filter, following `nextToken`.
    async fn list_task_arns(
        &self,
        started_by: Option<&str>,
        desired: Option<DesiredStatus>,
    ) -> Result<Vec<String>, ProviderError> {
        let mut arns = Vec::new();
        let mut next: Option<String> = None;
        loop {
            let out = self
                .client
                .list_tasks()
                .cluster(&self.cluster)
                .set_started_by(started_by.map(str::to_owned))
                .set_desired_status(desired.clone())
                .max_results(PAGE as i32)
                .set_next_token(next.take())
                .send()
                .await
                .map_err(|e| map_sdk_error(e, "list tasks"))?;
            arns.extend_from_slice(out.task_arns());
            match out.next_token() {
                Some(token) if !token.is_empty() => next = Some(token.to_owned()),
                _ => return Ok(arns),
            }
        }
    }

    fn to_status(&self, task: &Task) -> MachineStatus {
        task_status(
            task,
            &self.config.container_name,
            &self.region,
            &self.deployment,
        )
    }

    /// The `RunTask` request of a session, without sending it.
    fn run_task_request(
        &self,
        template: &MachineTemplate,
        session: &SessionBinding,
    ) -> Result<aws_sdk_ecs::operation::run_task::builders::RunTaskFluentBuilder, ProviderError>
    {
        let Workload::TaskDefinition(task_definition) = &template.workload else {
            return Err(rejected(format!(
                "fargate runs task definitions, not {:?}",
                template.workload
            )));
        };
        let key = &session.labels.session_key;
        if !is_started_by(key) {
            return Err(rejected(format!(
                "session key {key:?} cannot be an ECS startedBy (1 to {MAX_STARTED_BY} letters, digits, '-' or '_')"
            )));
        }
        if let Some(region) = &template.region {
            if region != &self.region {
                return Err(rejected(format!(
                    "region {region:?} is not available: this provider runs tasks in {}",
                    self.region
                )));
            }
        }
        let (cpu, memory) = fargate_size(template.guest.cpus, template.guest.memory_mb)?;
        let tags = encode_tags(&session.labels.to_map())?;
        let environment = session
            .machine_env(template)
            .into_iter()
            .map(|(name, value)| KeyValuePair::builder().name(name).value(value).build())
            .collect();
        let container = ContainerOverride::builder()
            .name(&self.config.container_name)
            .set_environment(Some(environment))
            .set_command(template.cmd.clone())
            .build();
        let overrides = TaskOverride::builder()
            .container_overrides(container)
            .cpu(cpu.to_string())
            .memory(memory.to_string())
            .build();
        let vpc = AwsVpcConfiguration::builder()
            .set_subnets(Some(self.config.subnets.clone()))
            .set_security_groups(Some(self.config.security_groups.clone()))
            .assign_public_ip(if self.config.assign_public_ip {
                AssignPublicIp::Enabled
            } else {
                AssignPublicIp::Disabled
            })
            .build()
            .map_err(|e| config_error(format!("network configuration: {e}")))?;
        let req = self
            .client
            .run_task()
            .cluster(&self.cluster)
            .task_definition(task_definition)
            .count(1)
            .network_configuration(
                NetworkConfiguration::builder()
                    .awsvpc_configuration(vpc)
                    .build(),
            )
            .overrides(overrides)
            .started_by(key)
            .set_tags(Some(tags))
            .client_token(client_token(key));
        Ok(if self.config.spot {
            let spot = CapacityProviderStrategyItem::builder()
                .capacity_provider("FARGATE_SPOT")
                .weight(1)
                .build()
                .map_err(|e| config_error(format!("capacity provider strategy: {e}")))?;
            req.capacity_provider_strategy(spot)
        } else {
            req.launch_type(LaunchType::Fargate)
        })
    }

    /// Polls until the task runs (or can no longer run); no deadline of its own.
    async fn poll_until_running(&self, arn: &str) -> Result<(), ProviderError> {
        let began = Instant::now();
        for delay in poll_delays() {
            match self.describe_one(arn, false).await {
                Ok(Some(task)) => {
                    if task.last_status() == Some("RUNNING") || task.started_at().is_some() {
                        return Ok(());
                    }
                    if is_stopping(&task) {
                        let status = self.to_status(&task);
                        return Err(ProviderError::StartFailed {
                            provider: NAME,
                            message: status
                                .detail
                                .unwrap_or_else(|| format!("task is {}", status.provider_state)),
                        });
                    }
                }
                Ok(None) if began.elapsed() > MISSING_GRACE => {
                    return Err(ProviderError::StartFailed {
                        provider: NAME,
                        message: "task disappeared while starting".into(),
                    })
                }
                Ok(None) => {}
                // A throttled or failed poll is not the task failing: poll again until the
                // caller's deadline.
                Err(e) if e.is_transient() => {
                    tracing::debug!(error = %e, "polling a starting task failed; polling again");
                }
                Err(e) => return Err(e),
            }
            tokio::time::sleep(delay).await;
        }
        unreachable!("poll_delays never ends")
    }
}

#[async_trait]
impl MachineProvider for FargateProvider {
    fn name(&self) -> &'static str {
        NAME
    }

    /// AWS's documented ECS throttling, per account and region: `RunTask` and `StopTask` share
    /// a bucket of 100 refilling 40/s and Fargate launches one of 100 refilling 20/s;
    /// `DescribeTasks` and `ListTasks` share 100 refilling 20/s. Shared buckets are split
    /// between the operations that draw from them. `TagResource` has no published bucket.
    fn rate_limits(&self) -> Vec<(Op, RateLimit)> {
        vec![
            (Op::Launch, RateLimit::app(20.0, 100)),
            (Op::Terminate, RateLimit::app(20.0, 50)),
            (Op::Status, RateLimit::app(10.0, 50)),
            (Op::Wait, RateLimit::app(5.0, 25)),
            (Op::List, RateLimit::app(5.0, 25)),
            (Op::Label, RateLimit::app(5.0, 10)),
        ]
    }

    /// A task ARN in this provider's region and cluster:
    /// `arn:<partition>:ecs:<region>:<account>:task/<cluster>/<task id>`.
    fn is_handle(&self, handle: &str) -> bool {
        let cluster_name = self.cluster.rsplit('/').next().unwrap_or_default();
        let mut parts = handle.splitn(6, ':');
        let (Some("arn"), Some(partition), Some("ecs"), Some(region), Some(account), Some(rest)) = (
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
        ) else {
            return false;
        };
        let id_ok = |id: &str| {
            (1..=64).contains(&id.len())
                && id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
        };
        partition.starts_with("aws")
            && region == self.region
            && account.len() == 12
            && account.bytes().all(|b| b.is_ascii_digit())
            && rest
                .strip_prefix("task/")
                .and_then(|r| r.split_once('/'))
                .is_some_and(|(cluster, id)| cluster == cluster_name && id_ok(id))
    }

    /// `RunTask` overrides hold at most 8,192 characters (the JSON of `overrides`).
    fn fits(
        &self,
        template: &MachineTemplate,
        session_env: &BTreeMap<String, String>,
    ) -> Result<(), String> {
        let environment: Vec<_> = template
            .env
            .iter()
            .chain(session_env)
            .map(|(name, value)| serde_json::json!({"name": name, "value": value}))
            .collect();
        let overrides = serde_json::json!({
            "containerOverrides": [{
                "name": self.config.container_name,
                "environment": environment,
                "command": template.cmd,
            }],
            "cpu": "16384",
            "memory": "122880",
        });
        let size = overrides.to_string().chars().count();
        if size > MAX_OVERRIDES_CHARS {
            return Err(format!(
                "RunTask overrides hold at most {MAX_OVERRIDES_CHARS} characters; this start needs {size}"
            ));
        }
        Ok(())
    }

    async fn launch(
        &self,
        template: &MachineTemplate,
        session: &SessionBinding,
    ) -> Result<Launched, ProviderError> {
        let out = self
            .run_task_request(template, session)?
            .send()
            .await
            .map_err(|e| {
                if e.code() == Some("ConflictException") {
                    // The client token was used with different parameters: a different launch of
                    // the same session already happened.
                    ProviderError::Conflict {
                        provider: NAME,
                        name: session.name.clone(),
                    }
                } else {
                    map_sdk_error(e, "run task")
                }
            })?;
        if let Some(task) = out.tasks().first() {
            let handle = task.task_arn().ok_or_else(|| {
                ProviderError::unavailable(NAME, "run task: the answer's task has no ARN")
            })?;
            return Ok(Launched {
                handle: handle.to_owned(),
                region: Some(self.region.clone()),
                version: None,
                address: None,
            });
        }
        let failures: Vec<String> = out.failures().iter().map(describe_failure).collect();
        if failures.is_empty() {
            return Err(ProviderError::unavailable(
                NAME,
                "run task: the answer has neither a task nor a failure",
            ));
        }
        Err(ProviderError::Rejected {
            provider: NAME,
            status: 200,
            message: format!("run task: {}", failures.join("; ")),
        })
    }

    async fn wait_started(
        &self,
        launched: &Launched,
        deadline: Deadline,
    ) -> Result<(), ProviderError> {
        match tokio::time::timeout_at(
            deadline.instant(),
            self.poll_until_running(&launched.handle),
        )
        .await
        {
            Ok(result) => result,
            Err(_) => Err(ProviderError::Timeout { provider: NAME }),
        }
    }

    async fn status(&self, handle: &str) -> Result<Option<MachineStatus>, ProviderError> {
        Ok(self
            .describe_one(handle, true)
            .await?
            .map(|task| self.to_status(&task)))
    }

    async fn terminate(&self, handle: &str) -> Result<(), ProviderError> {
        let result = self
            .client
            .stop_task()
            .cluster(&self.cluster)
            .task(handle)
            .reason(STOP_REASON)
            .send()
            .await;
        match result {
            // Stopping a stopped task answers it unchanged.
            Ok(_) => Ok(()),
            // Unknown (never existed, or stopped long ago and forgotten): nothing to stop.
            Err(e)
                if e.code() == Some("InvalidParameterException")
                    && e.message()
                        .is_some_and(|m| m.to_ascii_lowercase().contains("not found")) =>
            {
                Ok(())
            }
            Err(e) => Err(map_sdk_error(e, "stop task")),
        }
    }

    async fn find(&self, session_key: &str) -> Result<Option<MachineStatus>, ProviderError> {
        if !is_started_by(session_key) {
            // launch refuses such keys, so no task can carry it.
            return Ok(None);
        }
        // ECS wants startedBy as the only filter; it lists tasks whose desired status is RUNNING.
        let arns = self.list_task_arns(Some(session_key), None).await?;
        if arns.is_empty() {
            return Ok(None);
        }
        let (tasks, _) = self.describe(&arns, true).await?;
        let mut found: Vec<MachineStatus> = tasks
            .iter()
            .map(|t| self.to_status(t))
            .filter(|m| {
                m.labels
                    .as_ref()
                    .is_some_and(|l| l.session_key == session_key)
            })
            .collect();
        // A live task first, then the newest.
        found.sort_by_key(|m| (!m.state.is_terminal(), m.created_at));
        Ok(found.pop())
    }

    async fn list_managed(&self) -> Result<Vec<MachineStatus>, ProviderError> {
        let arns = self
            .list_task_arns(None, Some(DesiredStatus::Running))
            .await?;
        let (tasks, _) = self.describe(&arns, true).await?;
        Ok(tasks
            .iter()
            .map(|t| self.to_status(t))
            .filter(|m| m.labels.is_some())
            .collect())
    }

    fn relabel(&self) -> Option<&dyn Relabel> {
        Some(self)
    }

    async fn check(&self) -> Result<(), ProviderError> {
        let out = self
            .client
            .describe_clusters()
            .clusters(&self.cluster)
            .send()
            .await
            .map_err(|e| map_sdk_error(e, "describe clusters"))?;
        let cluster = &self.cluster;
        match out.clusters().first() {
            Some(c) if c.status() == Some("ACTIVE") => Ok(()),
            Some(c) => Err(rejected(format!(
                "cluster {cluster:?} is {}",
                c.status().unwrap_or("in an unknown state")
            ))),
            None => Err(ProviderError::Rejected {
                provider: NAME,
                status: 404,
                message: match out.failures().first() {
                    Some(f) => format!("cluster {cluster:?}: {}", describe_failure(f)),
                    None => format!("cluster {cluster:?} not found"),
                },
            }),
        }
    }
}

#[async_trait]
impl Relabel for FargateProvider {
    /// Overwrites these tags in one `TagResource` (the other tags are kept).
    async fn set_labels(
        &self,
        handle: &str,
        labels: &BTreeMap<String, String>,
    ) -> Result<(), ProviderError> {
        self.client
            .tag_resource()
            .resource_arn(handle)
            .set_tags(Some(encode_tags(labels)?))
            .send()
            .await
            .map_err(|e| map_sdk_error(e, "tag task"))?;
        Ok(())
    }
}

/// Whether ECS wants the task stopped, or it already is.
fn is_stopping(task: &Task) -> bool {
    task.desired_status() == Some("STOPPED")
        || matches!(
            task.last_status(),
            Some("DEACTIVATING" | "STOPPING" | "DEPROVISIONING" | "STOPPED" | "DELETED")
        )
}

/// Reads a task as botdispatch reports machines (see the module docs for the state mapping).
fn task_status(task: &Task, container_name: &str, region: &str, deployment: &str) -> MachineStatus {
    let last_status = task.last_status().unwrap_or("UNKNOWN");
    let stop_code = task.stop_code().map(|c| c.as_str());
    // The bot's container first; any other container that exited non-zero explains a failure too.
    let bot = task
        .containers()
        .iter()
        .find(|c| c.name() == Some(container_name));
    let exit_code = bot.and_then(|c| c.exit_code()).or_else(|| {
        task.containers()
            .iter()
            .filter_map(|c| c.exit_code())
            .find(|code| *code != 0)
    });
    let container_reason = bot.and_then(|c| c.reason()).filter(|r| !r.is_empty());
    let started_at = task.started_at().and_then(to_chrono);

    let state = task_state(task, stop_code, exit_code, started_at);
    let detail = if state.is_terminal() {
        let parts: Vec<String> = [
            stop_code.map(str::to_owned),
            task.stopped_reason()
                .filter(|r| !r.is_empty())
                .map(str::to_owned),
            container_reason.map(str::to_owned),
            exit_code.map(|code| format!("bot exited with code {code}")),
        ]
        .into_iter()
        .flatten()
        .collect();
        (!parts.is_empty()).then(|| truncate(&parts.join(": "), 300))
    } else {
        None
    };

    let tags: BTreeMap<String, String> = task
        .tags()
        .iter()
        .filter_map(|t| {
            Some((
                t.key()?.to_owned(),
                LabelCodec::ECS_TAGS.decode(t.value().unwrap_or("")),
            ))
        })
        .collect();
    let ended_at = if state.is_terminal() {
        task.stopped_at()
            .or(task.execution_stopped_at())
            .and_then(to_chrono)
    } else {
        None
    };
    MachineStatus {
        handle: task.task_arn().unwrap_or_default().to_owned(),
        state,
        provider_state: last_status.to_owned(),
        region: Some(region.to_owned()),
        created_at: task.created_at().and_then(to_chrono),
        started_at,
        ended_at,
        labels: SessionLabels::from_map_of(&tags, deployment),
        reserve: None,
        address: None,
        detail,
        failure: None,
        held: None,
    }
}

/// A task's state from its statuses, stop code and the bot's exit code.
fn task_state(
    task: &Task,
    stop_code: Option<&str>,
    exit_code: Option<i32>,
    started_at: Option<DateTime<Utc>>,
) -> MachineState {
    if !is_stopping(task) {
        return if task.last_status() == Some("RUNNING") {
            MachineState::Started
        } else {
            MachineState::Starting
        };
    }
    let failed = match stop_code {
        // Never started, or AWS took the capacity away mid-session.
        Some(
            "TaskFailedToStart" | "SpotInterruption" | "TerminationNotice" | "InfrastructureHealth",
        ) => true,
        // Stopped on purpose, whatever the bot's exit code after SIGTERM.
        Some("UserInitiated" | "ServiceSchedulerInitiated") => false,
        _ if exit_code.is_some_and(|c| c != 0) => true,
        Some(_) => false,
        // No stop code yet (moto records none): failed if it never ran.
        None => started_at.is_none() && exit_code.is_none(),
    };
    if failed {
        MachineState::Failed
    } else {
        MachineState::Ended
    }
}

fn to_chrono(at: &aws_sdk_ecs::primitives::DateTime) -> Option<DateTime<Utc>> {
    DateTime::from_timestamp(at.secs(), at.subsec_nanos())
}

fn describe_failure(failure: &Failure) -> String {
    let reason = failure.reason().unwrap_or("unknown reason");
    match failure.detail().filter(|d| !d.is_empty()) {
        Some(detail) => format!("{reason} ({detail})"),
        None => reason.to_owned(),
    }
}

/// Whether `key` can be sent as `startedBy` (and hence be part of a valid `clientToken`).
fn is_started_by(key: &str) -> bool {
    !key.is_empty()
        && key.len() <= MAX_STARTED_BY
        && key
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// The `clientToken` of a session's `RunTask`: deterministic, at most 48 printable characters.
fn client_token(session_key: &str) -> String {
    format!("{CLIENT_TOKEN_PREFIX}{session_key}")
}

/// Fargate's task sizes: CPU units and the memory sizes (MiB) each allows (Linux platform).
fn fargate_memory_options(cpu: u32) -> Vec<u32> {
    let range = |from: u32, to: u32, step: u32| (from..=to).step_by(step as usize).collect();
    match cpu {
        256 => vec![512, 1024, 2048],
        512 => range(1024, 4096, 1024),
        1024 => range(2048, 8192, 1024),
        2048 => range(4096, 16384, 1024),
        4096 => range(8192, 30720, 1024),
        8192 => range(16384, 61440, 4096),
        16384 => range(32768, 122880, 8192),
        _ => Vec::new(),
    }
}

const FARGATE_CPUS: [u32; 7] = [256, 512, 1024, 2048, 4096, 8192, 16384];

/// The smallest Fargate size with at least `cpus` vCPUs (0 means the smallest) and `memory_mb`.
fn fargate_size(cpus: u32, memory_mb: u32) -> Result<(u32, u32), ProviderError> {
    let units = cpus.saturating_mul(1024);
    FARGATE_CPUS
        .iter()
        .filter(|cpu| **cpu >= units)
        .find_map(|cpu| {
            fargate_memory_options(*cpu)
                .into_iter()
                .find(|m| *m >= memory_mb)
                .map(|m| (*cpu, m))
        })
        .ok_or_else(|| {
            rejected(format!(
                "no Fargate task size has {cpus} vCPUs and {memory_mb} MB (at most 16 vCPUs and 120 GB)"
            ))
        })
}

fn encode_tags(labels: &BTreeMap<String, String>) -> Result<Vec<Tag>, ProviderError> {
    labels
        .iter()
        .map(|(key, value)| {
            let value = LabelCodec::ECS_TAGS
                .encode(value)
                .map_err(|e| rejected(format!("label {key}: {e}")))?;
            Ok(Tag::builder().key(key).value(value).build())
        })
        .collect()
}

fn config_error(message: String) -> ProviderError {
    ProviderError::config(NAME, message)
}

/// A request botdispatch refuses to send because ECS would refuse it.
fn rejected(message: String) -> ProviderError {
    ProviderError::rejected(NAME, message)
}

/// ECS error codes that mean "slow down" (the JSON protocol sends them with HTTP 400).
const THROTTLING_CODES: [&str; 5] = [
    "ThrottlingException",
    "Throttling",
    "ThrottledException",
    "RequestLimitExceeded",
    "TooManyRequestsException",
];

/// Maps an SDK failure to a provider error, keeping ECS's error code and message.
fn map_sdk_error<E>(err: SdkError<E, HttpResponse>, what: &str) -> ProviderError
where
    E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
{
    match &err {
        SdkError::ServiceError(ctx) => {
            let status = ctx.raw().status().as_u16();
            let code = ctx.err().code().unwrap_or("UnknownError");
            let retry_after = ctx
                .raw()
                .headers()
                .get("retry-after")
                .and_then(parse_retry_after);
            classify(
                status,
                code,
                ctx.err().message().unwrap_or(""),
                retry_after,
                what,
            )
        }
        SdkError::ConstructionFailure(_) => config_error(format!(
            "{what}: the request could not be built: {}",
            error_chain(&err)
        )),
        _ => {
            let message = match &err {
                SdkError::TimeoutError(_) => format!("{what}: timed out"),
                SdkError::DispatchFailure(failure) if failure.is_timeout() => {
                    format!("{what}: timed out")
                }
                SdkError::DispatchFailure(_) => format!("{what}: {}", error_chain(&err)),
                _ => match err.raw_response() {
                    Some(raw) => format!(
                        "{what}: unreadable answer (HTTP {}): {}",
                        raw.status().as_u16(),
                        error_chain(&err)
                    ),
                    None => format!("{what}: {}", error_chain(&err)),
                },
            };
            ProviderError::Unavailable {
                provider: NAME,
                message,
                source: Some(Box::new(err)),
            }
        }
    }
}

/// Maps an ECS error answer (HTTP status, error code, message) to a provider error.
fn classify(
    status: u16,
    code: &str,
    message: &str,
    retry_after: Option<Duration>,
    what: &str,
) -> ProviderError {
    // Only the first line: AWS appends the canonical request to signature errors.
    let first_line = message.lines().next().unwrap_or_default();
    let message = format!("{what}: {code}: {}", truncate(first_line, 300));
    if status == 429 || THROTTLING_CODES.contains(&code) {
        ProviderError::Throttled {
            provider: NAME,
            retry_after,
        }
    } else if status >= 500 || code == "ServerException" || code == "ServiceUnavailableException" {
        ProviderError::unavailable(NAME, message)
    } else {
        ProviderError::Rejected {
            provider: NAME,
            status,
            message,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use aws_sdk_ecs::primitives::DateTime as AwsDateTime;
    use aws_sdk_ecs::types::{Container, TaskStopCode};

    #[test]
    fn guest_sizes_round_up_to_fargate_sizes() {
        assert_eq!(fargate_size(1, 1024).unwrap(), (1024, 2048));
        assert_eq!(fargate_size(1, 2048).unwrap(), (1024, 2048));
        assert_eq!(fargate_size(1, 2500).unwrap(), (1024, 3072));
        assert_eq!(fargate_size(1, 9000).unwrap(), (2048, 9216));
        assert_eq!(fargate_size(0, 512).unwrap(), (256, 512));
        assert_eq!(fargate_size(3, 1024).unwrap(), (4096, 8192));
        assert_eq!(fargate_size(8, 40000).unwrap(), (8192, 40960));
        assert_eq!(fargate_size(16, 122_880).unwrap(), (16384, 122_880));
        assert!(matches!(
            fargate_size(17, 1024),
            Err(ProviderError::Rejected { .. })
        ));
        assert!(fargate_size(16, 200_000).is_err());
    }

    #[test]
    fn client_tokens_and_started_by_follow_ecs_rules() {
        let key = "01k0abcdefghjkmnpqrstvwxyz";
        assert!(is_started_by(key));
        let token = client_token(key);
        assert!(token.len() <= 64 && token.bytes().all(|b| (33..=126).contains(&b)));
        assert_eq!(token, client_token(key));
        assert!(!is_started_by(""));
        assert!(!is_started_by("has space"));
        assert!(!is_started_by(&"k".repeat(37)));
    }

    fn task(last: &str, desired: &str) -> aws_sdk_ecs::types::builders::TaskBuilder {
        Task::builder()
            .task_arn("arn:aws:ecs:us-east-1:123456789012:task/bots/0123")
            .last_status(last)
            .desired_status(desired)
            .created_at(AwsDateTime::from_secs(1_700_000_000))
            .tags(
                Tag::builder()
                    .key("managed_by")
                    .value("botdispatch")
                    .build(),
            )
            .tags(Tag::builder().key("botdispatch_session").value("k").build())
            .tags(
                Tag::builder()
                    .key("botdispatch_owner")
                    .value(LabelCodec::ECS_TAGS.encode("auth0|alice").unwrap())
                    .build(),
            )
            .tags(Tag::builder().key("botdispatch_room").value("bd-k").build())
            .tags(
                Tag::builder()
                    .key("botdispatch_deadline")
                    .value("1800000000")
                    .build(),
            )
    }

    fn container(exit: Option<i32>) -> Container {
        Container::builder().name("bot").set_exit_code(exit).build()
    }

    #[test]
    fn maps_ecs_task_states() {
        let read = |t: Task| task_status(&t, "bot", "us-east-1", "default");
        for last in ["PROVISIONING", "PENDING", "ACTIVATING"] {
            assert_eq!(
                read(task(last, "RUNNING").build()).state,
                MachineState::Starting
            );
        }
        let running = read(
            task("RUNNING", "RUNNING")
                .started_at(AwsDateTime::from_secs(1_700_000_005))
                .build(),
        );
        assert_eq!(running.state, MachineState::Started);
        assert_eq!(running.labels.as_ref().unwrap().owner, "auth0|alice");
        assert_eq!(running.started_at.unwrap().timestamp(), 1_700_000_005);
        assert_eq!(running.created_at.unwrap().timestamp(), 1_700_000_000);
        assert_eq!(running.region.as_deref(), Some("us-east-1"));
        assert!(running.detail.is_none());

        // The bot exited 0: over, even while ECS still drains the task.
        let exited = read(
            task("DEACTIVATING", "STOPPED")
                .started_at(AwsDateTime::from_secs(1_700_000_005))
                .stop_code(TaskStopCode::EssentialContainerExited)
                .stopped_reason("Essential container in task exited")
                .containers(container(Some(0)))
                .build(),
        );
        assert_eq!(exited.state, MachineState::Ended);
        assert_eq!(
            exited.detail.as_deref(),
            Some("EssentialContainerExited: Essential container in task exited: bot exited with code 0")
        );

        let crashed = read(
            task("STOPPED", "STOPPED")
                .started_at(AwsDateTime::from_secs(1_700_000_005))
                .stopped_at(AwsDateTime::from_secs(1_700_000_009))
                .stop_code(TaskStopCode::EssentialContainerExited)
                .containers(container(Some(137)))
                .build(),
        );
        assert_eq!(crashed.state, MachineState::Failed);
        assert_eq!(crashed.ended_at.unwrap().timestamp(), 1_700_000_009);

        let never = read(
            task("STOPPED", "STOPPED")
                .stop_code(TaskStopCode::TaskFailedToStart)
                .stopped_reason("CannotPullContainerError: pull access denied")
                .build(),
        );
        assert_eq!(never.state, MachineState::Failed);
        assert!(never.detail.unwrap().contains("CannotPullContainerError"));

        // We stopped it, whether or not it had started; ECS removed the tags.
        let stopped = read(
            Task::builder()
                .task_arn("arn:aws:ecs:us-east-1:123456789012:task/bots/0123")
                .last_status("PENDING")
                .desired_status("STOPPED")
                .stop_code(TaskStopCode::UserInitiated)
                .stopped_reason(STOP_REASON)
                .build(),
        );
        assert_eq!(stopped.state, MachineState::Ended);
        assert!(stopped.labels.is_none());

        let spot = read(
            task("STOPPING", "STOPPED")
                .stop_code(TaskStopCode::SpotInterruption)
                .containers(container(Some(0)))
                .build(),
        );
        assert_eq!(spot.state, MachineState::Failed);

        // moto: no stop code and no timestamps.
        let moto = read(
            task("STOPPED", "STOPPED")
                .containers(container(Some(0)))
                .build(),
        );
        assert_eq!(moto.state, MachineState::Ended);
    }

    #[test]
    fn error_codes_map_to_provider_errors() {
        let throttled = classify(
            400,
            "ThrottlingException",
            "Rate exceeded",
            None,
            "run task",
        );
        assert!(matches!(
            throttled,
            ProviderError::Throttled {
                retry_after: None,
                ..
            }
        ));
        assert!(matches!(
            classify(429, "Whatever", "", Some(Duration::from_secs(2)), "x"),
            ProviderError::Throttled {
                retry_after: Some(_),
                ..
            }
        ));
        for code in [
            "ClientException",
            "InvalidParameterException",
            "AccessDeniedException",
            "ClusterNotFoundException",
            "PlatformUnknownException",
        ] {
            assert!(
                matches!(
                    classify(400, code, "no", None, "x"),
                    ProviderError::Rejected { status: 400, .. }
                ),
                "{code}"
            );
        }
        assert!(matches!(
            classify(500, "ServerException", "oops", None, "x"),
            ProviderError::Unavailable { .. }
        ));
        assert!(matches!(
            classify(503, "Anything", "", None, "x"),
            ProviderError::Unavailable { .. }
        ));
        let signature = classify(
            403,
            "InvalidSignatureException",
            "The request signature we calculated does not match.\n\nThe Canonical String for this request should have been\n'x-amz-security-token:SECRET'",
            None,
            "run task",
        );
        let text = signature.to_string();
        assert!(
            text.contains("InvalidSignatureException") && !text.contains("SECRET"),
            "{text}"
        );
    }

    #[test]
    fn config_is_validated_before_any_io() {
        let ok = FargateConfig {
            cluster: Some("bots".into()),
            task_definition: Some("bot".into()),
            container_name: "bot".into(),
            subnets: vec!["subnet-1".into()],
            ..FargateConfig::default()
        };
        assert!(ok.validate(true).is_ok());
        for (broken, key) in [
            (
                FargateConfig {
                    cluster: Some(String::new()),
                    ..ok.clone()
                },
                "fargate.cluster",
            ),
            (
                FargateConfig {
                    subnets: Vec::new(),
                    ..ok.clone()
                },
                "fargate.subnets",
            ),
            (
                FargateConfig {
                    endpoint_url: Some("not a url".into()),
                    ..ok.clone()
                },
                "fargate.endpoint_url",
            ),
        ] {
            let err = broken.validate(false).unwrap_err();
            assert!(err.0.contains(key), "{err}");
        }
        // Without a default task definition an agent must name one; with one, it is the default.
        let bare = FargateConfig {
            task_definition: None,
            ..ok.clone()
        };
        assert!(bare.workload("default", None, None).is_err());
        assert_eq!(
            ok.workload("default", None, None).unwrap(),
            Workload::TaskDefinition("bot".into())
        );
        // A zero request timeout is refused when the provider is built, before any call.
        let ctx = BuildContext::new(reqwest::Client::new()).with_request_timeout(Duration::ZERO);
        let sdk = SdkConfig::builder()
            .region(Region::new("us-east-1"))
            .behavior_version(BehaviorVersion::latest())
            .build();
        assert!(matches!(
            FargateProvider::from_sdk_config(&ctx, &sdk, ok),
            Err(ProviderError::Config { .. })
        ));
    }
}
