//! The session proxy (Pipecat Cloud's "Session API"): `ANY /sessions/{id}/proxy/{path}` and
//! `ANY /v1/public/{agent}/sessions/{id}/{path}` forward one request to the HTTP server of the
//! session's bot, on the provider's private network, and answer with what the bot answered.
//!
//! Rules:
//! - Only sessions of agents with the `http` handoff have a bot server to reach (others: 409
//!   `no_session_api`), only while the session is not over (409 `session_ended`).
//! - Proxying acts on the session, so it takes what a stop takes: the owner's token, or
//!   `sessions:stop_any`. Anyone else, and a Pipecat path naming another agent, gets 404.
//! - The request goes to the provider's bot URL for the machine (`HttpHandoff::bot_url` and the
//!   agent's `handoff_port`) with the path appended, and nowhere else: no redirect is followed,
//!   and paths with `.`/`..` segments, empty segments or encoded slashes are refused (400), so
//!   a path cannot climb out of a base URL with a path prefix. `/bot` is refused (403): a
//!   session reaches its bot only through the dispatcher's handoff.
//! - Headers travel end to end except the hop-by-hop ones (`Connection` and what it names,
//!   `Keep-Alive`, `Proxy-*`, `TE`, `Trailer`, `Transfer-Encoding`, `Upgrade`), both ways, and
//!   except the caller's `Authorization` and `Cookie` (and `Set-Cookie` coming back): the
//!   dispatcher's token is for the dispatcher. `X-Request-Id` is the request's id;
//!   `X-Forwarded-For` gets the client's address appended when the server knows it.
//! - Bodies are buffered: a request of at most 1 MiB (413 beyond), an answer of at most 8 MiB
//!   (502 `bot_response_too_large` beyond), the whole exchange within `request_timeout_secs`
//!   (504 `bot_timeout`). A bot that cannot be reached is 502 `bot_unreachable`. No streaming
//!   (server-sent events, WebSockets).

use std::net::SocketAddr;
use std::time::Duration;

use axum::body::Body;
use axum::extract::{ConnectInfo, Request, State};
use axum::http::{header, HeaderMap, HeaderName, HeaderValue, Method, StatusCode};
use axum::response::Response;
use axum::Extension;
use bytes::{Bytes, BytesMut};
use tracing::{instrument, warn};
use url::Url;

use super::{ApiPath, BodyDeadline, X_REQUEST_ID};
use crate::app::AppState;
use crate::auth::Caller;
use crate::error::{ApiError, ErrorBody};
use crate::sessions::Right;

/// Largest request body forwarded.
pub const MAX_REQUEST_BYTES: usize = 1024 * 1024;
/// Largest answer body passed back.
pub const MAX_RESPONSE_BYTES: usize = 8 * 1024 * 1024;

/// Hop-by-hop headers (RFC 9110 §7.6.1), never forwarded either way; so are the headers a
/// `Connection` header names, and every `Proxy-*` header.
const HOP_BY_HOP: [HeaderName; 6] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
];

/// The proxy's own HTTP client: it never follows a redirect (the bot's answer goes back to the
/// caller as it is), so a request reaches the bot URL and nothing else.
#[derive(Clone)]
pub struct ProxyClient(reqwest::Client);

impl ProxyClient {
    pub fn new() -> reqwest::Result<Self> {
        reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(5))
            .pool_idle_timeout(Duration::from_secs(60))
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .map(Self)
    }
}

