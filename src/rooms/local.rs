//! Development rooms: no network, a clearly fake URL, tokens with the same claims as Daily's
//! signed by a random key. Refused when `APP_ENV=production`.

use async_trait::async_trait;
use jsonwebtoken::{EncodingKey, Header};
use rand::RngCore;

use super::{ListedRoom, Room, RoomError, RoomRequest, RoomService, TokenClaims, TokenRequest};

pub struct LocalRooms {
    key: EncodingKey,
}

impl Default for LocalRooms {
    fn default() -> Self {
        let mut secret = [0u8; 32];
        rand::rng().fill_bytes(&mut secret);
        Self {
            key: EncodingKey::from_secret(&secret),
        }
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
        Ok(Room {
            name: req.name.clone(),
            url: self.room_url(&req.name),
        })
    }

    async fn delete(&self, _name: &str) -> Result<(), RoomError> {
        Ok(())
    }

    async fn exists(&self, _name: &str) -> Result<bool, RoomError> {
        Ok(true)
    }

    async fn list_managed(&self) -> Result<Vec<ListedRoom>, RoomError> {
        // Nothing to reap: local rooms exist only as URLs.
        Ok(Vec::new())
    }

    fn mint_token(&self, req: &TokenRequest<'_>) -> Result<String, RoomError> {
        jsonwebtoken::encode(
            &Header::default(),
            &TokenClaims::new("local", req),
            &self.key,
        )
        .map_err(|e| RoomError::Token(e.to_string()))
    }

    async fn check(&self) -> Result<(), RoomError> {
        Ok(())
    }
}
