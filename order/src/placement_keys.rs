//! Placement idempotency keys (`place_requests`): a customer's key names
//! one order, for good.

use sqlx::PgConnection;
use uuid::Uuid;

/// Stores `order_id` under the customer's idempotency key, or returns the
/// order already stored under it, with whether `request` is the one it was
/// first used for. A concurrent request with the same key blocks on the row
/// until the first commits (or rolls back), then sees the committed row: never
/// two orders for one key. A plain SELECT would read a snapshot from before
/// that commit.
pub async fn claim(
    tx: &mut PgConnection,
    customer_id: &str,
    key: &str,
    order_id: Uuid,
    request: &[u8],
) -> sqlx::Result<(Uuid, bool)> {
    sqlx::query_as(
        "INSERT INTO place_requests (customer_id, idempotency_key, order_id, request_hash)
         VALUES ($1, $2, $3, sha256($4))
         ON CONFLICT (customer_id, idempotency_key)
             DO UPDATE SET customer_id = place_requests.customer_id
         RETURNING order_id, request_hash IS NULL OR request_hash = sha256($4)",
    )
    .bind(customer_id)
    .bind(key)
    .bind(order_id)
    .bind(request)
    .fetch_one(tx)
    .await
}
