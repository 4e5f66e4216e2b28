//! botdispatch's own API description (OpenAPI 3.1), generated from the handlers and types with
//! utoipa, served at `GET /openapi.json` and committed as `docs/openapi.json` (a test keeps the
//! two equal: regenerate with `cargo run -- openapi > docs/openapi.json`).

use axum::Json;
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi};

use super::proxy::OperationIds as ProxyOperationIds;
use super::{capacity, health, proxy, sessions, sessions_list, start};
use crate::error::ErrorBody;
use crate::sessions::{SessionList, SessionView, StartRequest};

#[derive(OpenApi)]
#[openapi(
    info(
        title = "botdispatch",
        description = "Starts one isolated bot machine per voice-AI session: a Daily room and tokens, \
a machine on the configured provider, the join URL. Errors always have the shape \
`{\"error\", \"detail\", \"info\"}`.",
        license(name = "Apache-2.0"),
    ),
    paths(
        start::start,
        start::start_agent,
        sessions::get,
        sessions::delete,
        sessions::delete_alias,
        sessions_list::list,
        proxy::session,
        proxy::pipecat,
        health::healthz,
        health::readyz,
        health::metrics,
        capacity::get,
        serve,
    ),
    components(schemas(StartRequest, start::StartResponse, SessionView, SessionList, ErrorBody, sessions::Stopped, capacity::CapacityView, capacity::AgentView, capacity::ReserveView)),
    modifiers(&BearerAuth, &ProxyOperationIds),
    tags(
        (name = "sessions", description = "Start, read and stop sessions"),
        (name = "operations", description = "Health, readiness, metrics"),
    )
)]
pub struct ApiDoc;

struct BearerAuth;

impl Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .bearer_format("JWT")
                    .build(),
            ),
        );
    }
}

/// The document as committed in `docs/openapi.json`.
pub fn document() -> String {
    let mut json = ApiDoc::openapi()
        .to_pretty_json()
        .expect("the OpenAPI document serializes");
    json.push('\n');
    json
}

/// This API's OpenAPI 3.1 document.
#[utoipa::path(get, path = "/openapi.json", tag = "operations",
    responses((status = 200, description = "OpenAPI 3.1 document", content_type = "application/json")))]
pub async fn serve() -> Json<utoipa::openapi::OpenApi> {
    Json(ApiDoc::openapi())
}
