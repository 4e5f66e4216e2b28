//! Machine providers for botdispatch: one trait, [`MachineProvider`], implemented once per cloud.
//!
//! A provider launches exactly one machine (VM, task, container, process) per session, reports its
//! state, and destroys it. It never keeps the truth about a session in memory: everything a replica
//! needs to find a machine again is in the machine's own name and labels (Fly metadata, ECS tags,
//! Cloud Run env), so any dispatcher replica can answer for any session.
//!
//! This crate knows nothing about the service's HTTP handlers, auth or rooms (only its test kit
//! fakes Daily, for the service's tests); the service crate depends on it, never the other way
//! round. Besides the providers it holds what the service's own API clients
//! share with them: [`http`] plumbing, rate limits and retries ([`retry`]), the [`env`] overlay
//! and [`config`] types.

pub mod config;
pub mod env;
pub mod http;
pub mod labels;
pub mod resilient;
pub mod retry;

#[cfg(feature = "cloudrun")]
pub mod cloudrun;
#[cfg(feature = "fargate")]
pub mod fargate;
pub mod fly;
#[cfg(feature = "kubernetes")]
pub mod kubernetes;
pub mod local;

#[cfg(feature = "testkit")]
pub mod testkit;

mod deadline;
mod error;
mod machine;
mod provider;

use std::fmt;

use serde::Deserialize;

pub use config::{BuildContext, ConfigError, ProviderConfig, ProviderSettings};
pub use deadline::Deadline;
pub use error::{BoxError, ProviderError};
pub use labels::{LabelCodec, SessionLabels, Timings, MANAGED_BY};
pub use machine::{
    Guest, Launched, MachineState, MachineStatus, MachineTemplate, ReserveLabels, SessionBinding,
    StartType, Tier, Workload, HANDOFF_SECRET_ENV, RESERVED_ENV,
};
pub use provider::{HttpHandoff, MachineProvider, Relabel, Reserve};

/// A value that must never be printed: `Debug` and `Display` show `[redacted]`.
#[derive(Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }
    /// The secret itself, for the one place that must send it (a header, a signature).
    pub fn expose(&self) -> &str {
        &self.0
    }
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
    /// Constant-time comparison with what a client sent.
    pub fn matches(&self, candidate: &str) -> bool {
        let (a, b) = (self.0.as_bytes(), candidate.as_bytes());
        a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_never_print_and_compare_exactly() {
        let s = Secret::new("hunter2");
        assert_eq!(format!("{s:?} {s}"), "[redacted] [redacted]");
        assert!(s.matches("hunter2"));
        assert!(!s.matches("hunter3") && !s.matches("hunter") && !s.matches(""));
    }
}
