//! Accounts over HTTP, a [`Counter`] of balance per customer:
//!
//! - `PUT /accounts/{customerId}` `{"balance": n}` creates an account, or
//!   overwrites an existing one with `If-Match`.
//! - `POST /accounts/{customerId}/deposits` `{"amount": n}` adds to the
//!   balance; it composes with charges and refunds running at the same time.
//! - `GET /accounts/{customerId}`: balance, version (also the `ETag`) and payments.

use axum::Router;
use common::counter::{Counter, CounterView};
use serde::Serialize;
use sqlx::PgPool;

use crate::store::{self, PaymentView};

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
};

pub fn router(pool: PgPool) -> Router {
    ACCOUNTS.router::<AccountView>(pool)
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
