//! The authentication matrix: every kind of bad token is a 401 in the error shape, and nothing
//! is created for it.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use jsonwebtoken::{encode, Algorithm, EncodingKey, Header};
use reqwest::StatusCode;
use serde_json::{json, Value};

use crate::common::*;

fn hs256(claims: Value, secret: &str) -> String {
    encode(
        &Header::new(Algorithm::HS256),
        &claims,
        &EncodingKey::from_secret(secret.as_bytes()),
    )
    .unwrap()
}

fn fixture(name: &str) -> String {
    format!("{}/tests/fixtures/{name}", env!("CARGO_MANIFEST_DIR"))
}

/// Through the router in-process: no socket is needed to see a 401.
async fn assert_401(env: &TestEnv, header: Option<&str>, why: &str) {
    let mut headers = vec![("content-type", "application/json")];
    if let Some(h) = header {
        headers.push(("authorization", h));
    }
    let (status, resp_headers, body) = env
        .oneshot(
            "POST",
            "/start",
            &headers,
            start_body().to_string().into_bytes(),
        )
        .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{why}");
    assert_eq!(resp_headers["www-authenticate"], "Bearer", "{why}");
    assert_eq!(body["error"], "unauthorized", "{why}");
    assert!(
        body["detail"].is_string() && body["info"] == body["detail"],
        "{why}"
    );
}

