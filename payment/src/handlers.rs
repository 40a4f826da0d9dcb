//! Reactions to saga events: charge on OrderPlaced; refund (the shared
//! compensation) on InventoryReservationFailed or InventoryReleased.

use common::{
    Applying, Event, Handler, HandlerError, Outcome,
    compensation::{self, Step, StepState, Undone},
    event::{
        InventoryReleased, InventoryReservationFailed, OrderPlaced, PaymentFailed,
        PaymentProcessed, PaymentRefunded,
    },
};
use sqlx::PgConnection;
use uuid::Uuid;

use crate::domain::{self, ChargeDecision, PaymentStatus};
use crate::store::{self, Payment};

pub struct PaymentHandler;

impl Handler for PaymentHandler {
    async fn handle(&self, cx: Applying<'_>, event: Event) -> Result<Outcome, HandlerError> {
        match event {
            Event::OrderPlaced(order) => charge(cx, order).await,
            Event::InventoryReservationFailed(InventoryReservationFailed { order_id, reason })
            | Event::InventoryReleased(InventoryReleased {
                order_id, reason, ..
            }) => compensation::compensate::<Payment>(cx, order_id, reason).await,
            _ => Ok(Outcome::Unhandled),
        }
    }
}

async fn charge(cx: Applying<'_>, order: OrderPlaced) -> Result<Outcome, HandlerError> {
    let tx = &mut *cx.tx;
    let balance = store::lock_balance(tx, &order.customer_id).await?;
    let decision = domain::decide_charge(&order.customer_id, balance, order.total);
    let payment = Payment {
        order_id: order.order_id,
        payment_id: Uuid::now_v7(),
        customer_id: order.customer_id.clone(),
        amount: order.total,
        status: match decision {
            ChargeDecision::Charge { .. } => PaymentStatus::Charged,
            ChargeDecision::Decline { .. } => PaymentStatus::Failed,
        },
    };
    let reason = match &decision {
        ChargeDecision::Charge { .. } => None,
        ChargeDecision::Decline { reason } => Some(reason.as_str()),
    };
    if !store::record_payment(tx, &payment, reason).await? {
        return Ok(Outcome::Skipped("order already has a payment".into()));
    }
    let event = match decision {
        ChargeDecision::Charge { new_balance } => {
            store::set_balance(tx, &order.customer_id, new_balance).await?;
            Event::PaymentProcessed(PaymentProcessed {
                order_id: order.order_id,
                payment_id: payment.payment_id,
                customer_id: order.customer_id,
                amount: order.total,
                lines: order.lines,
                shipping_address: order.shipping_address,
            })
        }
        ChargeDecision::Decline { reason } => Event::PaymentFailed(PaymentFailed {
            order_id: order.order_id,
            customer_id: order.customer_id,
            amount: order.total,
            reason,
        }),
    };
    Ok(cx.emit(&event, payment.payment_id.to_string()))
}

/// The refund: payment's compensation, under the payment's aggregate id.
impl Step for Payment {
    const NAME: &'static str = "payment";

    fn state(&self) -> StepState {
        self.status.step_state()
    }

    async fn undo(self, tx: &mut PgConnection, reason: String) -> Undone {
        store::refund(tx, &self, &reason).await?;
        let event = Event::PaymentRefunded(PaymentRefunded {
            order_id: self.order_id,
            payment_id: self.payment_id,
            customer_id: self.customer_id,
            amount: self.amount,
            reason,
        });
        Ok((event, self.payment_id.to_string()))
    }
}
