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
    Json, Router,
    extract::{Path, State},
    http::HeaderMap,
    routing::get,
};
use common::{
    Infra,
    counter::{Counter, CounterView},
    http::{AdminToken, ApiError, ValidJson},
};
use serde::Serialize;
use sqlx::PgPool;
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

pub fn router(infra: &Infra, gateway: Arc<Gateway>) -> Router {
    let control = GatewayControl {
        gateway,
        admin: infra.admin(),
    };
    ACCOUNTS
        .router::<AccountView>(infra.pool.clone(), infra.admin())
        .merge(
            Router::new()
                .route("/admin/gateway", get(gateway_rules).put(set_gateway_rules))
                .route("/admin/gateway/payments/{id}", get(gateway_payment))
                .with_state(control),
        )
}

#[derive(Clone)]
struct GatewayControl {
    gateway: Arc<Gateway>,
    admin: AdminToken,
}

/// `GET /admin/gateway` (operator): the simulated gateway's rules now.
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
async fn gateway_payment(
    State(control): State<GatewayControl>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Result<Json<PaymentRecord>, ApiError> {
    control
        .admin
        .check(&headers, "GET /admin/gateway/payments/{id}")?;
    let id: Uuid = id
        .parse()
        .map_err(|_| ApiError::BadRequest(format!("'{id}' is not a payment id (a UUID)")))?;
    Ok(Json(control.gateway.payment(id)))
}

/// `PUT /admin/gateway` (operator): replaces the rules, from the next call on.
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

#[derive(Serialize)]
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
