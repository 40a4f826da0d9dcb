//! Placing an order, shared by `POST /orders` and the NATS request-reply command.

use common::{
    Subjects,
    event::{Address, OrderLine},
    limits,
    outbox::{self, OutboxSignal},
};
use serde::{Deserialize, Serialize};
use sqlx::PgPool;
use uuid::Uuid;

use crate::{
    domain::{Command, DomainError, Order},
    store::{self, ExecError, Snapshots},
};

/// Request body: `{"customerId", "lines": [{"productId","quantity","unitPrice"}], "shippingAddress": {...}}`.
/// Unknown fields are refused at every level (the line and address types
/// refuse them too); the bounds are in [`common::limits`].
#[derive(Debug, Clone, Serialize, Deserialize)]
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
    /// The idempotency key was first used with a different request.
    #[error("{0}")]
    KeyReused(String),
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
    /// The broker's `max_payload`: no event larger is ever written.
    pub max_payload: usize,
    pub snapshots: Snapshots,
}

impl Placer {
    /// Places the order and starts the saga. With an idempotency key, a
    /// repeated request of the same customer returns the order the first one
    /// created (`created` = false) instead of placing another, also while
    /// the first is still being placed: the second waits for it.
    pub async fn place(
        &self,
        request: PlaceOrder,
        idempotency_key: Option<&str>,
    ) -> Result<(Order, bool), PlaceError> {
        if let Some(key) = idempotency_key {
            limits::check_text("Idempotency-Key", key, limits::MAX_IDEMPOTENCY_KEY_CHARS)
                .map_err(PlaceError::Invalid)?;
        }
        // Before the key is stored under it: a customer id must fit an index.
        limits::check_id("customerId", &request.customer_id).map_err(PlaceError::Invalid)?;
        let order_id = Uuid::now_v7();
        let mut tx = self.pool.begin().await?;
        if let Some(key) = idempotency_key {
            let canonical =
                serde_json::to_vec(&request).map_err(|e| PlaceError::Invalid(e.to_string()))?;
            let (existing, same_request) = store::claim_placement_key(
                &mut tx,
                &request.customer_id,
                key,
                order_id,
                &canonical,
            )
            .await?;
            if existing != order_id {
                if !same_request {
                    tx.rollback().await?;
                    return Err(PlaceError::KeyReused(format!(
                        "Idempotency-Key '{key}' was already used by this customer for a different request (order {existing})"
                    )));
                }
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
        let (state, emitted) = match store::execute(
            &mut tx,
            &self.snapshots,
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
        if let Err(too_large) =
            outbox::enqueue(&mut tx, &self.subjects, &emitted, self.max_payload).await?
        {
            tx.rollback().await?;
            return Err(PlaceError::Invalid(too_large));
        }
        tx.commit().await?;
        self.outbox.notify();
        let order = state.expect("a placed order has state");
        tracing::info!(order_id = %order.id, correlation_id = %order.id, customer_id = %order.customer_id, total = order.total, "order placed");
        Ok((order, true))
    }
}
