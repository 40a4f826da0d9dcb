//! The order service's catalog: a local projection of inventory's product
//! catalog, fed by its `ProductPriced` events on the catalog stream (CQRS
//! across services: placing an order never calls inventory). Every order
//! line is priced from it ([`crate::place`]).
//!
//! Applying an event is idempotent and safe in any order: a row changes only
//! for a newer product version, so a redelivered, late or reordered event
//! never takes a price back. An event that is not a valid `ProductPriced`
//! on its product's subject is dead-lettered with the reason.
//!
//! The catalog stream keeps each product's latest event for good, so
//! [`rebuild`] makes the whole catalog again from the stream alone.

use std::{collections::HashMap, time::Duration};

use async_nats::jetstream::{self, AckKind, consumer::DeliverPolicy};
use chrono::{DateTime, Utc};
use common::{
    Envelope, Subjects,
    dlq::{self, About, Letter},
    product::{PRODUCT_PRICED, ProductPriced},
    topology::CATALOG_WATCH,
};
use futures::StreamExt;
use serde::Serialize;
use sqlx::{PgConnection, PgPool};
use tokio_util::sync::CancellationToken;

use crate::watch::{Source, Started, Watcher, ack};

/// Name of the watch in the health board.
pub const HEALTH_WATCH: &str = "catalog";

/// How long a rebuild waits for the next message of the stream.
const READ_TIMEOUT: Duration = Duration::from_secs(10);

/// One product as the order service prices it.
#[derive(Debug, Clone, Serialize, sqlx::FromRow, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
#[schema(as = CatalogEntry)]
pub struct Entry {
    pub product_id: String,
    pub name: String,
    pub unit_price: i64,
    /// The product's version at inventory.
    pub version: i64,
    /// When inventory priced it (the event's timestamp).
    pub priced_at: DateTime<Utc>,
}

const ENTRY_COLUMNS: &str = "product_id, name, unit_price, version, priced_at";

/// The catalog entries of `products` (those it has), by product id.
pub async fn lookup(
    conn: &mut PgConnection,
    products: &[&str],
) -> sqlx::Result<HashMap<String, Entry>> {
    let rows: Vec<Entry> = match products {
        // One product, as most orders have: `= $1`, planned once per
        // connection. `= ANY($1)` Postgres plans again on every call (a
        // plan for the array's length always looks cheaper than a generic
        // one), and that takes longer than the lookup.
        [product] => {
            sqlx::query_as(sqlx::AssertSqlSafe(format!(
                "SELECT {ENTRY_COLUMNS} FROM catalog WHERE product_id = $1"
            )))
            .bind(product)
            .fetch_all(conn)
            .await?
        }
        _ => {
            sqlx::query_as(sqlx::AssertSqlSafe(format!(
                "SELECT {ENTRY_COLUMNS} FROM catalog WHERE product_id = ANY($1)"
            )))
            .bind(products)
            .fetch_all(conn)
            .await?
        }
    };
    Ok(rows
        .into_iter()
        .map(|e| (e.product_id.clone(), e))
        .collect())
}

/// One product's entry, if the catalog has it.
pub async fn entry(pool: &PgPool, product_id: &str) -> sqlx::Result<Option<Entry>> {
    common::sql::row_by_key(pool, "catalog", ENTRY_COLUMNS, "product_id", product_id).await
}

/// The catalog's one rule for an insert into `table` that meets a row of the
/// same product: the row takes the other only if it is a newer version.
fn newer_wins(table: &str) -> String {
    format!(
        "ON CONFLICT (product_id) DO UPDATE SET
             name = EXCLUDED.name, unit_price = EXCLUDED.unit_price, version = EXCLUDED.version,
             event_id = EXCLUDED.event_id, priced_at = EXCLUDED.priced_at,
             stream_seq = EXCLUDED.stream_seq, updated_at = EXCLUDED.updated_at
         WHERE {table}.version < EXCLUDED.version"
    )
}

/// The furthest a product's version may be ahead of the one the catalog
/// holds (0 for a product it does not have): inventory counts a product's
/// versions up one by one, so an event further ahead is forged or broken,
/// and would otherwise pin its price for good (no later version could
/// ever be newer).
pub const MAX_VERSION_JUMP: i64 = 1_000_000;

/// What applying a catalog event did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Applied {
    Changed,
    /// The catalog holds this version or a newer one already.
    Unchanged,
    /// Its version is more than [`MAX_VERSION_JUMP`] past the one held.
    TooFarAhead {
        held: i64,
    },
}

