//! The application object shared by every handler: configuration, authenticator, the session
//! flow with its provider and rooms, the tracker of in-flight starts, and the readiness cache.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use hmac::{Hmac, Mac};
use rand::RngCore;
use sha2::Sha256;
use tokio::sync::Mutex;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::auth::Authenticator;
use crate::capacity::Capacity;
use crate::config::{Config, ProviderKind, RoomsKind};
use crate::reaper::Reaper;
use crate::rooms::daily::DailyRooms;
use crate::rooms::local::LocalRooms;
use crate::rooms::resilient::ResilientRooms;
use crate::rooms::RoomService;
use crate::session_id::SessionIds;
use crate::sessions::{SessionSettings, Sessions};
use providers::fly::{FlyConfig, FlyProvider};
use providers::local::{LocalConfig, LocalProvider};
use providers::resilient::{ResilienceStats, Resilient, RetryPolicy};
use providers::MachineProvider;

/// How long a readiness answer is reused, so probes never hammer the providers.
const READY_TTL: Duration = Duration::from_secs(10);

pub struct App {
    pub config: Config,
    pub auth: Authenticator,
    pub sessions: Sessions,
    pub capacity: Capacity,
    pub reaper: Arc<Reaper>,
    /// Every start runs as a tracked task, so shutdown can let it finish (or clean up).
    pub tasks: TaskTracker,
    /// Cancelled when the shutdown grace period is over: in-flight starts clean up and answer
    /// 503, background loops stop.
    pub shutdown: CancellationToken,
    pub provider_stats: Arc<ResilienceStats>,
    pub metrics: metrics_exporter_prometheus::PrometheusHandle,
    ready: Mutex<Option<(Instant, Result<(), String>)>>,
}

/// Handler state: one `App` behind an `Arc`.
#[derive(Clone)]
pub struct AppState(pub Arc<App>);

impl std::ops::Deref for AppState {
    type Target = App;
    fn deref(&self) -> &App {
        &self.0
    }
}

/// The one HTTP client every outbound call shares (pooling, TLS).
pub fn http_client() -> anyhow::Result<reqwest::Client> {
    reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(5))
        .pool_idle_timeout(Duration::from_secs(60))
        .user_agent(concat!("botdispatch/", env!("CARGO_PKG_VERSION")))
        .build()
        .context("cannot build the HTTP client")
}

impl App {
    /// Builds everything from a validated config, with the network I/O start-up needs (Daily's
    /// domain). `config` must have its secrets filled ([`Config::fill_dev_secrets`]).
    pub async fn build(config: Config, http: reqwest::Client) -> anyhow::Result<Self> {
        let auth = Authenticator::new(&config.auth, config.auth.jwt_secret.as_ref())?;
        let policy = RetryPolicy {
            call_budget: config.request_timeout() * 2,
            ..RetryPolicy::default()
        };
        let resilient = Resilient::new(
            build_provider(&config, http.clone()).await?,
            policy.clone(),
            config.outbound_rate_scale,
        )
        .with_observer(Arc::new(crate::metrics::ProviderMetrics));
        let provider_stats = Arc::clone(&resilient.stats);
        let provider: Arc<dyn MachineProvider> = Arc::new(resilient);
        let rooms: Arc<dyn RoomService> = Arc::new(ResilientRooms::new(
            build_rooms(&config, http).await?,
            policy,
            config.outbound_rate_scale,
        ));
        let ids = SessionIds::new(&session_key(&config), provider.name());
        let tasks = TaskTracker::new();
        let shutdown = CancellationToken::new();
        let sessions = Sessions::new(
            Arc::clone(&provider),
            Arc::clone(&rooms),
            ids,
            SessionSettings::from(&config),
            tasks.clone(),
            shutdown.clone(),
        );
        let capacity = Capacity::new(&config, Arc::clone(&provider));
        let reaper = Arc::new(Reaper::new(
            provider,
            rooms,
            config.start_timeout(),
            Duration::from_secs(config.reaper_grace_secs),
        ));
        Ok(Self {
            config,
            auth,
            sessions,
            capacity,
            reaper,
            tasks,
            shutdown,
            provider_stats,
            metrics: crate::metrics::install(),
            ready: Mutex::new(None),
        })
    }

    /// Starts the background loops (the reaper) on the tracker; they stop with `shutdown`.
    pub fn spawn_background(&self) {
        if self.config.reaper_interval_secs > 0 {
            let interval = Duration::from_secs(self.config.reaper_interval_secs);
            self.tasks
                .spawn(Arc::clone(&self.reaper).run(interval, self.shutdown.clone()));
        }
    }

