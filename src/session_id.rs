//! Session ids: opaque to clients, verifiable by any replica without a database.
//!
//! The id a client receives is `<key>.<handle>.<tag>`: the plain session key (a ULID, also the
//! bot's `BOTDISPATCH_SESSION_ID` and the root of the room and machine names), the provider's
//! machine handle (base64url) so a status poll costs one provider read and never a list, and a
//! tag that binds both to the owner's `sub` and to the provider under an HMAC. A forged or
//! altered id, or another caller's id, fails verification and reads as "not found".

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use hmac::{Hmac, Mac};
use sha2::Sha256;

type HmacSha256 = Hmac<Sha256>;

const OWNER_TAG_LEN: usize = 8;
const MAC_LEN: usize = 16;

/// Signs and verifies session ids. Every replica must use the same key.
#[derive(Clone)]
pub struct SessionIds {
    key: Vec<u8>,
    provider: &'static str,
}

/// A verified session id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionRef {
    /// The plain session key.
    pub key: String,
    /// The provider's machine handle.
    pub handle: String,
    owner_tag: [u8; OWNER_TAG_LEN],
}

impl SessionIds {
    pub fn new(key: &[u8], provider: &'static str) -> Self {
        Self {
            key: key.to_vec(),
            provider,
        }
    }

    fn mac(&self) -> HmacSha256 {
        HmacSha256::new_from_slice(&self.key).expect("HMAC takes keys of any length")
    }

    fn owner_tag(&self, sub: &str) -> [u8; OWNER_TAG_LEN] {
        let mut mac = self.mac();
        mac.update(b"owner\0");
        mac.update(sub.as_bytes());
        let full = mac.finalize().into_bytes();
        let mut tag = [0; OWNER_TAG_LEN];
        tag.copy_from_slice(&full[..OWNER_TAG_LEN]);
        tag
    }

    fn body_mac(&self, key: &str, handle: &str, owner_tag: &[u8]) -> HmacSha256 {
        let mut mac = self.mac();
        for part in [
            b"v1".as_slice(),
            self.provider.as_bytes(),
            key.as_bytes(),
            handle.as_bytes(),
            owner_tag,
        ] {
            mac.update(&(part.len() as u32).to_be_bytes());
            mac.update(part);
        }
        mac
    }

    /// The session key of a start with an `Idempotency-Key`: the same for the same caller and
    /// key on every replica, unrelated across callers, shaped like any other key.
    pub fn idempotent_key(&self, sub: &str, idempotency_key: &str) -> String {
        let mut mac = self.mac();
        for part in [
            b"idempotency".as_slice(),
            sub.as_bytes(),
            idempotency_key.as_bytes(),
        ] {
            mac.update(&(part.len() as u32).to_be_bytes());
            mac.update(part);
        }
        let digest = mac.finalize().into_bytes();
        let mut bytes = [0u8; 16];
        bytes.copy_from_slice(&digest[..16]);
        ulid::Ulid::from(u128::from_be_bytes(bytes))
            .to_string()
            .to_ascii_lowercase()
    }

    /// The id handed to the owner `sub` for a session.
    pub fn encode(&self, key: &str, handle: &str, sub: &str) -> String {
        let owner_tag = self.owner_tag(sub);
        let mac = self
            .body_mac(key, handle, &owner_tag)
            .finalize()
            .into_bytes();
        let mut tag = owner_tag.to_vec();
        tag.extend_from_slice(&mac[..MAC_LEN]);
        format!(
            "{key}.{}.{}",
            URL_SAFE_NO_PAD.encode(handle),
            URL_SAFE_NO_PAD.encode(tag)
        )
    }

    /// Verifies an id's integrity (not its owner). `None` for anything we did not issue.
    pub fn decode(&self, id: &str) -> Option<SessionRef> {
        if id.len() > 1024 {
            return None;
        }
        let mut parts = id.split('.');
        let (key, handle, tag) = (parts.next()?, parts.next()?, parts.next()?);
        if parts.next().is_some() || !is_session_key(key) {
            return None;
        }
        let handle = String::from_utf8(URL_SAFE_NO_PAD.decode(handle).ok()?).ok()?;
        let tag = URL_SAFE_NO_PAD.decode(tag).ok()?;
        if tag.len() != OWNER_TAG_LEN + MAC_LEN {
            return None;
        }
        let (owner_tag, mac) = tag.split_at(OWNER_TAG_LEN);
        self.body_mac(key, &handle, owner_tag)
            .verify_truncated_left(mac)
            .ok()?;
        Some(SessionRef {
            key: key.to_owned(),
            handle,
            owner_tag: owner_tag.try_into().ok()?,
        })
    }

    /// Whether `sub` is the session's owner (constant-time).
    pub fn is_owner(&self, session: &SessionRef, sub: &str) -> bool {
        let expected = self.owner_tag(sub);
        expected
            .iter()
            .zip(session.owner_tag.iter())
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0
    }
}

/// A fresh, time-sortable, unguessable session key (ULID, lowercase: 48 bits of time, 80 random).
pub fn new_session_key() -> String {
    ulid::Ulid::new().to_string().to_ascii_lowercase()
}

fn is_session_key(key: &str) -> bool {
    key.len() == 26
        && key
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
}

/// The Daily room (and machine) name of a session: `bd-<key>`, valid in Daily
/// (`[A-Za-z0-9_-]`) and as a Fly machine name.
pub fn resource_name(key: &str) -> String {
    format!("bd-{key}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_owner_and_tamper() {
        let ids = SessionIds::new(b"k1", "fly");
        let key = new_session_key();
        let id = ids.encode(&key, "148ed193b95089", "alice");
        let r = ids.decode(&id).unwrap();
        assert_eq!(r.key, key);
        assert_eq!(r.handle, "148ed193b95089");
        assert!(ids.is_owner(&r, "alice"));
        assert!(!ids.is_owner(&r, "bob"));

        // Another key, another provider, or any changed character: not ours.
        assert!(SessionIds::new(b"k2", "fly").decode(&id).is_none());
        assert!(SessionIds::new(b"k1", "local").decode(&id).is_none());
        let forged = ids.encode(&key, "148ed193b95089", "alice").replace(
            &URL_SAFE_NO_PAD.encode("148ed193b95089"),
            &URL_SAFE_NO_PAD.encode("other"),
        );
        assert!(ids.decode(&forged).is_none());
        for bad in ["", "a.b.c", "x", &format!("{id}.x"), &id[..id.len() - 1]] {
            assert!(ids.decode(bad).is_none(), "{bad}");
        }
    }
}