/// Forward a request to the session's bot (`http` handoff agents).
///
/// Method, query string and body (at most 1 MiB, any content type) are forwarded as they are,
/// with the caller's headers but `Authorization`, `Cookie` and the hop-by-hop ones; the answer
/// is the bot's (at most 8 MiB, without hop-by-hop headers or `Set-Cookie`). Takes the owner's
/// token or `sessions:stop_any`.
#[utoipa::path(method(get, post, put, patch, delete, head, options),
    path = "/sessions/{id}/proxy/{path}", tag = "sessions",
    params(("id" = String, Path, description = "The sessionId from /start"),
        ("path" = String, Path, description = "Path on the bot's HTTP server (the query string is forwarded too)")),
    responses(
        (status = 200, description = "Whatever the bot answered: its status, headers (but hop-by-hop ones and Set-Cookie) and body"),
        (status = 400, description = "A path with `.`, `..` or empty segments or an encoded slash", body = ErrorBody),
        (status = 401, description = "Missing or invalid token", body = ErrorBody),
        (status = 403, description = "`/bot`: sessions are handed over by the dispatcher only", body = ErrorBody),
        (status = 404, description = "No such session for this caller", body = ErrorBody),
        (status = 409, description = "The session is over (`session_ended`), or its agent hands sessions over in the environment (`no_session_api`)", body = ErrorBody),
        (status = 413, description = "Request body over 1 MiB", body = ErrorBody),
        (status = 502, description = "The bot could not be reached, or answered more than 8 MiB", body = ErrorBody),
        (status = 504, description = "The bot did not answer within request_timeout_secs", body = ErrorBody),
    ),
    security(("bearer" = [])))]
pub async fn session(
    State(state): State<AppState>,
    Extension(client): Extension<ProxyClient>,
    caller: Caller,
    ApiPath((id, _)): ApiPath<(String, String)>,
    req: Request,
) -> Result<Response, ApiError> {
    // `/sessions/{id}/proxy/` then the path, as sent (still percent-encoded).
    let path = raw_tail(&req, 3);
    forward(state, client, caller, None, id, path, req).await
}

/// Pipecat Cloud's Session API: forward a request to the session's bot.
///
/// As `/sessions/{id}/proxy/{path}`; `{agent}` must be the session's agent.
#[utoipa::path(method(get, post, put, patch, delete, head, options),
    path = "/v1/public/{agent}/sessions/{id}/{path}", tag = "sessions",
    params(("agent" = String, Path, description = "The session's agent (another reads as 404)"),
        ("id" = String, Path, description = "The sessionId from /start"),
        ("path" = String, Path, description = "Path on the bot's HTTP server (the query string is forwarded too)")),
    responses(
        (status = 200, description = "Whatever the bot answered: its status, headers (but hop-by-hop ones and Set-Cookie) and body"),
        (status = 400, description = "A path with `.`, `..` or empty segments or an encoded slash", body = ErrorBody),
        (status = 401, description = "Missing or invalid token", body = ErrorBody),
        (status = 403, description = "`/bot`: sessions are handed over by the dispatcher only", body = ErrorBody),
        (status = 404, description = "No such session of this agent for this caller", body = ErrorBody),
        (status = 409, description = "The session is over (`session_ended`), or its agent hands sessions over in the environment (`no_session_api`)", body = ErrorBody),
        (status = 413, description = "Request body over 1 MiB", body = ErrorBody),
        (status = 502, description = "The bot could not be reached, or answered more than 8 MiB", body = ErrorBody),
        (status = 504, description = "The bot did not answer within request_timeout_secs", body = ErrorBody),
    ),
    security(("bearer" = [])))]
pub async fn pipecat(
    State(state): State<AppState>,
    Extension(client): Extension<ProxyClient>,
    caller: Caller,
    ApiPath((agent, id, _)): ApiPath<(String, String, String)>,
    req: Request,
) -> Result<Response, ApiError> {
    // `/v1/public/{agent}/sessions/{id}/` then the path.
    let path = raw_tail(&req, 5);
    forward(state, client, caller, Some(agent), id, path, req).await
}

/// Gives each method of the proxy paths an operation id of its own (`proxy_get`, …,
/// `session_api_get`, …): one handler serves them all.
pub struct OperationIds;

