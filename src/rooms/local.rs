//! Development rooms: no network, a clearly fake URL, tokens with the same claims as Daily's
//! signed by a random key. Refused when `APP_ENV=production`.
//!
//! The rooms this process created are kept in memory with their expiry, so `exists`, `list`
//! and `delete` answer as Daily would for them (and the reaper's room rules work the same).

use std::collections::HashMap;
use std::sync::Mutex;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use jsonwebtoken::{EncodingKey, Header};
use rand::RngCore;

use super::{
    ListedRoom, Room, RoomError, RoomPage, RoomRequest, RoomService, TokenClaims, TokenRequest,
};
use crate::session_id::{room_kind, RoomKind};

struct LocalRoom {
    created_at: DateTime<Utc>,
    exp: DateTime<Utc>,
}

pub struct LocalRooms {
    key: EncodingKey,
    deployment: String,
    rooms: Mutex<HashMap<String, LocalRoom>>,
}

impl LocalRooms {
    /// Rooms of `deployment`, tokens signed by a random key.
    pub fn new(deployment: &str) -> Self {
        let mut secret = [0u8; 32];
        rand::rng().fill_bytes(&mut secret);
        Self {
            key: EncodingKey::from_secret(&secret),
            deployment: deployment.to_owned(),
            rooms: Mutex::default(),
        }
    }
}

impl LocalRooms {
    /// The room table without expired rooms (they are gone, as on Daily).
    fn live(&self) -> std::sync::MutexGuard<'_, HashMap<String, LocalRoom>> {
        let mut rooms = self.rooms.lock().unwrap_or_else(|e| e.into_inner());
        let now = Utc::now();
        rooms.retain(|_, r| r.exp > now);
        rooms
    }
}

#[async_trait]
impl RoomService for LocalRooms {
    fn kind(&self) -> &'static str {
        "local"
    }

    fn room_url(&self, name: &str) -> String {
        // `.invalid` is reserved (RFC 2606): nobody can mistake this for a joinable room.
        format!("https://local-rooms.invalid/{name}")
    }

    async fn create(&self, req: &RoomRequest) -> Result<Room, RoomError> {
        let mut rooms = self.live();
        if rooms.contains_key(&req.name) {
            return Err(RoomError::AlreadyExists(req.name.clone()));
        }
        rooms.insert(
            req.name.clone(),
            LocalRoom {
                created_at: Utc::now(),
                exp: req.exp,
            },
        );
        Ok(Room {
            name: req.name.clone(),
            url: self.room_url(&req.name),
        })
    }

    async fn delete(&self, name: &str) -> Result<(), RoomError> {
        self.live().remove(name);
        Ok(())
    }

    async fn find(&self, name: &str) -> Result<Option<ListedRoom>, RoomError> {
        Ok(self.live().get(name).map(|room| ListedRoom {
            name: name.to_owned(),
            created_at: Some(room.created_at),
            pooled: room_kind(&self.deployment, name) == Some(RoomKind::Pooled),
        }))
    }

    async fn list_page(&self, _cursor: Option<&str>) -> Result<RoomPage, RoomError> {
        let rooms = self
            .live()
            .iter()
            .filter_map(|(name, room)| Some((name, room, room_kind(&self.deployment, name)?)))
            .map(|(name, room, kind)| ListedRoom {
                name: name.clone(),
                created_at: Some(room.created_at),
                pooled: kind == RoomKind::Pooled,
            })
            .collect();
        Ok(RoomPage { rooms, next: None })
    }

    fn mint_token(&self, req: &TokenRequest<'_>) -> Result<String, RoomError> {
        jsonwebtoken::encode(
            &Header::default(),
            &TokenClaims::new("local", req),
            &self.key,
        )
        .map_err(RoomError::Token)
    }

    async fn check(&self) -> Result<(), RoomError> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(name: &str, exp: DateTime<Utc>) -> RoomRequest {
        RoomRequest {
            name: name.into(),
            exp,
            properties: Default::default(),
            deadline: None,
        }
    }

    #[tokio::test]
    async fn answers_for_the_rooms_it_created() {
        use crate::session_id::{new_session_key, resource_name};
        let rooms = LocalRooms::new("default");
        let later = Utc::now() + chrono::Duration::minutes(5);
        let (a, old) = (
            resource_name("default", &new_session_key()),
            resource_name("default", &new_session_key()),
        );
        assert!(rooms.find(&a).await.unwrap().is_none());
        rooms.create(&request(&a, later)).await.unwrap();
        assert!(rooms.find(&a).await.unwrap().is_some());
        assert!(matches!(
            rooms.create(&request(&a, later)).await,
            Err(RoomError::AlreadyExists(_))
        ));
        let earlier = Utc::now() - chrono::Duration::seconds(1);
        rooms.create(&request(&old, earlier)).await.unwrap();
        let other = resource_name("staging", &new_session_key());
        rooms.create(&request(&other, later)).await.unwrap();
        let listed = rooms.list_managed().await.unwrap();
        assert!(listed.complete);
        assert_eq!(
            listed.rooms.iter().map(|r| &r.name).collect::<Vec<_>>(),
            [&a],
            "expired rooms are gone, other deployments' are not ours"
        );
        rooms.delete(&a).await.unwrap();
        assert!(rooms.find(&a).await.unwrap().is_none());
    }
}
