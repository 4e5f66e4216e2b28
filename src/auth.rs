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

/// Claims botdispatch reads. `scope` is space separated (`admin`, `agent:NAME`); `agents` is an
/// explicit list. Neither present means every agent.
#[derive(Debug, Serialize, Deserialize)]
pub struct Claims {
    pub sub: String,
    pub exp: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iat: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scope: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agents: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub aud: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iss: Option<String>,
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

    pub fn is_admin(&self) -> bool {
        self.scopes.iter().any(|s| s == "admin")
    }

    /// Whether the token allows starting `agent`.
    pub fn may_start(&self, agent: &str) -> bool {
        if self.is_admin() {
            return true;
        }
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
        let scopes = claims
            .scope
            .unwrap_or_default()
            .split_whitespace()
            .map(str::to_owned)
            .collect();
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
            scope: scope.map(str::to_owned),
            agents: None,
            aud: self.audience.clone(),
            iss: self.issuer.clone(),
        };
        jsonwebtoken::encode(&Header::new(self.algorithm), &claims, key)
            .map_err(AuthSetupError::Sign)
    }
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
        let admin = Caller::new("a", vec!["admin".into(), "agent:x".into()], None);
        assert!(admin.may_start("y") && admin.is_admin());
    }
}
