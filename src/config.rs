//! Configuration: a TOML file plus environment overrides, every knob with its default, and pure
//! validation whose messages name the bad key.
//!
//! Loading does no I/O beyond reading the file the caller names; secrets that are missing in
//! development are generated at start-up by [`Config::fill_dev_secrets`], never in production.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use providers::{Guest, Secret};
use serde::Deserialize;

/// The example bot the embedded default runs: prints the contract it was given, stays up a while.
pub const EXAMPLE_BOT_SCRIPT: &str = include_str!("../examples/bot/local-bot.sh");

/// Env names of the bot contract (DESIGN §4); an agent's static env may not override them.
pub const CONTRACT_ENV: [&str; 4] = [
    "DAILY_ROOM_URL",
    "DAILY_ROOM_TOKEN",
    "BOTDISPATCH_SESSION_ID",
    "BOTDISPATCH_BODY",
];

pub const DEFAULT_LISTEN: &str = "127.0.0.1:7860";
pub const DEFAULT_FLY_API_URL: &str = "https://api.machines.dev/v1";
pub const DEFAULT_DAILY_API_URL: &str = "https://api.daily.co/v1";

/// A configuration that cannot be used; the message names the key and, where there is one, its
/// environment variable.
#[derive(Debug, thiserror::Error)]
#[error("invalid configuration: {0}")]
pub struct ConfigError(pub String);

fn err<T>(msg: impl Into<String>) -> Result<T, ConfigError> {
    Err(ConfigError(msg.into()))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ProviderKind {
    Local,
    Fly,
    Fargate,
    Cloudrun,
}

impl ProviderKind {
    fn parse(value: &str) -> Option<Self> {
        match value {
            "local" => Some(Self::Local),
            "fly" => Some(Self::Fly),
            "fargate" => Some(Self::Fargate),
            "cloudrun" => Some(Self::Cloudrun),
            _ => None,
        }
    }
}

impl fmt::Display for ProviderKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Local => "local",
            Self::Fly => "fly",
            Self::Fargate => "fargate",
            Self::Cloudrun => "cloudrun",
        })
    }
}

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

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
pub enum JwtAlgorithm {
    #[default]
    HS256,
    RS256,
    ES256,
}

/// The whole configuration. Field docs are the reference; README's table repeats them.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Address to serve on. `BOTDISPATCH_LISTEN`, default `127.0.0.1:7860`.
    pub listen: String,
    /// `local` | `fly` | `fargate` | `cloudrun`. `BOTDISPATCH_PROVIDER`, default `local`.
    pub provider: ProviderKind,
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
    /// Key that signs session ids; must be the same on every replica. `BOTDISPATCH_SESSION_SECRET`;
    /// derived from the JWT secret when unset and the JWT secret is shared.
    pub session_secret: Option<Secret>,
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
    pub capacity_cache_ms: u64,
    /// Seconds between reaper passes (0 = no reaper on this replica).
    /// `BOTDISPATCH_REAPER_INTERVAL_SECS`, default 30.
    pub reaper_interval_secs: u64,
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
    pub header_read_timeout_secs: u64,
    /// A client must send its request body within this many seconds. Default 10.
    pub body_read_timeout_secs: u64,
    /// Bearer token required by `GET /metrics`; unset: open (bind the port privately).
    /// `BOTDISPATCH_METRICS_TOKEN`.
    pub metrics_token: Option<Secret>,
    /// `development` (default) or `production`; production refuses the local backends.
    /// `APP_ENV`.
    pub app_env: String,
    pub auth: AuthConfig,
    pub daily: DailyConfig,
    pub fly: FlyConfig,
    pub fargate: FargateSection,
    pub cloudrun: CloudRunSection,
    pub local: LocalConfig,
    /// Bot profiles by name. With none configured, one agent named `default` is made from
    /// `BOTDISPATCH_BOT_IMAGE` (or, for the local provider, the example bot).
    pub agents: BTreeMap<String, AgentConfig>,
}

#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct AuthConfig {
    /// Shared HS256 secret (at least 32 bytes). `BOTDISPATCH_JWT_SECRET`.
    pub jwt_secret: Option<Secret>,
    /// PEM public key for RS256/ES256. `BOTDISPATCH_JWT_PUBLIC_KEY_FILE`.
    pub jwt_public_key_file: Option<PathBuf>,
    /// `HS256` (default with a secret), `RS256` or `ES256`. `BOTDISPATCH_JWT_ALGORITHM`.
    pub jwt_algorithm: Option<JwtAlgorithm>,
    /// Required `aud` claim. `BOTDISPATCH_JWT_AUDIENCE`.
    pub audience: Option<String>,
    /// Required `iss` claim. `BOTDISPATCH_JWT_ISSUER`.
    pub issuer: Option<String>,
    /// Clock skew allowed on `exp`/`nbf`, seconds. Default 30.
    pub leeway_secs: Option<u64>,
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

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FlyConfig {
    /// `FLY_API_TOKEN`.
    pub api_token: Option<Secret>,
    /// The app the bot machines run in. `FLY_APP_NAME`.
    pub app_name: Option<String>,
    /// `FLY_API_URL`, default `https://api.machines.dev/v1`.
    pub api_url: String,
    /// Region used when a start names none. `FLY_REGION`.
    pub default_region: Option<String>,
}

