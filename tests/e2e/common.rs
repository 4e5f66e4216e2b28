//! Test harness: a real botdispatch HTTP server on 127.0.0.1:0 in front of the stateful fakes of
//! Fly and Daily, with helpers to call it as a client would.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use botdispatch::config::Config;
use botdispatch::server::{serve, ServerLimits};
use botdispatch::{app, build_router, App, AppState};
use providers::testkit::daily_fake::{FakeDaily, FakeDailyConfig};
use providers::testkit::fly_fake::{FakeFly, FakeFlyConfig, FakeFlyWarmConfig};
use reqwest::StatusCode;
use serde_json::{json, Value};

pub const JWT_SECRET: &str = "test-secret-0123456789abcdef0123456789";
/// Every test dispatcher's session secret (as production requires: never the JWT secret).
pub const SESSION_SECRET: &str = "test-session-secret-0123456789abcdef0123";
pub const FLY_TOKEN: &str = "fly-test-token";
pub const FLY_APP: &str = "bots";
pub const DAILY_KEY: &str = "daily-test-key";
pub const DAILY_DOMAIN: &str = "botdispatch-test";
pub const DAILY_DOMAIN_ID: &str = "5f1b3c0e-domain";
pub const BOT_IMAGE: &str = "registry.fly.io/bots:v1";

/// How a test environment is set up.
pub struct Options {
    pub fly: FakeFlyConfig,
    /// The Fly fake's per-machine bot servers, suspend/resume and leases.
    pub fly_warm: FakeFlyWarmConfig,
    /// Extra TOML appended to the generated config.
    pub toml: String,
    /// Extra environment overrides.
    pub env: Vec<(&'static str, String)>,
    /// Where the Fly provider sends requests (defaults to the fake itself).
    pub fly_url: Option<String>,
    /// Leave `BOTDISPATCH_JWT_SECRET` unset (public-key set-ups).
    pub no_jwt_secret: bool,
    /// Run the background loops (the reaper).
    pub background: bool,
    /// Use these fakes instead of starting new ones (several replicas on one "cloud").
    pub shared: Option<(FakeFly, FakeDaily)>,
    pub limits: ServerLimits,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            fly: FakeFlyConfig {
                token: FLY_TOKEN.to_owned(),
                apps: vec![FLY_APP.to_owned()],
                ..FakeFlyConfig::default()
            },
            fly_warm: FakeFlyWarmConfig::default(),
            toml: String::new(),
            env: Vec::new(),
            fly_url: None,
            no_jwt_secret: false,
            background: false,
            shared: None,
            limits: ServerLimits::default(),
        }
    }
}

pub struct TestEnv {
    pub fly: FakeFly,
    pub daily: FakeDaily,
    pub app: Arc<App>,
    pub base: String,
    pub http: reqwest::Client,
}

impl TestEnv {
    pub async fn start() -> Self {
        Self::with(Options::default()).await
    }

    pub async fn with_without_jwt_secret(opts: Options) -> Self {
        Self::with(Options {
            no_jwt_secret: true,
            ..opts
        })
        .await
    }

