//! Configuration: a TOML file plus environment overrides, every knob with its default, and pure
//! validation whose messages name the bad key.
//!
//! The provider part of the file (`provider = "..."` and its section) belongs to the providers
//! crate ([`ProviderConfig`]); this module owns the rest: the server ([`Config`]), auth
//! ([`auth`]), rooms ([`rooms`]) and agents ([`agents`]). Loading does no I/O beyond reading
//! the file the caller names; secrets that are missing in development are generated at
//! start-up by [`Config::fill_dev_secrets`], never in production.

pub mod agents;
pub mod auth;
pub mod rooms;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use providers::config::{is_slug, ProviderFile};
use providers::env::Env;
use providers::{MachineTemplate, ProviderConfig, Secret};
use serde::Deserialize;

pub use agents::{AgentConfig, Handoff, ReserveConfig};
pub use auth::{AuthConfig, JwtAlgorithm};
pub use providers::ConfigError;
pub use rooms::{DailyConfig, RoomsKind};

pub const DEFAULT_LISTEN: &str = "127.0.0.1:7860";

/// The whole configuration. Field docs are the reference; README's table repeats them.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Address to serve on. `BOTDISPATCH_LISTEN`, default `127.0.0.1:7860`.
    pub listen: String,
    /// The provider and its settings: `provider = "local" | "fly" | "fargate" | "cloudrun"`
    /// (`BOTDISPATCH_PROVIDER`, default `local`) and that provider's section.
    #[serde(skip)]
    pub provider: ProviderConfig,
    /// `daily` | `local`. `BOTDISPATCH_ROOMS`; default `daily` when a Daily API key is set,
    /// otherwise `local`.
    pub rooms: Option<RoomsKind>,
    /// Most sessions allowed at once. `BOTDISPATCH_MAX_SESSIONS`, default 100.
    pub max_sessions: u32,
    /// How long a start may take until the machine is started. `BOTDISPATCH_START_TIMEOUT_SECS`,
    /// default 60.
    pub start_timeout_secs: u64,
    /// Longest a session may live; rooms and tokens expire then. `BOTDISPATCH_MAX_SESSION_SECS`,
    /// default 3600.
    pub max_session_secs: u64,
    /// Agent used by `POST /start`. `BOTDISPATCH_DEFAULT_AGENT`, default `default`.
    pub default_agent: String,
    /// Region hints a client may ask for; empty means clients may not choose a region.
    /// `BOTDISPATCH_ALLOWED_REGIONS` (comma separated).
    pub allowed_regions: Vec<String>,
    /// This deployment's name: 1 to 20 lowercase letters, digits and dashes. Every machine and
    /// room it creates carries it; its reaper, capacity count and listings touch only its own,
    /// so staging and production (or two regions) can share a Fly app, an ECS cluster, a Cloud
    /// Run region or a Daily domain. `BOTDISPATCH_DEPLOYMENT`, default `default`.
    pub deployment: String,
    /// Keys that sign session ids, each at least 32 bytes, the same on every replica: the first
    /// signs, all verify (rotate by prepending a new one, retire the old one later). A string
    /// or a list; `BOTDISPATCH_SESSION_SECRET` (comma separated). Required in production and
    /// never the JWT secret; in development a random key is used when unset (one replica).
    #[serde(deserialize_with = "string_or_list")]
    pub session_secret: Vec<Secret>,
    /// Timeout of each call to Daily or a provider (not the wait for a machine to start).
    /// `BOTDISPATCH_REQUEST_TIMEOUT_SECS`, default 15.
    pub request_timeout_secs: u64,
    /// Starts this replica runs at once; more are refused with 429.
    /// `BOTDISPATCH_MAX_STARTS_IN_FLIGHT`, default 32.
    pub max_starts_in_flight: u32,
    /// Starts one caller (`sub`) may make per minute; 0 = unlimited.
    /// `BOTDISPATCH_STARTS_PER_MINUTE_PER_CALLER`, default 30.
    pub starts_per_minute_per_caller: u32,
    /// How long the provider's session count is reused, milliseconds. Default 2000.
    /// `BOTDISPATCH_CAPACITY_CACHE_MS`.
    pub capacity_cache_ms: u64,
    /// A start that finds no capacity waits up to this long for a slot (FIFO) before its 429;
    /// 0 (the default): refused at once. `BOTDISPATCH_QUEUE_TIMEOUT_SECS`.
    pub queue_timeout_secs: u64,
    /// Starts of one agent that may wait at once on this replica; more are refused at once.
    /// `BOTDISPATCH_QUEUE_MAX_LENGTH`, default 1000.
    pub queue_max_length: u32,
    /// Seconds between reaper passes (0 = no reaper on this replica).
    /// `BOTDISPATCH_REAPER_INTERVAL_SECS`, default 30.
    pub reaper_interval_secs: u64,
    /// Milliseconds between reserve replenishment passes (0 = this replica does not
    /// replenish; it still claims). `BOTDISPATCH_RESERVE_INTERVAL_MS`, default 1000 (the
    /// provider's list limit).
    pub reserve_interval_ms: u64,
    /// The reaper leaves machines and rooms younger than the start timeout plus this alone.
    /// `BOTDISPATCH_REAPER_GRACE_SECS`, default 30.
    pub reaper_grace_secs: u64,
    /// On SIGTERM, how long in-flight starts may run before they are cancelled and cleaned up.
    /// `BOTDISPATCH_SHUTDOWN_GRACE_SECS`, default 30.
    pub shutdown_grace_secs: u64,
    /// Multiplies the providers' and Daily's documented rate limits (1 = as documented; 0 = off,
    /// for load tests against fakes). `BOTDISPATCH_OUTBOUND_RATE_SCALE`.
    pub outbound_rate_scale: f64,
    /// A client must send its request headers within this many seconds. Default 10.
    /// `BOTDISPATCH_HEADER_READ_TIMEOUT_SECS`.
    pub header_read_timeout_secs: u64,
    /// A client must send its request body within this many seconds. Default 10.
    /// `BOTDISPATCH_BODY_READ_TIMEOUT_SECS`.
    pub body_read_timeout_secs: u64,
    /// Bearer token required by `GET /metrics`; unset: open (bind the port privately).
    /// `BOTDISPATCH_METRICS_TOKEN`.
    pub metrics_token: Option<Secret>,
    /// Browser origins (`https://app.example.com`) allowed to call the API directly with a
    /// bearer token (CORS); `*` allows any. Empty (the default): no CORS headers, browsers
    /// must go through the caller's backend. `BOTDISPATCH_CORS_ALLOWED_ORIGINS` (comma
    /// separated).
    pub cors_allowed_origins: Vec<String>,
    /// `development` (default), `test` or `production`; production refuses the local backends.
    /// `APP_ENV`.
    pub app_env: String,
    pub auth: AuthConfig,
    pub daily: DailyConfig,
    /// Bot profiles by name. With none configured, one agent named `default` is made from
    /// `BOTDISPATCH_BOT_IMAGE` (or, for the local provider, the example bot).
    pub agents: BTreeMap<String, AgentConfig>,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            listen: DEFAULT_LISTEN.to_owned(),
            provider: ProviderConfig::default(),
            rooms: None,
            max_sessions: 100,
            start_timeout_secs: 60,
            max_session_secs: 3600,
            default_agent: "default".to_owned(),
            allowed_regions: Vec::new(),
            deployment: "default".to_owned(),
            session_secret: Vec::new(),
            request_timeout_secs: 15,
            max_starts_in_flight: 32,
            starts_per_minute_per_caller: 30,
            capacity_cache_ms: 2000,
            queue_timeout_secs: 0,
            queue_max_length: 1000,
            reaper_interval_secs: 30,
            reserve_interval_ms: 1000,
            reaper_grace_secs: 30,
            shutdown_grace_secs: 30,
            outbound_rate_scale: 1.0,
            header_read_timeout_secs: 10,
            body_read_timeout_secs: 10,
            metrics_token: None,
            cors_allowed_origins: Vec::new(),
            app_env: "development".to_owned(),
            auth: AuthConfig::default(),
            daily: DailyConfig::default(),
            agents: BTreeMap::new(),
        }
    }
}

