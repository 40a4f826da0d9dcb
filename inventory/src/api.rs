//! Stock and catalog data over HTTP.
//!
//! Stock, a [`Counter`] of available units per product:
//! - `PUT /stock/{productId}` `{"available": n}` creates a product's stock,
//!   or overwrites an existing one with `If-Match`.
//! - `POST /stock/{productId}/adjustments` `{"delta": n}` adds (restock) or
//!   removes (shrinkage) units; it composes with reservations running at the
//!   same time, and never takes available below zero (409).
//! - `GET /stock/{productId}`: available, reserved and version (also the `ETag`).
//!
//! Catalog data (what an order line of the product costs):
//! - `PUT /products/{productId}` `{"name": "...", "unitPrice": n}` creates a
//!   product (201), or changes one with `If-Match` (the [`VersionedPut`]
//!   flow of stock and accounts). Each change bumps the version and
//!   publishes `ProductPriced` through the outbox in the same transaction;
//!   a PUT of what is already there changes nothing and publishes nothing.
//! - `GET /products/{productId}`: name, unit price and version (the `ETag`).

use axum::{
    Json,
    extract::{Path, State},
    http::{HeaderMap, StatusCode, header},
    response::{IntoResponse, Response},
};
use common::{
    Infra, Subjects,
    api_doc::ErrorBody,
    counter::{Counter, CounterView},
    http::{AdminToken, ApiError, ValidJson, Version, VersionedPut},
    limits,
    outbox::{self, EnqueueError, OutboxSignal},
    product::ProductPriced,
};
use serde::Deserialize;
use sqlx::PgPool;
use utoipa_axum::{router::OpenApiRouter, routes};
use uuid::Uuid;

use crate::store::{self, Product, Stock};

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
    operator_reads: false,
};

pub fn router(infra: &Infra) -> OpenApiRouter {
    let catalog = Catalog {
        pool: infra.pool.clone(),
        subjects: infra.subjects.clone(),
        outbox: infra.outbox.clone(),
        max_payload: infra.max_payload(),
        admin: infra.admin(),
    };
    STOCK
        .router::<Stock>(infra.pool.clone(), infra.admin())
        .merge(catalog_routes().with_state(catalog))
}

/// The catalog's routes, documented.
fn catalog_routes() -> OpenApiRouter<Catalog> {
    OpenApiRouter::new().routes(routes!(get_product, put_product))
}

/// The document of the API: what `GET /openapi.json` serves.
pub fn openapi() -> utoipa::openapi::OpenApi {
    let mut routes = STOCK.openapi::<Stock>();
    routes.merge(catalog_routes().into_openapi());
    common::api_doc::document(routes, "inventory")
}

impl CounterView for Stock {
    fn version(&self) -> i64 {
        self.version
    }

    async fn load(pool: &PgPool, product_id: &str) -> sqlx::Result<Option<Self>> {
        store::stock(pool, product_id).await
    }
}

/// What the catalog routes need: the database, and the outbox they publish through.
#[derive(Clone)]
struct Catalog {
    pool: PgPool,
    subjects: Subjects,
    outbox: OutboxSignal,
    max_payload: usize,
    admin: AdminToken,
}

/// `PUT /products/{productId}` body.
#[derive(Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct PutProduct {
    #[schema(min_length = 1, max_length = 200)]
    name: String,
    /// Minor units.
    #[schema(minimum = 1, maximum = 1_000_000_000)]
    unit_price: i64,
}

impl Catalog {
    /// Commits the product as `change` leaves it and, if it changed, its
    /// `ProductPriced` at the new version; then wakes the relay.
    async fn commit(
        &self,
        mut tx: sqlx::Transaction<'_, sqlx::Postgres>,
        product: Product,
        changed: bool,
    ) -> Result<Product, ApiError> {
        if changed {
            let event = ProductPriced {
                product_id: product.product_id.clone(),
                name: product.name.clone(),
                unit_price: product.unit_price,
            };
            let subject = self.subjects.product(&product.product_id);
            let envelope = event.envelope(product.version, Uuid::now_v7());
            let events = [(subject, envelope)];
            match outbox::enqueue_on(&mut tx, &events, self.max_payload).await {
                Ok(()) => {}
                Err(EnqueueError::Db(e)) => return Err(e.into()),
                // Bounded ids and names keep far below any broker's limit.
                Err(EnqueueError::TooLarge(reason)) => return Err(ApiError::Unprocessable(reason)),
            }
        }
        tx.commit().await?;
        if changed {
            self.outbox.notify();
        }
        Ok(product)
    }
}

