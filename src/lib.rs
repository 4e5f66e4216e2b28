//! botdispatch: starts one isolated bot machine per voice-AI session.
//!
//! `main` only parses the CLI, loads config and serves [`build_router`]; everything else lives
//! here so tests drive the same code in-process.

pub mod api;
pub mod app;
pub mod auth;
pub mod capacity;
pub mod check;
pub mod config;
pub mod error;
pub mod example_bot;
pub mod handoff;
pub mod healthcheck;
pub mod metrics;
pub mod reaper;
pub mod reserve;
pub mod rooms;
pub mod server;
pub mod session_id;
pub mod sessions;
pub mod telemetry;

pub use api::build_router;
pub use app::{App, AppState};
