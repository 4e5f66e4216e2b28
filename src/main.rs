//! The `botdispatch` binary: CLI, config, tracing, serve with graceful shutdown.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};

use botdispatch::auth::Authenticator;
use botdispatch::config::Config;
use botdispatch::server::{self, ServerLimits};
use botdispatch::{app, build_router, telemetry, App, AppState};

#[derive(Parser)]
#[command(
    name = "botdispatch",
    version,
    about = "Starts one isolated bot machine per voice-AI session.",
    long_about = "Starts one isolated bot machine per voice-AI session: authenticates POST /start, \
creates a Daily room and tokens, launches the bot on the configured provider and answers with \
the join URL. With no configuration it runs locally: bots are child processes, rooms are fake.",
    after_help = "Examples:\n  \
botdispatch                                         run locally; prints a ready-to-paste curl command\n  \
botdispatch --config examples/fly.toml check        validate config and credentials before deploying\n  \
BOTDISPATCH_JWT_SECRET=... botdispatch token --sub alice --ttl 1h\n\n\
Configuration keys and their environment variables: README.md (Configuration)."
)]
struct Cli {
    /// TOML config file (environment variables override it).
    #[arg(long, env = "BOTDISPATCH_CONFIG", global = true)]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Serve the HTTP API (the default).
    Serve,
    /// Mint a bearer token from the configured BOTDISPATCH_JWT_SECRET.
    Token {
        /// The caller's identity (JWT `sub`); sessions are owned by it.
        #[arg(long)]
        sub: String,
        /// How long the token is valid, e.g. 30m, 1h, 7d.
        #[arg(long, default_value = "1h")]
        ttl: humantime::Duration,
        /// Space-separated scopes, e.g. "agent:support" or "sessions:read_any".
        #[arg(long)]
        scope: Option<String>,
    },
    /// Check the configuration and each credential (Daily, provider) with one read-only call;
    /// prints a PASS/FAIL table and exits non-zero if anything fails.
    Check,
    /// Run the example bot (what the embedded default's agent runs): the session from its
    /// environment, or, with PORT set, over HTTP (GET /readyz, POST /bot).
    ExampleBot,
    /// Print this API's OpenAPI 3.1 document (the source of docs/openapi.json).
    Openapi,
    /// Probe the running server's GET /healthz (or /readyz) on its listen address; exit 0 when
    /// it answers 2xx, 1 otherwise. For container HEALTHCHECKs: the image has no curl.
    Healthcheck {
        /// Probe /readyz (provider and Daily credentials usable) instead of /healthz.
        #[arg(long)]
        ready: bool,
        /// Probe this URL instead of the configured listen address.
        #[arg(long)]
        url: Option<String>,
        /// Give up after this long, e.g. 2s.
        #[arg(long, default_value = "3s")]
        timeout: humantime::Duration,
    },
}

fn load_config(path: Option<&std::path::Path>) -> anyhow::Result<Config> {
    Ok(Config::load(path, &|name| std::env::var(name).ok())?)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command.unwrap_or(Command::Serve) {
        Command::Serve => serve(cli.config).await,
        Command::Token { sub, ttl, scope } => {
            let config = load_config(cli.config.as_deref())?;
            anyhow::ensure!(
                config.auth.jwt_secret.is_some(),
                "set BOTDISPATCH_JWT_SECRET (or auth.jwt_secret) to mint tokens; \
                 the embedded default prints a development token when it starts"
            );
            let auth = Authenticator::new(&config.auth, config.auth.jwt_secret.as_ref())?;
            println!("{}", auth.mint(&sub, ttl.into(), scope.as_deref())?);
            Ok(())
        }
        Command::Check => {
            let config = match load_config(cli.config.as_deref()) {
                Ok(c) => c,
                Err(e) => {
                    println!("FAIL  {:<22} {e}", "configuration");
                    std::process::exit(1);
                }
            };
            let rows = botdispatch::check::run(&config, app::http_client()?).await;
            for row in &rows {
                println!("{row}");
            }
            if rows.iter().any(|r| !r.ok) {
                std::process::exit(1);
            }
            Ok(())
        }
        Command::ExampleBot => botdispatch::example_bot::run().await,
        Command::Openapi => {
            print!("{}", botdispatch::api::openapi::document());
            Ok(())
        }
        Command::Healthcheck {
            ready,
            url,
            timeout,
        } => std::process::exit(
            botdispatch::healthcheck::run(cli.config.as_deref(), ready, url, timeout.into()).await,
        ),
    }
}

