//! `botdispatch check`: validates the configuration and proves each credential with one
//! read-only call, so an operator learns what is wrong before the first client does.

use std::fmt;

use crate::app::{build_context, build_rooms};
use crate::auth::Authenticator;
use crate::config::Config;

/// One line of the check table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckRow {
    pub name: String,
    pub ok: bool,
    pub detail: String,
}

impl fmt::Display for CheckRow {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{:<4}  {:<22} {}",
            if self.ok { "PASS" } else { "FAIL" },
            self.name,
            self.detail
        )
    }
}

fn row(name: impl Into<String>, result: Result<String, String>) -> CheckRow {
    let (ok, detail) = match result {
        Ok(d) => (true, d),
        Err(d) => (false, d),
    };
    CheckRow {
        name: name.into(),
        ok,
        detail,
    }
}

/// Runs every check against an already validated config (a config that does not load is
/// reported by the caller). Never panics; each failure says what to fix.
pub async fn run(config: &Config, http: reqwest::Client) -> Vec<CheckRow> {
    let mut rows = vec![row(
        "configuration",
        Ok(format!(
            "provider={}, rooms={}, agents={}, app_env={}",
            config.provider.name(),
            config.rooms_kind(),
            config.agents.keys().cloned().collect::<Vec<_>>().join(","),
            config.app_env
        )),
    )];
    rows.push(row(
        "jwt verification",
        Authenticator::new(&config.auth, config.auth.jwt_secret.as_ref())
            .map(|_| match &config.auth.jwt_public_key_file {
                Some(path) => format!("public key {}", path.display()),
                None if config.auth.jwt_secret.is_some() => "HS256 shared secret".to_owned(),
                None => "no key configured".to_owned(),
            })
            .map_err(|e| e.to_string()),
    ));
    let rooms_name = format!("rooms ({})", config.rooms_kind());
    match build_rooms(config, http.clone()).await {
        Ok(rooms) => rows.push(row(
            rooms_name,
            rooms
                .check()
                .await
                .map(|()| "API key accepted".to_owned())
                .map_err(|e| e.to_string()),
        )),
        Err(e) => rows.push(row(rooms_name, Err(format!("{e:#}")))),
    }
    let provider_name = format!("provider ({})", config.provider.name());
    match config
        .provider
        .settings()
        .build(&build_context(config, http))
        .await
    {
        Ok(provider) => rows.push(row(
            provider_name,
            provider
                .check()
                .await
                .map(|()| "credentials accepted (one read-only call)".to_owned())
                .map_err(|e| e.to_string()),
        )),
        Err(e) => rows.push(row(provider_name, Err(format!("{e:#}")))),
    }
    rows
}