impl Default for FlyConfig {
    fn default() -> Self {
        Self {
            api_token: None,
            app_name: None,
            api_url: DEFAULT_FLY_API_URL.to_owned(),
            default_region: None,
        }
    }
}

/// AWS Fargate (ECS `RunTask`). Credentials and region come from the AWS SDK's standard chain
/// (`AWS_REGION`, `AWS_ACCESS_KEY_ID`/`AWS_SECRET_ACCESS_KEY`, profiles, instance roles);
/// `AWS_ENDPOINT_URL_ECS` overrides the endpoint. An agent's `image` names its task definition
/// (ECS cannot override a container image per run).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FargateSection {
    /// `BOTDISPATCH_FARGATE_CLUSTER`.
    pub cluster: Option<String>,
    /// Task definition for agents without an image. `BOTDISPATCH_FARGATE_TASK_DEFINITION`.
    pub task_definition: Option<String>,
    /// The bot's container in the task definition. `BOTDISPATCH_FARGATE_CONTAINER`, default `bot`.
    pub container_name: String,
    /// `BOTDISPATCH_FARGATE_SUBNETS` (comma separated); at least one.
    pub subnets: Vec<String>,
    /// `BOTDISPATCH_FARGATE_SECURITY_GROUPS` (comma separated).
    pub security_groups: Vec<String>,
    /// Public IP per task (public subnets without NAT). `BOTDISPATCH_FARGATE_PUBLIC_IP`.
    pub assign_public_ip: bool,
    /// Fargate Spot. `BOTDISPATCH_FARGATE_SPOT`.
    pub spot: bool,
    /// Overrides the SDK chain's region.
    pub region: Option<String>,
    /// Overrides the ECS endpoint (also `AWS_ENDPOINT_URL_ECS`, read by the SDK).
    pub endpoint_url: Option<String>,
}

impl Default for FargateSection {
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

/// Google Cloud Run jobs (Admin API v2). An agent's `image` names the job to run (Cloud Run
/// cannot override a job's image per execution).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CloudRunSection {
    /// `BOTDISPATCH_CLOUDRUN_PROJECT`.
    pub project: Option<String>,
    /// `BOTDISPATCH_CLOUDRUN_REGION`.
    pub region: Option<String>,
    /// Job for agents without an image. `BOTDISPATCH_CLOUDRUN_JOB`.
    pub job: Option<String>,
    /// `CLOUD_RUN_API_URL`, default `https://run.googleapis.com/v2`.
    pub api_url: String,
    /// Service-account JSON key file; unset: the metadata server. `GOOGLE_APPLICATION_CREDENTIALS`.
    pub service_account_key_file: Option<PathBuf>,
    /// Overrides the key's `token_uri` (private endpoints, tests).
    pub token_uri: Option<String>,
    /// Metadata server host. `GCE_METADATA_HOST`, default `metadata.google.internal`.
    pub metadata_host: String,
}

impl Default for CloudRunSection {
    fn default() -> Self {
        Self {
            project: None,
            region: None,
            job: None,
            api_url: "https://run.googleapis.com/v2".to_owned(),
            service_account_key_file: None,
            token_uri: None,
            metadata_host: "metadata.google.internal".to_owned(),
        }
    }
}

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

/// One bot profile.
#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct AgentConfig {
    /// Container image (for `local`: the program to run when `cmd` is unset).
    pub image: Option<String>,
    /// Command overriding the image's; may reference the contract's env vars.
    pub cmd: Option<Vec<String>>,
    /// Static env added to the bot contract.
    pub env: BTreeMap<String, String>,
    pub guest: Guest,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            listen: DEFAULT_LISTEN.to_owned(),
            provider: ProviderKind::Local,
            rooms: None,
            max_sessions: 100,
            start_timeout_secs: 60,
            max_session_secs: 3600,
            default_agent: "default".to_owned(),
            allowed_regions: Vec::new(),
            session_secret: None,
            request_timeout_secs: 15,
            max_starts_in_flight: 32,
            starts_per_minute_per_caller: 30,
            capacity_cache_ms: 2000,
            reaper_interval_secs: 30,
            reaper_grace_secs: 30,
            shutdown_grace_secs: 30,
            outbound_rate_scale: 1.0,
            header_read_timeout_secs: 10,
            body_read_timeout_secs: 10,
            metrics_token: None,
            app_env: "development".to_owned(),
            auth: AuthConfig::default(),
            daily: DailyConfig::default(),
            fly: FlyConfig::default(),
            fargate: FargateSection::default(),
            cloudrun: CloudRunSection::default(),
            local: LocalConfig::default(),
            agents: BTreeMap::new(),
        }
    }
}

