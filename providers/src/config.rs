//! Provider configuration: the `provider = "<name>"` key and each provider's own section of the
//! configuration file, with environment overrides, pure validation, and the build of the
//! provider itself.
//!
//! Every provider's settings type lives next to its code (`fly::FlyConfig`, ...) and implements
//! [`ProviderSettings`]; [`ProviderConfig`] is the one chosen at start-up. Adding a provider
//! means a module, a variant and a section field here, and a cargo feature in the service.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use serde::Deserialize;

use crate::env::Env;
use crate::{MachineProvider, ProviderError, Tier, Workload};

/// A configuration that cannot be used; the message names the key and, where there is one,
/// its environment variable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid configuration: {0}")]
pub struct ConfigError(pub String);

impl ConfigError {
    pub fn new(message: impl Into<String>) -> Self {
        Self(message.into())
    }
}

/// What building a provider needs from the service.
#[derive(Debug, Clone)]
pub struct BuildContext {
    /// The dispatcher's one HTTP client (connection pool, TLS).
    pub http: reqwest::Client,
    /// Timeout of each single API call (not of waits, which have their own deadlines).
    pub request_timeout: Duration,
    /// Whether this is a production deployment (`APP_ENV=production`).
    pub production: bool,
    /// The deployment's name: the provider lists, finds and reads as its own only the
    /// machines labelled with it.
    pub deployment: String,
}

impl BuildContext {
    pub fn new(http: reqwest::Client) -> Self {
        Self {
            http,
            request_timeout: Duration::from_secs(15),
            production: false,
            deployment: crate::labels::DEFAULT_DEPLOYMENT.to_owned(),
        }
    }

    pub fn with_request_timeout(mut self, timeout: Duration) -> Self {
        self.request_timeout = timeout;
        self
    }
}

/// One provider's settings: read from its section and the environment, validated without I/O,
/// then built into the provider.
#[async_trait]
pub trait ProviderSettings: Send + Sync {
    /// The provider's name (`fly`, ...), as `provider = "..."` spells it.
    fn name(&self) -> &'static str;

    /// Applies the provider's environment variables over the file's values.
    fn apply_env(&mut self, env: &Env) -> Result<(), ConfigError>;

    /// Pure checks; every message names the key and its environment variable.
    fn validate(&self, production: bool) -> Result<(), ConfigError>;

    /// What an agent runs here, from its `image` and `cmd` settings (validated: a workload
    /// accepted here is one the provider accepts).
    fn workload(
        &self,
        agent: &str,
        image: Option<&str>,
        cmd: Option<&[String]>,
    ) -> Result<Workload, ConfigError>;

    /// Builds the provider (start-up I/O such as loading credentials happens here).
    async fn build(&self, ctx: &BuildContext) -> Result<Arc<dyn MachineProvider>, ProviderError>;

    /// Whether the provider's machines can take their session over HTTP (the `http`
    /// handoff): the dispatcher must reach them on a private network.
    fn http_handoff(&self) -> bool {
        false
    }

    /// The reserve tiers the provider can keep (none: no reserve).
    fn reserve_tiers(&self) -> &'static [Tier] {
        &[]
    }

    /// Whether a reserve machine can be started again from its image after its session
    /// (`reserve.recycle`): a fresh boot on the same machine, with nothing of the session left.
    fn recycles(&self) -> bool {
        false
    }
}

/// The provider this deployment uses, with its settings.
#[derive(Debug, Clone)]
pub enum ProviderConfig {
    Local(crate::local::LocalConfig),
    Fly(crate::fly::FlyConfig),
    #[cfg(feature = "fargate")]
    Fargate(crate::fargate::FargateConfig),
    #[cfg(feature = "cloudrun")]
    CloudRun(crate::cloudrun::CloudRunConfig),
    /// Boxed: the largest settings by far (the pod template's many optional parts).
    #[cfg(feature = "kubernetes")]
    Kubernetes(Box<crate::kubernetes::KubernetesConfig>),
}

impl Default for ProviderConfig {
    /// The embedded default: bots as local processes.
    fn default() -> Self {
        Self::Local(crate::local::LocalConfig::default())
    }
}

/// The provider part of a configuration file: `provider = "<name>"` and one optional section
/// per provider. Sections of providers this build lacks are accepted (the same file may serve
/// several builds) and ignored unless chosen.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProviderFile {
    pub provider: Option<String>,
    pub local: Option<crate::local::LocalConfig>,
    pub fly: Option<crate::fly::FlyConfig>,
    #[cfg(feature = "fargate")]
    pub fargate: Option<crate::fargate::FargateConfig>,
    #[cfg(not(feature = "fargate"))]
    pub fargate: Option<serde::de::IgnoredAny>,
    #[cfg(feature = "cloudrun")]
    pub cloudrun: Option<crate::cloudrun::CloudRunConfig>,
    #[cfg(not(feature = "cloudrun"))]
    pub cloudrun: Option<serde::de::IgnoredAny>,
    #[cfg(feature = "kubernetes")]
    pub kubernetes: Option<crate::kubernetes::KubernetesConfig>,
    #[cfg(not(feature = "kubernetes"))]
    pub kubernetes: Option<serde::de::IgnoredAny>,
}

/// Every provider name, with the cargo feature that builds it (`None`: always built).
const PROVIDERS: [(&str, Option<&str>); 5] = [
    ("local", None),
    ("fly", None),
    ("fargate", Some("fargate")),
    ("cloudrun", Some("cloudrun")),
    ("kubernetes", Some("kubernetes")),
];

