//! `PUT /accounts/{customerId}` sets a balance; `GET` reads it with its payments.

use axum::{
    Json, Router,
    extract::{Path, State},
    routing::get,
};
use chrono::{DateTime, Utc};
use common::http::{ApiError, ValidJson};
use serde::{Deserialize, Serialize};
use sqlx::PgPool;
use uuid::Uuid;

pub fn router(pool: PgPool) -> Router {
    Router::new()
        .route("/accounts/{customer_id}", get(get_account).put(put_account))
        .with_state(pool)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SetBalance {
    /// Minor units.
    balance: i64,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct AccountView {
    customer_id: String,
    balance: i64,
    payments: Vec<PaymentView>,
}

#[derive(Serialize, sqlx::FromRow)]
#[serde(rename_all = "camelCase")]
struct PaymentView {
    order_id: Uuid,
    payment_id: Uuid,
    amount: i64,
    status: String,
    reason: Option<String>,
    created_at: DateTime<Utc>,
    updated_at: DateTime<Utc>,
}

async fn put_account(
    State(pool): State<PgPool>,
    Path(customer_id): Path<String>,
    ValidJson(body): ValidJson<SetBalance>,
) -> Result<Json<AccountView>, ApiError> {
    if customer_id.trim().is_empty() {
        return Err(ApiError::BadRequest("customerId must not be empty".into()));
    }
    if body.balance < 0 {
        return Err(ApiError::Unprocessable(format!(
            "balance must not be negative, got {}",
            body.balance
        )));
    }
    sqlx::query(
        "INSERT INTO accounts (customer_id, balance) VALUES ($1, $2)
         ON CONFLICT (customer_id) DO UPDATE SET balance = EXCLUDED.balance, updated_at = now()",
    )
    .bind(&customer_id)
    .bind(body.balance)
    .execute(&pool)
    .await?;
    load(&pool, customer_id).await
}

async fn get_account(
    State(pool): State<PgPool>,
    Path(customer_id): Path<String>,
) -> Result<Json<AccountView>, ApiError> {
    load(&pool, customer_id).await
}

async fn load(pool: &PgPool, customer_id: String) -> Result<Json<AccountView>, ApiError> {
    let balance: Option<i64> =
        sqlx::query_scalar("SELECT balance FROM accounts WHERE customer_id = $1")
            .bind(&customer_id)
            .fetch_optional(pool)
            .await?;
    let balance = balance
        .ok_or_else(|| ApiError::NotFound(format!("no account for customer '{customer_id}'")))?;
    let payments = sqlx::query_as::<_, PaymentView>(
        "SELECT order_id, payment_id, amount, status, reason, created_at, updated_at
         FROM payments WHERE customer_id = $1 ORDER BY created_at",
    )
    .bind(&customer_id)
    .fetch_all(pool)
    .await?;
    Ok(Json(AccountView {
        customer_id,
        balance,
        payments,
    }))
}