impl Config {
    /// Parses a TOML document (no environment applied).
    pub fn from_toml(text: &str) -> Result<Self, ConfigError> {
        toml::from_str(text).map_err(|e| ConfigError(format!("config file: {}", e.message())))
    }

    /// Reads the optional file, applies the environment, fills defaults and validates.
    /// `env` is a lookup so tests need not touch the process environment.
    pub fn load(
        file: Option<&std::path::Path>,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Self, ConfigError> {
        let mut config = match file {
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|e| {
                    ConfigError(format!("cannot read config file {}: {e}", path.display()))
                })?;
                Self::from_toml(&text)?
            }
            None => Self::default(),
        };
        config.apply_env(env)?;
        config.fill_defaults();
        config.validate()?;
        Ok(config)
    }

    /// Applies the documented environment variables over the file's values.
    pub fn apply_env(&mut self, env: &dyn Fn(&str) -> Option<String>) -> Result<(), ConfigError> {
        let get = |name: &str| env(name).filter(|v| !v.trim().is_empty());
        fn num<T: std::str::FromStr>(name: &str, value: String) -> Result<T, ConfigError> {
            value
                .trim()
                .parse()
                .map_err(|_| ConfigError(format!("{name}={value:?} is not a valid number")))
        }
        if let Some(v) = get("BOTDISPATCH_LISTEN") {
            self.listen = v;
        }
        if let Some(v) = get("BOTDISPATCH_PROVIDER") {
            self.provider = ProviderKind::parse(v.trim()).ok_or_else(|| {
                ConfigError(format!(
                    "BOTDISPATCH_PROVIDER={v:?} is not a provider (expected local, fly, fargate or cloudrun)"
                ))
            })?;
        }
        if let Some(v) = get("BOTDISPATCH_ROOMS") {
            self.rooms = Some(match v.trim() {
                "daily" => RoomsKind::Daily,
                "local" => RoomsKind::Local,
                _ => return err(format!("BOTDISPATCH_ROOMS={v:?} must be daily or local")),
            });
        }
        if let Some(v) = get("BOTDISPATCH_MAX_SESSIONS") {
            self.max_sessions = num("BOTDISPATCH_MAX_SESSIONS", v)?;
        }
        if let Some(v) = get("BOTDISPATCH_START_TIMEOUT_SECS") {
            self.start_timeout_secs = num("BOTDISPATCH_START_TIMEOUT_SECS", v)?;
        }
        if let Some(v) = get("BOTDISPATCH_MAX_SESSION_SECS") {
            self.max_session_secs = num("BOTDISPATCH_MAX_SESSION_SECS", v)?;
        }
        if let Some(v) = get("BOTDISPATCH_REQUEST_TIMEOUT_SECS") {
            self.request_timeout_secs = num("BOTDISPATCH_REQUEST_TIMEOUT_SECS", v)?;
        }
        if let Some(v) = get("BOTDISPATCH_MAX_STARTS_IN_FLIGHT") {
            self.max_starts_in_flight = num("BOTDISPATCH_MAX_STARTS_IN_FLIGHT", v)?;
        }
        if let Some(v) = get("BOTDISPATCH_STARTS_PER_MINUTE_PER_CALLER") {
            self.starts_per_minute_per_caller = num("BOTDISPATCH_STARTS_PER_MINUTE_PER_CALLER", v)?;
        }
        if let Some(v) = get("BOTDISPATCH_REAPER_INTERVAL_SECS") {
            self.reaper_interval_secs = num("BOTDISPATCH_REAPER_INTERVAL_SECS", v)?;
        }
        if let Some(v) = get("BOTDISPATCH_REAPER_GRACE_SECS") {
            self.reaper_grace_secs = num("BOTDISPATCH_REAPER_GRACE_SECS", v)?;
        }
        if let Some(v) = get("BOTDISPATCH_SHUTDOWN_GRACE_SECS") {
            self.shutdown_grace_secs = num("BOTDISPATCH_SHUTDOWN_GRACE_SECS", v)?;
        }
        if let Some(v) = get("BOTDISPATCH_OUTBOUND_RATE_SCALE") {
            self.outbound_rate_scale = num("BOTDISPATCH_OUTBOUND_RATE_SCALE", v)?;
        }
        if let Some(v) = get("BOTDISPATCH_HEADER_READ_TIMEOUT_SECS") {
            self.header_read_timeout_secs = num("BOTDISPATCH_HEADER_READ_TIMEOUT_SECS", v)?;
        }
        if let Some(v) = get("BOTDISPATCH_BODY_READ_TIMEOUT_SECS") {
            self.body_read_timeout_secs = num("BOTDISPATCH_BODY_READ_TIMEOUT_SECS", v)?;
        }
        if let Some(v) = get("BOTDISPATCH_DEFAULT_AGENT") {
            self.default_agent = v;
        }
        if let Some(v) = get("BOTDISPATCH_ALLOWED_REGIONS") {
            self.allowed_regions = v
                .split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(str::to_owned)
                .collect();
        }
        if let Some(v) = get("BOTDISPATCH_SESSION_SECRET") {
            self.session_secret = Some(Secret::new(v));
        }
        if let Some(v) = get("BOTDISPATCH_METRICS_TOKEN") {
            self.metrics_token = Some(Secret::new(v));
        }
        if let Some(v) = get("APP_ENV") {
            self.app_env = v;
        }
        if let Some(v) = get("BOTDISPATCH_JWT_SECRET") {
            self.auth.jwt_secret = Some(Secret::new(v));
        }
        if let Some(v) = get("BOTDISPATCH_JWT_PUBLIC_KEY_FILE") {
            self.auth.jwt_public_key_file = Some(PathBuf::from(v));
        }
        if let Some(v) = get("BOTDISPATCH_JWT_ALGORITHM") {
            self.auth.jwt_algorithm = Some(match v.trim() {
                "HS256" => JwtAlgorithm::HS256,
                "RS256" => JwtAlgorithm::RS256,
                "ES256" => JwtAlgorithm::ES256,
                _ => {
                    return err(format!(
                        "BOTDISPATCH_JWT_ALGORITHM={v:?} must be HS256, RS256 or ES256"
                    ))
                }
            });
        }
        if let Some(v) = get("BOTDISPATCH_JWT_AUDIENCE") {
            self.auth.audience = Some(v);
        }
        if let Some(v) = get("BOTDISPATCH_JWT_ISSUER") {
            self.auth.issuer = Some(v);
        }
        if let Some(v) = get("DAILY_API_KEY") {
            self.daily.api_key = Some(Secret::new(v));
        }
        if let Some(v) = get("DAILY_API_URL") {
            self.daily.api_url = v;
        }
        if let Some(v) = get("DAILY_DOMAIN_ID") {
            self.daily.domain_id = Some(v);
        }
        if let Some(v) = get("DAILY_DOMAIN_NAME") {
            self.daily.domain_name = Some(v);
        }
        let list = |v: String| -> Vec<String> {
            v.split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(str::to_owned)
                .collect()
        };
        let flag = |name: &str, v: String| -> Result<bool, ConfigError> {
            match v.trim() {
                "1" | "true" | "yes" => Ok(true),
                "0" | "false" | "no" => Ok(false),
                _ => err(format!("{name}={v:?} must be true or false")),
            }
        };
        if let Some(v) = get("BOTDISPATCH_FARGATE_CLUSTER") {
            self.fargate.cluster = Some(v);
        }
        if let Some(v) = get("BOTDISPATCH_FARGATE_TASK_DEFINITION") {
            self.fargate.task_definition = Some(v);
        }
        if let Some(v) = get("BOTDISPATCH_FARGATE_CONTAINER") {
            self.fargate.container_name = v;
        }
        if let Some(v) = get("BOTDISPATCH_FARGATE_SUBNETS") {
            self.fargate.subnets = list(v);
        }
        if let Some(v) = get("BOTDISPATCH_FARGATE_SECURITY_GROUPS") {
            self.fargate.security_groups = list(v);
        }
        if let Some(v) = get("BOTDISPATCH_FARGATE_PUBLIC_IP") {
            self.fargate.assign_public_ip = flag("BOTDISPATCH_FARGATE_PUBLIC_IP", v)?;
        }
        if let Some(v) = get("BOTDISPATCH_FARGATE_SPOT") {
            self.fargate.spot = flag("BOTDISPATCH_FARGATE_SPOT", v)?;
        }
        if let Some(v) = get("BOTDISPATCH_CLOUDRUN_PROJECT") {
            self.cloudrun.project = Some(v);
        }
        if let Some(v) = get("BOTDISPATCH_CLOUDRUN_REGION") {
            self.cloudrun.region = Some(v);
        }
        if let Some(v) = get("BOTDISPATCH_CLOUDRUN_JOB") {
            self.cloudrun.job = Some(v);
        }
        if let Some(v) = get("CLOUD_RUN_API_URL") {
            self.cloudrun.api_url = v;
        }
        if let Some(v) = get("GOOGLE_APPLICATION_CREDENTIALS") {
            self.cloudrun.service_account_key_file = Some(PathBuf::from(v));
        }
        if let Some(v) = get("GCE_METADATA_HOST") {
            self.cloudrun.metadata_host = v;
        }
        if let Some(v) = get("FLY_API_TOKEN") {
            self.fly.api_token = Some(Secret::new(v));
        }
        if let Some(v) = get("FLY_APP_NAME") {
            self.fly.app_name = Some(v);
        }
        if let Some(v) = get("FLY_API_URL") {
            self.fly.api_url = v;
        }
        if let Some(v) = get("FLY_REGION") {
            self.fly.default_region = Some(v);
        }
        // On Fly itself, `FLY_*` names belong to the platform (every machine gets its own
        // FLY_APP_NAME and FLY_REGION), so a dispatcher deployed on Fly names the bots' app with
        // these, which win.
        if let Some(v) = get("BOTDISPATCH_FLY_APP") {
            self.fly.app_name = Some(v);
        }
        if let Some(v) = get("BOTDISPATCH_FLY_API_URL") {
            self.fly.api_url = v;
        }
        if let Some(v) = get("BOTDISPATCH_FLY_REGION") {
            self.fly.default_region = Some(v);
        }
        if let Some(image) = get("BOTDISPATCH_BOT_IMAGE") {
            self.agents
                .entry(self.default_agent.clone())
                .or_default()
                .image = Some(image);
        }
        Ok(())
    }

    /// Derives what follows from other settings: the rooms backend and the default agent.
    pub fn fill_defaults(&mut self) {
        if self.rooms.is_none() {
            self.rooms = Some(if self.daily.api_key.is_some() {
                RoomsKind::Daily
            } else {
                RoomsKind::Local
            });
        }
        let default_target = match self.provider {
            ProviderKind::Fargate => self.fargate.task_definition.is_some(),
            ProviderKind::Cloudrun => self.cloudrun.job.is_some(),
            _ => false,
        };
        if default_target && !self.agents.contains_key(&self.default_agent) {
            // The configured task definition / job is the default agent.
            self.agents
                .insert(self.default_agent.clone(), AgentConfig::default());
        }
        if self.provider == ProviderKind::Local && !self.agents.contains_key(&self.default_agent) {
            self.agents.insert(
                self.default_agent.clone(),
                AgentConfig {
                    image: Some("examples/bot/local-bot.sh".to_owned()),
                    cmd: Some(vec![
                        "sh".to_owned(),
                        "-c".to_owned(),
                        EXAMPLE_BOT_SCRIPT.to_owned(),
                        "local-bot".to_owned(),
                    ]),
                    env: BTreeMap::from([("BOT_LIFETIME_SECS".to_owned(), "60".to_owned())]),
                    guest: Guest::default(),
                },
            );
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
            ConfigError(format!(
                "listen (BOTDISPATCH_LISTEN) = {:?} is not an address like 127.0.0.1:7860",
                self.listen
            ))
        })
    }

    /// Pure checks: no network, no clock. Every message names the key.
    pub fn validate(&self) -> Result<(), ConfigError> {
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
        for region in &self.allowed_regions {
            if !is_slug(region, 32) {
                return err(format!(
                    "allowed_regions (BOTDISPATCH_ALLOWED_REGIONS): {region:?} is not a region code"
                ));
            }
        }
        if !matches!(
            self.app_env.to_ascii_lowercase().as_str(),
            "development" | "production" | "test"
        ) {
            return err(format!(
                "app_env (APP_ENV) = {:?} must be development, test or production",
                self.app_env
            ));
        }
        self.validate_auth()?;
        self.validate_backends()?;
        self.validate_agents()
    }

    fn validate_auth(&self) -> Result<(), ConfigError> {
        let auth = &self.auth;
        match (&auth.jwt_secret, &auth.jwt_public_key_file) {
            (Some(_), Some(_)) => {
                return err(
                    "auth.jwt_secret (BOTDISPATCH_JWT_SECRET) and auth.jwt_public_key_file (BOTDISPATCH_JWT_PUBLIC_KEY_FILE) are both set; choose one",
                )
            }
            (Some(secret), None) => {
                if secret.expose().len() < 32 {
                    return err("auth.jwt_secret (BOTDISPATCH_JWT_SECRET) must be at least 32 bytes");
                }
                if matches!(auth.jwt_algorithm, Some(JwtAlgorithm::RS256 | JwtAlgorithm::ES256)) {
                    return err("auth.jwt_algorithm (BOTDISPATCH_JWT_ALGORITHM) RS256/ES256 needs auth.jwt_public_key_file, not a secret");
                }
            }
            (None, Some(_)) => {
                if matches!(auth.jwt_algorithm, None | Some(JwtAlgorithm::HS256)) {
                    return err("auth.jwt_algorithm (BOTDISPATCH_JWT_ALGORITHM) must be RS256 or ES256 with a public key file");
                }
            }
            (None, None) if self.is_production() => {
                return err("auth.jwt_secret (BOTDISPATCH_JWT_SECRET) or auth.jwt_public_key_file is required when APP_ENV=production")
            }
            (None, None) => {}
        }
        if self.is_production()
            && auth.jwt_public_key_file.is_some()
            && self.session_secret.is_none()
        {
            return err("session_secret (BOTDISPATCH_SESSION_SECRET) is required with public-key JWTs in production: every replica must sign session ids alike");
        }
        if let Some(s) = &self.session_secret {
            if s.expose().len() < 32 {
                return err(
                    "session_secret (BOTDISPATCH_SESSION_SECRET) must be at least 32 bytes",
                );
            }
        }
        Ok(())
    }

    fn validate_backends(&self) -> Result<(), ConfigError> {
        match self.provider {
            ProviderKind::Local if self.is_production() => {
                return err("provider (BOTDISPATCH_PROVIDER) = \"local\" runs bots as child processes and is refused when APP_ENV=production")
            }
            ProviderKind::Local => {}
            ProviderKind::Fly => {
                if self.fly.api_token.as_ref().is_none_or(Secret::is_empty) {
                    return err("fly.api_token (FLY_API_TOKEN) is required when provider = \"fly\"");
                }
                match &self.fly.app_name {
                    Some(app) if is_slug(app, 63) => {}
                    Some(app) => {
                        return err(format!("fly.app_name (FLY_APP_NAME) = {app:?} is not a Fly app name"))
                    }
                    None => return err("fly.app_name (FLY_APP_NAME) is required when provider = \"fly\""),
                }
                check_url("fly.api_url (FLY_API_URL)", &self.fly.api_url)?;
                if let Some(region) = &self.fly.default_region {
                    if !is_slug(region, 32) {
                        return err(format!("fly.default_region (FLY_REGION) = {region:?} is not a region code"));
                    }
                }
            }
            ProviderKind::Fargate => {
                if !cfg!(feature = "fargate") {
                    return err("provider = \"fargate\" needs a build with the `fargate` cargo feature");
                }
                let f = &self.fargate;
                if f.cluster.as_deref().is_none_or(str::is_empty) {
                    return err("fargate.cluster (BOTDISPATCH_FARGATE_CLUSTER) is required when provider = \"fargate\"");
                }
                if f.subnets.is_empty() {
                    return err("fargate.subnets (BOTDISPATCH_FARGATE_SUBNETS) needs at least one subnet");
                }
                if f.container_name.is_empty() {
                    return err("fargate.container_name (BOTDISPATCH_FARGATE_CONTAINER) is empty");
                }
                if let Some(url) = &f.endpoint_url {
                    check_url("fargate.endpoint_url", url)?;
                }
            }
            ProviderKind::Cloudrun => {
                if !cfg!(feature = "cloudrun") {
                    return err("provider = \"cloudrun\" needs a build with the `cloudrun` cargo feature");
                }
                let c = &self.cloudrun;
                for (key, value) in [
                    ("cloudrun.project (BOTDISPATCH_CLOUDRUN_PROJECT)", &c.project),
                    ("cloudrun.region (BOTDISPATCH_CLOUDRUN_REGION)", &c.region),
                ] {
                    if value.as_deref().is_none_or(str::is_empty) {
                        return err(format!("{key} is required when provider = \"cloudrun\""));
                    }
                }
                check_url("cloudrun.api_url (CLOUD_RUN_API_URL)", &c.api_url)?;
            }
        }
        match self.rooms_kind() {
            RoomsKind::Local if self.is_production() => {
                return err("rooms (BOTDISPATCH_ROOMS) = \"local\" gives fake room URLs and is refused when APP_ENV=production")
            }
            RoomsKind::Local => {}
            RoomsKind::Daily => {
                if self.daily.api_key.as_ref().is_none_or(Secret::is_empty) {
                    return err("daily.api_key (DAILY_API_KEY) is required when rooms = \"daily\"");
                }
                check_url("daily.api_url (DAILY_API_URL)", &self.daily.api_url)?;
            }
        }
        Ok(())
    }

    fn validate_agents(&self) -> Result<(), ConfigError> {
        if !self.agents.contains_key(&self.default_agent) {
            return err(format!(
                "default_agent (BOTDISPATCH_DEFAULT_AGENT) = {:?} is not configured under [agents] (set BOTDISPATCH_BOT_IMAGE or add [agents.{}])",
                self.default_agent, self.default_agent
            ));
        }
        for (name, agent) in &self.agents {
            if !is_slug(name, 63) {
                return err(format!(
                    "agents.{name}: agent names use lowercase letters, digits, '-' and '_' (at most 63)"
                ));
            }
            let default_target = match self.provider {
                ProviderKind::Fargate => self.fargate.task_definition.is_some(),
                ProviderKind::Cloudrun => self.cloudrun.job.is_some(),
                _ => false,
            };
            match (&agent.image, &agent.cmd) {
                (None, _) if matches!(self.provider, ProviderKind::Fargate) && !default_target => {
                    return err(format!("agents.{name}.image (its task definition) or fargate.task_definition (BOTDISPATCH_FARGATE_TASK_DEFINITION) is required"))
                }
                (None, _) if matches!(self.provider, ProviderKind::Cloudrun) && !default_target => {
                    return err(format!("agents.{name}.image (its job) or cloudrun.job (BOTDISPATCH_CLOUDRUN_JOB) is required"))
                }
                (None, _) if self.provider == ProviderKind::Fly => {
                    return err(format!("agents.{name}.image is required (or BOTDISPATCH_BOT_IMAGE for the default agent)"))
                }
                (None, None) if self.provider == ProviderKind::Local => {
                    return err(format!("agents.{name}: set image (a program) or cmd"))
                }
                _ => {}
            }
            if agent.cmd.as_ref().is_some_and(Vec::is_empty) {
                return err(format!("agents.{name}.cmd is empty"));
            }
            if agent.guest.cpus == 0 || agent.guest.memory_mb < 128 {
                return err(format!(
                    "agents.{name}.guest: cpus must be ≥ 1 and memory_mb ≥ 128"
                ));
            }
            for key in agent.env.keys() {
                if CONTRACT_ENV.contains(&key.as_str()) {
                    return err(format!(
                        "agents.{name}.env.{key} is set by botdispatch for every session and cannot be configured"
                    ));
                }
                let valid = !key.is_empty()
                    && !key.starts_with(|c: char| c.is_ascii_digit())
                    && key.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
                if !valid {
                    return err(format!(
                        "agents.{name}.env: {key:?} is not an environment variable name"
                    ));
                }
            }
        }
        Ok(())
    }
}

