//! Reactions to saga events: on InventoryReserved, create the shipment, or
//! fail it when the address cannot be delivered to (which starts the
//! compensation); call it off, or never create it, for an order the
//! customer cancelled (OrderCancelledByCustomer, emitting ShipmentCancelled)
//! or an operator resolved (OrderManuallyCompensated: recorded only).

use common::{
    Applying, Event, Handler, HandlerError, Outcome,
    cancels::{BeforeStep, Cancels},
    compensation::{self, Step, StepState, Undone},
    event::{InventoryReserved, ShipmentCancelled, ShipmentCreated, ShipmentFailed},
};
use sqlx::{PgConnection, types::Json};
use uuid::Uuid;

use crate::{
    domain::{self, ShipmentStatus},
    store::{self, Shipment},
};

pub struct ShippingHandler {
    pub before: BeforeStep,
}

impl Handler for ShippingHandler {
    type Before = BeforeStep;

    fn before(&self) -> &BeforeStep {
        &self.before
    }

    async fn handle(
        &self,
        cx: Applying<'_, Cancels>,
        event: Event,
    ) -> Result<Outcome, HandlerError> {
        match event {
            Event::InventoryReserved(reserved) => ship(cx, reserved).await,
            // The customer's cancel calls the shipment off, or makes sure
            // none is ever created; so does an operator's resolution (only
            // recorded: they settled the order by hand).
            other => compensation::undone_from_outside::<Shipment, _>(cx, other, &()).await,
        }
    }
}

/// Calling a shipment off: shipping's compensation, under the shipment's id.
impl Step for Shipment {
    const NAME: &'static str = "shipment";
    type With = ();

    fn state(&self) -> StepState {
        self.status.step_state()
    }

    async fn record_undone(&self, tx: &mut PgConnection, reason: &str) -> Result<(), HandlerError> {
        store::cancel(tx, self.order_id, reason).await?;
        Ok(())
    }

    fn undone(self, reason: String) -> Undone {
        let event = Event::ShipmentCancelled(ShipmentCancelled {
            order_id: self.order_id,
            shipment_id: self.shipment_id,
            reason,
        });
        Undone {
            event,
            aggregate_id: self.shipment_id.to_string(),
        }
    }
}

async fn ship(
    cx: Applying<'_, Cancels>,
    reserved: InventoryReserved,
) -> Result<Outcome, HandlerError> {
    let order_id = reserved.order_id;
    if let Some(reason) = cx.prepared.ended(cx.tx, order_id).await? {
        return Ok(Outcome::Skipped(format!(
            "order cancelled before it was shipped ({reason}): no shipment"
        )));
    }
    let shipment_id = Uuid::now_v7();
    let refusal = domain::validate_address(&reserved.shipping_address).err();
    let shipment = Shipment {
        order_id,
        shipment_id,
        status: match refusal {
            None => ShipmentStatus::Created,
            Some(_) => ShipmentStatus::Failed,
        },
        tracking_number: refusal
            .is_none()
            .then(|| domain::tracking_number(shipment_id)),
        address: Json(reserved.shipping_address),
        reason: refusal,
        created_at: None,
    };
    if !store::record_shipment(cx.tx, &shipment).await? {
        return Ok(Outcome::Skipped("order already has a shipment".into()));
    }
    let event = match (shipment.tracking_number, shipment.reason) {
        (Some(tracking_number), _) => Event::ShipmentCreated(ShipmentCreated {
            order_id,
            shipment_id,
            tracking_number,
        }),
        (None, reason) => Event::ShipmentFailed(ShipmentFailed {
            order_id,
            reason: reason.unwrap_or_default(),
        }),
    };
    Ok(compensation::step_taken(
        cx.cause,
        &event,
        shipment_id.to_string(),
    ))
}
