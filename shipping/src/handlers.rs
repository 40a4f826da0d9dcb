//! Reaction to InventoryReserved: create the shipment, or fail it when the
//! address cannot be delivered to (which starts the compensation).

use common::{
    Applying, Event, Handler, HandlerError, Outcome,
    event::{InventoryReserved, ShipmentCreated, ShipmentFailed},
};
use sqlx::types::Json;
use uuid::Uuid;

use crate::{
    domain::{self, ShipmentStatus},
    store::{self, Shipment},
};

pub struct ShippingHandler;

impl Handler for ShippingHandler {
    async fn handle(&self, cx: Applying<'_>, event: Event) -> Result<Outcome, HandlerError> {
        let Event::InventoryReserved(reserved) = event else {
            return Ok(Outcome::Unhandled);
        };
        ship(cx, reserved).await
    }
}

async fn ship(cx: Applying<'_>, reserved: InventoryReserved) -> Result<Outcome, HandlerError> {
    let order_id = reserved.order_id;
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
    Ok(cx.emit(&event, shipment_id.to_string()))
}
