//! Reactions to saga events: reserve on PaymentProcessed; release (the
//! shared compensation) on ShipmentFailed.

use common::{
    Envelope, Event, Handler, HandlerError, Outcome,
    compensation::{self, STEP_VERSION, StepState},
    event::{InventoryReleased, InventoryReservationFailed, InventoryReserved, PaymentProcessed},
};
use sqlx::PgConnection;
use uuid::Uuid;

use crate::{
    domain::{self, ReservationStatus},
    store::{self, Reservation},
};

pub struct InventoryHandler;

impl Handler for InventoryHandler {
    async fn handle(
        &self,
        tx: &mut PgConnection,
        env: &Envelope,
        event: Event,
    ) -> Result<Outcome, HandlerError> {
        match event {
            Event::PaymentProcessed(p) => reserve(tx, env, p).await,
            Event::ShipmentFailed(e) => {
                compensation::compensate::<Release>(tx, env, e.order_id, e.reason).await
            }
            other => Ok(Outcome::not_handled("inventory", &other)),
        }
    }
}

async fn reserve(
    tx: &mut PgConnection,
    env: &Envelope,
    paid: PaymentProcessed,
) -> Result<Outcome, HandlerError> {
    let order_id = paid.order_id;
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
    if !store::record_reservation(
        tx,
        &reservation,
        decision.as_ref().err().map(String::as_str),
    )
    .await?
    {
        return Ok(Outcome::Skipped("order already has a reservation".into()));
    }
    let event = match decision {
        Ok(()) => {
            store::move_stock(tx, &demand, 1).await?;
            Event::InventoryReserved(InventoryReserved {
                order_id,
                lines: reservation.lines,
                shipping_address: paid.shipping_address,
            })
        }
        Err(reason) => {
            Event::InventoryReservationFailed(InventoryReservationFailed { order_id, reason })
        }
    };
    Ok(Outcome::Applied(vec![Envelope::caused_by(
        env,
        &event,
        order_id.to_string(),
        STEP_VERSION,
    )]))
}

/// The release: inventory's compensation, under the order's id.
struct Release;

impl compensation::Step for Release {
    type Record = Reservation;
    const NAME: &'static str = "reservation";

    async fn lock(tx: &mut PgConnection, order_id: Uuid) -> sqlx::Result<Option<Reservation>> {
        store::lock_reservation(tx, order_id).await
    }

    fn state(reservation: &Reservation) -> StepState {
        reservation.status.step_state()
    }

    async fn undo(
        tx: &mut PgConnection,
        reservation: Reservation,
        reason: String,
    ) -> Result<(Event, String), HandlerError> {
        let demand = domain::demand(&reservation.lines).map_err(HandlerError::Permanent)?;
        store::release(tx, reservation.order_id, &demand, &reason).await?;
        let event = Event::InventoryReleased(InventoryReleased {
            order_id: reservation.order_id,
            lines: reservation.lines,
            reason,
        });
        Ok((event, reservation.order_id.to_string()))
    }
}
