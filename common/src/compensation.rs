//! Compensating a saga step, the one way every service does it (payment's
//! refund, inventory's release, shipping's cancelled shipment): lock the
//! step's record, wait if the step has not happened here yet, decide from its
//! status whether there is anything to undo, undo it, and emit one event
//! caused by the request.
//!
//! The customer's cancel reaches every service at once, whatever step the
//! saga is at: a service that took its step undoes it; one that has not
//! records that it never will ([`Cancels::before`] is what its forward step
//! asks first). Both hold the order for their transaction, so a cancel and
//! the step it races take turns, and exactly one of them finds the other's
//! work done. An operator's resolution (the order compensated by hand) is
//! such a cancel too, for every step not yet taken: the saga is closed for
//! good, and a dead letter redriven after it moves nothing.
//!
//! A step's record emits at most two events, under the record's own
//! aggregate id: the step's outcome ([`STEP_VERSION`]) and its
//! compensation ([`COMPENSATION_VERSION`]).

use std::{collections::HashMap, sync::Arc, time::Duration};

use futures::{
    FutureExt, StreamExt,
    future::{BoxFuture, Shared},
};
use sqlx::{
    AssertSqlSafe, FromRow, PgConnection, PgPool, Postgres, Transaction,
    postgres::{PgArguments, PgRow},
    query::Query,
};
use uuid::Uuid;

use async_nats::jetstream::stream::LastRawMessageErrorKind;

use crate::{Applying, Envelope, Event, HandlerError, Outcome, Subjects};

/// Version of the event that records a step's outcome.
pub const STEP_VERSION: i64 = 1;
/// Version of the event that records its compensation.
pub const COMPENSATION_VERSION: i64 = 2;

/// Where a step stands, as far as compensating it goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StepState {
    /// The step took effect: there is something to undo.
    Done,
    /// The step was refused: nothing took effect.
    Refused,
    /// Already undone, once and only once.
    Compensated,
}

/// What a compensation request does to a step in `state`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compensation {
    Undo,
    AlreadyUndone,
    NothingToUndo,
}

/// Pure: only a step that took effect is undone, and only once.
pub fn decide(state: StepState) -> Compensation {
    match state {
        StepState::Done => Compensation::Undo,
        StepState::Compensated => Compensation::AlreadyUndone,
        StepState::Refused => Compensation::NothingToUndo,
    }
}

/// What undoing a step comes to: the event that says so, and the aggregate
/// id it is emitted under.
pub type Undone = Result<(Event, String), HandlerError>;

/// The record of a step that some service keeps per order and can undo.
/// It is stored in a table named for the step in the plural (`payments`,
/// `reservations`), one row per `order_id`, and loaded from it by name.
pub trait Step: for<'r> FromRow<'r, PgRow> + Send + Sync + Unpin {
    /// `payment`, `reservation`: how messages and the table name it.
    const NAME: &'static str;

    /// What undoing needs besides the transaction: payment's gateway;
    /// `()` for a step undone in the database alone.
    type With: ?Sized + Sync;

    fn state(&self) -> StepState;

    /// Records in the database that the step was undone (the balance
    /// credited, the stock put back), and nothing else.
    fn record_undone(
        &self,
        tx: &mut PgConnection,
        reason: &str,
    ) -> impl Future<Output = Result<(), HandlerError>> + Send;

    /// The event that says the step was undone for `reason`, and the
    /// aggregate id it is emitted under.
    fn undone(self, reason: String) -> (Event, String);

    /// Makes sure the step for `order_id` never takes effect outside the
    /// database, when the customer calls it off before its record was
    /// written. A step that acts outside may have acted already although
    /// its transaction never committed (a charge the gateway carried out
    /// but whose answer was lost): payment voids the payment id. By
    /// default a step acts in the database alone, and there is nothing to
    /// call off.
    fn call_off(
        order_id: Uuid,
        with: &Self::With,
    ) -> impl Future<Output = Result<(), HandlerError>> + Send {
        let _ = (order_id, with);
        async { Ok(()) }
    }

    /// Undoes the step in the open transaction of `cx` and says so. By
    /// default the step lives in the database alone:
    /// [`record_undone`](Step::record_undone), then [`undone`](Step::undone).
    /// A step that took effect outside (a payment gateway) undoes it there
    /// first.
    fn undo(
        self,
        cx: Applying<'_>,
        reason: String,
        _with: &Self::With,
    ) -> impl Future<Output = Undone> + Send {
        async move {
            self.record_undone(cx.tx, &reason).await?;
            Ok(self.undone(reason))
        }
    }
}

