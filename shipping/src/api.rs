//! `GET /shipments/{orderId}`.

use axum::{
    Json, Router,
    extract::{Path, State},
    routing::get,
};
use chrono::{DateTime, Utc};
use common::http::ApiError;
use serde::Serialize;
use sqlx::{PgPool, types::Json as SqlJson};
use uuid::Uuid;

pub fn router(pool: PgPool) -> Router {
    Router::new()
        .route("/shipments/{order_id}", get(get_shipment))
        .with_state(pool)
}

#[derive(Serialize, sqlx::FromRow)]
#[serde(rename_all = "camelCase")]
struct ShipmentView {
    order_id: Uuid,
    shipment_id: Uuid,
    status: String,
    tracking_number: Option<String>,
    address: SqlJson<serde_json::Value>,
    reason: Option<String>,
    created_at: DateTime<Utc>,
}

async fn get_shipment(
    State(pool): State<PgPool>,
    Path(order_id): Path<String>,
) -> Result<Json<ShipmentView>, ApiError> {
    let order_id: Uuid = order_id
        .parse()
        .map_err(|_| ApiError::BadRequest(format!("'{order_id}' is not an order id (a UUID)")))?;
    sqlx::query_as::<_, ShipmentView>(
        "SELECT order_id, shipment_id, status, tracking_number, address, reason, created_at
         FROM shipments WHERE order_id = $1",
    )
    .bind(order_id)
    .fetch_optional(&pool)
    .await?
    .map(Json)
    .ok_or_else(|| ApiError::NotFound(format!("no shipment for order {order_id}")))
}
