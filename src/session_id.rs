//! Session ids: opaque to clients, verifiable by any replica without a database; and the names
//! of a session's room and machine.
//!
//! The id a client receives is `<key>.<handle>.<tag>`: the plain session key (a ULID, also the
//! bot's `BOTDISPATCH_SESSION_ID` and the root of the room and machine names), the provider's
//! machine handle (base64url) so a status poll costs one provider read and never a list, and a
//! tag that binds both to the owner's `sub`, the provider and the deployment under an HMAC. A
//! forged or altered id, or another caller's id, fails verification and reads as "not found".
//!
//! Keys rotate: the first key signs, every key verifies, so a new key can be rolled out before
//! the old one is retired without orphaning live sessions.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use hmac::{Hmac, Mac};
use sha2::Sha256;

type HmacSha256 = Hmac<Sha256>;

const OWNER_TAG_LEN: usize = 8;
const MAC_LEN: usize = 16;

/// Signs and verifies session ids. Every replica of a deployment must use the same keys.
#[derive(Clone)]
pub struct SessionIds {
    /// The first signs; all verify.
    keys: Vec<Vec<u8>>,
    provider: &'static str,
    deployment: String,
}

/// A verified session id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionRef {
    /// The plain session key.
    pub key: String,
    /// The provider's machine handle.
    pub handle: String,
    owner_tag: [u8; OWNER_TAG_LEN],
    /// Which of the keys verified it.
    signer: usize,
}

impl SessionIds {
    /// `keys`: the signing key first, then keys that still verify. At least one.
    pub fn new(keys: Vec<Vec<u8>>, provider: &'static str, deployment: &str) -> Self {
        assert!(!keys.is_empty(), "session ids need a key");
        Self {
            keys,
            provider,
            deployment: deployment.to_owned(),
        }
    }

    fn mac(key: &[u8]) -> HmacSha256 {
        HmacSha256::new_from_slice(key).expect("HMAC takes keys of any length")
    }

    fn owner_mac(key: &[u8], sub: &str) -> HmacSha256 {
        let mut mac = Self::mac(key);
        mac.update(b"owner\0");
        mac.update(sub.as_bytes());
        mac
    }

    fn body_mac(&self, key: &[u8], session: &str, handle: &str, owner_tag: &[u8]) -> HmacSha256 {
        let mut mac = Self::mac(key);
        for part in [
            b"v2".as_slice(),
            self.provider.as_bytes(),
            self.deployment.as_bytes(),
            session.as_bytes(),
            handle.as_bytes(),
            owner_tag,
        ] {
            mac.update(&(part.len() as u32).to_be_bytes());
            mac.update(part);
        }
        mac
    }

