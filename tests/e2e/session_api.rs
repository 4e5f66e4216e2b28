//! Session API parity with Pipecat Cloud (issue 11 §5), through the real HTTP server against
//! the Fly fake: `GET /sessions` (the caller's own, filtered, paginated from the provider's
//! listing; a forged cursor shows nothing more), the session proxy to an `http` handoff bot's
//! server (`/sessions/{id}/proxy/{path}`, `/v1/public/{agent}/sessions/{id}/{path}`) and what
//! it keeps from the bot (the caller's credentials, hop-by-hop headers) and from the caller,
//! and the session view's `botStartSeconds` / `queueSeconds`.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::http::{HeaderMap, StatusCode as AxumStatus};
use axum::response::{IntoResponse, Response};
use chrono::{DateTime, Utc};
use providers::testkit::fly_fake::{FakeFlyConfig, FlyOp};
use providers::testkit::Fault;
use reqwest::StatusCode;
use serde_json::{json, Value};

use crate::common::*;

/// One request the bot gateway saw.
#[derive(Debug, Clone)]
struct Seen {
    method: String,
    path: String,
    query: Option<String>,
    headers: HeaderMap,
}

type GatewayState = (String, reqwest::Client, Arc<Mutex<Vec<Seen>>>);

/// A recording gateway in front of the Fly fake's bot servers (the fake does not record
/// headers): `fly.machine_url` points at it; it records every request and forwards it to the
/// fake, except a few paths it answers itself (`…/echo`, `…/slow`, `…/big`, `…/redirect`).
struct Gateway {
    base: String,
    seen: Arc<Mutex<Vec<Seen>>>,
}

impl Gateway {
    async fn start(fake_root: String) -> Self {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let state: GatewayState = (fake_root, reqwest::Client::new(), seen.clone());
        let app = axum::Router::new().fallback(gateway).with_state(state);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await });
        Self { base, seen }
    }

    fn machine_url_template(&self) -> String {
        format!("{}/_bot/{{machine_id}}", self.base)
    }

    /// Requests seen whose path ends with `/{tail}`.
    fn seen(&self, tail: &str) -> Vec<Seen> {
        let suffix = format!("/{tail}");
        self.seen
            .lock()
            .unwrap()
            .iter()
            .filter(|s| s.path.ends_with(&suffix))
            .cloned()
            .collect()
    }
}

async fn gateway(
    axum::extract::State((root, http, seen)): axum::extract::State<GatewayState>,
    req: axum::extract::Request,
) -> Response {
    let (parts, body) = req.into_parts();
    let body = axum::body::to_bytes(body, 64 << 20)
        .await
        .unwrap_or_default();
    let path = parts.uri.path().to_owned();
    let query = parts.uri.query().map(str::to_owned);
    seen.lock().unwrap().push(Seen {
        method: parts.method.to_string(),
        path: path.clone(),
        query: query.clone(),
        headers: parts.headers.clone(),
    });
    match path.rsplit('/').next().unwrap_or_default() {
        "echo" => {
            let headers: serde_json::Map<String, Value> = parts
                .headers
                .iter()
                .map(|(k, v)| (k.to_string(), json!(v.to_str().unwrap_or_default())))
                .collect();
            let answer = json!({
                "method": parts.method.as_str(),
                "path": path,
                "query": query,
                "headers": headers,
                "body": String::from_utf8_lossy(&body),
            });
            (
                AxumStatus::CREATED,
                [
                    ("connection", "x-hop-secret"),
                    ("x-hop-secret", "1"),
                    ("keep-alive", "timeout=5"),
                    ("proxy-authenticate", "Basic realm=\"bot\""),
                    ("set-cookie", "bot_session=1"),
                    ("x-bot", "yes"),
                ],
                axum::Json(answer),
            )
                .into_response()
        }
        "slow" => {
            tokio::time::sleep(Duration::from_secs(5)).await;
            "late".into_response()
        }
        "big" => vec![b'x'; 9 << 20].into_response(),
        "redirect" => {
            let host = parts.headers["host"].to_str().unwrap().to_owned();
            let id = path.split('/').nth(2).unwrap_or_default();
            let location = format!("http://{host}/_bot/{id}/echo?followed=1");
            (AxumStatus::FOUND, [("location", location)]).into_response()
        }
        _ => {
            let mut url = format!("{root}{path}");
            if let Some(q) = &query {
                url = format!("{url}?{q}");
            }
            let mut headers = parts.headers.clone();
            headers.remove("host");
            headers.remove("content-length");
            let answer = http
                .request(parts.method.clone(), url)
                .headers(headers)
                .body(body)
                .send()
                .await;
            match answer {
                Ok(resp) => {
                    let status = resp.status();
                    let content_type = resp.headers().get("content-type").cloned();
                    let bytes = resp.bytes().await.unwrap_or_default();
                    let mut out = (status, bytes).into_response();
                    if let Some(ct) = content_type {
                        out.headers_mut().insert("content-type", ct);
                    }
                    out
                }
                Err(_) => (AxumStatus::BAD_GATEWAY, "gateway: the fake reset").into_response(),
            }
        }
    }
}

