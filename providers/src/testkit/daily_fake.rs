//! Stateful fake of the Daily REST API (domain and rooms): an axum server on `127.0.0.1:0`
//! that keeps rooms in memory, validates room creation the way Daily does, expires rooms, and
//! can inject faults.
//!
//! Order of checks for every request: API key (401), route (404), armed [`Fault`], then the
//! operation. Errors use Daily's body shape `{"error": "<type>", "info": "<text>"}`.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use axum::extract::State;
use axum::http::Method;
use axum::response::Response;
use chrono::{DateTime, SecondsFormat, Utc};
use rand::distr::{Alphanumeric, SampleString};
use serde_json::{json, Map, Value};
use uuid::Uuid;

use super::faults::{self, FakeCore};
use super::server::{self, FakeServer, Reply, Request};
use super::{Fault, RecordedRequest};

/// Configuration of a [`FakeDaily`].
#[derive(Debug, Clone)]
pub struct FakeDailyConfig {
    /// Required API key (`Authorization: Bearer <api_key>`).
    pub api_key: String,
    /// The domain's name: rooms get `https://<domain_name>.daily.co/<room>` URLs.
    pub domain_name: String,
    pub domain_id: String,
}

impl Default for FakeDailyConfig {
    fn default() -> Self {
        Self {
            api_key: "fake-daily-key".to_owned(),
            domain_name: "botdispatch-test".to_owned(),
            domain_id: "5f0c2a4e-7d1b-4c3e-9a8f-0b6d2e4f1a3c".to_owned(),
        }
    }
}

/// The operations of [`FakeDaily`] faults can be armed for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DailyOp {
    /// `GET /v1/`
    Domain,
    /// `POST /v1/rooms`
    CreateRoom,
    /// `GET /v1/rooms/{name}`
    GetRoom,
    /// `DELETE /v1/rooms/{name}`
    DeleteRoom,
    /// `GET /v1/rooms`
    ListRooms,
}

/// A snapshot of one room of the fake.
#[derive(Debug, Clone, PartialEq)]
pub struct FakeRoom {
    /// UUID.
    pub id: String,
    pub name: String,
    /// `public` or `private`.
    pub privacy: String,
    /// The room properties as created (the API's `config`).
    pub properties: Value,
    /// `https://<domain_name>.daily.co/<name>`.
    pub url: String,
    pub created_at: DateTime<Utc>,
}

impl FakeRoom {
    fn to_json(&self) -> Value {
        json!({
            "id": self.id,
            "name": self.name,
            "api_created": true,
            "privacy": self.privacy,
            "url": self.url,
            "created_at": self.created_at.to_rfc3339_opts(SecondsFormat::Millis, true),
            "config": self.properties,
        })
    }

    /// Whether the room's `exp` (unix seconds) is at or before `now`.
    fn expired(&self, now: DateTime<Utc>) -> bool {
        self.properties
            .get("exp")
            .and_then(Value::as_i64)
            .is_some_and(|exp| exp <= now.timestamp())
    }
}

/// A handle on a running fake Daily API. Clones share the same server and state; the server
/// stops when the last handle is dropped.
#[derive(Debug, Clone)]
pub struct FakeDaily {
    server: FakeServer<Shared>,
}

#[derive(Debug)]
struct Shared {
    config: FakeDailyConfig,
    core: FakeCore<DailyOp>,
    state: Mutex<DailyState>,
}

#[derive(Debug, Default)]
struct DailyState {
    /// Oldest first.
    rooms: Vec<FakeRoom>,
    fail_create: Option<(u16, String)>,
    create_delay: Duration,
    /// Added to the wall clock, to expire rooms without waiting.
    clock_offset: chrono::Duration,
}

impl DailyState {
    fn now(&self) -> DateTime<Utc> {
        Utc::now() + self.clock_offset
    }

    /// Removes expired rooms (Daily deletes them lazily; so does the fake, on every access).
    fn prune(&mut self) {
        let now = self.now();
        self.rooms.retain(|room| !room.expired(now));
    }
}

enum Route {
    Domain,
    Create,
    List,
    Get(String),
    Delete(String),
}

impl Route {
    fn parse(method: &Method, path: &str) -> Option<Self> {
        let rest = path.strip_prefix("/v1")?;
        let segments: Vec<&str> = rest.trim_start_matches('/').split('/').collect();
        let route = match (method.as_str(), segments.as_slice()) {
            ("GET", [""]) => Self::Domain,
            ("POST", ["rooms"]) => Self::Create,
            ("GET", ["rooms"]) => Self::List,
            ("GET", ["rooms", name]) if !name.is_empty() => Self::Get((*name).to_owned()),
            ("DELETE", ["rooms", name]) if !name.is_empty() => Self::Delete((*name).to_owned()),
            _ => return None,
        };
        Some(route)
    }

