//! Stock over HTTP.
//!
//! - `PUT /stock/{productId}` `{"available": n}` creates a product's stock.
//!   On an existing one it is an absolute overwrite and needs `If-Match` with
//!   the ETag of a `GET` (412 if the stock changed since, 428 without it;
//!   `If-Match: *` overwrites whatever is there).
//! - `POST /stock/{productId}/adjustments` `{"delta": n}` adds (restock) or
//!   removes (shrinkage) units; it composes with reservations running at the
//!   same time, and never takes available below zero (409).
//! - `GET /stock/{productId}`: available, reserved and version (also the `ETag`).

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
use serde::Deserialize;
use sqlx::PgPool;

use crate::store::{self, Stock};

pub fn router(pool: PgPool) -> Router {
    Router::new()
        .route("/stock/{product_id}", get(get_stock).put(put_stock))
        .route("/stock/{product_id}/adjustments", post(adjust))
        .with_state(pool)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SetStock {
    available: i64,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Adjustment {
    /// Units to add (positive) or remove (negative).
    delta: i64,
}

fn product(product_id: &str) -> Result<(), ApiError> {
    limits::check_id("productId", product_id).map_err(ApiError::BadRequest)
}

async fn put_stock(
    State(pool): State<PgPool>,
    Path(product_id): Path<String>,
    headers: HeaderMap,
    ValidJson(body): ValidJson<SetStock>,
) -> Result<Response, ApiError> {
    product(&product_id)?;
    limits::check_range("available", body.available, 0, limits::MAX_AMOUNT)
        .map_err(ApiError::Unprocessable)?;
    let put = VersionedPut {
        what: &format!("stock of '{product_id}'"),
        hint: &format!("to add or remove units, POST /stock/{product_id}/adjustments"),
    };
    let (status, stock) = put
        .run(
            &headers,
            || store::create_stock(&pool, &product_id, body.available),
            |expected| store::overwrite_stock(&pool, &product_id, body.available, expected),
            || async { Ok(store::stock(&pool, &product_id).await?.map(|s| s.version)) },
        )
        .await?;
    Ok(respond(stock, status))
}

async fn adjust(
    State(pool): State<PgPool>,
    Path(product_id): Path<String>,
    ValidJson(body): ValidJson<Adjustment>,
) -> Result<Response, ApiError> {
    product(&product_id)?;
    if body.delta == 0 {
        return Err(ApiError::Unprocessable("delta must not be zero".into()));
    }
    limits::check_range("delta", body.delta, -limits::MAX_AMOUNT, limits::MAX_AMOUNT)
        .map_err(ApiError::Unprocessable)?;
    if let Some(stock) = store::adjust(&pool, &product_id, body.delta, limits::MAX_AMOUNT).await? {
        return Ok(respond(stock, StatusCode::OK));
    }
    Err(match store::stock(&pool, &product_id).await? {
        None => ApiError::NotFound(format!(
            "no stock record for product '{product_id}'; create it with PUT /stock/{product_id}"
        )),
        Some(s) if body.delta < 0 => ApiError::Conflict(format!(
            "cannot remove {} of '{product_id}': only {} available ({} reserved)",
            -body.delta, s.available, s.reserved
        )),
        Some(s) => ApiError::Unprocessable(format!(
            "adding {} to '{product_id}' would take available ({}) over {}",
            body.delta,
            s.available,
            limits::MAX_AMOUNT
        )),
    })
}

async fn get_stock(
    State(pool): State<PgPool>,
    Path(product_id): Path<String>,
) -> Result<Response, ApiError> {
    product(&product_id)?;
    store::stock(&pool, &product_id)
        .await?
        .map(|stock| respond(stock, StatusCode::OK))
        .ok_or_else(|| ApiError::NotFound(format!("no stock record for product '{product_id}'")))
}

/// The stock as JSON, with its version as the `ETag`.
fn respond(stock: Stock, status: StatusCode) -> Response {
    (
        status,
        [(header::ETAG, Version::Exactly(stock.version).etag())],
        Json(stock),
    )
        .into_response()
}
