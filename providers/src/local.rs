//! The `local` provider: one child process per session, for development and the embedded default.
//!
//! The child gets the same environment contract as a cloud machine (never argv), runs in its own
//! process group so a stop reaches everything it spawned, and is reaped as soon as it exits. The
//! process table lives in this process only, which is fine for a provider that cannot outlive it;
//! `APP_ENV=production` refuses this provider.

use std::collections::HashMap;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;
use tokio::process::Command;
use tokio::sync::watch;

use serde::Deserialize;

use crate::config::{BuildContext, ConfigError, ProviderSettings};
use crate::env::Env;
use crate::{
    Deadline, Launched, MachineProvider, MachineState, MachineStatus, MachineTemplate,
    ProviderError, Relabel, SessionBinding, SessionLabels, Workload,
};

const NAME: &str = "local";
/// How long an ended process stays readable through `status`.
const KEEP_ENDED: Duration = Duration::from_secs(3600);

/// Settings of the `local` provider: the `[local]` section of the configuration file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LocalConfig {
    /// Seconds between SIGTERM and SIGKILL when a local bot is stopped. Default 5.
    pub stop_grace_secs: u64,
}

impl Default for LocalConfig {
    fn default() -> Self {
        Self { stop_grace_secs: 5 }
    }
}

#[async_trait]
impl ProviderSettings for LocalConfig {
    fn name(&self) -> &'static str {
        NAME
    }

    fn apply_env(&mut self, _env: &Env) -> Result<(), ConfigError> {
        Ok(())
    }

    fn validate(&self, production: bool) -> Result<(), ConfigError> {
        if production {
            return Err(ConfigError::new(
                "provider (BOTDISPATCH_PROVIDER) = \"local\" runs bots as child processes and is refused when APP_ENV=production",
            ));
        }
        Ok(())
    }

    fn workload(
        &self,
        agent: &str,
        image: Option<&str>,
        cmd: Option<&[String]>,
    ) -> Result<Workload, ConfigError> {
        let program = image
            .filter(|i| !i.trim().is_empty())
            .or_else(|| cmd.and_then(|c| c.first()).map(String::as_str));
        match program {
            Some(program) => Ok(Workload::Program(program.to_owned())),
            None => Err(ConfigError::new(format!(
                "agents.{agent}: set image (a program) or cmd"
            ))),
        }
    }

    async fn build(&self, ctx: &BuildContext) -> Result<Arc<dyn MachineProvider>, ProviderError> {
        Ok(Arc::new(
            LocalProvider::new(self.clone()).with_deployment(&ctx.deployment),
        ))
    }
}

#[derive(Debug)]
struct Entry {
    pid: Option<u32>,
    state: MachineState,
    labels: SessionLabels,
    created_at: DateTime<Utc>,
    started_at: Option<DateTime<Utc>>,
    ended_at: Option<DateTime<Utc>>,
    detail: Option<String>,
    /// Set when we asked it to stop, so a signal exit reads as `ended`, not `failed`.
    stopping: bool,
}

impl Entry {
    /// Records the process's exit. Exiting non-zero (or by a signal) after we asked it to stop
    /// is still a normal end.
    fn exited(&mut self, result: std::io::Result<std::process::ExitStatus>) {
        self.ended_at = Some(Utc::now());
        let (state, detail) = match result {
            Ok(status) if status.success() => {
                (MachineState::Ended, "bot exited with code 0".to_owned())
            }
            Ok(status) => match status.code() {
                Some(code) => (MachineState::Failed, format!("bot exited with code {code}")),
                None if self.stopping => (MachineState::Ended, "bot stopped by signal".to_owned()),
                None => (MachineState::Failed, "bot killed by a signal".to_owned()),
            },
            Err(e) => (MachineState::Failed, format!("cannot wait for bot: {e}")),
        };
        self.state = if self.stopping {
            MachineState::Ended
        } else {
            state
        };
        self.detail = Some(detail);
    }

    fn status(&self, handle: &str) -> MachineStatus {
        MachineStatus {
            handle: handle.to_owned(),
            state: self.state,
            provider_state: match self.state {
                MachineState::Starting => "spawning",
                MachineState::Started => "running",
                MachineState::Ended => "exited",
                MachineState::Failed => "failed",
            }
            .to_owned(),
            region: Some("local".to_owned()),
            created_at: Some(self.created_at),
            started_at: self.started_at,
            ended_at: self.ended_at,
            labels: Some(self.labels.clone()),
            detail: self.detail.clone(),
        }
    }
}