/// Writes a step's record with `insert`, an `INSERT … ON CONFLICT
/// (order_id) DO NOTHING` into the step's table: `false` if the order
/// already had one (a redelivery, or a race lost), which then changes nothing.
pub async fn record_once(
    tx: &mut PgConnection,
    insert: Query<'_, Postgres, PgArguments>,
) -> sqlx::Result<bool> {
    Ok(insert.execute(tx).await?.rows_affected() == 1)
}

/// The order's record of step `S`, locked for this transaction; `None` if
/// the step has not happened here (yet).
pub async fn lock<S: Step>(tx: &mut PgConnection, order_id: Uuid) -> sqlx::Result<Option<S>> {
    let sql = format!("SELECT * FROM {}s WHERE order_id = $1 FOR UPDATE", S::NAME);
    sqlx::query_as(sqlx::AssertSqlSafe(sql.as_str()))
        .bind(order_id)
        .fetch_optional(tx)
        .await
}

/// Holds `order_id` for this transaction (an advisory lock): a service's
/// forward step for the order and the customer's cancel of it take turns.
/// The lock is the database's `hold_orders` (a common migration), which
/// [`Cancels::begin`] takes too.
pub async fn hold_order(tx: &mut PgConnection, order_id: Uuid) -> sqlx::Result<()> {
    sqlx::query("SELECT hold_orders($1)")
        .bind([order_id].as_slice())
        .execute(tx)
        .await?;
    Ok(())
}

/// The SQLSTATE `hold_orders_not_cancelled` fails with when a cancel is
/// recorded for an order it held.
const CANCEL_RECORDED: &str = "SG001";

/// How long asking the broker for an order's cancel may take.
const LOOKUP_TIMEOUT: Duration = Duration::from_secs(2);
/// Most questions to the broker a batch has open at once.
const LOOKUPS_AT_ONCE: usize = 32;

/// Where a service learns that an order ended from outside its saga before
/// it took its step — the customer cancelled it, or an operator resolved
/// it: its own record (it heard of it first), or the stream, which keeps
/// every cancel and resolution under a subject of its own per order (one
/// may be queued behind the event being applied, when the service was
/// away, or the event may be a dead letter redriven after the resolution:
/// it still charges, reserves or ships nothing).
#[derive(Clone)]
pub struct Cancels {
    js: async_nats::jetstream::Context,
    subjects: Subjects,
    /// The stream's answers for the orders whose steps are about to be
    /// taken, asked as soon as their events were taken
    /// ([`Cancels::ask_ahead`]).
    answered: Option<Answers>,
    /// Orders the transaction holds already, with the cancel this service
    /// recorded for each, read once the hold was taken ([`Cancels::begin`]).
    held: Arc<HashMap<Uuid, Option<String>>>,
}

/// The stream's answers, once they are all in; an order it did not answer
/// for is not among them.
type Answers = Shared<BoxFuture<'static, Arc<HashMap<Uuid, Option<String>>>>>;

impl Cancels {
    pub fn new(js: async_nats::jetstream::Context, subjects: Subjects) -> Cancels {
        Cancels {
            js,
            subjects,
            answered: None,
            held: Arc::default(),
        }
    }

