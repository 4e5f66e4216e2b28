//! The `fly` provider: one Fly Machine per session, through the Fly Machines REST API.
//!
//! A session's machine is created with `auto_destroy: true` and `restart.policy: "no"`, so when the
//! bot exits Fly destroys the VM and nothing stays billed. The machine's `config.metadata` carries
//! the session labels, which is how the reaper and an idempotent retry find it again without any
//! local memory. Requests follow the published OpenAPI spec (`testkit/specs/`).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use reqwest::{Method, RequestBuilder, Response, StatusCode};
use serde::Deserialize;
use serde_json::{json, Value};

use crate::config::{check_url, is_slug, required, BuildContext, ConfigError, ProviderSettings};
use crate::env::Env;
use crate::http::{self, CallFailure, ErrorShape};
use crate::labels::{key, MANAGED_BY, ROLE_SESSION};
use crate::retry::{Op, RateLimit};
use crate::{
    Deadline, HttpHandoff, Launched, MachineProvider, MachineState, MachineStatus, MachineTemplate,
    ProviderError, Relabel, Reserve, ReserveLabels, Secret, SessionBinding, SessionLabels, Tier,
    Workload,
};

const NAME: &str = "fly";
/// The header that proves a call holds a machine's lease.
const LEASE_NONCE: &str = "fly-machine-lease-nonce";
/// Fly's `/wait` refuses to wait longer than this per call; longer waits loop.
const MAX_WAIT_SECS: u64 = 60;
/// Default of `fly.max_open_waits`: 128 long-polls cost about 5 MB of connection buffers.
pub const DEFAULT_MAX_OPEN_WAITS: usize = 128;
/// How often a start beyond `fly.max_open_waits` reads its machine (Fly allows 5 reads a
/// second per machine, burst 10).
const POLL_EVERY: Duration = Duration::from_millis(500);
/// At most this many of those reads at once, so that they share the client's idle
/// connections (32 per host) instead of opening one each.
const POLLS_AT_ONCE: usize = 32;
/// At most this many other calls open to Fly at once (long-polls have their own limit). With
/// Fly's documented limits on, creates are at most 3 per app at a time and this never binds;
/// without them (`outbound_rate_scale = 0`) a burst of starts would otherwise open a
/// connection per create.
const CALLS_AT_ONCE: usize = 64;
/// Default base URL of the Machines API (`FLY_API_URL`).
pub const DEFAULT_API_URL: &str = "https://api.machines.dev/v1";
/// Default address of a machine's bot server on Fly's private network (6PN).
pub const DEFAULT_MACHINE_URL: &str = "http://{machine_id}.vm.{app}.internal:{port}";
/// How long a claim holds a machine's lease (it releases it at once when done).
const CLAIM_LEASE_SECS: u64 = 30;
/// At most this many apps in `fly.apps`.
pub const MAX_APPS: usize = 64;
/// The keys naming the bots' apps, as messages spell them.
const APPS_KEY: &str = "fly.apps (BOTDISPATCH_FLY_APPS)";
const APP_NAME_KEY: &str = "fly.app_name (FLY_APP_NAME)";

/// Settings of the `fly` provider: the `[fly]` section of the configuration file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FlyConfig {
    /// `FLY_API_TOKEN`.
    pub api_token: Option<Secret>,
    /// The app the bot machines run in. `BOTDISPATCH_FLY_APP`, else `FLY_APP_NAME`.
    /// Ignored when `apps` is set.
    pub app_name: Option<String>,
    /// Several apps the bot machines run in (sharding, DESIGN §10): creates spread over them,
    /// so Fly's per-app create limit (1 req/s, burst 3) multiplies; every app is listed,
    /// checked and reaped. All share `api_token`. Takes precedence over `app_name`.
    /// `BOTDISPATCH_FLY_APPS` (comma list); at most [`MAX_APPS`].
    pub apps: Vec<String>,
    /// Base URL including the version. `BOTDISPATCH_FLY_API_URL`, else `FLY_API_URL`; default
    /// `https://api.machines.dev/v1`.
    pub api_url: String,
    /// Region used when a start names none; unset lets Fly choose.
    /// `BOTDISPATCH_FLY_REGION`, else `FLY_REGION`.
    pub default_region: Option<String>,
    /// Where a machine's bot server is reached for the `http` handoff: a URL template with
    /// `{machine_id}`, `{app}`, `{region}`, `{private_ip}` and `{port}`; `/readyz` and `/bot`
    /// are appended to its path. `BOTDISPATCH_FLY_MACHINE_URL`, default
    /// `http://{machine_id}.vm.{app}.internal:{port}` (the dispatcher must run in the same Fly
    /// organization).
    pub machine_url: String,
    /// When the dispatcher itself runs on Fly (`FLY_MACHINE_ID` is set): its own app, from
    /// Fly's `FLY_APP_NAME`. Bots must never run there.
    #[serde(skip)]
    pub own_app: Option<String>,
    /// At most this many `/wait` long-polls open at once. Each holds an HTTP/1.1 connection
    /// to Fly for the whole boot (about 40 KB of buffers); a start beyond them reads its
    /// machine every 500 ms instead, until it is started or a long-poll frees, and so learns
    /// of its boot up to half a second later. `BOTDISPATCH_FLY_MAX_OPEN_WAITS`, default 128.
    pub max_open_waits: usize,
}

impl Default for FlyConfig {
    fn default() -> Self {
        Self {
            api_token: None,
            app_name: None,
            apps: Vec::new(),
            api_url: DEFAULT_API_URL.to_owned(),
            default_region: None,
            machine_url: DEFAULT_MACHINE_URL.to_owned(),
            own_app: None,
            max_open_waits: DEFAULT_MAX_OPEN_WAITS,
        }
    }
}

