//! Reactions to the saga's outcome: ShipmentCreated confirms the order;
//! PaymentFailed or PaymentRefunded cancels it with the reason that started it.

use common::{Applying, Event, Handler, HandlerError, Outcome, consumer::NothingBefore};

use crate::{
    domain::{Command, DomainError, PaymentClaim},
    store::{self, ExecError, Snapshots},
};

pub struct OrderHandler {
    pub snapshots: Snapshots,
}

impl Handler for OrderHandler {
    type Before = NothingBefore;

    fn before(&self) -> &NothingBefore {
        &NothingBefore
    }

    async fn handle(&self, cx: Applying<'_>, event: Event) -> Result<Outcome, HandlerError> {
        let order_id = event.order_id();
        let command = match event {
            Event::ShipmentCreated(e) => Command::Confirm {
                shipment_id: e.shipment_id,
            },
            Event::PaymentFailed(e) => Command::Cancel {
                reason: e.reason,
                payment: Some(PaymentClaim {
                    event_type: "PaymentFailed",
                    customer_id: e.customer_id,
                    amount: e.amount,
                }),
            },
            Event::PaymentRefunded(e) => Command::Cancel {
                reason: e.reason,
                payment: Some(PaymentClaim {
                    event_type: "PaymentRefunded",
                    customer_id: e.customer_id,
                    amount: e.amount,
                }),
            },
            _ => return Ok(Outcome::Unhandled),
        };
        let cause = cx.cause;
        let (correlation_id, causation_id) = (cause.metadata.correlation_id, cause.event_id);
        match store::execute(
            cx.tx,
            &self.snapshots,
            order_id,
            command,
            correlation_id,
            causation_id,
        )
        .await
        {
            Ok((_, emitted)) if emitted.is_empty() => {
                Ok(Outcome::Skipped("order already reflects this event".into()))
            }
            Ok((_, emitted)) => Ok(Outcome::Applied(emitted)),
            Err(ExecError::Domain(DomainError::NotFound)) => {
                Ok(Outcome::NotYet(format!("order {order_id} not placed yet")))
            }
            Err(ExecError::Domain(e)) => Ok(Outcome::Rejected(e.to_string())),
            Err(ExecError::Conflict(id)) => Err(HandlerError::Conflict(id.to_string())),
            Err(ExecError::Corrupt(id, e)) => Ok(Outcome::Rejected(format!(
                "order {id} history unreadable: {e}"
            ))),
            Err(ExecError::Db(e)) => Err(HandlerError::Db(e)),
        }
    }
}
