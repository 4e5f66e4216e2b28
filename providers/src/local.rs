//! The `local` provider: one child process per session, for development and the embedded default.
//!
//! The child gets the same environment contract as a cloud machine (never argv, never the
//! dispatcher's own environment), runs in its own process group so a stop reaches everything it
//! spawned, and is reaped as soon as it exits. The process table lives in this process only,
//! which is fine for a provider that cannot outlive it; `APP_ENV=production` refuses it.
//!
//! For the `http` handoff a machine listens on a free loopback port the provider picks and
//! passes as `PORT`. The reserve keeps all three tiers: hot (a running process), suspended (a
//! process stopped with SIGSTOP once ready; a claim continues it with SIGCONT) and stopped (a
//! command not spawned until claimed).

use std::collections::{BTreeMap, HashMap};
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
use crate::labels::{key, ROLE_SESSION};
use crate::{
    Deadline, HttpHandoff, Launched, MachineProvider, MachineState, MachineStatus, MachineTemplate,
    ProviderError, Relabel, Reserve, ReserveLabels, SessionBinding, SessionLabels, Tier, Workload,
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

    fn http_handoff(&self) -> bool {
        true
    }

    fn reserve_tiers(&self) -> &'static [Tier] {
        &[Tier::Hot, Tier::Suspended, Tier::Stopped]
    }

    fn recycles(&self) -> bool {
        true
    }

    async fn build(&self, ctx: &BuildContext) -> Result<Arc<dyn MachineProvider>, ProviderError> {
        Ok(Arc::new(
            LocalProvider::new(self.clone()).with_deployment(&ctx.deployment),
        ))
    }
}

/// What to run for a machine: kept so that a stopped reserve machine can be spawned later.
#[derive(Debug, Clone)]
struct Command0 {
    argv: Vec<String>,
    env: BTreeMap<String, String>,
}

/// Where a process is, in the words `provider_state` uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// A stopped-tier reserve machine: its command is not spawned yet.
    NotSpawned,
    Running,
    /// Stopped with SIGSTOP (a suspended-tier reserve machine).
    Suspended,
    Exited,
}

#[derive(Debug)]
struct Entry {
    pid: Option<u32>,
    state: MachineState,
    phase: Phase,
    labels: BTreeMap<String, String>,
    command: Command0,
    /// The loopback port of its bot server, for the `http` handoff.
    port: Option<u16>,
    created_at: DateTime<Utc>,
    started_at: Option<DateTime<Utc>>,
    ended_at: Option<DateTime<Utc>>,
    detail: Option<String>,
    /// Set when we asked it to stop, so a signal exit reads as `ended`, not `failed`.
    stopping: bool,
    /// SIGTERM was sent right after the `http` handoff: the bot finishes its session and exits,
    /// and dying by that SIGTERM (as uvicorn re-raises it) is a normal end.
    ended_after_session: bool,
}

