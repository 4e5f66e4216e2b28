//! Fault injection shared by the fakes: the [`Fault`] enum, per-operation fault queues, request
//! recording, and the HTTP server plumbing that lets a handler reset its TCP connection.

use std::collections::{HashMap, VecDeque};
use std::hash::Hash;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::extract::connect_info::Connected;
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::serve::{IncomingStream, Listener};
use axum::Router;
use serde_json::Value;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

/// A misbehaviour injected into the next requests of one operation of a fake
/// (see `FakeFly::set_fault` and `FakeDaily::set_fault`).
///
/// Faults are applied after the request passed spec validation and authentication, so a client
/// bug is still reported as such while a fault is armed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fault {
    /// Answer `status` with the API's usual error body (and `Retry-After: <seconds>` when
    /// `retry_after` is set). Nothing happens server-side.
    Status {
        /// HTTP status to answer.
        status: u16,
        /// Value of the `Retry-After` header, in seconds.
        retry_after: Option<u64>,
    },
    /// Perform the operation (for a create: the resource exists afterwards), then answer
    /// `status` with an error body anyway, as an API does when it fails after committing.
    GhostCreate {
        /// HTTP status to answer.
        status: u16,
    },
    /// Sleep this long, then handle the request normally.
    Stall(Duration),
    /// Close the TCP connection with a reset, without answering and without performing the
    /// operation. Recorded with status `0`.
    Reset,
}

/// One request seen by a fake, recorded when it was answered.
#[derive(Debug, Clone, PartialEq)]
pub struct RecordedRequest {
    /// HTTP method, uppercase (`"POST"`).
    pub method: String,
    /// Path as received, including any `/v1` prefix.
    pub path: String,
    /// Decoded query pairs, in order.
    pub query: Vec<(String, String)>,
    /// JSON body, if the request had a non-empty body that parsed as JSON.
    pub body: Option<Value>,
    /// Status answered; `0` when the connection was reset instead ([`Fault::Reset`]).
    pub status: u16,
}

/// Queues of armed faults, per operation. Each entry applies to the next `count` requests.
#[derive(Debug)]
pub(crate) struct FaultQueue<Op> {
    queues: HashMap<Op, VecDeque<(Fault, u32)>>,
}

impl<Op> Default for FaultQueue<Op> {
    fn default() -> Self {
        Self {
            queues: HashMap::new(),
        }
    }
}

impl<Op: Eq + Hash> FaultQueue<Op> {
    /// Arms `fault` for the next `count` requests of `op`, after any fault already armed for it.
    pub(crate) fn push(&mut self, op: Op, fault: Fault, count: u32) {
        if count > 0 {
            self.queues.entry(op).or_default().push_back((fault, count));
        }
    }

    /// Takes the fault that applies to the current request of `op`, if any.
    pub(crate) fn next(&mut self, op: Op) -> Option<Fault> {
        let queue = self.queues.get_mut(&op)?;
        let (fault, remaining) = queue.front_mut()?;
        let fault = fault.clone();
        *remaining -= 1;
        if *remaining == 0 {
            queue.pop_front();
        }
        Some(fault)
    }

    /// Disarms every fault.
    pub(crate) fn clear(&mut self) {
        self.queues.clear();
    }
}

/// What a fake answers: a JSON reply, or a connection reset.
#[derive(Debug)]
pub(crate) enum Reply {
    Json {
        status: u16,
        body: Value,
        retry_after: Option<u64>,
    },
    Reset,
}

impl Reply {
    pub(crate) fn json(status: u16, body: Value) -> Self {
        Self::Json {
            status,
            body,
            retry_after: None,
        }
    }

    /// Status to record: the HTTP status, or `0` for a reset.
    pub(crate) fn status(&self) -> u16 {
        match self {
            Self::Json { status, .. } => *status,
            Self::Reset => 0,
        }
    }

    /// Turns the reply into a response, resetting the connection if asked to.
    pub(crate) fn into_response(self, conn: &ConnControl) -> Response {
        match self {
            Self::Json {
                status,
                body,
                retry_after,
            } => {
                let status =
                    StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
                let mut response = (status, axum::Json(body)).into_response();
                if let Some(seconds) = retry_after {
                    response
                        .headers_mut()
                        .insert(header::RETRY_AFTER, HeaderValue::from(seconds));
                }
                response
            }
            Self::Reset => {
                // The response below is never seen: the connection fails on its first write.
                conn.reset();
                StatusCode::INTERNAL_SERVER_ERROR.into_response()
            }
        }
    }
}

/// Standard reason phrase for `status`, for error bodies.
pub(crate) fn reason(status: u16) -> &'static str {
    StatusCode::from_u16(status)
        .ok()
        .and_then(|s| s.canonical_reason())
        .unwrap_or("error")
}

