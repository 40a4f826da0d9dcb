//! `sagactl console`: the operator's actions on dead letters over HTTP, for
//! the saga page. It holds the operator's broker identity (the only one
//! that may publish another service's events) and nothing else: no
//! database, no service's credentials. The page (served by the order
//! service, on another origin) calls it with the admin token, which it
//! checks itself; CORS admits the page's origin only.
//!
//! - `POST /dead-letters/{seq}/redrive`: one dead letter, as `sagactl dlq
//!   redrive --seq SEQ` does;
//! - `POST /sagas/{id}/retry`: every dead letter of a saga, as `sagactl
//!   retry ID` does.
//!
//! Both take `{"operator", "note", "dryRun", "force"}` and answer what
//! became of each dead letter; a dry run changes nothing. The refusals are
//! those of the command line (a saga that has ended is not moved unless
//! forced), and actions are taken one at a time, so two operators pressing
//! the same button see one redrive and one "no dead letter".

use std::{sync::Arc, time::Duration};

use anyhow::Result;
use axum::{
    Json, Router,
    extract::State,
    http::{HeaderName, HeaderValue, Method, StatusCode, header},
    response::{IntoResponse, Response},
};
use common::{
    dlq::{Dlq, Filter, NoSuchDeadLetter, Redrive, Redriven},
    http::{AdminToken, ApiError, ValidJson},
    limits,
};
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;
use tower_http::cors::{AllowOrigin, CorsLayer};
use utoipa::{ToSchema, openapi};
use utoipa_axum::{router::OpenApiRouter, routes};
use uuid::Uuid;

use crate::{Connection, dlq::OrderService};

/// What the console needs: the dead-letter stream under the operator's
/// identity, the order service (has a saga ended?), the admin token.
pub struct Console {
    dlq: Dlq,
    nats: async_nats::Client,
    sagas: OrderService,
    admin: AdminToken,
    /// One action at a time: a second press waits for the first and then
    /// finds its dead letters gone.
    one_at_a_time: tokio::sync::Mutex<()>,
}

impl Console {
    /// A console over `nats` (connected as the operator), asking the order
    /// service of `connection` about sagas, admitting `connection`'s admin
    /// token.
    pub fn new(nats: async_nats::Client, connection: &Connection) -> Result<Console> {
        let token = connection.admin_token()?;
        let subjects = common::Subjects::new(connection.subject_prefix.clone());
        Ok(Console {
            dlq: Dlq::new(async_nats::jetstream::new(nats.clone()), subjects),
            nats,
            sagas: OrderService::new(connection.clone()),
            admin: AdminToken::new(Some(token)),
            one_at_a_time: tokio::sync::Mutex::new(()),
        })
    }
}

/// What the operator asks: who, why, and whether only to see what would be
/// done.
#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Action {
    /// Who acts: kept in the audit record (required unless a dry run).
    #[serde(default)]
    #[schema(min_length = 1, max_length = 128, example = "ada")]
    pub operator: Option<String>,
    /// Why: kept in the audit record and shown in the saga's timeline
    /// (required unless a dry run).
    #[serde(default)]
    #[schema(
        min_length = 1,
        max_length = 2000,
        example = "gateway back after the outage, ticket 4711"
    )]
    pub note: Option<String>,
    /// Only say what would be redriven, and change nothing.
    #[serde(default)]
    pub dry_run: bool,
    /// Redrive dead letters of sagas that have ended too, for this reason
    /// (kept in the audit record); without it they are refused.
    #[serde(default)]
    #[schema(min_length = 1, max_length = 2000)]
    pub force: Option<String>,
}

impl Action {
    /// Who and why, checked whenever they are given, and required unless
    /// only a dry run is asked for.
    fn check(&self) -> Result<(), ApiError> {
        fn required(given: Option<&str>, dry_run: bool) -> Option<&str> {
            match (given, dry_run) {
                (Some(text), _) => Some(text),
                (None, false) => Some(""),
                (None, true) => None,
            }
        }
        if let Some(operator) = required(self.operator.as_deref(), self.dry_run) {
            limits::check_id("operator", operator).map_err(ApiError::Unprocessable)?;
        }
        if let Some(note) = required(self.note.as_deref(), self.dry_run) {
            limits::check_reason("note", note).map_err(ApiError::Unprocessable)?;
        }
        if let Some(why) = &self.force {
            limits::check_reason("force", why).map_err(ApiError::Unprocessable)?;
        }
        Ok(())
    }

