//! The application object shared by every handler: configuration, authenticator, the session
//! flow with its provider and rooms, the reaper, the tracker of in-flight work, and the
//! readiness cache.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use providers::resilient::Resilient;
use providers::retry::RetryPolicy;
use providers::{BuildContext, MachineProvider};
use rand::RngCore;
use tokio::sync::Mutex;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::auth::Authenticator;
use crate::config::{Config, RoomsKind};
use crate::handoff::{Handoff, HandoffClient, HandoffSecrets};
use crate::reaper::Reaper;
use crate::rooms::daily::DailyRooms;
use crate::rooms::local::LocalRooms;
use crate::rooms::resilient::ResilientRooms;
use crate::rooms::RoomService;
use crate::session_id::SessionIds;
use crate::sessions::{Parts, Sessions};

/// How long a readiness answer is reused, so probes never hammer the providers.
const READY_TTL: Duration = Duration::from_secs(10);

pub struct App {
    pub config: Config,
    pub auth: Authenticator,
    pub sessions: Arc<Sessions>,
    pub reaper: Arc<Reaper>,
    /// Every start and background loop runs as a tracked task, so shutdown can let it finish
    /// (or clean up).
    pub tasks: TaskTracker,
    /// Cancelled when the shutdown grace period is over: in-flight starts clean up and answer
    /// 503, background loops stop.
    pub shutdown: CancellationToken,
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
    providers::http::client_builder()
        .user_agent(concat!("botdispatch/", env!("CARGO_PKG_VERSION")))
        .build()
        .context("cannot build the HTTP client")
}

/// What building the provider needs from the configuration.
pub fn build_context(config: &Config, http: reqwest::Client) -> BuildContext {
    BuildContext {
        http,
        request_timeout: config.request_timeout(),
        production: config.is_production(),
        deployment: config.deployment.clone(),
    }
}

impl App {
    /// Builds everything from a validated config, with the I/O start-up needs (credentials,
    /// Daily's domain). `config` must have its secrets filled ([`Config::fill_dev_secrets`]).
    pub async fn build(config: Config, http: reqwest::Client) -> anyhow::Result<Self> {
        let provider = config
            .provider
            .settings()
            .build(&build_context(&config, http.clone()))
            .await?;
        let rooms = build_rooms(&config, http).await?;
        Self::with_parts(config, provider, rooms)
    }

    /// Builds around a given provider and rooms backend (tests inject in-memory ones); wraps
    /// both with retries and their documented rate limits.
    pub fn with_parts(
        config: Config,
        provider: Arc<dyn MachineProvider>,
        rooms: Arc<dyn RoomService>,
    ) -> anyhow::Result<Self> {
        let auth = Authenticator::new(&config.auth, config.auth.jwt_secret.as_ref())?;
        let policy = RetryPolicy {
            call_budget: config.request_timeout() * 2,
            ..RetryPolicy::default()
        };
        let provider: Arc<dyn MachineProvider> = Arc::new(
            Resilient::new(provider, policy.clone(), config.outbound_rate_scale)
                .with_observer(Arc::new(crate::metrics::ProviderMetrics)),
        );
        let rooms: Arc<dyn RoomService> = Arc::new(ResilientRooms::new(
            rooms,
            policy,
            config.outbound_rate_scale,
        ));
        let keys = session_keys(&config);
        let ids = SessionIds::new(keys.clone(), provider.name(), &config.deployment);
        let tasks = TaskTracker::new();
        let shutdown = CancellationToken::new();
        let handoff = Handoff {
            client: HandoffClient::new(http_client()?),
            secrets: Arc::new(HandoffSecrets::new(&keys[0])),
        };
        let parts = Parts {
            provider: Arc::clone(&provider),
            rooms: Arc::clone(&rooms),
            ids,
            handoff,
        };
        let sessions = Arc::new(Sessions::new(
            &config,
            parts,
            tasks.clone(),
            shutdown.clone(),
        )?);
        let reaper = Arc::new(
            Reaper::new(
                provider,
                rooms,
                config.start_timeout(),
                Duration::from_secs(config.reaper_grace_secs),
            )
            .with_reserves(sessions.reserves().cloned(), config.max_session()),
        );
        Ok(Self {
            config,
            auth,
            sessions,
            reaper,
            tasks,
            shutdown,
            metrics: crate::metrics::install(),
            ready: Mutex::new(None),
        })
    }

    /// Starts the background loops (the reaper, the reserves' replenishment) on the tracker;
    /// they stop with `shutdown`.
    pub fn spawn_background(&self) {
        if let Some(reserves) = self
            .sessions
            .reserves()
            .filter(|_| self.config.reserve_interval_ms > 0)
        {
            let interval = Duration::from_millis(self.config.reserve_interval_ms);
            self.tasks
                .spawn(Arc::clone(reserves).run(interval, self.shutdown.clone()));
        }
        if self.config.reaper_interval_secs > 0 {
            let interval = Duration::from_secs(self.config.reaper_interval_secs);
            self.tasks
                .spawn(Arc::clone(&self.reaper).run(interval, self.shutdown.clone()));
        }
    }

    /// Readiness: provider and rooms reachable with our credentials. Cached for [`READY_TTL`];
    /// concurrent probes share one check. The error names the failing component only (the
    /// endpoint is public); what the provider or Daily said is logged once per check.
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
        let provider_name = self.sessions.provider().name();
        let rooms_kind = self.sessions.rooms().kind();
        let result = match (provider, rooms) {
            (Ok(()), Ok(())) => Ok(()),
            (Err(e), _) => {
                tracing::warn!(error = %e, "not ready: the machine provider check failed");
                Err(format!(
                    "the machine provider ({provider_name}) is not ready"
                ))
            }
            (_, Err(e)) => {
                tracing::warn!(error = %e, "not ready: the rooms check failed");
                Err(format!("the rooms backend ({rooms_kind}) is not ready"))
            }
        };
        *cached = Some((Instant::now(), result.clone()));
        result
    }
}

/// The configured rooms backend (reads Daily's domain once unless configured).
pub(crate) async fn build_rooms(
    config: &Config,
    http: reqwest::Client,
) -> anyhow::Result<Arc<dyn RoomService>> {
    Ok(match config.rooms_kind() {
        RoomsKind::Local => Arc::new(LocalRooms::new(&config.deployment)),
        RoomsKind::Daily => {
            let rooms = DailyRooms::connect(
                http,
                &config.daily,
                &config.deployment,
                config.request_timeout(),
            )
            .await
            .context("cannot read the Daily domain (check DAILY_API_KEY and DAILY_API_URL)")?;
            Arc::new(rooms)
        }
    })
}

/// The keys that sign and verify session ids: the configured ones, else (development only:
/// production requires them) a random key, valid on this replica only. Never derived from the
/// JWT secret: whoever can mint tokens must not be able to sign session ids.
fn session_keys(config: &Config) -> Vec<Vec<u8>> {
    if !config.session_secret.is_empty() {
        return config
            .session_secret
            .iter()
            .map(|s| s.expose().as_bytes().to_vec())
            .collect();
    }
    let mut key = vec![0u8; 32];
    rand::rng().fill_bytes(&mut key);
    tracing::warn!("no session_secret configured: session ids are valid on this replica only");
    vec![key]
}