    /// The session key of a start with an `Idempotency-Key`: the same for the same caller and
    /// key on every replica, unrelated across callers, shaped like any other key. (Derived with
    /// the signing key: a retry that straddles a key rotation starts a new session.)
    pub fn idempotent_key(&self, sub: &str, idempotency_key: &str) -> String {
        let mut mac = Self::mac(&self.keys[0]);
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

    /// The id handed to the owner `sub` for a session, signed with the first key.
    pub fn encode(&self, session: &str, handle: &str, sub: &str) -> String {
        let key = &self.keys[0];
        let owner = Self::owner_mac(key, sub).finalize().into_bytes();
        let owner_tag = &owner[..OWNER_TAG_LEN];
        let mac = self
            .body_mac(key, session, handle, owner_tag)
            .finalize()
            .into_bytes();
        let mut tag = owner_tag.to_vec();
        tag.extend_from_slice(&mac[..MAC_LEN]);
        format!(
            "{session}.{}.{}",
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
        let (session, handle, tag) = (parts.next()?, parts.next()?, parts.next()?);
        if parts.next().is_some() || !is_session_key(session) {
            return None;
        }
        let handle = String::from_utf8(URL_SAFE_NO_PAD.decode(handle).ok()?).ok()?;
        let tag = URL_SAFE_NO_PAD.decode(tag).ok()?;
        if tag.len() != OWNER_TAG_LEN + MAC_LEN {
            return None;
        }
        let (owner_tag, mac) = tag.split_at(OWNER_TAG_LEN);
        let signer = self.keys.iter().position(|key| {
            self.body_mac(key, session, &handle, owner_tag)
                .verify_truncated_left(mac)
                .is_ok()
        })?;
        Some(SessionRef {
            key: session.to_owned(),
            handle,
            owner_tag: owner_tag.try_into().ok()?,
            signer,
        })
    }

    /// Whether `sub` is the session's owner (constant-time, by the HMAC crate).
    pub fn is_owner(&self, session: &SessionRef, sub: &str) -> bool {
        Self::owner_mac(&self.keys[session.signer], sub)
            .verify_truncated_left(&session.owner_tag)
            .is_ok()
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

/// The Daily room (and machine) name of a session of `deployment`: `bd-<deployment>-<key>`,
/// valid in Daily (`[A-Za-z0-9_-]`, at most 128 characters), as a Fly machine name and as a
/// Kubernetes object name (deployments have at most 20 characters: at most 50 in all).
pub fn resource_name(deployment: &str, key: &str) -> String {
    format!("bd-{deployment}-{key}")
}

/// The session key of a room or machine named by [`resource_name`] for `deployment`; `None`
/// for any other name (another deployment's, whose name may start alike, included).
pub fn session_key_of<'a>(deployment: &str, name: &'a str) -> Option<&'a str> {
    let key = name
        .strip_prefix("bd-")?
        .strip_prefix(deployment)?
        .strip_prefix('-')?;
    is_session_key(key).then_some(key)
}

/// The name of a room created ahead for a replica's room pool: `bd-<deployment>-p<key>`.
pub fn pool_room_name(deployment: &str) -> String {
    format!("bd-{deployment}-p{}", new_session_key())
}

/// The kinds of room a deployment creates.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RoomKind {
    /// Named after its session ([`resource_name`]).
    Session,
    /// Created ahead for a room pool ([`pool_room_name`]), then given to some session.
    Pooled,
}

/// Which of `deployment`'s rooms `name` is; `None` for any other room.
pub fn room_kind(deployment: &str, name: &str) -> Option<RoomKind> {
    if session_key_of(deployment, name).is_some() {
        return Some(RoomKind::Session);
    }
    let key = name
        .strip_prefix("bd-")?
        .strip_prefix(deployment)?
        .strip_prefix("-p")?;
    is_session_key(key).then_some(RoomKind::Pooled)
}

/// The name of the reserve machine of `deployment` in `slot`, for `fingerprint`, made in time
/// window `window`: replicas filling the same slot in the same window pick the same name.
pub fn reserve_machine_name(deployment: &str, slot: u32, fingerprint: &str, window: u64) -> String {
    format!("bd-{deployment}-r{slot}-{fingerprint}-{window}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_owner_and_tamper() {
        let ids = SessionIds::new(vec![b"k1".to_vec()], "fly", "default");
        let key = new_session_key();
        let id = ids.encode(&key, "148ed193b95089", "alice");
        let r = ids.decode(&id).unwrap();
        assert_eq!(r.key, key);
        assert_eq!(r.handle, "148ed193b95089");
        assert!(ids.is_owner(&r, "alice"));
        assert!(!ids.is_owner(&r, "bob"));

        // Another key, provider or deployment, or any changed character: not ours.
        let other = |key: &[u8], provider, deployment| {
            SessionIds::new(vec![key.to_vec()], provider, deployment)
        };
        assert!(other(b"k2", "fly", "default").decode(&id).is_none());
        assert!(other(b"k1", "local", "default").decode(&id).is_none());
        assert!(other(b"k1", "fly", "staging").decode(&id).is_none());
        let forged = ids.encode(&key, "148ed193b95089", "alice").replace(
            &URL_SAFE_NO_PAD.encode("148ed193b95089"),
            &URL_SAFE_NO_PAD.encode("other"),
        );
        assert!(ids.decode(&forged).is_none());
        for bad in ["", "a.b.c", "x", &format!("{id}.x"), &id[..id.len() - 1]] {
            assert!(ids.decode(bad).is_none(), "{bad}");
        }
    }

    #[test]
    fn the_first_key_signs_and_all_verify() {
        let old = SessionIds::new(vec![b"old".to_vec()], "fly", "default");
        let rotating = SessionIds::new(vec![b"new".to_vec(), b"old".to_vec()], "fly", "default");
        let key = new_session_key();
        let old_id = old.encode(&key, "m1", "alice");
        let r = rotating
            .decode(&old_id)
            .expect("the old key still verifies");
        assert!(rotating.is_owner(&r, "alice") && !rotating.is_owner(&r, "bob"));
        let new_id = rotating.encode(&key, "m1", "alice");
        assert!(old.decode(&new_id).is_none(), "the new key signs");
    }

    #[test]
    fn names_carry_the_deployment_exactly() {
        let key = new_session_key();
        let name = resource_name("prod", &key);
        assert_eq!(session_key_of("prod", &name), Some(key.as_str()));
        assert_eq!(session_key_of("prod-eu", &name), None);
        let eu = resource_name("prod-eu", &key);
        assert_eq!(session_key_of("prod", &eu), None, "a prefix is not a match");
        assert_eq!(session_key_of("prod", &format!("bd-{key}")), None);
        assert!(name.len() <= 50 && resource_name(&"x".repeat(20), &key).len() == 50);
        assert_eq!(room_kind("prod", &name), Some(RoomKind::Session));
        let pooled = pool_room_name("prod");
        assert_eq!(room_kind("prod", &pooled), Some(RoomKind::Pooled));
        assert_eq!(room_kind("prod-eu", &pooled), None);
        assert_eq!(room_kind("prod", &eu), None);
        let reserve = reserve_machine_name(&"x".repeat(20), 999, "0123456789", 999_999_999);
        assert!(reserve.len() <= 63, "{reserve}");
        assert_eq!(
            room_kind("prod", &reserve_machine_name("prod", 1, "ab", 2)),
            None
        );
    }
}
