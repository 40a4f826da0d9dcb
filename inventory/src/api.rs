//! `PUT /stock/{productId}` sets the available quantity; `GET` reads available and reserved.

use axum::{
    Json, Router,
    extract::{Path, State},
    routing::get,
};
use common::http::{ApiError, ValidJson};
use serde::{Deserialize, Serialize};
use sqlx::PgPool;

pub fn router(pool: PgPool) -> Router {
    Router::new()
        .route("/stock/{product_id}", get(get_stock).put(put_stock))
        .with_state(pool)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SetStock {
    available: i64,
}

#[derive(Serialize, sqlx::FromRow)]
#[serde(rename_all = "camelCase")]
struct StockView {
    product_id: String,
    available: i64,
    reserved: i64,
}

async fn put_stock(
    State(pool): State<PgPool>,
    Path(product_id): Path<String>,
    ValidJson(body): ValidJson<SetStock>,
) -> Result<Json<StockView>, ApiError> {
    if product_id.trim().is_empty() {
        return Err(ApiError::BadRequest("productId must not be empty".into()));
    }
    if body.available < 0 {
        return Err(ApiError::Unprocessable(format!(
            "available must not be negative, got {}",
            body.available
        )));
    }
    let view = sqlx::query_as::<_, StockView>(
        "INSERT INTO stock (product_id, available) VALUES ($1, $2)
         ON CONFLICT (product_id) DO UPDATE SET available = EXCLUDED.available, updated_at = now()
         RETURNING product_id, available, reserved",
    )
    .bind(&product_id)
    .bind(body.available)
    .fetch_one(&pool)
    .await?;
    Ok(Json(view))
}

async fn get_stock(
    State(pool): State<PgPool>,
    Path(product_id): Path<String>,
) -> Result<Json<StockView>, ApiError> {
    sqlx::query_as::<_, StockView>(
        "SELECT product_id, available, reserved FROM stock WHERE product_id = $1",
    )
    .bind(&product_id)
    .fetch_optional(&pool)
    .await?
    .map(Json)
    .ok_or_else(|| ApiError::NotFound(format!("no stock record for product '{product_id}'")))
}
