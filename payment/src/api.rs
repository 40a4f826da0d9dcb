//! Accounts over HTTP.
//!
//! - `PUT /accounts/{customerId}` `{"balance": n}` creates an account. On an
//!   existing one it is an absolute overwrite and needs `If-Match` with the
//!   ETag of a `GET` (412 if the account changed since, 428 without it;
//!   `If-Match: *` overwrites whatever is there).
//! - `POST /accounts/{customerId}/deposits` `{"amount": n}` adds to the
//!   balance; it composes with charges and refunds running at the same time.
//! - `GET /accounts/{customerId}`: balance, version (also the `ETag`) and payments.

use axum::{
    Json, Router,
    extract::{Path, State},
    http::{HeaderMap, StatusCode, header},
    response::{IntoResponse, Response},
    routing::{get, post},
};
use chrono::{DateTime, Utc};
use common::{
    http::{ApiError, ValidJson, Version},
    limits,
};
use serde::{Deserialize, Serialize};
use sqlx::PgPool;
use uuid::Uuid;

pub fn router(pool: PgPool) -> Router {
    Router::new()
        .route("/accounts/{customer_id}", get(get_account).put(put_account))
        .route("/accounts/{customer_id}/deposits", post(deposit))
        .with_state(pool)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SetBalance {
    /// Minor units.
    balance: i64,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Deposit {
    /// Minor units, positive.
    amount: i64,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct AccountView {
    customer_id: String,
    balance: i64,
    version: i64,
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

fn customer(customer_id: &str) -> Result<(), ApiError> {
    limits::check_id("customerId", customer_id).map_err(ApiError::BadRequest)
}

async fn put_account(
    State(pool): State<PgPool>,
    Path(customer_id): Path<String>,
    headers: HeaderMap,
    ValidJson(body): ValidJson<SetBalance>,
) -> Result<Response, ApiError> {
    customer(&customer_id)?;
    limits::check_range("balance", body.balance, 0, limits::MAX_AMOUNT)
        .map_err(ApiError::Unprocessable)?;
    let precondition = Version::if_match(&headers)?;
    // With a version named, only an overwrite of that version will do; without
    // one (or with `*`), a new one is created.
    let create = !matches!(precondition, Some(Version::Exactly(_)));
    let created: Option<i64> = sqlx::query_scalar(
        "INSERT INTO accounts (customer_id, balance) SELECT $1, $2 WHERE $3
         ON CONFLICT (customer_id) DO NOTHING RETURNING version",
    )
    .bind(&customer_id)
    .bind(body.balance)
    .bind(create)
    .fetch_optional(&pool)
    .await?;
    if created.is_some() {
        return respond(&pool, customer_id, StatusCode::CREATED).await;
    }
    let expected = match precondition {
        None => {
            return Err(ApiError::PreconditionRequired(format!(
                "account '{customer_id}' exists: to overwrite its balance send If-Match with the ETag of GET /accounts/{customer_id} (or If-Match: *); to add to it, POST /accounts/{customer_id}/deposits"
            )));
        }
        Some(Version::Any) => None,
        Some(Version::Exactly(v)) => Some(v),
    };
    let updated = sqlx::query(
        "UPDATE accounts SET balance = $2, version = version + 1, updated_at = now()
         WHERE customer_id = $1 AND ($3::bigint IS NULL OR version = $3)",
    )
    .bind(&customer_id)
    .bind(body.balance)
    .bind(expected)
    .execute(&pool)
    .await?
    .rows_affected();
    if updated == 0 {
        let current: Option<i64> =
            sqlx::query_scalar("SELECT version FROM accounts WHERE customer_id = $1")
                .bind(&customer_id)
                .fetch_optional(&pool)
                .await?;
        return Err(ApiError::PreconditionFailed(match current {
            None => format!("account '{customer_id}' does not exist; create it without If-Match"),
            Some(v) => format!(
                "account '{customer_id}' is at version {v}, not {}: it changed since it was read; read it again",
                expected.unwrap_or_default()
            ),
        }));
    }
    respond(&pool, customer_id, StatusCode::OK).await
}

async fn deposit(
    State(pool): State<PgPool>,
    Path(customer_id): Path<String>,
    ValidJson(body): ValidJson<Deposit>,
) -> Result<Response, ApiError> {
    customer(&customer_id)?;
    limits::check_range("amount", body.amount, 1, limits::MAX_AMOUNT)
        .map_err(ApiError::Unprocessable)?;
    // One statement: the row lock orders it with charges and refunds.
    let balance: Option<i64> = sqlx::query_scalar(
        "UPDATE accounts SET balance = balance + $2, version = version + 1, updated_at = now()
         WHERE customer_id = $1 AND balance <= $3 - $2
         RETURNING balance",
    )
    .bind(&customer_id)
    .bind(body.amount)
    .bind(limits::MAX_AMOUNT)
    .fetch_optional(&pool)
    .await?;
    if balance.is_some() {
        return respond(&pool, customer_id, StatusCode::OK).await;
    }
    let current: Option<i64> =
        sqlx::query_scalar("SELECT balance FROM accounts WHERE customer_id = $1")
            .bind(&customer_id)
            .fetch_optional(&pool)
            .await?;
    Err(match current {
        None => ApiError::NotFound(format!(
            "no account for customer '{customer_id}'; create it with PUT /accounts/{customer_id}"
        )),
        Some(balance) => ApiError::Unprocessable(format!(
            "a deposit of {} would take the balance ({balance}) over {}",
            body.amount,
            limits::MAX_AMOUNT
        )),
    })
}

async fn get_account(
    State(pool): State<PgPool>,
    Path(customer_id): Path<String>,
) -> Result<Response, ApiError> {
    customer(&customer_id)?;
    respond(&pool, customer_id, StatusCode::OK).await
}

/// The account as JSON, with its version as the `ETag`.
async fn respond(
    pool: &PgPool,
    customer_id: String,
    status: StatusCode,
) -> Result<Response, ApiError> {
    let row: Option<(i64, i64)> =
        sqlx::query_as("SELECT balance, version FROM accounts WHERE customer_id = $1")
            .bind(&customer_id)
            .fetch_optional(pool)
            .await?;
    let (balance, version) =
        row.ok_or_else(|| ApiError::NotFound(format!("no account for customer '{customer_id}'")))?;
    let payments = sqlx::query_as::<_, PaymentView>(
        "SELECT order_id, payment_id, amount, status, reason, created_at, updated_at
         FROM payments WHERE customer_id = $1 ORDER BY created_at",
    )
    .bind(&customer_id)
    .fetch_all(pool)
    .await?;
    Ok((
        status,
        [(header::ETAG, Version::Exactly(version).etag())],
        Json(AccountView {
            customer_id,
            balance,
            version,
            payments,
        }),
    )
        .into_response())
}