    fn redrive(self, seqs: Vec<u64>, filter: Filter) -> Redrive {
        Redrive {
            seqs,
            filter,
            body: None,
            note: self.note.unwrap_or_default(),
            operator: self.operator.unwrap_or_default(),
            dry_run: self.dry_run,
            force: self.force,
        }
    }
}

/// What became of the dead letters an action selected.
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Outcome {
    /// Each dead letter: `would redrive` (a dry run), `redrove`, `refused`
    /// (with why) or `failed` (it stays in the stream).
    pub results: Vec<Redriven>,
    /// How many were refused or failed.
    pub not_redriven: usize,
}

impl Console {
    async fn act(&self, request: Redrive) -> Result<Outcome, ApiError> {
        let _turn = self.one_at_a_time.lock().await;
        let results = self
            .dlq
            .redrive(&request, &self.sagas, &mut |_, _| {})
            .await
            .map_err(|e| match e.downcast_ref::<NoSuchDeadLetter>() {
                Some(missing) => ApiError::NotFound(missing.to_string()),
                None => ApiError::BadGateway(format!("{e:#}")),
            })?;
        for r in &results {
            tracing::info!(seq = r.seq, outcome = %r.outcome, operator = %request.operator, dry_run = request.dry_run, "{}", r.detail);
        }
        let not_redriven = results.iter().filter(|r| r.stays()).count();
        Ok(Outcome {
            results,
            not_redriven,
        })
    }
}

/// Redrives one dead letter (or, with `dryRun`, says what it would
/// publish): the event goes out again to its subject under the operator's
/// identity, with an audit record, and leaves the dead-letter stream.
#[utoipa::path(post, path = "/dead-letters/{seq}/redrive", tag = "operator",
    params(("seq" = u64, Path, minimum = 1, description = "Its sequence in the dead-letter stream")),
    request_body = Action,
    security(("operator" = [])),
    responses(
        (status = 200, description = "What became of it (refused: why)", body = Outcome),
        (status = 404, description = "No such dead letter (redriven, or never there)", body = common::api_doc::ErrorBody),
        (status = 422, description = "No operator or note for a redrive", body = common::api_doc::ErrorBody),
        (status = 502, description = "The broker or the order service failed", body = common::api_doc::ErrorBody),
    ))]
async fn redrive(
    State(console): State<Arc<Console>>,
    axum::extract::Path(seq): axum::extract::Path<String>,
    ValidJson(action): ValidJson<Action>,
) -> Result<Json<Outcome>, ApiError> {
    let seq = seq.parse::<u64>().ok().filter(|s| *s > 0).ok_or_else(|| {
        ApiError::BadRequest(format!(
            "{seq:?} is not a dead letter's sequence (a positive number)"
        ))
    })?;
    action.check()?;
    let request = action.redrive(vec![seq], Filter::default());
    Ok(Json(console.act(request).await?))
}

/// Retries a saga: redrives every dead letter of it (or, with `dryRun`,
/// says what would be), as `sagactl retry` does.
#[utoipa::path(post, path = "/sagas/{id}/retry", tag = "operator",
    params(("id" = Uuid, Path, description = "The saga's correlation id (its order id)")),
    request_body = Action,
    security(("operator" = [])),
    responses(
        (status = 200, description = "What became of each of its dead letters", body = Outcome),
        (status = 404, description = "The saga has no dead letter", body = common::api_doc::ErrorBody),
        (status = 422, description = "No operator or note for a retry", body = common::api_doc::ErrorBody),
        (status = 502, description = "The broker or the order service failed", body = common::api_doc::ErrorBody),
    ))]
async fn retry(
    State(console): State<Arc<Console>>,
    axum::extract::Path(id): axum::extract::Path<String>,
    ValidJson(action): ValidJson<Action>,
) -> Result<Json<Outcome>, ApiError> {
    let id: Uuid = id
        .parse()
        .map_err(|_| ApiError::BadRequest(format!("{id:?} is not a saga id (a UUID)")))?;
    action.check()?;
    let saga = Filter {
        saga: Some(id),
        ..Filter::default()
    };
    let outcome = console.act(action.redrive(Vec::new(), saga)).await?;
    if outcome.results.is_empty() {
        return Err(ApiError::NotFound(format!(
            "saga {id} has no dead letter (retried already, or it never had one)"
        )));
    }
    Ok(Json(outcome))
}

