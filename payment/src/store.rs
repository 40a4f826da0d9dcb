//! Every SQL statement of the payment service: accounts and the payment of
//! each order.

use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::{PgConnection, PgPool};
use uuid::Uuid;

use crate::domain::PaymentStatus;

/// A payment as stored (a row of `payments`), locked for a refund.
#[derive(sqlx::FromRow)]
pub struct Payment {
    pub order_id: Uuid,
    pub payment_id: Uuid,
    pub customer_id: String,
    pub amount: i64,
    pub status: PaymentStatus,
}

/// A payment as an account shows it.
#[derive(Serialize, sqlx::FromRow, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct PaymentView {
    pub order_id: Uuid,
    pub payment_id: Uuid,
    pub amount: i64,
    pub status: PaymentStatus,
    pub reason: Option<String>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

/// Locks, in customer order, the accounts of `customers` and of whoever
/// paid for the orders in `refunding` (a refund credits their account), as
/// a batch takes them before applying any of its events
/// ([`common::cancels::LockRows`]).
pub async fn lock_accounts(
    tx: &mut PgConnection,
    customers: &[&str],
    refunding: &[Uuid],
) -> sqlx::Result<()> {
    if refunding.is_empty() {
        // The usual batch: no payments to look up.
        sqlx::query(
            "SELECT customer_id FROM accounts WHERE customer_id = ANY($1)
             ORDER BY customer_id FOR UPDATE",
        )
        .bind(customers)
        .execute(tx)
        .await?;
        return Ok(());
    }
    sqlx::query(
        "SELECT customer_id FROM accounts
         WHERE customer_id = ANY(ARRAY(
             SELECT unnest($1::text[])
             UNION SELECT customer_id FROM payments WHERE order_id = ANY($2)))
         ORDER BY customer_id FOR UPDATE",
    )
    .bind(customers)
    .bind(refunding)
    // Planned for `payments` as it is each time: a plan kept from when it
    // was small reads all of it.
    .persistent(false)
    .execute(tx)
    .await?;
    Ok(())
}

/// The account's balance, its row locked: charges to one account queue here,
/// and each sees the balance the previous one left.
pub async fn lock_balance(tx: &mut PgConnection, customer_id: &str) -> sqlx::Result<Option<i64>> {
    sqlx::query_scalar("SELECT balance FROM accounts WHERE customer_id = $1 FOR UPDATE")
        .bind(customer_id)
        .fetch_optional(tx)
        .await
}

/// Records the order's payment and, if it charged the account, leaves the
/// account at `balance`, in one statement; `false` if the order already has
/// a payment (one per order: the primary key), which changes nothing.
pub async fn record_payment(
    tx: &mut PgConnection,
    payment: &Payment,
    reason: Option<&str>,
    balance: Option<i64>,
) -> sqlx::Result<bool> {
    let recorded: i64 = sqlx::query_scalar(
        "WITH recorded AS (
             INSERT INTO payments (order_id, payment_id, customer_id, amount, status, reason)
             VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (order_id) DO NOTHING
             RETURNING order_id),
         charged AS (
             UPDATE accounts SET balance = $7, version = version + 1, updated_at = now()
             WHERE customer_id = $3 AND $7::bigint IS NOT NULL
               AND EXISTS (SELECT 1 FROM recorded)
             RETURNING customer_id)
         SELECT count(*) FROM recorded",
    )
    .bind(payment.order_id)
    .bind(payment.payment_id)
    .bind(&payment.customer_id)
    .bind(payment.amount)
    .bind(payment.status)
    .bind(reason)
    .bind(balance)
    .fetch_one(tx)
    .await?;
    Ok(recorded == 1)
}

/// Gives the payment's amount back to the account and marks it refunded.
pub async fn refund(tx: &mut PgConnection, payment: &Payment, reason: &str) -> sqlx::Result<()> {
    sqlx::query(
        "UPDATE accounts SET balance = balance + $2, version = version + 1, updated_at = now()
         WHERE customer_id = $1",
    )
    .bind(&payment.customer_id)
    .bind(payment.amount)
    .execute(&mut *tx)
    .await?;
    sqlx::query(
        "UPDATE payments SET status = $2, reason = $3, updated_at = now() WHERE order_id = $1",
    )
    .bind(payment.order_id)
    .bind(PaymentStatus::Refunded)
    .bind(reason)
    .execute(tx)
    .await?;
    Ok(())
}

/// Balance and version.
pub async fn account(pool: &PgPool, customer_id: &str) -> sqlx::Result<Option<(i64, i64)>> {
    sqlx::query_as("SELECT balance, version FROM accounts WHERE customer_id = $1")
        .bind(customer_id)
        .fetch_optional(pool)
        .await
}

pub async fn payments_of(pool: &PgPool, customer_id: &str) -> sqlx::Result<Vec<PaymentView>> {
    sqlx::query_as(
        "SELECT order_id, payment_id, amount, status, reason, created_at, updated_at
         FROM payments WHERE customer_id = $1 ORDER BY created_at",
    )
    .bind(customer_id)
    .fetch_all(pool)
    .await
}