impl utoipa::Modify for OperationIds {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        for (path, prefix) in [
            ("/sessions/{id}/proxy/{path}", "proxy"),
            ("/v1/public/{agent}/sessions/{id}/{path}", "session_api"),
        ] {
            let Some(item) = openapi.paths.paths.get_mut(path) else {
                continue;
            };
            for (method, op) in [
                ("get", &mut item.get),
                ("put", &mut item.put),
                ("post", &mut item.post),
                ("delete", &mut item.delete),
                ("options", &mut item.options),
                ("head", &mut item.head),
                ("patch", &mut item.patch),
            ] {
                if let Some(op) = op {
                    op.operation_id = Some(format!("{prefix}_{method}"));
                }
            }
        }
    }
}

/// What follows the first `segments` segments of the request's path (`/a/b/c/rest` → `rest`
/// for 3), still percent-encoded.
fn raw_tail(req: &Request, segments: usize) -> String {
    req.uri()
        .path()
        .splitn(segments + 2, '/')
        .nth(segments + 1)
        .unwrap_or_default()
        .to_owned()
}

#[instrument(name = "proxy", skip_all, fields(session.key = tracing::field::Empty))]
async fn forward(
    state: AppState,
    client: ProxyClient,
    caller: Caller,
    agent: Option<String>,
    id: String,
    path: String,
    req: Request,
) -> Result<Response, ApiError> {
    if matches!(*req.method(), Method::CONNECT | Method::TRACE) {
        return Err(ApiError::new(
            StatusCode::METHOD_NOT_ALLOWED,
            "method_not_allowed",
            format!("the session proxy does not forward {}", req.method()),
        ));
    }
    check_path(&path)?;
    if let Some(length) = content_length(req.headers()) {
        if length > MAX_REQUEST_BYTES as u64 {
            return Err(too_large());
        }
    }
    let base = bot_base(&state, &caller, agent.as_deref(), &id).await?;
    let url = target(&base, &path, req.uri().query())?;

    let timeout = state.config.request_timeout();
    let (parts, body) = req.into_parts();
    let deadline = parts
        .extensions
        .get::<BodyDeadline>()
        .map_or(Duration::from_secs(10), |d| d.0);
    let body = tokio::time::timeout(deadline, read_request(body))
        .await
        .map_err(|_| {
            ApiError::new(
                StatusCode::REQUEST_TIMEOUT,
                "request_timeout",
                "the request body did not arrive in time",
            )
        })??;

    let peer = parts
        .extensions
        .get::<ConnectInfo<SocketAddr>>()
        .map(|c| c.0.ip());
    let headers = request_headers(&parts.headers, peer);
    let mut upstream = client.0.request(parts.method.clone(), url).headers(headers);
    if !body.is_empty() || matches!(parts.method, Method::POST | Method::PUT | Method::PATCH) {
        upstream = upstream.body(body);
    }
    let exchange = async {
        let resp = upstream.send().await?;
        let status = resp.status();
        let headers = resp.headers().clone();
        let body = read_capped(resp).await?;
        Ok::<_, Upstream>((status, headers, body))
    };
    let (status, headers, body) = match tokio::time::timeout(timeout, exchange).await {
        Ok(Ok(answer)) => answer,
        Ok(Err(Upstream::TooLarge)) => {
            warn!(
                limit = MAX_RESPONSE_BYTES,
                "the bot's answer is too large to pass on"
            );
            return Err(ApiError::new(
                StatusCode::BAD_GATEWAY,
                "bot_response_too_large",
                format!("the bot answered more than {MAX_RESPONSE_BYTES} bytes"),
            ));
        }
        Ok(Err(Upstream::Http(e))) => {
            warn!(error = %providers::http::transport_message(&e), "the session's bot could not be reached");
            return Err(ApiError::upstream(
                StatusCode::BAD_GATEWAY,
                "bot_unreachable",
                "the session's bot could not be reached",
            ));
        }
        Err(_) => {
            warn!(
                timeout_secs = timeout.as_secs(),
                "the session's bot did not answer in time"
            );
            return Err(ApiError::new(
                StatusCode::GATEWAY_TIMEOUT,
                "bot_timeout",
                format!(
                    "the session's bot did not answer within {} s",
                    timeout.as_secs()
                ),
            ));
        }
    };
    let mut resp = Response::new(Body::from(body));
    *resp.status_mut() = status;
    *resp.headers_mut() = response_headers(headers, parts.method == Method::HEAD);
    Ok(resp)
}