/// Creates a product (201), or changes its name and price with `If-Match`
/// (200); each change publishes `ProductPriced`.
#[utoipa::path(put, path = "/products/{productId}", tag = "products",
    security(("operator" = [])),
    params(
        ("productId" = String, Path, min_length = 1, max_length = 128),
        ("If-Match" = Option<String>, Header, description = "The ETag of a GET, or `*`: needed to change an existing one"),
    ),
    request_body = PutProduct,
    responses(
        (status = 200, description = "Changed (or already so)", body = Product, headers(("ETag" = String, description = "The version"))),
        (status = 201, description = "Created", body = Product, headers(("ETag" = String, description = "The version"))),
        (status = 412, description = "It changed since it was read (If-Match)", body = ErrorBody),
        (status = 428, description = "It exists: changing it needs If-Match", body = ErrorBody),
        (status = 422, description = "A name or price out of bounds", body = ErrorBody),
    ))]
async fn put_product(
    State(catalog): State<Catalog>,
    Path(id): Path<String>,
    headers: HeaderMap,
    ValidJson(body): ValidJson<PutProduct>,
) -> Result<Response, ApiError> {
    catalog
        .admin
        .check(&headers, &format!("PUT /products/{id}"))?;
    limits::check_id("productId", &id).map_err(ApiError::BadRequest)?;
    let data = ProductPriced {
        product_id: id.clone(),
        name: body.name,
        unit_price: body.unit_price,
    };
    data.validate().map_err(ApiError::Unprocessable)?;
    let put = VersionedPut {
        what: &format!("product '{id}'"),
        hint: "a product's name and price are changed together",
    };
    let (pool, id, data) = (&catalog.pool, &id, &data);
    let (status, (tx, product, changed)) = put
        .run(
            &headers,
            || async {
                let mut tx = pool.begin().await?;
                match store::create_product(&mut tx, data).await? {
                    Some(created) => Ok(Some((tx, created, true))),
                    None => {
                        tx.rollback().await?;
                        Ok(None)
                    }
                }
            },
            |expected| async move {
                let mut tx = pool.begin().await?;
                let Some(current) = store::lock_product(&mut tx, id, expected).await? else {
                    tx.rollback().await?;
                    return Ok(None);
                };
                if current.name == data.name && current.unit_price == data.unit_price {
                    return Ok(Some((tx, current, false)));
                }
                let changed = store::change_product(&mut tx, data).await?;
                Ok(Some((tx, changed, true)))
            },
            || async { Ok(store::product(pool, id).await?.map(|p| p.version)) },
        )
        .await?;
    let product = catalog.commit(tx, product, changed).await?;
    if changed {
        tracing::warn!(product_id = %product.product_id, name = %product.name, unit_price = product.unit_price, version = product.version, "operator priced a product");
    }
    Ok(reply(status, product))
}

/// A product's name, price and version (also its `ETag`).
#[utoipa::path(get, path = "/products/{productId}", tag = "products",
    params(("productId" = String, Path, min_length = 1, max_length = 128)),
    responses(
        (status = 200, description = "The product", body = Product, headers(("ETag" = String, description = "The version"))),
        (status = 404, description = "Not in the catalog", body = ErrorBody),
    ))]
async fn get_product(
    State(catalog): State<Catalog>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    limits::check_id("productId", &id).map_err(ApiError::BadRequest)?;
    match store::product(&catalog.pool, &id).await? {
        Some(product) => Ok(reply(StatusCode::OK, product)),
        None => Err(ApiError::NotFound(format!(
            "no product '{id}' in the catalog; create it with PUT /products/{id}"
        ))),
    }
}

/// The product with its version as `ETag`.
fn reply(status: StatusCode, product: Product) -> Response {
    let etag = Version::Exactly(product.version).etag();
    (status, [(header::ETAG, etag)], Json(product)).into_response()
}