impl Config {
    /// Reads the optional file, applies the environment, fills defaults and validates.
    /// `env` is a lookup so tests need not touch the process environment.
    pub fn load(
        file: Option<&std::path::Path>,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Self, ConfigError> {
        let text = match file {
            Some(path) => std::fs::read_to_string(path).map_err(|e| {
                ConfigError::new(format!("cannot read config file {}: {e}", path.display()))
            })?,
            None => String::new(),
        };
        Self::parse(&text, env)
    }

    /// A TOML document plus the environment, with defaults filled, validated.
    pub fn parse(text: &str, env: &dyn Fn(&str) -> Option<String>) -> Result<Self, ConfigError> {
        let env = Env::new(env);
        let file_error =
            |e: toml::de::Error| ConfigError::new(format!("config file: {}", e.message()));
        let mut table: toml::Table = toml::from_str(text).map_err(file_error)?;
        let mut provider_part = toml::Table::new();
        for key in ProviderFile::KEYS {
            if let Some(value) = table.remove(key) {
                provider_part.insert(key.to_owned(), value);
            }
        }
        let mut config: Config = table.try_into().map_err(file_error)?;
        let provider_file: ProviderFile = provider_part.try_into().map_err(file_error)?;
        config.provider = ProviderConfig::load(provider_file, &env)?;
        config.apply_env(&env)?;
        config.fill_defaults();
        config.apply_default_agent_env(&env)?;
        config.validate()?;
        Ok(config)
    }

    /// Applies the documented environment variables over the file's values.
    fn apply_env(&mut self, env: &Env) -> Result<(), ConfigError> {
        env.apply("BOTDISPATCH_LISTEN", &mut self.listen)?;
        env.apply("BOTDISPATCH_ROOMS", &mut self.rooms)?;
        env.apply("BOTDISPATCH_MAX_SESSIONS", &mut self.max_sessions)?;
        env.apply(
            "BOTDISPATCH_START_TIMEOUT_SECS",
            &mut self.start_timeout_secs,
        )?;
        env.apply("BOTDISPATCH_MAX_SESSION_SECS", &mut self.max_session_secs)?;
        env.apply(
            "BOTDISPATCH_REQUEST_TIMEOUT_SECS",
            &mut self.request_timeout_secs,
        )?;
        env.apply(
            "BOTDISPATCH_MAX_STARTS_IN_FLIGHT",
            &mut self.max_starts_in_flight,
        )?;
        env.apply(
            "BOTDISPATCH_STARTS_PER_MINUTE_PER_CALLER",
            &mut self.starts_per_minute_per_caller,
        )?;
        env.apply(
            "BOTDISPATCH_REAPER_INTERVAL_SECS",
            &mut self.reaper_interval_secs,
        )?;
        env.apply("BOTDISPATCH_REAPER_GRACE_SECS", &mut self.reaper_grace_secs)?;
        env.apply("BOTDISPATCH_CAPACITY_CACHE_MS", &mut self.capacity_cache_ms)?;
        env.apply(
            "BOTDISPATCH_QUEUE_TIMEOUT_SECS",
            &mut self.queue_timeout_secs,
        )?;
        env.apply("BOTDISPATCH_QUEUE_MAX_LENGTH", &mut self.queue_max_length)?;
        env.apply(
            "BOTDISPATCH_RESERVE_INTERVAL_MS",
            &mut self.reserve_interval_ms,
        )?;
        env.apply(
            "BOTDISPATCH_SHUTDOWN_GRACE_SECS",
            &mut self.shutdown_grace_secs,
        )?;
        env.apply(
            "BOTDISPATCH_OUTBOUND_RATE_SCALE",
            &mut self.outbound_rate_scale,
        )?;
        env.apply(
            "BOTDISPATCH_HEADER_READ_TIMEOUT_SECS",
            &mut self.header_read_timeout_secs,
        )?;
        env.apply(
            "BOTDISPATCH_BODY_READ_TIMEOUT_SECS",
            &mut self.body_read_timeout_secs,
        )?;
        env.apply("BOTDISPATCH_DEFAULT_AGENT", &mut self.default_agent)?;
        env.apply("BOTDISPATCH_ALLOWED_REGIONS", &mut self.allowed_regions)?;
        env.apply("BOTDISPATCH_DEPLOYMENT", &mut self.deployment)?;
        env.apply("BOTDISPATCH_SESSION_SECRET", &mut self.session_secret)?;
        env.apply("BOTDISPATCH_METRICS_TOKEN", &mut self.metrics_token)?;
        env.apply(
            "BOTDISPATCH_CORS_ALLOWED_ORIGINS",
            &mut self.cors_allowed_origins,
        )?;
        env.apply("APP_ENV", &mut self.app_env)?;
        self.auth.apply_env(env)?;
        self.daily.apply_env(env)?;
        if let Some(image) = env.get("BOTDISPATCH_BOT_IMAGE") {
            self.agents
                .entry(self.default_agent.clone())
                .or_default()
                .image = Some(image);
        }
        Ok(())
    }

    /// The default agent's environment overrides (handoff, reserve), once the default agent
    /// exists.
    fn apply_default_agent_env(&mut self, env: &Env) -> Result<(), ConfigError> {
        match self.agents.get_mut(&self.default_agent) {
            Some(agent) => agent.apply_env(env),
            None => Ok(()),
        }
    }

    /// Derives what follows from other settings: the rooms backend and the default agent.
    fn fill_defaults(&mut self) {
        if self.rooms.is_none() {
            self.rooms = Some(if self.daily.api_key.is_some() {
                RoomsKind::Daily
            } else {
                RoomsKind::Local
            });
        }
        if self.agents.contains_key(&self.default_agent) {
            return;
        }
        let default_target = self
            .provider
            .settings()
            .workload(&self.default_agent, None, None)
            .is_ok();
        if default_target {
            // The provider's configured task definition / job is the default agent.
            self.agents
                .insert(self.default_agent.clone(), AgentConfig::default());
        } else if matches!(self.provider, ProviderConfig::Local(_)) {
            self.agents
                .insert(self.default_agent.clone(), AgentConfig::example_bot());
        }
    }

    /// Generates the secrets a development setup left out (never in production: validation
    /// refuses that first). Returns whether the JWT secret was generated.
    pub fn fill_dev_secrets(&mut self) -> bool {
        if self.auth.jwt_secret.is_some() || self.auth.jwt_public_key_file.is_some() {
            return false;
        }
        let mut bytes = [0u8; 32];
        rand::RngCore::fill_bytes(&mut rand::rng(), &mut bytes);
        let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
        self.auth.jwt_secret = Some(Secret::new(hex));
        true
    }

    pub fn is_production(&self) -> bool {
        self.app_env.eq_ignore_ascii_case("production")
    }

    pub fn rooms_kind(&self) -> RoomsKind {
        self.rooms.unwrap_or(RoomsKind::Local)
    }

    pub fn start_timeout(&self) -> Duration {
        Duration::from_secs(self.start_timeout_secs)
    }

    pub fn max_session(&self) -> Duration {
        Duration::from_secs(self.max_session_secs)
    }

    pub fn request_timeout(&self) -> Duration {
        Duration::from_secs(self.request_timeout_secs)
    }

    pub fn shutdown_grace(&self) -> Duration {
        Duration::from_secs(self.shutdown_grace_secs)
    }

    pub fn listen_addr(&self) -> Result<SocketAddr, ConfigError> {
        self.listen.parse().map_err(|_| {
            ConfigError::new(format!(
                "listen (BOTDISPATCH_LISTEN) = {:?} is not an address like 127.0.0.1:7860",
                self.listen
            ))
        })
    }

    fn validate_session_secrets(&self, production: bool) -> Result<(), ConfigError> {
        let key = "session_secret (BOTDISPATCH_SESSION_SECRET)";
        if self.session_secret.is_empty() && production {
            return Err(ConfigError::new(format!(
                "{key} is required when APP_ENV=production: 32 bytes or more of its own, the same on every replica (e.g. `openssl rand -hex 32`)"
            )));
        }
        if self.session_secret.iter().any(|s| s.expose().len() < 32) {
            return Err(ConfigError::new(format!(
                "{key}: every secret must be at least 32 bytes"
            )));
        }
        let jwt = self.auth.jwt_secret.as_ref().map(Secret::expose);
        if self.session_secret.iter().any(|s| Some(s.expose()) == jwt) {
            return Err(ConfigError::new(format!(
                "{key} must not be the JWT secret (BOTDISPATCH_JWT_SECRET): whoever mints tokens must not be able to sign session ids"
            )));
        }
        Ok(())
    }

    /// Every agent's machine template on the configured provider.
    pub fn templates(&self) -> Result<BTreeMap<String, MachineTemplate>, ConfigError> {
        self.agents
            .iter()
            .map(|(name, agent)| Ok((name.clone(), agent.template(name, &self.provider)?)))
            .collect()
    }

    /// Pure checks: no network, no clock. Every message names the key.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let err = |m: &str| Err(ConfigError::new(m));
        self.listen_addr()?;
        if self.start_timeout_secs == 0 {
            return err("start_timeout_secs (BOTDISPATCH_START_TIMEOUT_SECS) must be at least 1");
        }
        if self.max_session_secs < 60 {
            return err("max_session_secs (BOTDISPATCH_MAX_SESSION_SECS) must be at least 60");
        }
        if self.start_timeout_secs >= self.max_session_secs {
            return err(
                "start_timeout_secs must be shorter than max_session_secs (a session must outlive its start)",
            );
        }
        if self.max_sessions == 0 {
            return err("max_sessions (BOTDISPATCH_MAX_SESSIONS) must be at least 1");
        }
        if self.max_starts_in_flight == 0 {
            return err(
                "max_starts_in_flight (BOTDISPATCH_MAX_STARTS_IN_FLIGHT) must be at least 1",
            );
        }
        if !(self.outbound_rate_scale >= 0.0 && self.outbound_rate_scale.is_finite()) {
            return err(
                "outbound_rate_scale (BOTDISPATCH_OUTBOUND_RATE_SCALE) must be a number ≥ 0",
            );
        }
        if self.header_read_timeout_secs == 0 || self.body_read_timeout_secs == 0 {
            return err("header_read_timeout_secs and body_read_timeout_secs must be at least 1");
        }
        if self.request_timeout_secs == 0 {
            return err(
                "request_timeout_secs (BOTDISPATCH_REQUEST_TIMEOUT_SECS) must be at least 1",
            );
        }
        if let Some(region) = self.allowed_regions.iter().find(|r| !is_slug(r, 32)) {
            return Err(ConfigError::new(format!(
                "allowed_regions (BOTDISPATCH_ALLOWED_REGIONS): {region:?} is not a region code"
            )));
        }
        if !matches!(
            self.app_env.to_ascii_lowercase().as_str(),
            "development" | "production" | "test"
        ) {
            return Err(ConfigError::new(format!(
                "app_env (APP_ENV) = {:?} must be development, test or production",
                self.app_env
            )));
        }
        validate_cors_origins(&self.cors_allowed_origins)?;
        if !is_deployment_name(&self.deployment) {
            return Err(ConfigError::new(format!(
                "deployment (BOTDISPATCH_DEPLOYMENT) = {:?} must be 1 to 20 lowercase letters, digits and dashes, beginning and ending with a letter or digit",
                self.deployment
            )));
        }
        let production = self.is_production();
        self.auth.validate(production)?;
        self.provider.settings().validate(production)?;
        rooms::validate(self.rooms_kind(), &self.daily, production)?;
        self.validate_session_secrets(production)?;
        self.auth.validate_audience(production)?;
        if !self.agents.contains_key(&self.default_agent) {
            return Err(ConfigError::new(format!(
                "default_agent (BOTDISPATCH_DEFAULT_AGENT) = {:?} is not configured under [agents] (set BOTDISPATCH_BOT_IMAGE or add [agents.{}])",
                self.default_agent, self.default_agent
            )));
        }
        self.templates().map(drop)
    }
}

