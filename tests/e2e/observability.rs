//! Operability: metrics move with real sessions, request ids are echoed, the committed OpenAPI
//! document matches the code, and `botdispatch check` fails clearly on a wrong key.

use std::process::Command;

use reqwest::StatusCode;
use serde_json::Value;

use crate::common::*;

/// The value of one sample line of a Prometheus exposition (first match of all `parts`).
/// The sum of every sample whose line contains all of `parts` (other tests in this process
/// add series with other label values).
fn sample(text: &str, parts: &[&str]) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| parts.iter().all(|p| l.contains(p)))
        .filter_map(|l| l.rsplit(' ').next())
        .filter_map(|v| v.parse::<f64>().ok())
        .sum()
}

#[tokio::test]
async fn metrics_move_with_sessions() {
    let mut opts = Options::default();
    opts.env
        .push(("BOTDISPATCH_METRICS_TOKEN", "metrics-secret".into()));
    let env = TestEnv::with(opts).await;
    let scrape = || async {
        let resp = env
            .http
            .get(format!("{}/metrics", env.base))
            .bearer_auth("metrics-secret")
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
        resp.text().await.unwrap()
    };
    let before = scrape().await;
    let count = |text: &str| {
        sample(
            text,
            &[
                "botdispatch_start_duration_seconds_count",
                "provider=\"fly\"",
                "outcome=\"ready\"",
            ],
        )
    };
    for _ in 0..3 {
        let (status, _) = env.post_start("alice", start_body()).await;
        assert_eq!(status, StatusCode::OK);
    }
    let after = scrape().await;
    // Other tests in this process share the registry: at least our three.
    assert!(count(&after) >= count(&before) + 3.0, "{after}");
    for phase in ["room", "launch", "wait", "total"] {
        assert!(
            sample(
                &after,
                &[
                    "botdispatch_start_phase_duration_seconds_count",
                    &format!("phase=\"{phase}\"")
                ]
            ) >= 3.0,
            "phase {phase}: {after}"
        );
    }
    assert!(
        sample(
            &after,
            &[
                "botdispatch_provider_calls_total",
                "op=\"launch\"",
                "outcome=\"ok\""
            ]
        ) >= 3.0
    );
    assert!(
        sample(
            &after,
            &[
                "botdispatch_daily_calls_total",
                "op=\"create room\"",
                "outcome=\"ok\""
            ]
        ) >= 3.0
    );
    // Buckets chosen for the workload, from 10 ms to 120 s.
    assert!(
        after.contains("botdispatch_start_duration_seconds_bucket{")
            && after.contains("le=\"0.01\"")
            && after.contains("le=\"120\"")
    );
    // Bounded labels only: no session id anywhere.
    assert!(!after.contains("bd-"), "a session id leaked into a label");

    let resp = env
        .http
        .get(format!("{}/metrics", env.base))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);
}

#[tokio::test]
async fn request_ids_are_set_and_echoed() {
    let env = TestEnv::start().await;
    let resp = env
        .http
        .get(format!("{}/healthz", env.base))
        .send()
        .await
        .unwrap();
    let id = resp.headers()["x-request-id"].to_str().unwrap().to_owned();
    assert_eq!(id.len(), 36, "a UUID: {id}");
    let resp = env
        .http
        .get(format!("{}/healthz", env.base))
        .header("x-request-id", "client-chosen-id")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.headers()["x-request-id"], "client-chosen-id");
}

#[tokio::test]
async fn committed_openapi_matches_the_code() {
    let committed =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/openapi.json"))
            .expect("docs/openapi.json is committed");
    let generated = botdispatch::api::openapi::document();
    assert!(
        committed == generated,
        "docs/openapi.json is out of date: run `cargo run -- openapi > docs/openapi.json`"
    );
    let env = TestEnv::start().await;
    let (status, served) = env.call("GET", "/openapi.json", None, None).await;
    assert_eq!(status, StatusCode::OK);
    let committed: Value = serde_json::from_str(&committed).unwrap();
    assert_eq!(served, committed);
    assert_eq!(served["openapi"], "3.1.0");
    for path in [
        "/start",
        "/v1/public/{agent}/start",
        "/sessions/{id}",
        "/healthz",
        "/readyz",
        "/metrics",
    ] {
        assert!(served["paths"][path].is_object(), "{path} missing");
    }
    // The rendered table in docs/api.md lists every operation of the document.
    let api_md =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/api.md")).unwrap();
    for (path, ops) in served["paths"].as_object().unwrap() {
        for method in ops.as_object().unwrap().keys() {
            let row = format!("| {} | `{path}` |", method.to_uppercase());
            assert!(api_md.contains(&row), "docs/api.md lacks {row}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_passes_with_good_keys_and_fails_clearly_with_a_wrong_daily_key() {
    let (fly, daily) = start_fakes(&Options::default().fly).await;
    let base_env = process_env(&fly, &daily);
    let run = move |overrides: Vec<(&'static str, String)>| {
        let mut env = base_env.clone();
        env.extend(overrides);
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_botdispatch"));
        cmd.arg("check").env_clear();
        for (k, v) in env {
            cmd.env(k, v);
        }
        cmd.output().unwrap()
    };
    let good = tokio::task::spawn_blocking({
        let run = run.clone();
        move || run(vec![])
    })
    .await
    .unwrap();
    let out = String::from_utf8_lossy(&good.stdout).to_string();
    assert!(
        good.status.success(),
        "{out}{}",
        String::from_utf8_lossy(&good.stderr)
    );
    assert!(out.lines().all(|l| l.starts_with("PASS")), "{out}");

    let bad = tokio::task::spawn_blocking(move || run(vec![("DAILY_API_KEY", "wrong-key".into())]))
        .await
        .unwrap();
    let out = String::from_utf8_lossy(&bad.stdout).to_string();
    assert!(!bad.status.success(), "{out}");
    let daily_line = out
        .lines()
        .find(|l| l.contains("rooms (daily)"))
        .expect("a rooms row");
    assert!(
        daily_line.starts_with("FAIL") && daily_line.contains("401"),
        "{out}"
    );
    assert!(
        out.lines()
            .any(|l| l.starts_with("PASS") && l.contains("provider (fly)")),
        "{out}"
    );
    assert!(
        !out.contains("wrong-key"),
        "the key itself is never printed"
    );
}
