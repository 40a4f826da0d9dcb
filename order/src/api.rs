//! HTTP: `POST /orders`, `GET /orders/{id}` (also as it was: `?atVersion=`,
//! `?asOf=`; and at least as new as `?minVersion=`), `GET /orders/{id}/events`,
//! `GET /orders?customerId=&status=&limit=&offset=`. Reads come from the read model.
//! `GET /products/{id}`: a product as orders are priced (the catalog).
//!
//! Sagas, as the observer recorded them: `GET /sagas/{orderId}` (the
//! timeline, where the saga stands and who owes the next event) and
//! `GET /sagas?status=&stalled=true&since=&before=&limit=` (newest activity
//! first; `before` is the next page's cursor).

use axum::{
    Json,
    extract::{FromRef, Path, State},
    http::{HeaderMap, StatusCode, header},
    response::IntoResponse,
};
use chrono::{DateTime, Utc};
use common::{
    Envelope, EventKind,
    api_doc::ErrorBody,
    http::{AdminToken, ApiError, ValidJson, ValidQuery},
    limits,
};
use serde::{Deserialize, Serialize};
use std::time::Duration;
use utoipa::IntoParams;
use utoipa_axum::{router::OpenApiRouter, routes};
use uuid::Uuid;

use crate::{
    catalog,
    domain::{Command, OrderStatus},
    observer,
    place::{Canceller, CommandError, PlaceError, PlaceOrder, Placer},
    projection,
    read_model::{self, OrderView},
    store::{self, ExecError},
    timeline::{self, EntryKind, EntryRow, SagaRow},
};

pub fn router(
    placer: Placer,
    stall_after: Duration,
    admin: AdminToken,
    page: crate::page::Page,
) -> OpenApiRouter {
    let api = Api {
        page,
        sagas: Sagas {
            pool: placer.pool.clone(),
            stall_after,
        },
        commands: Commands {
            placer: placer.clone(),
            admin: admin.clone(),
        },
        placer,
    };
    let mut routes = public_routes()
        .merge(
            operator_reads().route_layer(axum::middleware::from_fn_with_state(
                admin,
                common::http::operator_only,
            )),
        )
        .with_state(api);
    link_placement(routes.get_openapi_mut());
    routes
}

/// Anyone may place an order, read one whose id they were given, cancel
/// one with its cancel token, read the catalog and the page; a resolution
/// is the operator's (checked by its handler).
fn public_routes() -> OpenApiRouter<Api> {
    OpenApiRouter::new()
        .routes(routes!(place_order))
        .routes(routes!(get_order))
        .routes(routes!(get_product))
        .routes(routes!(cancel))
        .routes(routes!(resolve))
        .routes(routes!(crate::page::page))
}

/// Reads that show customers' orders, addresses and sagas across
/// customers: the operator's (the admin token, checked before them).
fn operator_reads() -> OpenApiRouter<Api> {
    OpenApiRouter::new()
        .routes(routes!(list_orders))
        .routes(routes!(get_events))
        .routes(routes!(get_customer_stats))
        .routes(routes!(list_sagas))
        .routes(routes!(get_saga))
        .routes(routes!(list_dead_letters))
}

/// The document of the API: what `GET /openapi.json` serves.
pub fn openapi() -> utoipa::openapi::OpenApi {
    let mut routes = public_routes().merge(operator_reads()).into_openapi();
    link_placement(&mut routes);
    common::api_doc::document(routes, "order")
}

/// Links from a placement's answer to what can be done with the order
/// (OpenAPI links: what a client, or a fuzzer's stateful phase, follows).
fn link_placement(doc: &mut utoipa::openapi::OpenApi) {
    use utoipa::openapi::{RefOr, link::LinkBuilder};
    let Some(placement) = doc
        .paths
        .paths
        .get_mut("/orders")
        .and_then(|item| item.post.as_mut())
    else {
        return;
    };
    let links = [
        ("GetOrder", "get_order", "The order"),
        ("GetOrderEvents", "get_events", "Its events"),
        ("GetSaga", "get_saga", "Its saga"),
        ("CancelOrder", "cancel", "Cancel it"),
        (
            "ResolveOrder",
            "resolve",
            "Resolve it (when it requires intervention)",
        ),
    ];
    for status in ["200", "201"] {
        if let Some(RefOr::T(response)) = placement.responses.responses.get_mut(status) {
            for (name, operation, description) in links {
                let link = LinkBuilder::new()
                    .operation_id(operation)
                    .parameter("orderId", "$response.body#/orderId")
                    .description(description)
                    .build();
                response.links.insert(name.into(), RefOr::T(link));
            }
        }
    }
}