/// Applies one event to `table` (the catalog or its rebuild copy) unless
/// the row already holds this version or a newer one, or the version jumps
/// too far ahead of it.
async fn apply(
    conn: &mut PgConnection,
    table: &str,
    envelope: &Envelope,
    product: &ProductPriced,
    stream_seq: u64,
) -> sqlx::Result<Applied> {
    let done = sqlx::query(sqlx::AssertSqlSafe(format!(
        "INSERT INTO {table} (product_id, name, unit_price, version, event_id, priced_at, stream_seq)
         SELECT $1, $2, $3, $4, $5, $6, $7
         WHERE $4 <= COALESCE((SELECT version FROM {table} WHERE product_id = $1), 0) + $8
         {}",
        newer_wins(table)
    )))
    .bind(&product.product_id)
    .bind(&product.name)
    .bind(product.unit_price)
    .bind(envelope.version)
    .bind(envelope.event_id)
    .bind(envelope.timestamp)
    .bind(i64::try_from(stream_seq).unwrap_or(i64::MAX))
    .bind(MAX_VERSION_JUMP)
    .execute(&mut *conn)
    .await?;
    if done.rows_affected() == 1 {
        return Ok(Applied::Changed);
    }
    let held: Option<i64> = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
        "SELECT version FROM {table} WHERE product_id = $1"
    )))
    .bind(&product.product_id)
    .fetch_optional(conn)
    .await?;
    let held = held.unwrap_or(0);
    Ok(
        if envelope.version > held.saturating_add(MAX_VERSION_JUMP) {
            Applied::TooFarAhead { held }
        } else {
            Applied::Unchanged
        },
    )
}

/// A catalog event read from the wire, or why it is not one: the bytes must
/// decode, and the subject must be its product's.
fn read(
    subjects: &Subjects,
    subject: &str,
    bytes: &[u8],
) -> Result<(Envelope, ProductPriced), String> {
    let (envelope, product) = ProductPriced::decode(bytes).map_err(|e| e.to_string())?;
    let expected = subjects.product(&product.product_id);
    if subject != expected {
        return Err(format!(
            "{PRODUCT_PRICED} of product '{}' published on subject '{subject}', expected '{expected}'",
            product.product_id
        ));
    }
    Ok((envelope, product))
}

/// The watch that keeps the catalog.
pub struct CatalogWatch {
    pub pool: PgPool,
    pub js: jetstream::Context,
    pub subjects: Subjects,
    pub max_payload: usize,
}

impl CatalogWatch {
    /// Creates the durable consumer now, then returns the loop to run.
    pub async fn start(self, source: Source, shutdown: CancellationToken) -> Started {
        source
            .watch(CATALOG_WATCH, HEALTH_WATCH, shutdown, self)
            .await
    }
}

impl Watcher for CatalogWatch {
    async fn process(&self, msg: &jetstream::Message) {
        let (delivered, stream_seq) = msg
            .info()
            .map(|i| (i.delivered, i.stream_sequence))
            .unwrap_or((1, 0));
        let (envelope, product) = match read(&self.subjects, msg.subject.as_str(), &msg.payload) {
            Ok(v) => v,
            Err(reason) => return self.dead_letter(msg, delivered, stream_seq, reason).await,
        };
        let applied = async {
            let mut conn = self.pool.acquire().await?;
            apply(&mut conn, "catalog", &envelope, &product, stream_seq).await
        }
        .await;
        match applied {
            Ok(Applied::TooFarAhead { held }) => {
                let reason = format!(
                    "{PRODUCT_PRICED} of product '{}' has version {}, more than {MAX_VERSION_JUMP} past the catalog's {held}",
                    product.product_id, envelope.version
                );
                self.dead_letter(msg, delivered, stream_seq, reason).await
            }
            Ok(applied) => {
                if applied == Applied::Changed {
                    tracing::info!(product_id = %product.product_id, unit_price = product.unit_price, version = envelope.version, "catalog priced a product");
                } else {
                    tracing::debug!(product_id = %product.product_id, version = envelope.version, "catalog already has this version or a newer one");
                }
                ack(msg, AckKind::Ack).await;
            }
            Err(e) => {
                tracing::warn!(product_id = %product.product_id, error = %e, "cannot update the catalog; retrying");
                ack(msg, AckKind::Nak(Some(Duration::from_secs(1)))).await;
            }
        }
    }
}

