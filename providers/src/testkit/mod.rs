//! Test kit for provider clients: stateful fakes of the Fly Machines, Daily, ECS and Cloud Run
//! APIs, validators of requests against each API's published description, fault injection, and a
//! launcher for the Prism proxy.
//!
//! Everything here is only compiled with the `testkit` feature and is meant for tests: the fakes
//! bind to `127.0.0.1:0`, run on the caller's tokio runtime and keep all state in memory.

#[cfg(feature = "cloudrun")]
pub mod cloudrun_fake;
pub mod contract;
pub mod daily_fake;
#[cfg(feature = "fargate")]
pub mod ecs_fake;
pub mod faults;
pub mod fly_fake;
#[cfg(feature = "kubernetes")]
pub mod kube_fake;
pub mod prism;
mod server;
pub mod validate;

pub use faults::{Fault, RecordedRequest};

use rand::Rng;

/// Lowercase hexadecimal digits, for identifiers such as Fly machine ids.
pub(crate) const LOWER_HEX: &[u8] = b"0123456789abcdef";

/// `len` characters drawn uniformly from `alphabet` (ASCII), for identifiers of a fixed shape.
pub(crate) fn random_string(alphabet: &[u8], len: usize) -> String {
    let mut rng = rand::rng();
    (0..len)
        .map(|_| char::from(alphabet[rng.random_range(0..alphabet.len())]))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn random_strings_draw_from_the_alphabet() {
        let hex = random_string(LOWER_HEX, 14);
        assert_eq!(hex.len(), 14);
        assert!(hex.bytes().all(|b| LOWER_HEX.contains(&b)));
        assert_ne!(random_string(LOWER_HEX, 32), random_string(LOWER_HEX, 32));
        assert_eq!(random_string(b"a", 3), "aaa");
    }
}
