//! OAuth access tokens for the Cloud Run Admin API, from the GCE metadata server, from a
//! service-account key (an RS256 JWT assertion exchanged at the key's `token_uri`), or as given.
//!
//! A fetched token is cached until 60 s before it expires (or halfway through its life, for
//! tokens shorter-lived than two minutes). The cache sits behind one tokio mutex, so concurrent
//! callers that find it stale share a single refresh instead of each asking for a token.
//!
//! Tokens, keys and assertions are [`Secret`]s: no error or log line built here contains one.

use std::time::Duration;

use chrono::Utc;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use reqwest::header;
use serde::{Deserialize, Serialize};
use tokio::sync::Mutex;
use tokio::time::Instant;

use super::{CloudRunAuth, NAME};
use crate::http::{self, CallFailure, ErrorShape, FailureClass};
use crate::{ProviderError, Secret};

/// The one scope botdispatch asks for: Cloud Run Admin needs `cloud-platform` (or `run`).
pub(super) const SCOPE: &str = "https://www.googleapis.com/auth/cloud-platform";
const JWT_BEARER: &str = "urn:ietf:params:oauth:grant-type:jwt-bearer";
/// Google refuses assertions valid for longer than an hour.
const ASSERTION_LIFETIME_SECS: i64 = 3600;
/// Refresh this long before a token expires, so a token never expires in flight.
const REFRESH_MARGIN: Duration = Duration::from_secs(60);
/// Lifetime assumed when a token answer does not say (Google's tokens last an hour; be modest).
const DEFAULT_LIFETIME: Duration = Duration::from_secs(300);
/// Longest lifetime believed (Google's access tokens last at most 12 h).
const MAX_LIFETIME_SECS: u64 = 12 * 3600;

/// Where access tokens come from; shared by every request of one provider.
pub(super) struct TokenSource {
    http: reqwest::Client,
    kind: Kind,
    timeout: Duration,
    cached: Mutex<Option<Cached>>,
}

enum Kind {
    Static(Secret),
    Metadata { url: String },
    ServiceAccount(ServiceAccount),
}

struct ServiceAccount {
    client_email: String,
    key_id: String,
    key: EncodingKey,
    token_uri: String,
}

struct Cached {
    token: Secret,
    refresh_at: Instant,
}

/// The fields of a service-account JSON key file that botdispatch reads.
#[derive(Deserialize)]
struct KeyFile {
    #[serde(default, rename = "type")]
    kind: String,
    #[serde(default)]
    client_email: String,
    #[serde(default)]
    private_key_id: String,
    #[serde(default)]
    private_key: Secret,
    #[serde(default)]
    token_uri: String,
}

#[derive(Serialize)]
struct Claims<'a> {
    iss: &'a str,
    scope: &'a str,
    aud: &'a str,
    iat: i64,
    exp: i64,
}

/// A token answer of the metadata server or an OAuth token endpoint.
#[derive(Deserialize)]
struct TokenAnswer {
    access_token: Secret,
    #[serde(default)]
    expires_in: Option<u64>,
}

/// An OAuth error answer (RFC 6749 §5.2).
#[derive(Deserialize)]
struct OAuthError {
    #[serde(default)]
    error: String,
    #[serde(default)]
    error_description: String,
}

fn config_error(message: impl Into<String>) -> ProviderError {
    ProviderError::config(NAME, message)
}

/// An OAuth token endpoint's error body: `{"error": "...", "error_description": "..."}`.
const OAUTH_ERRORS: ErrorShape = ErrorShape {
    parse: |text| {
        let e = serde_json::from_str::<OAuthError>(text).ok()?;
        let message = match (e.error.is_empty(), e.error_description.is_empty()) {
            (true, _) => return None,
            (false, true) => e.error,
            (false, false) => format!("{}: {}", e.error, e.error_description),
        };
        Some(http::ParsedError::message(message))
    },
    throttling_codes: &[],
};

