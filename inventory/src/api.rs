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
    http::{ApiError, ValidJson, Version},
    limits,
};
use serde::{Deserialize, Serialize};
use sqlx::PgPool;

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

#[derive(Serialize, sqlx::FromRow)]
#[serde(rename_all = "camelCase")]
struct StockView {
    product_id: String,
    available: i64,
    reserved: i64,
    version: i64,
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
    let precondition = Version::if_match(&headers)?;
    // With a version named, only an overwrite of that version will do; without
    // one (or with `*`), a new one is created.
    let create = !matches!(precondition, Some(Version::Exactly(_)));
    let created: Option<StockView> = sqlx::query_as(
        "INSERT INTO stock (product_id, available) SELECT $1, $2 WHERE $3
         ON CONFLICT (product_id) DO NOTHING
         RETURNING product_id, available, reserved, version",
    )
    .bind(&product_id)
    .bind(body.available)
    .bind(create)
    .fetch_optional(&pool)
    .await?;
    if let Some(view) = created {
        return Ok(respond(view, StatusCode::CREATED));
    }
    let expected = match precondition {
        None => {
            return Err(ApiError::PreconditionRequired(format!(
                "stock of '{product_id}' exists: to overwrite it send If-Match with the ETag of GET /stock/{product_id} (or If-Match: *); to add or remove units, POST /stock/{product_id}/adjustments"
            )));
        }
        Some(Version::Any) => None,
        Some(Version::Exactly(v)) => Some(v),
    };
    let updated: Option<StockView> = sqlx::query_as(
        "UPDATE stock SET available = $2, version = version + 1, updated_at = now()
         WHERE product_id = $1 AND ($3::bigint IS NULL OR version = $3)
         RETURNING product_id, available, reserved, version",
    )
    .bind(&product_id)
    .bind(body.available)
    .bind(expected)
    .fetch_optional(&pool)
    .await?;
    match updated {
        Some(view) => Ok(respond(view, StatusCode::OK)),
        None => {
            let current = find(&pool, &product_id).await?;
            Err(ApiError::PreconditionFailed(match current {
                None => {
                    format!("stock of '{product_id}' does not exist; create it without If-Match")
                }
                Some(s) => format!(
                    "stock of '{product_id}' is at version {}, not {}: it changed since it was read; read it again",
                    s.version,
                    expected.unwrap_or_default()
                ),
            }))
        }
    }
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
    // One statement: the row lock orders it with reservations and releases,
    // and the bounds are checked on the value it actually changes.
    let adjusted: Option<StockView> = sqlx::query_as(
        "UPDATE stock SET available = available + $2, version = version + 1, updated_at = now()
         WHERE product_id = $1 AND available + $2 >= 0 AND available + $2 <= $3
         RETURNING product_id, available, reserved, version",
    )
    .bind(&product_id)
    .bind(body.delta)
    .bind(limits::MAX_AMOUNT)
    .fetch_optional(&pool)
    .await?;
    if let Some(view) = adjusted {
        return Ok(respond(view, StatusCode::OK));
    }
    Err(match find(&pool, &product_id).await? {
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
    find(&pool, &product_id)
        .await?
        .map(|view| respond(view, StatusCode::OK))
        .ok_or_else(|| ApiError::NotFound(format!("no stock record for product '{product_id}'")))
}

async fn find(pool: &PgPool, product_id: &str) -> Result<Option<StockView>, ApiError> {
    Ok(sqlx::query_as(
        "SELECT product_id, available, reserved, version FROM stock WHERE product_id = $1",
    )
    .bind(product_id)
    .fetch_optional(pool)
    .await?)
}

/// The stock as JSON, with its version as the `ETag`.
fn respond(view: StockView, status: StatusCode) -> Response {
    (
        status,
        [(header::ETAG, Version::Exactly(view.version).etag())],
        Json(view),
    )
        .into_response()
}