impl FlyConfig {
    /// The apps bot machines run in, validated: `apps` when set, else `app_name`. Each is a
    /// Fly app name, none twice, none the dispatcher's own app.
    pub fn bot_apps(&self) -> Result<Vec<String>, ConfigError> {
        let (apps, key) = match self.apps.is_empty() {
            false => (self.apps.clone(), APPS_KEY),
            true => {
                let app = required(
                    self.app_name.as_deref(),
                    &format!("{APPS_KEY} or {APP_NAME_KEY}"),
                    NAME,
                )?;
                (vec![app.to_owned()], APP_NAME_KEY)
            }
        };
        if apps.len() > MAX_APPS {
            return Err(ConfigError::new(format!(
                "{key} names {} apps; at most {MAX_APPS} are allowed",
                apps.len()
            )));
        }
        for (i, app) in apps.iter().enumerate() {
            if !is_slug(app, 63) {
                return Err(ConfigError::new(format!(
                    "{key} = {app:?} is not a Fly app name"
                )));
            }
            if apps[..i].contains(app) {
                return Err(ConfigError::new(format!("{key} names {app:?} twice")));
            }
            if self.own_app.as_ref() == Some(app) {
                let what = match key {
                    APP_NAME_KEY => format!("fly.app_name = {app:?} is"),
                    _ => format!("{key} names {app:?},"),
                };
                return Err(ConfigError::new(format!(
                    "{what} this dispatcher's own app: bots started there would \
                     inherit its secrets (the Fly API token, the Daily key, the JWT secret). Create \
                     separate apps for the bots and name them with BOTDISPATCH_FLY_APP or \
                     BOTDISPATCH_FLY_APPS (on Fly, FLY_APP_NAME is the platform's name for the \
                     dispatcher's own app)"
                )));
            }
        }
        Ok(apps)
    }
}

#[async_trait]
impl ProviderSettings for FlyConfig {
    fn name(&self) -> &'static str {
        NAME
    }

    fn apply_env(&mut self, env: &Env) -> Result<(), ConfigError> {
        if env.get("FLY_MACHINE_ID").is_some() {
            self.own_app = env.get("FLY_APP_NAME");
        }
        env.apply("FLY_API_TOKEN", &mut self.api_token)?;
        env.apply("FLY_APP_NAME", &mut self.app_name)?;
        env.apply("FLY_API_URL", &mut self.api_url)?;
        env.apply("FLY_REGION", &mut self.default_region)?;
        // On Fly itself, `FLY_*` names belong to the platform (every machine gets its own
        // FLY_APP_NAME and FLY_REGION), so a dispatcher deployed on Fly names the bots' app
        // with these, which win.
        env.apply("BOTDISPATCH_FLY_APP", &mut self.app_name)?;
        env.apply("BOTDISPATCH_FLY_APPS", &mut self.apps)?;
        env.apply("BOTDISPATCH_FLY_API_URL", &mut self.api_url)?;
        env.apply("BOTDISPATCH_FLY_REGION", &mut self.default_region)?;
        env.apply("BOTDISPATCH_FLY_MACHINE_URL", &mut self.machine_url)?;
        env.apply("BOTDISPATCH_FLY_MAX_OPEN_WAITS", &mut self.max_open_waits)
    }

    fn validate(&self, _production: bool) -> Result<(), ConfigError> {
        required(
            self.api_token.as_ref().map(Secret::expose),
            "fly.api_token (FLY_API_TOKEN)",
            NAME,
        )?;
        let apps = self.bot_apps()?;
        let app = apps[0].as_str();
        check_url("fly.api_url (FLY_API_URL)", &self.api_url)?;
        let example = expand_machine_url(
            &self.machine_url,
            "148ed193b95089",
            app,
            "iad",
            "fdaa::1",
            8080,
        );
        check_url("fly.machine_url (BOTDISPATCH_FLY_MACHINE_URL)", &example)?;
        if !(1..=100_000).contains(&self.max_open_waits) {
            return Err(ConfigError::new(format!(
                "fly.max_open_waits (BOTDISPATCH_FLY_MAX_OPEN_WAITS) = {} must be between 1 and 100000",
                self.max_open_waits
            )));
        }
        if let Some(region) = &self.default_region {
            if !is_slug(region, 32) {
                return Err(ConfigError::new(format!(
                    "fly.default_region (FLY_REGION) = {region:?} is not a region code"
                )));
            }
        }
        Ok(())
    }

    fn workload(
        &self,
        agent: &str,
        image: Option<&str>,
        _cmd: Option<&[String]>,
    ) -> Result<Workload, ConfigError> {
        match image.map(str::trim).filter(|i| !i.is_empty()) {
            Some(image) => Ok(Workload::Image(image.to_owned())),
            None => Err(ConfigError::new(format!(
                "agents.{agent}.image is required (or BOTDISPATCH_BOT_IMAGE for the default agent)"
            ))),
        }
    }

    fn http_handoff(&self) -> bool {
        true
    }

    fn reserve_tiers(&self) -> &'static [Tier] {
        &[Tier::Hot, Tier::Suspended, Tier::Stopped]
    }

    fn recycles(&self) -> bool {
        true
    }

    async fn build(&self, ctx: &BuildContext) -> Result<Arc<dyn MachineProvider>, ProviderError> {
        Ok(Arc::new(FlyProvider::new(ctx, self.clone())?))
    }
}

/// Fly's error body: `{"error": "...", "status": ...}`.
const FLY_ERRORS: ErrorShape = ErrorShape {
    parse: |text| {
        #[derive(Deserialize)]
        struct FlyError {
            error: Option<String>,
        }
        let message = serde_json::from_str::<FlyError>(text).ok()?.error?;
        Some(http::ParsedError::message(message))
    },
    throttling_codes: &[],
};

/// Launches sessions as Fly Machines, in one app or spread over several (`fly.apps`).
///
/// With several apps a machine's handle is `<app>/<machine id>`; with one it is the plain
/// machine id (and a plain id always means the first app, so session ids issued before the
/// apps were sharded stay valid while that app stays first). A create goes to the app its
/// machine's name hashes to ([`FlyProvider::app_for`]): every replica sends a given name to
/// the same app, so a retried or duplicated create conflicts there instead of making a second
/// machine in another app. (Adding an app moves the names that now hash to it: while replicas
/// disagree on the list, two of them racing one session could each create its machine; a
/// sequential retry still finds the first, as `find` lists every app.)
pub struct FlyProvider {
    http: reqwest::Client,
    api_url: String,
    api_token: Secret,
    /// The bots' apps, at least one; plain handles are machines of the first.
    apps: Vec<String>,
    default_region: Option<String>,
    machine_url: String,
    request_timeout: Duration,
    deployment: String,
    /// Permits for `/wait` long-polls (`fly.max_open_waits`), handed out in arrival order.
    open_waits: tokio::sync::Semaphore,
    /// Permits for the machine reads of starts that wait without one ([`POLLS_AT_ONCE`]).
    polls: tokio::sync::Semaphore,
    /// Permits for every other call ([`CALLS_AT_ONCE`]).
    calls: tokio::sync::Semaphore,
}

