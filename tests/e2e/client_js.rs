//! Compatibility with the real Pipecat JavaScript client: tests/client-js/start-bot.mjs runs
//! `@pipecat-ai/client-js` (startBotAndConnect / startBot) and the Daily transport's own reading
//! of the answer against the real botdispatch binary in its embedded default (local bots, local
//! rooms), and prints what the client received.
//!
//! Needs `node` and the npm test peers (`npm ci`, which scripts/test runs). Without them the
//! test fails and says how to install them: it is never reported as passed without running.

use std::path::Path;
use std::time::Duration;

use base64::Engine;
use reqwest::StatusCode;
use serde_json::{json, Value};

use crate::common::Dispatcher;

const NODE_TIMEOUT: Duration = Duration::from_secs(60);

fn peers_installed(root: &Path) -> bool {
    ["@pipecat-ai/client-js", "@pipecat-ai/daily-transport"]
        .iter()
        .all(|p| {
            root.join("node_modules")
                .join(p)
                .join("package.json")
                .is_file()
        })
}

/// Runs the Node script; its JSON lines by `case`.
async fn run_client(root: &Path, base: &str, token: &str) -> (Value, Value, Value) {
    let mut cmd = tokio::process::Command::new("node");
    cmd.arg(root.join("tests/client-js/start-bot.mjs"))
        .current_dir(root)
        // The token travels in the environment, not on the command line.
        .env("BOTDISPATCH_URL", base)
        .env("BOTDISPATCH_TOKEN", token)
        .kill_on_drop(true);
    let out = tokio::time::timeout(NODE_TIMEOUT, cmd.output())
        .await
        .expect("the client script finishes")
        .expect("node runs (is Node.js installed?)");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "client script failed ({}):\n{stdout}\n{stderr}",
        out.status
    );
    let mut cases: Vec<Value> = stdout
        .lines()
        .filter(|l| l.starts_with('{'))
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON: {l}: {e}")))
        .collect();
    let mut take = |name: &str| {
        let i = cases
            .iter()
            .position(|c| c["case"] == name)
            .unwrap_or_else(|| panic!("no {name:?} line in:\n{stdout}\n{stderr}"));
        cases.remove(i)
    };
    (take("start"), take("unknown_field"), take("bad_token"))
}

fn jwt_claims(token: &str) -> Value {
    let payload = token.split('.').nth(1).expect("a JWT has a payload");
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload)
        .expect("base64url payload");
    serde_json::from_slice(&bytes).expect("JSON claims")
}

/// botdispatch's own error answer to the same request, read directly.
async fn direct_error(base: &str, bearer: &str, body: Value) -> (StatusCode, Value) {
    let resp = reqwest::Client::new()
        .post(format!("{base}/start"))
        .bearer_auth(bearer)
        .json(&body)
        .send()
        .await
        .unwrap();
    let status = resp.status();
    (status, resp.json().await.unwrap())
}

#[tokio::test]
async fn pipecat_client_js_starts_a_session_and_shows_botdispatch_errors() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    // Never skipped: a test that cannot run must not read as passed.
    assert!(
        peers_installed(root),
        "node_modules/@pipecat-ai/client-js and daily-transport are missing: run ./scripts/test (it runs `npm ci`)"
    );

    let mut d = Dispatcher::spawn(&[]);
    let (base, token) = d.wait_dev_banner();

    let (start, unknown_field, bad_token) = run_client(root, &base, &token).await;

    // The start: what the client got back, and what the Daily transport would join with.
    assert_eq!(start["ok"], true, "{start}");
    assert_eq!(start["botStartedCalls"], 1, "{start}");
    assert_eq!(start["state"], "ready", "connect() completed: {start}");
    let response = &start["response"];
    let room = response["dailyRoom"].as_str().expect("dailyRoom");
    let user_token = response["dailyToken"].as_str().expect("dailyToken");
    assert!(
        room.starts_with("https://local-rooms.invalid/bd-"),
        "{room}"
    );
    assert_eq!(response["room_url"], room, "both spellings of the room");
    assert_eq!(response["token"], user_token, "both spellings of the token");
    assert_eq!(response["status"], "ready");
    let session_id = response["sessionId"].as_str().expect("sessionId");
    assert_eq!(
        response["statusUrl"],
        format!("/sessions/{session_id}").as_str()
    );
    let transport = &start["transport"];
    assert_eq!(
        transport["url"], room,
        "the Daily transport joins the room botdispatch created: {transport}"
    );
    assert_eq!(
        transport["token"], user_token,
        "the Daily transport joins with the user token: {transport}"
    );
    let room_name = room.rsplit('/').next().unwrap();
    let claims = jwt_claims(user_token);
    assert_eq!(claims["r"], room_name, "{claims}");
    assert_eq!(
        claims["o"], false,
        "the client gets a non-owner token: {claims}"
    );

    // The session is real: its bot process got the same room and the client's requestData body.
    let key = session_id.split('.').next().unwrap();
    d.wait_for(
        &format!("[local-bot {key}] started: DAILY_ROOM_URL={room}"),
        Duration::from_secs(10),
    );
    d.wait_for(
        &format!(
            "[local-bot {key}] BOTDISPATCH_BODY={{\"from\":\"client-js\",\"greeting\":\"Hello from the Pipecat JS client\"}}"
        ),
        Duration::from_secs(5),
    );

    // Refusals surface with botdispatch's own text (client-js shows `info ?? detail`).
    let (status, direct) = direct_error(&base, &token, json!({"body": {}, "colour": "blue"})).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(direct["error"], "invalid_request");
    assert_eq!(direct["info"], direct["detail"]);
    assert_eq!(unknown_field["ok"], false, "{unknown_field}");
    assert_eq!(
        unknown_field["error"]["startBotError"], true,
        "{unknown_field}"
    );
    assert_eq!(unknown_field["error"]["status"], 400, "{unknown_field}");
    assert_eq!(
        unknown_field["error"]["message"], direct["info"],
        "StartBotError carries botdispatch's text"
    );
    assert_eq!(
        unknown_field["onError"], direct["info"],
        "onError shows it too"
    );
    assert!(
        direct["info"].as_str().unwrap().contains("colour"),
        "the text names the unknown field: {direct}"
    );

    let (status, direct) = direct_error(&base, "not-a-jwt", json!({"body": {}})).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert_eq!(bad_token["error"]["startBotError"], true, "{bad_token}");
    assert_eq!(bad_token["error"]["status"], 401, "{bad_token}");
    assert_eq!(bad_token["error"]["message"], direct["info"], "{bad_token}");
    assert_eq!(bad_token["onError"], direct["info"], "{bad_token}");

    // End the session the client started; its bot leaves.
    let resp = reqwest::Client::new()
        .delete(format!("{base}{}", response["statusUrl"].as_str().unwrap()))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    d.wait_for(
        &format!("[local-bot {key}] SIGTERM: leaving the room"),
        Duration::from_secs(10),
    );
    assert!(
        !d.output().contains(user_token),
        "the user token leaked into the dispatcher's output"
    );
}