/// A dispatcher whose default agent hands sessions over HTTP (cold starts, no reserve).
async fn http_env(mut opts: Options) -> TestEnv {
    opts.env.extend([
        ("BOTDISPATCH_HANDOFF", "http".to_owned()),
        ("BOTDISPATCH_REAPER_INTERVAL_SECS", "0".to_owned()),
        ("BOTDISPATCH_OUTBOUND_RATE_SCALE", "0".to_owned()),
    ]);
    TestEnv::with(opts).await
}

fn token_with(env: &TestEnv, sub: &str, scope: &str) -> String {
    env.app
        .auth
        .mint(sub, Duration::from_secs(600), Some(scope))
        .unwrap()
}

fn id_of(resp: &Value) -> String {
    resp["sessionId"].as_str().unwrap().to_owned()
}

/// A request with a bearer token and extra headers; status, headers and body text.
async fn send(
    env: &TestEnv,
    method: &str,
    path: &str,
    token: &str,
    headers: &[(&str, &str)],
    body: Option<Vec<u8>>,
) -> (StatusCode, reqwest::header::HeaderMap, String) {
    let mut req = env
        .http
        .request(method.parse().unwrap(), format!("{}{path}", env.base))
        .bearer_auth(token);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    if let Some(body) = body {
        req = req.body(body);
    }
    let resp = req.send().await.expect("botdispatch answers");
    let status = resp.status();
    let headers = resp.headers().clone();
    (status, headers, resp.text().await.unwrap())
}

fn json_of(text: &str) -> Value {
    serde_json::from_str(text).unwrap_or_else(|e| panic!("not JSON: {text:?}: {e}"))
}

