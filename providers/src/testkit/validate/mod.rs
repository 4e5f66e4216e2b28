//! Validators of requests against each API's published machine-readable description, one per
//! description format: OpenAPI 3.0 (Fly Machines), botocore service models (ECS) and Google
//! discovery documents (Cloud Run). Each fake runs every request through its validator first, so
//! a client that sends what the real API would refuse fails its tests.
//!
//! The three formats describe types differently (JSON Schema, named shapes, discovery schemas
//! with proto3 JSON rules), so each validator walks its own; what they share is the contract:
//! a violation is an error message naming where in the request it is.

#[cfg(feature = "fargate")]
pub mod botocore;
#[cfg(feature = "cloudrun")]
pub mod discovery;
pub mod openapi;

/// Decoded query pairs from string slices, for the validators' tests.
#[cfg(test)]
fn q(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect()
}
