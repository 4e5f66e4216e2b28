//! Daily rooms through the Daily REST API; meeting tokens self-signed with the API key.

use std::time::Duration;

use async_trait::async_trait;
use jsonwebtoken::{EncodingKey, Header};
use providers::http::{self, CallFailure, ErrorShape, FailureClass, ParsedError};
use providers::retry::{retry, RateLimit, RetryPolicy};
use providers::Secret;

use crate::config::DailyConfig;
use reqwest::{Method, RequestBuilder, Response, StatusCode};
use serde::Deserialize;
use serde_json::{json, Value};

use super::{
    ListedRoom, Room, RoomError, RoomOp, RoomPage, RoomRequest, RoomService, TokenClaims,
    TokenRequest,
};
use crate::session_id::{room_kind, RoomKind};

/// At start-up the domain read is retried for at most this many request timeouts.
pub const BOOT_BUDGET_PER_TIMEOUT: u32 = 4;

/// Daily's error body: `{"error": "<type>", "info": "<text>"}`.
const DAILY_ERRORS: ErrorShape = ErrorShape {
    parse: |text| {
        #[derive(Deserialize)]
        struct DailyError {
            error: Option<String>,
            info: Option<String>,
        }
        let e = serde_json::from_str::<DailyError>(text).ok()?;
        Some(ParsedError {
            code: e.error,
            message: e.info.unwrap_or_default(),
            retry_after: None,
        })
    },
    throttling_codes: &[],
};

impl RoomError {
    /// The rooms error a failed Daily call of `what` stands for.
    fn from_call(what: &str, failure: CallFailure) -> Self {
        let message = failure.describe(what);
        match failure {
            CallFailure::Transport(e) => Self::Unavailable {
                message,
                source: Some(Box::new(e)),
            },
            CallFailure::Answer(answer) => match answer.class() {
                FailureClass::Throttled => Self::Throttled {
                    retry_after: answer.retry_after,
                },
                FailureClass::Transient => Self::unavailable(message),
                FailureClass::Refused => Self::Rejected {
                    status: answer.status.as_u16(),
                    message,
                },
            },
        }
    }
}

#[derive(Debug, Deserialize)]
struct DomainInfo {
    domain_id: String,
    domain_name: String,
}

#[derive(Debug, Deserialize)]
struct DailyRoom {
    name: String,
    url: String,
}

/// Daily's RFC 3339 times.
fn parse_time(t: &str) -> Option<chrono::DateTime<chrono::Utc>> {
    chrono::DateTime::parse_from_rfc3339(t)
        .ok()
        .map(|t| t.with_timezone(&chrono::Utc))
}

#[derive(Debug, Deserialize)]
struct DailyRoomPage {
    #[serde(default)]
    data: Vec<ListedDailyRoom>,
}

#[derive(Debug, Deserialize)]
struct ListedDailyRoom {
    #[serde(default)]
    id: String,
    name: String,
    #[serde(default)]
    created_at: Option<String>,
}

pub struct DailyRooms {
    http: reqwest::Client,
    api_url: String,
    api_key: Secret,
    signing_key: EncodingKey,
    /// Only this deployment's rooms are listed.
    deployment: String,
    domain_id: String,
    domain_name: String,
    timeout: Duration,
}

impl DailyRooms {
    /// Connects: reads the domain id and name once from `GET {api_url}/` unless both are given.
    pub async fn connect(
        http: reqwest::Client,
        config: &DailyConfig,
        deployment: &str,
        timeout: Duration,
    ) -> Result<Self, RoomError> {
        let api_key = config.api_key.clone().unwrap_or_default();
        let mut rooms = Self {
            http,
            api_url: config.api_url.trim_end_matches('/').to_owned(),
            signing_key: EncodingKey::from_secret(api_key.expose().as_bytes()),
            api_key,
            deployment: deployment.to_owned(),
            domain_id: String::new(),
            domain_name: String::new(),
            timeout,
        };
        let domain = config.domain_id.clone().zip(config.domain_name.clone());
        let (id, name) = match domain {
            Some(d) => d,
            None => {
                let info = rooms.read_domain_at_boot().await?;
                (info.domain_id, info.domain_name)
            }
        };
        rooms.domain_id = id;
        rooms.domain_name = name;
        Ok(rooms)
    }