fn check_url(key: &str, value: &str) -> Result<(), ConfigError> {
    match url::Url::parse(value) {
        Ok(u) if matches!(u.scheme(), "http" | "https") => Ok(()),
        _ => err(format!("{key} = {value:?} is not an http(s) URL")),
    }
}

/// Lowercase letters, digits, `-` and `_`, 1..=max characters.
pub fn is_slug(s: &str, max: usize) -> bool {
    !s.is_empty()
        && s.len() <= max
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(toml: &str, env: &[(&str, &str)]) -> Result<Config, ConfigError> {
        let mut c = Config::from_toml(toml)?;
        let env: BTreeMap<String, String> = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        c.apply_env(&|k| env.get(k).cloned())?;
        c.fill_defaults();
        c.validate()?;
        Ok(c)
    }

    fn message(r: Result<Config, ConfigError>) -> String {
        r.expect_err("config should be refused").to_string()
    }

    #[test]
    fn empty_config_is_the_embedded_default() {
        let c = load("", &[]).unwrap();
        assert_eq!(c.provider, ProviderKind::Local);
        assert_eq!(c.rooms_kind(), RoomsKind::Local);
        assert_eq!(c.listen, "127.0.0.1:7860");
        assert!(c.agents["default"].cmd.is_some());
    }

    #[test]
    fn env_overrides_file() {
        let c = load(
            "provider = \"local\"\nmax_sessions = 5\n",
            &[
                ("BOTDISPATCH_MAX_SESSIONS", "7"),
                ("BOTDISPATCH_LISTEN", "0.0.0.0:8080"),
            ],
        )
        .unwrap();
        assert_eq!(c.max_sessions, 7);
        assert_eq!(c.listen, "0.0.0.0:8080");
    }

    #[test]
    fn messages_name_the_bad_key() {
        assert!(message(load("", &[("BOTDISPATCH_PROVIDER", "fly")])).contains("FLY_API_TOKEN"));
        assert!(message(load(
            "",
            &[("BOTDISPATCH_PROVIDER", "fly"), ("FLY_API_TOKEN", "t")]
        ))
        .contains("FLY_APP_NAME"));
        assert!(message(load(
            "",
            &[
                ("BOTDISPATCH_PROVIDER", "fly"),
                ("FLY_API_TOKEN", "t"),
                ("FLY_APP_NAME", "bots")
            ]
        ))
        .contains("BOTDISPATCH_BOT_IMAGE"));
        assert!(message(load("", &[("BOTDISPATCH_MAX_SESSIONS", "lots")]))
            .contains("BOTDISPATCH_MAX_SESSIONS"));
        assert!(message(load("colour = 1", &[])).contains("colour"));
        assert!(message(load("", &[("BOTDISPATCH_JWT_SECRET", "short")])).contains("32 bytes"));
        assert!(message(load(
            "[agents.default]\nimage = \"x\"\nenv = { DAILY_ROOM_URL = \"x\" }",
            &[]
        ))
        .contains("agents.default.env.DAILY_ROOM_URL"));
        assert!(message(load("allowed_regions = [\"IAD!\"]", &[])).contains("allowed_regions"));
    }

    #[test]
    fn production_refuses_local_backends_and_generated_secrets() {
        let secret = "0123456789abcdef0123456789abcdef";
        let m = message(load(
            "",
            &[
                ("APP_ENV", "production"),
                ("BOTDISPATCH_JWT_SECRET", secret),
            ],
        ));
        assert!(m.contains("local"), "{m}");
        let m = message(load(
            "",
            &[
                ("APP_ENV", "production"),
                ("BOTDISPATCH_PROVIDER", "fly"),
                ("FLY_API_TOKEN", "t"),
                ("FLY_APP_NAME", "bots"),
                ("BOTDISPATCH_BOT_IMAGE", "registry.fly.io/bots:1"),
            ],
        ));
        assert!(m.contains("BOTDISPATCH_JWT_SECRET"), "{m}");
        let m = message(load(
            "",
            &[
                ("APP_ENV", "production"),
                ("BOTDISPATCH_PROVIDER", "fly"),
                ("FLY_API_TOKEN", "t"),
                ("FLY_APP_NAME", "bots"),
                ("BOTDISPATCH_BOT_IMAGE", "registry.fly.io/bots:1"),
                ("BOTDISPATCH_JWT_SECRET", secret),
            ],
        ));
        assert!(m.contains("rooms"), "{m}");
        load(
            "",
            &[
                ("APP_ENV", "production"),
                ("BOTDISPATCH_PROVIDER", "fly"),
                ("FLY_API_TOKEN", "t"),
                ("FLY_APP_NAME", "bots"),
                ("BOTDISPATCH_BOT_IMAGE", "registry.fly.io/bots:1"),
                ("BOTDISPATCH_JWT_SECRET", secret),
                ("DAILY_API_KEY", "k"),
            ],
        )
        .unwrap();
    }

    #[test]
    fn example_configs_are_valid() {
        let secrets = [
            ("BOTDISPATCH_JWT_SECRET", "0123456789abcdef0123456789abcdef"),
            ("DAILY_API_KEY", "k"),
            ("FLY_API_TOKEN", "t"),
        ];
        let mut examples = vec![
            ("fly", include_str!("../examples/fly.toml")),
            ("local", include_str!("../examples/local.toml")),
        ];
        if cfg!(feature = "fargate") {
            examples.push(("fargate", include_str!("../examples/fargate.toml")));
        }
        if cfg!(feature = "cloudrun") {
            examples.push(("cloudrun", include_str!("../examples/cloudrun.toml")));
        }
        for (name, text) in examples {
            let c = load(text, &secrets).unwrap_or_else(|e| panic!("examples/{name}.toml: {e}"));
            assert_eq!(c.provider.to_string(), name);
        }
    }

    #[test]
    fn provider_sections_name_their_missing_keys() {
        if cfg!(feature = "fargate") {
            let m = message(load("", &[("BOTDISPATCH_PROVIDER", "fargate")]));
            assert!(m.contains("BOTDISPATCH_FARGATE_CLUSTER"), "{m}");
            let m = message(load(
                "",
                &[
                    ("BOTDISPATCH_PROVIDER", "fargate"),
                    ("BOTDISPATCH_FARGATE_CLUSTER", "c"),
                ],
            ));
            assert!(m.contains("BOTDISPATCH_FARGATE_SUBNETS"), "{m}");
        }
        if cfg!(feature = "cloudrun") {
            let m = message(load("", &[("BOTDISPATCH_PROVIDER", "cloudrun")]));
            assert!(m.contains("BOTDISPATCH_CLOUDRUN_PROJECT"), "{m}");
        }
        // On Fly the reserved FLY_APP_NAME is the dispatcher's own app: ours wins.
        let c = load(
            "",
            &[
                ("FLY_APP_NAME", "dispatcher"),
                ("BOTDISPATCH_FLY_APP", "bots"),
            ],
        )
        .unwrap();
        assert_eq!(c.fly.app_name.as_deref(), Some("bots"));
    }

    #[test]
    fn secrets_are_redacted_in_debug() {
        let c = load(
            "",
            &[(
                "BOTDISPATCH_JWT_SECRET",
                "0123456789abcdef0123456789abcdef-x",
            )],
        )
        .unwrap();
        assert!(!format!("{c:?}").contains("0123456789abcdef"));
    }
}
