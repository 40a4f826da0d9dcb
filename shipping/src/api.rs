//! `GET /shipments/{orderId}`.

use axum::{
    Json,
    extract::{Path, State},
};
use common::{Infra, api_doc::ErrorBody, http::ApiError};
use sqlx::PgPool;
use utoipa_axum::{router::OpenApiRouter, routes};
use uuid::Uuid;

use crate::store::{self, Shipment};

pub fn router(infra: &Infra) -> OpenApiRouter {
    routes().with_state(infra.pool.clone())
}

/// The routes, documented.
pub fn routes() -> OpenApiRouter<PgPool> {
    OpenApiRouter::new().routes(routes!(get_shipment))
}

/// The document of the API: what `GET /openapi.json` serves.
pub fn openapi() -> utoipa::openapi::OpenApi {
    common::api_doc::document(routes().into_openapi(), "shipping")
}

/// The order's shipment, once shipping has seen its payment go through.
#[utoipa::path(get, path = "/shipments/{orderId}", tag = "shipments",
    params(("orderId" = Uuid, Path, description = "The order's id")),
    responses(
        (status = 200, description = "The order's shipment", body = Shipment),
        (status = 400, description = "Not an order id", body = ErrorBody),
        (status = 404, description = "No shipment for the order (yet)", body = ErrorBody),
    ))]
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