    pub async fn with(opts: Options) -> Self {
        let (fly, daily) = match opts.shared.clone() {
            Some(fakes) => fakes,
            None => start_fakes_with(&opts.fly, &opts.fly_warm).await,
        };
        let mut env: BTreeMap<&str, String> = BTreeMap::from([
            ("BOTDISPATCH_PROVIDER", "fly".to_owned()),
            ("BOTDISPATCH_ROOMS", "daily".to_owned()),
            ("BOTDISPATCH_JWT_SECRET", JWT_SECRET.to_owned()),
            ("BOTDISPATCH_SESSION_SECRET", SESSION_SECRET.to_owned()),
            ("BOTDISPATCH_BOT_IMAGE", BOT_IMAGE.to_owned()),
            ("BOTDISPATCH_START_TIMEOUT_SECS", "10".to_owned()),
            ("BOTDISPATCH_LISTEN", "127.0.0.1:0".to_owned()),
            ("FLY_API_TOKEN", FLY_TOKEN.to_owned()),
            ("FLY_APP_NAME", FLY_APP.to_owned()),
            (
                "FLY_API_URL",
                opts.fly_url.clone().unwrap_or_else(|| fly.base_url()),
            ),
            ("DAILY_API_KEY", DAILY_KEY.to_owned()),
            ("DAILY_API_URL", daily.base_url()),
            ("BOTDISPATCH_FLY_MACHINE_URL", fly.machine_url_template()),
        ]);
        if opts.no_jwt_secret {
            env.remove("BOTDISPATCH_JWT_SECRET");
        }
        env.extend(opts.env.iter().map(|(k, v)| (*k, v.clone())));
        let config = config_from(&opts.toml, &env).expect("test config is valid");
        let app = Arc::new(
            App::build(config, app::http_client().unwrap())
                .await
                .expect("app builds"),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let router = build_router(AppState(app.clone()));
        if opts.background {
            app.spawn_background();
        }
        let shutdown = app.shutdown.clone();
        tokio::spawn(async move {
            serve(listener, router, opts.limits, async move {
                shutdown.cancelled().await
            })
            .await
        });
        Self {
            fly,
            daily,
            app,
            base,
            http: reqwest::Client::new(),
        }
    }

    /// A valid token for `sub` from the configured secret.
    pub fn token(&self, sub: &str) -> String {
        self.app
            .auth
            .mint(sub, Duration::from_secs(600), None)
            .unwrap()
    }

    /// A token that may read every session (`sessions:read_any`).
    pub fn reader_token(&self) -> String {
        self.app
            .auth
            .mint("ops", Duration::from_secs(600), Some("sessions:read_any"))
            .unwrap()
    }

    pub async fn post_start(&self, sub: &str, body: Value) -> (StatusCode, Value) {
        self.call("POST", "/start", Some(&self.token(sub)), Some(body))
            .await
    }

    /// Any call with an optional bearer token and JSON body; answers status and JSON body.
    pub async fn call(
        &self,
        method: &str,
        path: &str,
        token: Option<&str>,
        body: Option<Value>,
    ) -> (StatusCode, Value) {
        let mut req = self
            .http
            .request(method.parse().unwrap(), format!("{}{path}", self.base));
        if let Some(token) = token {
            req = req.bearer_auth(token);
        }
        if let Some(body) = body {
            req = req.json(&body);
        }
        let resp = req.send().await.expect("botdispatch answers");
        let status = resp.status();
        let text = resp.text().await.unwrap();
        let json = serde_json::from_str(&text)
            .unwrap_or_else(|e| panic!("non-JSON answer {status}: {text:?}: {e}"));
        (status, json)
    }

    /// One request through this app's router in-process, without a socket.
    pub async fn oneshot(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: Vec<u8>,
    ) -> (StatusCode, reqwest::header::HeaderMap, Value) {
        oneshot(
            build_router(AppState(self.app.clone())),
            method,
            path,
            headers,
            body,
        )
        .await
    }

    pub async fn get_session(&self, sub: &str, status_url: &str) -> (StatusCode, Value) {
        self.call("GET", status_url, Some(&self.token(sub)), None)
            .await
    }

    /// Live (not destroyed) machines and existing rooms in the fakes.
    pub fn leftovers(&self) -> (usize, usize) {
        (self.fly.live_machines().len(), self.daily.rooms().len())
    }

    /// Waits until the fakes hold no live machine and no room (clean-up may still be running
    /// when a client gave up); panics with what is left after `timeout`.
    pub async fn assert_nothing_left_within(&self, timeout: Duration) {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let left = self.leftovers();
            if left == (0, 0) {
                return;
            }
            if tokio::time::Instant::now() > deadline {
                panic!(
                    "leaked {} machine(s) and {} room(s): {:?} {:?}",
                    left.0,
                    left.1,
                    self.fly.live_machines(),
                    self.daily.rooms()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub fn assert_spec_clean(&self) {
        let violations = self.fly.spec_violations();
        assert!(
            violations.is_empty(),
            "Fly spec violations: {violations:#?}"
        );
    }
}

/// One request through `router` in-process, without a socket (as axum's `examples/testing`
/// does): status, headers and the JSON body.
pub async fn oneshot(
    router: axum::Router,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Vec<u8>,
) -> (StatusCode, reqwest::header::HeaderMap, Value) {
    use http_body_util::BodyExt;
    use tower::ServiceExt;
    let mut req = axum::http::Request::builder().method(method).uri(path);
    for (name, value) in headers {
        req = req.header(*name, *value);
    }
    let req = req.body(axum::body::Body::from(body)).unwrap();
    let (parts, body) = router.oneshot(req).await.unwrap().into_parts();
    let bytes = body.collect().await.unwrap().to_bytes();
    let json = serde_json::from_slice(&bytes)
        .unwrap_or_else(|e| panic!("non-JSON answer {}: {bytes:?}: {e}", parts.status));
    (parts.status, parts.headers, json)
}

pub async fn start_fakes(fly: &FakeFlyConfig) -> (FakeFly, FakeDaily) {
    start_fakes_with(fly, &FakeFlyWarmConfig::default()).await
}

pub async fn start_fakes_with(
    fly: &FakeFlyConfig,
    warm: &FakeFlyWarmConfig,
) -> (FakeFly, FakeDaily) {
    let fly = FakeFly::start_with(fly.clone(), warm.clone()).await;
    let daily = FakeDaily::start(FakeDailyConfig {
        api_key: DAILY_KEY.to_owned(),
        domain_name: DAILY_DOMAIN.to_owned(),
        domain_id: DAILY_DOMAIN_ID.to_owned(),
    })
    .await;
    (fly, daily)
}

/// Builds a validated config from TOML and an environment map, as `main` does.
pub fn config_from(toml: &str, env: &BTreeMap<&str, String>) -> Result<Config, String> {
    Config::parse(toml, &|k| env.get(k).cloned()).map_err(|e| e.to_string())
}

/// Decodes a JWT's claims after checking its HS256 signature with `key`.
pub fn decode_hs256(token: &str, key: &str) -> Value {
    let mut validation = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::HS256);
    validation.validate_aud = false;
    validation.required_spec_claims.clear();
    jsonwebtoken::decode::<Value>(
        token,
        &jsonwebtoken::DecodingKey::from_secret(key.as_bytes()),
        &validation,
    )
    .expect("token verifies with the key")
    .claims
}

/// GET `url` with a bearer token; the JSON answer.
pub async fn get_json(http: &reqwest::Client, url: &str, token: &str) -> Value {
    http.get(url)
        .bearer_auth(token)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

/// The plain session key: the first part of a session id.
pub fn session_key(session_id: &str) -> &str {
    session_id.split('.').next().unwrap()
}

/// The machine handle a session id carries.
pub fn session_handle(session_id: &str) -> String {
    use base64::Engine;
    let encoded = session_id.split('.').nth(1).unwrap();
    String::from_utf8(
        base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(encoded)
            .unwrap(),
    )
    .unwrap()
}

pub fn now() -> i64 {
    chrono::Utc::now().timestamp()
}

pub fn start_body() -> Value {
    json!({ "body": { "hello": "world" } })
}

/// The dispatcher process; killed if the test fails half-way.
pub struct Dispatcher {
    pub child: Child,
    lines: mpsc::Receiver<String>,
    seen: Vec<String>,
}

impl Drop for Dispatcher {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Dispatcher {
    pub fn spawn(extra_env: &[(&str, &str)]) -> Self {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_botdispatch"));
        // A clean environment: nothing configured, as on a fresh machine.
        cmd.env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("BOTDISPATCH_LISTEN", "127.0.0.1:0")
            .env("BOTDISPATCH_LOG_FORMAT", "json")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        for (k, v) in extra_env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("botdispatch binary runs");
        let (tx, lines) = mpsc::channel();
        for stream in [
            Box::new(child.stdout.take().unwrap()) as Box<dyn std::io::Read + Send>,
            Box::new(child.stderr.take().unwrap()),
        ] {
            let tx = tx.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(stream).lines().map_while(Result::ok) {
                    if tx.send(line).is_err() {
                        break;
                    }
                }
            });
        }
        Self {
            child,
            lines,
            seen: Vec::new(),
        }
    }

    /// Waits for an output line containing `needle`.
    pub fn wait_for(&mut self, needle: &str, timeout: Duration) -> String {
        if let Some(line) = self.seen.iter().find(|l| l.contains(needle)) {
            return line.clone();
        }
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    self.seen.push(line.clone());
                    if line.contains(needle) {
                        return line;
                    }
                }
                Err(_) => panic!(
                    "no line with {needle:?} within {timeout:?}; output:\n{}",
                    self.seen.join("\n")
                ),
            }
        }
    }