impl Entry {
    /// Records the process's exit. Exiting non-zero (or by a signal) after we asked it to stop
    /// is still a normal end.
    fn exited(&mut self, result: std::io::Result<std::process::ExitStatus>) {
        self.ended_at = Some(Utc::now());
        self.phase = Phase::Exited;
        let (state, detail) = match result {
            Ok(status) if status.success() => {
                (MachineState::Ended, "bot exited with code 0".to_owned())
            }
            Ok(status) => match status.code() {
                Some(code) => (MachineState::Failed, format!("bot exited with code {code}")),
                None if self.stopping => (MachineState::Ended, "bot stopped by signal".to_owned()),
                None if self.ended_after_session
                    && std::os::unix::process::ExitStatusExt::signal(&status)
                        == Some(Signal::SIGTERM as i32) =>
                {
                    (
                        MachineState::Ended,
                        "bot ended after its session (SIGTERM)".to_owned(),
                    )
                }
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

    fn deployment(&self) -> Option<&str> {
        self.labels.get(key::DEPLOYMENT).map(String::as_str)
    }

    fn status(&self, handle: &str, deployment: &str) -> MachineStatus {
        MachineStatus {
            handle: handle.to_owned(),
            state: self.state,
            provider_state: match self.phase {
                Phase::NotSpawned => "stopped",
                Phase::Running => "running",
                Phase::Suspended => "suspended",
                Phase::Exited if self.state == MachineState::Failed => "failed",
                Phase::Exited => "exited",
            }
            .to_owned(),
            region: Some("local".to_owned()),
            created_at: Some(self.created_at),
            started_at: self.started_at,
            ended_at: self.ended_at,
            labels: SessionLabels::from_map_of(&self.labels, deployment),
            reserve: ReserveLabels::from_map_of(&self.labels, deployment),
            address: self.port.map(|p| format!("127.0.0.1:{p}")),
            detail: self.detail.clone(),
            failure: crate::labels::failure_of(&self.labels),
            held: ReserveLabels::held_of(&self.labels, deployment),
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

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Entry>> {
        // A poisoned table only means a panic elsewhere; the data is still consistent per entry.
        self.table.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn state_of(&self, handle: &str) -> Option<MachineState> {
        self.lock().get(handle).map(|e| e.state)
    }

    fn notify(&self) {
        self.changed.send_modify(|v| *v += 1);
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

    /// Signals the process group of `handle`; `stopping` marks an exit as asked for.
    fn signal(&self, handle: &str, signal: Signal, stopping: bool) {
        let mut table = self.lock();
        if let Some(entry) = table.get_mut(handle) {
            entry.stopping |= stopping;
            if let (Some(pid), false) = (entry.pid, entry.state.is_terminal()) {
                // The child leads its own process group: signal the group so the bot's own
                // children get it too. ESRCH (already gone) is fine.
                let _ = killpg(Pid::from_raw(pid as i32), signal);
            }
        }
    }

    /// The command of a machine of `template` with `env` (its contract or handoff secret),
    /// listening on `port` for the `http` handoff.
    fn command(
        template: &MachineTemplate,
        env: BTreeMap<&str, &str>,
        port: Option<u16>,
    ) -> Result<Command0, ProviderError> {
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
        let mut env: BTreeMap<String, String> = env
            .into_iter()
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect();
        if let Some(port) = port {
            env.insert("PORT".to_owned(), port.to_string());
        }
        Ok(Command0 { argv, env })
    }

    /// Spawns `command`. Like a fresh VM: nothing of the dispatcher's own environment (its
    /// secrets, cloud credentials) reaches the bot; only PATH and HOME, to find programs.
    fn spawn(command: &Command0) -> Result<tokio::process::Child, ProviderError> {
        let mut process = Command::new(&command.argv[0]);
        process.args(&command.argv[1..]).env_clear();
        for inherited in ["PATH", "HOME"] {
            if let Some(value) = std::env::var_os(inherited) {
                process.env(inherited, value);
            }
        }
        process
            .envs(&command.env)
            .stdin(Stdio::null())
            .stdout(Stdio::inherit())
            .stderr(Stdio::inherit())
            .process_group(0)
            .kill_on_drop(true);
        process.spawn().map_err(|e| ProviderError::Rejected {
            provider: NAME,
            status: 0,
            message: format!("cannot run {:?}: {e}", command.argv[0]),
        })
    }

    /// Adds a machine named `handle` (spawned unless `spawn` is false); `Conflict` if a live
    /// one has the name.
    fn add(
        &self,
        handle: &str,
        command: Command0,
        port: Option<u16>,
        labels: BTreeMap<String, String>,
        spawn: bool,
    ) -> Result<Launched, ProviderError> {
        self.prune();
        let mut table = self.lock();
        if table.get(handle).is_some_and(|e| !e.state.is_terminal()) {
            return Err(ProviderError::Conflict {
                provider: NAME,
                name: handle.to_owned(),
            });
        }
        let child = spawn.then(|| Self::spawn(&command)).transpose()?;
        let now = Utc::now();
        table.insert(
            handle.to_owned(),
            Entry {
                pid: child.as_ref().and_then(|c| c.id()),
                state: if spawn {
                    MachineState::Started
                } else {
                    MachineState::Starting
                },
                phase: if spawn {
                    Phase::Running
                } else {
                    Phase::NotSpawned
                },
                labels,
                command,
                port,
                created_at: now,
                started_at: spawn.then_some(now),
                ended_at: None,
                detail: None,
                stopping: false,
                ended_after_session: false,
            },
        );
        drop(table);
        self.notify();
        if let Some(child) = child {
            self.reap_on_exit(handle.to_owned(), child);
        }
        Ok(Launched {
            handle: handle.to_owned(),
            region: Some("local".to_owned()),
            version: None,
            address: port.map(|p| format!("127.0.0.1:{p}")),
        })
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

    /// Statuses of this deployment's live machines that `keep` accepts.
    fn statuses(&self, keep: impl Fn(&MachineStatus) -> bool) -> Vec<MachineStatus> {
        self.lock()
            .iter()
            .filter(|(_, e)| !e.state.is_terminal() && e.deployment() == Some(&self.deployment))
            .map(|(h, e)| e.status(h, &self.deployment))
            .filter(|m| keep(m))
            .collect()
    }
}

/// A free loopback port (bound, then released for the bot to take).
fn free_port() -> Result<u16, ProviderError> {
    std::net::TcpListener::bind(("127.0.0.1", 0))
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(|e| ProviderError::Unavailable {
            provider: NAME,
            message: "no free loopback port for the bot".into(),
            source: Some(Box::new(e)),
        })
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
        let port = template.handoff_port.map(|_| free_port()).transpose()?;
        let command = Self::command(template, session.machine_env(template), port)?;
        self.add(&session.name, command, port, session.labels.to_map(), true)
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
        Ok(self
            .lock()
            .get(handle)
            .map(|e| e.status(handle, &self.deployment)))
    }

    async fn terminate(&self, handle: &str) -> Result<(), ProviderError> {
        let not_spawned = {
            let mut table = self.lock();
            match table.get_mut(handle) {
                Some(e) if e.phase == Phase::NotSpawned => {
                    e.exited(Ok(std::process::ExitStatus::default()));
                    true
                }
                _ => false,
            }
        };
        if not_spawned {
            self.notify();
            return Ok(());
        }
        if self.state_of(handle).is_none_or(MachineState::is_terminal) {
            return Ok(());
        }
        // A suspended process must run again to see its SIGTERM.
        self.signal(handle, Signal::SIGTERM, true);
        self.signal(handle, Signal::SIGCONT, true);
        let ended = |s: Option<MachineState>| s.is_none_or(MachineState::is_terminal);
        let grace = Duration::from_secs(self.config.stop_grace_secs);
        if ended(self.wait_for(handle, grace, ended).await) {
            return Ok(());
        }
        tracing::warn!(handle, "bot ignored SIGTERM; sending SIGKILL");
        self.signal(handle, Signal::SIGKILL, true);
        self.wait_for(handle, Duration::from_secs(5), ended).await;
        Ok(())
    }

    async fn find(&self, session_key: &str) -> Result<Option<MachineStatus>, ProviderError> {
        Ok(self
            .lock()
            .iter()
            .map(|(h, e)| e.status(h, &self.deployment))
            .find(|m| {
                m.labels
                    .as_ref()
                    .is_some_and(|l| l.session_key == session_key)
            }))
    }

    async fn list_managed(&self) -> Result<Vec<MachineStatus>, ProviderError> {
        Ok(self.statuses(|m| m.labels.is_some()))
    }

    async fn check(&self) -> Result<(), ProviderError> {
        Ok(())
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
    async fn set_labels(
        &self,
        handle: &str,
        labels: &BTreeMap<String, String>,
    ) -> Result<(), ProviderError> {
        if let Some(entry) = self.lock().get_mut(handle) {
            entry.labels.extend(labels.clone());
        }
        Ok(())
    }
}

#[async_trait]
impl HttpHandoff for LocalProvider {
    fn bot_url(&self, machine: &Launched, _port: u16) -> Result<url::Url, ProviderError> {
        let port = self.lock().get(&machine.handle).and_then(|e| e.port);
        let port = port.ok_or_else(|| {
            ProviderError::rejected(NAME, format!("{} listens on no port", machine.handle))
        })?;
        url::Url::parse(&format!("http://127.0.0.1:{port}"))
            .map_err(|e| ProviderError::rejected(NAME, e.to_string()))
    }

    async fn end_after_session(
        &self,
        handle: &str,
        _lease: Option<&str>,
    ) -> Result<(), ProviderError> {
        if let Some(entry) = self.lock().get_mut(handle) {
            entry.ended_after_session = true;
        }
        self.signal(handle, Signal::SIGTERM, false);
        Ok(())
    }
}

#[async_trait]
impl Reserve for LocalProvider {
    fn tiers(&self) -> &'static [Tier] {
        &[Tier::Hot, Tier::Suspended, Tier::Stopped]
    }

    async fn prepare(
        &self,
        template: &MachineTemplate,
        name: &str,
        labels: &ReserveLabels,
        env: &BTreeMap<String, String>,
    ) -> Result<Launched, ProviderError> {
        let port = Some(free_port()?);
        let command = Self::command(template, template.env_with(env), port)?;
        let spawn = labels.tier != Tier::Stopped;
        self.add(name, command, port, labels.to_map(&self.deployment), spawn)
    }

    /// Unclaimed reserve processes, and held ones (running a session, or exited after it and
    /// waiting to be recycled).
    async fn list_reserve(&self) -> Result<Vec<MachineStatus>, ProviderError> {
        Ok(self
            .lock()
            .iter()
            .filter(|(_, e)| e.deployment() == Some(&self.deployment))
            .map(|(h, e)| e.status(h, &self.deployment))
            .filter(|m| (m.reserve.is_some() && !m.state.is_terminal()) || m.held.is_some())
            .collect())
    }

    /// A fresh process (a fresh boot) under the table's lock, so a second recycle finds it
    /// unheld; the stopped tier waits for its claim to spawn one.
    async fn recycle(&self, handle: &str, labels: &ReserveLabels) -> Result<(), ProviderError> {
        let mut table = self.lock();
        let deployment = self.deployment.clone();
        let Some(entry) = table
            .get_mut(handle)
            .filter(|e| e.state.is_terminal())
            .filter(|e| ReserveLabels::held_of(&e.labels, &deployment).is_some())
        else {
            return Err(ProviderError::Conflict {
                provider: NAME,
                name: handle.to_owned(),
            });
        };
        for (k, v) in labels.recycled_map(&deployment) {
            if v.is_empty() {
                entry.labels.remove(&k);
            } else {
                entry.labels.insert(k, v);
            }
        }
        entry.stopping = false;
        entry.ended_after_session = false;
        entry.detail = None;
        entry.ended_at = None;
        entry.created_at = Utc::now();
        let child = if labels.tier == Tier::Stopped {
            entry.phase = Phase::NotSpawned;
            entry.state = MachineState::Starting;
            entry.started_at = None;
            entry.pid = None;
            None
        } else {
            let child = Self::spawn(&entry.command)?;
            entry.pid = child.id();
            entry.phase = Phase::Running;
            entry.state = MachineState::Started;
            entry.started_at = Some(Utc::now());
            Some(child)
        };
        drop(table);
        if let Some(child) = child {
            self.reap_on_exit(handle.to_owned(), child);
        }
        self.notify();
        Ok(())
    }

    async fn mark_ready(&self, handle: &str) -> Result<(), ProviderError> {
        let labels = BTreeMap::from([(key::READY.to_owned(), "1".to_owned())]);
        self.set_labels(handle, &labels).await
    }

    async fn suspend(&self, handle: &str) -> Result<(), ProviderError> {
        self.signal(handle, Signal::SIGSTOP, false);
        if let Some(entry) = self.lock().get_mut(handle) {
            entry.phase = Phase::Suspended;
        }
        Ok(())
    }

    /// Atomic under the table's lock: one claim wins, any other sees no reserve machine.
    async fn claim(
        &self,
        handle: &str,
        session: &SessionLabels,
    ) -> Result<Option<String>, ProviderError> {
        let mut table = self.lock();
        let deployment = &self.deployment;
        match table.get_mut(handle) {
            Some(e) if ReserveLabels::from_map_of(&e.labels, deployment).is_some() => {
                e.labels.extend(session.to_map());
                e.labels
                    .insert(key::ROLE.to_owned(), ROLE_SESSION.to_owned());
                Ok(None)
            }
            _ => Err(ProviderError::Conflict {
                provider: NAME,
                name: handle.to_owned(),
            }),
        }
    }

    /// Relabelled as a session under the table's lock first, so no claim can take it.
    async fn retire(&self, handle: &str) -> Result<(), ProviderError> {
        {
            let mut table = self.lock();
            match table.get_mut(handle) {
                Some(e) if ReserveLabels::from_map_of(&e.labels, &self.deployment).is_some() => {
                    e.labels.insert(key::ROLE.to_owned(), "retired".to_owned());
                }
                Some(_) => {
                    return Err(ProviderError::Conflict {
                        provider: NAME,
                        name: handle.to_owned(),
                    })
                }
                None => return Ok(()),
            }
        }
        self.terminate(handle).await
    }

    /// No leases here: claims are atomic under the table's lock.
    async fn release(
        &self,
        handle: &str,
        _lease: &str,
        labels: &BTreeMap<String, String>,
    ) -> Result<(), ProviderError> {
        self.set_labels(handle, labels).await
    }

    async fn start(&self, handle: &str, _lease: Option<&str>) -> Result<Launched, ProviderError> {
        let (phase, command, port) = {
            let table = self.lock();
            let entry = table
                .get(handle)
                .ok_or_else(|| ProviderError::StartFailed {
                    provider: NAME,
                    message: "process is gone".into(),
                })?;
            (entry.phase, entry.command.clone(), entry.port)
        };
        match phase {
            Phase::Suspended => {
                self.signal(handle, Signal::SIGCONT, false);
                if let Some(entry) = self.lock().get_mut(handle) {
                    entry.phase = Phase::Running;
                }
            }
            Phase::NotSpawned => {
                let child = Self::spawn(&command)?;
                if let Some(entry) = self.lock().get_mut(handle) {
                    entry.pid = child.id();
                    entry.phase = Phase::Running;
                    entry.state = MachineState::Started;
                    entry.started_at = Some(Utc::now());
                }
                self.reap_on_exit(handle.to_owned(), child);
            }
            Phase::Running | Phase::Exited => {}
        }
        self.notify();
        Ok(Launched {
            handle: handle.to_owned(),
            region: Some("local".to_owned()),
            version: None,
            address: port.map(|p| format!("127.0.0.1:{p}")),
        })
    }
}