/// Fills a machine URL template's placeholders.
fn expand_machine_url(
    template: &str,
    machine_id: &str,
    app: &str,
    region: &str,
    private_ip: &str,
    port: u16,
) -> String {
    // An IPv6 address goes in brackets in a URL's host.
    let ip = if private_ip.contains(':') {
        format!("[{private_ip}]")
    } else {
        private_ip.to_owned()
    };
    template
        .replace("{machine_id}", machine_id)
        .replace("{app}", app)
        .replace("{region}", region)
        .replace("{private_ip}", &ip)
        .replace("{port}", &port.to_string())
}

/// A Fly machine id: lowercase hex today (14 characters); letters and digits, 8 to 32, are
/// accepted so a longer id scheme would not lock sessions out.
fn is_machine_id(handle: &str) -> bool {
    (8..=32).contains(&handle.len())
        && handle
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
}

impl FlyProvider {
    /// This deployment's machines (in every app) that are not destroyed and pass `keep`.
    async fn list_deployment(
        &self,
        keep: impl Fn(&MachineStatus) -> bool,
    ) -> Result<Vec<MachineStatus>, ProviderError> {
        let machines = self
            .list(
                &[
                    (key::MANAGED_BY, MANAGED_BY),
                    (key::DEPLOYMENT, &self.deployment),
                ],
                false,
            )
            .await?;
        Ok(machines
            .into_iter()
            .filter(|m| m.provider_state != "destroyed" && keep(m))
            .collect())
    }

    /// Validates `config` (no I/O) and builds the client on the context's shared HTTP client.
    pub fn new(ctx: &BuildContext, config: FlyConfig) -> Result<Self, ProviderError> {
        config
            .validate(ctx.production)
            .map_err(|e| ProviderError::config(NAME, e.0))?;
        Ok(Self {
            http: ctx.http.clone(),
            api_url: config.api_url.trim_end_matches('/').to_owned(),
            apps: config
                .bot_apps()
                .map_err(|e| ProviderError::config(NAME, e.0))?,
            api_token: config.api_token.unwrap_or_default(),
            default_region: config.default_region,
            machine_url: config.machine_url,
            request_timeout: ctx.request_timeout,
            deployment: ctx.deployment.clone(),
            open_waits: tokio::sync::Semaphore::new(config.max_open_waits),
            polls: tokio::sync::Semaphore::new(POLLS_AT_ONCE),
            calls: tokio::sync::Semaphore::new(CALLS_AT_ONCE),
        })
    }

    /// The app a machine named `name` is created in: of every app, the one whose hash with
    /// the name is highest (rendezvous hashing). The same for every replica configured with
    /// the same apps, whatever their order; adding an app moves only the names that now
    /// choose the new one.
    pub fn app_for(&self, name: &str) -> &str {
        use sha2::{Digest, Sha256};
        let score = |app: &str| {
            let digest = Sha256::new()
                .chain_update(app.as_bytes())
                .chain_update([0])
                .chain_update(name.as_bytes())
                .finalize();
            let mut head = [0u8; 8];
            head.copy_from_slice(&digest[..8]);
            u64::from_be_bytes(head)
        };
        match self.apps.as_slice() {
            [only] => only,
            apps => apps
                .iter()
                .max_by_key(|app| score(app))
                .map_or("", String::as_str),
        }
    }

    /// The handle of machine `id` of `app`: `<app>/<id>` when there are several apps.
    fn handle_of(&self, app: &str, id: &str) -> String {
        match self.apps.len() {
            1 => id.to_owned(),
            _ => format!("{app}/{id}"),
        }
    }

