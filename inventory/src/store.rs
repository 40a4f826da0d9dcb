//! Every SQL statement of the inventory service: stock per product, the
//! reservation of each order, and each product's catalog data.

use std::collections::{BTreeMap, HashMap};

use chrono::{DateTime, Utc};
use common::{event::OrderLine, product::ProductPriced};
use serde::Serialize;
use sqlx::{PgConnection, PgPool, types::Json};
use uuid::Uuid;

use crate::domain::ReservationStatus;

/// A reservation as stored (a row of `reservations`), locked for a release.
#[derive(sqlx::FromRow)]
pub struct Reservation {
    pub order_id: Uuid,
    #[sqlx(json)]
    pub lines: Vec<OrderLine>,
    pub status: ReservationStatus,
}

/// A product's stock, as the API shows it.
#[derive(Serialize, sqlx::FromRow, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Stock {
    pub product_id: String,
    pub available: i64,
    pub reserved: i64,
    pub version: i64,
}

const STOCK_COLUMNS: &str = "product_id, available, reserved, version";

/// Available units of `products`, their rows locked in product order:
/// concurrent reservations queue, never deadlock, and each sees what the
/// previous one left.
pub async fn lock_available(
    tx: &mut PgConnection,
    products: &[&String],
) -> sqlx::Result<HashMap<String, i64>> {
    let rows: Vec<(String, i64)> = sqlx::query_as(
        "SELECT product_id, available FROM stock WHERE product_id = ANY($1)
         ORDER BY product_id FOR UPDATE",
    )
    .bind(products)
    .fetch_all(tx)
    .await?;
    Ok(rows.into_iter().collect())
}

/// Locks, in product order, the stock of `products` and of the lines
/// reserved for the orders in `releasing` (a release puts them back), as a
/// batch takes them before applying any of its events
/// ([`common::cancels::LockRows`]): the order [`lock_available`] takes.
pub async fn lock_stock(
    tx: &mut PgConnection,
    products: &[&String],
    releasing: &[Uuid],
) -> sqlx::Result<()> {
    if releasing.is_empty() {
        // The usual batch: no reservations to look up.
        sqlx::query(
            "SELECT product_id FROM stock WHERE product_id = ANY($1)
             ORDER BY product_id FOR UPDATE",
        )
        .bind(products)
        .execute(tx)
        .await?;
        return Ok(());
    }
    sqlx::query(
        "SELECT product_id FROM stock
         WHERE product_id = ANY(ARRAY(
             SELECT unnest($1::text[])
             UNION SELECT line->>'productId'
                   FROM reservations, jsonb_array_elements(lines) AS line
                   WHERE order_id = ANY($2)))
         ORDER BY product_id FOR UPDATE",
    )
    .bind(products)
    .bind(releasing)
    // Planned for `reservations` as it is each time: a plan kept from when
    // it was small reads all of it.
    .persistent(false)
    .execute(tx)
    .await?;
    Ok(())
}

/// Records the order's reservation and moves `reserved` (empty for a
/// reservation that failed) from available to reserved, in one statement;
/// `false` if the order already has a reservation (one per order: the
/// primary key), which changes nothing. Demand is positive and bounded
/// (validated lines, checked sums): no overflow.
pub async fn record_reservation(
    tx: &mut PgConnection,
    reservation: &Reservation,
    reason: Option<&str>,
    reserved: &BTreeMap<String, i64>,
) -> sqlx::Result<bool> {
    let products: Vec<&String> = reserved.keys().collect();
    let quantities: Vec<i64> = reserved.values().copied().collect();
    let recorded: i64 = sqlx::query_scalar(
        "WITH recorded AS (
             INSERT INTO reservations (order_id, lines, status, reason) VALUES ($1, $2, $3, $4)
             ON CONFLICT (order_id) DO NOTHING RETURNING order_id),
         moved AS (
             UPDATE stock SET available = available - d.q, reserved = reserved + d.q,
                              version = version + 1, updated_at = now()
             FROM UNNEST($5::text[], $6::bigint[]) AS d(p, q)
             WHERE stock.product_id = d.p AND EXISTS (SELECT 1 FROM recorded)
             RETURNING stock.product_id)
         SELECT count(*) FROM recorded",
    )
    .bind(reservation.order_id)
    .bind(Json(&reservation.lines))
    .bind(reservation.status)
    .bind(reason)
    .bind(&products)
    .bind(&quantities)
    .fetch_one(tx)
    .await?;
    Ok(recorded == 1)
}

