//! Placing an order, shared by `POST /orders` and the NATS request-reply command.

use common::{
    Subjects,
    event::{Address, OrderLine},
    outbox::OutboxSignal,
};
use serde::Deserialize;
use sqlx::PgPool;
use uuid::Uuid;

use crate::{
    domain::{Command, DomainError, Order},
    store::{self, ExecError},
};

/// Request body: `{"customerId", "lines": [{"productId","quantity","unitPrice"}], "shippingAddress": {...}}`.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PlaceOrder {
    pub customer_id: String,
    pub lines: Vec<OrderLine>,
    pub shipping_address: Address,
}

#[derive(Debug, thiserror::Error)]
pub enum PlaceError {
    #[error("{0}")]
    Invalid(String),
    #[error(transparent)]
    Internal(#[from] ExecError),
}

impl From<sqlx::Error> for PlaceError {
    fn from(e: sqlx::Error) -> Self {
        PlaceError::Internal(ExecError::Db(e))
    }
}

/// Everything placing needs.
#[derive(Clone)]
pub struct Placer {
    pub pool: PgPool,
    pub subjects: Subjects,
    pub outbox: OutboxSignal,
}

impl Placer {
    /// Places the order and starts the saga. With an idempotency key, a
    /// repeated request returns the order the first one created
    /// (`created` = false) instead of placing another.
    pub async fn place(
        &self,
        request: PlaceOrder,
        idempotency_key: Option<&str>,
    ) -> Result<(Order, bool), PlaceError> {
        if idempotency_key.is_some_and(|k| k.is_empty() || k.len() > 200) {
            return Err(PlaceError::Invalid(
                "idempotency key must be 1 to 200 characters".into(),
            ));
        }
        let order_id = Uuid::now_v7();
        let mut tx = self.pool.begin().await?;
        if let Some(key) = idempotency_key {
            let existing: Option<Uuid> = sqlx::query_scalar(
                "WITH ins AS (
                     INSERT INTO place_requests (idempotency_key, order_id) VALUES ($1, $2)
                     ON CONFLICT DO NOTHING RETURNING order_id)
                 SELECT order_id FROM place_requests WHERE idempotency_key = $1 AND NOT EXISTS (SELECT 1 FROM ins)",
            )
            .bind(key)
            .bind(order_id)
            .fetch_optional(&mut *tx)
            .await?;
            if let Some(existing) = existing {
                let order = store::load(&mut tx, existing).await;
                // Explicitly: a dropped transaction ends only when its connection is reused.
                tx.rollback().await?;
                let order = order?.ok_or(PlaceError::Internal(ExecError::Domain(
                    DomainError::NotFound,
                )))?;
                return Ok((order, false));
            }
        }
        let command = Command::Place {
            order_id,
            customer_id: request.customer_id,
            lines: request.lines,
            shipping_address: request.shipping_address,
        };
        // The placement request is the cause of OrderPlaced.
        let (state, _) = match store::execute(
            &mut tx,
            &self.subjects,
            order_id,
            command,
            order_id,
            order_id,
        )
        .await
        {
            Ok(v) => v,
            Err(e) => {
                tx.rollback().await?;
                return Err(match e {
                    ExecError::Domain(DomainError::Invalid(msg)) => PlaceError::Invalid(msg),
                    e => e.into(),
                });
            }
        };
        tx.commit().await?;
        self.outbox.notify();
        let order = state.expect("a placed order has state");
        tracing::info!(order_id = %order.id, correlation_id = %order.id, customer_id = %order.customer_id, total = order.total, "order placed");
        Ok((order, true))
    }
}
