//! The whole flow with injected parts — the local provider and local rooms handed to
//! `App::with_parts` — driven through the router in-process: no socket anywhere.

use std::sync::Arc;

use botdispatch::config::Config;
use botdispatch::rooms::local::LocalRooms;
use botdispatch::rooms::RoomService;
use botdispatch::{build_router, App, AppState};
use providers::local::{LocalConfig, LocalProvider};
use providers::{MachineProvider, MachineState};
use reqwest::StatusCode;

use crate::common::*;

#[tokio::test]
async fn injected_parts_run_the_whole_flow_in_process() {
    let toml = "provider = \"local\"\nrooms = \"local\"\n[agents.default]\ncmd = [\"sh\", \"-c\", \"sleep 30\"]\n";
    let config = Config::parse(toml, &|k| {
        (k == "BOTDISPATCH_JWT_SECRET").then(|| JWT_SECRET.to_owned())
    })
    .unwrap();
    let provider = Arc::new(LocalProvider::new(LocalConfig::default()));
    let rooms = Arc::new(LocalRooms::new("default"));
    let app = Arc::new(App::with_parts(config, provider.clone(), rooms.clone()).unwrap());
    let router = || build_router(AppState(app.clone()));
    let bearer = format!("Bearer {}", hs_token("alice"));
    let auth = [
        ("authorization", bearer.as_str()),
        ("content-type", "application/json"),
    ];

    let (status, _, started) = oneshot(router(), "POST", "/start", &auth, b"{}".to_vec()).await;
    assert_eq!(status, StatusCode::OK, "{started}");
    let status_url = started["statusUrl"].as_str().unwrap();
    let key = session_key(started["sessionId"].as_str().unwrap()).to_owned();
    let room = format!("bd-default-{key}");
    assert!(
        rooms.find(&room).await.unwrap().is_some(),
        "the room was created"
    );
    let machine = provider.find(&key).await.unwrap().expect("the bot runs");
    assert_eq!(machine.state, MachineState::Started);

    let (status, _, view) = oneshot(router(), "GET", status_url, &auth, Vec::new()).await;
    assert_eq!(
        (status, view["status"].as_str()),
        (StatusCode::OK, Some("ready"))
    );

    let (status, _, stopped) = oneshot(router(), "DELETE", status_url, &auth, Vec::new()).await;
    assert_eq!(status, StatusCode::OK, "{stopped}");
    assert!(
        rooms.find(&room).await.unwrap().is_none(),
        "the room was deleted"
    );
    let machine = provider.status(&machine.handle).await.unwrap().unwrap();
    assert!(machine.state.is_terminal(), "{machine:?}");
}