    pub fn output(&mut self) -> String {
        while let Ok(line) = self.lines.try_recv() {
            self.seen.push(line);
        }
        self.seen.join("\n")
    }
}

impl Dispatcher {
    /// The embedded default's printed curl command: the base URL and the development token.
    pub fn wait_dev_banner(&mut self) -> (String, String) {
        let curl = self.wait_for("curl -s -X POST http://", Duration::from_secs(30));
        let url = curl
            .split_whitespace()
            .find(|w| w.starts_with("http://"))
            .expect("the curl line has the URL");
        let token = curl
            .split("Bearer ")
            .nth(1)
            .and_then(|rest| rest.split('\'').next())
            .expect("the curl line has the token");
        (url.trim_end_matches("/start").to_owned(), token.to_owned())
    }

    /// The address from the JSON "botdispatch ready" log line.
    pub fn wait_ready(&mut self) -> String {
        let line = self.wait_for("botdispatch ready", Duration::from_secs(30));
        let json: Value = serde_json::from_str(&line).expect("JSON log line");
        format!("http://{}", json["listen"].as_str().unwrap())
    }

    pub fn signal(&self, signal: &str) {
        nix_kill(self.child.id(), signal);
    }

    /// Waits for the process to exit; its status.
    pub fn wait_exit(&mut self, timeout: Duration) -> std::process::ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "dispatcher did not exit within {timeout:?}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

pub fn nix_kill(pid: u32, signal: &str) {
    let status = std::process::Command::new("kill")
        .args([&format!("-{signal}"), &pid.to_string()])
        .status()
        .unwrap();
    assert!(status.success());
}

/// The environment that points a dispatcher process at these fakes.
pub fn process_env(fly: &FakeFly, daily: &FakeDaily) -> Vec<(&'static str, String)> {
    vec![
        ("BOTDISPATCH_PROVIDER", "fly".to_owned()),
        ("BOTDISPATCH_ROOMS", "daily".to_owned()),
        ("BOTDISPATCH_JWT_SECRET", JWT_SECRET.to_owned()),
        ("BOTDISPATCH_SESSION_SECRET", SESSION_SECRET.to_owned()),
        ("BOTDISPATCH_BOT_IMAGE", BOT_IMAGE.to_owned()),
        ("FLY_API_TOKEN", FLY_TOKEN.to_owned()),
        ("FLY_APP_NAME", FLY_APP.to_owned()),
        ("FLY_API_URL", fly.base_url()),
        ("DAILY_API_KEY", DAILY_KEY.to_owned()),
        ("DAILY_API_URL", daily.base_url()),
    ]
}

/// A token for `sub` signed with the tests' JWT secret (for dispatcher processes).
pub fn hs_token(sub: &str) -> String {
    let claims = serde_json::json!({"sub": sub, "exp": now() + 600});
    jsonwebtoken::encode(
        &jsonwebtoken::Header::default(),
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(JWT_SECRET.as_bytes()),
    )
    .unwrap()
}
