//! `botdispatch example-bot`: the bot the embedded default runs, in both handoff modes.
//!
//! * `env` (the session is in the environment: `BOTDISPATCH_SESSION_ID` is set): prints the
//!   contract it received and stays "in the call" for `BOT_LIFETIME_SECS` or until SIGTERM.
//! * `http` (`PORT` and `BOTDISPATCH_HANDOFF_SECRET` are set): after `BOT_STARTUP_MS` of
//!   "start-up" (a real bot's imports and pipeline set-up) it answers `GET /readyz` 200, takes
//!   exactly one session with `POST /bot` (bearer = its handoff secret; a second session is
//!   refused with 409), answers `/bot` when that session ends, then exits. Like the Pipecat
//!   Cloud base image's server, a first SIGTERM stops it taking sessions but lets the running
//!   one finish; a second one (a stop) ends the session at once.
//!
//! The meeting token is a secret: only its length is printed.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::{get, post};
use axum::Router;
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::{watch, Notify};

/// How the session ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum End {
    Running,
    Lifetime,
    Stopped,
}

struct Bot {
    secret: String,
    lifetime: Duration,
    ready: AtomicBool,
    taken: AtomicBool,
    /// Set by the first SIGTERM: no session may start any more.
    closing: AtomicBool,
    /// Set by a SIGTERM while a session runs after the first one: leave now.
    stop_now: Notify,
    end: watch::Sender<End>,
}

/// Runs the example bot; returns when it should exit.
pub async fn run() -> anyhow::Result<()> {
    let env = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
    let lifetime = Duration::from_secs(
        env("BOT_LIFETIME_SECS")
            .and_then(|v| v.parse().ok())
            .unwrap_or(60),
    );
    if let Some(key) = env("BOTDISPATCH_SESSION_ID") {
        return run_env_mode(&key, lifetime).await;
    }
    let port: u16 = env("PORT")
        .context(
            "the example bot needs BOTDISPATCH_SESSION_ID (env handoff) or PORT (http handoff)",
        )?
        .parse()
        .context("PORT is not a port number")?;
    let secret =
        env("BOTDISPATCH_HANDOFF_SECRET").context("BOTDISPATCH_HANDOFF_SECRET is not set")?;
    let startup = Duration::from_millis(
        env("BOT_STARTUP_MS")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0),
    );
    let host = env("BOT_HOST").unwrap_or_else(|| "127.0.0.1".to_owned());
    run_http_mode(&host, port, secret, startup, lifetime).await
}

async fn run_env_mode(key: &str, lifetime: Duration) -> anyhow::Result<()> {
    let var = |name: &str| std::env::var(name).unwrap_or_default();
    let room = std::env::var("DAILY_ROOM_URL").unwrap_or_else(|_| "<none>".to_owned());
    println!("[local-bot {key}] started: DAILY_ROOM_URL={room}");
    println!(
        "[local-bot {key}] DAILY_ROOM_TOKEN: {} characters (not printed)",
        var("DAILY_ROOM_TOKEN").len()
    );
    println!(
        "[local-bot {key}] BOTDISPATCH_BODY={}",
        var("BOTDISPATCH_BODY")
    );
    let mut term = signal(SignalKind::terminate())?;
    tokio::select! {
        _ = term.recv() => println!("[local-bot {key}] SIGTERM: leaving the room"),
        () = tokio::time::sleep(lifetime) => println!("[local-bot {key}] lifetime over: leaving the room"),
    }
    Ok(())
}