    fn op(&self) -> DailyOp {
        match self {
            Self::Domain => DailyOp::Domain,
            Self::Create => DailyOp::CreateRoom,
            Self::List => DailyOp::ListRooms,
            Self::Get(_) => DailyOp::GetRoom,
            Self::Delete(_) => DailyOp::DeleteRoom,
        }
    }
}

/// Room properties the fake accepts, with their JSON type.
const PROPERTIES: [(&str, Kind); 18] = [
    ("exp", Kind::Integer),
    ("nbf", Kind::Integer),
    ("eject_at_room_exp", Kind::Boolean),
    ("eject_after_elapsed", Kind::Integer),
    ("enable_recording", Kind::String),
    ("start_video_off", Kind::Boolean),
    ("start_audio_off", Kind::Boolean),
    ("enable_chat", Kind::Boolean),
    ("enable_screenshare", Kind::Boolean),
    ("enable_prejoin_ui", Kind::Boolean),
    ("enable_knocking", Kind::Boolean),
    ("max_participants", Kind::Integer),
    ("enable_people_ui", Kind::Boolean),
    ("lang", Kind::String),
    ("geo", Kind::String),
    ("enable_dialout", Kind::Boolean),
    ("sip", Kind::Object),
    ("enable_transcription_storage", Kind::Boolean),
];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Integer,
    Boolean,
    String,
    Object,
}

impl Kind {
    fn accepts(self, value: &Value) -> bool {
        match self {
            Self::Integer => value.is_i64() || value.is_u64(),
            Self::Boolean => value.is_boolean(),
            Self::String => value.is_string(),
            Self::Object => value.is_object(),
        }
    }

    fn name(self) -> &'static str {
        match self {
            Self::Integer => "an integer",
            Self::Boolean => "a boolean",
            Self::String => "a string",
            Self::Object => "an object",
        }
    }
}

impl FakeDaily {
    /// Starts the fake on a free local port, on the current tokio runtime.
    ///
    /// # Panics
    ///
    /// Panics outside a tokio runtime or if no local port can be bound.
    pub async fn start(config: FakeDailyConfig) -> FakeDaily {
        let shared = Shared {
            config,
            core: FakeCore::default(),
            state: Mutex::new(DailyState::default()),
        };
        FakeDaily {
            server: FakeServer::start(shared, handle).await,
        }
    }

    /// `http://127.0.0.1:PORT/v1`, what a client configured for `https://api.daily.co/v1`
    /// should use.
    pub fn base_url(&self) -> String {
        self.server.url("/v1")
    }

    /// The address the fake listens on.
    pub fn addr(&self) -> SocketAddr {
        self.server.addr()
    }

    /// The API key the fake accepts.
    pub fn api_key(&self) -> &str {
        &self.server.config.api_key
    }

    /// The rooms that exist (not deleted, not expired), oldest first.
    pub fn rooms(&self) -> Vec<FakeRoom> {
        let mut state = self.server.lock();
        state.prune();
        state.rooms.clone()
    }

    /// Creates private rooms with these names (and an hour to live) at once, as if created
    /// through the API one after the other (newest last), e.g. to fill a domain's listing.
    pub fn insert_rooms(&self, names: impl IntoIterator<Item = String>) {
        let mut state = self.server.lock();
        let now = state.now();
        for name in names {
            let room = FakeRoom {
                id: Uuid::new_v4().to_string(),
                url: format!("https://{}.daily.co/{name}", self.server.config.domain_name),
                name,
                privacy: "private".to_owned(),
                properties: json!({"exp": now.timestamp() + 3600}),
                created_at: now,
            };
            state.rooms.push(room);
        }
    }

    /// One room by name, if it exists.
    pub fn room(&self, name: &str) -> Option<FakeRoom> {
        self.rooms().into_iter().find(|r| r.name == name)
    }

    /// Every request answered so far, oldest first.
    pub fn requests(&self) -> Vec<RecordedRequest> {
        self.server.core.calls()
    }

    /// While set, every room creation answers `status` with
    /// `{"error": <type for the status>, "info": <message>}` and creates nothing.
    pub fn set_fail_create(&self, failure: Option<(u16, String)>) {
        self.server.lock().fail_create = failure;
    }

