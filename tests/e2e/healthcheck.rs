//! `botdispatch healthcheck`, the container probe: the real binary against a real server.

use std::process::Output;

use crate::common::TestEnv;

/// Runs the binary with only `vars` in its environment (plus PATH).
async fn healthcheck(args: &[&str], vars: &[(&str, &str)]) -> Output {
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_botdispatch"));
    cmd.arg("healthcheck").args(args).env_clear();
    if let Ok(path) = std::env::var("PATH") {
        cmd.env("PATH", path);
    }
    cmd.envs(vars.iter().copied());
    cmd.output().await.expect("the binary runs")
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[tokio::test]
async fn a_serving_dispatcher_is_healthy() {
    let env = TestEnv::start().await;
    let listen = env.base.trim_start_matches("http://");
    // The address comes from the configuration, as in the image (BOTDISPATCH_LISTEN).
    let out = healthcheck(&[], &[("BOTDISPATCH_LISTEN", listen)]).await;
    assert_eq!(out.status.code(), Some(0), "{}", stdout(&out));
    assert!(stdout(&out).starts_with("healthy: "), "{}", stdout(&out));
    assert!(stdout(&out).contains("/healthz"), "{}", stdout(&out));

    let ready = healthcheck(&["--ready"], &[("BOTDISPATCH_LISTEN", listen)]).await;
    assert_eq!(ready.status.code(), Some(0), "{}", stdout(&ready));
    assert!(stdout(&ready).contains("/readyz"), "{}", stdout(&ready));

    let url = format!("{}/healthz", env.base);
    let explicit = healthcheck(&["--url", &url], &[]).await;
    assert_eq!(explicit.status.code(), Some(0), "{}", stdout(&explicit));
}

#[tokio::test]
async fn no_server_is_unhealthy() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    drop(listener);
    let out = healthcheck(&["--timeout", "2s"], &[("BOTDISPATCH_LISTEN", &addr)]).await;
    assert_eq!(out.status.code(), Some(1), "{}", stdout(&out));
    assert!(stdout(&out).starts_with("unhealthy: "), "{}", stdout(&out));
}

#[tokio::test]
async fn an_unready_dispatcher_fails_the_ready_probe_only() {
    let env = TestEnv::start().await;
    // Daily starts refusing the key after the boot: /readyz fails, /healthz does not.
    env.daily.set_fault(
        providers::testkit::daily_fake::DailyOp::Domain,
        providers::testkit::Fault::Status {
            status: 401,
            retry_after: None,
        },
        1000,
    );
    let listen = env.base.trim_start_matches("http://");
    let live = healthcheck(&[], &[("BOTDISPATCH_LISTEN", listen)]).await;
    assert_eq!(live.status.code(), Some(0), "{}", stdout(&live));
    let ready = healthcheck(&["--ready"], &[("BOTDISPATCH_LISTEN", listen)]).await;
    assert_eq!(ready.status.code(), Some(1), "{}", stdout(&ready));
    assert!(stdout(&ready).contains("503"), "{}", stdout(&ready));
}

#[tokio::test]
async fn a_bad_configuration_is_unhealthy_and_says_why() {
    let out = healthcheck(&[], &[("BOTDISPATCH_LISTEN", "not-an-address")]).await;
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stdout(&out).contains("BOTDISPATCH_LISTEN"),
        "{}",
        stdout(&out)
    );
}
