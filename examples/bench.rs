//! Start-latency benchmark against the local fakes: prints figures, asserts nothing.
//!
//! `cargo run --release --example bench [sessions] [concurrency]`
//!
//! 1. Dispatcher overhead: the fakes answer at once (no boot delay, no room latency), so the
//!    latency of `POST /start` is botdispatch's own work plus loopback HTTP to the fakes.
//! 2. Concurrency of the critical path: with boot delay B and room latency R, a start should
//!    take about max(R, create + B), not R + B.
//! 3. Resident memory of the process after the run.

use std::sync::Arc;
use std::time::{Duration, Instant};

use botdispatch::config::Config;
use botdispatch::server::{serve, ServerLimits};
use botdispatch::{app, build_router, App, AppState};
use providers::testkit::daily_fake::{FakeDaily, FakeDailyConfig};
use providers::testkit::fly_fake::{FakeFly, FakeFlyConfig};
use serde_json::json;

const SECRET: &str = "bench-secret-0123456789abcdef0123456789";

async fn dispatcher(fly: &FakeFly, daily: &FakeDaily) -> (Arc<App>, String) {
    let env = [
        ("BOTDISPATCH_PROVIDER", "fly".to_owned()),
        ("BOTDISPATCH_ROOMS", "daily".to_owned()),
        ("BOTDISPATCH_JWT_SECRET", SECRET.to_owned()),
        (
            "BOTDISPATCH_BOT_IMAGE",
            "registry.fly.io/bots:v1".to_owned(),
        ),
        ("BOTDISPATCH_OUTBOUND_RATE_SCALE", "0".to_owned()),
        ("BOTDISPATCH_STARTS_PER_MINUTE_PER_CALLER", "0".to_owned()),
        ("BOTDISPATCH_MAX_SESSIONS", "100000".to_owned()),
        ("BOTDISPATCH_MAX_STARTS_IN_FLIGHT", "1000".to_owned()),
        ("FLY_API_TOKEN", "bench-fly".to_owned()),
        ("FLY_APP_NAME", "bots".to_owned()),
        ("FLY_API_URL", fly.base_url()),
        ("DAILY_API_KEY", "bench-daily".to_owned()),
        ("DAILY_API_URL", daily.base_url()),
    ];
    let config = Config::parse("", &|k| {
        env.iter().find(|(n, _)| *n == k).map(|(_, v)| v.clone())
    })
    .unwrap();
    let app = Arc::new(
        App::build(config, app::http_client().unwrap())
            .await
            .unwrap(),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let router = build_router(AppState(app.clone()));
    tokio::spawn(serve(
        listener,
        router,
        ServerLimits::default(),
        std::future::pending(),
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

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

fn rss_kib() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

async fn run(base: &str, token: &str, sessions: usize, concurrency: usize) -> Vec<Duration> {
    let http = reqwest::Client::new();
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
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
            while next.fetch_add(1, std::sync::atomic::Ordering::Relaxed) < sessions {
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

#[tokio::main]
async fn main() {
    let args: Vec<usize> = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse().ok())
        .collect();
    let sessions = args.first().copied().unwrap_or(500);
    let concurrency = args.get(1).copied().unwrap_or(8);

    // 1. Overhead.
    let (fly, daily) = fakes(Duration::ZERO).await;
    let (app, base) = dispatcher(&fly, &daily).await;
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
        percentile(&times, 0.5).as_secs_f64() * 1e3,
        percentile(&times, 0.9).as_secs_f64() * 1e3,
        percentile(&times, 0.99).as_secs_f64() * 1e3,
        times.last().unwrap().as_secs_f64() * 1e3,
        sessions as f64 / wall.as_secs_f64()
    );
    println!(
        "  (each start = Daily room create + Fly create + Fly wait over loopback HTTP to the fakes, JWT verify, 2 token signatures)"
    );

    // 2. Critical path: max(R, B) not R + B.
    for (boot_ms, room_ms) in [(800u64, 300u64), (300, 800), (1000, 1000)] {
        let (fly, daily) = fakes(Duration::from_millis(boot_ms)).await;
        daily.set_create_delay(Duration::from_millis(room_ms));
        let (app, base) = dispatcher(&fly, &daily).await;
        let token = app
            .auth
            .mint("bench", Duration::from_secs(3600), None)
            .unwrap();
        let times = run(&base, &token, 5, 1).await;
        println!(
            "critical path: boot B = {boot_ms} ms, room R = {room_ms} ms: median start {:.0} ms (max(R, B) = {} ms, R + B = {} ms)",
            percentile(&times, 0.5).as_secs_f64() * 1e3,
            boot_ms.max(room_ms),
            boot_ms + room_ms
        );
    }

    if let Some(rss) = rss_kib() {
        println!(
            "memory: resident set {:.1} MiB after {} starts (dispatcher and both fakes in one process)",
            rss as f64 / 1024.0,
            sessions + 35
        );
    }
}