/// What the routes read and run.
#[derive(Clone)]
struct Api {
    page: crate::page::Page,
    placer: Placer,
    sagas: Sagas,
    commands: Commands,
}

impl FromRef<Api> for Placer {
    fn from_ref(api: &Api) -> Placer {
        api.placer.clone()
    }
}

impl FromRef<Api> for crate::page::Page {
    fn from_ref(api: &Api) -> crate::page::Page {
        api.page.clone()
    }
}

impl FromRef<Api> for Sagas {
    fn from_ref(api: &Api) -> Sagas {
        api.sagas.clone()
    }
}

impl FromRef<Api> for Commands {
    fn from_ref(api: &Api) -> Commands {
        api.commands.clone()
    }
}

impl From<PlaceError> for ApiError {
    fn from(e: PlaceError) -> Self {
        match e {
            PlaceError::Invalid(msg) => ApiError::Unprocessable(msg),
            PlaceError::KeyReused(msg) => ApiError::Unprocessable(msg),
            PlaceError::Internal(e) => ApiError::Internal(e.into()),
        }
    }
}

/// Places an order: prices its lines from the catalog, records
/// `OrderPlaced` and starts its saga. The same `Idempotency-Key` with the
/// same request answers the first placement again (200).
#[utoipa::path(post, path = "/orders", tag = "orders",
    params(("Idempotency-Key" = Option<String>, Header, max_length = 200,
        description = "Makes a retried placement answer the first one")),
    request_body = PlaceOrder,
    responses(
        (status = 201, description = "Placed; `cancelToken` is handed out here only", body = PlacedView,
            headers(("Location" = String, description = "The order's URL"))),
        (status = 200, description = "Placed before under this Idempotency-Key", body = PlacedView,
            headers(("Location" = String, description = "The order's URL"))),
        (status = 422, description = "Lines, prices or address refused, or the key reused with another request", body = ErrorBody),
    ))]
async fn place_order(
    State(placer): State<Placer>,
    headers: HeaderMap,
    ValidJson(request): ValidJson<PlaceOrder>,
) -> Result<impl IntoResponse, ApiError> {
    let key =
        match headers.get("Idempotency-Key") {
            Some(v) => Some(v.to_str().map_err(|_| {
                ApiError::BadRequest("Idempotency-Key must be visible ASCII".into())
            })?),
            None => None,
        };
    let placed = placer.place(request, key).await?;
    let status = if placed.created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    let location = format!("/orders/{}", placed.order.id);
    Ok((
        status,
        [(header::LOCATION, location)],
        Json(PlacedView::from(placed)),
    ))
}

/// A placement's answer: the order, and the token its customer's cancel
/// must present (handed out here only; kept hashed).
#[derive(Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct PlacedView {
    #[serde(flatten)]
    pub order: OrderView,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cancel_token: Option<String>,
}

impl From<crate::place::Placed> for PlacedView {
    fn from(placed: crate::place::Placed) -> PlacedView {
        PlacedView {
            order: placed.order.into(),
            cancel_token: placed.cancel_token.map(|t| t.as_str().to_string()),
        }
    }
}

fn parse_id(id: &str) -> Result<Uuid, ApiError> {
    id.parse()
        .map_err(|_| ApiError::BadRequest(format!("'{id}' is not an order id (a UUID)")))
}

/// Which state of an order `GET /orders/{id}` answers with; at most one.
#[derive(Deserialize, Default, IntoParams)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[into_params(parameter_in = Query)]
struct OrderQuery {
    /// The state after its first N events.
    #[param(minimum = 1, maximum = 1_000_000_000)]
    at_version: Option<i64>,
    /// The state after every event that occurred by then (RFC 3339).
    as_of: Option<DateTime<Utc>>,
    /// At least this new (read-your-writes): the read model if it has
    /// caught up, else the event store; 409 if no such version was written.
    #[param(minimum = 0, maximum = 1_000_000_000)]
    min_version: Option<i64>,
    /// The state its last committed event left it in, from the event
    /// store, never the read model (which may be a moment behind): what a
    /// decision that must not act on a stale state asks for (whether a
    /// saga has ended, before a redrive).
    #[serde(default)]
    latest: bool,
}