    /// These cancels with the stream asked, in the background and all at
    /// once, about `orders` (the orders whose steps are about to be taken):
    /// the answers come while the Redis claim is made and the transaction
    /// begins, instead of one by one inside it. An order the broker did not
    /// answer for is asked again when its step asks, as if alone. The
    /// stream is not asked about `clear` (orders it cannot hold a cancel
    /// for that was published before their steps were taken), unless they
    /// are among `orders` too.
    ///
    /// Asking before the transaction instead of in it changes nothing a
    /// step can observe: the answer is still about the cancels published
    /// before the step was taken, and a cancel published after it (like
    /// one published after the step committed) finds the step done and
    /// undoes it.
    pub fn ask_ahead(&self, orders: Vec<Uuid>, clear: Vec<Uuid>) -> Cancels {
        let mut orders = orders;
        if orders.is_empty() && clear.is_empty() {
            return Cancels {
                answered: None,
                ..self.clone()
            };
        }
        orders.sort_unstable();
        orders.dedup();
        let clear: HashMap<Uuid, Option<String>> = clear
            .into_iter()
            .filter(|id| orders.binary_search(id).is_err())
            .map(|id| (id, None))
            .collect();
        let answered = if orders.is_empty() {
            futures::future::ready(Arc::new(clear)).boxed()
        } else {
            let asking = self.clone();
            let task = tokio::spawn(async move {
                let mut answers = clear;
                let asked: Vec<(Uuid, Option<String>)> = futures::stream::iter(orders)
                    .map(|order_id| {
                        let asking = &asking;
                        async move { (order_id, asking.in_stream(order_id).await) }
                    })
                    .buffer_unordered(LOOKUPS_AT_ONCE)
                    .filter_map(|(order_id, answer)| async move { Some((order_id, answer.ok()?)) })
                    .collect()
                    .await;
                answers.extend(asked);
                answers
            });
            async move { Arc::new(task.await.unwrap_or_default()) }.boxed()
        };
        Cancels {
            answered: Some(answered.shared()),
            ..self.clone()
        }
    }

    /// Waits until the stream has answered what [`Cancels::ask_ahead`]
    /// asked (or given up): a batch waits before it takes its locks, not
    /// while it holds them.
    pub async fn answers(&self) {
        if let Some(answered) = &self.answered {
            answered.clone().await;
        }
    }

    /// A transaction begun on `pool` that holds `orders` from its first
    /// statement (see [`hold_order`]), waits for no lock longer than
    /// `lock_timeout` (`None`: as long as it takes), and these cancels with
    /// this service's record of the orders' cancels, read once every hold
    /// was taken: what the steps the transaction takes for them would each
    /// ask in turn.
    ///
    /// One round trip when no cancel is recorded for them (the rule): the
    /// holds and the check run before the transaction's `BEGIN`, in the
    /// implicit transaction of the same simple query, which `BEGIN` turns
    /// into the transaction returned, holds included. Should a hold fail
    /// (a lock timeout, a deadlock), that implicit transaction rolls back
    /// and `BEGIN` never runs: the connection goes back to the pool outside
    /// any transaction. (After a `BEGIN; …` whose later statement failed it
    /// would stay in the aborted transaction, which sqlx does not roll back,
    /// and fail every transaction begun on it from then on.)
    ///
    /// Only for orders the transaction has nothing else to apply for: an
    /// event that records a cancel would leave the answer stale.
    pub async fn begin(
        &self,
        pool: &PgPool,
        lock_timeout: Option<Duration>,
        orders: &[Uuid],
    ) -> sqlx::Result<(Transaction<'static, Postgres>, Cancels)> {
        let settings = match lock_timeout {
            Some(t) => format!(
                "SELECT set_config('lock_timeout', '{}ms', true); ",
                t.as_millis().max(1)
            ),
            None => String::new(),
        };
        let mut orders = orders.to_vec();
        orders.sort_unstable();
        orders.dedup();
        if orders.is_empty() {
            let tx = pool.begin_with(AssertSqlSafe(format!("{settings}BEGIN")));
            return Ok((tx.await?, self.clone()));
        }
        // The ids are uuids, printed by their type: nothing else reaches
        // the statement.
        let ids: Vec<String> = orders.iter().map(Uuid::to_string).collect();
        let ids = format!("'{{{}}}'::uuid[]", ids.join(","));
        let begun = pool
            .begin_with(AssertSqlSafe(format!(
                "{settings}SELECT hold_orders_not_cancelled({ids}); BEGIN"
            )))
            .await;
        let (tx, recorded) = match begun {
            Ok(tx) => (tx, Vec::new()),
            Err(e)
                if e.as_database_error().and_then(|e| e.code()).as_deref()
                    == Some(CANCEL_RECORDED) =>
            {
                // A cancel is recorded for one of them: which, and why. A
                // statement of its own, so its snapshot is taken after the
                // holds.
                let mut tx = pool
                    .begin_with(AssertSqlSafe(format!(
                        "{settings}SELECT hold_orders({ids}); BEGIN"
                    )))
                    .await?;
                let recorded: Vec<(Uuid, String)> = sqlx::query_as(
                    "SELECT order_id, reason FROM cancelled_orders WHERE order_id = ANY($1)",
                )
                .bind(&orders)
                .fetch_all(&mut *tx)
                .await?;
                (tx, recorded)
            }
            Err(e) => return Err(e),
        };
        let mut held: HashMap<Uuid, Option<String>> =
            orders.into_iter().map(|id| (id, None)).collect();
        for (id, reason) in recorded {
            held.insert(id, Some(reason));
        }
        Ok((
            tx,
            Cancels {
                held: Arc::new(held),
                ..self.clone()
            },
        ))
    }

