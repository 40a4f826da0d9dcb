//! Reactions to the saga's outcome: ShipmentCreated confirms the order;
//! PaymentFailed or PaymentRefunded cancels it with the reason that started it.

use common::{Envelope, Event, Handler, HandlerError, Outcome, Subjects};
use sqlx::PgConnection;

use crate::{
    domain::{Command, DomainError},
    store::{self, ExecError},
};

pub struct OrderHandler {
    pub subjects: Subjects,
}

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
            Event::PaymentFailed(e) => Command::Cancel { reason: e.reason },
            Event::PaymentRefunded(e) => Command::Cancel { reason: e.reason },
            other => return Ok(Outcome::not_handled("order", &other)),
        };
        // Envelopes are already in the outbox: execute writes them with the events.
        match store::execute(
            tx,
            &self.subjects,
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
            Ok(_) => Ok(Outcome::Applied(vec![])),
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
