//! The `cloudrun` provider: one Cloud Run job execution per session (being written).
