//! End-to-end tests through the real HTTP server: one test binary (one link step) with a
//! module per area.

// Each test states only how its set-up differs from the default; that reads best as assignments.
#![allow(clippy::field_reassign_with_default)]

mod auth;
mod bad_input;
mod boot;
mod client_js;
mod common;
mod cors;
mod deployments;
mod embedded;
mod healthcheck;
mod hostile;
mod in_process;
mod kubernetes;
mod observability;
mod pipecat_base;
mod prism;
mod providers;
mod queue;
mod resilience;
mod security;
mod session_api;
mod shards;
mod start_fly;
mod warm;
