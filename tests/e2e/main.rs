//! End-to-end tests through the real HTTP server: one test binary (one link step) with a
//! module per area.

mod auth;
mod bad_input;
mod common;
mod embedded;
mod prism;
mod start_fly;