/// The base URL of the session's bot server: the session must be the caller's to act on,
/// not over, of `agent` when one is named, and of an `http` handoff agent.
async fn bot_base(
    state: &AppState,
    caller: &Caller,
    agent: Option<&str>,
    id: &str,
) -> Result<Url, ApiError> {
    let sessions = &state.sessions;
    let machine = sessions.machine_for(caller, id, Right::Stop).await?;
    let ended = || {
        ApiError::new(
            StatusCode::CONFLICT,
            "session_ended",
            "the session is over: its bot takes no more requests",
        )
    };
    let machine = machine.ok_or_else(ended)?;
    if machine.state.is_terminal() || machine.failure.is_some() {
        return Err(ended());
    }
    // A live machine of a verified session always carries the session's labels.
    let labels = machine.labels.as_ref().ok_or_else(ended)?;
    // Machines labelled before agents had names are the default agent's.
    let session_agent = match labels.agent.as_str() {
        "" => state.config.default_agent.as_str(),
        named => named,
    };
    if agent.is_some_and(|a| a != session_agent) {
        return Err(crate::sessions::SessionError::NotFound.into());
    }
    let no_api = || {
        ApiError::new(
            StatusCode::CONFLICT,
            "no_session_api",
            format!(
                "agent {:?} hands sessions over in the environment (handoff = \"env\"): its bot \
                 serves no HTTP the dispatcher can reach; the session proxy needs handoff = \"http\"",
                labels.agent
            ),
        )
    };
    let port = sessions
        .template(&labels.agent)
        .and_then(|t| t.handoff_port)
        .ok_or_else(no_api)?;
    let handoff = sessions.provider().handoff().ok_or_else(no_api)?;
    handoff.bot_url(&machine.as_launched(), port).map_err(|e| {
        warn!(error = %e, "no bot URL for the session's machine");
        ApiError::from(e)
    })
}

/// Refuses paths that could reach anything but a path under the bot's base URL, and `/bot`.
fn check_path(path: &str) -> Result<(), ApiError> {
    let invalid = |why: &str| ApiError::bad_request(format!("invalid proxy path: {why}"));
    let segments: Vec<&str> = path.split('/').collect();
    let mut decoded = Vec::with_capacity(segments.len());
    for (i, segment) in segments.iter().enumerate() {
        let text = percent_decode(segment).ok_or_else(|| invalid("bad percent-encoding"))?;
        if text.is_empty() && i + 1 < segments.len() {
            return Err(invalid("empty segment"));
        }
        if text == "." || text == ".." {
            return Err(invalid("dot segment"));
        }
        if text.contains(['/', '\\']) || text.chars().any(char::is_control) {
            return Err(invalid("encoded slash, backslash or control character"));
        }
        decoded.push(text);
    }
    let decoded = decoded.join("/");
    if decoded.trim_end_matches('/').eq_ignore_ascii_case("bot") {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "forbidden",
            "the session proxy does not forward /bot: a session reaches its bot only through \
             the dispatcher's handoff",
        ));
    }
    Ok(())
}

