//! Placing an order, shared by `POST /orders` and the NATS request-reply
//! command; and every other command a person gives an existing order (the
//! customer's cancel, an operator's resolution).

use common::{
    Subjects,
    event::Address,
    limits,
    outbox::{self, OutboxSignal},
};
use serde::{Deserialize, Serialize};
use sqlx::PgPool;
use uuid::Uuid;

use crate::{
    catalog,
    domain::{Command, DomainError, Order},
    pricing::{self, RequestedLine},
    store::{self, ExecError, Snapshots},
};

/// Request body: `{"customerId", "lines": [{"productId","quantity"}], "shippingAddress": {...}}`.
/// Each line is priced from the catalog ([`pricing`]); a line's optional
/// `unitPrice` must be the catalog's. Unknown fields are refused at every
/// level (the line and address types refuse them too); the bounds are in
/// [`common::limits`].
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PlaceOrder {
    pub customer_id: String,
    pub lines: Vec<RequestedLine>,
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
    /// Puts what a command emitted in the outbox and commits, then wakes the
    /// relay; `Err(reason)`, rolled back, for an event too large to publish.
    async fn publish(
        &self,
        mut tx: sqlx::Transaction<'_, sqlx::Postgres>,
        emitted: &[common::Envelope],
    ) -> sqlx::Result<Result<(), String>> {
        if let Err(too_large) =
            outbox::enqueue(&mut tx, &self.subjects, emitted, self.max_payload).await?
        {
            tx.rollback().await?;
            return Ok(Err(too_large));
        }
        tx.commit().await?;
        self.outbox.notify();
        Ok(Ok(()))
    }

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
        // The whole shape before the catalog is asked: a bad request is told
        // what is wrong with it whatever it orders.
        pricing::check(&request.lines).map_err(PlaceError::Invalid)?;
        common::event::validate_address("shippingAddress", &request.shipping_address)
            .map_err(PlaceError::Invalid)?;
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
        // The prices of this moment: a later change of the catalog does not
        // change this order, whose lines carry them from here on.
        let products: Vec<&str> = request
            .lines
            .iter()
            .map(|l| l.product_id.as_str())
            .collect();
        let prices = catalog::lookup(&mut tx, &products)
            .await?
            .into_iter()
            .map(|(id, e)| {
                let price = pricing::Price {
                    unit_price: e.unit_price,
                    version: e.version,
                };
                (id, price)
            })
            .collect();
        let lines = match pricing::price(request.lines, &prices) {
            Ok(lines) => lines,
            Err(refused) => {
                tx.rollback().await?;
                return Err(PlaceError::Invalid(refused));
            }
        };
        let command = Command::Place {
            order_id,
            customer_id: request.customer_id,
            lines,
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
        self.publish(tx, &emitted)
            .await?
            .map_err(PlaceError::Invalid)?;
        let order = state.expect("a placed order has state");
        tracing::info!(order_id = %order.id, correlation_id = %order.id, customer_id = %order.customer_id, total = order.total, "order placed");
        Ok((order, true))
    }
}

/// How often a command is decided again when another writer changed the
/// order between its load and its append.
const ATTEMPTS: usize = 3;

/// Why a command for an existing order was not carried out.
#[derive(Debug, thiserror::Error)]
pub enum CommandError {
    #[error("order {0} not found")]
    NotFound(Uuid),
    /// Not in a state the command applies to (409).
    #[error("{0}")]
    Refused(String),
    /// Bad input (422).
    #[error("{0}")]
    Invalid(String),
    #[error(transparent)]
    Internal(ExecError),
}

impl From<sqlx::Error> for CommandError {
    fn from(e: sqlx::Error) -> Self {
        CommandError::Internal(ExecError::Db(e))
    }
}

impl Placer {
    /// Runs `command` against order `order_id` and publishes what it
    /// decides: the order as it is afterwards (unchanged if the command
    /// changed nothing). Decided again, up to [`ATTEMPTS`] times, when a
    /// saga event changed the order at the same moment.
    pub async fn run(&self, order_id: Uuid, command: Command) -> Result<Order, CommandError> {
        let mut attempt = 0;
        loop {
            attempt += 1;
            let mut tx = self.pool.begin().await?;
            let result = store::execute(
                &mut tx,
                &self.snapshots,
                order_id,
                command.clone(),
                order_id,
                Uuid::now_v7(),
            )
            .await;
            let (state, emitted) = match result {
                Ok(v) => v,
                Err(e) => {
                    let _ = tx.rollback().await;
                    match e {
                        ExecError::Conflict(_) if attempt < ATTEMPTS => continue,
                        ExecError::Domain(DomainError::NotFound) => {
                            return Err(CommandError::NotFound(order_id));
                        }
                        ExecError::Domain(DomainError::Refused(m)) => {
                            return Err(CommandError::Refused(m));
                        }
                        ExecError::Domain(e) => return Err(CommandError::Invalid(e.to_string())),
                        e => return Err(CommandError::Internal(e)),
                    }
                }
            };
            self.publish(tx, &emitted)
                .await?
                .map_err(CommandError::Invalid)?;
            return state.ok_or(CommandError::NotFound(order_id));
        }
    }

    /// The customer's cancel: the order is cancelled unless it is
    /// confirmed (or otherwise ended), and every service undoes its step.
    pub async fn cancel(&self, order_id: Uuid, reason: String) -> Result<Order, CommandError> {
        let order = self
            .run(order_id, Command::CancelByCustomer { reason })
            .await?;
        tracing::info!(%order_id, correlation_id = %order_id, status = order.status.name(), "customer cancelled the order");
        Ok(order)
    }
}
