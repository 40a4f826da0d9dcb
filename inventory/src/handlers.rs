//! Reactions to saga events: reserve on PaymentProcessed; release (the
//! shared compensation) on ShipmentFailed; put back what an operator
//! compensated by hand (OrderManuallyCompensated); release, or never
//! reserve, for an order the customer cancelled (OrderCancelledByCustomer).

use std::collections::BTreeMap;

use common::{
    Applying, Event, Handler, HandlerError, Outcome,
    cancels::{BeforeStep, Cancels, LockRows},
    compensation::{self, Step, StepState, Undone, UndoneBy},
    event::{InventoryReleased, InventoryReservationFailed, InventoryReserved, PaymentProcessed},
};

use sqlx::PgConnection;

use crate::domain::{self, ReservationStatus};
use crate::store::{self, Reservation};

pub struct InventoryHandler {
    pub before: BeforeStep<StockLocks>,
}

/// The stock a batch reserves or releases, locked in product order before
/// the first is touched.
pub struct StockLocks;

impl LockRows for StockLocks {
    async fn lock(
        &self,
        tx: &mut PgConnection,
        steps: &[&Event],
        undoing: &[uuid::Uuid],
    ) -> Result<(), HandlerError> {
        let mut reserved: Vec<&String> = Vec::new();
        for step in steps {
            if let Event::PaymentProcessed(paid) = step {
                reserved.extend(paid.lines.iter().map(|l| &l.product_id));
            }
        }
        Ok(store::lock_stock(tx, &reserved, undoing).await?)
    }
}

impl Handler for InventoryHandler {
    type Before = BeforeStep<StockLocks>;

    fn before(&self) -> &Self::Before {
        &self.before
    }

    async fn handle(
        &self,
        cx: Applying<'_, Cancels>,
        event: Event,
    ) -> Result<Outcome, HandlerError> {
        match event {
            Event::PaymentProcessed(paid) => reserve(cx, paid).await,
            Event::ShipmentFailed(failed) => {
                let (order_id, reason) = (failed.order_id, failed.reason);
                let by = UndoneBy::Saga { reason, with: &() };
                compensation::compensate::<Reservation, _>(cx, order_id, by).await
            }
            other => compensation::undone_from_outside::<Reservation, _>(cx, other, &()).await,
        }
    }
}

async fn reserve(
    cx: Applying<'_, Cancels>,
    paid: PaymentProcessed,
) -> Result<Outcome, HandlerError> {
    let tx = &mut *cx.tx;
    let order_id = paid.order_id;
    if let Some(reason) = cx.prepared.ended(tx, order_id).await? {
        return Ok(Outcome::Skipped(format!(
            "order cancelled before its stock was reserved ({reason}): nothing reserved"
        )));
    }
    let demand = match domain::demand(&paid.lines) {
        Ok(d) => d,
        Err(reason) => return Ok(Outcome::Rejected(reason)),
    };
    let available = store::lock_available(tx, &demand.keys().collect::<Vec<_>>()).await?;
    let decision = domain::decide_reservation(&demand, &available);
    let reservation = Reservation {
        order_id,
        lines: paid.lines,
        status: match decision {
            Ok(()) => ReservationStatus::Reserved,
            Err(_) => ReservationStatus::Failed,
        },
    };
    let reserved = match decision {
        Ok(()) => demand,
        Err(_) => BTreeMap::new(),
    };
    if !store::record_reservation(
        tx,
        &reservation,
        decision.as_ref().err().map(String::as_str),
        &reserved,
    )
    .await?
    {
        return Ok(Outcome::Skipped("order already has a reservation".into()));
    }
    let event = match decision {
        Ok(()) => Event::InventoryReserved(InventoryReserved {
            order_id,
            lines: reservation.lines,
            shipping_address: paid.shipping_address,
        }),
        Err(reason) => {
            Event::InventoryReservationFailed(InventoryReservationFailed { order_id, reason })
        }
    };
    Ok(compensation::step_taken(
        cx.cause,
        &event,
        order_id.to_string(),
    ))
}

/// The release: inventory's compensation, under the order's id.
impl Step for Reservation {
    const NAME: &'static str = "reservation";
    type With = ();

    fn state(&self) -> StepState {
        self.status.step_state()
    }

    async fn record_undone(&self, tx: &mut PgConnection, reason: &str) -> Result<(), HandlerError> {
        let demand = domain::demand(&self.lines).map_err(HandlerError::Permanent)?;
        store::release(tx, self.order_id, &demand, reason).await?;
        Ok(())
    }

    fn undone(self, reason: String) -> Undone {
        let event = Event::InventoryReleased(InventoryReleased {
            order_id: self.order_id,
            lines: self.lines,
            reason,
        });
        Undone {
            event,
            aggregate_id: self.order_id.to_string(),
        }
    }
}
