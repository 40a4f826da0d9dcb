//! Reactions to saga events: charge on OrderPlaced; refund (the shared
//! compensation) on InventoryReservationFailed or InventoryReleased.

use common::{
    Envelope, Event, Handler, HandlerError, Outcome,
    compensation::{self, STEP_VERSION, StepState},
    event::{OrderPlaced, PaymentFailed, PaymentProcessed, PaymentRefunded},
};
use sqlx::PgConnection;
use uuid::Uuid;

use crate::{
    domain::{self, ChargeDecision, PaymentStatus},
    store::{self, Payment},
};

pub struct PaymentHandler;

impl Handler for PaymentHandler {
    async fn handle(
        &self,
        tx: &mut PgConnection,
        env: &Envelope,
        event: Event,
    ) -> Result<Outcome, HandlerError> {
        match event {
            Event::OrderPlaced(order) => charge(tx, env, order).await,
            Event::InventoryReservationFailed(e) => {
                compensation::compensate::<Refund>(tx, env, e.order_id, e.reason).await
            }
            Event::InventoryReleased(e) => {
                compensation::compensate::<Refund>(tx, env, e.order_id, e.reason).await
            }
            other => Ok(Outcome::not_handled("payment", &other)),
        }
    }
}

async fn charge(
    tx: &mut PgConnection,
    env: &Envelope,
    order: OrderPlaced,
) -> Result<Outcome, HandlerError> {
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
    Ok(Outcome::Applied(vec![Envelope::caused_by(
        env,
        &event,
        payment.payment_id.to_string(),
        STEP_VERSION,
    )]))
}

/// The refund: payment's compensation, under the payment's aggregate id.
struct Refund;

impl compensation::Step for Refund {
    type Record = Payment;
    const NAME: &'static str = "payment";

    async fn lock(tx: &mut PgConnection, order_id: Uuid) -> sqlx::Result<Option<Payment>> {
        store::lock_payment(tx, order_id).await
    }

    fn state(payment: &Payment) -> StepState {
        payment.status.step_state()
    }

    async fn undo(
        tx: &mut PgConnection,
        payment: Payment,
        reason: String,
    ) -> Result<(Event, String), HandlerError> {
        store::refund(tx, &payment, &reason).await?;
        let event = Event::PaymentRefunded(PaymentRefunded {
            order_id: payment.order_id,
            payment_id: payment.payment_id,
            customer_id: payment.customer_id,
            amount: payment.amount,
            reason,
        });
        Ok((event, payment.payment_id.to_string()))
    }
}
