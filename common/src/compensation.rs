//! Compensating a saga step, the one way every service does it (payment's
//! refund, inventory's release, shipping's cancelled shipment): lock the
//! step's record, wait if the step has not happened here yet, decide from its
//! status whether there is anything to undo, undo it, and emit one event
//! caused by the request.
//!
//! The customer's cancel reaches every service at once, whatever step the
//! saga is at: a service that took its step undoes it; one that has not
//! records that it never will ([`crate::cancels::Cancels::ended`] is what its forward step
//! asks first). Both hold the order for their transaction, so a cancel and
//! the step it races take turns, and exactly one of them finds the other's
//! work done. An operator's resolution (the order compensated by hand) is
//! such a cancel too, for every step not yet taken: the saga is closed for
//! good, and a dead letter redriven after it moves nothing.
//!
//! A step's record emits at most two events, under the record's own
//! aggregate id: the step's outcome ([`STEP_VERSION`]) and its
//! compensation ([`COMPENSATION_VERSION`]).

use sqlx::{
    FromRow, PgConnection, Postgres,
    postgres::{PgArguments, PgRow},
    query::Query,
};
use uuid::Uuid;

use crate::{
    cancels::hold_order,
    consumer::{Applying, HandlerError, Outcome},
    event::{Envelope, Event},
};

/// Version of the event that records a step's outcome.
pub const STEP_VERSION: i64 = 1;
/// Version of the event that records its compensation.
pub const COMPENSATION_VERSION: i64 = 2;

/// A forward step's outcome: `event`, emitted under `aggregate_id` as the
/// first event of that aggregate ([`STEP_VERSION`]), caused by `cause`.
pub fn step_taken(cause: &Envelope, event: &Event, aggregate_id: String) -> Outcome {
    Outcome::Applied(vec![Envelope::caused_by(
        cause,
        event,
        aggregate_id,
        STEP_VERSION,
    )])
}

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
pub struct Undone {
    pub event: Event,
    pub aggregate_id: String,
}

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
    fn undone(self, reason: String) -> Undone;

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
    fn undo<P: Sync>(
        self,
        cx: Applying<'_, P>,
        reason: String,
        _with: &Self::With,
    ) -> impl Future<Output = Result<Undone, HandlerError>> + Send {
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

/// Who undoes a step.
pub enum UndoneBy<'a, S: Step> {
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
/// taken if it was not (see [`UndoneBy::Customer`]).
pub async fn cancelled_by_customer<S: Step, P: Sync>(
    cx: Applying<'_, P>,
    cancelled: &crate::event::OrderCancelledByCustomer,
    with: &S::With,
) -> Result<Outcome, HandlerError> {
    let by = UndoneBy::Customer {
        reason: cancelled.step_reason(),
        with,
    };
    compensate::<S, P>(cx, cancelled.order_id, by).await
}

/// What undoes step `S` from outside the saga's chain of failures, for a
/// step an operator can compensate by hand: the operator's compensation
/// ([`UndoneBy::Hand`]) or the customer's cancel ([`cancelled_by_customer`]).
/// Any other event is not for `S`: [`Outcome::Unhandled`].
pub async fn undone_from_outside<S: Step, P: Sync>(
    cx: Applying<'_, P>,
    event: Event,
    with: &S::With,
) -> Result<Outcome, HandlerError> {
    match event {
        Event::OrderManuallyCompensated(resolved) => {
            compensated_by_hand::<S, P>(cx, &resolved).await
        }
        Event::OrderCancelledByCustomer(cancelled) => {
            cancelled_by_customer::<S, P>(cx, &cancelled, with).await
        }
        _ => Ok(Outcome::Unhandled),
    }
}

/// An operator's compensation by hand reaching step `S`: recorded as undone
/// if it was taken (see [`UndoneBy::Hand`]).
async fn compensated_by_hand<S: Step, P: Sync>(
    cx: Applying<'_, P>,
    resolved: &crate::event::OrderManuallyCompensated,
) -> Result<Outcome, HandlerError> {
    let by = UndoneBy::Hand {
        reason: resolved.reason(),
    };
    compensate::<S, P>(cx, resolved.order_id, by).await
}

/// Records that this service's step for `order_id` is never to be taken
/// (the order ended from outside its saga first), for [`crate::cancels::Cancels::ended`].
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
pub async fn compensate<S: Step, P: Sync>(
    mut cx: Applying<'_, P>,
    order_id: Uuid,
    by: UndoneBy<'_, S>,
) -> Result<Outcome, HandlerError> {
    if let UndoneBy::Customer { .. } | UndoneBy::Hand { .. } = by {
        hold_order(cx.tx, order_id).await?;
    }
    let Some(record) = lock::<S>(cx.tx, order_id).await? else {
        return Ok(match by {
            // The request overtook the step it undoes: retried until it is here.
            UndoneBy::Saga { .. } => {
                Outcome::NotYet(format!("no {} for order {order_id} yet", S::NAME))
            }
            UndoneBy::Customer { reason, with } => {
                S::call_off(order_id, with).await?;
                never_taken(cx.tx, order_id, &reason).await?;
                Outcome::Skipped(format!(
                    "no {} for order {order_id}: none will be made",
                    S::NAME
                ))
            }
            UndoneBy::Hand { reason } => {
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
        (Compensation::Undo, UndoneBy::Hand { reason }) => {
            record.record_undone(cx.tx, &reason).await?;
            Ok(Outcome::Applied(Vec::new()))
        }
        (
            Compensation::Undo,
            UndoneBy::Saga { reason, with } | UndoneBy::Customer { reason, with },
        ) => {
            let undone = record.undo(cx.reborrow(), reason, with).await;
            cx.meter.compensation(S::NAME, undone.is_err());
            let Undone {
                event,
                aggregate_id,
            } = undone?;
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
