//! Event store and read-model projection of the Order aggregate.
//!
//! `execute` is the one write path: load the events, decide, append with the
//! next versions, project, and put the events in the outbox, all in the
//! caller's transaction.

use common::{Envelope, Event, Subjects, outbox};
use sqlx::{PgConnection, types::Json};
use uuid::Uuid;

use crate::domain::{self, Command, DomainError, Order};

#[derive(Debug, thiserror::Error)]
pub enum ExecError {
    #[error(transparent)]
    Domain(#[from] DomainError),
    /// Another writer appended first; load and decide again.
    #[error("order {0} was changed concurrently")]
    Conflict(Uuid),
    #[error("stored event of order {0} does not decode: {1}")]
    Corrupt(Uuid, String),
    #[error(transparent)]
    Db(#[from] sqlx::Error),
}

/// Reads the aggregate's events and folds them.
pub async fn load(conn: &mut PgConnection, order_id: Uuid) -> Result<Option<Order>, ExecError> {
    Ok(load_events(conn, order_id)
        .await?
        .iter()
        .fold(None, |state, (env, event)| {
            domain::evolve(state, event, env.timestamp)
        }))
}

/// The aggregate's history, oldest first.
pub async fn load_events(
    conn: &mut PgConnection,
    order_id: Uuid,
) -> Result<Vec<(Envelope, Event)>, ExecError> {
    let rows: Vec<(Json<serde_json::Value>,)> =
        sqlx::query_as("SELECT envelope FROM order_events WHERE order_id = $1 ORDER BY version")
            .bind(order_id)
            .fetch_all(&mut *conn)
            .await?;
    rows.into_iter()
        .map(|(Json(v),)| {
            let bytes = serde_json::to_vec(&v).expect("json value serializes");
            Envelope::decode(&bytes).map_err(|e| ExecError::Corrupt(order_id, e.to_string()))
        })
        .collect()
}

/// Runs `command` against the order: returns the new state and the emitted
/// envelopes (already appended, projected and in the outbox).
pub async fn execute(
    conn: &mut PgConnection,
    subjects: &Subjects,
    order_id: Uuid,
    command: Command,
    correlation_id: Uuid,
    causation_id: Uuid,
) -> Result<(Option<Order>, Vec<Envelope>), ExecError> {
    let state = load(conn, order_id).await?;
    let events = domain::decide(state.as_ref(), command)?;
    if events.is_empty() {
        return Ok((state, vec![]));
    }
    let mut version = state.as_ref().map_or(0, |o| o.version);
    let mut state = state;
    let mut envelopes = Vec::with_capacity(events.len());
    for event in &events {
        version += 1;
        let env = Envelope::new(
            event,
            order_id.to_string(),
            version,
            correlation_id,
            causation_id,
        );
        state = domain::evolve(state, event, env.timestamp);
        envelopes.push(env);
    }
    append(conn, order_id, &envelopes).await?;
    if let Some(order) = &state {
        project(conn, order).await?;
    }
    outbox::enqueue(conn, subjects, &envelopes).await?;
    Ok((state, envelopes))
}

async fn append(
    conn: &mut PgConnection,
    order_id: Uuid,
    envelopes: &[Envelope],
) -> Result<(), ExecError> {
    for env in envelopes {
        let result = sqlx::query(
            "INSERT INTO order_events (order_id, version, event_id, event_type, schema_version, envelope, recorded_at)
             VALUES ($1, $2, $3, $4, $5, $6, $7)",
        )
        .bind(order_id)
        .bind(env.version)
        .bind(env.event_id)
        .bind(&env.event_type)
        .bind(env.schema_version as i32)
        .bind(Json(env))
        .bind(env.timestamp)
        .execute(&mut *conn)
        .await;
        match result {
            Ok(_) => {}
            Err(sqlx::Error::Database(e)) if e.is_unique_violation() => {
                return Err(ExecError::Conflict(order_id));
            }
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

/// Upserts the read model from the state. Replaying `order_events` through
/// `evolve` and this function rebuilds the read model from scratch.
pub async fn project(conn: &mut PgConnection, order: &Order) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO orders (order_id, customer_id, status, lines, total, shipping_address,
                             failure_reason, shipment_id, version, created_at, updated_at)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)
         ON CONFLICT (order_id) DO UPDATE SET
             status = EXCLUDED.status, failure_reason = EXCLUDED.failure_reason,
             shipment_id = EXCLUDED.shipment_id, version = EXCLUDED.version,
             updated_at = EXCLUDED.updated_at
         WHERE orders.version < EXCLUDED.version",
    )
    .bind(order.id)
    .bind(&order.customer_id)
    .bind(order.status.as_str())
    .bind(Json(&order.lines))
    .bind(order.total)
    .bind(Json(&order.shipping_address))
    .bind(&order.failure_reason)
    .bind(order.shipment_id)
    .bind(order.version)
    .bind(order.created_at)
    .bind(order.updated_at)
    .execute(conn)
    .await?;
    Ok(())
}
