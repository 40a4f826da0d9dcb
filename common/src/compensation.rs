//! Compensating a saga step, the one way every service does it (payment's
//! refund, inventory's release): lock the step's record, wait if the step has
//! not happened here yet, decide from its status whether there is anything
//! to undo, undo it, and emit one event caused by the request.
//!
//! A step's record emits at most two events, under the record's own
//! aggregate id: the step's outcome ([`STEP_VERSION`]) and its
//! compensation ([`COMPENSATION_VERSION`]).

use sqlx::PgConnection;
use uuid::Uuid;

use crate::{Envelope, Event, HandlerError, Outcome};

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

/// A step some service records per order and can undo.
pub trait Step {
    /// The record, as loaded under a row lock.
    type Record: Send;
    /// `payment`, `reservation`: how messages name it.
    const NAME: &'static str;

    /// The order's record, locked for this transaction; `None` if the step
    /// has not happened here (yet).
    fn lock(
        tx: &mut PgConnection,
        order_id: Uuid,
    ) -> impl Future<Output = Result<Option<Self::Record>, sqlx::Error>> + Send;

    fn state(record: &Self::Record) -> StepState;

    /// Undoes the step (stores the compensation) and returns the event that
    /// says so, with the aggregate id it is emitted under.
    fn undo(
        tx: &mut PgConnection,
        record: Self::Record,
        reason: String,
    ) -> impl Future<Output = Result<(Event, String), HandlerError>> + Send;
}

/// Handles a request to compensate `S` for `order_id`, caused by `cause`.
pub async fn compensate<S: Step>(
    tx: &mut PgConnection,
    cause: &Envelope,
    order_id: Uuid,
    reason: String,
) -> Result<Outcome, HandlerError> {
    let Some(record) = S::lock(tx, order_id).await? else {
        // The request overtook the step it undoes: retried until it is here.
        return Ok(Outcome::NotYet(format!(
            "no {} for order {order_id} yet",
            S::NAME
        )));
    };
    match decide(S::state(&record)) {
        Compensation::AlreadyUndone => {
            Ok(Outcome::Skipped(format!("{} already compensated", S::NAME)))
        }
        Compensation::NothingToUndo => Ok(Outcome::Skipped(format!(
            "{} was refused; nothing to compensate",
            S::NAME
        ))),
        Compensation::Undo => {
            let (event, aggregate_id) = S::undo(tx, record, reason).await?;
            Ok(Outcome::Applied(vec![Envelope::caused_by(
                cause,
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
