//! `GET /shipments/{orderId}`.

use axum::{
    Json, Router,
    extract::{Path, State},
    routing::get,
};
use common::{Infra, http::ApiError};
use sqlx::PgPool;
use uuid::Uuid;

use crate::store::{self, Shipment};

pub fn router(infra: &Infra) -> Router {
    Router::new()
        .route("/shipments/{order_id}", get(get_shipment))
        .with_state(infra.pool.clone())
}

async fn get_shipment(
    State(pool): State<PgPool>,
    Path(order_id): Path<String>,
) -> Result<Json<Shipment>, ApiError> {
    let order_id: Uuid = order_id
        .parse()
        .map_err(|_| ApiError::BadRequest(format!("'{order_id}' is not an order id (a UUID)")))?;
    store::shipment(&pool, order_id)
        .await?
        .map(Json)
        .ok_or_else(|| ApiError::NotFound(format!("no shipment for order {order_id}")))
}
