//! Start-latency benchmark against the local fakes: prints figures, asserts nothing.
//!
//! `cargo run --release --features providers/testkit --example bench -- [sessions] [concurrency]
//! [flags]` (the example needs the `providers/testkit` feature).
//!
//! 1. Dispatcher overhead: the fakes answer at once (no boot delay, no room latency), so the
//!    latency of `POST /start` is botdispatch's own work plus loopback HTTP to the fakes.
//!    `sessions` starts (default 500), `concurrency` at a time (default 8).
//! 2. Concurrency of the critical path: with boot delay B and room latency R, a start should
//!    take about max(R, create + B), not R + B.
//! 3. Resident memory of the process after parts 1 and 2.
//! 4. Warm starts (DESIGN §10): for each mode, `--samples` starts against the Fly and Daily
//!    fakes with realistic latencies, and per mode the p50/p95/p99 of the client's start
//!    latency (`POST /start`, `wait: true`, until the answer) and of the time until the bot can
//!    talk: for the `http` handoff, from the request until the fake's bot server recorded the
//!    `/bot` delivery; for the `env` handoff, the start latency plus the app boot (the bot
//!    boots its app only once its machine started). The modes:
//!    - `cold-env`: the default `env` handoff, no reserve;
//!    - `cold-http`: `BOTDISPATCH_HANDOFF=http`, no reserve;
//!    - `stopped`, `suspended`, `hot`: `http` handoff and a reserve of that tier
//!      (`BOTDISPATCH_RESERVE_TIER`, `BOTDISPATCH_RESERVE_SIZE`), replenished every 100 ms.
//!
//!    Starts run in rounds of `--parallel`. In a warm mode, before each round the bench waits
//!    until the fake shows at least that many ready reserve machines (metadata
//!    `botdispatch_role=reserve` and `botdispatch_ready=1`, or for the stopped tier `stopped`)
//!    and the dispatcher's room pool has as many rooms, then 300 ms more so the dispatcher's
//!    listing of the reserve has caught up: every sample measures a warm start (the table
//!    counts those that were not). Sessions are deleted after each round. The dispatcher's
//!    overhead is the time until the bot can talk minus the configured delays on the
//!    critical path. Last, the process's peak resident set (`VmHWM`).
//!
//! Flags (each also read from the environment variable named after it):
//!
//! | flag | env | default | |
//! |---|---|---|---|
//! | `--create-ms` | `BENCH_CREATE_MS` | 250 | Fly create call latency |
//! | `--boot-ms` | `BENCH_BOOT_MS` | 1500 | created machine until `started` |
//! | `--start-ms` | `BENCH_START_MS` | 300 | start of a stopped machine |
//! | `--resume-ms` | `BENCH_RESUME_MS` | 150 | resume of a suspended machine |
//! | `--app-boot-ms` | `BENCH_APP_BOOT_MS` | 2000 | fresh boot `started` until `/readyz` 200 |
//! | `--room-ms` | `BENCH_ROOM_MS` | 150 | Daily room creation |
//! | `--samples` | `BENCH_SAMPLES` | 20 | starts per mode |
//! | `--parallel` | `BENCH_PARALLEL` | 4 | starts per round |
//! | `--reserve` | `BENCH_RESERVE` | 8 | reserve size of the warm modes |
//! | `--modes` | `BENCH_MODES` | all five | comma list of the modes to run |
//! | `--warm-only` | `BENCH_WARM_ONLY` | off | skip parts 1 to 3 |
//!
//! The Fly fake's boot timer runs from the moment a create request arrives, while the create
//! call answers after its own latency; the bench sets the fake's boot delay to create + boot
//! so that a cold machine is `started` create + boot after the request, as on Fly where the
//! machine boots once the create call returned.
//!
//! With the defaults the whole run takes about a minute and a half.
//!
//! 5. Open loop (`--open-loop all`, or a comma list of `cold`, `cold-4`, `cold-8`,
//!    `stopped`, `suspended`, `hot`): `--rate` arrivals a second (20) for `--duration-secs`
//!    (60; `--quick`: 5), each `POST /start` with `wait: true` sent on schedule whatever the
//!    earlier ones are doing; every session ends by itself after `--session-secs` (30). Fly's
//!    and Daily's documented rate limits (`rate-limits.json` of the shared specs) are enforced
//!    by a proxy in front of each fake, which answers 429 past them (the fakes themselves have
//!    no limits). Cases: cold starts (`env` handoff) in 1, 4 and 8 Fly apps
//!    (`BOTDISPATCH_FLY_APPS`); `http` handoff from a recycled reserve of each tier
//!    (`BOTDISPATCH_RESERVE_RECYCLE=true`) over `--reserve-apps` apps (4), sized by
//!    [`reserve_size`] unless `--reserve-size` is given; the bench waits for the reserve's
//!    first fill before the arrivals. Per case: sustained starts/s, start and talk latency,
//!    client errors, the calls the fakes' limits refused, reserve machine-seconds idle (ready
//!    and unclaimed, sampled every 0.5 s), how long recycling took, the dispatcher's peak RSS.
//! 6. Memory (`--in-flight 1000`): that many cold starts sent at once, each in flight for
//!    `--in-flight-boot-ms` (12 s) while its machine boots, rate limits off; the dispatcher's
//!    resident set idle and at its peak.
//!
//! Parts 5 and 6 run the dispatcher as a child process, the release binary
//! (`target/release/botdispatch`, or `--dispatcher-bin`) configured by its environment
//! (`--dispatcher-env KEY=VALUE` adds to it), so the resident set is the dispatcher's alone:
//! the fakes, the proxies and the clients stay in this process. Build the binary first:
//! `cargo build --release && cargo run --release --features providers/testkit --example
//! bench -- --open-loop all --in-flight 1000`. With either flag, parts 1 to 4 do not run.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine;
use botdispatch::config::Config;
use botdispatch::server::{serve, ServerLimits};
use botdispatch::{app, build_router, App, AppState};
use chrono::Utc;
use clap::Parser;
use futures_util::future::join_all;
use providers::testkit::daily_fake::{FakeDaily, FakeDailyConfig};
use providers::testkit::fly_fake::{FakeFly, FakeFlyConfig, FakeFlyWarmConfig};
use serde_json::{json, Value};

const SECRET: &str = "bench-secret-0123456789abcdef0123456789";
const SESSION_SECRET: &str = "bench-session-secret-0123456789abcdef012";
/// After the fake shows the reserve ready: time for the dispatcher's next listing.
const LISTING_SLACK: Duration = Duration::from_millis(300);

