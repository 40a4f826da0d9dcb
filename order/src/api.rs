//! HTTP: `POST /orders`, `GET /orders/{id}`, `GET /orders/{id}/events`,
//! `GET /orders?customerId=&status=&limit=&offset=`. Reads come from the read model.

use axum::{
    Json, Router,
    extract::{Path, Query, State},
    http::{HeaderMap, StatusCode, header},
    response::IntoResponse,
    routing::get,
};
use common::{
    Envelope,
    http::{ApiError, ValidJson},
    limits,
};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::{
    domain::OrderStatus,
    place::{PlaceError, PlaceOrder, Placer},
    store::{self, OrderView},
};

pub fn router(placer: Placer) -> Router {
    Router::new()
        .route("/orders", get(list_orders).post(place_order))
        .route("/orders/{id}", get(get_order))
        .route("/orders/{id}/events", get(get_events))
        .with_state(placer)
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
    store::order_view(&placer.pool, id)
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
            })?,
        ),
    };
    let mut orders = store::list_orders(
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
