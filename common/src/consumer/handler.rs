//! What a service gives the runtime: a [`Handler`] that applies one event in
//! an open transaction and says what came of it ([`Outcome`]), and what it
//! does to a batch before its events are applied ([`BeforeApply`]).

use std::{future::Future, time::Duration};

use sqlx::{AssertSqlSafe, Connection, PgConnection, PgPool, Postgres, Transaction};

use crate::event::{Envelope, Event};
use crate::meter::Meter;

/// What applying one event came to.
#[derive(Debug)]
pub enum Outcome {
    /// State changed; these events are committed to the outbox with it.
    Applied(Vec<Envelope>),
    /// Nothing to change (the state already reflects the event). Recorded as
    /// consumed so it is never looked at again.
    Skipped(String),
    /// The event depends on one this service has not applied yet (it arrived
    /// early or the other is late). Retried with backoff, then dead-lettered.
    NotYet(String),
    /// Well-formed but can never be applied here: dead-lettered.
    Rejected(String),
    /// An event on the consumer's subjects that its handler has no use for
    /// (published by hand, or a filter that grew): dead-lettered, naming the
    /// consumer and the event's type.
    Unhandled,
}

impl Outcome {
    /// The events it emits, if it is one that is committed (applied or
    /// skipped: skipped emits none).
    pub fn committed(&self) -> Option<&[Envelope]> {
        match self {
            Outcome::Applied(events) => Some(events),
            Outcome::Skipped(_) => Some(&[]),
            Outcome::NotYet(_) | Outcome::Rejected(_) | Outcome::Unhandled => None,
        }
    }
}

/// One event being applied: the open transaction, the envelope the event
/// came in (the cause of whatever the handler emits), and what the
/// service's [`BeforeApply`] prepared for the event's batch.
pub struct Applying<'a, P = ()> {
    pub tx: &'a mut PgConnection,
    pub cause: &'a Envelope,
    pub meter: &'a Meter,
    /// Which delivery of the cause this is (1 for the first).
    pub delivered: i64,
    pub prepared: &'a P,
}

impl<'a, P> Applying<'a, P> {
    /// The same event, with the transaction borrowed again (to hand to a
    /// function that takes an `Applying` and keep using this one after).
    pub fn reborrow(&mut self) -> Applying<'_, P> {
        Applying {
            tx: &mut *self.tx,
            cause: self.cause,
            meter: self.meter,
            delivered: self.delivered,
            prepared: self.prepared,
        }
    }
}

/// Why applying an event failed, short of a domain answer ([`Outcome`]).
#[derive(Debug, thiserror::Error)]
pub enum HandlerError {
    #[error("database error: {0}")]
    Db(#[from] sqlx::Error),
    /// Optimistic concurrency lost against a concurrent writer.
    #[error("concurrent update of {0}; retrying")]
    Conflict(String),
    /// The event can never be applied here, whatever is retried.
    #[error("{0}")]
    Permanent(String),
    /// The broker did not answer a question the handler asked it; retried
    /// like a database that is away.
    #[error("broker: {0}")]
    Broker(String),
    /// A party outside the service (a payment gateway) did not do its part.
    /// The delivery is retried after each delay of `retries` in turn, then
    /// dead-lettered. `report`, an event saying so, is committed to the
    /// outbox on its own (the delivery's transaction is rolled back), so
    /// every failed attempt is on record.
    #[error("{reason}")]
    Unavailable {
        reason: String,
        retries: Vec<Duration>,
        report: Option<Box<Envelope>>,
    },
}

impl HandlerError {
    /// Whether trying again can only fail the same way: a value Postgres
    /// refuses (a NUL in a text, a number out of range), a violated CHECK, a
    /// row that does not decode. Connection losses, timeouts, deadlocks,
    /// serialization failures and lost races are transient.
    pub fn is_permanent(&self) -> bool {
        match self {
            HandlerError::Permanent(_) => true,
            HandlerError::Conflict(_)
            | HandlerError::Unavailable { .. }
            | HandlerError::Broker(_) => false,
            HandlerError::Db(e) => db_error_is_permanent(e),
        }
    }
}

/// Classifies a database error by its kind and SQLSTATE class.
pub fn db_error_is_permanent(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::Database(db) => {
            let code = db.code().unwrap_or_default();
            match code.get(..2).unwrap_or_default() {
                // data exception (22003 out of range, 22021 bad encoding, 22P05 NUL),
                // integrity constraint (CHECK, NOT NULL, foreign key) but not a
                // unique violation, which is a race another attempt resolves
                "22" => true,
                "23" => code != "23505",
                // syntax or access rule, program limit (an index row too large),
                // feature not supported, invalid transaction initiation
                "42" | "54" | "0A" | "2B" => true,
                _ => false,
            }
        }
        sqlx::Error::ColumnDecode { .. }
        | sqlx::Error::Decode(_)
        | sqlx::Error::Encode(_)
        | sqlx::Error::TypeNotFound { .. }
        | sqlx::Error::ColumnNotFound(_)
        | sqlx::Error::ColumnIndexOutOfBounds { .. }
        | sqlx::Error::RowNotFound => true,
        _ => false,
    }
}