#[tokio::test]
async fn the_proxy_reaches_the_bot_without_the_callers_credentials() {
    let (fly, daily) = start_fakes(&Options::default().fly).await;
    let gw = Gateway::start(fly.root_url()).await;
    let mut opts = Options::default();
    opts.shared = Some((fly, daily));
    opts.env = vec![
        ("BOTDISPATCH_FLY_MACHINE_URL", gw.machine_url_template()),
        ("BOTDISPATCH_REQUEST_TIMEOUT_SECS", "2".to_owned()),
    ];
    let env = http_env(opts).await;
    // The Pipecat Cloud base image stops taking connections on SIGTERM, which the dispatcher
    // sends right after the handoff (see `a_drained_bot_is_unreachable...` below): here the
    // signal fails, so the bot keeps serving, as a bot with a session API must.
    env.fly.set_fault(
        FlyOp::Signal,
        Fault::Status {
            status: 400,
            retry_after: None,
        },
        1,
    );
    let (status, resp) = env.post_start("alice", start_body()).await;
    assert_eq!(status, StatusCode::OK, "{resp}");
    let id = id_of(&resp);
    let handle = session_handle(&id);
    let alice = env.token("alice");

    // GET /livez and /readyz of the bot, by both paths, without the caller's credentials.
    let (status, _, text) = send(
        &env,
        "GET",
        &format!("/sessions/{id}/proxy/livez"),
        &alice,
        &[
            ("cookie", "dispatcher_session=secret"),
            ("x-forwarded-for", "203.0.113.9"),
            ("x-request-id", "proxy-livez-1"),
        ],
        None,
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{text}");
    assert_eq!(json_of(&text), json!({"status": "ok"}));
    let (status, _, text) = send(
        &env,
        "GET",
        &format!("/v1/public/default/sessions/{id}/readyz"),
        &alice,
        &[],
        None,
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{text}");
    assert_eq!(json_of(&text), json!({"status": "ok"}));
    let livez = gw.seen("livez");
    assert_eq!(livez.len(), 1, "{livez:#?}");
    assert_eq!(livez[0].path, format!("/_bot/{handle}/livez"));
    assert_eq!(
        (livez[0].method.as_str(), livez[0].query.as_deref()),
        ("GET", None)
    );
    let h = &livez[0].headers;
    assert!(h.get("authorization").is_none(), "{h:?}");
    assert!(h.get("cookie").is_none(), "{h:?}");
    assert_eq!(h["x-request-id"], "proxy-livez-1");
    // The client's X-Forwarded-For, then the address that connected to the dispatcher.
    assert_eq!(
        h["x-forwarded-for"].to_str().unwrap(),
        "203.0.113.9, 127.0.0.1",
        "{h:?}"
    );
    // The handoff's own /readyz polls came before; the proxied one carries no credentials
    // either.
    let readyz = gw.seen("readyz");
    assert!(readyz
        .iter()
        .all(|s| s.headers.get("authorization").is_none()));

    // A POST with a query string and a body: forwarded as they are; hop-by-hop headers and the
    // bot's cookies stay behind both ways.
    let (status, headers, text) = send(
        &env,
        "POST",
        &format!("/sessions/{id}/proxy/echo?x=1&y=%2B"),
        &alice,
        &[
            ("content-type", "application/json"),
            ("x-custom", "kept"),
            ("connection", "x-drop-me"),
            ("x-drop-me", "1"),
            ("proxy-authorization", "Basic eDp5"),
            ("x-request-id", "proxy-echo-1"),
        ],
        Some(br#"{"say": "hello"}"#.to_vec()),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED, "{text}");
    let echo = json_of(&text);
    assert_eq!(echo["method"], "POST");
    assert_eq!(echo["path"], format!("/_bot/{handle}/echo"));
    assert_eq!(echo["query"], "x=1&y=%2B");
    assert_eq!(echo["body"], r#"{"say": "hello"}"#);
    let sent = &echo["headers"];
    assert_eq!(sent["x-custom"], "kept");
    assert_eq!(sent["content-type"], "application/json");
    assert_eq!(sent["x-request-id"], "proxy-echo-1");
    for gone in [
        "authorization",
        "x-drop-me",
        "proxy-authorization",
        "cookie",
    ] {
        assert!(sent.get(gone).is_none(), "{gone} was forwarded: {sent}");
    }
    assert_eq!(headers["x-bot"], "yes");
    for gone in [
        "x-hop-secret",
        "keep-alive",
        "proxy-authenticate",
        "set-cookie",
    ] {
        assert!(headers.get(gone).is_none(), "{gone} came back: {headers:?}");
    }

    // A redirect goes back to the caller; the proxy does not follow it.
    let no_redirects = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let resp = no_redirects
        .get(format!("{}/sessions/{id}/proxy/redirect", env.base))
        .bearer_auth(&alice)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::FOUND);
    let headers = resp.headers().clone();
    assert!(headers["location"].to_str().unwrap().contains("followed=1"));
    assert_eq!(gw.seen("echo").len(), 1, "the redirect was followed");

    // Ownership: another caller, and a reader, see no such session; a stopper may act on it.
    let bob = env.token("bob");
    for token in [&bob, &env.reader_token()] {
        let (status, _, text) = send(
            &env,
            "GET",
            &format!("/sessions/{id}/proxy/livez"),
            token,
            &[],
            None,
        )
        .await;
        assert_eq!(status, StatusCode::NOT_FOUND, "{text}");
        assert_eq!(json_of(&text)["error"], "session_not_found");
    }
    let stopper = token_with(&env, "ops", "sessions:stop_any");
    let (status, _, text) = send(
        &env,
        "GET",
        &format!("/sessions/{id}/proxy/livez"),
        &stopper,
        &[],
        None,
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{text}");
    // The Pipecat path must name the session's agent.
    let (status, _, text) = send(
        &env,
        "GET",
        &format!("/v1/public/other/sessions/{id}/livez"),
        &alice,
        &[],
        None,
    )
    .await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{text}");
    // No token: 401.
    let resp = env
        .http
        .get(format!("{}/sessions/{id}/proxy/livez", env.base))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);

    // Paths that could leave the bot's base URL, and /bot, are refused before anything is
    // sent. (In-process: an HTTP client would resolve the dot segments itself.)
    let before = gw.seen.lock().unwrap().len();
    let bearer = format!("Bearer {alice}");
    for (path, expected) in [
        ("../../other/livez", StatusCode::BAD_REQUEST),
        ("%2e%2e/other/livez", StatusCode::BAD_REQUEST),
        ("./livez", StatusCode::BAD_REQUEST),
        ("a%2Fb", StatusCode::BAD_REQUEST),
        ("a//livez", StatusCode::BAD_REQUEST),
        ("bot", StatusCode::FORBIDDEN),
        ("%62ot/", StatusCode::FORBIDDEN),
    ] {
        for uri in [
            format!("/sessions/{id}/proxy/{path}"),
            format!("/v1/public/default/sessions/{id}/{path}"),
        ] {
            let (status, _, body) = env
                .oneshot(
                    "POST",
                    &uri,
                    &[
                        ("authorization", &bearer),
                        ("content-type", "application/json"),
                    ],
                    b"{}".to_vec(),
                )
                .await;
            assert_eq!(status, expected, "{uri}: {body}");
            assert!(body["error"].is_string() && body["info"] == body["detail"]);
        }
    }
    assert_eq!(gw.seen.lock().unwrap().len(), before);
    assert_eq!(
        env.fly.deliveries(&handle).len(),
        1,
        "one /bot, the handoff's"
    );

    // Limits: a request over 1 MiB, an answer over 8 MiB, a bot slower than the timeout.
    let (status, _, text) = send(
        &env,
        "POST",
        &format!("/sessions/{id}/proxy/echo"),
        &alice,
        &[],
        Some(vec![b'a'; 1024 * 1024 + 1]),
    )
    .await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE, "{text}");
    assert_eq!(json_of(&text)["error"], "payload_too_large");
    let (status, _, text) = send(
        &env,
        "GET",
        &format!("/sessions/{id}/proxy/big"),
        &alice,
        &[],
        None,
    )
    .await;
    assert_eq!(status, StatusCode::BAD_GATEWAY, "{text}");
    assert_eq!(json_of(&text)["error"], "bot_response_too_large");
    let t0 = std::time::Instant::now();
    let (status, _, text) = send(
        &env,
        "GET",
        &format!("/sessions/{id}/proxy/slow"),
        &alice,
        &[],
        None,
    )
    .await;
    assert_eq!(status, StatusCode::GATEWAY_TIMEOUT, "{text}");
    assert_eq!(json_of(&text)["error"], "bot_timeout");
    assert!(t0.elapsed() < Duration::from_secs(4), "{:?}", t0.elapsed());
}

#[tokio::test]
async fn a_drained_bot_is_unreachable_and_env_agents_and_ended_sessions_have_no_session_api() {
    let mut opts = Options::default();
    opts.toml = format!("[agents.envbot]\nimage = {BOT_IMAGE:?}\n");
    let env = http_env(opts).await;
    let alice = env.token("alice");

    // The dispatcher sends SIGTERM right after the handoff; a bot that then stops taking
    // connections (the Pipecat Cloud base image) cannot be proxied to: 502.
    let (status, resp) = env.post_start("alice", start_body()).await;
    assert_eq!(status, StatusCode::OK, "{resp}");
    let id = id_of(&resp);
    let handle = session_handle(&id);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while !env.fly.signals(&handle).contains(&"SIGTERM".to_owned()) {
        assert!(tokio::time::Instant::now() < deadline, "no SIGTERM");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (status, _, text) = send(
        &env,
        "GET",
        &format!("/sessions/{id}/proxy/livez"),
        &alice,
        &[],
        None,
    )
    .await;
    assert_eq!(status, StatusCode::BAD_GATEWAY, "{text}");
    let body = json_of(&text);
    assert_eq!(body["error"], "bot_unreachable");
    assert!(
        body["detail"].as_str().unwrap().contains("request id"),
        "{body}"
    );

    // An agent with the env handoff has no bot server to reach.
    let (status, resp) = env
        .call(
            "POST",
            "/v1/public/envbot/start",
            Some(&alice),
            Some(start_body()),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{resp}");
    let env_id = id_of(&resp);
    for path in [
        format!("/sessions/{env_id}/proxy/livez"),
        format!("/v1/public/envbot/sessions/{env_id}/livez"),
    ] {
        let (status, _, text) = send(&env, "GET", &path, &alice, &[], None).await;
        assert_eq!(status, StatusCode::CONFLICT, "{text}");
        assert_eq!(json_of(&text)["error"], "no_session_api");
    }

    // A session that is over takes no more requests.
    let (status, _) = env
        .call("DELETE", &format!("/sessions/{id}"), Some(&alice), None)
        .await;
    assert_eq!(status, StatusCode::OK);
    let (status, _, text) = send(
        &env,
        "GET",
        &format!("/sessions/{id}/proxy/livez"),
        &alice,
        &[],
        None,
    )
    .await;
    assert_eq!(status, StatusCode::CONFLICT, "{text}");
    assert_eq!(json_of(&text)["error"], "session_ended");
}

/// `GET /sessions` with `query`; the page's sessions and next cursor.
async fn list(env: &TestEnv, token: &str, query: &str) -> (Vec<Value>, Option<String>) {
    let (status, page) = env
        .call("GET", &format!("/sessions{query}"), Some(token), None)
        .await;
    assert_eq!(status, StatusCode::OK, "{query}: {page}");
    let sessions = page["sessions"].as_array().unwrap().clone();
    let next = page["nextCursor"].as_str().map(str::to_owned);
    assert!(
        page.get("nextCursor").is_some(),
        "nextCursor is always there"
    );
    (sessions, next)
}

fn ids(sessions: &[Value]) -> BTreeSet<String> {
    sessions.iter().map(id_of).collect()
}

fn created(v: &Value) -> DateTime<Utc> {
    v["createdAt"].as_str().unwrap().parse().unwrap()
}

/// Every page of `query` (which must leave room for `&cursor=`), following `nextCursor`.
async fn all_pages(env: &TestEnv, token: &str, query: &str) -> (Vec<Value>, usize) {
    let mut all = Vec::new();
    let mut pages = 0;
    let mut cursor: Option<String> = None;
    loop {
        let q = match &cursor {
            Some(c) => format!("{query}&cursor={c}"),
            None => query.to_owned(),
        };
        let (sessions, next) = list(env, token, &q).await;
        pages += 1;
        all.extend(sessions);
        match next {
            Some(c) => cursor = Some(c),
            None => return (all, pages),
        }
        assert!(pages < 20, "no end of pages");
    }
}

#[tokio::test]
async fn listing_shows_the_callers_own_sessions_filtered_and_paginated() {
    let mut opts = Options::default();
    // A stopped machine stays "stopping" (listed, ended) for a while: Fly lists a stopped
    // machine until auto_destroy removes it.
    opts.fly = FakeFlyConfig {
        stop_delay: Duration::from_secs(60),
        ..opts.fly
    };
    opts.toml = format!("[agents.support]\nimage = {BOT_IMAGE:?}\n");
    opts.env = vec![
        ("BOTDISPATCH_REAPER_INTERVAL_SECS", "0".to_owned()),
        ("BOTDISPATCH_OUTBOUND_RATE_SCALE", "0".to_owned()),
    ];
    let env = TestEnv::with(opts).await;
    let (alice, bob) = (env.token("alice"), env.token("bob"));
    let start = |token: String, path: &'static str| {
        let env = &env;
        async move {
            let (status, resp) = env
                .call("POST", path, Some(&token), Some(start_body()))
                .await;
            assert_eq!(status, StatusCode::OK, "{resp}");
            id_of(&resp)
        }
    };

    // Batch A: alice 3 × default, bob 1; then, in a later second (Fly's times are whole
    // seconds), batch B: alice 2 × default and 1 × support, bob 1.
    let mut alice_a = BTreeSet::new();
    for _ in 0..3 {
        alice_a.insert(start(alice.clone(), "/start").await);
    }
    let mut bob_ids = BTreeSet::from([start(bob.clone(), "/start").await]);
    let last_a = env
        .fly
        .live_machines()
        .iter()
        .map(|m| m.created_at)
        .max()
        .unwrap();
    let boundary = DateTime::<Utc>::from_timestamp(last_a.timestamp() + 1, 0).unwrap();
    while Utc::now() < boundary {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut alice_b = BTreeSet::new();
    for _ in 0..2 {
        alice_b.insert(start(alice.clone(), "/start").await);
    }
    let support = start(alice.clone(), "/v1/public/support/start").await;
    alice_b.insert(support.clone());
    bob_ids.insert(start(bob.clone(), "/start").await);
    let alice_all: BTreeSet<String> = alice_a.union(&alice_b).cloned().collect();

    // Each caller sees exactly its own sessions (their ids are the ones /start gave), newest
    // first, each as GET /sessions/{id} shows it; read_any sees all.
    let (mine, next) = list(&env, &alice, "").await;
    assert_eq!(next, None);
    assert_eq!(ids(&mine), alice_all);
    assert!(mine.windows(2).all(|w| created(&w[0]) >= created(&w[1])));
    let (status, one) = env
        .get_session("alice", &format!("/sessions/{}", id_of(&mine[0])))
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(one, mine[0]);
    assert_eq!(mine[0]["startType"], "cold");
    assert!(mine[0]["botStartSeconds"].is_number(), "{}", mine[0]);
    // Recorded on the machine in the background once the start answered: 0 s (no queue)
    // once there, null before.
    let queue = &mine[0]["queueSeconds"];
    assert!(mine[0].get("queueSeconds").is_some());
    assert!(queue.is_null() || queue.as_f64() == Some(0.0), "{queue}");
    assert_eq!(ids(&list(&env, &bob, "").await.0), bob_ids);
    let everyone: BTreeSet<String> = alice_all.union(&bob_ids).cloned().collect();
    assert_eq!(ids(&list(&env, &env.reader_token(), "").await.0), everyone);

    // Pagination with a filter: pages of 2 of alice's default-agent sessions, in order, each
    // once.
    let (pages, count) = all_pages(&env, &alice, "?agent=default&limit=2").await;
    assert_eq!(count, 3);
    let defaults: BTreeSet<String> = alice_all
        .iter()
        .filter(|i| **i != support)
        .cloned()
        .collect();
    assert_eq!(pages.len(), 5);
    assert_eq!(ids(&pages), defaults);
    assert!(pages.iter().all(|s| s["agent"] == "default"));
    assert!(pages.windows(2).all(|w| created(&w[0]) >= created(&w[1])));
    let (support_only, _) = list(&env, &alice, "?agent=support").await;
    assert_eq!(ids(&support_only), BTreeSet::from([support.clone()]));
    assert!(list(&env, &alice, "?startType=hot").await.0.is_empty());
    assert_eq!(list(&env, &alice, "?startType=cold").await.0.len(), 6);

    // The time range is on createdAt: since is inclusive, until exclusive.
    let at = boundary.to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    assert_eq!(
        ids(&list(&env, &alice, &format!("?since={at}")).await.0),
        alice_b
    );
    assert_eq!(
        ids(&list(&env, &alice, &format!("?until={at}")).await.0),
        alice_a
    );

    // A cursor is only a position: another caller's cursor, or a forged one, shows that
    // caller nothing but its own sessions.
    let (_, alice_cursor) = list(&env, &alice, "?limit=1").await;
    let alice_cursor = alice_cursor.expect("more than one page");
    let (theirs, _) = list(&env, &bob, &format!("?cursor={alice_cursor}")).await;
    assert!(ids(&theirs).is_subset(&bob_ids), "{theirs:?}");
    use base64::Engine;
    let forged = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode("v1:99999999999999:z");
    let (theirs, _) = list(&env, &bob, &format!("?cursor={forged}&limit=200")).await;
    assert_eq!(ids(&theirs), bob_ids);
    for bad in [
        "?cursor=not-a-cursor",
        "?limit=0",
        "?limit=201",
        "?status=running",
        "?startType=warm",
        "?since=yesterday",
        "?owner=alice",
    ] {
        let (status, body) = env
            .call("GET", &format!("/sessions{bad}"), Some(&alice), None)
            .await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{bad}: {body}");
        assert_eq!(body["error"], "invalid_request");
    }
    let (status, _) = env.call("GET", "/sessions", None, None).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);

    // Status: a stopped session whose machine the provider still lists is ended.
    let stopped = alice_a.iter().next().unwrap().clone();
    // The stop's destroy finds nothing to destroy yet: the machine stays listed, stopping.
    env.fly.set_fault(
        FlyOp::Delete,
        Fault::Status {
            status: 404,
            retry_after: None,
        },
        1,
    );
    let (status, _) = env
        .call(
            "DELETE",
            &format!("/sessions/{stopped}"),
            Some(&alice),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    // One listing serves the replica for a second.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let (ended, _) = list(&env, &alice, "?status=ended").await;
    assert_eq!(ids(&ended), BTreeSet::from([stopped.clone()]));
    assert_eq!(ended[0]["status"], "ended");
    let (active, _) = list(&env, &alice, "?status=active").await;
    let mut still = alice_all.clone();
    still.remove(&stopped);
    assert_eq!(ids(&active), still);
    assert!(active.iter().all(|s| s["status"] == "ready"));
}

#[tokio::test]
async fn a_warm_start_lists_as_hot_with_the_start_time_it_recorded() {
    let mut opts = Options::default();
    opts.background = true;
    opts.env = vec![
        ("BOTDISPATCH_RESERVE_TIER", "hot".to_owned()),
        ("BOTDISPATCH_RESERVE_SIZE", "1".to_owned()),
        ("BOTDISPATCH_RESERVE_INTERVAL_MS", "100".to_owned()),
    ];
    let env = http_env(opts).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while !env.fly.live_machines().iter().any(|m| {
        m.config["metadata"]["botdispatch_role"] == "reserve"
            && m.config["metadata"]["botdispatch_ready"] == "1"
    }) {
        assert!(tokio::time::Instant::now() < deadline, "no ready reserve");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Old enough that its age cannot pass for this start's time; and the dispatcher claims
    // from its last listing of the reserve.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let t0 = std::time::Instant::now();
    let (status, resp) = env.post_start("alice", start_body()).await;
    let took = t0.elapsed().as_secs_f64();
    assert_eq!(status, StatusCode::OK, "{resp}");
    assert_eq!(resp["startType"], "hot");
    let id = id_of(&resp);

    // The start's time is written on the machine in the background after the answer (null
    // until then: the machine's own times predate the request).
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    let view = loop {
        let (status, view) = env.get_session("alice", &format!("/sessions/{id}")).await;
        assert_eq!(status, StatusCode::OK, "{view}");
        if view["botStartSeconds"].is_number() {
            break view;
        }
        assert!(view["botStartSeconds"].is_null(), "{view}");
        assert!(
            tokio::time::Instant::now() < deadline,
            "never recorded: {view}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(view["startType"], "hot");
    let bot_start = view["botStartSeconds"].as_f64().unwrap();
    assert!(bot_start <= took, "{bot_start} s, the start took {took} s");
    assert_eq!(view["queueSeconds"].as_f64(), Some(0.0), "{view}");

    // One listing serves the replica for a second.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let alice = env.token("alice");
    let (hot, _) = list(&env, &alice, "?startType=hot").await;
    assert_eq!(hot, vec![view]);
    assert!(list(&env, &alice, "?startType=cold").await.0.is_empty());
}