    /// `(app, machine id)` of a handle of this provider: `<app>/<id>` for one of the
    /// configured apps, or a plain id (the first app).
    fn locate<'a>(&'a self, handle: &'a str) -> Option<(&'a str, &'a str)> {
        let (app, id) = match handle.split_once('/') {
            Some((app, id)) => (self.apps.iter().find(|a| *a == app)?.as_str(), id),
            None => (self.apps[0].as_str(), handle),
        };
        is_machine_id(id).then_some((app, id))
    }

    /// A request to `/apps/{app}{path}`.
    fn app_request(&self, app: &str, method: Method, path: &str) -> RequestBuilder {
        let url = format!("{}/apps/{app}{path}", self.api_url);
        self.http
            .request(method, url)
            .bearer_auth(self.api_token.expose())
            .timeout(self.request_timeout)
    }

    /// A request to `/apps/{app}/machines/{id}{rest}` of the machine `handle` names, for a
    /// valid handle only (percent-encoded all the same).
    fn machine_request(
        &self,
        method: Method,
        handle: &str,
        rest: &str,
    ) -> Result<RequestBuilder, ProviderError> {
        let (app, id) = self.locate(handle).ok_or_else(|| {
            ProviderError::rejected(NAME, format!("{handle:?} is not a machine of this app"))
        })?;
        let segment = |s: &str| http::segment(s).map_err(|e| ProviderError::rejected(NAME, e));
        let path = format!("/machines/{}{rest}", segment(id)?);
        Ok(self.app_request(&segment(app)?, method, &path))
    }

    /// A machine of `app` as botdispatch reports it, with its handle.
    fn status_of(&self, app: &str, machine: FlyMachine) -> MachineStatus {
        let mut status = machine.into_status(&self.deployment);
        status.handle = self.handle_of(app, &status.handle);
        status
    }

    /// What a create or start of machine `machine` of `app` returns.
    fn launched(&self, app: &str, machine: FlyMachine) -> Launched {
        Launched {
            handle: self.handle_of(app, &machine.id),
            region: machine.region,
            version: machine.instance_id,
            address: machine.private_ip,
        }
    }

    /// Sends a request, one of [`CALLS_AT_ONCE`]; any failure becomes the provider error of
    /// `what`.
    async fn send(&self, req: RequestBuilder, what: &str) -> Result<Response, ProviderError> {
        let _call = self.calls.acquire().await;
        send_held(req, what).await
    }

    async fn json<T: serde::de::DeserializeOwned>(
        &self,
        req: RequestBuilder,
        what: &str,
    ) -> Result<T, ProviderError> {
        let resp = self.send(req, what).await?;
        http::read_json(resp, FLY_ERRORS)
            .await
            .map_err(|f| fail(what, f))
    }

    async fn get_machine(&self, handle: &str) -> Result<Option<FlyMachine>, ProviderError> {
        let what = "get machine";
        let req = self.machine_request(Method::GET, handle, "")?;
        let resp = self.send(req, what).await?;
        if resp.status() == StatusCode::NOT_FOUND {
            return Ok(None);
        }
        http::read_json(resp, FLY_ERRORS)
            .await
            .map(Some)
            .map_err(|f| fail(what, f))
    }

    /// The machines of every app matching `filters`, listed concurrently (one request per
    /// app). Any app's failure fails the whole listing: a partial one would undercount
    /// sessions (capacity) and the reserve, and hide debris from the reaper.
    async fn list(
        &self,
        filters: &[(&str, &str)],
        include_deleted: bool,
    ) -> Result<Vec<MachineStatus>, ProviderError> {
        let mut query: Vec<(String, &str)> = filters
            .iter()
            .map(|(k, v)| (format!("metadata.{k}"), *v))
            .collect();
        if include_deleted {
            query.push(("include_deleted".to_owned(), "true"));
        }
        let query = &query;
        let lists = self.apps.iter().map(|app| async move {
            let req = self.app_request(app, Method::GET, "/machines").query(query);
            let machines: Vec<FlyMachine> = self.json(req, "list machines").await?;
            Ok::<_, ProviderError>(
                machines
                    .into_iter()
                    .map(|m| self.status_of(app, m))
                    .collect::<Vec<_>>(),
            )
        });
        let lists = futures_util::future::try_join_all(lists).await?;
        Ok(lists.into_iter().flatten().collect())
    }

    /// The create request of a machine named `name` from `template`, with its whole `env`
    /// and `metadata`.
    fn create_body(
        &self,
        template: &MachineTemplate,
        name: &str,
        env: BTreeMap<&str, &str>,
        metadata: BTreeMap<String, String>,
    ) -> Result<Value, ProviderError> {
        let Workload::Image(image) = &template.workload else {
            return Err(ProviderError::rejected(
                NAME,
                format!("fly runs container images, not {:?}", template.workload),
            ));
        };
        let mut config = json!({
            "image": image,
            "env": env,
            "guest": {
                "cpus": template.guest.cpus,
                "memory_mb": template.guest.memory_mb,
                "cpu_kind": template.guest.cpu_kind,
            },
            "metadata": metadata,
            "auto_destroy": true,
            "restart": { "policy": "no" },
        });
        if let Some(cmd) = &template.cmd {
            config["init"] = json!({ "cmd": cmd });
        }
        let mut body = json!({ "name": name, "config": config });
        if let Some(region) = template.region.as_ref().or(self.default_region.as_ref()) {
            body["region"] = json!(region);
        }
        Ok(body)
    }

    /// Creates the machine named `name` in its app ([`FlyProvider::app_for`]); a taken name
    /// is a [`ProviderError::Conflict`]. The body is built once one of [`CALLS_AT_ONCE`] is
    /// free, so a burst of starts waiting for one holds no request bodies.
    async fn create(
        &self,
        name: &str,
        body: impl FnOnce() -> Result<Value, ProviderError>,
    ) -> Result<Launched, ProviderError> {
        let what = "create machine";
        let app = self.app_for(name);
        let _call = self.calls.acquire().await;
        let req = self
            .app_request(app, Method::POST, "/machines")
            .json(&body()?);
        let resp = send_held(req, what).await?;
        if resp.status() == StatusCode::CONFLICT {
            return Err(ProviderError::Conflict {
                provider: NAME,
                name: name.to_owned(),
            });
        }
        let machine: FlyMachine = http::read_json(resp, FLY_ERRORS)
            .await
            .map_err(|f| fail(what, f))?;
        Ok(self.launched(app, machine))
    }

    /// `POST` to a machine action (`/start`, `/suspend`, `/signal`), with a lease's nonce when
    /// the caller holds one.
    async fn act(
        &self,
        handle: &str,
        action: &str,
        body: Option<Value>,
        nonce: Option<&str>,
        what: &str,
    ) -> Result<Response, ProviderError> {
        let mut req = self.machine_request(Method::POST, handle, action)?;
        if let Some(body) = body {
            req = req.json(&body);
        }
        if let Some(nonce) = nonce {
            req = req.header(LEASE_NONCE, nonce);
        }
        let resp = self.send(req, what).await?;
        if nonce.is_none() && resp.status() == StatusCode::CONFLICT {
            return Err(leased_elsewhere(what));
        }
        http::expect_success(resp, FLY_ERRORS)
            .await
            .map_err(|f| fail(what, f))
    }

    /// Sets metadata keys in one call (`PATCH .../metadata`), under a lease when given.
    async fn patch_metadata(
        &self,
        handle: &str,
        labels: &BTreeMap<String, String>,
        nonce: Option<&str>,
    ) -> Result<(), ProviderError> {
        let what = "update machine metadata";
        let mut req = self
            .machine_request(Method::PATCH, handle, "/metadata")?
            .json(&json!({ "metadata": labels }));
        if let Some(nonce) = nonce {
            req = req.header(LEASE_NONCE, nonce);
        }
        let resp = self.send(req, what).await?;
        if nonce.is_none() && resp.status() == StatusCode::CONFLICT {
            return Err(leased_elsewhere(what));
        }
        http::expect_success(resp, FLY_ERRORS)
            .await
            .map(drop)
            .map_err(|f| fail(what, f))
    }

    /// Takes the machine's lease; `Conflict` when someone holds it.
    async fn lease(&self, handle: &str) -> Result<String, ProviderError> {
        let what = "acquire lease";
        let req = self
            .machine_request(Method::POST, handle, "/lease")?
            .json(&json!({ "ttl": CLAIM_LEASE_SECS, "description": "botdispatch claim" }));
        let resp = self.send(req, what).await?;
        if resp.status() == StatusCode::CONFLICT {
            return Err(ProviderError::Conflict {
                provider: NAME,
                name: handle.to_owned(),
            });
        }
        // The spec documents a flat `Lease`; Fly answers it wrapped in `{"status", "data"}`
        // (fly-go's `MachineLease`). Either is read.
        #[derive(Deserialize)]
        struct Lease {
            nonce: Option<String>,
            data: Option<LeaseData>,
        }
        #[derive(Deserialize)]
        struct LeaseData {
            nonce: Option<String>,
        }
        let lease: Lease = http::read_json(resp, FLY_ERRORS)
            .await
            .map_err(|f| fail(what, f))?;
        lease
            .data
            .and_then(|d| d.nonce)
            .or(lease.nonce)
            .filter(|n| !n.is_empty())
            .ok_or_else(|| ProviderError::Unavailable {
                provider: NAME,
                message: "acquire lease: the answer carries no nonce".into(),
                source: None,
            })
    }

    /// Releases a lease (its TTL would end it anyway).
    async fn release_lease(&self, handle: &str, nonce: &str) {
        let what = "release lease";
        let Ok(req) = self.machine_request(Method::DELETE, handle, "/lease") else {
            return;
        };
        let req = req.header(LEASE_NONCE, nonce);
        if let Err(e) = self.send(req, what).await {
            tracing::debug!(machine.id = handle, error = %e, "cannot release a lease; its TTL ends it");
        }
    }

    /// `/wait` for `started` until it is, or the deadline passes (Fly answers 408 after at
    /// most 60 s; the wait is asked again).
    async fn long_poll_started(
        &self,
        launched: &Launched,
        deadline: Deadline,
    ) -> Result<(), ProviderError> {
        let what = "wait for machine";
        loop {
            let remaining = deadline.remaining();
            if remaining.is_zero() {
                return Err(ProviderError::Timeout { provider: NAME });
            }
            // Whole seconds, at least one, never past our own deadline by more than a second.
            let secs = remaining.as_secs().clamp(1, MAX_WAIT_SECS);
            let mut query = vec![
                ("state", "started".to_owned()),
                ("timeout", secs.to_string()),
            ];
            if let Some(version) = &launched.version {
                query.push(("instance_id", version.clone()));
            }
            let req = self
                .machine_request(Method::GET, &launched.handle, "/wait")?
                .query(&query)
                .timeout(Duration::from_secs(secs) + self.request_timeout);
            // Not one of CALLS_AT_ONCE: the caller holds one of `open_waits`.
            let sent = send_held(req, what);
            let resp = match tokio::time::timeout_at(deadline.instant(), sent).await {
                Ok(resp) => resp?,
                Err(_) => return Err(ProviderError::Timeout { provider: NAME }),
            };
            let status = resp.status();
            if status.is_success() {
                return Ok(());
            }
            if status == StatusCode::REQUEST_TIMEOUT {
                continue;
            }
            let error = fail(
                what,
                CallFailure::Answer(http::ErrorAnswer::read(resp, FLY_ERRORS).await),
            );
            if status.is_server_error() || status == StatusCode::TOO_MANY_REQUESTS {
                return Err(error);
            }
            // 400/404/412: the machine will not become started. Read it to say why.
            return match self.status(&launched.handle).await {
                Ok(Some(s)) if s.state == MachineState::Started => Ok(()),
                _ => Err(self.why_not_started(&launched.handle, error).await),
            };
        }
    }

    /// One read of a waiting machine: `true` once it is started, `false` while it may still
    /// start (a failed read is tried again at the next poll, within the deadline); an error
    /// once it never will: gone, `failed`, or being destroyed (a cold machine whose bot exited
    /// is, by `auto_destroy`). `stopped` and `suspended` are read again: a machine just
    /// asked to start may still show the state it starts from.
    async fn read_started(&self, launched: &Launched) -> Result<bool, ProviderError> {
        let _permit = self.polls.acquire().await;
        let machine = match self.get_machine(&launched.handle).await {
            Ok(machine) => machine,
            Err(e) if e.is_transient() => {
                tracing::debug!(
                    handle = %launched.handle,
                    error = %e,
                    "read of a booting machine failed; reading again"
                );
                return Ok(false);
            }
            Err(e) => return Err(e),
        };
        let Some((machine, (app, _))) = machine.zip(self.locate(&launched.handle)) else {
            return Err(ProviderError::StartFailed {
                provider: NAME,
                message: "machine disappeared while starting".into(),
            });
        };
        let status = self.status_of(app, machine);
        match status.provider_state.as_str() {
            "started" => Ok(true),
            "failed" | "destroying" | "destroyed" => Err(ProviderError::StartFailed {
                provider: NAME,
                message: status
                    .detail
                    .unwrap_or_else(|| format!("machine is {}", status.provider_state)),
            }),
            _ => Ok(false),
        }
    }

    /// After a wait that Fly ended early (400/404/412): reads the machine to say why.
    async fn why_not_started(&self, handle: &str, wait_error: ProviderError) -> ProviderError {
        match self.status(handle).await {
            Ok(Some(status)) if status.state.is_terminal() => ProviderError::StartFailed {
                provider: NAME,
                message: status
                    .detail
                    .unwrap_or_else(|| format!("machine is {}", status.provider_state)),
            },
            Ok(None) => ProviderError::StartFailed {
                provider: NAME,
                message: "machine disappeared while starting".into(),
            },
            _ => wait_error,
        }
    }
}

