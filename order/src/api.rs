//! HTTP: `POST /orders`, `GET /orders/{id}`, `GET /orders/{id}/events`,
//! `GET /orders?customerId=&status=&limit=&offset=`. Reads come from the read model.

use axum::{
    Json, Router,
    extract::{Path, Query, State},
    http::{HeaderMap, StatusCode, header},
    response::IntoResponse,
    routing::get,
};
use chrono::{DateTime, Utc};
use common::{
    Envelope,
    event::{Address, OrderLine},
    http::{ApiError, ValidJson},
    limits,
};
use serde::{Deserialize, Serialize};
use sqlx::types::Json as SqlJson;
use uuid::Uuid;

use crate::{
    domain::{Order, OrderStatus},
    place::{PlaceError, PlaceOrder, Placer},
    store,
};

pub fn router(placer: Placer) -> Router {
    Router::new()
        .route("/orders", get(list_orders).post(place_order))
        .route("/orders/{id}", get(get_order))
        .route("/orders/{id}/events", get(get_events))
        .with_state(placer)
}

/// An order as the API shows it.
#[derive(Debug, Serialize, Deserialize, sqlx::FromRow)]
#[serde(rename_all = "camelCase")]
pub struct OrderView {
    pub order_id: Uuid,
    pub customer_id: String,
    pub status: String,
    pub lines: SqlJson<Vec<OrderLine>>,
    pub total: i64,
    pub shipping_address: SqlJson<Address>,
    pub failure_reason: Option<String>,
    pub shipment_id: Option<Uuid>,
    pub version: i64,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

impl From<Order> for OrderView {
    fn from(o: Order) -> Self {
        OrderView {
            order_id: o.id,
            customer_id: o.customer_id,
            status: o.status.as_str().to_string(),
            lines: SqlJson(o.lines),
            total: o.total,
            shipping_address: SqlJson(o.shipping_address),
            failure_reason: o.failure_reason,
            shipment_id: o.shipment_id,
            version: o.version,
            created_at: o.created_at,
            updated_at: o.updated_at,
        }
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

const COLUMNS: &str = "order_id, customer_id, status, lines, total, shipping_address, failure_reason, shipment_id, version, created_at, updated_at";

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
    let (order, created) = placer.place(request, key).await?;
    let status = if created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    let location = format!("/orders/{}", order.id);
    Ok((
        status,
        [(header::LOCATION, location)],
        Json(OrderView::from(order)),
    ))
}

fn parse_id(id: &str) -> Result<Uuid, ApiError> {
    id.parse()
        .map_err(|_| ApiError::BadRequest(format!("'{id}' is not an order id (a UUID)")))
}

async fn get_order(
    State(placer): State<Placer>,
    Path(id): Path<String>,
) -> Result<Json<OrderView>, ApiError> {
    let id = parse_id(&id)?;
    sqlx::query_as::<_, OrderView>(&format!("SELECT {COLUMNS} FROM orders WHERE order_id = $1"))
        .bind(id)
        .fetch_optional(&placer.pool)
        .await?
        .map(Json)
        .ok_or_else(|| ApiError::NotFound(format!("order {id} not found")))
}

/// The order's own events, oldest first: its history as the event store has it.
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

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct ListQuery {
    customer_id: Option<String>,
    status: Option<String>,
    limit: Option<i64>,
    offset: Option<i64>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct OrderPage {
    orders: Vec<OrderView>,
    limit: i64,
    offset: i64,
    /// Offset of the next page, absent on the last one.
    next_offset: Option<i64>,
}

async fn list_orders(
    State(placer): State<Placer>,
    query: Result<Query<ListQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<OrderPage>, ApiError> {
    let Query(q) = query.map_err(|e| ApiError::BadRequest(e.body_text()))?;
    let limit = q.limit.unwrap_or(50);
    if !(1..=500).contains(&limit) {
        return Err(ApiError::BadRequest(format!(
            "limit must be between 1 and 500, got {limit}"
        )));
    }
    let offset = q.offset.unwrap_or(0);
    limits::check_range("offset", offset, 0, limits::MAX_OFFSET).map_err(ApiError::BadRequest)?;
    if let Some(customer) = &q.customer_id {
        limits::check_id("customerId", customer).map_err(ApiError::BadRequest)?;
    }
    let status = match q.status.as_deref() {
        None => None,
        Some(s) => Some(
            OrderStatus::parse(s)
                .ok_or_else(|| {
                    let all: Vec<_> = OrderStatus::ALL.iter().map(|s| s.as_str()).collect();
                    ApiError::BadRequest(format!("status '{s}' is not one of {}", all.join(", ")))
                })?
                .as_str(),
        ),
    };
    let mut orders = sqlx::query_as::<_, OrderView>(&format!(
        "SELECT {COLUMNS} FROM orders
         WHERE ($1::text IS NULL OR customer_id = $1) AND ($2::text IS NULL OR status = $2)
         ORDER BY created_at DESC, order_id DESC LIMIT $3 OFFSET $4"
    ))
    .bind(q.customer_id)
    .bind(status)
    .bind(limit + 1)
    .bind(offset)
    .fetch_all(&placer.pool)
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