/// Runs each session's bot as a child process of the dispatcher.
pub struct LocalProvider {
    config: LocalConfig,
    /// Only this deployment's processes are listed, found and read as ours.
    deployment: String,
    table: Arc<Mutex<HashMap<String, Entry>>>,
    /// Bumped on every state change, so waits need no polling.
    changed: watch::Sender<u64>,
}

impl LocalProvider {
    pub fn new(config: LocalConfig) -> Self {
        Self {
            config,
            deployment: crate::labels::DEFAULT_DEPLOYMENT.to_owned(),
            table: Arc::default(),
            changed: watch::channel(0).0,
        }
    }

    /// The same provider, for `deployment`'s machines.
    pub fn with_deployment(mut self, deployment: &str) -> Self {
        self.deployment = deployment.to_owned();
        self
    }

    /// An entry's status as this deployment sees it: another deployment's process reads as
    /// not ours (no labels).
    fn status_of(&self, handle: &str, entry: &Entry) -> MachineStatus {
        let mut status = entry.status(handle);
        status.labels = status.labels.filter(|l| l.deployment == self.deployment);
        status
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Entry>> {
        // A poisoned table only means a panic elsewhere; the data is still consistent per entry.
        self.table.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn state_of(&self, handle: &str) -> Option<MachineState> {
        self.lock().get(handle).map(|e| e.state)
    }

    /// Waits until `handle` satisfies `done`, or `timeout` passes. Returns the last state seen.
    async fn wait_for(
        &self,
        handle: &str,
        timeout: Duration,
        done: impl Fn(Option<MachineState>) -> bool,
    ) -> Option<MachineState> {
        let mut rx = self.changed.subscribe();
        let wait = async {
            loop {
                let state = self.state_of(handle);
                if done(state) {
                    return state;
                }
                if rx.changed().await.is_err() {
                    return state;
                }
            }
        };
        match tokio::time::timeout(timeout, wait).await {
            Ok(state) => state,
            Err(_) => self.state_of(handle),
        }
    }

    fn signal(&self, handle: &str, signal: Signal) {
        let mut table = self.lock();
        if let Some(entry) = table.get_mut(handle) {
            entry.stopping = true;
            if let (Some(pid), false) = (entry.pid, entry.state.is_terminal()) {
                // The child leads its own process group: signal the group so the bot's own
                // children stop too. ESRCH (already gone) is fine.
                let _ = killpg(Pid::from_raw(pid as i32), signal);
            }
        }
    }

    /// Reaps the child as soon as it exits and records how it ended.
    fn reap_on_exit(&self, handle: String, mut child: tokio::process::Child) {
        let table = Arc::clone(&self.table);
        let changed = self.changed.clone();
        tokio::spawn(async move {
            let result = child.wait().await;
            let mut table = table.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(entry) = table.get_mut(&handle) {
                entry.exited(result);
            }
            drop(table);
            changed.send_modify(|v| *v += 1);
        });
    }

    fn prune(&self) {
        let cutoff = Utc::now() - chrono::Duration::from_std(KEEP_ENDED).unwrap_or_default();
        self.lock()
            .retain(|_, e| !e.state.is_terminal() || e.ended_at.is_none_or(|t| t > cutoff));
    }
}

#[async_trait]
impl MachineProvider for LocalProvider {
    fn name(&self) -> &'static str {
        NAME
    }

    async fn launch(
        &self,
        template: &MachineTemplate,
        session: &SessionBinding,
    ) -> Result<Launched, ProviderError> {
        self.prune();
        let argv: Vec<String> = match (&template.cmd, &template.workload) {
            (Some(cmd), _) if !cmd.is_empty() => cmd.clone(),
            (_, Workload::Program(program)) => vec![program.clone()],
            (_, other) => {
                return Err(ProviderError::rejected(
                    NAME,
                    format!("local runs programs, not {other:?}"),
                ))
            }
        };
        let handle = session.name.clone();
        {
            let table = self.lock();
            if table.get(&handle).is_some_and(|e| !e.state.is_terminal()) {
                return Err(ProviderError::Conflict {
                    provider: NAME,
                    name: handle,
                });
            }
        }
        // Like a fresh VM: nothing of the dispatcher's own environment (its secrets, cloud
        // credentials) reaches the bot; only PATH and HOME, to find programs, and the contract.
        let mut command = Command::new(&argv[0]);
        command.args(&argv[1..]).env_clear();
        for inherited in ["PATH", "HOME"] {
            if let Some(value) = std::env::var_os(inherited) {
                command.env(inherited, value);
            }
        }
        command
            .envs(session.machine_env(template))
            .stdin(Stdio::null())
            .stdout(Stdio::inherit())
            .stderr(Stdio::inherit())
            .process_group(0)
            .kill_on_drop(true);
        let child = command.spawn().map_err(|e| ProviderError::Rejected {
            provider: NAME,
            status: 0,
            message: format!("cannot run {:?}: {e}", argv[0]),
        })?;
        let pid = child.id();
        let now = Utc::now();
        self.lock().insert(
            handle.clone(),
            Entry {
                pid,
                state: MachineState::Started,
                labels: session.labels.clone(),
                created_at: now,
                started_at: Some(now),
                ended_at: None,
                detail: None,
                stopping: false,
            },
        );
        self.changed.send_modify(|v| *v += 1);

        self.reap_on_exit(handle.clone(), child);
        Ok(Launched {
            handle,
            region: Some("local".to_owned()),
            version: None,
        })
    }

    async fn wait_started(
        &self,
        launched: &Launched,
        deadline: Deadline,
    ) -> Result<(), ProviderError> {
        match self
            .wait_for(&launched.handle, deadline.remaining(), |s| {
                s != Some(MachineState::Starting)
            })
            .await
        {
            Some(MachineState::Started) => Ok(()),
            Some(MachineState::Starting) => Err(ProviderError::Timeout { provider: NAME }),
            Some(_) | None => {
                let detail = self
                    .lock()
                    .get(&launched.handle)
                    .and_then(|e| e.detail.clone())
                    .unwrap_or_else(|| "process is gone".to_owned());
                Err(ProviderError::StartFailed {
                    provider: NAME,
                    message: detail,
                })
            }
        }
    }

    fn is_handle(&self, handle: &str) -> bool {
        (1..=80).contains(&handle.len())
            && handle
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
    }

    async fn status(&self, handle: &str) -> Result<Option<MachineStatus>, ProviderError> {
        Ok(self.lock().get(handle).map(|e| self.status_of(handle, e)))
    }

    async fn terminate(&self, handle: &str) -> Result<(), ProviderError> {
        if self.state_of(handle).is_none_or(MachineState::is_terminal) {
            return Ok(());
        }
        self.signal(handle, Signal::SIGTERM);
        let ended = |s: Option<MachineState>| s.is_none_or(MachineState::is_terminal);
        let grace = Duration::from_secs(self.config.stop_grace_secs);
        if ended(self.wait_for(handle, grace, ended).await) {
            return Ok(());
        }
        tracing::warn!(handle, "bot ignored SIGTERM; sending SIGKILL");
        self.signal(handle, Signal::SIGKILL);
        self.wait_for(handle, Duration::from_secs(5), ended).await;
        Ok(())
    }

    async fn find(&self, session_key: &str) -> Result<Option<MachineStatus>, ProviderError> {
        Ok(self
            .lock()
            .iter()
            .find(|(_, e)| {
                e.labels.session_key == session_key && e.labels.deployment == self.deployment
            })
            .map(|(h, e)| self.status_of(h, e)))
    }

    async fn list_managed(&self) -> Result<Vec<MachineStatus>, ProviderError> {
        Ok(self
            .lock()
            .iter()
            .filter(|(_, e)| !e.state.is_terminal() && e.labels.deployment == self.deployment)
            .map(|(h, e)| self.status_of(h, e))
            .collect())
    }

    async fn check(&self) -> Result<(), ProviderError> {
        Ok(())
    }

    fn relabel(&self) -> Option<&dyn Relabel> {
        Some(self)
    }

    async fn shutdown(&self) {
        let running: Vec<String> = self
            .lock()
            .iter()
            .filter(|(_, e)| !e.state.is_terminal())
            .map(|(h, _)| h.clone())
            .collect();
        futures_util::future::join_all(running.iter().map(|h| self.terminate(h))).await;
    }
}

#[async_trait]
impl Relabel for LocalProvider {
    async fn set_deadline(&self, handle: &str, deadline: Deadline) -> Result<(), ProviderError> {
        if let Some(entry) = self.lock().get_mut(handle) {
            entry.labels.deadline = deadline;
        }
        Ok(())
    }
}