/// A write refused because another caller holds the machine's lease: another replica
/// checking a machine it saw in an older listing of the reserve holds it for a moment, so the
/// call is worth repeating.
fn leased_elsewhere(what: &str) -> ProviderError {
    ProviderError::Unavailable {
        provider: NAME,
        message: format!("{what}: the machine is leased by another caller"),
        source: None,
    }
}

/// Sends a request for a caller that holds a permit for it (one of `calls` or `open_waits`);
/// any failure becomes the provider error of `what`.
async fn send_held(req: RequestBuilder, what: &str) -> Result<Response, ProviderError> {
    http::send(req).await.map_err(|f| fail(what, f))
}

/// The provider error of a failed call of `what`.
fn fail(what: &str, failure: CallFailure) -> ProviderError {
    ProviderError::from_call(NAME, what, failure)
}

#[async_trait]
impl MachineProvider for FlyProvider {
    fn name(&self) -> &'static str {
        NAME
    }

    /// Fly's documented limits: 1 req/s (burst 3) per action, scoped by app for create and list
    /// and by machine for the rest; reads of one machine 5 req/s (burst 10). Creates are keyed
    /// by their app ([`MachineProvider::launch_key`]), so each of `fly.apps` has its own
    /// bucket. A listing sends one request to every app and draws one token: each app sees
    /// at most the documented rate.
    fn rate_limits(&self) -> Vec<(Op, RateLimit)> {
        vec![
            (Op::Launch, RateLimit::keyed(1.0, 3)),
            (Op::List, RateLimit::app(1.0, 3)),
            (Op::Wait, RateLimit::machine(1.0, 3)),
            (Op::Terminate, RateLimit::machine(1.0, 3)),
            (Op::Status, RateLimit::machine(5.0, 10)),
            (Op::Label, RateLimit::machine(1.0, 3)),
            (Op::Start, RateLimit::machine(1.0, 3)),
            (Op::Suspend, RateLimit::machine(1.0, 3)),
            (Op::Signal, RateLimit::machine(1.0, 3)),
            (Op::Claim, RateLimit::machine(1.0, 3)),
        ]
    }

    async fn launch(
        &self,
        template: &MachineTemplate,
        session: &SessionBinding,
    ) -> Result<Launched, ProviderError> {
        self.create(&session.name, || {
            self.create_body(
                template,
                &session.name,
                session.machine_env(template),
                session.labels.to_map(),
            )
        })
        .await
    }

    /// The app the create of machine `name` goes to ([`FlyProvider::app_for`]).
    fn launch_key(&self, name: &str) -> String {
        self.app_for(name).to_owned()
    }

    /// `<app>/<machine id>` for one of the configured apps, or a plain machine id (the first
    /// app's).
    fn is_handle(&self, handle: &str) -> bool {
        self.locate(handle).is_some()
    }

    /// Waits with a `/wait` long-poll when one of `fly.max_open_waits` is free, else reads
    /// the machine every [`POLL_EVERY`] until it is started or a long-poll frees (the queue
    /// for them is first come, first served).
    async fn wait_started(
        &self,
        launched: &Launched,
        deadline: Deadline,
    ) -> Result<(), ProviderError> {
        let long_poll = self.open_waits.acquire();
        tokio::pin!(long_poll);
        let mut next_read = tokio::time::Instant::now() + POLL_EVERY;
        loop {
            tokio::select! {
                biased;
                permit = &mut long_poll => {
                    let _permit = permit.expect("the semaphore is never closed");
                    return self.long_poll_started(launched, deadline).await;
                }
                () = tokio::time::sleep_until(next_read.min(deadline.instant())) => {
                    if deadline.remaining().is_zero() {
                        return Err(ProviderError::Timeout { provider: NAME });
                    }
                    if self.read_started(launched).await? {
                        return Ok(());
                    }
                    next_read = tokio::time::Instant::now() + POLL_EVERY;
                }
            }
        }
    }

    async fn status(&self, handle: &str) -> Result<Option<MachineStatus>, ProviderError> {
        let machine = self.get_machine(handle).await?;
        Ok(machine
            .zip(self.locate(handle))
            .map(|(m, (app, _))| self.status_of(app, m)))
    }

    async fn terminate(&self, handle: &str) -> Result<(), ProviderError> {
        // Stop first so the bot gets its SIGTERM, then destroy whatever is left; with
        // auto_destroy the stop alone usually removes it and the delete answers 404.
        let what = "stop machine";
        let resp = self
            .send(
                self.machine_request(Method::POST, handle, "/stop")?
                    .json(&json!({})),
                what,
            )
            .await?;
        match resp.status() {
            StatusCode::NOT_FOUND => return Ok(()),
            s if s.is_success() => {}
            // A machine that cannot be stopped (already stopping, failed) is still destroyed below.
            s if s.is_client_error() && s != StatusCode::TOO_MANY_REQUESTS => {}
            _ => {
                return Err(fail(
                    what,
                    CallFailure::Answer(http::ErrorAnswer::read(resp, FLY_ERRORS).await),
                ))
            }
        }
        let what = "destroy machine";
        let resp = self
            .send(
                self.machine_request(Method::DELETE, handle, "")?
                    .query(&[("force", "true")]),
                what,
            )
            .await?;
        match resp.status() {
            StatusCode::NOT_FOUND => return Ok(()),
            StatusCode::CONFLICT => return Err(leased_elsewhere(what)),
            _ => {}
        }
        http::expect_success(resp, FLY_ERRORS)
            .await
            .map(drop)
            .map_err(|f| fail(what, f))
    }

    async fn find(&self, session_key: &str) -> Result<Option<MachineStatus>, ProviderError> {
        // Destroyed machines too: an idempotent retry must see that its session already ran.
        let machines = self
            .list(
                &[
                    (key::MANAGED_BY, MANAGED_BY),
                    (key::DEPLOYMENT, &self.deployment),
                    (key::SESSION, session_key),
                ],
                true,
            )
            .await?;
        // The filter is the server's; check again so a provider that ignores it cannot fool us.
        // A live machine wins over destroyed ones of the same session.
        let mut ours: Vec<MachineStatus> = machines
            .into_iter()
            .filter(|m| {
                m.labels
                    .as_ref()
                    .is_some_and(|l| l.session_key == session_key)
            })
            .collect();
        ours.sort_by_key(|m| m.state.is_terminal());
        Ok(ours.into_iter().next())
    }

    async fn list_managed(&self) -> Result<Vec<MachineStatus>, ProviderError> {
        self.list_deployment(|m| m.labels.is_some()).await
    }

    /// Reads every app (concurrently): each must exist and the token must reach it.
    async fn check(&self) -> Result<(), ProviderError> {
        let checks = self.apps.iter().map(|app| async move {
            let what = format!("get app {app}");
            let resp = self
                .send(self.app_request(app, Method::GET, ""), &what)
                .await?;
            http::expect_success(resp, FLY_ERRORS)
                .await
                .map(drop)
                .map_err(|f| fail(&what, f))
        });
        futures_util::future::try_join_all(checks).await.map(drop)
    }

    fn relabel(&self) -> Option<&dyn Relabel> {
        Some(self)
    }

    fn handoff(&self) -> Option<&dyn HttpHandoff> {
        Some(self)
    }

    fn reserve(&self) -> Option<&dyn Reserve> {
        Some(self)
    }
}

