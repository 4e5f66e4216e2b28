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
    ListedRoom, Room, RoomError, RoomRequest, RoomService, TokenClaims, TokenRequest, ROOM_PREFIX,
};

struct LocalRoom {
    created_at: DateTime<Utc>,
    exp: DateTime<Utc>,
}

pub struct LocalRooms {
    key: EncodingKey,
    rooms: Mutex<HashMap<String, LocalRoom>>,
}

impl Default for LocalRooms {
    fn default() -> Self {
        let mut secret = [0u8; 32];
        rand::rng().fill_bytes(&mut secret);
        Self {
            key: EncodingKey::from_secret(&secret),
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

    async fn exists(&self, name: &str) -> Result<bool, RoomError> {
        Ok(self.live().contains_key(name))
    }

    async fn list_managed(&self) -> Result<Vec<ListedRoom>, RoomError> {
        Ok(self
            .live()
            .iter()
            .filter(|(name, _)| name.starts_with(ROOM_PREFIX))
            .map(|(name, room)| ListedRoom {
                name: name.clone(),
                created_at: Some(room.created_at),
            })
            .collect())
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
        let rooms = LocalRooms::default();
        let later = Utc::now() + chrono::Duration::minutes(5);
        assert!(!rooms.exists("bd-a").await.unwrap());
        rooms.create(&request("bd-a", later)).await.unwrap();
        assert!(rooms.exists("bd-a").await.unwrap());
        assert!(matches!(
            rooms.create(&request("bd-a", later)).await,
            Err(RoomError::AlreadyExists(_))
        ));
        rooms
            .create(&request(
                "bd-old",
                Utc::now() - chrono::Duration::seconds(1),
            ))
            .await
            .unwrap();
        let listed = rooms.list_managed().await.unwrap();
        assert_eq!(listed.len(), 1, "expired rooms are gone: {listed:?}");
        rooms.delete("bd-a").await.unwrap();
        assert!(!rooms.exists("bd-a").await.unwrap());
    }
}