    /// What a forward step asks first: holds the order (see
    /// [`hold_order`]) and says why the customer cancelled it, if they did.
    /// The step is then not taken.
    pub async fn before(
        &self,
        tx: &mut PgConnection,
        order_id: Uuid,
    ) -> Result<Option<String>, HandlerError> {
        let recorded = match self.held.get(&order_id) {
            Some(recorded) => recorded.clone(),
            None => {
                hold_order(tx, order_id).await?;
                sqlx::query_scalar("SELECT reason FROM cancelled_orders WHERE order_id = $1")
                    .bind(order_id)
                    .fetch_optional(&mut *tx)
                    .await?
            }
        };
        if recorded.is_some() {
            return Ok(recorded);
        }
        if let Some(answered) = &self.answered
            && let Some(answer) = answered.clone().await.get(&order_id)
        {
            return Ok(answer.clone());
        }
        self.in_stream(order_id).await
    }

    /// Why `order_id` ended from outside its saga, if the stream holds the
    /// customer's cancel or the operator's resolution (at most one of them
    /// exists: only a pending order is cancelled by its customer, only one
    /// that requires intervention is resolved).
    async fn in_stream(&self, order_id: Uuid) -> Result<Option<String>, HandlerError> {
        let subject = self.subjects.ended_from_outside(order_id);
        let stream = self
            .js
            .get_stream_no_info(self.subjects.events_stream())
            .await
            .map_err(|e| HandlerError::Broker(e.to_string()))?;
        let found = tokio::time::timeout(
            LOOKUP_TIMEOUT,
            stream.get_last_raw_message_by_subject(&subject),
        )
        .await
        .map_err(|_| HandlerError::Broker(format!("no answer on {subject} in time")))?;
        match found {
            Ok(message) => match Envelope::decode(&message.payload) {
                Ok((_, Event::OrderCancelledByCustomer(cancel))) if cancel.order_id == order_id => {
                    Ok(Some(cancel.step_reason()))
                }
                Ok((_, Event::OrderManuallyCompensated(resolved)))
                    if resolved.order_id == order_id =>
                {
                    Ok(Some(resolved.reason()))
                }
                // Not an ending of this order (forged or garbage): the
                // consumer that gets it dead-letters it; it cancels nothing here.
                _ => Ok(None),
            },
            Err(e) if e.kind() == LastRawMessageErrorKind::NoMessageFound => Ok(None),
            Err(e) => Err(HandlerError::Broker(format!("looking up {subject}: {e}"))),
        }
    }
}

