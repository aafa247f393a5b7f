//! The admin API as an OpenAPI 3.1 document, generated from the endpoints'
//! `#[utoipa::path]` attributes and the [`super::model`] types, never
//! written by hand. The relay serves it at `GET /api/v1/openapi.json`; a
//! copy is kept in docs/openapi.json (tests/admin_api_openapi.rs fails when
//! it is stale, and says how to write it again).

use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::openapi::{ContentBuilder, Ref, RefOr, ResponseBuilder};
use utoipa::{Modify, OpenApi};

use super::model::{
    BodyReplay, DeadLetter, DeadLetterDetail, DeadLetterPage, DeadLetterReplay,
    DeadLetterSelection, ErrorBody, PauseState, QuarantinePage, QuarantineReplay,
    QuarantineSelection, QuarantinedBody, QuarantinedDetail, ReplayOutcome, Skipped, TargetQueue,
    Targets, TimeArg,
};

/// The derive that collects the endpoints and types.
#[derive(OpenApi)]
#[openapi(
    info(
        title = "postback-relay admin API",
        version = "v1",
        description = "Steers a running relay: the queue per target, pauses, dead letters and \
            the quarantine. Served on the admin listener under /api/v1/, behind a bearer token \
            (docs/admin-api.md)."
    ),
    paths(
        super::api::targets,
        super::api::pause,
        super::api::resume,
        super::api::list_dead_letters,
        super::api::show_dead_letter,
        super::api::replay_dead_letters,
        super::api::purge_dead_letters,
        super::api::list_quarantine,
        super::api::show_quarantined,
        super::api::replay_quarantine,
        super::api::purge_quarantine,
    ),
    components(schemas(
        ErrorBody, Targets, TargetQueue, PauseState, DeadLetterPage, DeadLetter,
        DeadLetterDetail, DeadLetterSelection, DeadLetterReplay, Skipped, QuarantinePage,
        QuarantinedBody, QuarantinedDetail, QuarantineSelection, QuarantineReplay, BodyReplay,
        ReplayOutcome, TimeArg
    )),
    modifiers(&EveryOperation),
    security(("bearer" = [])),
    tags(
        (name = "targets", description = "The queue per target; pause and resume"),
        (name = "dead letters", description = "Postbacks a target was given up for"),
        (name = "quarantine", description = "Bodies the parser refused (answered 400)"),
    )
)]
struct ApiDoc;

/// What every operation shares: the bearer token, and the answers any
/// request may get (no or a wrong token, the API disabled, the store down).
struct EveryOperation;

/// The shared answers: status, component name, description.
const SHARED: [(&str, &str, &str); 3] = [
    (
        "401",
        "Unauthorized",
        "No or a wrong `Authorization: Bearer <admin token>` header (with `WWW-Authenticate: Bearer`)",
    ),
    (
        "404",
        "Disabled",
        "The admin API is disabled (no `admin.token_file`), or no such item",
    ),
    ("503", "StoreUnavailable", "The store cannot answer"),
];

impl Modify for EveryOperation {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .description(Some("The admin token (`admin.token_file`)"))
                    .build(),
            ),
        );
        for (_, name, description) in SHARED {
            let error = ContentBuilder::new()
                .schema(Some(Ref::from_schema_name("ErrorBody")))
                .build();
            let response = ResponseBuilder::new()
                .description(description)
                .content("application/json", error)
                .build();
            components
                .responses
                .insert(name.to_owned(), response.into());
        }
        for item in openapi.paths.paths.values_mut() {
            for operation in [&mut item.get, &mut item.post].into_iter().flatten() {
                for (status, name, _) in SHARED {
                    operation
                        .responses
                        .responses
                        .entry(status.to_owned())
                        .or_insert_with(|| RefOr::Ref(Ref::from_response_name(name)));
                }
            }
        }
    }
}

/// The document.
pub fn document() -> utoipa::openapi::OpenApi {
    ApiDoc::openapi()
}

/// The document as docs/openapi.json keeps it: pretty JSON and a newline.
pub fn pretty() -> String {
    let mut text = document()
        .to_pretty_json()
        .unwrap_or_else(|err| format!("{{\"error\": \"{err}\"}}"));
    text.push('\n');
    text
}
