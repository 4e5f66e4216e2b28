//! Session labels: what a machine carries so that the machine alone tells whose session it is
//! (Fly metadata, ECS tags, Cloud Run env, Kubernetes labels), and a codec for label stores
//! whose values allow only a restricted alphabet.

use std::collections::BTreeMap;

use data_encoding::Encoding;

use crate::{Deadline, ReserveLabels, StartType, Tier};

/// Value of the `managed-by` label on every machine botdispatch launches; the reaper only ever
/// touches machines that carry it.
pub const MANAGED_BY: &str = "botdispatch";

/// Label keys, shared by every provider so listings and the reaper read the same names.
/// Lowercase with underscores: valid as Fly metadata keys, ECS tag keys and Cloud Run labels.
pub mod key {
    pub const MANAGED_BY: &str = "managed_by";
    pub const SESSION: &str = "botdispatch_session";
    pub const OWNER: &str = "botdispatch_owner";
    pub const ROOM: &str = "botdispatch_room";
    pub const DEADLINE: &str = "botdispatch_deadline";
    pub const AGENT: &str = "botdispatch_agent";
    pub const DEPLOYMENT: &str = "botdispatch_deployment";
    /// `hot`, `suspended`, `stopped` (a reserve tier's machine) or `cold`.
    pub const START: &str = "botdispatch_start";
    /// `reserve` while a reserve machine waits; `session` once claimed.
    pub const ROLE: &str = "botdispatch_role";
    /// A reserve machine's template fingerprint.
    pub const FINGERPRINT: &str = "botdispatch_fingerprint";
    /// A reserve machine's tier.
    pub const TIER: &str = "botdispatch_tier";
    /// `1` once a reserve machine's bot answered `/readyz` (and it was suspended, for that tier).
    pub const READY: &str = "botdispatch_ready";
    /// A reserve machine's name.
    pub const NAME: &str = "botdispatch_name";
    /// A reserve machine's slot.
    pub const SLOT: &str = "botdispatch_slot";
    /// Why a session failed after its machine started (its bot refused the session later).
    pub const FAILURE: &str = "botdispatch_failure";
    /// A reserve machine that is recycled after its session (started again from its image)
    /// instead of destroyed.
    pub const RECYCLE: &str = "botdispatch_recycle";
    /// When a recycled machine was last put back into the reserve (unix seconds).
    pub const RECYCLED_AT: &str = "botdispatch_recycled_at";
    /// Milliseconds the start waited for capacity.
    pub const QUEUE_MS: &str = "botdispatch_queue_ms";
    /// Milliseconds from the start request until the bot could talk.
    pub const READY_MS: &str = "botdispatch_ready_ms";
}

/// [`key::ROLE`] of a reserve machine that waits for a session.
pub const ROLE_RESERVE: &str = "reserve";
/// [`key::ROLE`] of a claimed reserve machine.
pub const ROLE_SESSION: &str = "session";

/// The deployment of machines launched before deployments had names.
pub const DEFAULT_DEPLOYMENT: &str = "default";

/// What a provider attaches to a machine so that the machine alone tells whose session it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionLabels {
    /// The plain session key (also the bot's `BOTDISPATCH_SESSION_ID`).
    pub session_key: String,
    /// The caller's JWT `sub`.
    pub owner: String,
    /// The Daily room name of the session; empty when the start created no room.
    pub room: String,
    /// The agent (bot profile) that was started.
    pub agent: String,
    /// The deployment that launched it: only that deployment's dispatchers touch it.
    pub deployment: String,
    /// How the machine came to the session.
    pub start: StartType,
    /// When the session must be over, whatever the bot does (whole seconds).
    pub deadline: Deadline,
    /// How the start went, recorded once it answered (where the provider can relabel).
    pub timings: Option<Timings>,
}

/// How a session's start went, in its machine's labels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timings {
    /// Waiting for capacity.
    pub queue_ms: u64,
    /// From the start request until the bot could talk: its machine started (`env`
    /// handoff) or its session delivered (`http`).
    pub ready_ms: u64,
}

impl Timings {
    pub fn to_map(self) -> BTreeMap<String, String> {
        BTreeMap::from([
            (key::QUEUE_MS.to_owned(), self.queue_ms.to_string()),
            (key::READY_MS.to_owned(), self.ready_ms.to_string()),
        ])
    }

    fn from_map(map: &BTreeMap<String, String>) -> Option<Self> {
        Some(Self {
            queue_ms: map.get(key::QUEUE_MS)?.parse().ok()?,
            ready_ms: map.get(key::READY_MS)?.parse().ok()?,
        })
    }
}

