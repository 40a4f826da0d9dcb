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
use common::{
    http::{ApiError, ValidJson, Version, VersionedPut},
    limits,
};
use serde::{Deserialize, Serialize};
use sqlx::PgPool;

use crate::store::{self, PaymentView};

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
    let put = VersionedPut {
        what: &format!("account '{customer_id}'"),
        hint: &format!("to add to its balance, POST /accounts/{customer_id}/deposits"),
    };
    let (status, _) = put
        .run(
            &headers,
            || store::create_account(&pool, &customer_id, body.balance),
            |expected| store::overwrite_balance(&pool, &customer_id, body.balance, expected),
            || async { Ok(store::account(&pool, &customer_id).await?.map(|(_, v)| v)) },
        )
        .await?;
    respond(&pool, customer_id, status).await
}

async fn deposit(
    State(pool): State<PgPool>,
    Path(customer_id): Path<String>,
    ValidJson(body): ValidJson<Deposit>,
) -> Result<Response, ApiError> {
    customer(&customer_id)?;
    limits::check_range("amount", body.amount, 1, limits::MAX_AMOUNT)
        .map_err(ApiError::Unprocessable)?;
    if store::deposit(&pool, &customer_id, body.amount, limits::MAX_AMOUNT)
        .await?
        .is_some()
    {
        return respond(&pool, customer_id, StatusCode::OK).await;
    }
    Err(match store::account(&pool, &customer_id).await? {
        None => ApiError::NotFound(format!(
            "no account for customer '{customer_id}'; create it with PUT /accounts/{customer_id}"
        )),
        Some((balance, _)) => ApiError::Unprocessable(format!(
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
    let (balance, version) = store::account(pool, &customer_id)
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("no account for customer '{customer_id}'")))?;
    let payments = store::payments_of(pool, &customer_id).await?;
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
