//! Start-latency benchmark against the local fakes: prints figures, asserts nothing.
//!
//! `cargo run --release --all-features --example bench -- [sessions] [concurrency] [flags]`
//! (the example needs the `providers/testkit` feature).
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
    let fly = FakeFly::start_with(
        FakeFlyConfig {
            token: "bench-fly".into(),
            apps: vec!["bots".into()],
            // The fake's boot timer starts when the create request arrives.
            boot_delay: lat.create + lat.boot,
            starting_for: Duration::ZERO,
            ..FakeFlyConfig::default()
        },
        FakeFlyWarmConfig {
            app_boot: lat.app_boot,
            start_delay: lat.start,
            resume_delay: lat.resume,
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
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    status
        .lines()
        .find(|l| l.starts_with(key))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
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
    let triple = |v: &[Duration]| {
        if v.is_empty() {
            return "-".to_owned();
        }
        format!(
            "{:.0} / {:.0} / {:.0}",
            ms(percentile(v, 0.5)),
            ms(percentile(v, 0.95)),
            ms(percentile(v, 0.99))
        )
    };
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

#[tokio::main]
async fn main() {
    let args = Args::parse();
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
    let lat = Latencies {
        create: Duration::from_millis(args.create_ms),
        boot: Duration::from_millis(args.boot_ms),
        start: Duration::from_millis(args.start_ms),
        resume: Duration::from_millis(args.resume_ms),
        app_boot: Duration::from_millis(args.app_boot_ms),
        room: Duration::from_millis(args.room_ms),
    };
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