impl SessionLabels {
    /// The labels as key/value pairs, including the `managed-by` marker.
    pub fn to_map(&self) -> BTreeMap<String, String> {
        let mut map = self.timings.map(Timings::to_map).unwrap_or_default();
        map.extend([
            (key::MANAGED_BY.to_owned(), MANAGED_BY.to_owned()),
            (key::SESSION.to_owned(), self.session_key.clone()),
            (key::OWNER.to_owned(), self.owner.clone()),
            (key::ROOM.to_owned(), self.room.clone()),
            (key::AGENT.to_owned(), self.agent.clone()),
            (key::DEPLOYMENT.to_owned(), self.deployment.clone()),
            (key::START.to_owned(), self.start.as_str().to_owned()),
            (
                key::DEADLINE.to_owned(),
                self.deadline.unix_secs().to_string(),
            ),
        ]);
        map
    }

    /// Reads labels back from a machine; `None` unless the machine is managed by botdispatch
    /// for `deployment` (another deployment's machine is not ours).
    pub fn from_map_of(map: &BTreeMap<String, String>, deployment: &str) -> Option<Self> {
        Self::from_map(map).filter(|l| l.deployment == deployment)
    }

    /// Reads labels back from a machine, whatever its deployment (missing: [`DEFAULT_DEPLOYMENT`]);
    /// `None` when the machine is not managed by botdispatch.
    pub fn from_map(map: &BTreeMap<String, String>) -> Option<Self> {
        if map.get(key::MANAGED_BY).map(String::as_str) != Some(MANAGED_BY) {
            return None;
        }
        let deadline = map.get(key::DEADLINE)?.parse::<i64>().ok()?;
        Some(Self {
            session_key: map.get(key::SESSION)?.clone(),
            owner: map.get(key::OWNER)?.clone(),
            room: map.get(key::ROOM)?.clone(),
            agent: map.get(key::AGENT).cloned().unwrap_or_default(),
            deployment: map
                .get(key::DEPLOYMENT)
                .cloned()
                .unwrap_or_else(|| DEFAULT_DEPLOYMENT.to_owned()),
            start: map
                .get(key::START)
                .map_or(StartType::Cold, |s| StartType::parse(s)),
            deadline: Deadline::from_unix_secs(deadline)?,
            timings: Timings::from_map(map),
        })
    }
}

/// The failure the dispatcher recorded on a session's machine ([`key::FAILURE`]), if any.
pub fn failure_of(map: &BTreeMap<String, String>) -> Option<String> {
    map.get(key::FAILURE).filter(|f| !f.is_empty()).cloned()
}

impl ReserveLabels {
    /// The labels of a reserve machine of `deployment`, including the `managed-by` marker.
    pub fn to_map(&self, deployment: &str) -> BTreeMap<String, String> {
        let mut map = BTreeMap::from([
            (key::MANAGED_BY.to_owned(), MANAGED_BY.to_owned()),
            (key::DEPLOYMENT.to_owned(), deployment.to_owned()),
            (key::ROLE.to_owned(), ROLE_RESERVE.to_owned()),
            (key::NAME.to_owned(), self.name.clone()),
            (key::SLOT.to_owned(), self.slot.to_string()),
            (key::AGENT.to_owned(), self.agent.clone()),
            (key::FINGERPRINT.to_owned(), self.fingerprint.clone()),
            (key::TIER.to_owned(), self.tier.as_str().to_owned()),
        ]);
        if self.ready {
            map.insert(key::READY.to_owned(), "1".to_owned());
        }
        if self.recycle {
            map.insert(key::RECYCLE.to_owned(), "1".to_owned());
        }
        if let Some(at) = self.recycled_at {
            map.insert(key::RECYCLED_AT.to_owned(), at.to_string());
        }
        map
    }

    /// Reads a reserve machine's labels back; `None` unless it is one of `deployment`'s and
    /// still waits for a session.
    pub fn from_map_of(map: &BTreeMap<String, String>, deployment: &str) -> Option<Self> {
        Self::of_role(map, deployment, ROLE_RESERVE)
    }

    /// The reserve labels of a recycled agent's machine that a session holds or held (it keeps
    /// its slot); `None` for any other machine.
    pub fn held_of(map: &BTreeMap<String, String>, deployment: &str) -> Option<Self> {
        Self::of_role(map, deployment, ROLE_SESSION).filter(|l| l.recycle)
    }

