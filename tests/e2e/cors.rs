//! Browser clients: the opt-in CORS allow-list (`cors_allowed_origins`). Driven in-process
//! through the router, as a browser's preflight and request would arrive.

use std::collections::BTreeMap;

use axum::http::{HeaderMap, StatusCode};
use botdispatch::{build_router, AppState};
use serde_json::json;

use crate::common::{config_from, Options, TestEnv};

const APP_ORIGIN: &str = "https://app.example.com";

async fn env_with(origins: Option<&str>) -> TestEnv {
    let mut opts = Options::default();
    if let Some(origins) = origins {
        opts.env
            .push(("BOTDISPATCH_CORS_ALLOWED_ORIGINS", origins.to_owned()));
    }
    TestEnv::with(opts).await
}

/// One request through the router: status, headers and the raw body (a preflight has none).
async fn send(
    env: &TestEnv,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> (StatusCode, HeaderMap, Vec<u8>) {
    use http_body_util::BodyExt;
    use tower::ServiceExt;
    let mut req = axum::http::Request::builder().method(method).uri(path);
    for (name, value) in headers {
        req = req.header(*name, *value);
    }
    let req = req.body(axum::body::Body::from(body.to_owned())).unwrap();
    let router = build_router(AppState(env.app.clone()));
    let (parts, body) = router.oneshot(req).await.unwrap().into_parts();
    let bytes = body.collect().await.unwrap().to_bytes().to_vec();
    (parts.status, parts.headers, bytes)
}

fn header<'a>(headers: &'a HeaderMap, name: &str) -> &'a str {
    headers.get(name).map(|v| v.to_str().unwrap()).unwrap_or("")
}

async fn preflight(env: &TestEnv, origin: &str) -> (StatusCode, HeaderMap) {
    let (status, headers, _) = send(
        env,
        "OPTIONS",
        "/start",
        &[
            ("origin", origin),
            ("access-control-request-method", "POST"),
            (
                "access-control-request-headers",
                "authorization,content-type,idempotency-key",
            ),
        ],
        "",
    )
    .await;
    (status, headers)
}

#[tokio::test]
async fn an_allowed_origin_passes_the_preflight() {
    let env = env_with(Some("https://app.example.com,http://localhost:5173")).await;
    let (status, headers) = preflight(&env, APP_ORIGIN).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(header(&headers, "access-control-allow-origin"), APP_ORIGIN);
    let methods = header(&headers, "access-control-allow-methods").to_ascii_uppercase();
    assert!(
        methods.contains("POST") && methods.contains("DELETE"),
        "{methods}"
    );
    let allowed = header(&headers, "access-control-allow-headers").to_ascii_lowercase();
    for name in ["authorization", "content-type", "idempotency-key"] {
        assert!(allowed.contains(name), "{name} in {allowed}");
    }
    assert_eq!(header(&headers, "access-control-max-age"), "7200");
    assert_eq!(
        header(&headers, "access-control-allow-credentials"),
        "",
        "bearer tokens, no cookies: credentials mode stays off"
    );
    let (_, local) = preflight(&env, "http://localhost:5173").await;
    assert_eq!(
        header(&local, "access-control-allow-origin"),
        "http://localhost:5173"
    );
}

#[tokio::test]
async fn another_origin_gets_no_cors_headers() {
    let env = env_with(Some(APP_ORIGIN)).await;
    for origin in [
        "https://evil.example.com",
        "https://app.example.com.evil.net",
        "http://app.example.com",
    ] {
        let (_, headers) = preflight(&env, origin).await;
        assert_eq!(
            header(&headers, "access-control-allow-origin"),
            "",
            "{origin}"
        );
        let (_, headers, _) = send(&env, "GET", "/healthz", &[("origin", origin)], "").await;
        assert_eq!(
            header(&headers, "access-control-allow-origin"),
            "",
            "{origin}"
        );
    }
}

#[tokio::test]
async fn a_browser_start_and_its_errors_are_readable() {
    let env = env_with(Some(APP_ORIGIN)).await;
    let token = env.token("web-user");
    let auth = format!("Bearer {token}");
    let (status, headers, body) = send(
        &env,
        "POST",
        "/start",
        &[
            ("origin", APP_ORIGIN),
            ("authorization", &auth),
            ("content-type", "application/json"),
        ],
        &json!({"body": {"from": "browser"}}).to_string(),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{}", String::from_utf8_lossy(&body));
    assert_eq!(header(&headers, "access-control-allow-origin"), APP_ORIGIN);
    let exposed = header(&headers, "access-control-expose-headers").to_ascii_lowercase();
    assert!(
        exposed.contains("x-request-id") && exposed.contains("retry-after"),
        "{exposed}"
    );
    // An error answer carries the headers too, so the page can show `info`.
    let (status, headers, body) =
        send(&env, "POST", "/start", &[("origin", APP_ORIGIN)], "{}").await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert_eq!(header(&headers, "access-control-allow-origin"), APP_ORIGIN);
    let error: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(error["error"], "unauthorized");
}

#[tokio::test]
async fn any_origin_with_a_star() {
    let env = env_with(Some("*")).await;
    let (status, headers) = preflight(&env, "https://anywhere.example").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(header(&headers, "access-control-allow-origin"), "*");
}

#[tokio::test]
async fn without_an_allow_list_nothing_changes() {
    let env = env_with(None).await;
    let (status, headers, body) = send(
        &env,
        "OPTIONS",
        "/start",
        &[
            ("origin", APP_ORIGIN),
            ("access-control-request-method", "POST"),
        ],
        "",
    )
    .await;
    assert_eq!(status, StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(header(&headers, "access-control-allow-origin"), "");
    let error: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(error["error"], "method_not_allowed");
    let (_, headers, _) = send(&env, "GET", "/healthz", &[("origin", APP_ORIGIN)], "").await;
    assert_eq!(header(&headers, "access-control-allow-origin"), "");
}

#[test]
fn origins_that_never_match_are_refused_at_start_up() {
    let refused = |origins: &str| {
        let env = BTreeMap::from([("BOTDISPATCH_CORS_ALLOWED_ORIGINS", origins.to_owned())]);
        config_from("", &env).expect_err(origins)
    };
    for bad in [
        "https://app.example.com/",
        "https://app.example.com/app",
        "app.example.com",
        "ftp://app.example.com",
        "https://App.Example.com",
        "https://app.example.com,*",
    ] {
        let message = refused(bad);
        assert!(
            message.contains("BOTDISPATCH_CORS_ALLOWED_ORIGINS"),
            "{bad}: {message}"
        );
    }
    assert!(
        refused("https://app.example.com/").contains("did you mean \"https://app.example.com\"")
    );
    let ok = BTreeMap::from([(
        "BOTDISPATCH_CORS_ALLOWED_ORIGINS",
        "https://app.example.com, http://localhost:5173".to_owned(),
    )]);
    let config = config_from("", &ok).unwrap();
    assert_eq!(
        config.cors_allowed_origins,
        ["https://app.example.com", "http://localhost:5173"]
    );
    let toml = config_from(
        "cors_allowed_origins = [\"https://app.example.com\"]",
        &BTreeMap::new(),
    )
    .unwrap();
    assert_eq!(toml.cors_allowed_origins, ["https://app.example.com"]);
}
