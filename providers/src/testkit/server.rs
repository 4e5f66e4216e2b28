//! The HTTP side every fake shares: [`FakeServer`] serves a fake's state on `127.0.0.1:0` and
//! stops when the last handle is dropped, [`Request`] is one incoming request as a fake sees it,
//! [`Reply`] is what a fake answers, and the listener plumbing that lets a handler reset its
//! TCP connection ([`Fault::Reset`](super::Fault::Reset)).

use std::io;
use std::net::SocketAddr;
use std::ops::Deref;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::connect_info::Connected;
use axum::extract::{ConnectInfo, FromRequest, FromRequestParts};
use axum::handler::Handler;
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::serve::{IncomingStream, Listener};
use axum::Router;
use serde_json::Value;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

use super::faults::RecordedRequest;

/// A fake's shared part `S` (its config and state), served over HTTP. Clones share the state and
/// the server; the server stops accepting connections when the last clone is dropped.
///
/// Derefs to the `Arc<S>` that the handler gets as `State<Arc<S>>`.
#[derive(Debug)]
pub(crate) struct FakeServer<S> {
    shared: Arc<S>,
    task: Arc<ServerTask>,
}

impl<S> Clone for FakeServer<S> {
    fn clone(&self) -> Self {
        Self {
            shared: self.shared.clone(),
            task: self.task.clone(),
        }
    }
}

impl<S> Deref for FakeServer<S> {
    type Target = Arc<S>;

    fn deref(&self) -> &Arc<S> {
        &self.shared
    }
}

impl<S: Send + Sync + 'static> FakeServer<S> {
    /// Serves `handler` (which answers every path) on `127.0.0.1:<free port>`, from a task on the
    /// current tokio runtime.
    ///
    /// # Panics
    ///
    /// Panics outside a tokio runtime or if no local port can be bound.
    pub(crate) async fn start<H, T>(shared: S, handler: H) -> Self
    where
        H: Handler<T, Arc<S>>,
        T: 'static,
    {
        let shared = Arc::new(shared);
        let router = Router::new().fallback(handler).with_state(shared.clone());
        let inner = TcpListener::bind(("127.0.0.1", 0))
            .await
            .expect("testkit: bind 127.0.0.1:0");
        let addr = inner.local_addr().expect("testkit: local address");
        let listener = ResettableListener { inner };
        let service = router.into_make_service_with_connect_info::<ConnControl>();
        let handle = tokio::spawn(async move {
            if let Err(error) = axum::serve(listener, service).await {
                tracing::warn!(%error, "testkit fake server stopped");
            }
        });
        Self {
            shared,
            task: Arc::new(ServerTask { addr, handle }),
        }
    }
}

impl<S> FakeServer<S> {
    /// The address the fake listens on.
    pub(crate) fn addr(&self) -> SocketAddr {
        self.task.addr
    }

    /// `http://127.0.0.1:PORT` followed by `path` (empty, or starting with `/`).
    pub(crate) fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr())
    }
}

/// The serving task; aborted when dropped.
#[derive(Debug)]
struct ServerTask {
    addr: SocketAddr,
    handle: JoinHandle<()>,
}

impl Drop for ServerTask {
    fn drop(&mut self) {
        self.handle.abort();
    }
}

/// Locks a fake's state even if a panicking test thread poisoned it: a failed test must not take
/// the fake down with it.
pub(crate) fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

/// One incoming request, as every fake's handler takes it (an axum extractor).
#[derive(Debug)]
pub(crate) struct Request {
    pub(crate) method: Method,
    /// Path as received, without the query string.
    pub(crate) path: String,
    /// Decoded query pairs, in order.
    pub(crate) query: Vec<(String, String)>,
    pub(crate) headers: HeaderMap,
    pub(crate) body: Bytes,
    conn: ConnControl,
}

impl<S: Send + Sync> FromRequest<S> for Request {
    type Rejection = Response;

    async fn from_request(req: axum::extract::Request, state: &S) -> Result<Self, Response> {
        let (mut parts, body) = req.into_parts();
        let ConnectInfo(conn) = ConnectInfo::<ConnControl>::from_request_parts(&mut parts, state)
            .await
            .map_err(IntoResponse::into_response)?;
        let method = parts.method.clone();
        let path = parts.uri.path().to_owned();
        let query = parts
            .uri
            .query()
            .map(|q| {
                url::form_urlencoded::parse(q.as_bytes())
                    .into_owned()
                    .collect()
            })
            .unwrap_or_default();
        let headers = parts.headers.clone();
        let body = Bytes::from_request(axum::extract::Request::from_parts(parts, body), state)
            .await
            .map_err(IntoResponse::into_response)?;
        Ok(Self {
            method,
            path,
            query,
            headers,
            body,
            conn,
        })
    }
}

impl Request {
    /// The body as JSON; `Ok(None)` when it is empty.
    pub(crate) fn json_body(&self) -> Result<Option<Value>, serde_json::Error> {
        if self.body.is_empty() {
            Ok(None)
        } else {
            serde_json::from_slice(&self.body).map(Some)
        }
    }

    /// The first value of query parameter `name`.
    pub(crate) fn query(&self, name: &str) -> Option<&str> {
        self.query
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    /// A header's value, if it is text.
    pub(crate) fn header(&self, name: impl header::AsHeaderName) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    /// The token of an `Authorization: Bearer <token>` header.
    pub(crate) fn bearer_token(&self) -> Option<&str> {
        self.header(header::AUTHORIZATION)
            .and_then(|v| v.strip_prefix("Bearer "))
    }

    /// What a fake records of this request: `body` is the JSON body worth keeping, `reply` what
    /// it answered.
    pub(crate) fn recorded(&self, body: Option<Value>, reply: &Reply) -> RecordedRequest {
        RecordedRequest {
            method: self.method.to_string(),
            path: self.path.clone(),
            query: self.query.clone(),
            body,
            status: reply.status(),
        }
    }

    /// Turns `reply` into the response on this request's connection (resetting it for
    /// [`Reply::Reset`]).
    pub(crate) fn respond(&self, reply: Reply) -> Response {
        reply.into_response(&self.conn)
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
    fn into_response(self, conn: &ConnControl) -> Response {
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

/// Per-connection switch that makes the connection fail with a TCP reset.
#[derive(Debug, Clone, Default)]
struct ConnControl(Arc<AtomicBool>);

impl ConnControl {
    /// From now on every read and write on the connection fails, and the socket is closed with
    /// `SO_LINGER` 0, so the peer sees a reset instead of a response.
    fn reset(&self) {
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
struct ResettableListener {
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
struct ResettableIo {
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