/// The latest version any order can reach, for bounds on the query.
const MAX_VERSION: i64 = 1_000_000_000;

/// An order, from the read model (or the event store when the read model
/// is behind what was asked); or as it was, with `atVersion` or `asOf`.
#[utoipa::path(get, path = "/orders/{orderId}", tag = "orders",
    params(("orderId" = Uuid, Path), OrderQuery),
    responses(
        (status = 200, description = "The order", body = OrderView),
        (status = 404, description = "No such order, or not at that version or time", body = ErrorBody),
        (status = 409, description = "minVersion has not been written", body = ErrorBody),
    ))]
async fn get_order(
    State(placer): State<Placer>,
    Path(id): Path<String>,
    ValidQuery(q): ValidQuery<OrderQuery>,
) -> Result<Json<OrderView>, ApiError> {
    let id = parse_id(&id)?;
    let not_found = || ApiError::NotFound(format!("order {id} not found"));
    let given = [
        q.at_version.is_some(),
        q.as_of.is_some(),
        q.min_version.is_some(),
        q.latest,
    ];
    if given.into_iter().filter(|g| *g).count() > 1 {
        return Err(ApiError::BadRequest(
            "give at most one of atVersion, asOf, minVersion and latest".into(),
        ));
    }
    let past = match (q.at_version, q.as_of, q.min_version) {
        (None, None, _) => None,
        (Some(n), None, None) => {
            limits::check_range("atVersion", n, 1, MAX_VERSION).map_err(ApiError::BadRequest)?;
            Some(store::At::Version(n))
        }
        (None, Some(t), None) => Some(store::At::Time(t)),
        _ => {
            return Err(ApiError::BadRequest(
                "give at most one of atVersion, asOf, minVersion and latest".into(),
            ));
        }
    };
    let mut conn = placer.pool.acquire().await?;
    let internal = |e: ExecError| ApiError::Internal(e.into());
    if q.latest {
        let order = store::load(&mut conn, id).await.map_err(internal)?;
        return order.map(|o| Json(o.into())).ok_or_else(not_found);
    }
    if let Some(at) = past {
        let (state, latest) = store::load_at(&mut conn, id, at).await.map_err(internal)?;
        return match (state, at) {
            (_, _) if latest == 0 => Err(not_found()),
            (Some(order), store::At::Version(n)) if order.version == n => Ok(Json(order.into())),
            (Some(order), store::At::Time(_)) => Ok(Json(order.into())),
            (_, store::At::Version(n)) => Err(ApiError::NotFound(format!(
                "order {id} has no version {n}: it is at version {latest}"
            ))),
            (None, store::At::Time(t)) => Err(ApiError::NotFound(format!(
                "order {id} did not exist yet at {}",
                t.to_rfc3339()
            ))),
        };
    }
    let min = q.min_version.unwrap_or(0);
    limits::check_range("minVersion", min, 0, MAX_VERSION).map_err(ApiError::BadRequest)?;
    let view = read_model::order_view(&mut *conn, id).await?;
    if let Some(view) = view.filter(|v| v.version >= min) {
        return Ok(Json(view));
    }
    // The read model has not caught up, or has not projected the order yet
    // (a placement is read back at once): the write side.
    match store::load(&mut conn, id).await.map_err(internal)? {
        Some(order) if order.version >= min => Ok(Json(order.into())),
        Some(order) => Err(ApiError::Conflict(format!(
            "order {id} is at version {}: version {min} has not been written",
            order.version
        ))),
        None => Err(not_found()),
    }
}

/// Commands on an existing order that need a credential: the customer's
/// cancel (its cancel token, or the operator's), the operator's resolution.
#[derive(Clone)]
struct Commands {
    placer: Placer,
    admin: AdminToken,
}

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct Resolution {
    /// `manually-compensated`: the operator undid by hand what the saga could not.
    #[schema(pattern = "^manually-compensated$", example = "manually-compensated")]
    resolution: String,
    /// Who resolved it.
    #[schema(min_length = 1, max_length = 128, example = "ops-alice")]
    operator: String,
    /// What was done by hand.
    #[schema(
        min_length = 1,
        max_length = 2000,
        example = "refunded by hand, ticket 4711"
    )]
    note: String,
}