    /// Room creations answer after this delay. The room exists from the moment the request
    /// arrived, like a slow API whose caller may time out after the fact.
    pub fn set_create_delay(&self, delay: Duration) {
        self.server.lock().create_delay = delay;
    }

    /// Arms `fault` for the next `count` requests of `op` (after any fault already armed for it).
    pub fn set_fault(&self, op: DailyOp, fault: Fault, count: u32) {
        self.server.core.set_fault(op, fault, count);
    }

    /// Disarms every fault armed with [`set_fault`](Self::set_fault).
    pub fn clear_faults(&self) {
        self.server.core.clear_faults();
    }

    /// Moves the fake's clock forward (rooms whose `exp` passed disappear), without sleeping.
    pub fn advance_clock(&self, by: Duration) {
        let by = chrono::Duration::from_std(by).unwrap_or(chrono::Duration::MAX);
        let mut state = self.server.lock();
        state.clock_offset = state
            .clock_offset
            .checked_add(&by)
            .unwrap_or(chrono::Duration::MAX);
    }
}

async fn handle(State(shared): State<Arc<Shared>>, request: Request) -> Response {
    let body = request.json_body();
    let reply = match &body {
        Ok(json) => shared.process(&request, json.as_ref()).await,
        Err(e) => daily_error(
            400,
            "invalid-request-error",
            format!("invalid JSON body: {e}"),
        ),
    };
    shared
        .core
        .record(request.recorded(body.ok().flatten(), &reply));
    request.respond(reply)
}

fn daily_error(status: u16, kind: &str, info: impl Into<String>) -> Reply {
    Reply::json(status, json!({ "error": kind, "info": info.into() }))
}

/// Daily's error type for an HTTP status.
fn error_kind(status: u16) -> &'static str {
    match status {
        400 => "invalid-request-error",
        401 => "authentication-error",
        403 => "authorization-error",
        404 => "not-found",
        429 => "rate-limit-error",
        500..=599 => "server-error",
        _ => "invalid-request-error",
    }
}

fn not_found(name: &str) -> Reply {
    daily_error(404, "not-found", format!("room {name} was not found"))
}

fn invalid(info: impl Into<String>) -> Reply {
    daily_error(400, "invalid-request-error", info)
}