#[async_trait]
impl Relabel for FlyProvider {
    /// Metadata keys, set in one call without restarting the machine.
    async fn set_labels(
        &self,
        handle: &str,
        labels: &BTreeMap<String, String>,
    ) -> Result<(), ProviderError> {
        self.patch_metadata(handle, labels, None).await
    }
}

#[async_trait]
impl HttpHandoff for FlyProvider {
    fn bot_url(&self, machine: &Launched, port: u16) -> Result<url::Url, ProviderError> {
        let Some((app, id)) = self.locate(&machine.handle) else {
            return Err(ProviderError::rejected(
                NAME,
                format!("{:?} is not a machine of this app", machine.handle),
            ));
        };
        let region = machine
            .region
            .as_deref()
            .or(self.default_region.as_deref())
            .unwrap_or_default();
        let private_ip = machine.address.as_deref().unwrap_or_default();
        let url = expand_machine_url(&self.machine_url, id, app, region, private_ip, port);
        crate::config::expanded_url(NAME, "fly.machine_url", &url)
    }

    async fn end_after_session(
        &self,
        handle: &str,
        lease: Option<&str>,
    ) -> Result<(), ProviderError> {
        let body = json!({ "signal": "SIGTERM" });
        self.act(handle, "/signal", Some(body), lease, "signal machine")
            .await
            .map(drop)
    }
}