/// `%XX` decoded; `None` for a `%` not followed by two hex digits.
fn percent_decode(segment: &str) -> Option<String> {
    let bytes = segment.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = std::str::from_utf8(bytes.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    Some(String::from_utf8_lossy(&out).into_owned())
}

/// `base` with `path` appended to its path and `query` as its query; checked to stay under
/// `base` (same origin, path prefix).
fn target(base: &Url, path: &str, query: Option<&str>) -> Result<Url, ApiError> {
    let mut url = base.clone();
    let prefix = base.path().trim_end_matches('/').to_owned();
    url.set_path(&format!("{prefix}/{path}"));
    url.set_query(query);
    url.set_fragment(None);
    if url.origin() != base.origin() || !url.path().starts_with(&format!("{prefix}/")) {
        warn!("a proxy path left the bot's base URL");
        return Err(ApiError::bad_request("invalid proxy path"));
    }
    Ok(url)
}

fn content_length(headers: &HeaderMap) -> Option<u64> {
    headers
        .get(header::CONTENT_LENGTH)?
        .to_str()
        .ok()?
        .parse()
        .ok()
}

fn too_large() -> ApiError {
    ApiError::new(
        StatusCode::PAYLOAD_TOO_LARGE,
        "payload_too_large",
        format!("the session proxy forwards request bodies of at most {MAX_REQUEST_BYTES} bytes"),
    )
}

/// Removes the hop-by-hop headers: the fixed ones, those `Connection` names, `Proxy-*`.
fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|name| HeaderName::from_bytes(name.trim().as_bytes()).ok())
        .collect();
    for name in named.iter().chain(&HOP_BY_HOP) {
        headers.remove(name);
    }
    let proxy: Vec<HeaderName> = headers
        .keys()
        .filter(|k| k.as_str().starts_with("proxy-"))
        .cloned()
        .collect();
    for name in proxy {
        headers.remove(name);
    }
}

/// What the bot gets: the caller's end-to-end headers but its credentials and cookies, and the
/// request's id and forwarding chain.
fn request_headers(incoming: &HeaderMap, peer: Option<std::net::IpAddr>) -> HeaderMap {
    let mut headers = incoming.clone();
    strip_hop_by_hop(&mut headers);
    for name in [
        header::HOST,
        header::CONTENT_LENGTH,
        header::AUTHORIZATION,
        header::COOKIE,
        header::EXPECT,
    ] {
        headers.remove(name);
    }
    let prior: Vec<&str> = incoming
        .get_all("x-forwarded-for")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .collect();
    let chain = prior
        .into_iter()
        .map(str::to_owned)
        .chain(peer.map(|ip| ip.to_string()))
        .collect::<Vec<_>>()
        .join(", ");
    headers.remove("x-forwarded-for");
    if let Ok(value) = HeaderValue::from_str(&chain) {
        if !chain.is_empty() {
            headers.insert("x-forwarded-for", value);
        }
    }
    // Always set by the router (the client's, when safe, else a fresh one).
    if let Some(id) = incoming.get(X_REQUEST_ID) {
        headers.insert(X_REQUEST_ID, id.clone());
    }
    headers
}

/// What the caller gets back: the bot's headers but the hop-by-hop ones and cookies; the
/// length is the buffered body's (a HEAD answer keeps the bot's).
fn response_headers(mut headers: HeaderMap, head: bool) -> HeaderMap {
    strip_hop_by_hop(&mut headers);
    headers.remove(header::SET_COOKIE);
    if !head {
        headers.remove(header::CONTENT_LENGTH);
    }
    headers
}

/// The request's body, at most [`MAX_REQUEST_BYTES`].
async fn read_request(body: Body) -> Result<Bytes, ApiError> {
    use futures_util::StreamExt;
    let mut stream = body.into_data_stream();
    let mut buf = BytesMut::new();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk
            .map_err(|e| ApiError::bad_request(format!("cannot read the request body: {e}")))?;
        if buf.len() + chunk.len() > MAX_REQUEST_BYTES {
            return Err(too_large());
        }
        buf.extend_from_slice(&chunk);
    }
    Ok(buf.freeze())
}

/// Why an exchange with the bot failed.
enum Upstream {
    Http(reqwest::Error),
    TooLarge,
}

impl From<reqwest::Error> for Upstream {
    fn from(e: reqwest::Error) -> Self {
        Self::Http(e)
    }
}