    /// Readiness: provider and rooms reachable with our credentials. Cached for [`READY_TTL`];
    /// concurrent probes share one check.
    pub async fn readiness(&self) -> Result<(), String> {
        let mut cached = self.ready.lock().await;
        if let Some((at, result)) = cached.as_ref() {
            if at.elapsed() < READY_TTL {
                return result.clone();
            }
        }
        let (provider, rooms) = tokio::join!(
            self.sessions.provider().check(),
            self.sessions.rooms().check()
        );
        let result = match (provider, rooms) {
            (Ok(()), Ok(())) => Ok(()),
            (Err(e), _) => Err(e.to_string()),
            (_, Err(e)) => Err(e.to_string()),
        };
        *cached = Some((Instant::now(), result.clone()));
        result
    }
}

pub(crate) async fn build_provider(
    config: &Config,
    http: reqwest::Client,
) -> anyhow::Result<Arc<dyn MachineProvider>> {
    Ok(match config.provider {
        ProviderKind::Local => Arc::new(LocalProvider::new(LocalConfig {
            stop_grace: Duration::from_secs(config.local.stop_grace_secs),
        })),
        ProviderKind::Fly => Arc::new(FlyProvider::new(
            http,
            FlyConfig {
                api_url: config.fly.api_url.clone(),
                api_token: config.fly.api_token.clone().unwrap_or_default(),
                app_name: config.fly.app_name.clone().unwrap_or_default(),
                default_region: config.fly.default_region.clone(),
                request_timeout: config.request_timeout(),
            },
        )?),
        #[cfg(feature = "fargate")]
        ProviderKind::Fargate => {
            let f = &config.fargate;
            Arc::new(
                providers::fargate::FargateProvider::new(providers::fargate::FargateConfig {
                    cluster: f.cluster.clone().unwrap_or_default(),
                    task_definition: f.task_definition.clone().unwrap_or_default(),
                    container_name: f.container_name.clone(),
                    subnets: f.subnets.clone(),
                    security_groups: f.security_groups.clone(),
                    assign_public_ip: f.assign_public_ip,
                    spot: f.spot,
                    region: f.region.clone(),
                    endpoint_url: f.endpoint_url.clone(),
                    request_timeout: config.request_timeout(),
                })
                .await?,
            )
        }
        #[cfg(feature = "cloudrun")]
        ProviderKind::Cloudrun => {
            use providers::cloudrun::{CloudRunAuth, CloudRunConfig, CloudRunProvider};
            let c = &config.cloudrun;
            let auth = match &c.service_account_key_file {
                Some(path) => CloudRunAuth::ServiceAccountKey {
                    key_json: providers::Secret::new(std::fs::read_to_string(path).with_context(
                        || format!("cannot read the service-account key {}", path.display()),
                    )?),
                    token_uri_override: c.token_uri.clone(),
                },
                None => CloudRunAuth::MetadataServer {
                    host: c.metadata_host.clone(),
                },
            };
            Arc::new(CloudRunProvider::new(
                http,
                CloudRunConfig {
                    api_url: c.api_url.clone(),
                    project: c.project.clone().unwrap_or_default(),
                    region: c.region.clone().unwrap_or_default(),
                    job: c.job.clone().unwrap_or_default(),
                    auth,
                    request_timeout: config.request_timeout(),
                },
            )?)
        }
        #[allow(unreachable_patterns)]
        other => anyhow::bail!("this build has no `{other}` provider (cargo feature `{other}`)"),
    })
}

pub(crate) async fn build_rooms(
    config: &Config,
    http: reqwest::Client,
) -> anyhow::Result<Arc<dyn RoomService>> {
    Ok(match config.rooms_kind() {
        RoomsKind::Local => Arc::new(LocalRooms::default()),
        RoomsKind::Daily => {
            let domain = config
                .daily
                .domain_id
                .clone()
                .zip(config.daily.domain_name.clone());
            let rooms = DailyRooms::connect(
                http,
                &config.daily.api_url,
                config.daily.api_key.clone().unwrap_or_default(),
                domain,
                config.request_timeout(),
            )
            .await
            .context("cannot read the Daily domain (check DAILY_API_KEY and DAILY_API_URL)")?;
            Arc::new(rooms)
        }
    })
}

/// The key that signs session ids: configured, else derived from the shared JWT secret (so
/// replicas sharing it agree), else random (single-replica development only).
fn session_key(config: &Config) -> Vec<u8> {
    if let Some(secret) = &config.session_secret {
        return secret.expose().as_bytes().to_vec();
    }
    if let Some(secret) = config.auth.jwt_secret.as_ref().filter(|s| !s.is_empty()) {
        let mut mac = Hmac::<Sha256>::new_from_slice(secret.expose().as_bytes())
            .expect("HMAC takes keys of any length");
        mac.update(b"botdispatch session ids v1");
        return mac.finalize().into_bytes().to_vec();
    }
    let mut key = vec![0u8; 32];
    rand::rng().fill_bytes(&mut key);
    tracing::warn!("no session_secret configured: session ids are valid on this replica only");
    key
}