#[async_trait]
impl Reserve for FlyProvider {
    fn tiers(&self) -> &'static [Tier] {
        &[Tier::Hot, Tier::Suspended, Tier::Stopped]
    }

    /// Only a `stopped` machine can be started again; flyd leaves a machine that crashed or
    /// could not run `failed`.
    fn unrecyclable(&self, machine: &MachineStatus) -> bool {
        machine.provider_state == "failed"
    }

    async fn prepare(
        &self,
        template: &MachineTemplate,
        name: &str,
        labels: &ReserveLabels,
        env: &BTreeMap<String, String>,
    ) -> Result<Launched, ProviderError> {
        self.create(name, || {
            let mut body = self.create_body(
                template,
                name,
                template.env_with(env),
                labels.to_map(&self.deployment),
            )?;
            if labels.tier == Tier::Stopped {
                body["skip_launch"] = json!(true);
            }
            if labels.recycle {
                // Kept (stopped) when its bot exits, to be started again from its image; the
                // root filesystem is never persisted, so every start is as clean as a new
                // machine.
                body["config"]["auto_destroy"] = json!(false);
                body["config"]["rootfs"] = json!({ "persist": "never" });
            }
            Ok(body)
        })
        .await
    }

    /// One listing of the deployment's machines (Fly's filters cannot ask for "reserve or
    /// held"), kept to the reserve's.
    async fn list_reserve(&self) -> Result<Vec<MachineStatus>, ProviderError> {
        self.list_deployment(|m| m.reserve.is_some() || m.held.is_some())
            .await
    }

    /// Lease, check it is a held machine whose session is over (`stopped`), relabel it as an
    /// unclaimed reserve machine and start it (hot and suspended tiers) under the lease,
    /// release.
    async fn recycle(&self, handle: &str, labels: &ReserveLabels) -> Result<(), ProviderError> {
        let nonce = self.lease(handle).await?;
        let result = async {
            let spent = self
                .get_machine(handle)
                .await?
                .map(|m| m.into_status(&self.deployment));
            let over = spent
                .as_ref()
                .is_some_and(|m| m.held.is_some() && m.provider_state == "stopped");
            if !over {
                return Err(ProviderError::Conflict {
                    provider: NAME,
                    name: handle.to_owned(),
                });
            }
            let map = labels.recycled_map(&self.deployment);
            self.patch_metadata(handle, &map, Some(&nonce)).await?;
            if labels.tier != Tier::Stopped {
                self.act(handle, "/start", None, Some(&nonce), "start machine")
                    .await?;
            }
            Ok(())
        }
        .await;
        self.release_lease(handle, &nonce).await;
        result
    }

    async fn mark_ready(&self, handle: &str) -> Result<(), ProviderError> {
        let labels = BTreeMap::from([(key::READY.to_owned(), "1".to_owned())]);
        self.patch_metadata(handle, &labels, None).await
    }

    /// Suspends, then waits until the snapshot is taken (`suspended`): only then can a claim
    /// start it again.
    async fn suspend(&self, handle: &str) -> Result<(), ProviderError> {
        self.act(handle, "/suspend", None, None, "suspend machine")
            .await?;
        let what = "wait for suspended";
        let req = self
            .machine_request(Method::GET, handle, "/wait")?
            .query(&[("state", "suspended"), ("timeout", "30")])
            .timeout(Duration::from_secs(30) + self.request_timeout);
        let resp = self.send(req, what).await?;
        http::expect_success(resp, FLY_ERRORS)
            .await
            .map(drop)
            .map_err(|f| fail(what, f))
    }

    /// Lease, check it is still an unclaimed reserve machine, write the session's labels in
    /// one call under the lease; the lease stays held for the handoff. Another replica's claim
    /// holds the lease (409) or has already relabelled the machine: both are a `Conflict`.
    async fn claim(
        &self,
        handle: &str,
        session: &SessionLabels,
    ) -> Result<Option<String>, ProviderError> {
        let nonce = self.lease(handle).await?;
        let result = async {
            let still_reserve = self
                .status(handle)
                .await?
                .is_some_and(|m| m.reserve.is_some());
            if !still_reserve {
                return Err(ProviderError::Conflict {
                    provider: NAME,
                    name: handle.to_owned(),
                });
            }
            let mut labels = session.to_map();
            labels.insert(key::ROLE.to_owned(), ROLE_SESSION.to_owned());
            self.patch_metadata(handle, &labels, Some(&nonce)).await
        }
        .await;
        match result {
            Ok(()) => Ok(Some(nonce)),
            Err(e) => {
                self.release_lease(handle, &nonce).await;
                Err(e)
            }
        }
    }

    async fn release(
        &self,
        handle: &str,
        lease: &str,
        labels: &BTreeMap<String, String>,
    ) -> Result<(), ProviderError> {
        let written = match labels.is_empty() {
            true => Ok(()),
            false => self.patch_metadata(handle, labels, Some(lease)).await,
        };
        self.release_lease(handle, lease).await;
        written
    }

    /// Lease, check it is still an unclaimed reserve machine, destroy it under the lease
    /// (a destroyed machine's lease goes with it).
    async fn retire(&self, handle: &str) -> Result<(), ProviderError> {
        let nonce = match self.lease(handle).await {
            // Gone already.
            Err(ProviderError::Rejected { status: 404, .. }) => return Ok(()),
            other => other?,
        };
        let still_reserve = match self.status(handle).await {
            Ok(m) => m.is_some_and(|m| m.reserve.is_some()),
            Err(e) => {
                self.release_lease(handle, &nonce).await;
                return Err(e);
            }
        };
        if !still_reserve {
            self.release_lease(handle, &nonce).await;
            return Err(ProviderError::Conflict {
                provider: NAME,
                name: handle.to_owned(),
            });
        }
        let what = "destroy machine";
        let req = self
            .machine_request(Method::DELETE, handle, "")?
            .query(&[("force", "true")])
            .header(LEASE_NONCE, nonce.as_str());
        let resp = self.send(req, what).await?;
        if resp.status() == StatusCode::NOT_FOUND {
            return Ok(());
        }
        http::expect_success(resp, FLY_ERRORS)
            .await
            .map(drop)
            .map_err(|f| fail(what, f))
    }

    async fn start(&self, handle: &str, lease: Option<&str>) -> Result<Launched, ProviderError> {
        self.act(handle, "/start", None, lease, "start machine")
            .await?;
        let machine =
            self.get_machine(handle)
                .await?
                .ok_or_else(|| ProviderError::StartFailed {
                    provider: NAME,
                    message: "machine disappeared while starting".into(),
                })?;
        let app = self.locate(handle).map_or("", |(app, _)| app);
        Ok(self.launched(app, machine))
    }
}