    /// `GET /` for the domain, retried with backoff while Daily throttles (429), fails (5xx) or
    /// cannot be reached, for at most [`BOOT_BUDGET_PER_TIMEOUT`] request timeouts (60 s with
    /// the default 15 s): a Daily blip during a deploy must not crash-loop every replica. A
    /// refusal (a wrong key: 401) fails at once.
    async fn read_domain_at_boot(&self) -> Result<DomainInfo, RoomError> {
        let deadline = tokio::time::Instant::now() + self.timeout * BOOT_BUDGET_PER_TIMEOUT;
        let policy = RetryPolicy {
            min_delay: Duration::from_millis(250),
            max_delay: Duration::from_secs(8),
            max_retries: usize::MAX,
            call_budget: self.timeout * BOOT_BUDGET_PER_TIMEOUT,
        };
        let attempt = || async {
            let read = self.json(self.request(Method::GET, "/"), RoomOp::Get, "read domain");
            match tokio::time::timeout_at(deadline, read).await {
                Ok(result) => result,
                Err(_) => Err(RoomError::unavailable(
                    "read domain: no answer before the start-up deadline",
                )),
            }
        };
        retry(&policy, deadline, attempt, |error, delay| {
            tracing::warn!(
                %error,
                retry_in_ms = delay.as_millis() as u64,
                "cannot read the Daily domain yet; retrying"
            );
        })
        .await
    }

    pub fn domain_id(&self) -> &str {
        &self.domain_id
    }

    fn request(&self, method: Method, path: &str) -> RequestBuilder {
        self.http
            .request(method, format!("{}{path}", self.api_url))
            .bearer_auth(self.api_key.expose())
            .timeout(self.timeout)
    }

    /// Sends one request and counts it (`botdispatch_daily_calls_total`): `Ok` is any answer
    /// the caller reads itself.
    async fn send(
        &self,
        req: RequestBuilder,
        op: RoomOp,
        what: &str,
    ) -> Result<Response, RoomError> {
        let result = http::send(req)
            .await
            .map_err(|f| RoomError::from_call(what, f));
        let outcome = match &result {
            Ok(resp) => match resp.status() {
                StatusCode::TOO_MANY_REQUESTS => "throttled",
                s if s.is_server_error() => "unavailable",
                s if s.is_client_error() && s != StatusCode::NOT_FOUND => "rejected",
                _ => "ok",
            },
            Err(e) => e.kind(),
        };
        crate::metrics::daily_call(op.as_str(), outcome);
        result
    }

    /// The answer's JSON, or the rooms error of a failed `what`.
    async fn json<T: serde::de::DeserializeOwned>(
        &self,
        req: RequestBuilder,
        op: RoomOp,
        what: &str,
    ) -> Result<T, RoomError> {
        let resp = self.send(req, op, what).await?;
        http::read_json(resp, DAILY_ERRORS)
            .await
            .map_err(|f| RoomError::from_call(what, f))
    }

    /// `method` on the room `name`: whether it was there (404 is `Ok(false)`).
    async fn on_room(&self, method: Method, name: &str, op: RoomOp) -> Result<bool, RoomError> {
        let what = op.as_str();
        let req = self.request(method, &format!("/rooms/{name}"));
        let resp = self.send(req, op, what).await?;
        if resp.status() == StatusCode::NOT_FOUND {
            return Ok(false);
        }
        http::expect_success(resp, DAILY_ERRORS)
            .await
            .map(|_| true)
            .map_err(|f| RoomError::from_call(what, f))
    }
}