/// Who undoes a step.
pub enum By<'a, S: Step> {
    /// The saga's compensation, asked for by a failure downstream: undone
    /// with what it takes (`with`), and said so with an event.
    Saga { reason: String, with: &'a S::With },
    /// An operator, who did it by hand (OrderManuallyCompensated): only
    /// recorded, and nothing emitted (the order has ended; nobody is to
    /// react). A resolution closes the saga for good: a step not taken yet
    /// is recorded as one never to be taken, like the customer's cancel
    /// (a dead letter of its event, redriven later, takes nothing).
    Hand { reason: String },
    /// The customer cancelled the order (OrderCancelledByCustomer): undone
    /// like the saga's compensation if the step was taken; if not, it never
    /// will be.
    Customer { reason: String, with: &'a S::With },
}

/// The customer's cancel reaching step `S`: undone if it was taken, never
/// taken if it was not (see [`By::Customer`]).
pub async fn cancelled_by_customer<S: Step>(
    cx: Applying<'_>,
    cancelled: &crate::event::OrderCancelledByCustomer,
    with: &S::With,
) -> Result<Outcome, HandlerError> {
    let by = By::Customer {
        reason: cancelled.step_reason(),
        with,
    };
    compensate::<S>(cx, cancelled.order_id, by).await
}

/// What undoes step `S` from outside the saga's chain of failures, for a
/// step an operator can compensate by hand: the operator's compensation
/// ([`By::Hand`]) or the customer's cancel ([`cancelled_by_customer`]).
/// Any other event is not for `S`: [`Outcome::Unhandled`].
pub async fn undone_from_outside<S: Step>(
    cx: Applying<'_>,
    event: Event,
    with: &S::With,
) -> Result<Outcome, HandlerError> {
    match event {
        Event::OrderManuallyCompensated(resolved) => compensated_by_hand::<S>(cx, &resolved).await,
        Event::OrderCancelledByCustomer(cancelled) => {
            cancelled_by_customer::<S>(cx, &cancelled, with).await
        }
        _ => Ok(Outcome::Unhandled),
    }
}

/// An operator's compensation by hand reaching step `S`: recorded as undone
/// if it was taken (see [`By::Hand`]).
async fn compensated_by_hand<S: Step>(
    cx: Applying<'_>,
    resolved: &crate::event::OrderManuallyCompensated,
) -> Result<Outcome, HandlerError> {
    let by = By::Hand {
        reason: resolved.reason(),
    };
    compensate::<S>(cx, resolved.order_id, by).await
}

/// Records that this service's step for `order_id` is never to be taken
/// (the order ended from outside its saga first), for [`Cancels::before`].
async fn never_taken(tx: &mut PgConnection, order_id: Uuid, reason: &str) -> sqlx::Result<()> {
    sqlx::query(
        "INSERT INTO cancelled_orders (order_id, reason) VALUES ($1, $2)
         ON CONFLICT (order_id) DO NOTHING",
    )
    .bind(order_id)
    .bind(reason)
    .execute(tx)
    .await?;
    Ok(())
}

/// Undoes step `S` for `order_id`, once, and only if it took effect.
pub async fn compensate<S: Step>(
    cx: Applying<'_>,
    order_id: Uuid,
    by: By<'_, S>,
) -> Result<Outcome, HandlerError> {
    if let By::Customer { .. } | By::Hand { .. } = by {
        hold_order(cx.tx, order_id).await?;
    }
    let Some(record) = lock::<S>(cx.tx, order_id).await? else {
        return Ok(match by {
            // The request overtook the step it undoes: retried until it is here.
            By::Saga { .. } => Outcome::NotYet(format!("no {} for order {order_id} yet", S::NAME)),
            By::Customer { reason, with } => {
                S::call_off(order_id, with).await?;
                never_taken(cx.tx, order_id, &reason).await?;
                Outcome::Skipped(format!(
                    "no {} for order {order_id}: none will be made",
                    S::NAME
                ))
            }
            By::Hand { reason } => {
                never_taken(cx.tx, order_id, &reason).await?;
                Outcome::Skipped(format!(
                    "no {} for order {order_id}: none will be made (resolved by hand)",
                    S::NAME
                ))
            }
        });
    };
    match (decide(record.state()), by) {
        (Compensation::AlreadyUndone, _) => {
            Ok(Outcome::Skipped(format!("{} already compensated", S::NAME)))
        }
        (Compensation::NothingToUndo, _) => Ok(Outcome::Skipped(format!(
            "{} was refused; nothing to compensate",
            S::NAME
        ))),
        (Compensation::Undo, By::Hand { reason }) => {
            record.record_undone(cx.tx, &reason).await?;
            Ok(Outcome::Applied(Vec::new()))
        }
        (Compensation::Undo, By::Saga { reason, with } | By::Customer { reason, with }) => {
            let undoing = Applying {
                tx: &mut *cx.tx,
                cause: cx.cause,
                meter: cx.meter,
                delivered: cx.delivered,
                cancels: cx.cancels,
            };
            let undone = record.undo(undoing, reason, with).await;
            cx.meter.compensation(S::NAME, undone.is_err());
            let (event, aggregate_id) = undone?;
            Ok(Outcome::Applied(vec![Envelope::caused_by(
                cx.cause,
                &event,
                aggregate_id,
                COMPENSATION_VERSION,
            )]))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_step_that_took_effect_is_undone_and_only_once() {
        assert_eq!(decide(StepState::Done), Compensation::Undo);
        assert_eq!(decide(StepState::Compensated), Compensation::AlreadyUndone);
        assert_eq!(decide(StepState::Refused), Compensation::NothingToUndo);
    }
}
