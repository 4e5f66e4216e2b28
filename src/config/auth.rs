//! `[auth]`: how callers' JWTs are verified.

use std::path::PathBuf;

use providers::env::{Env, FromEnv};
use providers::{ConfigError, Secret};
use serde::Deserialize;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
pub enum JwtAlgorithm {
    #[default]
    HS256,
    RS256,
    ES256,
}

impl FromEnv for JwtAlgorithm {
    fn from_env(name: &str, value: String) -> Result<Self, ConfigError> {
        match value.trim() {
            "HS256" => Ok(Self::HS256),
            "RS256" => Ok(Self::RS256),
            "ES256" => Ok(Self::ES256),
            _ => Err(ConfigError::new(format!(
                "{name}={value:?} must be HS256, RS256 or ES256"
            ))),
        }
    }
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
    /// Production requires an `audience`, so that tokens minted for another service are not
    /// accepted here; set this to accept tokens without one anyway.
    /// `BOTDISPATCH_JWT_ALLOW_NO_AUDIENCE`, default false.
    pub allow_no_audience: bool,
}

impl AuthConfig {
    pub(super) fn apply_env(&mut self, env: &Env) -> Result<(), ConfigError> {
        env.apply("BOTDISPATCH_JWT_SECRET", &mut self.jwt_secret)?;
        env.apply(
            "BOTDISPATCH_JWT_PUBLIC_KEY_FILE",
            &mut self.jwt_public_key_file,
        )?;
        env.apply("BOTDISPATCH_JWT_ALGORITHM", &mut self.jwt_algorithm)?;
        env.apply("BOTDISPATCH_JWT_AUDIENCE", &mut self.audience)?;
        env.apply("BOTDISPATCH_JWT_ISSUER", &mut self.issuer)?;
        env.apply(
            "BOTDISPATCH_JWT_ALLOW_NO_AUDIENCE",
            &mut self.allow_no_audience,
        )
    }

    pub(super) fn validate(&self, production: bool) -> Result<(), ConfigError> {
        let err = |m: &str| Err(ConfigError::new(m));
        match (&self.jwt_secret, &self.jwt_public_key_file) {
            (Some(_), Some(_)) => err(
                "auth.jwt_secret (BOTDISPATCH_JWT_SECRET) and auth.jwt_public_key_file (BOTDISPATCH_JWT_PUBLIC_KEY_FILE) are both set; choose one",
            ),
            (Some(secret), None) if secret.expose().len() < 32 => {
                err("auth.jwt_secret (BOTDISPATCH_JWT_SECRET) must be at least 32 bytes")
            }
            (Some(_), None)
                if matches!(
                    self.jwt_algorithm,
                    Some(JwtAlgorithm::RS256 | JwtAlgorithm::ES256)
                ) =>
            {
                err("auth.jwt_algorithm (BOTDISPATCH_JWT_ALGORITHM) RS256/ES256 needs auth.jwt_public_key_file, not a secret")
            }
            (None, Some(_)) if matches!(self.jwt_algorithm, None | Some(JwtAlgorithm::HS256)) => {
                err("auth.jwt_algorithm (BOTDISPATCH_JWT_ALGORITHM) must be RS256 or ES256 with a public key file")
            }
            (None, None) if production => err(
                "auth.jwt_secret (BOTDISPATCH_JWT_SECRET) or auth.jwt_public_key_file is required when APP_ENV=production",
            ),
            _ => Ok(()),
        }
    }

    /// Production requires an audience unless the operator opted out.
    pub(super) fn validate_audience(&self, production: bool) -> Result<(), ConfigError> {
        if production && self.audience.is_none() && !self.allow_no_audience {
            return Err(ConfigError::new("auth.audience (BOTDISPATCH_JWT_AUDIENCE) is required when APP_ENV=production, so that tokens minted for other services are refused; set auth.allow_no_audience (BOTDISPATCH_JWT_ALLOW_NO_AUDIENCE=true) to accept tokens without one"));
        }
        Ok(())
    }
}