#[async_trait]
impl RoomService for DailyRooms {
    fn kind(&self) -> &'static str {
        "daily"
    }

    /// Daily allows 20 requests/s and 100 per 5 s on most endpoints, and about 2 deletes/s
    /// (50 per 30 s). These buckets stay inside both windows with room for the jitter between
    /// taking a token here and the request reaching Daily: 16/s with bursts of 2 for everything
    /// (at most 18 in any second, 82 in any 5 s), and one delete per 625 ms.
    fn rate_limits(&self) -> Vec<(Option<RoomOp>, RateLimit)> {
        vec![
            (None, RateLimit::app(16.0, 2)),
            (Some(RoomOp::Delete), RateLimit::app(1.6, 1)),
        ]
    }

    fn room_url(&self, name: &str) -> String {
        format!("https://{}.daily.co/{name}", self.domain_name)
    }

    async fn create(&self, req: &RoomRequest) -> Result<Room, RoomError> {
        let mut properties = req.properties.clone();
        properties.insert("exp".into(), json!(req.exp.timestamp()));
        properties.insert("eject_at_room_exp".into(), json!(true));
        let body = json!({ "name": req.name, "privacy": "private", "properties": properties });
        let what = "create room";
        let resp = self
            .send(
                self.request(Method::POST, "/rooms").json(&body),
                RoomOp::Create,
                what,
            )
            .await?;
        let room: DailyRoom = match http::read_json(resp, DAILY_ERRORS).await {
            Ok(room) => room,
            Err(CallFailure::Answer(a))
                if a.status == StatusCode::BAD_REQUEST && a.message.contains("already exists") =>
            {
                return Err(RoomError::AlreadyExists(req.name.clone()))
            }
            Err(f) => return Err(RoomError::from_call(what, f)),
        };
        Ok(Room {
            name: room.name,
            url: room.url,
        })
    }

    async fn delete(&self, name: &str) -> Result<(), RoomError> {
        self.on_room(Method::DELETE, name, RoomOp::Delete)
            .await
            .map(drop)
    }

    async fn find(&self, name: &str) -> Result<Option<ListedRoom>, RoomError> {
        let what = "get room";
        let req = self.request(Method::GET, &format!("/rooms/{name}"));
        let resp = self.send(req, RoomOp::Get, what).await?;
        if resp.status() == StatusCode::NOT_FOUND {
            return Ok(None);
        }
        let room: ListedDailyRoom = http::read_json(resp, DAILY_ERRORS)
            .await
            .map_err(|f| RoomError::from_call(what, f))?;
        Ok(Some(ListedRoom {
            pooled: room_kind(&self.deployment, &room.name) == Some(RoomKind::Pooled),
            created_at: room.created_at.as_deref().and_then(parse_time),
            name: room.name,
        }))
    }

    /// `GET /rooms`: newest first, 100 a page, the next page from `ending_before` the last
    /// room's id. Only this deployment's rooms are kept.
    async fn list_page(&self, cursor: Option<&str>) -> Result<RoomPage, RoomError> {
        let mut req = self
            .request(Method::GET, "/rooms")
            .query(&[("limit", "100")]);
        if let Some(id) = cursor {
            req = req.query(&[("ending_before", id)]);
        }
        let page: DailyRoomPage = self.json(req, RoomOp::List, "list rooms").await?;
        let next = (page.data.len() >= 100)
            .then(|| page.data.last().map(|r| r.id.clone()))
            .flatten();
        let rooms = page
            .data
            .into_iter()
            .filter_map(|r| {
                let kind = room_kind(&self.deployment, &r.name)?;
                Some(ListedRoom {
                    pooled: kind == RoomKind::Pooled,
                    name: r.name,
                    created_at: r.created_at.as_deref().and_then(parse_time),
                })
            })
            .collect();
        Ok(RoomPage { rooms, next })
    }

    fn mint_token(&self, req: &TokenRequest<'_>) -> Result<String, RoomError> {
        let claims = TokenClaims::new(&self.domain_id, req);
        jsonwebtoken::encode(&Header::default(), &claims, &self.signing_key)
            .map_err(RoomError::Token)
    }

    async fn check(&self) -> Result<(), RoomError> {
        self.json::<Value>(self.request(Method::GET, "/"), RoomOp::Get, "read domain")
            .await
            .map(drop)
    }
}