/// `POST /orders/{id}/resolution` (operator): resolves an order that
/// requires intervention. 409 for an order in any other state.
#[utoipa::path(post, path = "/orders/{orderId}/resolution", tag = "orders",
    security(("operator" = [])),
    params(("orderId" = Uuid, Path)),
    request_body = Resolution,
    responses(
        (status = 200, description = "Resolved: MANUALLY_COMPENSATED", body = OrderView),
        (status = 404, description = "No such order", body = ErrorBody),
        (status = 409, description = "The order does not require intervention", body = ErrorBody),
        (status = 422, description = "An unknown resolution, or a note or operator out of bounds", body = ErrorBody),
    ))]
async fn resolve(
    State(Commands { placer, admin }): State<Commands>,
    Path(id): Path<String>,
    headers: HeaderMap,
    ValidJson(body): ValidJson<Resolution>,
) -> Result<Json<OrderView>, ApiError> {
    admin.check(&headers, &format!("POST /orders/{id}/resolution"))?;
    let id = parse_id(&id)?;
    if body.resolution != "manually-compensated" {
        return Err(ApiError::Unprocessable(format!(
            "resolution must be \"manually-compensated\", got {:?}",
            body.resolution
        )));
    }
    let command = Command::ResolveManually {
        operator: body.operator.clone(),
        note: body.note,
    };
    let order = placer.run(id, command).await?;
    tracing::warn!(order_id = %id, correlation_id = %id, operator = %body.operator, "operator resolved the order: manually compensated");
    Ok(Json(order.into()))
}

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Cancel {
    /// Why, in the customer's words (shown as the order's failure reason).
    #[schema(min_length = 1, max_length = 2000, example = "changed my mind")]
    pub reason: String,
}

/// `POST /orders/{id}/cancel` `{"reason": "..."}` with `Authorization:
/// Bearer <cancelToken>` (from the placement's answer) or the operator's
/// token: the customer's cancel, at any step of the saga until the order is
/// confirmed (then 409). The answer is the order, CANCELLED; the services
/// undo their steps after. 401 without a credential, 403 with one that does
/// not cancel this order.
#[utoipa::path(post, path = "/orders/{orderId}/cancel", tag = "orders",
    security(("cancelToken" = []), ("operator" = [])),
    params(("orderId" = Uuid, Path)),
    request_body = Cancel,
    responses(
        (status = 200, description = "Cancelled; the services undo their steps after", body = OrderView),
        (status = 403, description = "A credential that does not cancel this order", body = ErrorBody),
        (status = 404, description = "No such order", body = ErrorBody),
        (status = 409, description = "Too late: the order is confirmed or ended", body = ErrorBody),
        (status = 422, description = "A reason out of bounds", body = ErrorBody),
    ))]
async fn cancel(
    State(Commands { placer, admin }): State<Commands>,
    Path(id): Path<String>,
    headers: HeaderMap,
    ValidJson(body): ValidJson<Cancel>,
) -> Result<Json<OrderView>, ApiError> {
    let id = parse_id(&id)?;
    let by = match AdminToken::bearer(&headers) {
        None => {
            return Err(ApiError::Unauthorized(
                "a cancel needs the order's cancel token: send Authorization: Bearer <cancelToken> (from the placement's answer)".into(),
            ));
        }
        Some(given) if admin.admits(given) => Canceller::Operator,
        Some(given) => Canceller::TokenHolder(given),
    };
    Ok(Json(placer.cancel(id, body.reason, by).await?.into()))
}

impl From<CommandError> for ApiError {
    fn from(e: CommandError) -> Self {
        match e {
            CommandError::NotFound(_) => ApiError::NotFound(e.to_string()),
            CommandError::Refused(m) => ApiError::Conflict(m),
            CommandError::Invalid(m) => ApiError::Unprocessable(m),
            CommandError::Forbidden(m) => ApiError::Forbidden(m),
            CommandError::Internal(ExecError::Conflict(_)) => {
                ApiError::Conflict(format!("{e}; read it again and retry"))
            }
            CommandError::Internal(e) => ApiError::Internal(e.into()),
        }
    }
}