    fn of_role(map: &BTreeMap<String, String>, deployment: &str, role: &str) -> Option<Self> {
        let is = |k: &str, v: &str| map.get(k).map(String::as_str) == Some(v);
        if !(is(key::MANAGED_BY, MANAGED_BY)
            && is(key::DEPLOYMENT, deployment)
            && is(key::ROLE, role))
        {
            return None;
        }
        Some(Self {
            name: map.get(key::NAME)?.clone(),
            slot: map.get(key::SLOT)?.parse().ok()?,
            agent: map.get(key::AGENT)?.clone(),
            fingerprint: map.get(key::FINGERPRINT)?.clone(),
            tier: Tier::parse(map.get(key::TIER)?)?,
            ready: is(key::READY, "1"),
            recycle: is(key::RECYCLE, "1"),
            recycled_at: map.get(key::RECYCLED_AT).and_then(|t| t.parse().ok()),
        })
    }

    /// The labels that put a recycled machine back into the reserve: its reserve labels (not
    /// ready) and every session label cleared (an empty value removes a key).
    pub fn recycled_map(&self, deployment: &str) -> BTreeMap<String, String> {
        let mut map: BTreeMap<String, String> = [
            key::SESSION,
            key::OWNER,
            key::ROOM,
            key::START,
            key::DEADLINE,
            key::FAILURE,
            key::QUEUE_MS,
            key::READY_MS,
            key::READY,
        ]
        .iter()
        .map(|k| ((*k).to_owned(), String::new()))
        .collect();
        let reserve = Self {
            ready: false,
            recycled_at: Some(chrono::Utc::now().timestamp()),
            ..self.clone()
        };
        map.extend(reserve.to_map(deployment));
        map
    }
}

/// Stores label values in a label store with a restricted alphabet: a value the store accepts
/// is kept as it is; any other is stored as a prefix plus an encoding made of allowed
/// characters, and decoded when read back, so any value (a JWT `sub` with `|` in it, say)
/// round-trips.
#[derive(Debug, Clone, Copy)]
pub struct LabelCodec {
    /// Whether the store accepts a value as it is.
    plain: fn(&str) -> bool,
    /// Marks an encoded value; a plain value that starts with it is encoded too.
    prefix: &'static str,
    encoding: &'static Encoding,
    /// Longest value the store accepts, in characters.
    max_len: usize,
}

/// A value too long for the label store, even encoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("the value is too long for this label store ({max_len} characters once encoded)")]
pub struct LabelTooLong {
    pub max_len: usize,
}

impl LabelCodec {
    /// ECS tag values: letters, digits, spaces and `_ . : / = + - @`, at most 256 characters;
    /// values beginning with `aws:` are reserved by AWS.
    pub const ECS_TAGS: Self = Self {
        plain: |v| {
            v.chars().all(|c| {
                c.is_ascii_alphanumeric()
                    || matches!(c, ' ' | '_' | '.' | ':' | '/' | '=' | '+' | '-' | '@')
            }) && !v.get(..4).is_some_and(|p| p.eq_ignore_ascii_case("aws:"))
        },
        prefix: "b64.",
        encoding: &data_encoding::BASE64URL_NOPAD,
        max_len: 256,
    };

