//! `[agents.<name>]`: bot profiles — what a session's machine runs, how the session reaches
//! its bot (`handoff`), and an optional reserve of warm machines — and the machine template
//! each one becomes on the configured provider.

use std::collections::BTreeMap;

use providers::config::is_slug;
use providers::env::{Env, FromEnv};
use providers::{ConfigError, Guest, MachineTemplate, ProviderConfig, Tier, RESERVED_ENV};
use serde::Deserialize;

/// How a session reaches its bot (DESIGN §4).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Handoff {
    /// The machine is launched for the session, with the session in its environment.
    #[default]
    Env,
    /// The machine boots without a session; the session is delivered with `POST /bot` once
    /// its bot answers `GET /readyz` (Pipecat Cloud base images work unchanged).
    Http,
}

impl FromEnv for Handoff {
    fn from_env(name: &str, value: String) -> Result<Self, ConfigError> {
        match value.trim() {
            "env" => Ok(Self::Env),
            "http" => Ok(Self::Http),
            _ => Err(ConfigError::new(format!(
                "{name}={value:?} must be env or http"
            ))),
        }
    }
}

/// `agents.<name>.reserve`: machines prepared ahead, each for exactly one session.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReserveConfig {
    /// `hot`, `suspended` or `stopped`. `BOTDISPATCH_RESERVE_TIER` for the default agent.
    pub tier: TierName,
    /// Machines to keep: unclaimed ones, plus (with `recycle`) those in a session or being
    /// recycled. `BOTDISPATCH_RESERVE_SIZE` for the default agent.
    pub size: u32,
    /// After its session a machine is started again from its image (a fresh boot: new memory,
    /// root filesystem reset) and put back, instead of destroyed: no create call per session.
    /// `BOTDISPATCH_RESERVE_RECYCLE` for the default agent.
    #[serde(default)]
    pub recycle: bool,
    /// Keep a per-replica pool of Daily rooms created ahead too (default: on).
    #[serde(default = "default_true")]
    pub rooms: bool,
}

fn default_true() -> bool {
    true
}

/// A reserve tier as configured.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TierName(pub Tier);

impl<'de> Deserialize<'de> for TierName {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        Tier::parse(&text).map(TierName).ok_or_else(|| {
            serde::de::Error::custom(format!("tier {text:?} must be hot, suspended or stopped"))
        })
    }
}

impl FromEnv for TierName {
    fn from_env(name: &str, value: String) -> Result<Self, ConfigError> {
        Tier::parse(value.trim()).map(TierName).ok_or_else(|| {
            ConfigError::new(format!(
                "{name}={value:?} must be hot, suspended or stopped"
            ))
        })
    }
}

/// One bot profile.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AgentConfig {
    /// What to run, in the provider's terms: a container image (`fly`), a task definition
    /// (`fargate`), a job (`cloudrun`), a program (`local`). Unset: the provider's default
    /// task definition or job.
    pub image: Option<String>,
    /// Command overriding the image's; may reference the contract's env vars.
    pub cmd: Option<Vec<String>>,
    /// Static env added to the bot contract.
    pub env: BTreeMap<String, String>,
    pub guest: Guest,
    /// `env` (default) or `http`. `BOTDISPATCH_HANDOFF` for the default agent.
    pub handoff: Handoff,
    /// The bot's HTTP port in `http` mode (its `PORT`). `BOTDISPATCH_HANDOFF_PORT`, default 8080.
    pub handoff_port: u16,
    /// A reserve of warm machines (needs `handoff = "http"`).
    pub reserve: Option<ReserveConfig>,
}

impl Default for AgentConfig {
    fn default() -> Self {
        Self {
            image: None,
            cmd: None,
            env: BTreeMap::new(),
            guest: Guest::default(),
            handoff: Handoff::Env,
            handoff_port: 8080,
            reserve: None,
        }
    }
}

impl AgentConfig {
    /// The embedded default's agent: botdispatch's own example bot (`botdispatch
    /// example-bot`), handed its session over HTTP, with a small hot reserve so that a newcomer
    /// sees a warm start.
    pub fn example_bot() -> Self {
        let program = std::env::current_exe()
            .map(|p| p.display().to_string())
            .unwrap_or_else(|_| "botdispatch".to_owned());
        Self {
            image: Some(program.clone()),
            cmd: Some(vec![program, "example-bot".to_owned()]),
            // A second of "start-up" (a real bot's imports and pipeline), so the tour shows what
            // the hot reserve saves.
            env: BTreeMap::from([
                ("BOT_LIFETIME_SECS".to_owned(), "60".to_owned()),
                ("BOT_STARTUP_MS".to_owned(), "1000".to_owned()),
            ]),
            handoff: Handoff::Http,
            reserve: Some(ReserveConfig {
                tier: TierName(Tier::Hot),
                size: 2,
                rooms: true,
                recycle: false,
            }),
            ..Self::default()
        }
    }