impl TokenSource {
    /// Checks the credentials without any I/O (the key is parsed, nothing is fetched).
    pub(super) fn new(
        http: reqwest::Client,
        auth: &CloudRunAuth,
        timeout: Duration,
    ) -> Result<Self, ProviderError> {
        let kind = match auth {
            CloudRunAuth::StaticToken(token) => {
                if token.expose().trim().is_empty() {
                    return Err(config_error("the static access token is empty"));
                }
                Kind::Static(token.clone())
            }
            CloudRunAuth::MetadataServer { host } => {
                let host = host.trim().trim_end_matches('/');
                let url = format!(
                    "http://{host}/computeMetadata/v1/instance/service-accounts/default/token"
                );
                if host.is_empty() || host.contains('/') || url::Url::parse(&url).is_err() {
                    return Err(config_error(format!(
                        "GCE_METADATA_HOST {host:?} is not a host[:port]"
                    )));
                }
                Kind::Metadata { url }
            }
            CloudRunAuth::ServiceAccountKey {
                key_json,
                token_uri_override,
            } => Kind::ServiceAccount(ServiceAccount::parse(
                key_json,
                token_uri_override.as_deref(),
            )?),
        };
        Ok(Self {
            http,
            kind,
            timeout,
            cached: Mutex::new(None),
        })
    }

    /// Whether a refused token may be replaced by fetching a new one.
    pub(super) fn refreshable(&self) -> bool {
        !matches!(self.kind, Kind::Static(_))
    }

    /// A token valid for at least the refresh margin (or the given static one).
    pub(super) async fn token(&self) -> Result<Secret, ProviderError> {
        if let Kind::Static(token) = &self.kind {
            return Ok(token.clone());
        }
        // Held across the fetch on purpose: whoever waits here gets the fresh token.
        let mut cached = self.cached.lock().await;
        if let Some(c) = cached.as_ref() {
            if Instant::now() < c.refresh_at {
                return Ok(c.token.clone());
            }
        }
        let fetched_at = Instant::now();
        let (token, lifetime) = self.fetch().await?;
        let early = if lifetime > REFRESH_MARGIN * 2 {
            lifetime - REFRESH_MARGIN
        } else {
            lifetime / 2
        };
        *cached = Some(Cached {
            token: token.clone(),
            refresh_at: fetched_at + early,
        });
        Ok(token)
    }

    /// Forgets `used` if it is still the cached token (the API refused it: revoked, or the clock
    /// is off), so the next [`token`](Self::token) fetches a new one.
    pub(super) async fn invalidate(&self, used: &Secret) {
        let mut cached = self.cached.lock().await;
        if cached.as_ref().is_some_and(|c| &c.token == used) {
            *cached = None;
        }
    }

    async fn fetch(&self) -> Result<(Secret, Duration), ProviderError> {
        let (what, request) = match &self.kind {
            Kind::Static(token) => return Ok((token.clone(), Duration::MAX)),
            Kind::Metadata { url } => (
                "access token from the metadata server",
                self.http.get(url).header("Metadata-Flavor", "Google"),
            ),
            Kind::ServiceAccount(account) => {
                let assertion = account.assertion()?;
                let body = url::form_urlencoded::Serializer::new(String::new())
                    .append_pair("grant_type", JWT_BEARER)
                    .append_pair("assertion", assertion.expose())
                    .finish();
                (
                    "access token for the service account",
                    self.http
                        .post(&account.token_uri)
                        .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded")
                        .body(body),
                )
            }
        };
        let answer: TokenAnswer = async {
            let resp = http::send(request.timeout(self.timeout)).await?;
            http::read_json(resp, OAUTH_ERRORS).await
        }
        .await
        .map_err(|f| token_error(f, what))?;
        if answer.access_token.is_empty() {
            return Err(ProviderError::unavailable(
                NAME,
                format!("{what}: the answer carries no access token"),
            ));
        }
        // Capped, so that a nonsensical `expires_in` cannot overflow the clock arithmetic.
        let lifetime = answer.expires_in.map_or(DEFAULT_LIFETIME, |secs| {
            Duration::from_secs(secs.min(MAX_LIFETIME_SECS))
        });
        tracing::debug!(
            source = what,
            expires_in_s = lifetime.as_secs(),
            "fetched a Cloud Run access token"
        );
        Ok((answer.access_token, lifetime))
    }
}