/// The answer's body, at most [`MAX_RESPONSE_BYTES`].
async fn read_capped(mut resp: reqwest::Response) -> Result<Bytes, Upstream> {
    if resp
        .content_length()
        .is_some_and(|n| n > MAX_RESPONSE_BYTES as u64)
    {
        return Err(Upstream::TooLarge);
    }
    let mut body = BytesMut::new();
    while let Some(chunk) = resp.chunk().await? {
        if body.len() + chunk.len() > MAX_RESPONSE_BYTES {
            return Err(Upstream::TooLarge);
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body.freeze())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_stay_under_the_base() {
        for ok in [
            "livez",
            "readyz",
            "api/offer",
            "status/",
            "a%20b",
            "bot-status",
            "x/bot",
        ] {
            assert!(check_path(ok).is_ok(), "{ok}");
        }
        for bad in [
            "..", "a/../b", "%2e%2E", ".", "a//b", "a%2Fb", "a%5cb", "a\\b", "%zz", "a%00b", "",
        ] {
            // The empty path is allowed (the bot's root) only at the end: "" is one segment.
            if bad.is_empty() {
                assert!(check_path(bad).is_ok());
                continue;
            }
            let e = check_path(bad).unwrap_err();
            assert_eq!(e.status, StatusCode::BAD_REQUEST, "{bad}");
        }
        for bot in ["bot", "bot/", "BOT", "%62ot"] {
            assert_eq!(
                check_path(bot).unwrap_err().status,
                StatusCode::FORBIDDEN,
                "{bot}"
            );
        }
        let base = Url::parse("http://gw.internal/machines/abc").unwrap();
        assert_eq!(
            target(&base, "api/offer", Some("a=1&b=%2B"))
                .unwrap()
                .as_str(),
            "http://gw.internal/machines/abc/api/offer?a=1&b=%2B"
        );
        let root = Url::parse("http://10.0.0.1:8080").unwrap();
        assert_eq!(
            target(&root, "livez", None).unwrap().as_str(),
            "http://10.0.0.1:8080/livez"
        );
    }

    #[test]
    fn hop_by_hop_headers_credentials_and_cookies_stay_behind() {
        let mut incoming = HeaderMap::new();
        for (k, v) in [
            ("connection", "keep-alive, x-secret-hop"),
            ("x-secret-hop", "1"),
            ("keep-alive", "timeout=5"),
            ("proxy-authorization", "Basic eA=="),
            ("te", "trailers"),
            ("upgrade", "websocket"),
            ("authorization", "Bearer caller-token"),
            ("cookie", "a=b"),
            ("host", "dispatcher.example.com"),
            ("content-type", "application/json"),
            ("x-forwarded-for", "203.0.113.7"),
            ("x-request-id", "req-1"),
            ("x-custom", "kept"),
        ] {
            incoming.append(k, HeaderValue::from_static(v));
        }
        let out = request_headers(&incoming, Some("198.51.100.2".parse().unwrap()));
        let names: Vec<&str> = out.keys().map(HeaderName::as_str).collect();
        assert_eq!(
            names.len(),
            4,
            "only content-type, x-custom, x-forwarded-for, x-request-id: {names:?}"
        );
        assert_eq!(out["x-forwarded-for"], "203.0.113.7, 198.51.100.2");
        assert_eq!(out["x-request-id"], "req-1");
        assert_eq!(out["x-custom"], "kept");

        let mut answer = HeaderMap::new();
        for (k, v) in [
            ("connection", "x-hop"),
            ("x-hop", "1"),
            ("proxy-authenticate", "Basic"),
            ("set-cookie", "s=1"),
            ("content-length", "12"),
            ("content-type", "text/plain"),
        ] {
            answer.append(k, HeaderValue::from_static(v));
        }
        let back = response_headers(answer.clone(), false);
        assert_eq!(
            back.keys().map(HeaderName::as_str).collect::<Vec<_>>(),
            ["content-type"]
        );
        assert!(response_headers(answer, true).contains_key("content-length"));
    }
}