async fn serve(config_path: Option<PathBuf>) -> anyhow::Result<()> {
    let mut config = load_config(config_path.as_deref())?;
    let generated_secret = config.fill_dev_secrets();
    telemetry::init();
    let addr = config.listen_addr()?;
    anyhow::ensure!(
        !generated_secret || addr.ip().is_loopback(),
        "listen (BOTDISPATCH_LISTEN) = {addr} is reachable from other machines, but no JWT secret is configured: \
         the generated development secret is for this machine only. Set BOTDISPATCH_JWT_SECRET \
         (or auth.jwt_public_key_file), or listen on 127.0.0.1"
    );
    // Time for cancelled starts to destroy what they created, after the grace period.
    let shutdown_cleanup = config.request_timeout() * 3;
    let app = Arc::new(App::build(config, app::http_client()?).await?);
    let state = AppState(app.clone());
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot listen on {addr}"))?;
    let local = listener.local_addr()?;
    tracing::info!(
        listen = %local,
        provider = app.sessions.provider().name(),
        rooms = app.sessions.rooms().kind(),
        "botdispatch ready"
    );
    if generated_secret {
        print_dev_banner(&app, local)?;
    }

    app.spawn_background();
    let grace = app.config.shutdown_grace();
    let limits = ServerLimits {
        header_read_timeout: Duration::from_secs(app.config.header_read_timeout_secs),
        // In-flight starts answer within the grace period (503 once it is over): a connection
        // still open a little after that is a slow client, not a start.
        drain: grace + Duration::from_secs(2),
        ..ServerLimits::default()
    };
    let shutdown = {
        let app = app.clone();
        async move {
            shutdown_signal().await;
            // From here no new connection is accepted. In-flight starts get the grace period to
            // finish; after it they are cancelled, clean up what they created and answer 503.
            tokio::spawn(async move {
                tokio::time::sleep(grace).await;
                if app.sessions.starts_in_flight() > 0 {
                    tracing::warn!(
                        grace_secs = grace.as_secs(),
                        "grace period over: cancelling in-flight starts"
                    );
                }
                app.shutdown.cancel();
            });
        }
    };
    server::serve(listener, build_router(state), limits, shutdown).await;

    // Background loops stop now; cancelled starts finish their clean-up.
    app.shutdown.cancel();
    app.tasks.close();
    if tokio::time::timeout(shutdown_cleanup, app.tasks.wait())
        .await
        .is_err()
    {
        tracing::warn!("clean-up still running after the grace period; exiting");
    }
    app.sessions.provider().shutdown().await;
    tracing::info!("botdispatch stopped");
    Ok(())
}

fn print_dev_banner(app: &App, addr: std::net::SocketAddr) -> anyhow::Result<()> {
    let token = app.auth.mint("dev", Duration::from_secs(3600), None)?;
    println!(
        "\nbotdispatch is running in development mode (local bots, fake rooms, generated JWT secret).\n\
         Start a session (this token is valid for one hour):\n\n  \
         curl -s -X POST http://{addr}/start -H 'Authorization: Bearer {token}' -H 'Content-Type: application/json' -d '{{\"body\": {{\"hello\": \"world\"}}}}'\n\n\
         Then GET or DELETE the statusUrl it returns with the same header.\n"
    );
    let reserve = app.sessions.reserves().and_then(|r| r.sets().next());
    if let Some(set) = reserve {
        println!(
            "The {} agent keeps {} bots booted and waiting (a {} reserve): the answer's startType says\n\
             whether yours came from it (\"{}\": it can talk at once) or was started for you (\"cold\":\n\
             it boots first). Each bot serves one session and exits after it.\n",
            set.agent,
            set.size,
            set.tier.as_str(),
            set.tier.as_str(),
        );
    }
    Ok(())
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending().await,
        }
    };
    tokio::select! {
        () = ctrl_c => {},
        () = term => {},
    }
    tracing::info!("shutdown signal received: no new requests; finishing in-flight starts");
}
