//! The OpenAPI document of a service's HTTP API, generated from its
//! handlers (utoipa, `#[utoipa::path]` on each and `utoipa_axum`'s
//! `routes!` to route them, so what is documented is what is routed).
//!
//! Here: what every service serves besides its own routes (health,
//! metrics, `GET /openapi.json`), the body every refusal carries
//! ([`ErrorBody`]), the credentials ([`OPERATOR`], [`CANCEL_TOKEN`]), and
//! the answers the shell ([`crate::http_shell`]) may give on any route:
//! 400 for a malformed request, 401 where a credential is needed, 408
//! past the deadline, 413 for a body over the limit, 500.

use axum::{
    Router,
    body::Bytes,
    extract::State,
    http::header,
    response::{IntoResponse, Response},
};
use serde::Serialize;
use utoipa::{
    OpenApi, ToSchema,
    openapi::{
        self, RefOr, ResponseBuilder,
        content::ContentBuilder,
        path::Operation,
        security::{Http, HttpAuthScheme, SecurityScheme},
    },
};
use utoipa_axum::{router::OpenApiRouter, routes};

use crate::http::{HealthState, health_routes};

/// What every 4xx and 5xx answer carries: what is wrong, in words a caller
/// can act on (for a 500, only that it is internal: its cause is logged).
#[derive(Debug, Serialize, ToSchema)]
#[schema(example = json!({"error": "'x' is not an order id (a UUID)"}))]
pub struct ErrorBody {
    pub error: String,
}

/// The security scheme of the operator's admin token (`ADMIN_TOKEN`).
pub const OPERATOR: &str = "operator";

/// The security scheme of an order's cancel token (from its placement).
pub const CANCEL_TOKEN: &str = "cancelToken";

/// `GET /openapi.json`: this document.
#[utoipa::path(
    get,
    path = "/openapi.json",
    tag = "meta",
    responses((status = 200, description = "The OpenAPI 3.1 document of this service's HTTP API", content_type = "application/json", body = Object)),
)]
async fn openapi_json(State(document): State<Document>) -> Response {
    ([(header::CONTENT_TYPE, "application/json")], document.0).into_response()
}

/// The document, serialized once.
#[derive(Clone)]
struct Document(Bytes);

#[derive(OpenApi)]
#[openapi(paths(crate::meter::render))]
struct Metrics;

/// The routes every service serves besides its own, documented.
fn served_routes() -> OpenApiRouter<Document> {
    OpenApiRouter::new().routes(routes!(openapi_json))
}

/// The document of `service`, whose own routes documented `routes`: with
/// the routes every service serves, its credentials, and the shell's
/// answers on every operation.
pub fn document(routes: openapi::OpenApi, service: &str) -> openapi::OpenApi {
    let mut doc = openapi::OpenApi::default();
    doc.merge(routes);
    doc.merge(health_routes().into_openapi());
    doc.merge(Metrics::openapi());
    doc.merge(served_routes().into_openapi());
    completed(
        doc,
        &format!("{service} service"),
        &format!(
            "The HTTP API of the saga's {service} service. Every refusal (4xx) and \
             internal error (5xx) carries an ErrorBody; every answer echoes the \
             caller's x-request-id (or a new one)."
        ),
    )
}

/// `doc` (routes served in the shell) with its title and description,
/// the credentials, the [`ErrorBody`] schema, and the shell's answers on
/// every operation.
pub fn completed(mut doc: openapi::OpenApi, title: &str, description: &str) -> openapi::OpenApi {
    doc.info = openapi::InfoBuilder::new()
        .title(title)
        .version(env!("CARGO_PKG_VERSION"))
        .description(Some(description))
        .license(Some(openapi::LicenseBuilder::new().name("MIT").build()))
        .build();
    let components = doc.components.get_or_insert_with(Default::default);
    components.schemas.insert(
        "ErrorBody".into(),
        <ErrorBody as utoipa::PartialSchema>::schema(),
    );
    components.add_security_scheme(
        OPERATOR,
        SecurityScheme::Http(
            Http::builder()
                .scheme(HttpAuthScheme::Bearer)
                .description(Some(
                    "The operator's admin token (ADMIN_TOKEN): `Authorization: Bearer <token>`",
                ))
                .build(),
        ),
    );
    components.add_security_scheme(
        CANCEL_TOKEN,
        SecurityScheme::Http(
            Http::builder()
                .scheme(HttpAuthScheme::Bearer)
                .description(Some(
                    "An order's cancel token, handed out once in its placement's answer",
                ))
                .build(),
        ),
    );
    for item in doc.paths.paths.values_mut() {
        for operation in [
            &mut item.get,
            &mut item.put,
            &mut item.post,
            &mut item.delete,
            &mut item.patch,
        ]
        .into_iter()
        .flatten()
        {
            shell_answers(operation);
        }
    }
    doc
}

/// Adds the answers the shell may give to an operation that does not
/// document them itself.
fn shell_answers(operation: &mut Operation) {
    let takes_input = operation.request_body.is_some()
        || operation.parameters.as_ref().is_some_and(|p| !p.is_empty());
    let secured = operation.security.as_ref().is_some_and(|s| !s.is_empty());
    let mut answers = vec![
        ("408", "No answer within the request deadline (30 s)"),
        ("500", "An internal error: its cause is logged, never sent"),
    ];
    if takes_input {
        answers.push(("400", "A malformed request: the message says what is wrong"));
    }
    if operation.request_body.is_some() {
        answers.push(("413", "A request body over the limit (256 KiB)"));
    }
    if secured {
        answers.push(("401", "No credential, or not the right one"));
    }
    for (status, description) in answers {
        operation
            .responses
            .responses
            .entry(status.to_string())
            .or_insert_with(|| RefOr::T(refusal(description)));
    }
}

/// A response with an [`ErrorBody`].
pub fn refusal(description: &str) -> openapi::Response {
    ResponseBuilder::new()
        .description(description)
        .content(
            "application/json",
            ContentBuilder::new()
                .schema(Some(openapi::Ref::from_schema_name("ErrorBody")))
                .build(),
        )
        .build()
}

/// `service`'s routes with the routes every service serves (health and
/// `GET /openapi.json`; `/metrics` is added when the service runs), and the
/// document they make.
pub fn serve(routes: OpenApiRouter, health: HealthState, service: &str) -> Router {
    let (router, own) = routes.split_for_parts();
    let json = document(own, service)
        .to_pretty_json()
        .expect("an OpenAPI document serializes");
    let (served, _) = served_routes().split_for_parts();
    let (health_router, _) = health_routes().split_for_parts();
    router
        .merge(health_router.with_state(health))
        .merge(served.with_state(Document(Bytes::from(json))))
}