/// The fields of a Fly `Machine` that botdispatch reads.
#[derive(Debug, Deserialize)]
struct FlyMachine {
    id: String,
    #[serde(default)]
    instance_id: Option<String>,
    #[serde(default)]
    region: Option<String>,
    #[serde(default)]
    private_ip: Option<String>,
    #[serde(default)]
    state: String,
    #[serde(default)]
    created_at: Option<String>,
    #[serde(default)]
    config: Option<FlyMachineConfig>,
    #[serde(default)]
    events: Vec<FlyEvent>,
}

#[derive(Debug, Deserialize)]
struct FlyMachineConfig {
    #[serde(default)]
    metadata: BTreeMap<String, String>,
}

#[derive(Debug, Deserialize)]
struct FlyEvent {
    #[serde(default, rename = "type")]
    kind: String,
    #[serde(default)]
    status: String,
    #[serde(default)]
    timestamp: Option<i64>,
    #[serde(default)]
    request: Option<Value>,
}

impl FlyEvent {
    fn at(&self) -> Option<DateTime<Utc>> {
        self.timestamp.and_then(DateTime::from_timestamp_millis)
    }

    fn exit_code(&self) -> Option<i64> {
        let req = self.request.as_ref()?;
        req.pointer("/exit_event/exit_code")
            .or_else(|| req.get("exit_code"))
            .and_then(Value::as_i64)
    }
}

impl FlyMachine {
    /// The machine as botdispatch reports it; labels only when it is `deployment`'s.
    fn into_status(self, deployment: &str) -> MachineStatus {
        // Fly lists events newest first; sort so "first started" and "last ended" are clear.
        let mut events = self.events;
        events.sort_by_key(|e| e.timestamp.unwrap_or_default());
        let started_at = events
            .iter()
            .find(|e| e.status == "started")
            .and_then(FlyEvent::at);
        let exit = events.iter().rev().find(|e| e.kind == "exit");
        let exit_code = exit.and_then(FlyEvent::exit_code);
        let state = match self.state.as_str() {
            "created" | "starting" | "replacing" | "updating" => MachineState::Starting,
            "started" => MachineState::Started,
            "failed" => MachineState::Failed,
            // Stopped, suspended, destroying, destroyed: over. It never ran if it never started.
            _ if started_at.is_none() => MachineState::Failed,
            _ => MachineState::Ended,
        };
        let ended_at = if state.is_terminal() {
            events
                .iter()
                .rev()
                .find(|e| {
                    matches!(e.status.as_str(), "stopped" | "destroyed" | "failed")
                        || e.kind == "exit"
                })
                .and_then(FlyEvent::at)
        } else {
            None
        };
        let detail = match (state, exit_code) {
            (MachineState::Failed, _) if started_at.is_none() => {
                Some(format!("machine is {} and never started", self.state))
            }
            (s, Some(code)) if s.is_terminal() => Some(format!("bot exited with code {code}")),
            _ => None,
        };
        let metadata = self.config.as_ref().map(|c| &c.metadata);
        let labels = metadata.and_then(|m| SessionLabels::from_map_of(m, deployment));
        let reserve = metadata.and_then(|m| ReserveLabels::from_map_of(m, deployment));
        MachineStatus {
            handle: self.id,
            state,
            provider_state: self.state,
            region: self.region,
            created_at: self
                .created_at
                .as_deref()
                .and_then(|s| DateTime::parse_from_rfc3339(s).ok())
                .map(|d| d.with_timezone(&Utc)),
            started_at,
            ended_at,
            labels,
            reserve,
            address: self.private_ip,
            detail,
            failure: metadata.and_then(crate::labels::failure_of),
            held: metadata.and_then(|m| ReserveLabels::held_of(m, deployment)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn machine(state: &str, events: Value) -> FlyMachine {
        serde_json::from_value(json!({
            "id": "148ed193b95089",
            "instance_id": "01H8XYZ",
            "region": "iad",
            "state": state,
            "created_at": "2026-11-22T10:00:00Z",
            "config": {"metadata": {"managed_by": "botdispatch", "botdispatch_session": "k",
                "botdispatch_owner": "alice", "botdispatch_room": "bd-k", "botdispatch_deadline": "1800000000"}},
            "events": events,
        }))
        .unwrap()
    }

    #[test]
    fn maps_fly_states_and_events() {
        let s = machine("starting", json!([])).into_status("default");
        assert_eq!(s.state, MachineState::Starting);
        assert_eq!(s.labels.unwrap().owner, "alice");

        let events = json!([
            {"type": "exit", "status": "stopped", "timestamp": 1_700_000_009_000_i64,
             "request": {"exit_event": {"exit_code": 0}}},
            {"type": "start", "status": "started", "timestamp": 1_700_000_002_000_i64},
            {"type": "launch", "status": "created", "timestamp": 1_700_000_000_000_i64}
        ]);
        let s = machine("destroyed", events).into_status("default");
        assert_eq!(s.state, MachineState::Ended);
        assert_eq!(s.started_at.unwrap().timestamp(), 1_700_000_002);
        assert_eq!(s.ended_at.unwrap().timestamp(), 1_700_000_009);
        assert_eq!(s.detail.as_deref(), Some("bot exited with code 0"));

        let s = machine("destroyed", json!([])).into_status("default");
        assert_eq!(s.state, MachineState::Failed);
    }

    #[test]
    fn max_open_waits_is_read_from_the_env_and_must_be_positive() {
        let with = |value: &str| {
            let value = value.to_owned();
            let lookup = move |k: &str| match k {
                "FLY_API_TOKEN" => Some("t".to_owned()),
                "BOTDISPATCH_FLY_APP" => Some("bots".to_owned()),
                "BOTDISPATCH_FLY_MAX_OPEN_WAITS" => Some(value.clone()),
                _ => None,
            };
            let mut config = FlyConfig::default();
            config.apply_env(&Env::new(&lookup))?;
            config.validate(true).map(|()| config.max_open_waits)
        };
        assert_eq!(FlyConfig::default().max_open_waits, DEFAULT_MAX_OPEN_WAITS);
        assert_eq!(with("16").unwrap(), 16);
        let zero = with("0").unwrap_err().0;
        assert!(zero.contains("fly.max_open_waits"), "{zero}");
        let word = with("many").unwrap_err().0;
        assert!(word.contains("BOTDISPATCH_FLY_MAX_OPEN_WAITS"), "{word}");
    }
}