    /// Kubernetes label values: at most 63 characters of `[A-Za-z0-9_.-]`, beginning and
    /// ending with a letter or digit (or empty).
    pub const KUBERNETES_LABELS: Self = Self {
        plain: |v| {
            let alnum = |c: Option<char>| c.is_some_and(|c| c.is_ascii_alphanumeric());
            v.is_empty()
                || (alnum(v.chars().next())
                    && alnum(v.chars().last())
                    && v.chars()
                        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.')))
        },
        prefix: "b32.",
        encoding: &data_encoding::BASE32_DNSSEC,
        max_len: 63,
    };

    /// The stored form of `value`.
    pub fn encode(&self, value: &str) -> Result<String, LabelTooLong> {
        let stored = if (self.plain)(value) && !value.starts_with(self.prefix) {
            value.to_owned()
        } else {
            format!("{}{}", self.prefix, self.encoding.encode(value.as_bytes()))
        };
        if stored.chars().count() > self.max_len {
            return Err(LabelTooLong {
                max_len: self.max_len,
            });
        }
        Ok(stored)
    }

    /// Inverse of [`LabelCodec::encode`]; a value that is not validly encoded is kept as is.
    pub fn decode(&self, stored: &str) -> String {
        stored
            .strip_prefix(self.prefix)
            .and_then(|rest| self.encoding.decode(rest.as_bytes()).ok())
            .and_then(|bytes| String::from_utf8(bytes).ok())
            .unwrap_or_else(|| stored.to_owned())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_round_trip_and_reject_foreign_machines() {
        let labels = SessionLabels {
            session_key: "01k0abc".into(),
            owner: "alice".into(),
            room: "bd-01k0abc".into(),
            agent: "default".into(),
            deployment: "staging".into(),
            start: StartType::Warm(Tier::Suspended),
            deadline: Deadline::from_unix_secs(1_800_000_000).unwrap(),
            timings: None,
        };
        let map = labels.to_map();
        assert_eq!(SessionLabels::from_map(&map), Some(labels.clone()));
        assert_eq!(SessionLabels::from_map_of(&map, "staging"), Some(labels));
        assert_eq!(SessionLabels::from_map_of(&map, "production"), None);
        let mut foreign = map.clone();
        foreign.insert(key::MANAGED_BY.into(), "someone-else".into());
        assert_eq!(SessionLabels::from_map(&foreign), None);

        let reserve = ReserveLabels {
            name: "bd-staging-r0-0123456789-1".into(),
            slot: 0,
            agent: "default".into(),
            fingerprint: "0123456789".into(),
            tier: Tier::Stopped,
            ready: true,
            recycle: false,
            recycled_at: None,
        };
        let map = reserve.to_map("staging");
        assert_eq!(ReserveLabels::from_map_of(&map, "staging"), Some(reserve));
        assert_eq!(ReserveLabels::from_map_of(&map, "production"), None);
        assert_eq!(SessionLabels::from_map(&map), None, "no session's yet");
    }

    #[test]
    fn codecs_round_trip_whatever_the_characters() {
        for codec in [LabelCodec::ECS_TAGS, LabelCodec::KUBERNETES_LABELS] {
            for value in [
                "alice",
                "01kabc",
                "auth0|5f1b",
                "a b",
                "ünïcødé",
                "b64.x",
                "b32.x",
                "-dash-",
                "",
                "AWS:thing",
            ] {
                let stored = codec.encode(value).unwrap();
                assert_eq!(codec.decode(&stored), value, "{stored}");
                assert!(
                    (codec.plain)(&stored),
                    "stored form {stored:?} of {value:?} is not storable"
                );
            }
        }
        let ecs = LabelCodec::ECS_TAGS;
        for value in [
            "auth0|5f7c8ec7c33c6c004bbafe82",
            "google-oauth2:1234 5678",
            "ünïcødé 名前 🎙",
            "b64.looks-encoded",
            "aws:reserved",
            "a\nb\tc",
            "x",
            "xy",
            "xyz",
        ] {
            let stored = ecs.encode(value).unwrap();
            assert!(!stored.to_ascii_lowercase().starts_with("aws:"), "{stored}");
            assert_eq!(ecs.decode(&stored), value, "{stored}");
        }
        assert_eq!(
            ecs.encode("alice@example.com").unwrap(),
            "alice@example.com"
        );
        assert_eq!(ecs.encode("auth0|x").unwrap(), "b64.YXV0aDB8eA");
        // The encoding is RFC 4648 base64url without padding.
        for (plain, encoded) in [
            ("f", "Zg"),
            ("fo", "Zm8"),
            ("foo", "Zm9v"),
            ("foobar", "Zm9vYmFy"),
        ] {
            assert_eq!(ecs.decode(&format!("b64.{encoded}")), plain);
        }
        // Someone else's tag that merely starts with the prefix stays as it is, and so does a
        // non-canonical encoding (stray low bits).
        assert_eq!(ecs.decode("b64.YR"), "b64.YR");
        assert_eq!(ecs.decode("b64.Zm+v"), "b64.Zm+v");
        assert_eq!(LabelCodec::ECS_TAGS.encode("alice").unwrap(), "alice");
        assert!(LabelCodec::ECS_TAGS
            .encode("aws:x")
            .unwrap()
            .starts_with("b64."));
        assert_eq!(LabelCodec::ECS_TAGS.encode("a|b").unwrap(), "b64.YXxi");
        // Not validly encoded: read as it is.
        assert_eq!(LabelCodec::ECS_TAGS.decode("b64.!!"), "b64.!!");
        assert_eq!(
            LabelCodec::KUBERNETES_LABELS.encode(&"x".repeat(64)),
            Err(LabelTooLong { max_len: 63 })
        );
    }
}