/// `GET /customers/{id}/stats`: the `customer-stats` projection's row (it
/// follows the event store a moment behind; `saga_projection_lag_seconds`
/// says how far).
#[utoipa::path(get, path = "/customers/{customerId}/stats", tag = "customers",
    security(("operator" = [])),
    params(("customerId" = String, Path, min_length = 1, max_length = 128)),
    responses(
        (status = 200, description = "The customer's statistics", body = projection::CustomerStatsView),
        (status = 404, description = "No orders of the customer (yet)", body = ErrorBody),
    ))]
async fn get_customer_stats(
    State(placer): State<Placer>,
    Path(id): Path<String>,
) -> Result<Json<projection::CustomerStatsView>, ApiError> {
    limits::check_id("customerId", &id).map_err(ApiError::BadRequest)?;
    projection::customer_stats(&placer.pool, &id)
        .await?
        .map(Json)
        .ok_or_else(|| ApiError::NotFound(format!("no orders of customer '{id}' (yet)")))
}

/// `GET /products/{id}`: the product as this service prices it, from its
/// catalog (inventory's `ProductPriced` events, a moment behind inventory).
#[utoipa::path(get, path = "/products/{productId}", tag = "catalog",
    params(("productId" = String, Path, min_length = 1, max_length = 128)),
    responses(
        (status = 200, description = "The product as orders are priced", body = catalog::Entry),
        (status = 404, description = "Not in the catalog (yet)", body = ErrorBody),
    ))]
async fn get_product(
    State(placer): State<Placer>,
    Path(id): Path<String>,
) -> Result<Json<catalog::Entry>, ApiError> {
    limits::check_id("productId", &id).map_err(ApiError::BadRequest)?;
    catalog::entry(&placer.pool, &id)
        .await?
        .map(Json)
        .ok_or_else(|| {
            ApiError::NotFound(format!(
                "product '{id}' is not in the catalog (yet): price it with PUT /products/{id} at inventory"
            ))
        })
}

/// The order's own events, oldest first: its history as the event store has it.
#[utoipa::path(get, path = "/orders/{orderId}/events", tag = "orders",
    security(("operator" = [])),
    params(("orderId" = Uuid, Path)),
    responses(
        (status = 200, description = "Its events (envelopes; payloads as in common/contracts/schemas)", body = Vec<Envelope>),
        (status = 404, description = "No such order", body = ErrorBody),
    ))]
async fn get_events(
    State(placer): State<Placer>,
    Path(id): Path<String>,
) -> Result<Json<Vec<Envelope>>, ApiError> {
    let id = parse_id(&id)?;
    let mut conn = placer.pool.acquire().await?;
    let events = store::load_events(&mut conn, id)
        .await
        .map_err(|e| ApiError::Internal(e.into()))?;
    if events.is_empty() {
        return Err(ApiError::NotFound(format!("order {id} not found")));
    }
    Ok(Json(events.into_iter().map(|(env, _)| env).collect()))
}

#[derive(Deserialize, IntoParams)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[into_params(parameter_in = Query)]
struct ListQuery {
    /// Only this customer's.
    #[param(min_length = 1, max_length = 128)]
    customer_id: Option<String>,
    /// Only orders in this status.
    #[param(value_type = Option<OrderStatus>)]
    status: Option<String>,
    /// Page size, 50 unless given.
    #[param(minimum = 1, maximum = 500)]
    limit: Option<i64>,
    #[param(minimum = 0, maximum = 1_000_000)]
    offset: Option<i64>,
}

#[derive(Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
struct OrderPage {
    orders: Vec<OrderView>,
    limit: i64,
    offset: i64,
    /// Offset of the next page, absent on the last one.
    next_offset: Option<i64>,
}

/// Orders, newest first, by customer and status.
#[utoipa::path(get, path = "/orders", tag = "orders",
    security(("operator" = [])),
    params(ListQuery),
    responses((status = 200, description = "A page of orders", body = OrderPage)))]
async fn list_orders(
    State(placer): State<Placer>,
    ValidQuery(q): ValidQuery<ListQuery>,
) -> Result<Json<OrderPage>, ApiError> {
    let limit = page_limit(q.limit)?;
    let offset = q.offset.unwrap_or(0);
    limits::check_range("offset", offset, 0, limits::MAX_OFFSET).map_err(ApiError::BadRequest)?;
    if let Some(customer) = &q.customer_id {
        limits::check_id("customerId", customer).map_err(ApiError::BadRequest)?;
    }
    let status = q.status.as_deref().map(parse_status).transpose()?;
    let mut orders = read_model::list_orders(
        &placer.pool,
        q.customer_id.as_deref(),
        status,
        limit + 1,
        offset,
    )
    .await?;
    let more = orders.len() as i64 > limit;
    orders.truncate(limit as usize);
    Ok(Json(OrderPage {
        orders,
        limit,
        offset,
        next_offset: more.then(|| offset + limit),
    }))
}

