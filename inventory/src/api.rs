//! Stock over HTTP, a [`Counter`] of available units per product:
//!
//! - `PUT /stock/{productId}` `{"available": n}` creates a product's stock,
//!   or overwrites an existing one with `If-Match`.
//! - `POST /stock/{productId}/adjustments` `{"delta": n}` adds (restock) or
//!   removes (shrinkage) units; it composes with reservations running at the
//!   same time, and never takes available below zero (409).
//! - `GET /stock/{productId}`: available, reserved and version (also the `ETag`).

use axum::Router;
use common::{
    Infra,
    counter::{Counter, CounterView},
};
use sqlx::PgPool;

use crate::store::{self, Stock};

static STOCK: Counter = Counter {
    table: "stock",
    key: "product_id",
    column: "available",
    base: "/stock",
    additions: "adjustments",
    id_name: "productId",
    value_name: "available",
    delta_name: "delta",
    noun: "stock of",
    removals: true,
};

pub fn router(infra: &Infra) -> Router {
    STOCK.router::<Stock>(infra.pool.clone(), infra.admin())
}

impl CounterView for Stock {
    fn version(&self) -> i64 {
        self.version
    }

    async fn load(pool: &PgPool, product_id: &str) -> sqlx::Result<Option<Self>> {
        store::stock(pool, product_id).await
    }
}