/// Decodes a raw query string into pairs.
pub(crate) fn parse_query(raw: Option<&str>) -> Vec<(String, String)> {
    raw.map(|q| {
        url::form_urlencoded::parse(q.as_bytes())
            .into_owned()
            .collect()
    })
    .unwrap_or_default()
}

/// Per-connection switch that makes the connection fail with a TCP reset. Handlers get it with
/// `ConnectInfo<ConnControl>`.
#[derive(Debug, Clone, Default)]
pub(crate) struct ConnControl(Arc<AtomicBool>);

impl ConnControl {
    /// From now on every read and write on the connection fails, and the socket is closed with
    /// `SO_LINGER` 0, so the peer sees a reset instead of a response.
    pub(crate) fn reset(&self) {
        self.0.store(true, Ordering::SeqCst);
    }

    fn is_reset(&self) -> bool {
        self.0.load(Ordering::SeqCst)
    }
}

impl Connected<IncomingStream<'_, ResettableListener>> for ConnControl {
    fn connect_info(stream: IncomingStream<'_, ResettableListener>) -> Self {
        stream.io().control.clone()
    }
}

/// A TCP listener whose connections carry a [`ConnControl`].
#[derive(Debug)]
pub(crate) struct ResettableListener {
    inner: TcpListener,
}

impl Listener for ResettableListener {
    type Io = ResettableIo;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            match self.inner.accept().await {
                Ok((stream, addr)) => {
                    // Best effort: lower latency for small test requests.
                    let _ = stream.set_nodelay(true);
                    let io = ResettableIo {
                        stream,
                        control: ConnControl::default(),
                        lingering: false,
                    };
                    return (io, addr);
                }
                // Typically EMFILE: back off instead of spinning.
                Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
            }
        }
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        self.inner.local_addr()
    }
}

/// A TCP stream that starts failing once its [`ConnControl`] is reset.
#[derive(Debug)]
pub(crate) struct ResettableIo {
    stream: TcpStream,
    control: ConnControl,
    lingering: bool,
}

impl ResettableIo {
    fn check(&mut self) -> io::Result<()> {
        if !self.control.is_reset() {
            return Ok(());
        }
        if !self.lingering {
            // Linger 0: closing the socket sends RST rather than FIN.
            let _ = self.stream.set_zero_linger();
            self.lingering = true;
        }
        Err(io::Error::new(
            io::ErrorKind::ConnectionReset,
            "fault injection: connection reset",
        ))
    }
}

impl AsyncRead for ResettableIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        this.check()?;
        Pin::new(&mut this.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for ResettableIo {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        this.check()?;
        Pin::new(&mut this.stream).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        this.check()?;
        Pin::new(&mut this.stream).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        this.check()?;
        Pin::new(&mut this.stream).poll_shutdown(cx)
    }
}

/// A running fake server; stops accepting connections when dropped.
#[derive(Debug)]
pub(crate) struct ServerHandle {
    addr: SocketAddr,
    task: JoinHandle<()>,
}

impl ServerHandle {
    pub(crate) fn addr(&self) -> SocketAddr {
        self.addr
    }
}

impl Drop for ServerHandle {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Serves `router` on `127.0.0.1:<free port>` from a task on the current tokio runtime.
///
/// Handlers can extract `ConnectInfo<ConnControl>` to reset their connection.
///
/// # Panics
///
/// Panics outside a tokio runtime or if no local port can be bound.
pub(crate) async fn serve(router: Router) -> ServerHandle {
    let inner = TcpListener::bind(("127.0.0.1", 0))
        .await
        .expect("testkit: bind 127.0.0.1:0");
    let addr = inner.local_addr().expect("testkit: local address");
    let listener = ResettableListener { inner };
    let service = router.into_make_service_with_connect_info::<ConnControl>();
    let task = tokio::spawn(async move {
        if let Err(error) = axum::serve(listener, service).await {
            tracing::warn!(%error, "testkit fake server stopped");
        }
    });
    ServerHandle { addr, task }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fault_queue_applies_each_fault_count_times_in_order() {
        let mut queue = FaultQueue::default();
        queue.push("create", Fault::Reset, 2);
        queue.push("create", Fault::Stall(Duration::from_millis(1)), 1);
        queue.push("create", Fault::Reset, 0);
        assert_eq!(queue.next("get"), None);
        assert_eq!(queue.next("create"), Some(Fault::Reset));
        assert_eq!(queue.next("create"), Some(Fault::Reset));
        assert_eq!(
            queue.next("create"),
            Some(Fault::Stall(Duration::from_millis(1)))
        );
        assert_eq!(queue.next("create"), None);
        queue.push("get", Fault::Reset, 5);
        queue.clear();
        assert_eq!(queue.next("get"), None);
    }
}
