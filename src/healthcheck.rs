//! `botdispatch healthcheck`: one GET of the running server's own `/healthz` (or `/readyz`),
//! for platforms whose container health check runs a command inside the image (Docker
//! `HEALTHCHECK`, ECS `healthCheck`, Kubernetes `exec` probes). The dispatcher image has no
//! curl or wget; this subcommand is the probe.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::Path;
use std::time::Duration;

use crate::config::Config;

/// Exit status of a healthy probe.
pub const EXIT_HEALTHY: i32 = 0;
/// Exit status of an unhealthy probe (Docker reads any status but 0 as unhealthy; 1 is the
/// documented one).
pub const EXIT_UNHEALTHY: i32 = 1;

/// The URL of `path` on a server listening on `listen`. A server bound to every interface
/// (`0.0.0.0`, `::`) is reached on loopback: the probe runs inside the same container.
pub fn local_url(listen: SocketAddr, path: &str) -> String {
    let ip = match listen.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
        IpAddr::V6(ip) if ip.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
        ip => ip,
    };
    format!("http://{}{path}", SocketAddr::new(ip, listen.port()))
}

/// One GET of `url` within `timeout`: `Ok` with a one-line summary on a 2xx answer, `Err` with
/// the reason otherwise (refused connection, timeout, non-2xx status and its body's start).
pub async fn probe(url: &str, timeout: Duration) -> Result<String, String> {
    let http = reqwest::Client::builder()
        .timeout(timeout)
        .no_proxy()
        .build()
        .map_err(|e| format!("cannot build the HTTP client: {e}"))?;
    let resp = http
        .get(url)
        .send()
        .await
        .map_err(|e| format!("{url}: {}", describe(&e, timeout)))?;
    let status = resp.status();
    let body: String = resp
        .text()
        .await
        .unwrap_or_default()
        .chars()
        .take(200)
        .collect();
    if status.is_success() {
        Ok(format!("{url}: {status} {body}"))
    } else {
        Err(format!("{url}: {status} {body}"))
    }
}

fn describe(error: &reqwest::Error, timeout: Duration) -> String {
    if error.is_timeout() {
        format!("no answer within {timeout:?}")
    } else if error.is_connect() {
        "connection refused (is botdispatch serving on this address?)".to_owned()
    } else {
        error.to_string()
    }
}

/// The subcommand: probes `url`, or `/healthz` (`/readyz` when `ready`) of the address the
/// configuration listens on; prints one line and answers the exit status.
pub async fn run(
    config_path: Option<&Path>,
    ready: bool,
    url: Option<String>,
    timeout: Duration,
) -> i32 {
    let url = match url {
        Some(url) => url,
        None => {
            let listen = Config::load(config_path, &|name| std::env::var(name).ok())
                .map_err(|e| e.to_string())
                .and_then(|config| config.listen_addr().map_err(|e| e.to_string()));
            match listen {
                Ok(addr) => local_url(addr, if ready { "/readyz" } else { "/healthz" }),
                Err(e) => {
                    println!("unhealthy: configuration: {e}");
                    return EXIT_UNHEALTHY;
                }
            }
        }
    };
    match probe(&url, timeout).await {
        Ok(summary) => {
            println!("healthy: {summary}");
            EXIT_HEALTHY
        }
        Err(reason) => {
            println!("unhealthy: {reason}");
            EXIT_UNHEALTHY
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::StatusCode;
    use axum::routing::get;

    #[test]
    fn unspecified_addresses_are_reached_on_loopback() {
        let url = |listen: &str| local_url(listen.parse().unwrap(), "/healthz");
        assert_eq!(url("0.0.0.0:7860"), "http://127.0.0.1:7860/healthz");
        assert_eq!(url("[::]:7860"), "http://[::1]:7860/healthz");
        assert_eq!(url("127.0.0.1:9000"), "http://127.0.0.1:9000/healthz");
        assert_eq!(url("10.1.2.3:7860"), "http://10.1.2.3:7860/healthz");
    }

    async fn server(status: StatusCode) -> String {
        let router = axum::Router::new().route(
            "/healthz",
            get(move || async move { (status, "{\"status\":\"x\"}") }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, router).await });
        local_url(addr, "/healthz")
    }

    #[tokio::test]
    async fn a_2xx_answer_is_healthy() {
        let url = server(StatusCode::OK).await;
        let summary = probe(&url, Duration::from_secs(2)).await.unwrap();
        assert!(summary.contains("200 OK"), "{summary}");
    }

    #[tokio::test]
    async fn an_error_status_is_unhealthy() {
        let url = server(StatusCode::SERVICE_UNAVAILABLE).await;
        let reason = probe(&url, Duration::from_secs(2)).await.unwrap_err();
        assert!(reason.contains("503"), "{reason}");
    }

    #[tokio::test]
    async fn nothing_listening_is_unhealthy() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        drop(listener);
        let reason = probe(&local_url(addr, "/healthz"), Duration::from_secs(2))
            .await
            .unwrap_err();
        assert!(reason.contains("connection refused"), "{reason}");
    }

    #[tokio::test]
    async fn a_server_that_never_answers_is_unhealthy_after_the_timeout() {
        // Accepts the connection, never answers.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((conn, _)) = listener.accept().await {
                held.push(conn);
            }
        });
        let reason = probe(&local_url(addr, "/healthz"), Duration::from_millis(300))
            .await
            .unwrap_err();
        assert!(reason.contains("no answer within"), "{reason}");
    }
}