    /// The default agent's environment overrides.
    pub(super) fn apply_env(&mut self, env: &Env) -> Result<(), ConfigError> {
        env.apply("BOTDISPATCH_HANDOFF", &mut self.handoff)?;
        env.apply("BOTDISPATCH_HANDOFF_PORT", &mut self.handoff_port)?;
        let mut tier: Option<TierName> = None;
        let mut size: Option<u32> = None;
        env.apply("BOTDISPATCH_RESERVE_TIER", &mut tier)?;
        env.apply("BOTDISPATCH_RESERVE_SIZE", &mut size)?;
        let mut recycle: Option<bool> = None;
        env.apply("BOTDISPATCH_RESERVE_RECYCLE", &mut recycle)?;
        if tier.is_some() || size.is_some() {
            let reserve = self.reserve.get_or_insert(ReserveConfig {
                tier: TierName(Tier::Hot),
                size: 0,
                rooms: true,
                recycle: false,
            });
            if let Some(tier) = tier {
                reserve.tier = tier;
            }
            if let Some(size) = size {
                reserve.size = size;
            }
        }
        match (recycle, self.reserve.as_mut()) {
            (Some(recycle), Some(reserve)) => reserve.recycle = recycle,
            // A reserve switched off with size 0 keeps its other settings for later.
            (Some(true), None) if size != Some(0) => {
                return Err(ConfigError::new(
                    "BOTDISPATCH_RESERVE_RECYCLE=true needs a reserve to recycle: set BOTDISPATCH_RESERVE_SIZE (and BOTDISPATCH_HANDOFF=http)",
                ))
            }
            _ => {}
        }
        if self.reserve.as_ref().is_some_and(|r| r.size == 0) {
            self.reserve = None;
        }
        Ok(())
    }

    /// The machine template of agent `name` on `provider` (validated: what the provider would
    /// refuse is refused here, naming the key).
    pub fn template(
        &self,
        name: &str,
        provider: &ProviderConfig,
    ) -> Result<MachineTemplate, ConfigError> {
        if !is_slug(name, 63) {
            return Err(ConfigError::new(format!(
                "agents.{name}: agent names use lowercase letters, digits, '-' and '_' (at most 63)"
            )));
        }
        if self.cmd.as_ref().is_some_and(Vec::is_empty) {
            return Err(ConfigError::new(format!("agents.{name}.cmd is empty")));
        }
        if self.guest.cpus == 0 || self.guest.memory_mb < 128 {
            return Err(ConfigError::new(format!(
                "agents.{name}.guest: cpus must be ≥ 1 and memory_mb ≥ 128"
            )));
        }
        self.validate_env(name)?;
        self.validate_handoff(name, provider)?;
        let workload =
            provider
                .settings()
                .workload(name, self.image.as_deref(), self.cmd.as_deref())?;
        let mut env = self.env.clone();
        let handoff_port = (self.handoff == Handoff::Http).then_some(self.handoff_port);
        if let Some(port) = handoff_port {
            env.insert("PORT".to_owned(), port.to_string());
        }
        Ok(MachineTemplate {
            workload,
            cmd: self.cmd.clone(),
            guest: self.guest.clone(),
            region: None,
            env,
            handoff_port,
        })
    }

    fn validate_env(&self, name: &str) -> Result<(), ConfigError> {
        for key in self.env.keys() {
            let reserved = RESERVED_ENV.contains(&key.as_str())
                || (self.handoff == Handoff::Http && key == "PORT");
            if reserved {
                return Err(ConfigError::new(format!(
                    "agents.{name}.env.{key} is set by botdispatch for every session and cannot be configured"
                )));
            }
            let valid = !key.is_empty()
                && !key.starts_with(|c: char| c.is_ascii_digit())
                && key.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
            if !valid {
                return Err(ConfigError::new(format!(
                    "agents.{name}.env: {key:?} is not an environment variable name"
                )));
            }
        }
        Ok(())
    }

    fn validate_handoff(&self, name: &str, provider: &ProviderConfig) -> Result<(), ConfigError> {
        let settings = provider.settings();
        if self.handoff == Handoff::Http && !settings.http_handoff() {
            return Err(ConfigError::new(format!(
                "agents.{name}.handoff (BOTDISPATCH_HANDOFF) = \"http\" needs machines the dispatcher can reach; the {} provider's cannot ({})",
                provider.name(),
                if provider.name() == "cloudrun" {
                    "Cloud Run jobs take no inbound traffic"
                } else {
                    "use handoff = \"env\""
                }
            )));
        }
        if self.handoff_port == 0 {
            return Err(ConfigError::new(format!(
                "agents.{name}.handoff_port (BOTDISPATCH_HANDOFF_PORT) must be a port (1 to 65535)"
            )));
        }
        let Some(reserve) = &self.reserve else {
            return Ok(());
        };
        if self.handoff != Handoff::Http {
            return Err(ConfigError::new(format!(
                "agents.{name}.reserve needs handoff = \"http\" (BOTDISPATCH_HANDOFF=http): a machine booted ahead cannot get its session through its environment"
            )));
        }
        if reserve.recycle && !settings.recycles() {
            return Err(ConfigError::new(format!(
                "agents.{name}.reserve.recycle (BOTDISPATCH_RESERVE_RECYCLE) = true: the {} provider cannot start a machine again after its session; every session gets a new one",
                provider.name()
            )));
        }
        let tier = reserve.tier.0;
        if !settings.reserve_tiers().contains(&tier) {
            return Err(ConfigError::new(format!(
                "agents.{name}.reserve.tier (BOTDISPATCH_RESERVE_TIER) = {:?}: the {} provider keeps no such reserve",
                tier.as_str(),
                provider.name()
            )));
        }
        if reserve.size > 1000 {
            return Err(ConfigError::new(format!(
                "agents.{name}.reserve.size (BOTDISPATCH_RESERVE_SIZE) = {} is more than 1000",
                reserve.size
            )));
        }
        if tier == Tier::Suspended && self.guest.memory_mb > 2048 {
            return Err(ConfigError::new(format!(
                "agents.{name}.reserve.tier = \"suspended\" needs guest.memory_mb ≤ 2048 (Fly snapshots at most 2 GB)"
            )));
        }
        Ok(())
    }
}
