//! Caller authentication: JWT bearer tokens (HS256 secret, or RS256/ES256 public key), and the
//! minting of development tokens for `botdispatch token`.

use std::time::Duration;

use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};

use crate::config::{AuthConfig, JwtAlgorithm};
use providers::Secret;

/// Why a token was refused. The message is safe to show the caller: it never echoes the token.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("missing bearer token: send `Authorization: Bearer <JWT>`")]
    Missing,
    #[error("the Authorization header must be `Bearer <JWT>`")]
    Malformed,
    #[error("the token has expired")]
    Expired,
    #[error("the token is not valid yet")]
    NotYetValid,
    #[error("the token was not issued for this service (aud/iss)")]
    WrongAudience,
    #[error("the token is invalid: {0}")]
    Invalid(&'static str),
    #[error(
        "the token names critical header extensions (crit), which this service does not understand"
    )]
    CriticalExtension,
}

#[derive(Debug, thiserror::Error)]
pub enum AuthSetupError {
    #[error("cannot read auth.jwt_public_key_file {path}: {source}")]
    ReadKey {
        path: String,
        source: std::io::Error,
    },
    #[error("auth.jwt_public_key_file {path} is not a {alg:?} PEM public key: {source}")]
    BadKey {
        path: String,
        alg: JwtAlgorithm,
        source: jsonwebtoken::errors::Error,
    },
    #[error("minting tokens needs auth.jwt_secret (BOTDISPATCH_JWT_SECRET); public-key setups mint tokens with their own issuer")]
    NoSigningKey,
    #[error("cannot sign the token: {0}")]
    Sign(jsonwebtoken::errors::Error),
}

/// Scope that lets a token read every session, not only its own `sub`'s.
pub const READ_ANY: &str = "sessions:read_any";
/// Scope that lets a token stop every session, not only its own `sub`'s.
pub const STOP_ANY: &str = "sessions:stop_any";

/// Claims botdispatch reads. `scope` is a space-separated string or an array of scopes
/// (`agent:NAME`, [`READ_ANY`], [`STOP_ANY`]); `agents` is an explicit list. With neither
/// `agent:` scopes nor `agents` every agent may be started. `aud` is a string or an array
/// (RFC 7519 §4.1.3).
#[derive(Debug, Serialize, Deserialize)]
pub struct Claims {
    pub sub: String,
    pub exp: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iat: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scope: Option<OneOrMany>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agents: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub aud: Option<OneOrMany>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iss: Option<String>,
}

/// A claim that may be one string or an array of strings.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(untagged)]
pub enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

impl OneOrMany {
    /// The scopes a `scope` claim names: a string's space-separated words, or the array's items.
    fn scopes(self) -> Vec<String> {
        match self {
            Self::One(s) => s.split_whitespace().map(str::to_owned).collect(),
            Self::Many(v) => v,
        }
    }
}

/// An authenticated caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    pub sub: String,
    scopes: Vec<String>,
    agents: Option<Vec<String>>,
}

impl Caller {
    pub fn new(sub: impl Into<String>, scopes: Vec<String>, agents: Option<Vec<String>>) -> Self {
        Self {
            sub: sub.into(),
            scopes,
            agents,
        }
    }

    fn has_scope(&self, scope: &str) -> bool {
        self.scopes.iter().any(|s| s == scope)
    }

    /// Whether the token may read sessions of every caller ([`READ_ANY`]).
    pub fn may_read_any(&self) -> bool {
        self.has_scope(READ_ANY)
    }

    /// Whether the token may stop sessions of every caller ([`STOP_ANY`]).
    pub fn may_stop_any(&self) -> bool {
        self.has_scope(STOP_ANY)
    }

    /// Whether the token allows starting `agent`: its `agent:` scopes and `agents` claim
    /// always apply, whatever other scopes it has.
    pub fn may_start(&self, agent: &str) -> bool {
        let scoped: Vec<&str> = self
            .scopes
            .iter()
            .filter_map(|s| s.strip_prefix("agent:"))
            .collect();
        let by_scope = scoped.is_empty() || scoped.contains(&agent);
        let by_list = self
            .agents
            .as_ref()
            .is_none_or(|list| list.iter().any(|a| a == agent || a == "*"));
        by_scope && by_list
    }
}

/// Verifies tokens; holds the key material once, built at start-up.
pub struct Authenticator {
    decoding: DecodingKey,
    validation: Validation,
    encoding: Option<EncodingKey>,
    algorithm: Algorithm,
    audience: Option<String>,
    issuer: Option<String>,
}

