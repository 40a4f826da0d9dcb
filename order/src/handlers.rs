//! Reactions to the saga's outcome: ShipmentCreated confirms the order;
//! PaymentFailed or PaymentRefunded cancels it with the reason that started it.

use common::{Envelope, Event, Handler, HandlerError, Outcome};
use sqlx::PgConnection;

use crate::{
    domain::{Command, DomainError, PaymentClaim},
    store::{self, ExecError},
};

pub struct OrderHandler;

impl Handler for OrderHandler {
    async fn handle(
        &self,
        tx: &mut PgConnection,
        env: &Envelope,
        event: Event,
    ) -> Result<Outcome, HandlerError> {
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
            other => return Ok(Outcome::not_handled("order", &other)),
        };
        match store::execute(
            tx,
            order_id,
            command,
            env.metadata.correlation_id,
            env.event_id,
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