#[tokio::test]
async fn bad_tokens_are_refused_with_401() {
    let env = TestEnv::start().await;
    let exp = now() + 600;
    let cases: Vec<(Option<String>, &str)> = vec![
        (None, "missing header"),
        (Some("Basic YWxpY2U6cHc=".into()), "not a bearer"),
        (Some("Bearer".into()), "empty bearer"),
        (Some("Bearer not.a.jwt".into()), "malformed"),
        (
            Some(format!(
                "Bearer {}",
                hs256(json!({"sub": "a", "exp": now() - 120}), JWT_SECRET)
            )),
            "expired",
        ),
        (
            Some(format!(
                "Bearer {}",
                hs256(
                    json!({"sub": "a", "exp": exp}),
                    "another-secret-0123456789abcdef0123"
                )
            )),
            "wrong signature",
        ),
        (
            Some(format!("Bearer {}", hs256(json!({"exp": exp}), JWT_SECRET))),
            "no sub",
        ),
        (
            Some(format!("Bearer {}", hs256(json!({"sub": "a"}), JWT_SECRET))),
            "no exp",
        ),
        (
            Some(format!(
                "Bearer {}",
                hs256(
                    json!({"sub": "a", "exp": exp, "nbf": now() + 600}),
                    JWT_SECRET
                )
            )),
            "not yet valid",
        ),
        (
            Some(format!(
                "Bearer {}",
                hs256(json!({"sub": "", "exp": exp}), JWT_SECRET)
            )),
            "empty sub",
        ),
    ];
    // alg: none, with and without a signature part.
    let none_header = URL_SAFE_NO_PAD.encode(r#"{"alg":"none","typ":"JWT"}"#);
    let claims = URL_SAFE_NO_PAD.encode(json!({"sub": "a", "exp": exp}).to_string());
    let none_tokens = [
        format!("Bearer {none_header}.{claims}."),
        format!("Bearer {none_header}.{claims}"),
    ];
    for (header, why) in &cases {
        assert_401(&env, header.as_deref(), why).await;
    }
    for token in &none_tokens {
        assert_401(&env, Some(token), "alg none").await;
    }
    assert_eq!(env.fly.machines().len(), 0);
    assert!(env.daily.rooms().is_empty());

    // And the control: a good token works.
    let good = format!(
        "Bearer {}",
        hs256(json!({"sub": "a", "exp": exp}), JWT_SECRET)
    );
    let resp = env
        .http
        .post(format!("{}/start", env.base))
        .header("authorization", good)
        .json(&start_body())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
}

#[tokio::test]
async fn audience_and_issuer_are_checked_when_configured() {
    let mut opts = Options::default();
    opts.env
        .push(("BOTDISPATCH_JWT_AUDIENCE", "botdispatch".into()));
    opts.env
        .push(("BOTDISPATCH_JWT_ISSUER", "https://auth.example".into()));
    let env = TestEnv::with(opts).await;
    let exp = now() + 600;
    for (claims, why) in [
        (
            json!({"sub": "a", "exp": exp, "iss": "https://auth.example"}),
            "no aud",
        ),
        (
            json!({"sub": "a", "exp": exp, "aud": "other", "iss": "https://auth.example"}),
            "wrong aud",
        ),
        (
            json!({"sub": "a", "exp": exp, "aud": "botdispatch", "iss": "https://evil.example"}),
            "wrong iss",
        ),
    ] {
        assert_401(
            &env,
            Some(&format!("Bearer {}", hs256(claims, JWT_SECRET))),
            why,
        )
        .await;
    }
    let good = hs256(
        json!({"sub": "a", "exp": exp, "aud": "botdispatch", "iss": "https://auth.example"}),
        JWT_SECRET,
    );
    let (status, _) = env
        .call("POST", "/start", Some(&good), Some(start_body()))
        .await;
    assert_eq!(status, StatusCode::OK);
    // Tokens minted by the service carry the configured aud/iss.
    let (status, _) = env.post_start("b", start_body()).await;
    assert_eq!(status, StatusCode::OK);
}

#[tokio::test]
async fn rs256_public_key_and_algorithm_confusion() {
    let mut opts = Options::default();
    opts.env
        .push(("BOTDISPATCH_JWT_PUBLIC_KEY_FILE", fixture("rsa-public.pem")));
    opts.env.push(("BOTDISPATCH_JWT_ALGORITHM", "RS256".into()));
    opts.env.push((
        "BOTDISPATCH_SESSION_SECRET",
        "session-secret-0123456789abcdef0123".into(),
    ));
    let env = TestEnv::with_without_jwt_secret(opts).await;
    let exp = now() + 600;
    let private = std::fs::read(fixture("rsa-private.pem")).unwrap();
    let rs = encode(
        &Header::new(Algorithm::RS256),
        &json!({"sub": "alice", "exp": exp}),
        &EncodingKey::from_rsa_pem(&private).unwrap(),
    )
    .unwrap();
    let (status, resp) = env
        .call("POST", "/start", Some(&rs), Some(start_body()))
        .await;
    assert_eq!(status, StatusCode::OK, "{resp}");

    // HS256 signed with the public key's PEM bytes as the secret: the classic confusion.
    let public = std::fs::read_to_string(fixture("rsa-public.pem")).unwrap();
    let confused = hs256(json!({"sub": "alice", "exp": exp}), &public);
    assert_401(&env, Some(&format!("Bearer {confused}")), "HS/RS confusion").await;
    // A token from a different key pair.
    let ec_private = std::fs::read(fixture("ec-private.pem")).unwrap();
    let es = encode(
        &Header::new(Algorithm::ES256),
        &json!({"sub": "alice", "exp": exp}),
        &EncodingKey::from_ec_pem(&ec_private).unwrap(),
    )
    .unwrap();
    assert_401(&env, Some(&format!("Bearer {es}")), "other algorithm").await;
}

#[tokio::test]
async fn es256_public_key() {
    let mut opts = Options::default();
    opts.env
        .push(("BOTDISPATCH_JWT_PUBLIC_KEY_FILE", fixture("ec-public.pem")));
    opts.env.push(("BOTDISPATCH_JWT_ALGORITHM", "ES256".into()));
    let env = TestEnv::with_without_jwt_secret(opts).await;
    let ec_private = std::fs::read(fixture("ec-private.pem")).unwrap();
    let es = encode(
        &Header::new(Algorithm::ES256),
        &json!({"sub": "alice", "exp": now() + 600}),
        &EncodingKey::from_ec_pem(&ec_private).unwrap(),
    )
    .unwrap();
    let (status, resp) = env
        .call("POST", "/start", Some(&es), Some(start_body()))
        .await;
    assert_eq!(status, StatusCode::OK, "{resp}");
    let url = resp["statusUrl"].as_str().unwrap();
    let (status, _) = env.call("GET", url, Some(&es), None).await;
    assert_eq!(status, StatusCode::OK);
}

/// A raw JWT with a header of our choosing, HS256-signed with the tests' secret.
fn with_header(header: Value, claims: Value) -> String {
    use hmac::{Hmac, Mac};
    let signing_input = format!(
        "{}.{}",
        URL_SAFE_NO_PAD.encode(header.to_string()),
        URL_SAFE_NO_PAD.encode(claims.to_string())
    );
    let mut mac = Hmac::<sha2::Sha256>::new_from_slice(JWT_SECRET.as_bytes()).unwrap();
    mac.update(signing_input.as_bytes());
    let signature = URL_SAFE_NO_PAD.encode(mac.finalize().into_bytes());
    format!("{signing_input}.{signature}")
}

#[tokio::test]
async fn reading_and_stopping_every_session_are_separate_scopes() {
    let env = TestEnv::start().await;
    let (_, resp) = env.post_start("bob", start_body()).await;
    let url = resp["statusUrl"].as_str().unwrap().to_owned();
    let token = |scope: &str| {
        hs256(
            json!({"sub": "ops", "exp": now() + 600, "scope": scope}),
            JWT_SECRET,
        )
    };
    // `admin` is no master key any more.
    let admin = token("admin");
    assert_eq!(
        env.call("GET", &url, Some(&admin), None).await.0,
        StatusCode::NOT_FOUND
    );
    assert_eq!(
        env.call("DELETE", &url, Some(&admin), None).await.0,
        StatusCode::NOT_FOUND
    );
    // Reading every session does not allow stopping them.
    let reader = token("sessions:read_any");
    assert_eq!(
        env.call("GET", &url, Some(&reader), None).await.0,
        StatusCode::OK
    );
    assert_eq!(
        env.call("DELETE", &url, Some(&reader), None).await.0,
        StatusCode::NOT_FOUND
    );
    assert_eq!(env.fly.live_machines().len(), 1);
    let stopper = token("sessions:stop_any");
    assert_eq!(
        env.call("GET", &url, Some(&stopper), None).await.0,
        StatusCode::NOT_FOUND
    );
    assert_eq!(
        env.call("DELETE", &url, Some(&stopper), None).await.0,
        StatusCode::OK
    );
    env.assert_nothing_left_within(std::time::Duration::from_secs(5))
        .await;

    // A token's agent limit applies to starts, whatever other scopes it carries.
    for claims in [
        json!({"sub": "ops", "exp": now() + 600, "scope": "admin sessions:read_any sessions:stop_any", "agents": ["support"]}),
        json!({"sub": "ops", "exp": now() + 600, "scope": "admin agent:support"}),
    ] {
        let (status, err) = env
            .call(
                "POST",
                "/start",
                Some(&hs256(claims, JWT_SECRET)),
                Some(start_body()),
            )
            .await;
        assert_eq!(status, StatusCode::FORBIDDEN, "{err}");
    }
}

#[tokio::test]
async fn aud_and_scope_may_be_strings_or_arrays() {
    let mut opts = Options::default();
    opts.env
        .push(("BOTDISPATCH_JWT_AUDIENCE", "botdispatch".into()));
    let env = TestEnv::with(opts).await;
    let exp = now() + 600;
    for claims in [
        json!({"sub": "a", "exp": exp, "aud": ["other", "botdispatch"]}),
        json!({"sub": "a", "exp": exp, "aud": "botdispatch", "scope": ["agent:default"]}),
        json!({"sub": "a", "exp": exp, "aud": ["botdispatch"], "scope": "agent:default"}),
    ] {
        let (status, resp) = env
            .call(
                "POST",
                "/start",
                Some(&hs256(claims.clone(), JWT_SECRET)),
                Some(start_body()),
            )
            .await;
        assert_eq!(status, StatusCode::OK, "{claims}: {resp}");
    }
    let (status, _) = env
        .call(
            "POST",
            "/start",
            Some(&hs256(
                json!({"sub": "a", "exp": exp, "aud": ["botdispatch"], "scope": ["agent:support"]}),
                JWT_SECRET,
            )),
            Some(start_body()),
        )
        .await;
    assert_eq!(
        status,
        StatusCode::FORBIDDEN,
        "an array scope limits agents too"
    );
    assert_401(
        &env,
        Some(&format!(
            "Bearer {}",
            hs256(
                json!({"sub": "a", "exp": exp, "aud": ["other"]}),
                JWT_SECRET
            )
        )),
        "no matching aud in the array",
    )
    .await;
}

#[tokio::test]
async fn tokens_with_critical_header_extensions_are_refused() {
    let env = TestEnv::start().await;
    let claims = json!({"sub": "a", "exp": now() + 600});
    let plain = with_header(json!({"alg": "HS256", "typ": "JWT"}), claims.clone());
    let (status, _) = env
        .call("POST", "/start", Some(&plain), Some(start_body()))
        .await;
    assert_eq!(
        status,
        StatusCode::OK,
        "the hand-built token is valid without crit"
    );
    let critical = with_header(
        json!({"alg": "HS256", "typ": "JWT", "crit": ["exp"]}),
        claims,
    );
    assert_401(&env, Some(&format!("Bearer {critical}")), "crit header").await;
}