/// A page's size: 50 unless asked, at most 500.
/// A page of `rows` read with one more than `limit`: the first `limit`,
/// and the key of the last of them when there is a next page.
fn keyset_page<T, K>(mut rows: Vec<T>, limit: i64, key: impl Fn(&T) -> K) -> (Vec<T>, Option<K>) {
    let more = rows.len() as i64 > limit;
    rows.truncate(limit as usize);
    let next = more.then(|| rows.last().map(key)).flatten();
    (rows, next)
}

fn page_limit(asked: Option<i64>) -> Result<i64, ApiError> {
    let limit = asked.unwrap_or(50);
    if !(1..=500).contains(&limit) {
        return Err(ApiError::BadRequest(format!(
            "limit must be between 1 and 500, got {limit}"
        )));
    }
    Ok(limit)
}

fn parse_status(s: &str) -> Result<OrderStatus, ApiError> {
    serde_json::from_value::<OrderStatus>(serde_json::Value::from(s)).map_err(|_| {
        let all: Vec<String> = OrderStatus::ALL
            .iter()
            .map(|s| {
                serde_json::to_value(s)
                    .map(|v| v.to_string())
                    .unwrap_or_default()
            })
            .collect();
        ApiError::BadRequest(format!("status '{s}' is not one of {}", all.join(", ")))
    })
}

/// What the saga endpoints read.
#[derive(Clone)]
struct Sagas {
    pool: sqlx::PgPool,
    stall_after: Duration,
}

/// A saga as listed: where it stands, and whether it is stalled.
#[derive(Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
struct SagaSummary {
    #[serde(flatten)]
    saga: SagaRow,
    /// `waiting for shipping to create the shipment`, absent once finished.
    waiting: Option<String>,
    stalled: bool,
}

impl SagaSummary {
    fn new(saga: SagaRow, stalled_before: DateTime<Utc>) -> SagaSummary {
        let waiting = match (&saga.waiting_for, &saga.step) {
            (Some(service), Some(step)) => Some(format!("waiting for {service} to {step}")),
            _ => None,
        };
        let stalled = saga.status == OrderStatus::Pending && saga.last_event_at < stalled_before;
        SagaSummary {
            saga,
            waiting,
            stalled,
        }
    }
}

/// One entry of a timeline, with the time since the one before.
#[derive(Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
struct TimelineEntry {
    #[serde(flatten)]
    entry: EntryRow,
    since_previous_ms: Option<i64>,
    /// Undoes an earlier step (drawn going backwards).
    compensation: bool,
    /// Reports a step that failed, or a dead letter.
    failure: bool,
}

#[derive(Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
struct SagaStory {
    #[serde(flatten)]
    summary: SagaSummary,
    stall_after_ms: u128,
    timeline: Vec<TimelineEntry>,
}

/// A saga's timeline across the services, where it stands and who owes
/// the next event.
#[utoipa::path(get, path = "/sagas/{orderId}", tag = "sagas",
    security(("operator" = [])),
    params(("orderId" = Uuid, Path, description = "The saga's order id")),
    responses(
        (status = 200, description = "The saga", body = SagaStory),
        (status = 404, description = "No event of the saga seen (yet)", body = ErrorBody),
    ))]
async fn get_saga(
    State(sagas): State<Sagas>,
    Path(id): Path<String>,
) -> Result<Json<SagaStory>, ApiError> {
    let id = parse_id(&id)?;
    let saga = timeline::store::saga(&sagas.pool, id)
        .await?
        .ok_or_else(|| {
            ApiError::NotFound(format!(
                "no saga {id} recorded (yet): no event of it was seen"
            ))
        })?;
    let entries = timeline::store::timeline(&sagas.pool, id).await?;
    let mut previous: Option<DateTime<Utc>> = None;
    let timeline = entries
        .into_iter()
        .map(|entry| {
            let seen = &entry.entry;
            let since = previous.map(|p| (seen.occurred_at - p).num_milliseconds());
            previous = Some(seen.occurred_at);
            let kind = EventKind::from_name(&seen.event_type);
            let dead = seen.kind == EntryKind::DeadLetter;
            TimelineEntry {
                since_previous_ms: since,
                compensation: !dead && kind.is_some_and(timeline::is_compensation),
                failure: dead || kind.is_some_and(timeline::is_failure),
                entry,
            }
        })
        .collect();
    Ok(Json(SagaStory {
        summary: SagaSummary::new(saga, observer::stalled_before(sagas.stall_after)),
        stall_after_ms: sagas.stall_after.as_millis(),
        timeline,
    }))
}

