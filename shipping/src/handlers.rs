//! Reaction to InventoryReserved: create the shipment, or fail it when the
//! address cannot be delivered to (which starts the compensation).

use common::{
    Envelope, Event, Handler, HandlerError, Outcome,
    compensation::STEP_VERSION,
    event::{InventoryReserved, ShipmentCreated, ShipmentFailed},
};
use sqlx::{PgConnection, types::Json};
use uuid::Uuid;

use crate::{
    domain::{self, ShipmentStatus},
    store::{self, Shipment},
};

pub struct ShippingHandler;

impl Handler for ShippingHandler {
    async fn handle(
        &self,
        tx: &mut PgConnection,
        env: &Envelope,
        event: Event,
    ) -> Result<Outcome, HandlerError> {
        match event {
            Event::InventoryReserved(reserved) => ship(tx, env, reserved).await,
            other => Ok(Outcome::not_handled("shipping", &other)),
        }
    }
}

async fn ship(
    tx: &mut PgConnection,
    env: &Envelope,
    reserved: InventoryReserved,
) -> Result<Outcome, HandlerError> {
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
    if !store::record_shipment(tx, &shipment).await? {
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
    Ok(Outcome::Applied(vec![Envelope::caused_by(
        env,
        &event,
        shipment_id.to_string(),
        STEP_VERSION,
    )]))
}