async fn run_http_mode(
    host: &str,
    port: u16,
    secret: String,
    startup: Duration,
    lifetime: Duration,
) -> anyhow::Result<()> {
    let bot = Arc::new(Bot {
        secret,
        lifetime,
        ready: AtomicBool::new(false),
        taken: AtomicBool::new(false),
        closing: AtomicBool::new(false),
        stop_now: Notify::new(),
        end: watch::channel(End::Running).0,
    });
    let listener = tokio::net::TcpListener::bind((host, port))
        .await
        .with_context(|| format!("cannot listen on {host}:{port}"))?;
    let app = Router::new()
        .route("/readyz", get(readyz))
        .route("/bot", post(take_session))
        .with_state(Arc::clone(&bot));
    // "Start-up": what a real bot does before it can talk (imports, models, pipeline).
    let warmup = {
        let bot = Arc::clone(&bot);
        async move {
            tokio::time::sleep(startup).await;
            bot.ready.store(true, Ordering::SeqCst);
        }
    };
    tokio::spawn(warmup);
    let mut term = signal(SignalKind::terminate())?;
    let mut ended = bot.end.subscribe();
    let signals = {
        let bot = Arc::clone(&bot);
        async move {
            // First SIGTERM: no further session; exit now if none is running.
            term.recv().await;
            bot.closing.store(true, Ordering::SeqCst);
            if !bot.taken.load(Ordering::SeqCst) {
                println!("[local-bot -] SIGTERM before any session: exiting");
                return;
            }
            println!("[local-bot -] SIGTERM: no further sessions in this boot; the call goes on");
            // Second SIGTERM: a stop. Leave the room now.
            term.recv().await;
            bot.stop_now.notify_one();
            let _ = ended.wait_for(|e| *e != End::Running).await;
        }
    };
    let mut done = bot.end.subscribe();
    let session_over = async move {
        let _ = done.wait_for(|e| *e != End::Running).await;
    };
    let server = axum::serve(listener, app).with_graceful_shutdown(async move {
        tokio::select! {
            () = signals => {},
            () = session_over => {},
        }
        // Open keep-alive connections get a moment to close; then the bot exits regardless.
        tokio::spawn(async {
            tokio::time::sleep(Duration::from_secs(2)).await;
            std::process::exit(0);
        });
    });
    server.await.context("the example bot's server failed")?;
    Ok(())
}

async fn readyz(State(bot): State<Arc<Bot>>) -> StatusCode {
    if bot.ready.load(Ordering::SeqCst) && !bot.closing.load(Ordering::SeqCst) {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    }
}

/// `POST /bot`: one session per boot, answered when it ends.
async fn take_session(
    State(bot): State<Arc<Bot>>,
    headers: HeaderMap,
    body: String,
) -> (StatusCode, &'static str) {
    let header = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned()
    };
    let presented = header("authorization");
    let presented = presented.strip_prefix("Bearer ").unwrap_or_default();
    if !same_secret(presented.as_bytes(), bot.secret.as_bytes()) {
        return (StatusCode::UNAUTHORIZED, "wrong handoff secret\n");
    }
    if !bot.ready.load(Ordering::SeqCst) {
        return (StatusCode::SERVICE_UNAVAILABLE, "not ready\n");
    }
    if bot.closing.load(Ordering::SeqCst) || bot.taken.swap(true, Ordering::SeqCst) {
        return (StatusCode::CONFLICT, "this boot has had its session\n");
    }
    let key = header("x-daily-session-id");
    let room = Some(header("x-daily-room-url")).filter(|r| !r.is_empty());
    println!(
        "[local-bot {key}] started: DAILY_ROOM_URL={}",
        room.as_deref().unwrap_or("<none>")
    );
    println!(
        "[local-bot {key}] DAILY_ROOM_TOKEN: {} characters (not printed)",
        header("x-daily-room-token").len()
    );
    println!("[local-bot {key}] BOTDISPATCH_BODY={body}");
    // The session runs in its own task: a client that disconnects does not end it.
    let session = tokio::spawn(async move {
        let end = tokio::select! {
            () = tokio::time::sleep(bot.lifetime) => {
                println!("[local-bot {key}] lifetime over: leaving the room");
                End::Lifetime
            }
            () = bot.stop_now.notified() => {
                println!("[local-bot {key}] SIGTERM: leaving the room");
                End::Stopped
            }
        };
        bot.end.send_replace(end);
    });
    let _ = session.await;
    (StatusCode::OK, "session over\n")
}

/// Compares secrets in time independent of where they differ.
fn same_secret(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}