#[derive(Parser, Debug)]
#[command(about = "Start-latency benchmark against the local fakes")]
struct Args {
    /// Starts of the overhead run.
    #[arg(default_value_t = 500)]
    sessions: usize,
    /// Concurrency of the overhead run.
    #[arg(default_value_t = 8)]
    concurrency: usize,
    /// Fly create call latency (ms).
    #[arg(long, env = "BENCH_CREATE_MS", default_value_t = 250)]
    create_ms: u64,
    /// Time from a machine's creation until it is `started` (ms).
    #[arg(long, env = "BENCH_BOOT_MS", default_value_t = 1500)]
    boot_ms: u64,
    /// Start of a stopped machine until `started` (ms).
    #[arg(long, env = "BENCH_START_MS", default_value_t = 300)]
    start_ms: u64,
    /// Resume of a suspended machine until `started` (ms).
    #[arg(long, env = "BENCH_RESUME_MS", default_value_t = 150)]
    resume_ms: u64,
    /// Fresh boot: `started` until the bot answers `/readyz` 200 (ms).
    #[arg(long, env = "BENCH_APP_BOOT_MS", default_value_t = 2000)]
    app_boot_ms: u64,
    /// Daily room creation latency (ms).
    #[arg(long, env = "BENCH_ROOM_MS", default_value_t = 150)]
    room_ms: u64,
    /// Warm-start samples per mode.
    #[arg(long, env = "BENCH_SAMPLES", default_value_t = 20)]
    samples: usize,
    /// Warm-start benchmark: starts per round.
    #[arg(long, env = "BENCH_PARALLEL", default_value_t = 4)]
    parallel: usize,
    /// Reserve size of the warm modes.
    #[arg(long, env = "BENCH_RESERVE", default_value_t = 8)]
    reserve: usize,
    /// Modes to run (comma list of cold-env, cold-http, stopped, suspended, hot).
    #[arg(
        long,
        env = "BENCH_MODES",
        value_delimiter = ',',
        default_value = "cold-env,cold-http,stopped,suspended,hot"
    )]
    modes: Vec<Mode>,
    /// Only the warm-start benchmark.
    #[arg(long, env = "BENCH_WARM_ONLY")]
    warm_only: bool,
    /// Open-loop cases to run (comma list of cold, cold-4, cold-8, stopped, suspended, hot;
    /// `all` for every one). When given, only the open-loop (and in-flight) parts run.
    #[arg(long, env = "BENCH_OPEN_LOOP", value_delimiter = ',')]
    open_loop: Vec<CaseArg>,
    /// Open loop: arrivals per second.
    #[arg(long, env = "BENCH_RATE", default_value_t = 20.0)]
    rate: f64,
    /// Open loop: seconds of arrivals (`--quick`: 5).
    #[arg(long, env = "BENCH_DURATION_SECS", default_value_t = 60)]
    duration_secs: u64,
    /// Open loop: a session ends by itself this long after it began.
    #[arg(long, env = "BENCH_SESSION_SECS", default_value_t = 30)]
    session_secs: u64,
    /// Open loop: 5 s of arrivals instead of `--duration-secs` (a smoke run).
    #[arg(long, env = "BENCH_QUICK")]
    quick: bool,
    /// Open loop, recycle cases: reserve size (default: see `reserve_size`).
    #[arg(long, env = "BENCH_RESERVE_SIZE")]
    reserve_size: Option<u32>,
    /// Open loop, recycle cases: the time a machine takes from the end of its session until
    /// it can be claimed again, used to size the reserve (seconds).
    #[arg(long, env = "BENCH_RECYCLE_SECS", default_value_t = 6.0)]
    recycle_secs: f64,
    /// Open loop, recycle cases: Fly apps the reserve is spread over (its first fill is
    /// limited to one create per second per app).
    #[arg(long, env = "BENCH_RESERVE_APPS", default_value_t = 4)]
    reserve_apps: usize,
    /// Open loop: milliseconds between the dispatcher's reserve passes
    /// (`BOTDISPATCH_RESERVE_INTERVAL_MS`; its default is 1000).
    #[arg(long, env = "BENCH_RESERVE_INTERVAL_MS", default_value_t = 1000)]
    reserve_interval_ms: u64,
    /// Memory: this many cold starts at once, each held in flight for `--in-flight-boot-ms`
    /// (e.g. 1000); the dispatcher's peak resident set is printed.
    #[arg(long, env = "BENCH_IN_FLIGHT")]
    in_flight: Option<usize>,
    /// Memory: a created machine's boot time in the in-flight run (ms).
    #[arg(long, env = "BENCH_IN_FLIGHT_BOOT_MS", default_value_t = 12_000)]
    in_flight_boot_ms: u64,
    /// Memory: real duration of one second of the Fly fake's `wait` timeout (ms). Fly's is
    /// 1000; a small value makes every wait answer at once and the dispatcher wait again, as
    /// a dispatcher that polls instead of holding a connection per waiting start would.
    #[arg(long, env = "BENCH_IN_FLIGHT_WAIT_SECOND_MS", default_value_t = 1000)]
    in_flight_wait_second_ms: u64,
    /// The dispatcher binary the open-loop and in-flight parts run as a child process
    /// (default: `botdispatch` next to this example's directory, i.e.
    /// `target/release/botdispatch`; build it with `cargo build --release`).
    #[arg(long, env = "BENCH_DISPATCHER_BIN")]
    dispatcher_bin: Option<std::path::PathBuf>,
    /// Extra environment of the dispatcher child, `KEY=VALUE`, repeatable (e.g.
    /// `MALLOC_ARENA_MAX=2`).
    #[arg(long = "dispatcher-env", value_parser = parse_key_value)]
    dispatcher_env: Vec<(String, String)>,
}

fn parse_key_value(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .ok_or_else(|| format!("{s:?} is not KEY=VALUE"))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Mode {
    ColdEnv,
    ColdHttp,
    Stopped,
    Suspended,
    Hot,
}

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Mode::ColdEnv => "cold-env",
            Mode::ColdHttp => "cold-http",
            Mode::Stopped => "stopped",
            Mode::Suspended => "suspended",
            Mode::Hot => "hot",
        }
    }

    /// The reserve tier, for the warm modes.
    fn tier(self) -> Option<&'static str> {
        match self {
            Mode::ColdEnv | Mode::ColdHttp => None,
            Mode::Stopped => Some("stopped"),
            Mode::Suspended => Some("suspended"),
            Mode::Hot => Some("hot"),
        }
    }

    /// The `startType` every sample should have.
    fn start_type(self) -> &'static str {
        self.tier().unwrap_or("cold")
    }

    fn http(self) -> bool {
        self != Mode::ColdEnv
    }
}

/// The fakes' latencies.
#[derive(Debug, Clone, Copy)]
struct Latencies {
    create: Duration,
    boot: Duration,
    start: Duration,
    resume: Duration,
    app_boot: Duration,
    room: Duration,
}