impl CatalogWatch {
    async fn dead_letter(
        &self,
        msg: &jetstream::Message,
        delivered: i64,
        stream_seq: u64,
        reason: String,
    ) {
        // What can be read of the envelope names the event; no saga owns it.
        let envelope: Option<Envelope> = serde_json::from_slice(&msg.payload).ok();
        let letter = Letter {
            consumer: CATALOG_WATCH.name,
            msg,
            delivered,
            stream_seq,
            stream: self.subjects.catalog_stream(),
            about: envelope.as_ref().map(|e| About {
                event_id: e.event_id,
                event_type: &e.event_type,
                correlation_id: None,
            }),
            reason: &reason,
        };
        match dlq::send(&self.js, &self.subjects, self.max_payload, letter).await {
            Ok(()) => {
                tracing::error!(subject = %msg.subject, stream_seq, %reason, "catalog event dead-lettered");
                ack(msg, AckKind::Term).await;
            }
            Err(e) => {
                tracing::error!(error = %e, %reason, "cannot dead-letter a catalog event; retrying");
                ack(msg, AckKind::Nak(Some(Duration::from_secs(5)))).await;
            }
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum RebuildError {
    #[error("reading the catalog stream: {0}")]
    Stream(String),
    #[error(transparent)]
    Db(#[from] sqlx::Error),
}

/// Rebuilds the catalog from the catalog stream alone: reads every
/// product's latest event into a copy of the table while the service keeps
/// pricing from the old one, then replaces the rows in one transaction.
/// What the live watch applied meanwhile (events after the last one read)
/// and a newer version than the stream's are kept; everything else comes
/// from the stream, so a row that was lost, changed by hand or never
/// belonged there is put right. Calls `progress`
/// with (events read, events in the stream); returns the events read.
/// Events that are not valid catalog events are skipped (the watch
/// dead-letters them).
pub async fn rebuild(
    pool: &PgPool,
    js: &jetstream::Context,
    subjects: &Subjects,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<u64, RebuildError> {
    let stream_err = |e: &dyn std::fmt::Display| RebuildError::Stream(e.to_string());
    let mut stream = js
        .get_stream(subjects.catalog_stream())
        .await
        .map_err(|e| stream_err(&e))?;
    let state = stream
        .info()
        .await
        .map_err(|e| stream_err(&e))?
        .state
        .clone();
    let (last, total) = (state.last_sequence, state.messages);
    let mut conn = pool.acquire().await?;
    sqlx::query("DROP TABLE IF EXISTS catalog_rebuild")
        .execute(&mut *conn)
        .await?;
    sqlx::query("CREATE TABLE catalog_rebuild (LIKE catalog INCLUDING ALL)")
        .execute(&mut *conn)
        .await?;
    let mut read_count = 0u64;
    progress(0, total);
    if total > 0 {
        let consumer = stream
            .create_consumer(jetstream::consumer::pull::OrderedConfig {
                filter_subject: subjects.catalog(),
                deliver_policy: DeliverPolicy::All,
                ..Default::default()
            })
            .await
            .map_err(|e| stream_err(&e))?;
        let mut messages = consumer.messages().await.map_err(|e| stream_err(&e))?;
        loop {
            let msg = tokio::time::timeout(READ_TIMEOUT, messages.next())
                .await
                .map_err(|_| stream_err(&"no message within 10 s"))?
                .ok_or_else(|| stream_err(&"the stream ended"))?
                .map_err(|e| stream_err(&e))?;
            let seq = msg.info().map_err(|e| stream_err(&e))?.stream_sequence;
            if let Ok((envelope, product)) = read(subjects, msg.subject.as_str(), &msg.payload) {
                apply(&mut conn, "catalog_rebuild", &envelope, &product, seq).await?;
            }
            read_count += 1;
            progress(read_count.min(total), total);
            if seq >= last {
                break;
            }
        }
    }
    drop(conn);
    let mut tx = pool.begin().await?;
    // Writers (the watch) wait; readers go on reading the old rows.
    sqlx::query("LOCK TABLE catalog IN EXCLUSIVE MODE")
        .execute(&mut *tx)
        .await?;
    // Kept from the old rows: what the live watch applied after the part of
    // the stream read, and any product's newer version (an older event
    // published late takes the place of a product's latest in the stream;
    // the catalog never goes back to an older version).
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "INSERT INTO catalog_rebuild
         SELECT * FROM catalog c WHERE c.stream_seq > $1
             OR EXISTS (SELECT 1 FROM catalog_rebuild r WHERE r.product_id = c.product_id)
         {}",
        newer_wins("catalog_rebuild")
    )))
    .bind(i64::try_from(last).unwrap_or(i64::MAX))
    .execute(&mut *tx)
    .await?;
    sqlx::query("DELETE FROM catalog").execute(&mut *tx).await?;
    sqlx::query("INSERT INTO catalog SELECT * FROM catalog_rebuild")
        .execute(&mut *tx)
        .await?;
    sqlx::query("DROP TABLE catalog_rebuild")
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;
    Ok(read_count)
}
