//! The bad-input matrix: each malformed request gets a clear 4xx in the one error shape, and no
//! machine or room is created for any of them.

use reqwest::StatusCode;
use serde_json::{json, Value};

use crate::common::*;

struct Case {
    why: &'static str,
    path: &'static str,
    content_type: Option<&'static str>,
    body: Vec<u8>,
    status: StatusCode,
    code: &'static str,
    /// A word the error text must contain, so the client learns what to fix.
    mentions: &'static str,
}

fn json_case(
    why: &'static str,
    body: Value,
    status: StatusCode,
    code: &'static str,
    mentions: &'static str,
) -> Case {
    Case {
        why,
        path: "/start",
        content_type: Some("application/json"),
        body: body.to_string().into_bytes(),
        status,
        code,
        mentions,
    }
}

#[tokio::test]
async fn bad_requests_get_clear_errors_and_create_nothing() {
    let mut opts = Options::default();
    opts.env
        .push(("BOTDISPATCH_ALLOWED_REGIONS", "iad,ord".into()));
    let env = TestEnv::with(opts).await;
    let big = "x".repeat(90 * 1024);
    let cases = vec![
        Case {
            why: "malformed JSON",
            path: "/start",
            content_type: Some("application/json"),
            body: b"{\"body\": {".to_vec(),
            status: StatusCode::BAD_REQUEST,
            code: "invalid_request",
            mentions: "JSON",
        },
        Case {
            why: "not JSON at all",
            path: "/start",
            content_type: Some("text/plain"),
            body: b"hello".to_vec(),
            status: StatusCode::UNSUPPORTED_MEDIA_TYPE,
            code: "unsupported_media_type",
            mentions: "application/json",
        },
        json_case(
            "wrong type",
            json!({"wait": "yes"}),
            StatusCode::BAD_REQUEST,
            "invalid_request",
            "boolean",
        ),
        json_case(
            "body not an object",
            json!({"body": [1, 2]}),
            StatusCode::BAD_REQUEST,
            "invalid_request",
            "map",
        ),
        json_case(
            "unknown field",
            json!({"bodyy": {}}),
            StatusCode::BAD_REQUEST,
            "invalid_request",
            "bodyy",
        ),
        json_case(
            "top level not an object",
            json!([1]),
            StatusCode::BAD_REQUEST,
            "invalid_request",
            "JSON",
        ),
        json_case(
            "room exp is the dispatcher's",
            json!({"dailyRoomProperties": {"exp": 1}}),
            StatusCode::BAD_REQUEST,
            "invalid_request",
            "dailyRoomProperties.exp",
        ),
        json_case(
            "token owner is the dispatcher's",
            json!({"dailyMeetingTokenProperties": {"is_owner": true}}),
            StatusCode::BAD_REQUEST,
            "invalid_request",
            "is_owner",
        ),
        json_case(
            "token property type",
            json!({"dailyMeetingTokenProperties": {"user_name": 7}}),
            StatusCode::BAD_REQUEST,
            "invalid_request",
            "user_name",
        ),
        json_case(
            "disallowed region",
            json!({"region": "syd"}),
            StatusCode::BAD_REQUEST,
            "invalid_request",
            "iad, ord",
        ),
        json_case(
            "body over 64 KiB",
            json!({"body": {"blob": "y".repeat(65 * 1024)}}),
            StatusCode::PAYLOAD_TOO_LARGE,
            "payload_too_large",
            "65536",
        ),
        json_case(
            "request over the limit",
            json!({"body": {"blob": big}}),
            StatusCode::PAYLOAD_TOO_LARGE,
            "payload_too_large",
            "larger",
        ),
        Case {
            why: "unknown agent",
            path: "/v1/public/ghost/start",
            content_type: Some("application/json"),
            body: b"{}".to_vec(),
            status: StatusCode::NOT_FOUND,
            code: "unknown_agent",
            mentions: "ghost",
        },
    ];
    let token = env.token("alice");
    let bearer = format!("Bearer {token}");
    for case in &cases {
        // Through the router in-process: the body limit, timeout and extractors are the
        // router's own layers; no socket is needed.
        let mut headers = vec![("authorization", bearer.as_str())];
        if let Some(ct) = case.content_type {
            headers.push(("content-type", ct));
        }
        let (status, _, err) = env
            .oneshot("POST", case.path, &headers, case.body.clone())
            .await;
        assert_eq!(status, case.status, "{}", case.why);
        assert_eq!(err["error"], case.code, "{}: {err}", case.why);
        let detail = err["detail"].as_str().unwrap();
        assert_eq!(err["info"], detail, "{}", case.why);
        assert!(
            detail.contains(case.mentions),
            "{}: {detail:?} should mention {:?}",
            case.why,
            case.mentions
        );
    }
    assert!(
        env.fly.requests().is_empty(),
        "no provider call for rejected requests"
    );
    assert!(env.daily.rooms().is_empty());

    // An allowed region reaches the machine; an empty body is a default start.
    let (status, resp) = env
        .call(
            "POST",
            "/start",
            Some(&token),
            Some(json!({"region": "ord"})),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{resp}");
    assert_eq!(env.fly.live_machines()[0].region, "ord");
    let resp = env
        .http
        .post(format!("{}/start", env.base))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
}

#[tokio::test]
async fn unknown_routes_and_methods_use_the_error_shape() {
    let env = TestEnv::start().await;
    let (status, _, err) = env.oneshot("GET", "/nope", &[], Vec::new()).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(err["error"], "not_found");
    let (status, _, err) = env.oneshot("GET", "/start", &[], Vec::new()).await;
    assert_eq!(status, StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(err["error"], "method_not_allowed");
    let (status, ok) = env.call("GET", "/healthz", None, None).await;
    assert_eq!(
        (status, ok["status"].as_str()),
        (StatusCode::OK, Some("ok"))
    );
    let (status, ready) = env.call("GET", "/readyz", None, None).await;
    assert_eq!(status, StatusCode::OK, "{ready}");
    assert_eq!(ready["provider"], "fly");
}