/// What the health endpoints answer.
#[derive(Serialize, ToSchema)]
struct Health {
    /// `ok`, or `broker unreachable`.
    status: String,
}

/// `GET /health/live`: the process answers (liveness).
#[utoipa::path(get, path = "/health/live", tag = "health",
    responses((status = 200, description = "The process answers", body = Health)))]
async fn live() -> Json<Health> {
    Json(Health {
        status: "ok".into(),
    })
}

/// `GET /health/ready`: 200 while the console is connected to the broker,
/// 503 while it is not.
#[utoipa::path(get, path = "/health/ready", tag = "health",
    responses(
        (status = 200, description = "Connected to the broker", body = Health),
        (status = 503, description = "Not connected to the broker", body = Health),
    ))]
async fn health(State(console): State<Arc<Console>>) -> Response {
    let connected = console.nats.connection_state() == async_nats::connection::State::Connected;
    let (status, text) = match connected {
        true => (StatusCode::OK, "ok"),
        false => (StatusCode::SERVICE_UNAVAILABLE, "broker unreachable"),
    };
    (
        status,
        Json(Health {
            status: text.into(),
        }),
    )
        .into_response()
}

/// The console's OpenAPI document, serialized once.
static DOCUMENT: std::sync::LazyLock<String> =
    std::sync::LazyLock::new(|| openapi().to_pretty_json().unwrap_or_default());

/// `GET /openapi.json`: this document.
#[utoipa::path(get, path = "/openapi.json", tag = "meta",
    responses((status = 200, description = "The OpenAPI 3.1 document of the console's HTTP API", content_type = "application/json", body = Object)))]
async fn openapi_json() -> Response {
    (
        [(header::CONTENT_TYPE, "application/json")],
        DOCUMENT.as_str(),
    )
        .into_response()
}

fn actions() -> OpenApiRouter<Arc<Console>> {
    OpenApiRouter::new()
        .routes(routes!(redrive))
        .routes(routes!(retry))
}

fn served() -> OpenApiRouter<Arc<Console>> {
    OpenApiRouter::new()
        .routes(routes!(live))
        .routes(routes!(health))
        .routes(routes!(openapi_json))
}

/// The console's OpenAPI document.
pub fn openapi() -> openapi::OpenApi {
    let (_, own) = actions().merge(served()).split_for_parts();
    common::api_doc::completed(
        own,
        "sagactl console",
        "The operator's actions for the saga page: redrive a dead letter, retry a halted \
         saga, each with a dry run first. Every refusal (4xx) and failure (5xx) carries an \
         ErrorBody; every answer echoes the caller's x-request-id (or a new one).",
    )
}

/// The console's routes, in the services' shell, the actions behind the
/// admin token, CORS admitting `page_origins` only.
pub fn router(console: Arc<Console>, page_origins: &[String]) -> Result<Router> {
    let admin = console.admin.clone();
    let (actions, _) = actions()
        .route_layer(axum::middleware::from_fn_with_state(
            admin,
            common::http::operator_only,
        ))
        .split_for_parts();
    let (served, _) = served().split_for_parts();
    let routes = actions.merge(served).with_state(console);
    let origins = page_origins
        .iter()
        .map(|o| HeaderValue::from_str(o))
        .collect::<Result<Vec<_>, _>>()?;
    let cors = CorsLayer::new()
        .allow_origin(AllowOrigin::list(origins))
        .allow_methods([Method::GET, Method::POST])
        .allow_headers([header::AUTHORIZATION, header::CONTENT_TYPE])
        .expose_headers([HeaderName::from_static(common::http_shell::REQUEST_ID)])
        .max_age(Duration::from_secs(600));
    Ok(common::http_shell::shell(routes, "console", common::trace::Tracing::off()).layer(cors))
}

/// Serves the console on `listener` until `shutdown`.
pub async fn serve(
    console: Console,
    listener: tokio::net::TcpListener,
    page_origins: &[String],
    shutdown: CancellationToken,
) -> Result<()> {
    let app = router(Arc::new(console), page_origins)?;
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown.cancelled_owned())
        .await?;
    Ok(())
}
