//! Daily rooms through the Daily REST API; meeting tokens self-signed with the API key.

use std::time::Duration;

use async_trait::async_trait;
use jsonwebtoken::{EncodingKey, Header};
use reqwest::{Method, RequestBuilder, Response, StatusCode};
use serde::Deserialize;
use serde_json::{json, Value};

use super::{
    ListedRoom, Room, RoomError, RoomRequest, RoomService, TokenClaims, TokenRequest, ROOM_PREFIX,
};
use providers::{parse_retry_after, transport_message, Secret};

/// Daily's error body: `{"error": "<type>", "info": "<text>"}`.
#[derive(Debug, Deserialize)]
struct DailyError {
    #[serde(default)]
    error: Option<String>,
    #[serde(default)]
    info: Option<String>,
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

#[derive(Debug, Deserialize)]
struct RoomPage {
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
    domain_id: String,
    domain_name: String,
    timeout: Duration,
}

impl DailyRooms {
    /// Connects: reads the domain id and name once from `GET {api_url}/` unless both are given.
    pub async fn connect(
        http: reqwest::Client,
        api_url: &str,
        api_key: Secret,
        domain: Option<(String, String)>,
        timeout: Duration,
    ) -> Result<Self, RoomError> {
        let mut rooms = Self {
            http,
            api_url: api_url.trim_end_matches('/').to_owned(),
            signing_key: EncodingKey::from_secret(api_key.expose().as_bytes()),
            api_key,
            domain_id: String::new(),
            domain_name: String::new(),
            timeout,
        };
        let (id, name) = match domain {
            Some(d) => d,
            None => {
                let info: DomainInfo = json_or_error(
                    rooms
                        .send(rooms.request(Method::GET, "/"), "read domain")
                        .await?,
                    "read domain",
                )
                .await?;
                (info.domain_id, info.domain_name)
            }
        };
        rooms.domain_id = id;
        rooms.domain_name = name;
        Ok(rooms)
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

    async fn send(&self, req: RequestBuilder, what: &str) -> Result<Response, RoomError> {
        req.send().await.map_err(|e| RoomError::Unavailable {
            message: format!("{what}: {}", transport_message(&e)),
        })
    }
}

#[async_trait]
impl RoomService for DailyRooms {
    fn kind(&self) -> &'static str {
        "daily"
    }

    fn room_url(&self, name: &str) -> String {
        format!("https://{}.daily.co/{name}", self.domain_name)
    }

    async fn create(&self, req: &RoomRequest) -> Result<Room, RoomError> {
        let mut properties = req.properties.clone();
        properties.insert("exp".into(), json!(req.exp.timestamp()));
        properties.insert("eject_at_room_exp".into(), json!(true));
        let body = json!({ "name": req.name, "privacy": "private", "properties": properties });
        let resp = self
            .send(
                self.request(Method::POST, "/rooms").json(&body),
                "create room",
            )
            .await?;
        if resp.status() == StatusCode::BAD_REQUEST {
            let err = error_from(resp, "create room").await;
            return Err(match err {
                RoomError::Rejected { message, .. } if message.contains("already exists") => {
                    RoomError::AlreadyExists(req.name.clone())
                }
                other => other,
            });
        }
        let room: DailyRoom = json_or_error(resp, "create room").await?;
        Ok(Room {
            name: room.name,
            url: room.url,
        })
    }

    async fn delete(&self, name: &str) -> Result<(), RoomError> {
        let resp = self
            .send(
                self.request(Method::DELETE, &format!("/rooms/{name}")),
                "delete room",
            )
            .await?;
        match resp.status() {
            StatusCode::NOT_FOUND => Ok(()),
            s if s.is_success() => Ok(()),
            _ => Err(error_from(resp, "delete room").await),
        }
    }

    async fn exists(&self, name: &str) -> Result<bool, RoomError> {
        let resp = self
            .send(
                self.request(Method::GET, &format!("/rooms/{name}")),
                "get room",
            )
            .await?;
        match resp.status() {
            StatusCode::NOT_FOUND => Ok(false),
            s if s.is_success() => Ok(true),
            _ => Err(error_from(resp, "get room").await),
        }
    }

    async fn list_managed(&self) -> Result<Vec<ListedRoom>, RoomError> {
        // `GET /rooms` pages newest first, 100 at a time, continued with `ending_before`.
        let mut rooms = Vec::new();
        let mut ending_before: Option<String> = None;
        for _ in 0..100 {
            let mut req = self
                .request(Method::GET, "/rooms")
                .query(&[("limit", "100")]);
            if let Some(id) = &ending_before {
                req = req.query(&[("ending_before", id.as_str())]);
            }
            let page: RoomPage =
                json_or_error(self.send(req, "list rooms").await?, "list rooms").await?;
            let last = page.data.last().map(|r| r.id.clone());
            let full = page.data.len() >= 100;
            rooms.extend(
                page.data
                    .into_iter()
                    .filter(|r| r.name.starts_with(ROOM_PREFIX))
                    .map(|r| ListedRoom {
                        name: r.name,
                        created_at: r
                            .created_at
                            .as_deref()
                            .and_then(|t| chrono::DateTime::parse_from_rfc3339(t).ok())
                            .map(|t| t.with_timezone(&chrono::Utc)),
                    }),
            );
            match (full, last) {
                (true, Some(id)) => ending_before = Some(id),
                _ => break,
            }
        }
        Ok(rooms)
    }

    fn mint_token(&self, req: &TokenRequest<'_>) -> Result<String, RoomError> {
        let claims = TokenClaims::new(&self.domain_id, req);
        jsonwebtoken::encode(&Header::default(), &claims, &self.signing_key)
            .map_err(|e| RoomError::Token(e.to_string()))
    }

    async fn check(&self) -> Result<(), RoomError> {
        let resp = self
            .send(self.request(Method::GET, "/"), "read domain")
            .await?;
        json_or_error::<Value>(resp, "read domain").await.map(drop)
    }
}

async fn json_or_error<T: serde::de::DeserializeOwned>(
    resp: Response,
    what: &str,
) -> Result<T, RoomError> {
    if !resp.status().is_success() {
        return Err(error_from(resp, what).await);
    }
    resp.json().await.map_err(|e| RoomError::Unavailable {
        message: format!("{what}: unreadable answer: {}", transport_message(&e)),
    })
}

async fn error_from(resp: Response, what: &str) -> RoomError {
    let status = resp.status();
    let retry_after = resp
        .headers()
        .get(reqwest::header::RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .and_then(parse_retry_after);
    let text = resp.text().await.unwrap_or_default();
    let message = match serde_json::from_str::<DailyError>(&text) {
        Ok(DailyError { error, info }) => format!(
            "{what}: HTTP {}: {}{}",
            status.as_u16(),
            error.unwrap_or_default(),
            info.map(|i| format!(": {i}")).unwrap_or_default()
        ),
        Err(_) => format!("{what}: HTTP {}", status.as_u16()),
    };
    match status {
        StatusCode::TOO_MANY_REQUESTS => RoomError::Throttled { retry_after },
        s if s.is_server_error() => RoomError::Unavailable { message },
        s => RoomError::Rejected {
            status: s.as_u16(),
            message,
        },
    }
}
