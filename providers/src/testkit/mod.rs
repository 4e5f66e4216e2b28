//! Test kit for provider clients: stateful fakes of the Fly Machines and Daily REST APIs, a
//! strict OpenAPI request validator, fault injection, and a launcher for the Prism proxy.
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
pub mod prism;
pub mod spec;

pub use faults::{Fault, RecordedRequest};

use std::hash::{BuildHasher, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

/// Crockford base32 alphabet, as used by ULIDs (uppercase letters and digits, no I, L, O, U).
const CROCKFORD: &[u8; 32] = b"0123456789ABCDEFGHJKMNPQRSTVWXYZ";

/// A random `u64` for identifiers. Not cryptographic: std's randomly keyed SipHash over a
/// process-wide counter and the clock, so successive values never repeat within a process.
pub(crate) fn random_u64() -> u64 {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u64(COUNTER.fetch_add(1, Ordering::Relaxed));
    hasher.write_u128(
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or_default(),
    );
    hasher.finish()
}

/// `len` random lowercase hexadecimal characters.
pub(crate) fn random_hex(len: usize) -> String {
    let mut out = String::with_capacity(len + 16);
    while out.len() < len {
        out.push_str(&format!("{:016x}", random_u64()));
    }
    out.truncate(len);
    out
}

/// `len` random ASCII letters and digits.
pub(crate) fn random_alnum(len: usize) -> String {
    const ALNUM: &[u8; 62] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";
    (0..len)
        .map(|_| char::from(ALNUM[(random_u64() % 62) as usize]))
        .collect()
}

/// A ULID-like identifier: 26 uppercase Crockford base32 characters, 48 bits of milliseconds
/// followed by 80 random bits (so identifiers created later sort later).
pub(crate) fn ulid_like() -> String {
    let millis = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis())
        .unwrap_or_default();
    let random = (u128::from(random_u64()) << 64 | u128::from(random_u64())) & ((1 << 80) - 1);
    let value = (millis & ((1 << 48) - 1)) << 80 | random;
    (0..26)
        .rev()
        .map(|i| char::from(CROCKFORD[((value >> (i * 5)) & 31) as usize]))
        .collect()
}

/// A random version-4 UUID in its canonical lowercase hyphenated form.
pub(crate) fn uuid_v4() -> String {
    let hex = random_hex(32);
    let variant = ["8", "9", "a", "b"][(random_u64() % 4) as usize];
    format!(
        "{}-{}-4{}-{}{}-{}",
        &hex[0..8],
        &hex[8..12],
        &hex[13..16],
        variant,
        &hex[17..20],
        &hex[20..32]
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identifiers_have_the_documented_shapes() {
        let hex = random_hex(14);
        assert_eq!(hex.len(), 14);
        assert!(hex
            .chars()
            .all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase()));

        let ulid = ulid_like();
        assert_eq!(ulid.len(), 26);
        assert!(ulid.bytes().all(|b| CROCKFORD.contains(&b)));

        let uuid = uuid_v4();
        assert_eq!(uuid.len(), 36);
        assert_eq!(&uuid[14..15], "4");
        assert_eq!(uuid.matches('-').count(), 4);

        assert_eq!(random_alnum(20).len(), 20);
        assert_ne!(random_u64(), random_u64());
    }
}
