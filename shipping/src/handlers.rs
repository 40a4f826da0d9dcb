//! Reaction to InventoryReserved: create the shipment, or fail it when the
//! address cannot be delivered to (which starts the compensation).

use common::{
    Envelope, Event, Handler, HandlerError, Outcome,
    event::{InventoryReserved, ShipmentCreated, ShipmentFailed},
};
use sqlx::{PgConnection, types::Json};
use uuid::Uuid;

use crate::domain;

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
    let shipment_id = Uuid::now_v7();
    let order_id = reserved.order_id;
    let (event, status, tracking, reason) =
        match domain::validate_address(&reserved.shipping_address) {
            Ok(()) => {
                let tracking_number = domain::tracking_number(shipment_id);
                let event = Event::ShipmentCreated(ShipmentCreated {
                    order_id,
                    shipment_id,
                    tracking_number: tracking_number.clone(),
                });
                (event, "created", Some(tracking_number), None)
            }
            Err(reason) => {
                let event = Event::ShipmentFailed(ShipmentFailed {
                    order_id,
                    reason: reason.clone(),
                });
                (event, "failed", None, Some(reason))
            }
        };
    let inserted = sqlx::query(
        "INSERT INTO shipments (order_id, shipment_id, status, tracking_number, address, reason)
         VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (order_id) DO NOTHING",
    )
    .bind(order_id)
    .bind(shipment_id)
    .bind(status)
    .bind(tracking)
    .bind(Json(&reserved.shipping_address))
    .bind(reason)
    .execute(&mut *tx)
    .await?
    .rows_affected();
    if inserted == 0 {
        return Ok(Outcome::Skipped("order already has a shipment".into()));
    }
    Ok(Outcome::Applied(vec![Envelope::caused_by(
        env,
        &event,
        shipment_id.to_string(),
        1,
    )]))
}