/// A service's reaction to the events its consumer receives.
pub trait Handler: Send + Sync + 'static {
    /// What the service does to a batch before its events are applied;
    /// [`NothingBefore`] when it has nothing to do.
    type Before: BeforeApply;

    fn before(&self) -> &Self::Before;

    /// Applies `event` within `cx.tx`. Must not commit, and must do no I/O
    /// outside `tx`: the runtime commits the effect, the guard and the
    /// emitted events together, or none of them. A handler may be run for a
    /// duplicate whose transaction is then rolled back, so it must not act
    /// outside the transaction. A panic is caught: the transaction is rolled
    /// back and the event dead-lettered with the panic's message.
    fn handle<'a>(
        &'a self,
        cx: Applying<'a, Prepared<Self>>,
        event: Event,
    ) -> impl Future<Output = Result<Outcome, HandlerError>> + Send + 'a;
}

/// What a handler's [`BeforeApply`] prepares for a batch.
pub type Prepared<H> = <<H as Handler>::Before as BeforeApply>::Prepared;

/// An event of a batch as it arrives, before anything is applied.
#[derive(Clone, Copy)]
pub struct Arriving<'a> {
    pub event: &'a Event,
    /// Whether the stream held nothing else for this consumer when the
    /// event was first delivered (and this is that delivery): nothing
    /// published before it can be waiting behind it.
    pub nothing_behind: bool,
}

/// What the runtime calls for each batch before applying its events (a
/// single event is a batch of one): once when the batch arrives, to start
/// whatever it asks outside the database while the events are claimed;
/// then to begin the batch's transaction. What it prepares is handed to
/// the handler with every event of the batch ([`Applying::prepared`]).
pub trait BeforeApply: Send + Sync + 'static {
    type Prepared: Send + Sync + 'static;

    /// Called as soon as the batch arrives; must not wait (it may start
    /// work in the background, which [`BeforeApply::begin`] awaits).
    fn arrived(&self, batch: &[Arriving<'_>]) -> Self::Prepared;

    /// Begins the transaction the events of `batch` (those not applied
    /// already) are applied in, on `conn` (the lane's connection; `pool`
    /// is for what cannot be done on it), waiting for no lock longer than
    /// `lock_timeout` (`None`: as long as it takes); with what the events
    /// are to be applied with, starting from what `arrived` prepared.
    fn begin<'a>(
        &'a self,
        pool: &'a PgPool,
        conn: &'a mut PgConnection,
        lock_timeout: Option<Duration>,
        batch: &'a [&'a Event],
        prepared: &'a Self::Prepared,
    ) -> impl Future<Output = Result<(Transaction<'a, Postgres>, Self::Prepared), HandlerError>>
    + Send
    + 'a;
}

/// Nothing before applying: the transaction begins, and that is all.
pub struct NothingBefore;

impl BeforeApply for NothingBefore {
    type Prepared = ();

    fn arrived(&self, _batch: &[Arriving<'_>]) {}

    async fn begin<'a>(
        &'a self,
        _pool: &'a PgPool,
        conn: &'a mut PgConnection,
        lock_timeout: Option<Duration>,
        _batch: &'a [&'a Event],
        _prepared: &'a (),
    ) -> Result<(Transaction<'a, Postgres>, ()), HandlerError> {
        let first = format!("SELECT {GENERIC_PLANS};");
        Ok((begin(conn, lock_timeout, &first).await?, ()))
    }
}

/// What makes the statements of a consumer transaction use generic plans,
/// as an expression for the first statement of its [`begin`]: they look
/// rows up by key, and no key changes what the best plan is. For a lookup
/// of an array of keys (`= ANY($1)`) Postgres would otherwise make a
/// custom plan on every call, which takes about as long as the lookup
/// (the order service's load of an order's snapshot and events: 0.15 ms
/// of planning each). Part of a statement the transaction's beginning runs
/// anyway where there is one: a statement of its own costs a fifth of that.
pub const GENERIC_PLANS: &str = "set_config('plan_cache_mode', 'force_generic_plan', true)";

/// A transaction begun on `conn` with `lock_timeout`, after `first` (SQL
/// statements ending in `;`, or nothing) ran in the same round trip, in
/// the implicit transaction that `BEGIN` turns into the one returned. Should
/// `first` fail, `BEGIN` never runs: the connection is left outside any
/// transaction. (After a `BEGIN; …` whose later statement
/// failed it would stay in the aborted transaction, which sqlx does not
/// roll back, and fail every transaction begun on it from then on.)
///
/// `first` is the caller's SQL: constants, and values printed by their
/// types (uuids), never input.
pub async fn begin<'c>(
    conn: &'c mut PgConnection,
    lock_timeout: Option<Duration>,
    first: &str,
) -> sqlx::Result<Transaction<'c, Postgres>> {
    conn.begin_with(AssertSqlSafe(begin_sql(lock_timeout, first)))
        .await
}

/// As [`begin`], on a connection from `pool` (given back to it when the
/// transaction ends).
pub async fn begin_pooled(
    pool: &PgPool,
    lock_timeout: Option<Duration>,
    first: &str,
) -> sqlx::Result<Transaction<'static, Postgres>> {
    pool.begin_with(AssertSqlSafe(begin_sql(lock_timeout, first)))
        .await
}

fn begin_sql(lock_timeout: Option<Duration>, first: &str) -> String {
    let settings = match lock_timeout {
        Some(t) => format!(
            "SELECT set_config('lock_timeout', '{}ms', true); ",
            t.as_millis().max(1)
        ),
        None => String::new(),
    };
    format!("{settings}{first} BEGIN")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lost_connections_are_transient_and_undecodable_rows_permanent() {
        assert!(!HandlerError::Db(sqlx::Error::PoolTimedOut).is_permanent());
        assert!(!HandlerError::Conflict("o1".into()).is_permanent());
        assert!(HandlerError::Db(sqlx::Error::RowNotFound).is_permanent());
        assert!(HandlerError::Permanent("bad".into()).is_permanent());
    }
}
