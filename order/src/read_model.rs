//! The read model of orders (`orders`): what the API lists and shows. It
//! follows the event store as a checkpointed projection
//! ([`crate::projection::OrdersView`]): replaying `order_events` through
//! `evolve` gives the state it holds, so it can be rebuilt.

use chrono::{DateTime, Utc};
use common::{
    event::{Address, OrderLine},
    sql::column,
};
use serde::{Deserialize, Serialize};
use sqlx::{PgConnection, PgPool, types::Json};
use uuid::Uuid;

use crate::domain::{Order, OrderStatus};

/// An order as the read model holds it and the API shows it.
#[derive(Debug, Serialize, Deserialize, sqlx::FromRow, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct OrderView {
    pub order_id: Uuid,
    pub customer_id: String,
    pub status: OrderStatus,
    #[schema(value_type = Vec<OrderLine>)]
    pub lines: Json<Vec<OrderLine>>,
    pub total: i64,
    #[schema(value_type = Address)]
    pub shipping_address: Json<Address>,
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
            status: o.status,
            lines: Json(o.lines),
            total: o.total,
            shipping_address: Json(o.shipping_address),
            failure_reason: o.failure_reason,
            shipment_id: o.shipment_id,
            version: o.version,
            created_at: o.created_at,
            updated_at: o.updated_at,
        }
    }
}

const COLUMNS: &str = "order_id, customer_id, status, lines, total, shipping_address, failure_reason, shipment_id, version, created_at, updated_at";

/// One order from the read model.
pub async fn order_view(
    conn: impl sqlx::PgExecutor<'_>,
    order_id: Uuid,
) -> sqlx::Result<Option<OrderView>> {
    common::sql::row_by_key(conn, "orders", COLUMNS, "order_id", order_id).await
}

/// Writes `views` into `table` (the read model, or a copy being rebuilt),
/// each unless the row there is as new already.
pub async fn insert_views(
    conn: &mut PgConnection,
    table: &str,
    views: &[OrderView],
) -> sqlx::Result<()> {
    if views.is_empty() {
        return Ok(());
    }
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "INSERT INTO {table} ({COLUMNS})
         SELECT * FROM UNNEST($1::uuid[], $2::text[], $3::text[], $4::jsonb[], $5::int8[],
             $6::jsonb[], $7::text[], $8::uuid[], $9::int8[], $10::timestamptz[],
             $11::timestamptz[])
         ON CONFLICT (order_id) DO UPDATE SET
             status = EXCLUDED.status, failure_reason = EXCLUDED.failure_reason,
             shipment_id = EXCLUDED.shipment_id, version = EXCLUDED.version,
             updated_at = EXCLUDED.updated_at
         WHERE {table}.version < EXCLUDED.version"
    )))
    .bind(column(views, |v| v.order_id))
    .bind(column(views, |v| v.customer_id.clone()))
    .bind(column(views, |v| v.status))
    .bind(column(views, |v| v.lines.clone()))
    .bind(column(views, |v| v.total))
    .bind(column(views, |v| v.shipping_address.clone()))
    .bind(column(views, |v| v.failure_reason.clone()))
    .bind(column(views, |v| v.shipment_id))
    .bind(column(views, |v| v.version))
    .bind(column(views, |v| v.created_at))
    .bind(column(views, |v| v.updated_at))
    .execute(conn)
    .await?;
    Ok(())
}

/// A page of the read model, newest first, optionally of one customer or status.
pub async fn list_orders(
    pool: &PgPool,
    customer_id: Option<&str>,
    status: Option<OrderStatus>,
    limit: i64,
    offset: i64,
) -> sqlx::Result<Vec<OrderView>> {
    sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT {COLUMNS} FROM orders
         WHERE ($1::text IS NULL OR customer_id = $1) AND ($2::text IS NULL OR status = $2)
         ORDER BY created_at DESC, order_id DESC LIMIT $3 OFFSET $4"
    )))
    .bind(customer_id)
    .bind(status)
    .bind(limit)
    .bind(offset)
    .fetch_all(pool)
    .await
}