#[derive(Deserialize, IntoParams)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[into_params(parameter_in = Query)]
struct DeadLetterQuery {
    /// The next page's cursor (`nextBefore`): dead letters before this
    /// dead-letter stream sequence.
    #[param(minimum = 1)]
    before: Option<i64>,
    /// Page size, 50 unless given.
    #[param(minimum = 1, maximum = 500)]
    limit: Option<i64>,
}

#[derive(Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
struct DeadLetterPage {
    dead_letters: Vec<timeline::store::DeadLetterRow>,
    limit: i64,
    /// Pass as `before` for the next page; absent on the last one.
    next_before: Option<i64>,
}

/// The dead letters of sagas, newest first, as the timeline recorded them:
/// which consumer gave up on which event and why, its sequence in the
/// dead-letter stream (what `sagactl dlq redrive --seq` takes) and where
/// its saga stands now.
#[utoipa::path(get, path = "/dead-letters", tag = "sagas",
    security(("operator" = [])),
    params(DeadLetterQuery),
    responses((status = 200, description = "A page of dead letters", body = DeadLetterPage)))]
async fn list_dead_letters(
    State(sagas): State<Sagas>,
    ValidQuery(q): ValidQuery<DeadLetterQuery>,
) -> Result<Json<DeadLetterPage>, ApiError> {
    let limit = page_limit(q.limit)?;
    if let Some(before) = q.before {
        limits::check_range("before", before, 1, i64::MAX).map_err(ApiError::BadRequest)?;
    }
    let rows = timeline::store::list_dead_letters(&sagas.pool, q.before, limit + 1).await?;
    let (rows, next_before) = keyset_page(rows, limit, |r| r.dlq_seq);
    Ok(Json(DeadLetterPage {
        dead_letters: rows,
        limit,
        next_before,
    }))
}

#[derive(Deserialize, IntoParams)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[into_params(parameter_in = Query)]
struct SagaQuery {
    /// Only sagas in this status.
    #[param(value_type = Option<OrderStatus>)]
    status: Option<String>,
    /// Only pending sagas with no event for longer than the stall threshold.
    stalled: Option<bool>,
    /// Only sagas with activity since then (RFC 3339).
    since: Option<DateTime<Utc>>,
    /// The next page's cursor (`nextBefore`).
    before: Option<DateTime<Utc>>,
    /// Page size, 50 unless given.
    #[param(minimum = 1, maximum = 500)]
    limit: Option<i64>,
}

#[derive(Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
struct SagaPage {
    sagas: Vec<SagaSummary>,
    limit: i64,
    /// Pass as `before` for the next page; absent on the last one.
    next_before: Option<DateTime<Utc>>,
}

/// Sagas, newest activity first.
#[utoipa::path(get, path = "/sagas", tag = "sagas",
    security(("operator" = [])),
    params(SagaQuery),
    responses((status = 200, description = "A page of sagas", body = SagaPage)))]
async fn list_sagas(
    State(sagas): State<Sagas>,
    ValidQuery(q): ValidQuery<SagaQuery>,
) -> Result<Json<SagaPage>, ApiError> {
    let limit = page_limit(q.limit)?;
    let stalled_before = observer::stalled_before(sagas.stall_after);
    let filter = timeline::SagaFilter {
        status: q.status.as_deref().map(parse_status).transpose()?,
        stalled_before: q.stalled.unwrap_or(false).then_some(stalled_before),
        since: q.since,
        before: q.before,
        limit: limit + 1,
    };
    let rows = timeline::store::list_sagas(&sagas.pool, &filter).await?;
    let (rows, next_before) = keyset_page(rows, limit, |r| r.last_event_at);
    Ok(Json(SagaPage {
        sagas: rows
            .into_iter()
            .map(|r| SagaSummary::new(r, stalled_before))
            .collect(),
        limit,
        next_before,
    }))
}