impl Authenticator {
    /// Builds from config; `secret` is the effective HS256 secret (configured or generated).
    pub fn new(config: &AuthConfig, secret: Option<&Secret>) -> Result<Self, AuthSetupError> {
        let (decoding, encoding, algorithm) = match (&config.jwt_public_key_file, secret) {
            (Some(path), _) => {
                let alg = config.jwt_algorithm.unwrap_or(JwtAlgorithm::RS256);
                let pem = std::fs::read(path).map_err(|source| AuthSetupError::ReadKey {
                    path: path.display().to_string(),
                    source,
                })?;
                let (key, algorithm) = match alg {
                    JwtAlgorithm::ES256 => (DecodingKey::from_ec_pem(&pem), Algorithm::ES256),
                    _ => (DecodingKey::from_rsa_pem(&pem), Algorithm::RS256),
                };
                let key = key.map_err(|source| AuthSetupError::BadKey {
                    path: path.display().to_string(),
                    alg,
                    source,
                })?;
                (key, None, algorithm)
            }
            (None, Some(secret)) => (
                DecodingKey::from_secret(secret.expose().as_bytes()),
                Some(EncodingKey::from_secret(secret.expose().as_bytes())),
                Algorithm::HS256,
            ),
            (None, None) => return Err(AuthSetupError::NoSigningKey),
        };
        // Only the configured algorithm: a token claiming another one (HS256 signed with an RSA
        // public key, `none`) is refused before any signature check.
        let mut validation = Validation::new(algorithm);
        let mut required = vec!["sub", "exp"];
        if config.audience.is_some() {
            required.push("aud");
        }
        if config.issuer.is_some() {
            required.push("iss");
        }
        validation.set_required_spec_claims(&required);
        validation.leeway = config.leeway_secs.unwrap_or(30);
        validation.validate_nbf = true;
        match &config.audience {
            Some(aud) => validation.set_audience(&[aud]),
            None => validation.validate_aud = false,
        }
        if let Some(iss) = &config.issuer {
            validation.set_issuer(&[iss]);
        }
        Ok(Self {
            decoding,
            validation,
            encoding,
            algorithm,
            audience: config.audience.clone(),
            issuer: config.issuer.clone(),
        })
    }

    /// Checks an `Authorization` header value.
    pub fn authenticate(&self, header: Option<&str>) -> Result<Caller, AuthError> {
        let header = header.ok_or(AuthError::Missing)?;
        let token = header
            .strip_prefix("Bearer ")
            .or_else(|| header.strip_prefix("bearer "))
            .map(str::trim)
            .filter(|t| !t.is_empty())
            .ok_or(AuthError::Malformed)?;
        self.verify(token)
    }

    pub fn verify(&self, token: &str) -> Result<Caller, AuthError> {
        use jsonwebtoken::errors::ErrorKind;
        reject_critical_extensions(token)?;
        let data = jsonwebtoken::decode::<Claims>(token, &self.decoding, &self.validation)
            .map_err(|e| match e.kind() {
                ErrorKind::ExpiredSignature => AuthError::Expired,
                ErrorKind::ImmatureSignature => AuthError::NotYetValid,
                ErrorKind::InvalidAudience | ErrorKind::InvalidIssuer => AuthError::WrongAudience,
                ErrorKind::InvalidSignature => AuthError::Invalid("bad signature"),
                ErrorKind::InvalidAlgorithm | ErrorKind::InvalidAlgorithmName => {
                    AuthError::Invalid("algorithm not accepted")
                }
                ErrorKind::MissingRequiredClaim(_) => {
                    AuthError::Invalid("the sub and exp claims are required")
                }
                _ => AuthError::Invalid("not a well-formed JWT"),
            })?;
        let claims = data.claims;
        if claims.sub.trim().is_empty() || claims.sub.len() > 256 {
            return Err(AuthError::Invalid("sub must be 1 to 256 characters"));
        }
        let scopes = claims.scope.map(OneOrMany::scopes).unwrap_or_default();
        Ok(Caller::new(claims.sub, scopes, claims.agents))
    }

    /// Mints a token for `sub` valid for `ttl` (development and `botdispatch token`).
    pub fn mint(
        &self,
        sub: &str,
        ttl: Duration,
        scope: Option<&str>,
    ) -> Result<String, AuthSetupError> {
        let key = self.encoding.as_ref().ok_or(AuthSetupError::NoSigningKey)?;
        let now = jsonwebtoken::get_current_timestamp();
        let claims = Claims {
            sub: sub.to_owned(),
            exp: now + ttl.as_secs(),
            iat: Some(now),
            scope: scope.map(|s| OneOrMany::One(s.to_owned())),
            agents: None,
            aud: self.audience.clone().map(OneOrMany::One),
            iss: self.issuer.clone(),
        };
        jsonwebtoken::encode(&Header::new(self.algorithm), &claims, key)
            .map_err(AuthSetupError::Sign)
    }
}

/// RFC 7515 §4.1.11: a recipient must refuse a token whose `crit` header names extensions it
/// does not understand; this service understands none.
fn reject_critical_extensions(token: &str) -> Result<(), AuthError> {
    use base64::engine::general_purpose::URL_SAFE_NO_PAD;
    use base64::Engine;
    let header = token.split('.').next().unwrap_or_default();
    let header: serde_json::Value = URL_SAFE_NO_PAD
        .decode(header)
        .ok()
        .and_then(|bytes| serde_json::from_slice(&bytes).ok())
        .ok_or(AuthError::Invalid("not a well-formed JWT"))?;
    if header.get("crit").is_some() {
        return Err(AuthError::CriticalExtension);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn agent_scopes() {
        let any = Caller::new("a", vec![], None);
        assert!(any.may_start("x"));
        let scoped = Caller::new("a", vec!["agent:x".into()], None);
        assert!(scoped.may_start("x") && !scoped.may_start("y"));
        let listed = Caller::new("a", vec![], Some(vec!["y".into()]));
        assert!(listed.may_start("y") && !listed.may_start("x"));
        // `admin` is no master key: the agent scopes still apply.
        let admin = Caller::new("a", vec!["admin".into(), "agent:x".into()], None);
        assert!(!admin.may_start("y") && !admin.may_read_any() && !admin.may_stop_any());
        let ops = Caller::new("a", vec![READ_ANY.into()], None);
        assert!(ops.may_read_any() && !ops.may_stop_any());
    }
}
