//! Accounts over HTTP, a [`Counter`] of balance per customer:
//!
//! - `PUT /accounts/{customerId}` `{"balance": n}` creates an account, or
//!   overwrites an existing one with `If-Match`.
//! - `POST /accounts/{customerId}/deposits` `{"amount": n}` adds to the
//!   balance; it composes with charges and refunds running at the same time.
//! - `GET /accounts/{customerId}`: balance, version (also the `ETag`) and payments.
//! - `GET /admin/gateway`, `PUT /admin/gateway` (operator): the simulated
//!   payment gateway's rules, read and replaced at run time;
//!   `GET /admin/gateway/payments/{paymentId}` (operator): what it holds
//!   for one payment id.

use std::sync::Arc;

use axum::{
    Json,
    extract::{Path, State},
    http::HeaderMap,
};
use common::{
    Infra,
    api_doc::ErrorBody,
    counter::{Counter, CounterView},
    http::{AdminToken, ApiError, ValidJson},
};
use serde::Serialize;
use sqlx::PgPool;
use utoipa_axum::{router::OpenApiRouter, routes};
use uuid::Uuid;

use crate::{
    gateway::{Gateway, PaymentRecord, Rules},
    store::{self, PaymentView},
};

static ACCOUNTS: Counter = Counter {
    table: "accounts",
    key: "customer_id",
    column: "balance",
    base: "/accounts",
    additions: "deposits",
    id_name: "customerId",
    value_name: "balance",
    delta_name: "amount",
    noun: "account",
    removals: false,
    operator_reads: true,
};

pub fn router(infra: &Infra, gateway: Arc<Gateway>) -> OpenApiRouter {
    let control = GatewayControl {
        gateway,
        admin: infra.admin(),
    };
    ACCOUNTS
        .router::<AccountView>(infra.pool.clone(), infra.admin())
        .merge(gateway_routes().with_state(control))
}

/// The gateway's routes, documented.
fn gateway_routes() -> OpenApiRouter<GatewayControl> {
    OpenApiRouter::new()
        .routes(routes!(gateway_rules, set_gateway_rules))
        .routes(routes!(gateway_payment))
}

/// The document of the API: what `GET /openapi.json` serves.
pub fn openapi() -> utoipa::openapi::OpenApi {
    let mut routes = ACCOUNTS.openapi::<AccountView>();
    routes.merge(gateway_routes().into_openapi());
    common::api_doc::document(routes, "payment")
}

#[derive(Clone)]
struct GatewayControl {
    gateway: Arc<Gateway>,
    admin: AdminToken,
}

/// `GET /admin/gateway` (operator): the simulated gateway's rules now.
#[utoipa::path(get, path = "/admin/gateway", tag = "gateway",
    security(("operator" = [])),
    responses((status = 200, description = "The rules now", body = Rules)))]
async fn gateway_rules(
    State(control): State<GatewayControl>,
    headers: HeaderMap,
) -> Result<Json<Rules>, ApiError> {
    control.admin.check(&headers, "GET /admin/gateway")?;
    Ok(Json(control.gateway.rules()))
}

/// `GET /admin/gateway/payments/{paymentId}` (operator): what the simulated
/// gateway holds for a payment id, as a gateway's console would show it:
/// charged, given back (refunded or voided), and whether it is voided.
#[utoipa::path(get, path = "/admin/gateway/payments/{paymentId}", tag = "gateway",
    security(("operator" = [])),
    params(("paymentId" = Uuid, Path, description = "A payment id")),
    responses(
        (status = 200, description = "What the gateway holds for it (nothing yet: all empty)", body = PaymentRecord),
        (status = 400, description = "Not a payment id", body = ErrorBody),
    ))]
async fn gateway_payment(
    State(control): State<GatewayControl>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Result<Json<PaymentRecord>, ApiError> {
    control
        .admin
        .check(&headers, "GET /admin/gateway/payments/{paymentId}")?;
    let id: Uuid = id
        .parse()
        .map_err(|_| ApiError::BadRequest(format!("'{id}' is not a payment id (a UUID)")))?;
    Ok(Json(control.gateway.payment(id)))
}

/// `PUT /admin/gateway` (operator): replaces the rules, from the next call on.
#[utoipa::path(put, path = "/admin/gateway", tag = "gateway",
    security(("operator" = [])),
    request_body = Rules,
    responses(
        (status = 200, description = "The rules now", body = Rules),
        (status = 422, description = "Rules out of bounds", body = ErrorBody),
    ))]
async fn set_gateway_rules(
    State(control): State<GatewayControl>,
    headers: HeaderMap,
    ValidJson(rules): ValidJson<Rules>,
) -> Result<Json<Rules>, ApiError> {
    control.admin.check(&headers, "PUT /admin/gateway")?;
    rules.check().map_err(ApiError::Unprocessable)?;
    tracing::warn!(rules = %serde_json::to_string(&rules).unwrap_or_default(), "operator set the gateway's rules");
    control.gateway.set_rules(rules);
    Ok(Json(control.gateway.rules()))
}

/// A customer's account.
#[derive(Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
struct AccountView {
    customer_id: String,
    /// Minor units.
    balance: i64,
    version: i64,
    payments: Vec<PaymentView>,
}

impl CounterView for AccountView {
    fn version(&self) -> i64 {
        self.version
    }

    async fn load(pool: &PgPool, customer_id: &str) -> sqlx::Result<Option<Self>> {
        let Some((balance, version)) = store::account(pool, customer_id).await? else {
            return Ok(None);
        };
        Ok(Some(AccountView {
            customer_id: customer_id.into(),
            balance,
            version,
            payments: store::payments_of(pool, customer_id).await?,
        }))
    }
}
