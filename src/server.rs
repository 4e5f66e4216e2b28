//! The HTTP/1.1 server loop: hyper with limits axum's `serve` does not expose (a deadline for
//! request headers, a cap on their size), and graceful shutdown that lets in-flight requests
//! finish while refusing new connections, for at most a drain time: a slow client cannot hold
//! a deploy.

use std::future::Future;
use std::time::Duration;

use axum::Router;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tower::ServiceExt;

/// Limits on what a client may make the server wait for or buffer.
#[derive(Debug, Clone, Copy)]
pub struct ServerLimits {
    /// A client must send its complete request head within this time (slowloris).
    pub header_read_timeout: Duration,
    /// Most bytes of request head buffered; larger heads get 431.
    pub max_header_bytes: usize,
    /// After shutdown begins, how long open connections may take to finish; those still open
    /// then are dropped.
    pub drain: Duration,
}

impl Default for ServerLimits {
    fn default() -> Self {
        Self {
            header_read_timeout: Duration::from_secs(10),
            max_header_bytes: 16 * 1024,
            drain: Duration::from_secs(30),
        }
    }
}

/// Replaces the request's URI and header values with copies of their own.
///
/// hyper parses them as slices of the connection's 8 KiB read buffer, so the whole buffer
/// lives as long as the request does — for a start, until its machine has booted — and hyper
/// allocates a second one for the connection's next read. With the head copied (a few hundred
/// bytes), hyper reads on into the buffer it has: with 1,000 starts in flight that is 8 MB
/// less.
fn detach_head<B>(req: &mut hyper::Request<B>) {
    if let Ok(uri) = hyper::Uri::try_from(req.uri().to_string()) {
        *req.uri_mut() = uri;
    }
    for value in req.headers_mut().values_mut() {
        if let Ok(mut copy) = hyper::header::HeaderValue::from_bytes(value.as_bytes()) {
            copy.set_sensitive(value.is_sensitive());
            *value = copy;
        }
    }
}

/// Serves `router` on `listener` until `shutdown` resolves, then stops accepting and waits for
/// the open connections' requests to finish, at most `limits.drain`.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    limits: ServerLimits,
    shutdown: impl Future<Output = ()>,
) {
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .max_buf_size(limits.max_header_bytes.max(8192));
    let graceful = GracefulShutdown::new();
    tokio::pin!(shutdown);
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let _ = stream.set_nodelay(true);
        let service = TowerToHyperService::new(router.clone().map_request(
            move |req: hyper::Request<Incoming>| {
                // The peer's address, for the session proxy's X-Forwarded-For.
                let mut req = req.map(axum::body::Body::new);
                detach_head(&mut req);
                req.extensions_mut()
                    .insert(axum::extract::ConnectInfo(peer));
                req
            },
        ));
        let conn = http.serve_connection(TokioIo::new(stream), service);
        let conn = graceful.watch(conn);
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "connection ended with an error");
            }
        });
    }
    drop(listener);
    if tokio::time::timeout(limits.drain, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!(
            drain_secs = limits.drain.as_secs(),
            "connections still open after the drain time: closing them"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_detached_head_reads_the_same() {
        let mut req = hyper::Request::post("/start?agent=support")
            .header("authorization", "Bearer abc")
            .header("x-custom", "é")
            .body(())
            .unwrap();
        req.headers_mut()
            .get_mut("authorization")
            .unwrap()
            .set_sensitive(true);
        let before = req.headers().clone();
        detach_head(&mut req);
        assert_eq!(req.uri(), "/start?agent=support");
        assert_eq!(req.headers(), &before);
        assert!(req.headers()["authorization"].is_sensitive());
    }
}