/// Moves quantities from available to reserved (`sign` 1) or back (`sign`
/// -1). Demand is positive and bounded (validated lines, checked sums): no
/// overflow.
pub async fn move_stock(
    tx: &mut PgConnection,
    demand: &BTreeMap<String, i64>,
    sign: i64,
) -> sqlx::Result<()> {
    let products: Vec<&String> = demand.keys().collect();
    let quantities: Vec<i64> = demand.values().map(|q| q * sign).collect();
    sqlx::query(
        "UPDATE stock SET available = available - d.q, reserved = reserved + d.q,
                          version = version + 1, updated_at = now()
         FROM UNNEST($1::text[], $2::bigint[]) AS d(p, q) WHERE stock.product_id = d.p",
    )
    .bind(&products)
    .bind(&quantities)
    .execute(tx)
    .await?;
    Ok(())
}

/// Puts the reserved units back (stock rows locked in product order, as a
/// reservation locks them) and marks the reservation released.
pub async fn release(
    tx: &mut PgConnection,
    order_id: Uuid,
    demand: &BTreeMap<String, i64>,
    reason: &str,
) -> sqlx::Result<()> {
    let products: Vec<&String> = demand.keys().collect();
    lock_available(tx, &products).await?;
    move_stock(tx, demand, -1).await?;
    sqlx::query(
        "UPDATE reservations SET status = $2, reason = $3, updated_at = now() WHERE order_id = $1",
    )
    .bind(order_id)
    .bind(ReservationStatus::Released)
    .bind(reason)
    .execute(tx)
    .await?;
    Ok(())
}

/// A product's stock, if it has any.
pub async fn stock(pool: &PgPool, product_id: &str) -> sqlx::Result<Option<Stock>> {
    common::sql::row_by_key(pool, "stock", STOCK_COLUMNS, "product_id", product_id).await
}

/// A product's catalog data, as the API shows it and as it was published.
#[derive(Debug, Serialize, sqlx::FromRow, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Product {
    pub product_id: String,
    pub name: String,
    pub unit_price: i64,
    pub version: i64,
    pub updated_at: DateTime<Utc>,
}

const PRODUCT_COLUMNS: &str = "product_id, name, unit_price, version, updated_at";

/// A product's catalog data, if it has any.
pub async fn product(pool: &PgPool, product_id: &str) -> sqlx::Result<Option<Product>> {
    common::sql::row_by_key(pool, "products", PRODUCT_COLUMNS, "product_id", product_id).await
}

/// Creates the product at version 1; `None` if it exists.
pub async fn create_product(
    tx: &mut PgConnection,
    data: &ProductPriced,
) -> sqlx::Result<Option<Product>> {
    sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "INSERT INTO products (product_id, name, unit_price) VALUES ($1, $2, $3)
         ON CONFLICT (product_id) DO NOTHING RETURNING {PRODUCT_COLUMNS}"
    )))
    .bind(&data.product_id)
    .bind(&data.name)
    .bind(data.unit_price)
    .fetch_optional(tx)
    .await
}

/// The product locked for a change, if it is at `expected` (`None`: any version).
pub async fn lock_product(
    tx: &mut PgConnection,
    product_id: &str,
    expected: Option<i64>,
) -> sqlx::Result<Option<Product>> {
    sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT {PRODUCT_COLUMNS} FROM products
         WHERE product_id = $1 AND ($2::bigint IS NULL OR version = $2) FOR UPDATE"
    )))
    .bind(product_id)
    .bind(expected)
    .fetch_optional(tx)
    .await
}

/// Writes the product's new catalog data at the next version.
pub async fn change_product(tx: &mut PgConnection, data: &ProductPriced) -> sqlx::Result<Product> {
    sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "UPDATE products SET name = $2, unit_price = $3, version = version + 1, updated_at = now()
         WHERE product_id = $1 RETURNING {PRODUCT_COLUMNS}"
    )))
    .bind(&data.product_id)
    .bind(&data.name)
    .bind(data.unit_price)
    .fetch_one(tx)
    .await
}
