//! Every SQL statement of the shipping service: the shipment of each order.

use chrono::{DateTime, Utc};
use common::event::Address;
use serde::Serialize;
use sqlx::{PgConnection, PgPool, types::Json};
use uuid::Uuid;

use crate::domain::ShipmentStatus;

/// A shipment as recorded and as the API shows it.
#[derive(Serialize, sqlx::FromRow, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Shipment {
    pub order_id: Uuid,
    pub shipment_id: Uuid,
    pub status: ShipmentStatus,
    pub tracking_number: Option<String>,
    #[schema(value_type = Address)]
    pub address: Json<Address>,
    pub reason: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub created_at: Option<DateTime<Utc>>,
}

/// Records the order's shipment; `false` if it already has one (one per
/// order: the primary key).
pub async fn record_shipment(tx: &mut PgConnection, shipment: &Shipment) -> sqlx::Result<bool> {
    let insert = sqlx::query(
        "INSERT INTO shipments (order_id, shipment_id, status, tracking_number, address, reason)
         VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (order_id) DO NOTHING",
    )
    .bind(shipment.order_id)
    .bind(shipment.shipment_id)
    .bind(shipment.status)
    .bind(&shipment.tracking_number)
    .bind(&shipment.address)
    .bind(&shipment.reason);
    common::compensation::record_once(tx, insert).await
}

/// Records that the shipment was called off, and why.
pub async fn cancel(tx: &mut PgConnection, order_id: Uuid, reason: &str) -> sqlx::Result<()> {
    sqlx::query("UPDATE shipments SET status = 'cancelled', reason = $2 WHERE order_id = $1")
        .bind(order_id)
        .bind(reason)
        .execute(tx)
        .await?;
    Ok(())
}

pub async fn shipment(pool: &PgPool, order_id: Uuid) -> sqlx::Result<Option<Shipment>> {
    sqlx::query_as(
        "SELECT order_id, shipment_id, status, tracking_number, address, reason, created_at
         FROM shipments WHERE order_id = $1",
    )
    .bind(order_id)
    .fetch_optional(pool)
    .await
}
