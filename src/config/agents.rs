//! `[agents.<name>]`: bot profiles, and the machine template each one becomes on the
//! configured provider.

use std::collections::BTreeMap;

use providers::config::is_slug;
use providers::{ConfigError, Guest, MachineTemplate, ProviderConfig, RESERVED_ENV};
use serde::Deserialize;

/// The example bot the embedded default runs: prints the contract it was given, stays up a while.
pub const EXAMPLE_BOT_SCRIPT: &str = include_str!("../../examples/bot/local-bot.sh");

/// One bot profile.
#[derive(Debug, Clone, Deserialize, Default)]
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
}

impl AgentConfig {
    /// The embedded default's agent: the example bot script, run by `sh`.
    pub fn example_bot() -> Self {
        Self {
            image: Some("examples/bot/local-bot.sh".to_owned()),
            cmd: Some(vec![
                "sh".to_owned(),
                "-c".to_owned(),
                EXAMPLE_BOT_SCRIPT.to_owned(),
                "local-bot".to_owned(),
            ]),
            env: BTreeMap::from([("BOT_LIFETIME_SECS".to_owned(), "60".to_owned())]),
            guest: Guest::default(),
        }
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
        for key in self.env.keys() {
            if RESERVED_ENV.contains(&key.as_str()) {
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
        let workload =
            provider
                .settings()
                .workload(name, self.image.as_deref(), self.cmd.as_deref())?;
        Ok(MachineTemplate {
            workload,
            cmd: self.cmd.clone(),
            guest: self.guest.clone(),
            region: None,
            env: self.env.clone(),
        })
    }
}