impl Latencies {
    /// The configured delays on `mode`'s critical path to the bot being able to talk.
    fn critical_path(&self, mode: Mode) -> Duration {
        match mode {
            Mode::ColdEnv | Mode::ColdHttp => {
                self.room.max(self.create + self.boot) + self.app_boot
            }
            Mode::Stopped => self.start + self.app_boot,
            Mode::Suspended => self.resume,
            Mode::Hot => Duration::ZERO,
        }
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

async fn dispatcher(
    fly: &FakeFly,
    daily: &FakeDaily,
    extra: &[(&'static str, String)],
    background: bool,
) -> (Arc<App>, String) {
    let mut env = vec![
        ("BOTDISPATCH_PROVIDER", "fly".to_owned()),
        ("BOTDISPATCH_ROOMS", "daily".to_owned()),
        ("BOTDISPATCH_JWT_SECRET", SECRET.to_owned()),
        ("BOTDISPATCH_SESSION_SECRET", SESSION_SECRET.to_owned()),
        (
            "BOTDISPATCH_BOT_IMAGE",
            "registry.fly.io/bots:v1".to_owned(),
        ),
        ("BOTDISPATCH_OUTBOUND_RATE_SCALE", "0".to_owned()),
        ("BOTDISPATCH_STARTS_PER_MINUTE_PER_CALLER", "0".to_owned()),
        ("BOTDISPATCH_MAX_SESSIONS", "100000".to_owned()),
        ("BOTDISPATCH_MAX_STARTS_IN_FLIGHT", "1000".to_owned()),
        ("BOTDISPATCH_REAPER_INTERVAL_SECS", "0".to_owned()),
        ("BOTDISPATCH_FLY_MACHINE_URL", fly.machine_url_template()),
        ("FLY_API_TOKEN", "bench-fly".to_owned()),
        ("FLY_APP_NAME", "bots".to_owned()),
        ("FLY_API_URL", fly.base_url()),
        ("DAILY_API_KEY", "bench-daily".to_owned()),
        ("DAILY_API_URL", daily.base_url()),
    ];
    env.extend(extra.iter().cloned());
    let config = Config::parse("", &|k| {
        env.iter()
            .rev()
            .find(|(n, _)| *n == k)
            .map(|(_, v)| v.clone())
    })
    .unwrap();
    let app = Arc::new(
        App::build(config, app::http_client().unwrap())
            .await
            .unwrap(),
    );
    if background {
        app.spawn_background();
    }
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let router = build_router(AppState(app.clone()));
    let shutdown = app.shutdown.clone();
    tokio::spawn(serve(
        listener,
        router,
        ServerLimits::default(),
        async move { shutdown.cancelled().await },
    ));
    (app, base)
}

async fn fakes(boot: Duration) -> (FakeFly, FakeDaily) {
    let fly = FakeFly::start(FakeFlyConfig {
        token: "bench-fly".into(),
        apps: vec!["bots".into()],
        boot_delay: boot,
        starting_for: Duration::ZERO,
        ..FakeFlyConfig::default()
    })
    .await;
    let daily = FakeDaily::start(FakeDailyConfig {
        api_key: "bench-daily".into(),
        ..FakeDailyConfig::default()
    })
    .await;
    (fly, daily)
}

/// Fakes with the warm-start latencies.
async fn warm_fakes(lat: &Latencies) -> (FakeFly, FakeDaily) {
    warm_fakes_with(lat, vec!["bots".into()], None, None).await
}

/// Fakes with the warm-start latencies, Fly's over `apps`: an `env`-handoff bot lives
/// `bot_lifetime` from its boot, an `http`-handoff session lasts `session` (both: until
/// stopped, when `None`).
async fn warm_fakes_with(
    lat: &Latencies,
    apps: Vec<String>,
    bot_lifetime: Option<Duration>,
    session: Option<Duration>,
) -> (FakeFly, FakeDaily) {
    let fly = FakeFly::start_with(
        FakeFlyConfig {
            token: "bench-fly".into(),
            apps,
            // The fake's boot timer starts when the create request arrives.
            boot_delay: lat.create + lat.boot,
            starting_for: Duration::ZERO,
            bot_lifetime,
            ..FakeFlyConfig::default()
        },
        FakeFlyWarmConfig {
            app_boot: lat.app_boot,
            start_delay: lat.start,
            resume_delay: lat.resume,
            session_duration: session,
            ..FakeFlyWarmConfig::default()
        },
    )
    .await;
    fly.set_create_delay(lat.create);
    let daily = FakeDaily::start(FakeDailyConfig {
        api_key: "bench-daily".into(),
        ..FakeDailyConfig::default()
    })
    .await;
    daily.set_create_delay(lat.room);
    (fly, daily)
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

/// A `kB` line of `/proc/self/status` (`VmRSS`, `VmHWM`), in KiB.
fn proc_status_kib(key: &str) -> Option<u64> {
    proc_status_kib_of("/proc/self/status", key)
}

async fn run(base: &str, token: &str, sessions: usize, concurrency: usize) -> Vec<Duration> {
    let http = reqwest::Client::new();
    let next = Arc::new(AtomicUsize::new(0));
    let mut workers = Vec::new();
    for _ in 0..concurrency {
        let (http, next, base, token) = (
            http.clone(),
            next.clone(),
            base.to_owned(),
            token.to_owned(),
        );
        workers.push(tokio::spawn(async move {
            let mut times = Vec::new();
            while next.fetch_add(1, Ordering::Relaxed) < sessions {
                let t = Instant::now();
                let resp = http
                    .post(format!("{base}/start"))
                    .bearer_auth(&token)
                    .json(&json!({"body": {"bench": true}}))
                    .send()
                    .await
                    .unwrap();
                assert!(resp.status().is_success(), "{}", resp.status());
                times.push(t.elapsed());
            }
            times
        }));
    }
    let mut all = Vec::new();
    for w in workers {
        all.extend(w.await.unwrap());
    }
    all.sort();
    all
}

/// One measured start of the warm-start benchmark.
struct Sample {
    /// `POST /start` until the answer.
    start: Duration,
    /// The request until the bot can talk.
    talk: Duration,
    start_type: String,
    /// The room came from the dispatcher's pool.
    pooled_room: bool,
    status_url: String,
    /// `http` handoff of a machine started during the request: the request until the fake
    /// recorded `started`, `started` until the `/bot` delivery, and the `GET /readyz` its bot
    /// answered.
    phases: Option<(Duration, Duration, Option<usize>)>,
}

/// The machine handle a session id carries (its second part).
fn session_handle(session_id: &str) -> Option<String> {
    let encoded = session_id.split('.').nth(1)?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(encoded)
        .ok()?;
    String::from_utf8(bytes).ok()
}

struct Target<'a> {
    http: &'a reqwest::Client,
    base: &'a str,
    token: &'a str,
    fly: &'a FakeFly,
    mode: Mode,
    app_boot: Duration,
}

impl Target<'_> {
    async fn start(&self) -> Result<Sample, String> {
        let at = Utc::now();
        let t = Instant::now();
        let resp = self
            .http
            .post(format!("{}/start", self.base))
            .bearer_auth(self.token)
            .json(&json!({"body": {"bench": true}, "wait": true}))
            .send()
            .await
            .map_err(|e| format!("POST /start: {e}"))?;
        let start = t.elapsed();
        let status = resp.status();
        let body: Value = resp
            .json()
            .await
            .map_err(|e| format!("POST /start: {status}, body: {e}"))?;
        if status != reqwest::StatusCode::OK {
            return Err(format!("POST /start: {status} {body}"));
        }
        let field = |k: &str| body[k].as_str().unwrap_or_default().to_owned();
        let handle = session_handle(&field("sessionId"))
            .ok_or_else(|| format!("no machine in the session id: {body}"))?;
        let (talk, phases) = if self.mode.http() {
            if !self
                .fly
                .wait_for_deliveries(&handle, 1, Duration::from_secs(10))
                .await
            {
                return Err(format!("machine {handle}: no /bot delivery"));
            }
            let delivered = self.fly.deliveries(&handle)[0].at;
            let talk = (delivered - at).to_std().unwrap_or_default();
            (talk, self.phases(&handle, at, delivered))
        } else {
            (start + self.app_boot, None)
        };
        Ok(Sample {
            start,
            talk,
            start_type: field("startType"),
            pooled_room: field("dailyRoom").contains("/bd-default-p"),
            status_url: field("statusUrl"),
            phases,
        })
    }

    /// Where the time of an `http` start went, when its machine started during the request
    /// (not hot): from the fake's `started` event (millisecond timestamps) and its bot
    /// server's log. Every `/readyz` of a cold or stopped machine is the start's (the
    /// reserve's replenishment probes only machines that are to be hot or suspended).
    fn phases(
        &self,
        handle: &str,
        at: chrono::DateTime<Utc>,
        delivered: chrono::DateTime<Utc>,
    ) -> Option<(Duration, Duration, Option<usize>)> {
        if self.mode == Mode::Hot {
            return None;
        }
        let machine = self.fly.machine(handle)?;
        let started = machine
            .events
            .iter()
            .filter(|e| e["status"] == "started")
            .filter_map(|e| chrono::DateTime::from_timestamp_millis(e["timestamp"].as_i64()?))
            .find(|t| *t >= at && *t <= delivered)?;
        let path = format!("/_bot/{handle}/readyz");
        let polls = (self.mode != Mode::Suspended).then(|| {
            self.fly
                .bot_requests()
                .iter()
                .filter(|r| r.path.ends_with(&path))
                .count()
        });
        Some((
            (started - at).to_std().ok()?,
            (delivered - started).to_std().ok()?,
            polls,
        ))
    }

    async fn delete(&self, status_url: &str) {
        let _ = self
            .http
            .delete(format!("{}{status_url}", self.base))
            .bearer_auth(self.token)
            .send()
            .await;
    }
}

/// Unclaimed reserve machines that are ready, as the test suite counts them.
fn ready_reserve(fly: &FakeFly) -> usize {
    fly.live_machines()
        .iter()
        .filter(|m| {
            let meta = &m.config["metadata"];
            meta["botdispatch_role"] == "reserve"
                && (meta["botdispatch_ready"] == "1"
                    || (meta["botdispatch_tier"] == "stopped" && m.state == "stopped"))
        })
        .count()
}

fn pooled_rooms(app: &App) -> usize {
    app.sessions
        .reserves()
        .and_then(|r| r.sets().next())
        .and_then(|s| s.rooms.as_ref())
        .map_or(0, |p| p.len())
}

/// Waits until `n` reserve machines are ready and the room pool has `n` rooms, then for the
/// dispatcher's listing to catch up. Returns whether that happened within `timeout`.
async fn wait_warm(fly: &FakeFly, app: &App, n: usize, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    while ready_reserve(fly) < n || pooled_rooms(app) < n {
        if Instant::now() > deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(LISTING_SLACK).await;
    true
}

/// What one mode measured.
struct ModeResult {
    mode: Mode,
    starts: Vec<Duration>,
    talks: Vec<Duration>,
    errors: usize,
    first_error: Option<String>,
    /// Samples whose `startType` was not the mode's.
    other_type: usize,
    /// Warm samples whose room was created for them (not taken from the pool).
    unpooled: usize,
    /// Rounds that began without the reserve ready (timed out waiting).
    not_ready_rounds: usize,
    /// [`Sample::phases`] of the samples that have them.
    phases: Vec<(Duration, Duration, Option<usize>)>,
    wall: Duration,
}

async fn bench_mode(mode: Mode, lat: &Latencies, args: &Args) -> ModeResult {
    let t0 = Instant::now();
    let (fly, daily) = warm_fakes(lat).await;
    let mut extra = vec![("BOTDISPATCH_RESERVE_INTERVAL_MS", "100".to_owned())];
    if mode.http() {
        extra.push(("BOTDISPATCH_HANDOFF", "http".to_owned()));
    }
    let reserve = args.reserve.max(1);
    if let Some(tier) = mode.tier() {
        extra.push(("BOTDISPATCH_RESERVE_TIER", tier.to_owned()));
        extra.push(("BOTDISPATCH_RESERVE_SIZE", reserve.to_string()));
    }
    let (app, base) = dispatcher(&fly, &daily, &extra, true).await;
    let token = app
        .auth
        .mint("bench", Duration::from_secs(3600), None)
        .unwrap();
    let http = reqwest::Client::new();
    let target = Target {
        http: &http,
        base: &base,
        token: &token,
        fly: &fly,
        mode,
        app_boot: lat.app_boot,
    };
    let per_round = match mode.tier() {
        Some(_) => args.parallel.clamp(1, reserve),
        None => args.parallel.max(1),
    };
    let mut result = ModeResult {
        mode,
        starts: Vec::new(),
        talks: Vec::new(),
        errors: 0,
        first_error: None,
        other_type: 0,
        unpooled: 0,
        not_ready_rounds: 0,
        phases: Vec::new(),
        wall: Duration::ZERO,
    };
    let mut left = args.samples;
    while left > 0 {
        let n = per_round.min(left);
        left -= n;
        if mode.tier().is_some() && !wait_warm(&fly, &app, n, Duration::from_secs(30)).await {
            result.not_ready_rounds += 1;
        }
        let samples = join_all((0..n).map(|_| target.start())).await;
        let mut ended = Vec::new();
        for sample in samples {
            match sample {
                Ok(s) => {
                    result.starts.push(s.start);
                    result.talks.push(s.talk);
                    result.other_type += usize::from(s.start_type != mode.start_type());
                    result.unpooled += usize::from(mode.tier().is_some() && !s.pooled_room);
                    result.phases.extend(s.phases);
                    ended.push(s.status_url);
                }
                Err(e) => {
                    result.errors += 1;
                    result.first_error.get_or_insert(e);
                }
            }
        }
        join_all(ended.iter().map(|u| target.delete(u))).await;
    }
    app.shutdown.cancel();
    result.starts.sort();
    result.talks.sort();
    result.wall = t0.elapsed();
    result
}

fn print_results(results: &[ModeResult], lat: &Latencies) {
    println!(
        "  {:<10} {:>22} {:>22} {:>9} {:>16} {:>6} {:>9}",
        "mode",
        "start p50/p95/p99",
        "talk p50/p95/p99",
        "path",
        "overhead p50/p99",
        "errors",
        "not warm"
    );
    for r in results {
        let path = lat.critical_path(r.mode);
        let overhead = if r.talks.is_empty() {
            "-".to_owned()
        } else {
            let over = |p| ms(percentile(&r.talks, p)) - ms(path);
            format!("{:.0} / {:.0}", over(0.5), over(0.99))
        };
        let not_warm = if r.mode.tier().is_some() {
            r.other_type.to_string()
        } else {
            "-".to_owned()
        };
        println!(
            "  {:<10} {:>22} {:>22} {:>9.0} {:>16} {:>6} {:>9}",
            r.mode.name(),
            triple(&r.starts),
            triple(&r.talks),
            ms(path),
            overhead,
            r.errors,
            not_warm
        );
    }
    for r in results {
        let mut notes = Vec::new();
        if r.mode.tier().is_none() && r.other_type > 0 {
            notes.push(format!("{} samples not cold", r.other_type));
        }
        if r.unpooled > 0 {
            notes.push(format!("{} rooms not from the pool", r.unpooled));
        }
        if r.not_ready_rounds > 0 {
            notes.push(format!(
                "{} rounds began before the reserve was ready",
                r.not_ready_rounds
            ));
        }
        if !r.phases.is_empty() {
            let mut to_started: Vec<Duration> = r.phases.iter().map(|p| p.0).collect();
            let mut to_delivery: Vec<Duration> = r.phases.iter().map(|p| p.1).collect();
            let mut polls: Vec<usize> = r.phases.iter().filter_map(|p| p.2).collect();
            to_started.sort();
            to_delivery.sort();
            polls.sort_unstable();
            let polls = polls
                .get(polls.len() / 2)
                .map_or(String::new(), |n| format!(", {n} GET /readyz per start"));
            notes.push(format!(
                "p50 request to machine started {:.0} ms, started to /bot delivered {:.0} ms{polls}",
                ms(percentile(&to_started, 0.5)),
                ms(percentile(&to_delivery, 0.5)),
            ));
        }
        if let Some(e) = &r.first_error {
            notes.push(format!("first error: {e}"));
        }
        notes.push(format!("{:.1} s", r.wall.as_secs_f64()));
        println!("  {}: {}", r.mode.name(), notes.join("; "));
    }
}

// ---------------------------------------------------------------------------------------------
// 5. Open loop and 6. memory at N starts in flight: the dispatcher runs as a child process (the
// release binary), so its resident set is its own; the fakes, the rate-limiting proxies and the
// clients stay in this process.
// ---------------------------------------------------------------------------------------------

/// The providers' documented rate limits (`/work/shared/specs/rate-limits.json`), enforced by a
/// proxy in front of a fake: the fakes themselves answer every request.
mod limits {
    use std::collections::{BTreeMap, HashMap, VecDeque};
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::{Arc, Mutex};
    use std::time::{Duration, Instant};

    use axum::body::Body;
    use axum::extract::{Request, State};
    use axum::http::{header, Method, StatusCode};
    use axum::response::{IntoResponse, Response};
    use serde_json::json;

    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub enum Api {
        /// Fly Machines: a token bucket per action and machine (per app for create and
        /// list), 1 req/s with bursts of 3; getting a machine 5 req/s, bursts of 10.
        Fly,
        /// Daily REST: 20 req/s and 100 per 5 s on most endpoints; room deletes (and
        /// recording listings) 2 req/s and 50 per 30 s. Per account.
        Daily,
    }

    /// Daily's windows: most endpoints, then deletes.
    const DAILY_MOST: &[(Duration, usize)] =
        &[(Duration::from_secs(1), 20), (Duration::from_secs(5), 100)];
    const DAILY_DELETE: &[(Duration, usize)] =
        &[(Duration::from_secs(1), 2), (Duration::from_secs(30), 50)];

    struct Bucket {
        tokens: f64,
        at: Instant,
    }

    /// One API's limits and what they refused.
    pub struct Limits {
        api: Api,
        buckets: Mutex<HashMap<(String, String), Bucket>>,
        windows: Mutex<HashMap<&'static str, VecDeque<Instant>>>,
        requests: AtomicU64,
        throttled: Mutex<BTreeMap<String, u64>>,
    }

    /// Fly: `(action, scope, per second, burst)` of a Machines API request.
    fn fly_rule(method: &Method, path: &str) -> Option<(String, String, f64, f64)> {
        let segments: Vec<&str> = path.trim_start_matches('/').split('/').collect();
        let segments = segments.strip_prefix(&["v1"]).unwrap_or(&segments[..]);
        let ["apps", app, "machines", rest @ ..] = segments else {
            return None;
        };
        let default = |action: String, scope: &str| Some((action, scope.to_owned(), 1.0, 3.0));
        match (method.as_str(), rest) {
            ("POST", []) => default("create".to_owned(), app),
            ("GET", []) => default("list".to_owned(), app),
            ("GET", [id]) => Some(("get".to_owned(), (*id).to_owned(), 5.0, 10.0)),
            (m, [id]) => default(format!("{m} machine"), id),
            (m, [id, action, ..]) => default(format!("{m} {action}"), id),
            (_, []) => None,
        }
    }

    fn daily_class(method: &Method, path: &str) -> (&'static str, &'static [(Duration, usize)]) {
        let delete = (method == Method::DELETE && path.contains("/rooms/"))
            || (method == Method::GET && path.contains("/recordings"));
        match delete {
            true => ("DELETE room", DAILY_DELETE),
            false => ("most endpoints", DAILY_MOST),
        }
    }

    impl Limits {
        fn new(api: Api) -> Self {
            Self {
                api,
                buckets: Mutex::default(),
                windows: Mutex::default(),
                requests: AtomicU64::new(0),
                throttled: Mutex::default(),
            }
        }

        /// Counts a request; `Err(limit)` when it is over the limit it falls under.
        fn admit(&self, method: &Method, path: &str) -> Result<(), String> {
            self.requests.fetch_add(1, Ordering::Relaxed);
            let now = Instant::now();
            let refused = match self.api {
                Api::Fly => {
                    let Some((action, scope, rate, burst)) = fly_rule(method, path) else {
                        return Ok(());
                    };
                    let mut buckets = self.buckets.lock().unwrap();
                    let bucket = buckets.entry((action.clone(), scope)).or_insert(Bucket {
                        tokens: burst,
                        at: now,
                    });
                    let refill = now.duration_since(bucket.at).as_secs_f64() * rate;
                    bucket.tokens = (bucket.tokens + refill).min(burst);
                    bucket.at = now;
                    if bucket.tokens >= 1.0 {
                        bucket.tokens -= 1.0;
                        None
                    } else {
                        Some(action)
                    }
                }
                Api::Daily => {
                    let (class, windows) = daily_class(method, path);
                    let mut all = self.windows.lock().unwrap();
                    let log = all.entry(class).or_default();
                    let longest = windows.iter().map(|w| w.0).max().unwrap_or_default();
                    while log
                        .front()
                        .is_some_and(|t| now.duration_since(*t) >= longest)
                    {
                        log.pop_front();
                    }
                    let full = windows.iter().any(|(span, max)| {
                        log.iter()
                            .rev()
                            .take_while(|t| now.duration_since(**t) < *span)
                            .count()
                            >= *max
                    });
                    if full {
                        Some(class.to_owned())
                    } else {
                        log.push_back(now);
                        None
                    }
                }
            };
            match refused {
                None => Ok(()),
                Some(limit) => {
                    *self
                        .throttled
                        .lock()
                        .unwrap()
                        .entry(limit.clone())
                        .or_default() += 1;
                    Err(limit)
                }
            }
        }

        pub fn requests(&self) -> u64 {
            self.requests.load(Ordering::Relaxed)
        }

        /// 429s answered, by limit.
        pub fn throttled(&self) -> BTreeMap<String, u64> {
            self.throttled.lock().unwrap().clone()
        }
    }

    struct Forward {
        limits: Arc<Limits>,
        upstream: String,
        http: reqwest::Client,
    }

    /// A proxy on `127.0.0.1:0` that answers 429 (in the API's error shape) past `api`'s
    /// limits and forwards everything else to `upstream` (`http://host:port`).
    pub struct Proxy {
        /// `http://127.0.0.1:PORT`; the upstream's paths apply.
        pub url: String,
        pub limits: Arc<Limits>,
    }

    pub async fn start(api: Api, upstream: String) -> Proxy {
        let limits = Arc::new(Limits::new(api));
        let forward = Arc::new(Forward {
            limits: Arc::clone(&limits),
            upstream,
            http: reqwest::Client::builder()
                .pool_max_idle_per_host(512)
                .build()
                .unwrap(),
        });
        let router = axum::Router::new().fallback(proxy).with_state(forward);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move {
            let _ = axum::serve(listener, router).await;
        });
        Proxy { url, limits }
    }

    async fn proxy(State(f): State<Arc<Forward>>, req: Request) -> Response {
        let (parts, body) = req.into_parts();
        if let Err(limit) = f.limits.admit(&parts.method, parts.uri.path()) {
            let body = match f.limits.api {
                Api::Fly => json!({"error": format!("rate limit exceeded: {limit}")}),
                Api::Daily => json!({
                    "error": "rate-limit-error",
                    "info": format!("rate limit exceeded: {limit}"),
                }),
            };
            return (StatusCode::TOO_MANY_REQUESTS, axum::Json(body)).into_response();
        }
        let Ok(bytes) = axum::body::to_bytes(body, 16 << 20).await else {
            return StatusCode::BAD_REQUEST.into_response();
        };
        let target = parts.uri.path_and_query().map_or("/", |p| p.as_str());
        let mut out = f
            .http
            .request(parts.method.clone(), format!("{}{target}", f.upstream))
            .body(bytes);
        for (name, value) in &parts.headers {
            if ![header::HOST, header::CONTENT_LENGTH, header::CONNECTION].contains(name) {
                out = out.header(name, value);
            }
        }
        match out.send().await {
            Ok(resp) => {
                let status = resp.status();
                let headers = resp.headers().clone();
                let body = resp.bytes().await.unwrap_or_default();
                let mut answer = Response::new(Body::from(body));
                *answer.status_mut() = status;
                for (name, value) in &headers {
                    if ![
                        header::TRANSFER_ENCODING,
                        header::CONNECTION,
                        header::CONTENT_LENGTH,
                    ]
                    .contains(name)
                    {
                        answer.headers_mut().append(name, value.clone());
                    }
                }
                answer
            }
            Err(e) => (StatusCode::BAD_GATEWAY, e.to_string()).into_response(),
        }
    }
}

/// The dispatcher as a child process: the release binary, configured by its environment.
mod child {
    use std::path::{Path, PathBuf};
    use std::process::Stdio;
    use std::time::{Duration, Instant};

    use botdispatch::auth::Authenticator;
    use botdispatch::config::Config;

    pub struct Dispatcher {
        process: tokio::process::Child,
        pub pid: u32,
        /// `http://127.0.0.1:PORT`.
        pub base: String,
        /// A bearer token it accepts.
        pub token: String,
        /// Its stdout and stderr.
        pub log: PathBuf,
    }

    /// The binary next to this example's directory (`target/release/botdispatch`).
    pub fn default_bin() -> PathBuf {
        let exe = std::env::current_exe().unwrap();
        let dir = exe.parent().and_then(Path::parent).unwrap();
        dir.join("botdispatch")
    }

    /// Starts `bin` with exactly `env` (plus `BOTDISPATCH_LISTEN` and `RUST_LOG` when set
    /// here) and waits for its `/healthz`.
    pub async fn spawn(bin: &Path, env: &[(String, String)], name: &str) -> Dispatcher {
        assert!(
            bin.exists(),
            "no dispatcher binary at {} (build it with `cargo build --release`, or pass --dispatcher-bin)",
            bin.display()
        );
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut env = env.to_vec();
        env.push(("BOTDISPATCH_LISTEN".into(), format!("127.0.0.1:{port}")));
        if let Ok(filter) = std::env::var("RUST_LOG") {
            env.push(("RUST_LOG".into(), filter));
        }
        let log = std::env::temp_dir().join(format!("botdispatch-bench-{name}.log"));
        let out = std::fs::File::create(&log).unwrap();
        let process = tokio::process::Command::new(bin)
            .arg("serve")
            .env_clear()
            .envs(env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let pid = process.id().unwrap();
        let config = Config::parse("", &|k| {
            env.iter()
                .rev()
                .find(|(n, _)| n == k)
                .map(|(_, v)| v.clone())
        })
        .unwrap();
        let auth = Authenticator::new(&config.auth, config.auth.jwt_secret.as_ref()).unwrap();
        let token = auth
            .mint("bench", Duration::from_secs(4 * 3600), None)
            .unwrap();
        let base = format!("http://127.0.0.1:{port}");
        let http = reqwest::Client::new();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let up = http.get(format!("{base}/healthz")).send().await;
            if up.is_ok_and(|r| r.status().is_success()) {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "the dispatcher did not come up; see {}",
                log.display()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Dispatcher {
            process,
            pid,
            base,
            token,
            log,
        }
    }

    impl Dispatcher {
        /// A `kB` line of its `/proc/PID/status` (`VmRSS`, `VmHWM`), in KiB.
        pub fn status_kib(&self, key: &str) -> Option<u64> {
            super::proc_status_kib_of(&format!("/proc/{}/status", self.pid), key)
        }

        /// SIGTERM (its graceful shutdown; a profiler wrapping it writes its report), then
        /// SIGKILL if it is still running 20 s later.
        pub async fn stop(mut self) {
            use nix::sys::signal::{kill, Signal};
            use nix::unistd::Pid;
            let _ = kill(Pid::from_raw(self.pid as i32), Signal::SIGTERM);
            let exited = tokio::time::timeout(Duration::from_secs(20), self.process.wait());
            if exited.await.is_err() {
                let _ = self.process.kill().await;
            }
        }
    }
}

/// An open-loop case.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum CaseArg {
    All,
    Cold,
    #[value(name = "cold-4")]
    Cold4,
    #[value(name = "cold-8")]
    Cold8,
    Stopped,
    Suspended,
    Hot,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Case {
    /// (a) Cold starts (`env` handoff, no reserve) in one Fly app.
    Cold,
    /// (b) The same over 4 or 8 apps (`BOTDISPATCH_FLY_APPS`).
    ColdApps(usize),
    /// (c), (d), (e) `http` handoff from a recycled reserve of this tier.
    Recycle(&'static str),
}

impl Case {
    fn all() -> Vec<Case> {
        vec![
            Case::Cold,
            Case::ColdApps(4),
            Case::ColdApps(8),
            Case::Recycle("stopped"),
            Case::Recycle("suspended"),
            Case::Recycle("hot"),
        ]
    }

    fn from_args(args: &[CaseArg]) -> Vec<Case> {
        let mut cases = Vec::new();
        for a in args {
            let more = match a {
                CaseArg::All => Case::all(),
                CaseArg::Cold => vec![Case::Cold],
                CaseArg::Cold4 => vec![Case::ColdApps(4)],
                CaseArg::Cold8 => vec![Case::ColdApps(8)],
                CaseArg::Stopped => vec![Case::Recycle("stopped")],
                CaseArg::Suspended => vec![Case::Recycle("suspended")],
                CaseArg::Hot => vec![Case::Recycle("hot")],
            };
            for c in more {
                if !cases.contains(&c) {
                    cases.push(c);
                }
            }
        }
        cases
    }

    fn name(self) -> String {
        match self {
            Case::Cold => "cold".to_owned(),
            Case::ColdApps(n) => format!("cold-{n}"),
            Case::Recycle(tier) => format!("{tier}+recycle"),
        }
    }

    fn apps(self, args: &Args) -> usize {
        match self {
            Case::Cold => 1,
            Case::ColdApps(n) => n,
            Case::Recycle(_) => args.reserve_apps.max(1),
        }
    }

    fn tier(self) -> Option<&'static str> {
        match self {
            Case::Recycle(tier) => Some(tier),
            _ => None,
        }
    }
}

/// Seconds of arrivals.
fn open_duration(args: &Args) -> f64 {
    if args.quick {
        5.0
    } else {
        args.duration_secs as f64
    }
}

/// The reserve of the recycle cases, unless given: every machine is held for its claim (the
/// stopped tier boots then: start + app boot; the suspended tier resumes), its session
/// (`session_secs`) and then its recycling (`recycle_secs`) before it can be claimed again, so
/// at `rate` arrivals a second `rate × (claim + session + recycle)` machines are in use at any
/// time (Little's law); a run shorter than that cycle needs only `rate × duration`. Plus two
/// seconds of arrivals: a machine made ready is claimable only once the dispatcher's next
/// listing shows it (at most a second) and the arrivals of one pass must find one each.
fn reserve_size(args: &Args, tier: &str) -> u32 {
    if let Some(size) = args.reserve_size {
        return size;
    }
    let claim_ms = match tier {
        "stopped" => args.start_ms + args.app_boot_ms,
        "suspended" => args.resume_ms,
        _ => 0,
    };
    let held = args.session_secs as f64 + args.recycle_secs + claim_ms as f64 / 1000.0;
    let cycle = held.min(open_duration(args));
    ((args.rate * (cycle + 2.0)).ceil() as u32).clamp(1, 1000)
}

/// One start of the open loop.
struct Arrival {
    /// Wall clock when it was sent.
    at: chrono::DateTime<Utc>,
    /// Since the run began: sent, answered.
    sent: Duration,
    answered: Duration,
    outcome: Result<(String, String), (u16, String)>,
}

/// What one open-loop case measured.
struct OpenResult {
    case: Case,
    apps: usize,
    reserve: Option<u32>,
    offered: usize,
    duration: f64,
    fill: Option<Duration>,
    ok: usize,
    sustained: f64,
    starts: Vec<Duration>,
    talks: Vec<Duration>,
    /// Client errors by status (0: no answer), with the first message.
    errors: BTreeMap<u16, (usize, String)>,
    start_types: BTreeMap<String, usize>,
    fly_requests: u64,
    fly_throttled: BTreeMap<String, u64>,
    daily_requests: u64,
    daily_throttled: BTreeMap<String, u64>,
    /// Reserve machines ready and unclaimed, integrated over the arrivals.
    idle_machine_secs: f64,
    /// Session over until ready again in the reserve (sampled), for recycled machines.
    recycle: Vec<Duration>,
    /// Sessions that reached a machine without a fresh boot since its previous one.
    violations: usize,
    /// Machines the fake created during the arrivals.
    created_during: usize,
    rss_before_kib: Option<u64>,
    peak_rss_kib: Option<u64>,
    log: std::path::PathBuf,
}

/// A `kB` line of a `/proc/PID/status` file, in KiB.
fn proc_status_kib_of(path: &str, key: &str) -> Option<u64> {
    let status = std::fs::read_to_string(path).ok()?;
    status
        .lines()
        .find(|l| l.starts_with(key))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// The environment every child dispatcher gets.
fn child_env(
    fly_api: &str,
    machine_url: &str,
    daily_api: &str,
    apps: &[String],
) -> Vec<(String, String)> {
    let mut env: Vec<(String, String)> = [
        ("BOTDISPATCH_PROVIDER", "fly"),
        ("BOTDISPATCH_ROOMS", "daily"),
        ("BOTDISPATCH_JWT_SECRET", SECRET),
        ("BOTDISPATCH_SESSION_SECRET", SESSION_SECRET),
        ("BOTDISPATCH_BOT_IMAGE", "registry.fly.io/bots:v1"),
        ("BOTDISPATCH_STARTS_PER_MINUTE_PER_CALLER", "0"),
        ("BOTDISPATCH_MAX_SESSIONS", "100000"),
        ("BOTDISPATCH_LOG_FORMAT", "json"),
        ("FLY_API_TOKEN", "bench-fly"),
        ("DAILY_API_KEY", "bench-daily"),
    ]
    .iter()
    .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
    .collect();
    env.push(("FLY_API_URL".into(), fly_api.to_owned()));
    env.push(("BOTDISPATCH_FLY_MACHINE_URL".into(), machine_url.to_owned()));
    env.push(("DAILY_API_URL".into(), daily_api.to_owned()));
    match apps {
        [one] => env.push(("BOTDISPATCH_FLY_APP".into(), one.clone())),
        _ => env.push(("BOTDISPATCH_FLY_APPS".into(), apps.join(","))),
    }
    env
}

fn app_names(n: usize) -> Vec<String> {
    match n {
        1 => vec!["bots".to_owned()],
        _ => (0..n).map(|i| format!("bots-{i}")).collect(),
    }
}

/// Sends one start and reads its answer: `(sessionId's machine, startType)` or
/// `(status, message)` (status 0: no answer).
async fn open_start(
    http: &reqwest::Client,
    base: &str,
    token: &str,
    i: usize,
) -> Result<(String, String), (u16, String)> {
    let resp = http
        .post(format!("{base}/start"))
        .bearer_auth(token)
        .json(&json!({"body": {"bench": i}, "wait": true}))
        .send()
        .await
        .map_err(|e| (0, format!("POST /start: {e}")))?;
    let status = resp.status();
    let text = resp.text().await.unwrap_or_default();
    if status != reqwest::StatusCode::OK {
        return Err((status.as_u16(), text.chars().take(300).collect()));
    }
    let body: Value = serde_json::from_str(&text).map_err(|e| (200, e.to_string()))?;
    let handle = body["sessionId"]
        .as_str()
        .and_then(session_handle)
        .ok_or_else(|| (200, format!("no machine in the session id: {body}")))?;
    // Handles of a sharded Fly provider are `app/machine`; the fake knows machines by id.
    let id = handle.rsplit('/').next().unwrap_or(&handle).to_owned();
    Ok((id, body["startType"].as_str().unwrap_or("?").to_owned()))
}

/// Where a machine of the fake stands, for the idle and recycle figures.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// In the reserve, ready, unclaimed.
    Ready,
    /// Its last session is running.
    InSession,
    /// Anything else (booting, session over and not back yet).
    Other,
}

fn phase_of(m: &providers::testkit::fly_fake::FakeMachine) -> Phase {
    let meta = &m.config["metadata"];
    let ready = meta["botdispatch_role"] == "reserve"
        && (meta["botdispatch_ready"] == "1"
            || (meta["botdispatch_tier"] == "stopped" && m.state == "stopped"));
    if ready {
        Phase::Ready
    } else if m
        .deliveries
        .last()
        .is_some_and(|d| d.accepted && d.status.is_none())
        && m.state == "started"
    {
        Phase::InSession
    } else {
        Phase::Other
    }
}

async fn open_loop_case(case: Case, lat: &Latencies, args: &Args, bin: &Path) -> OpenResult {
    let apps = app_names(case.apps(args));
    let session = Duration::from_secs(args.session_secs);
    // `env` handoff: the session runs from the boot, once the app booted.
    let bot_lifetime = case.tier().is_none().then_some(lat.app_boot + session);
    let (fly, daily) = warm_fakes_with(lat, apps.clone(), bot_lifetime, Some(session)).await;
    let fly_proxy = limits::start(limits::Api::Fly, fly.root_url()).await;
    let daily_root = format!("http://{}", daily.addr());
    let daily_proxy = limits::start(limits::Api::Daily, daily_root.clone()).await;
    let mut env = child_env(
        &format!("{}/v1", fly_proxy.url),
        &fly.machine_url_template(),
        &daily.base_url().replace(&daily_root, &daily_proxy.url),
        &apps,
    );
    env.push((
        "BOTDISPATCH_RESERVE_INTERVAL_MS".into(),
        args.reserve_interval_ms.to_string(),
    ));
    env.push(("BOTDISPATCH_MAX_STARTS_IN_FLIGHT".into(), "1000".into()));
    let reserve = case.tier().map(|tier| reserve_size(args, tier));
    if let (Some(tier), Some(size)) = (case.tier(), reserve) {
        env.push(("BOTDISPATCH_HANDOFF".into(), "http".into()));
        env.push(("BOTDISPATCH_RESERVE_TIER".into(), tier.into()));
        env.push(("BOTDISPATCH_RESERVE_SIZE".into(), size.to_string()));
        env.push(("BOTDISPATCH_RESERVE_RECYCLE".into(), "true".into()));
    }
    env.extend(args.dispatcher_env.iter().cloned());
    let child = child::spawn(bin, &env, &case.name()).await;

    // The reserve's first fill is not measured.
    let mut fill = None;
    if let Some(size) = reserve {
        let t = Instant::now();
        let deadline = t + Duration::from_secs(1800);
        let mut last_print = t;
        while ready_reserve(&fly) < size as usize && Instant::now() < deadline {
            if last_print.elapsed() > Duration::from_secs(30) {
                println!(
                    "  {}: filling the reserve: {}/{size} ready after {:.0} s",
                    case.name(),
                    ready_reserve(&fly),
                    t.elapsed().as_secs_f64()
                );
                last_print = Instant::now();
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        fill = Some(t.elapsed());
        // The dispatcher's listing, and the 1 s list buckets, catch up.
        tokio::time::sleep(Duration::from_secs(3)).await;
    }
    let rss_before_kib = child.status_kib("VmRSS:");
    let created_before = fly.machines().len();
    let fly_before = fly_proxy.limits.throttled();
    let daily_before = daily_proxy.limits.throttled();
    let (fly_req_before, daily_req_before) =
        (fly_proxy.limits.requests(), daily_proxy.limits.requests());

    // Sampler: idle reserve machines, and how long recycling takes.
    let stop = tokio_util::sync::CancellationToken::new();
    let sampler = {
        let (fly, stop) = (fly.clone(), stop.clone());
        tokio::spawn(async move {
            let mut idle = 0.0;
            let mut recycle = Vec::new();
            let mut phases: HashMap<String, (Phase, Option<Instant>)> = HashMap::new();
            let mut last = Instant::now();
            while !stop.is_cancelled() {
                tokio::time::sleep(Duration::from_millis(500)).await;
                let now = Instant::now();
                let machines = fly.live_machines();
                let ready = machines.iter().filter(|m| phase_of(m) == Phase::Ready);
                idle += ready.count() as f64 * (now - last).as_secs_f64();
                last = now;
                for m in &machines {
                    let phase = phase_of(m);
                    let entry = phases.entry(m.id.clone()).or_insert((phase, None));
                    match (entry.0, phase) {
                        (Phase::InSession, Phase::Other) => entry.1 = Some(now),
                        (_, Phase::Ready) => {
                            if let Some(ended) = entry.1.take() {
                                recycle.push(now - ended);
                            }
                        }
                        _ => {}
                    }
                    entry.0 = phase;
                }
            }
            (idle, recycle)
        })
    };

    // Open loop: arrival i is sent at i / rate, whatever the earlier ones are doing.
    let duration = open_duration(args);
    let n = (args.rate * duration).round() as usize;
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(180))
        .pool_max_idle_per_host(2000)
        .build()
        .unwrap();
    let t0 = Instant::now();
    let mut tasks = Vec::with_capacity(n);
    for i in 0..n {
        tokio::time::sleep_until((t0 + Duration::from_secs_f64(i as f64 / args.rate)).into()).await;
        let (http, base, token) = (http.clone(), child.base.clone(), child.token.clone());
        tasks.push(tokio::spawn(async move {
            let at = Utc::now();
            let sent = t0.elapsed();
            let outcome = open_start(&http, &base, &token, i).await;
            Arrival {
                at,
                sent,
                answered: t0.elapsed(),
                outcome,
            }
        }));
    }
    let arrivals: Vec<Arrival> = join_all(tasks)
        .await
        .into_iter()
        .map(|r| r.unwrap())
        .collect();
    stop.cancel();
    let (idle_machine_secs, mut recycle) = sampler.await.unwrap();
    recycle.sort();
    let peak_rss_kib = child.status_kib("VmHWM:");
    let log = child.log.clone();
    // Its metrics (start phases, provider calls by outcome), next to its log.
    if let Ok(resp) = http.get(format!("{}/metrics", child.base)).send().await {
        let _ = std::fs::write(
            log.with_extension("metrics"),
            resp.text().await.unwrap_or_default(),
        );
    }

    // Time until the bot can talk: the first `/bot` its machine got after the request
    // (`http`), or the start plus the app's boot (`env`).
    let machines: HashMap<String, providers::testkit::fly_fake::FakeMachine> = fly
        .machines()
        .into_iter()
        .map(|m| (m.id.clone(), m))
        .collect();
    let mut result = OpenResult {
        case,
        apps: apps.len(),
        reserve,
        offered: n,
        duration,
        fill,
        ok: 0,
        sustained: 0.0,
        starts: Vec::new(),
        talks: Vec::new(),
        errors: BTreeMap::new(),
        start_types: BTreeMap::new(),
        fly_requests: fly_proxy.limits.requests() - fly_req_before,
        fly_throttled: minus(fly_proxy.limits.throttled(), &fly_before),
        daily_requests: daily_proxy.limits.requests() - daily_req_before,
        daily_throttled: minus(daily_proxy.limits.throttled(), &daily_before),
        idle_machine_secs,
        recycle,
        violations: fly.violations().len(),
        created_during: machines.len() - created_before,
        rss_before_kib,
        peak_rss_kib,
        log,
    };
    let (mut first_ok, mut last_ok) = (Duration::MAX, Duration::ZERO);
    for a in &arrivals {
        match &a.outcome {
            Ok((id, start_type)) => {
                result.ok += 1;
                let start = a.answered - a.sent;
                first_ok = first_ok.min(a.answered);
                last_ok = last_ok.max(a.answered);
                result.starts.push(start);
                *result.start_types.entry(start_type.clone()).or_default() += 1;
                if case.tier().is_none() {
                    result.talks.push(start + lat.app_boot);
                } else if let Some(d) = machines
                    .get(id)
                    .and_then(|m| m.deliveries.iter().find(|d| d.accepted && d.at >= a.at))
                {
                    result
                        .talks
                        .push((d.at - a.at).to_std().unwrap_or_default());
                }
            }
            Err((status, message)) => {
                let e = result.errors.entry(*status).or_insert((0, message.clone()));
                e.0 += 1;
            }
        }
    }
    if result.ok > 1 {
        result.sustained = (result.ok - 1) as f64 / (last_ok - first_ok).as_secs_f64();
    }
    result.starts.sort();
    result.talks.sort();
    child.stop().await;
    result
}

fn minus(after: BTreeMap<String, u64>, before: &BTreeMap<String, u64>) -> BTreeMap<String, u64> {
    after
        .into_iter()
        .map(|(k, v)| {
            let b = before.get(&k).copied().unwrap_or(0);
            (k, v - b)
        })
        .filter(|(_, v)| *v > 0)
        .collect()
}

fn triple(v: &[Duration]) -> String {
    if v.is_empty() {
        return "-".to_owned();
    }
    format!(
        "{:.0} / {:.0} / {:.0}",
        ms(percentile(v, 0.5)),
        ms(percentile(v, 0.95)),
        ms(percentile(v, 0.99))
    )
}

fn mib(kib: Option<u64>) -> String {
    kib.map_or("-".to_owned(), |k| format!("{:.1}", k as f64 / 1024.0))
}

fn print_open_results(results: &[OpenResult]) {
    println!(
        "  {:<17} {:>4} {:>7} {:>9} {:>10} {:>6} {:>21} {:>21} {:>6} {:>9} {:>8} {:>8}",
        "case",
        "apps",
        "reserve",
        "offered/s",
        "sustained/s",
        "errors",
        "start p50/p95/p99 ms",
        "talk p50/p95/p99 ms",
        "429s",
        "idle m·s",
        "RSS MiB",
        "(before)"
    );
    for r in results {
        let errors: usize = r.errors.values().map(|e| e.0).sum();
        let throttled: u64 =
            r.fly_throttled.values().sum::<u64>() + r.daily_throttled.values().sum::<u64>();
        println!(
            "  {:<17} {:>4} {:>7} {:>9.1} {:>10.1} {:>6} {:>21} {:>21} {:>6} {:>9.0} {:>8} {:>8}",
            r.case.name(),
            r.apps,
            r.reserve.map_or("-".to_owned(), |s| s.to_string()),
            r.offered as f64 / r.duration,
            r.sustained,
            errors,
            triple(&r.starts),
            triple(&r.talks),
            throttled,
            r.idle_machine_secs,
            mib(r.peak_rss_kib),
            mib(r.rss_before_kib),
        );
    }
    for r in results {
        let mut notes = vec![format!(
            "{}/{} ok; start types {:?}",
            r.ok, r.offered, r.start_types
        )];
        if let Some(fill) = r.fill {
            notes.push(format!("reserve filled in {:.0} s", fill.as_secs_f64()));
        }
        if !r.recycle.is_empty() {
            notes.push(format!(
                "recycle (session over → ready, sampled every 0.5 s) p50/p95 {:.1} / {:.1} s over {}",
                percentile(&r.recycle, 0.5).as_secs_f64(),
                percentile(&r.recycle, 0.95).as_secs_f64(),
                r.recycle.len()
            ));
        }
        notes.push(format!(
            "machines created during the run {}; fly calls {} (429: {:?}); daily calls {} (429: {:?})",
            r.created_during, r.fly_requests, r.fly_throttled, r.daily_requests, r.daily_throttled
        ));
        if r.violations > 0 {
            notes.push(format!("{} sessions without a fresh boot", r.violations));
        }
        for (status, (count, first)) in &r.errors {
            notes.push(format!("{count} × {status}: {first}"));
        }
        notes.push(format!(
            "dispatcher log {} (metrics beside it)",
            r.log.display()
        ));
        println!("  {}: {}", r.case.name(), notes.join("; "));
    }
}

/// Part 6, memory: `n` cold starts at once, each in flight for `boot` (the machine's boot), no
/// rate limits; the dispatcher's resident set idle, at its peak, and per start.
async fn in_flight(n: usize, boot: Duration, lat: &Latencies, args: &Args, bin: &Path) {
    let fly = FakeFly::start(FakeFlyConfig {
        token: "bench-fly".into(),
        apps: vec!["bots".into()],
        boot_delay: lat.create + boot,
        starting_for: Duration::ZERO,
        wait_second: Duration::from_millis(args.in_flight_wait_second_ms),
        ..FakeFlyConfig::default()
    })
    .await;
    fly.set_create_delay(lat.create);
    let daily = FakeDaily::start(FakeDailyConfig {
        api_key: "bench-daily".into(),
        ..FakeDailyConfig::default()
    })
    .await;
    daily.set_create_delay(lat.room);
    let mut env = child_env(
        &fly.base_url(),
        &fly.machine_url_template(),
        &daily.base_url(),
        &app_names(1),
    );
    env.push(("BOTDISPATCH_OUTBOUND_RATE_SCALE".into(), "0".into()));
    env.push(("BOTDISPATCH_MAX_STARTS_IN_FLIGHT".into(), n.to_string()));
    env.push(("BOTDISPATCH_REAPER_INTERVAL_SECS".into(), "0".into()));
    env.extend(args.dispatcher_env.iter().cloned());
    let child = child::spawn(bin, &env, "in-flight").await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let idle = child.status_kib("VmRSS:");
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(120))
        .pool_max_idle_per_host(n)
        .build()
        .unwrap();
    let t0 = Instant::now();
    let done = tokio_util::sync::CancellationToken::new();
    let starts = async {
        let results = join_all((0..n).map(|i| {
            let (http, base, token) = (&http, &child.base, &child.token);
            async move {
                let t = Instant::now();
                let r = open_start(http, base, token, i).await;
                (t.elapsed(), r)
            }
        }))
        .await;
        done.cancel();
        results
    };
    // The resident set sampled while the starts run, besides the kernel's high-water mark.
    let sample = async {
        let (mut peak, mut peak_at) = (0, Duration::ZERO);
        while !done.is_cancelled() {
            if let Some(rss) = child.status_kib("VmRSS:") {
                if rss > peak {
                    (peak, peak_at) = (rss, t0.elapsed());
                }
            }
            tokio::select! {
                () = done.cancelled() => {}
                () = tokio::time::sleep(Duration::from_millis(100)) => {}
            }
        }
        (peak, peak_at)
    };
    let (results, (sampled, sampled_at)) = tokio::join!(starts, sample);
    let hwm = child.status_kib("VmHWM:");
    let after = child.status_kib("VmRSS:");
    let mut times: Vec<Duration> = results
        .iter()
        .filter(|r| r.1.is_ok())
        .map(|r| r.0)
        .collect();
    times.sort();
    let first_error = results.iter().find_map(|r| r.1.as_ref().err());
    let per_start = match (hwm, idle) {
        (Some(h), Some(i)) => format!("{:.0}", h.saturating_sub(i) as f64 / n as f64),
        _ => "-".to_owned(),
    };
    println!(
        "memory: {n} cold starts in flight (boot {:.0} s, {n} concurrent clients, no rate limits, Fly wait second {} ms, extra env {:?}):",
        boot.as_secs_f64(),
        args.in_flight_wait_second_ms,
        args.dispatcher_env
    );
    println!(
        "  dispatcher resident set: idle {} MiB, peak {} MiB (VmHWM; sampled {:.1} MiB at {:.1} s), {per_start} KiB per start above idle, {} MiB after",
        mib(idle),
        mib(hwm),
        sampled as f64 / 1024.0,
        sampled_at.as_secs_f64(),
        mib(after)
    );
    println!(
        "  {}/{n} ok, start p50 {:.0} ms, p99 {:.0} ms{}; dispatcher log {}",
        times.len(),
        times.first().map_or(0.0, |_| ms(percentile(&times, 0.5))),
        times.first().map_or(0.0, |_| ms(percentile(&times, 0.99))),
        first_error.map_or(String::new(), |e| format!("; first error {e:?}")),
        child.log.display()
    );
    child.stop().await;
}

#[tokio::main]
async fn main() {
    let args = Args::parse();
    if !args.open_loop.is_empty() || args.in_flight.is_some() {
        open_loop_and_memory(&args).await;
        return;
    }
    let sessions = args.sessions;
    let concurrency = args.concurrency;

    if !args.warm_only {
        // 1. Overhead.
        let (fly, daily) = fakes(Duration::ZERO).await;
        let (app, base) = dispatcher(&fly, &daily, &[], false).await;
        let token = app
            .auth
            .mint("bench", Duration::from_secs(3600), None)
            .unwrap();
        run(&base, &token, 20, 4).await; // warm-up: connection pools, lazy statics
        let t = Instant::now();
        let times = run(&base, &token, sessions, concurrency).await;
        let wall = t.elapsed();
        println!(
            "overhead: {sessions} starts, concurrency {concurrency}: p50 {:.2} ms, p90 {:.2} ms, p99 {:.2} ms, max {:.2} ms; {:.0} starts/s",
            ms(percentile(&times, 0.5)),
            ms(percentile(&times, 0.9)),
            ms(percentile(&times, 0.99)),
            ms(*times.last().unwrap()),
            sessions as f64 / wall.as_secs_f64()
        );
        println!(
            "  (each start = Daily room create + Fly create + Fly wait over loopback HTTP to the fakes, JWT verify, 2 token signatures)"
        );

        // 2. Critical path: max(R, B) not R + B.
        for (boot_ms, room_ms) in [(800u64, 300u64), (300, 800), (1000, 1000)] {
            let (fly, daily) = fakes(Duration::from_millis(boot_ms)).await;
            daily.set_create_delay(Duration::from_millis(room_ms));
            let (app, base) = dispatcher(&fly, &daily, &[], false).await;
            let token = app
                .auth
                .mint("bench", Duration::from_secs(3600), None)
                .unwrap();
            let times = run(&base, &token, 5, 1).await;
            println!(
                "critical path: boot B = {boot_ms} ms, room R = {room_ms} ms: median start {:.0} ms (max(R, B) = {} ms, R + B = {} ms)",
                ms(percentile(&times, 0.5)),
                boot_ms.max(room_ms),
                boot_ms + room_ms
            );
        }

        // 3. Memory.
        if let Some(rss) = proc_status_kib("VmRSS:") {
            println!(
                "memory: resident set {:.1} MiB after {} starts (dispatcher and both fakes in one process)",
                rss as f64 / 1024.0,
                sessions + 35
            );
        }
    }

    // 4. Warm starts.
    let lat = latencies(&args);
    println!(
        "warm starts: {} per mode, {} at a time; create {} ms, boot {} ms, start {} ms, resume {} ms, app boot {} ms, room {} ms; reserve {}",
        args.samples,
        args.parallel,
        args.create_ms,
        args.boot_ms,
        args.start_ms,
        args.resume_ms,
        args.app_boot_ms,
        args.room_ms,
        args.reserve
    );
    println!(
        "  (warm modes: before each round the bench waits until the fake shows that many ready reserve machines and the room pool as many rooms, then {} ms for the dispatcher's listing, so each sample measures a warm start; not warm = samples of another startType)",
        LISTING_SLACK.as_millis()
    );
    println!(
        "  (start = POST /start until the answer; talk = until the bot can talk: the fake's /bot delivery (http), start + app boot (env); path = configured delays on the critical path; overhead = talk - path; all in ms)"
    );
    let mut results = Vec::new();
    for mode in &args.modes {
        results.push(bench_mode(*mode, &lat, &args).await);
    }
    print_results(&results, &lat);
    if let Some(peak) = proc_status_kib("VmHWM:") {
        println!(
            "memory: peak resident set {:.1} MiB (VmHWM, whole run)",
            peak as f64 / 1024.0
        );
    }
}

fn latencies(args: &Args) -> Latencies {
    Latencies {
        create: Duration::from_millis(args.create_ms),
        boot: Duration::from_millis(args.boot_ms),
        start: Duration::from_millis(args.start_ms),
        resume: Duration::from_millis(args.resume_ms),
        app_boot: Duration::from_millis(args.app_boot_ms),
        room: Duration::from_millis(args.room_ms),
    }
}

/// Parts 5 and 6.
async fn open_loop_and_memory(args: &Args) {
    let lat = latencies(args);
    let bin = args
        .dispatcher_bin
        .clone()
        .unwrap_or_else(child::default_bin);
    let cases = Case::from_args(&args.open_loop);
    if !cases.is_empty() {
        println!(
            "open loop: {} arrivals/s for {:.0} s, sessions of {} s; Fly and Daily limits enforced in front of the fakes; create {} ms, boot {} ms, start {} ms, resume {} ms, app boot {} ms, room {} ms; recycle cases: reserve {} (hot), {} (suspended), {} (stopped) over {} apps, reserve pass every {} ms{}",
            args.rate,
            open_duration(args),
            args.session_secs,
            args.create_ms,
            args.boot_ms,
            args.start_ms,
            args.resume_ms,
            args.app_boot_ms,
            args.room_ms,
            reserve_size(args, "hot"),
            reserve_size(args, "suspended"),
            reserve_size(args, "stopped"),
            args.reserve_apps,
            args.reserve_interval_ms,
            if args.dispatcher_env.is_empty() {
                String::new()
            } else {
                format!("; dispatcher env {:?}", args.dispatcher_env)
            }
        );
        println!(
            "  (sustained = successful starts per second between the first and the last successful answer; start = POST /start (wait: true) until its answer; talk = until the bot can talk: the /bot delivery the fake recorded (http), start + app boot (env); 429s = calls the fakes' limits refused; idle m·s = reserve machines ready and unclaimed, integrated over the arrivals; RSS = the dispatcher's peak resident set (VmHWM), before = at the first arrival)"
        );
        let mut results = Vec::new();
        for case in cases {
            let r = open_loop_case(case, &lat, args, &bin).await;
            print_open_results(std::slice::from_ref(&r));
            results.push(r);
        }
        if results.len() > 1 {
            println!("open loop, all cases:");
            print_open_results(&results);
        }
    }
    if let Some(n) = args.in_flight {
        in_flight(
            n,
            Duration::from_millis(args.in_flight_boot_ms),
            &lat,
            args,
            &bin,
        )
        .await;
    }
}