/// Each allowed origin must be exactly what a browser sends in `Origin`: `scheme://host[:port]`,
/// http(s), lowercase, no path and no trailing slash (anything else would never match); or `*`
/// alone.
fn validate_cors_origins(origins: &[String]) -> Result<(), ConfigError> {
    let key = "cors_allowed_origins (BOTDISPATCH_CORS_ALLOWED_ORIGINS)";
    if origins.iter().any(|o| o == "*") {
        return match origins.len() {
            1 => Ok(()),
            _ => Err(ConfigError::new(format!(
                "{key}: \"*\" allows every origin and cannot be combined with others"
            ))),
        };
    }
    for origin in origins {
        let canonical = url::Url::parse(origin)
            .ok()
            .filter(|u| matches!(u.scheme(), "http" | "https") && u.host().is_some())
            .map(|u| u.origin().ascii_serialization());
        if canonical.as_deref() != Some(origin.as_str()) {
            return Err(ConfigError::new(format!(
                "{key}: {origin:?} is not an origin like https://app.example.com (scheme, host and optional port; lowercase; no path, no trailing slash){}",
                canonical
                    .filter(|c| c != "null")
                    .map(|c| format!("; did you mean {c:?}?"))
                    .unwrap_or_default()
            )));
        }
    }
    Ok(())
}

/// A deployment name: 1 to 20 of `[a-z0-9-]`, beginning and ending with a letter or digit.
fn is_deployment_name(name: &str) -> bool {
    let alnum = |c: Option<char>| c.is_some_and(|c| c.is_ascii_lowercase() || c.is_ascii_digit());
    (1..=20).contains(&name.len())
        && alnum(name.chars().next())
        && alnum(name.chars().last())
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
}

/// A string or a list of strings, as secrets.
fn string_or_list<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<Secret>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum OneOrMany {
        One(Secret),
        Many(Vec<Secret>),
    }
    Ok(match OneOrMany::deserialize(d)? {
        OneOrMany::One(s) => vec![s],
        OneOrMany::Many(v) => v,
    })
}

#[cfg(test)]
mod tests;