impl ServiceAccount {
    fn parse(key_json: &Secret, token_uri_override: Option<&str>) -> Result<Self, ProviderError> {
        // serde_json can quote the offending input in its messages: report the position only.
        let key: KeyFile = serde_json::from_str(key_json.expose()).map_err(|e| {
            config_error(format!(
                "the service-account key is not a JSON key file (line {}, column {})",
                e.line(),
                e.column()
            ))
        })?;
        if key.kind != "service_account" {
            return Err(config_error(format!(
                "the key file is of type {:?}, not \"service_account\"",
                key.kind
            )));
        }
        let missing = [
            ("client_email", key.client_email.is_empty()),
            ("private_key_id", key.private_key_id.is_empty()),
            ("private_key", key.private_key.is_empty()),
        ];
        if let Some((field, _)) = missing.iter().find(|(_, empty)| *empty) {
            return Err(config_error(format!(
                "the service-account key has no {field}"
            )));
        }
        let token_uri = token_uri_override
            .map(str::to_owned)
            .unwrap_or(key.token_uri);
        if url::Url::parse(&token_uri).is_err() {
            return Err(config_error(format!(
                "the service-account token_uri {token_uri:?} is not a URL"
            )));
        }
        let encoding = EncodingKey::from_rsa_pem(key.private_key.expose().as_bytes())
            .map_err(|_| config_error("the service-account private_key is not an RSA PEM key"))?;
        Ok(Self {
            client_email: key.client_email,
            key_id: key.private_key_id,
            key: encoding,
            token_uri,
        })
    }

    /// A signed assertion valid for an hour from now, for the token endpoint only.
    fn assertion(&self) -> Result<Secret, ProviderError> {
        let iat = Utc::now().timestamp();
        let claims = Claims {
            iss: &self.client_email,
            scope: SCOPE,
            aud: &self.token_uri,
            iat,
            exp: iat + ASSERTION_LIFETIME_SECS,
        };
        let mut header = Header::new(Algorithm::RS256);
        header.kid = Some(self.key_id.clone());
        header.typ = Some("JWT".to_owned());
        jsonwebtoken::encode(&header, &claims, &self.key)
            .map(Secret::new)
            .map_err(|e| config_error(format!("signing the token assertion failed: {e}")))
    }
}

/// Maps a failed token request. Refusals are configuration problems (a revoked key, a VM
/// without a service account); throttling, server errors and transport failures are transient.
fn token_error(failure: CallFailure, what: &str) -> ProviderError {
    match failure.class() {
        FailureClass::Refused => config_error(failure.describe(what)),
        _ => ProviderError::from_call(NAME, what, failure),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key_json(extra: serde_json::Value) -> Secret {
        let mut key = serde_json::json!({
            "type": "service_account",
            "client_email": "bot@p.iam.gserviceaccount.com",
            "private_key_id": "k1",
            "private_key": "-----BEGIN PRIVATE KEY-----\nnot a key\n-----END PRIVATE KEY-----\n",
            "token_uri": "https://oauth2.googleapis.com/token",
        });
        if let (Some(key), Some(extra)) = (key.as_object_mut(), extra.as_object()) {
            key.extend(extra.clone());
        }
        Secret::new(key.to_string())
    }

    fn parse_error(key_json: &Secret) -> String {
        match ServiceAccount::parse(key_json, None) {
            Ok(_) => panic!("parsed"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn bad_key_files_are_config_errors_that_never_quote_the_key() {
        let err = parse_error(&Secret::new("{\"private_key\": \"SECRET-MATERIAL\" oops}"));
        assert!(err.contains("not a JSON key file"), "{err}");
        assert!(!err.contains("SECRET-MATERIAL"), "{err}");

        let err = parse_error(&key_json(serde_json::json!({"type": "authorized_user"})));
        assert!(err.contains("authorized_user"), "{err}");

        let err = parse_error(&key_json(serde_json::json!({"client_email": ""})));
        assert!(err.contains("no client_email"), "{err}");

        let err = parse_error(&key_json(serde_json::json!({})));
        assert!(err.contains("not an RSA PEM key"), "{err}");
        assert!(!err.contains("not a key"), "{err}");
    }

    #[test]
    fn metadata_host_must_be_a_host() {
        let http = reqwest::Client::new();
        let auth = |host: &str| CloudRunAuth::MetadataServer { host: host.into() };
        assert!(TokenSource::new(
            http.clone(),
            &auth("169.254.169.254"),
            Duration::from_secs(1)
        )
        .is_ok());
        assert!(TokenSource::new(
            http.clone(),
            &auth("127.0.0.1:8080"),
            Duration::from_secs(1)
        )
        .is_ok());
        assert!(TokenSource::new(http.clone(), &auth("a/b"), Duration::from_secs(1)).is_err());
        assert!(TokenSource::new(http, &auth(""), Duration::from_secs(1)).is_err());
    }
}