/// Why `name` (spelled `key` in the configuration) cannot be used: a provider this build
/// lacks names its cargo feature.
fn unavailable(name: &str, key: &str) -> ConfigError {
    ConfigError::new(match PROVIDERS.iter().find(|(n, _)| *n == name) {
        Some((_, Some(feature))) => format!(
            "{key} needs a build with the `{feature}` cargo feature (cargo build --features {feature})"
        ),
        _ => format!(
            "{key} is not a provider (expected {})",
            PROVIDERS.map(|(n, _)| n).join(", ")
        ),
    })
}

impl ProviderFile {
    /// The top-level keys of a configuration file that belong to the provider part.
    pub const KEYS: [&'static str; 6] = [
        "provider",
        "local",
        "fly",
        "fargate",
        "cloudrun",
        "kubernetes",
    ];
}

impl ProviderConfig {
    /// Chooses the provider (`BOTDISPATCH_PROVIDER` over the file's `provider`, default
    /// `local`) and applies its environment variables over its section.
    pub fn load(file: ProviderFile, env: &Env) -> Result<Self, ConfigError> {
        let (name, from_env) = match env.get("BOTDISPATCH_PROVIDER") {
            Some(v) => (v.trim().to_owned(), true),
            None => (
                file.provider.clone().unwrap_or_else(|| "local".to_owned()),
                false,
            ),
        };
        /// The chosen provider's section (defaults where absent), with its env applied.
        fn chosen<T: ProviderSettings + Default>(
            section: Option<T>,
            env: &Env,
        ) -> Result<T, ConfigError> {
            let mut settings = section.unwrap_or_default();
            settings.apply_env(env)?;
            Ok(settings)
        }
        Ok(match name.as_str() {
            "local" => Self::Local(chosen(file.local, env)?),
            "fly" => Self::Fly(chosen(file.fly, env)?),
            #[cfg(feature = "fargate")]
            "fargate" => Self::Fargate(chosen(file.fargate, env)?),
            #[cfg(feature = "cloudrun")]
            "cloudrun" => Self::CloudRun(chosen(file.cloudrun, env)?),
            #[cfg(feature = "kubernetes")]
            "kubernetes" => Self::Kubernetes(Box::new(chosen(file.kubernetes, env)?)),
            other => {
                let key = if from_env {
                    format!("BOTDISPATCH_PROVIDER={other:?}")
                } else {
                    format!("provider = {other:?}")
                };
                return Err(unavailable(other, &key));
            }
        })
    }

    /// The provider's name (`fly`, ...), as its machines report it.
    pub fn name(&self) -> &'static str {
        self.settings().name()
    }

    pub fn settings(&self) -> &dyn ProviderSettings {
        match self {
            Self::Local(c) => c,
            Self::Fly(c) => c,
            #[cfg(feature = "fargate")]
            Self::Fargate(c) => c,
            #[cfg(feature = "cloudrun")]
            Self::CloudRun(c) => c,
            #[cfg(feature = "kubernetes")]
            Self::Kubernetes(c) => c.as_ref(),
        }
    }
}

/// Lowercase letters, digits, `-` and `_`, 1..=max characters.
pub fn is_slug(s: &str, max: usize) -> bool {
    !s.is_empty()
        && s.len() <= max
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
}

/// An http(s) URL, or an error naming `key`.
pub fn check_url(key: &str, value: &str) -> Result<(), ConfigError> {
    match url::Url::parse(value) {
        Ok(u) if matches!(u.scheme(), "http" | "https") => Ok(()),
        _ => Err(ConfigError::new(format!(
            "{key} = {value:?} is not an http(s) URL"
        ))),
    }
}

/// `Some(non-empty value)` or an error saying `key` is required for `provider`.
pub fn required<'a>(
    value: Option<&'a str>,
    key: &str,
    provider: &str,
) -> Result<&'a str, ConfigError> {
    value
        .map(str::trim)
        .filter(|v| !v.is_empty())
        .ok_or_else(|| {
            ConfigError::new(format!("{key} is required when provider = \"{provider}\""))
        })
}

/// The bot URL a provider's template (`key`) expanded to, parsed; a configuration error naming
/// the key when the expansion is not a URL.
pub(crate) fn expanded_url(
    provider: &'static str,
    key: &str,
    url: &str,
) -> Result<url::Url, crate::ProviderError> {
    url::Url::parse(url).map_err(|e| crate::ProviderError::Config {
        provider,
        message: format!("{key} gives {url:?}, not a URL"),
        source: Some(Box::new(e)),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_provider_this_build_lacks_names_its_feature() {
        let m = unavailable("fargate", "provider = \"fargate\"").to_string();
        assert!(m.contains("`fargate` cargo feature"), "{m}");
        let m = unavailable("mainframe", "provider = \"mainframe\"").to_string();
        assert!(
            m.contains("not a provider (expected local, fly, fargate, cloudrun, kubernetes)"),
            "{m}"
        );
        // Every provider the table names is either built or named with its feature.
        for (name, feature) in PROVIDERS {
            let lookup = |k: &str| (k == "BOTDISPATCH_PROVIDER").then(|| name.to_owned());
            match ProviderConfig::load(ProviderFile::default(), &Env::new(&lookup)) {
                Ok(c) => assert_eq!(c.name(), name),
                Err(e) => assert!(e.0.contains(feature.unwrap_or("?")), "{e}"),
            }
        }
    }
}
