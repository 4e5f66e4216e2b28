//! `rooms` and `[daily]`: where sessions' rooms and meeting tokens come from.

use std::fmt;

use providers::config::check_url;
use providers::env::{Env, FromEnv};
use providers::{ConfigError, Secret};
use serde::Deserialize;

/// Default base URL of the Daily REST API (`DAILY_API_URL`).
pub const DEFAULT_DAILY_API_URL: &str = "https://api.daily.co/v1";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RoomsKind {
    Daily,
    Local,
}

impl fmt::Display for RoomsKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Daily => "daily",
            Self::Local => "local",
        })
    }
}

impl FromEnv for RoomsKind {
    fn from_env(name: &str, value: String) -> Result<Self, ConfigError> {
        match value.trim() {
            "daily" => Ok(Self::Daily),
            "local" => Ok(Self::Local),
            _ => Err(ConfigError::new(format!(
                "{name}={value:?} must be daily or local"
            ))),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DailyConfig {
    /// `DAILY_API_KEY`; also the HS256 key of self-signed meeting tokens.
    pub api_key: Option<Secret>,
    /// `DAILY_API_URL`, default `https://api.daily.co/v1`.
    pub api_url: String,
    /// Domain id for self-signed tokens; read from `GET {api_url}/` at start-up when unset.
    /// `DAILY_DOMAIN_ID`.
    pub domain_id: Option<String>,
    /// Domain name (`<name>.daily.co`); read at start-up with the id when unset.
    /// `DAILY_DOMAIN_NAME`.
    pub domain_name: Option<String>,
}

impl Default for DailyConfig {
    fn default() -> Self {
        Self {
            api_key: None,
            api_url: DEFAULT_DAILY_API_URL.to_owned(),
            domain_id: None,
            domain_name: None,
        }
    }
}

impl DailyConfig {
    pub(super) fn apply_env(&mut self, env: &Env) -> Result<(), ConfigError> {
        env.apply("DAILY_API_KEY", &mut self.api_key)?;
        env.apply("DAILY_API_URL", &mut self.api_url)?;
        env.apply("DAILY_DOMAIN_ID", &mut self.domain_id)?;
        env.apply("DAILY_DOMAIN_NAME", &mut self.domain_name)
    }
}

/// Checks the rooms backend: local rooms are refused in production, Daily needs its key.
pub(super) fn validate(
    kind: RoomsKind,
    daily: &DailyConfig,
    production: bool,
) -> Result<(), ConfigError> {
    match kind {
        RoomsKind::Local if production => Err(ConfigError::new(
            "rooms (BOTDISPATCH_ROOMS) = \"local\" gives fake room URLs and is refused when APP_ENV=production",
        )),
        RoomsKind::Local => Ok(()),
        RoomsKind::Daily => {
            if daily.api_key.as_ref().is_none_or(Secret::is_empty) {
                return Err(ConfigError::new(
                    "daily.api_key (DAILY_API_KEY) is required when rooms = \"daily\"",
                ));
            }
            check_url("daily.api_url (DAILY_API_URL)", &daily.api_url)
        }
    }
}