fn valid_room_name(name: &str) -> bool {
    (1..=128).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, DailyState> {
        server::lock(&self.state)
    }

    async fn process(&self, request: &Request, body: Option<&Value>) -> Reply {
        if request.bearer_token() != Some(self.config.api_key.as_str()) {
            return daily_error(
                401,
                "authentication-error",
                "missing or invalid API key in the Authorization header",
            );
        }
        let (method, path) = (&request.method, &request.path);
        let Some(route) = Route::parse(method, path) else {
            return daily_error(404, "not-found", format!("no route for {method} {path}"));
        };

        faults::answer(
            self.core.next_fault(route.op()),
            || self.execute(&route, request, body),
            |status| json!({"error": error_kind(status), "info": faults::reason(status)}),
        )
        .await
    }

    async fn execute(&self, route: &Route, request: &Request, body: Option<&Value>) -> Reply {
        match route {
            Route::Domain => Reply::json(
                200,
                json!({
                    "domain_name": self.config.domain_name,
                    "domain_id": self.config.domain_id,
                    "config": {},
                }),
            ),
            Route::Create => self.create(body).await,
            Route::List => {
                let mut state = self.lock();
                state.prune();
                // Daily lists rooms newest first, at most `limit` (≤ 100) a page; `ending_before`
                // (a room id) continues with the rooms created before that one.
                let limit = request
                    .query("limit")
                    .and_then(|l| l.parse::<usize>().ok())
                    .unwrap_or(100)
                    .clamp(1, 100);
                let newest_first = state.rooms.iter().rev();
                let data: Vec<Value> = match request.query("ending_before") {
                    Some(id) => newest_first
                        .skip_while(|r| r.id != id)
                        .skip(1)
                        .take(limit)
                        .map(FakeRoom::to_json)
                        .collect(),
                    None => newest_first.take(limit).map(FakeRoom::to_json).collect(),
                };
                Reply::json(200, json!({"total_count": state.rooms.len(), "data": data}))
            }
            Route::Get(name) => {
                let mut state = self.lock();
                state.prune();
                match state.rooms.iter().find(|r| &r.name == name) {
                    Some(room) => Reply::json(200, room.to_json()),
                    None => not_found(name),
                }
            }
            Route::Delete(name) => {
                let mut state = self.lock();
                state.prune();
                let before = state.rooms.len();
                state.rooms.retain(|r| &r.name != name);
                if state.rooms.len() == before {
                    not_found(name)
                } else {
                    Reply::json(200, json!({"deleted": true, "name": name}))
                }
            }
        }
    }

    async fn create(&self, body: Option<&Value>) -> Reply {
        let empty = Map::new();
        let body = match body {
            None => &empty,
            Some(Value::Object(body)) => body,
            Some(_) => return invalid("the request body must be a JSON object"),
        };
        if let Some(key) = body
            .keys()
            .find(|k| !["name", "privacy", "properties"].contains(&k.as_str()))
        {
            return invalid(format!("unknown parameter '{key}'"));
        }
        let name = match body.get("name") {
            None | Some(Value::Null) => None,
            Some(Value::String(name)) if valid_room_name(name) => Some(name.clone()),
            Some(other) => {
                return invalid(format!(
                    "name {other} is invalid: room names may only contain A-Z, a-z, 0-9, '-' and '_', up to 128 characters"
                ))
            }
        };
        let privacy = match body.get("privacy") {
            None | Some(Value::Null) => "public".to_owned(),
            Some(Value::String(p)) if p == "public" || p == "private" => p.clone(),
            Some(other) => {
                return invalid(format!(
                    "privacy {other} is invalid: use 'public' or 'private'"
                ))
            }
        };
        let properties = match body.get("properties") {
            None | Some(Value::Null) => Map::new(),
            Some(Value::Object(p)) => p.clone(),
            Some(_) => return invalid("properties must be an object"),
        };

        let (reply, delay) = {
            let mut state = self.lock();
            state.prune();
            let now = state.now();
            if let Err(info) = check_properties(&properties, now) {
                return invalid(info);
            }
            if let Some((status, info)) = state.fail_create.clone() {
                return daily_error(status, error_kind(status), info);
            }
            let existing: HashSet<&str> = state.rooms.iter().map(|r| r.name.as_str()).collect();
            let name = match name {
                Some(name) if existing.contains(name.as_str()) => {
                    return invalid(format!("a room named {name} already exists"))
                }
                Some(name) => name,
                None => loop {
                    let candidate = Alphanumeric.sample_string(&mut rand::rng(), 20);
                    if !existing.contains(candidate.as_str()) {
                        break candidate;
                    }
                },
            };
            let room = FakeRoom {
                id: Uuid::new_v4().to_string(),
                url: format!("https://{}.daily.co/{name}", self.config.domain_name),
                name,
                privacy,
                properties: Value::Object(properties),
                created_at: now,
            };
            let reply = Reply::json(200, room.to_json());
            state.rooms.push(room);
            (reply, state.create_delay)
        };
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
        reply
    }
}

/// Checks room properties: known names, JSON types, and `exp` in the future.
fn check_properties(properties: &Map<String, Value>, now: DateTime<Utc>) -> Result<(), String> {
    for (key, value) in properties {
        let Some((_, kind)) = PROPERTIES.iter().find(|(name, _)| name == key) else {
            return Err(format!("unknown room property '{key}'"));
        };
        if !kind.accepts(value) {
            return Err(format!("room property '{key}' must be {}", kind.name()));
        }
    }
    if let Some(exp) = properties.get("exp").and_then(Value::as_i64) {
        if exp <= now.timestamp() {
            return Err(format!("exp {exp} is in the past"));
        }
    }
    if let Some(max) = properties.get("max_participants").and_then(Value::as_i64) {
        if max < 1 {
            return Err("max_participants must be at least 1".to_owned());
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn room_names_follow_daily_rules() {
        assert!(valid_room_name("bd-01K0ABC_x"));
        assert!(valid_room_name(&"a".repeat(128)));
        assert!(!valid_room_name(""));
        assert!(!valid_room_name(&"a".repeat(129)));
        assert!(!valid_room_name("has space"));
        assert!(!valid_room_name("dot.ted"));
    }

    #[test]
    fn properties_are_typed() {
        let now = Utc::now();
        let ok = json!({"exp": now.timestamp() + 60, "eject_at_room_exp": true, "enable_recording": "cloud"});
        check_properties(ok.as_object().unwrap(), now).unwrap();
        for bad in [
            json!({"exp": "soon"}),
            json!({"exp": now.timestamp() - 1}),
            json!({"exp": 1.5}),
            json!({"enable_chat": "yes"}),
            json!({"max_participants": 0}),
            json!({"unknown_property": 1}),
        ] {
            assert!(
                check_properties(bad.as_object().unwrap(), now).is_err(),
                "{bad}"
            );
        }
    }
}
