//! Reactions to saga events: charge on OrderPlaced; refund (the shared
//! compensation) on InventoryReservationFailed or InventoryReleased; record
//! a refund an operator made by hand (OrderManuallyCompensated); refund, or
//! never charge, an order the customer cancelled (OrderCancelledByCustomer).
//! Money moves through the payment gateway; the database records what it did.

use std::{sync::Arc, time::Duration};

use common::{
    Applying, Envelope, Event, Handler, HandlerError, Outcome,
    cancels::{BeforeStep, Cancels, LockRows},
    compensation::{self, COMPENSATION_VERSION, Step, StepState, Undone, UndoneBy},
    event::{
        InventoryReleased, InventoryReservationFailed, OrderPlaced, PaymentFailed,
        PaymentProcessed, PaymentRefundFailed, PaymentRefunded,
    },
    limits,
};

use sqlx::PgConnection;
use uuid::Uuid;

use crate::domain::{self, ChargeDecision, PaymentStatus};
use crate::gateway::{self, Gateway, GatewayError, Voided};
use crate::store::{self, Payment};

pub struct PaymentHandler {
    pub gateway: Arc<Gateway>,
    /// Delays between attempts of a gateway call that did not go through
    /// (a refund refused, a call unanswered), before it is dead-lettered.
    pub retries: Vec<Duration>,
    pub before: BeforeStep<AccountLocks>,
}

/// The accounts a batch charges or refunds, locked in customer order
/// before the first is touched.
pub struct AccountLocks;

impl LockRows for AccountLocks {
    async fn lock(
        &self,
        tx: &mut PgConnection,
        steps: &[&Event],
        undoing: &[Uuid],
    ) -> Result<(), HandlerError> {
        let charged: Vec<&str> = (steps.iter())
            .filter_map(|e| match e {
                Event::OrderPlaced(order) => Some(order.customer_id.as_str()),
                _ => None,
            })
            .collect();
        Ok(store::lock_accounts(tx, &charged, undoing).await?)
    }
}

impl Handler for PaymentHandler {
    type Before = BeforeStep<AccountLocks>;

    fn before(&self) -> &Self::Before {
        &self.before
    }

    async fn handle(
        &self,
        cx: Applying<'_, Cancels>,
        event: Event,
    ) -> Result<Outcome, HandlerError> {
        match event {
            Event::OrderPlaced(order) => self.charge(cx, order).await,
            Event::InventoryReservationFailed(InventoryReservationFailed { order_id, reason })
            | Event::InventoryReleased(InventoryReleased {
                order_id, reason, ..
            }) => {
                let by = UndoneBy::Saga { reason, with: self };
                compensation::compensate::<Payment, _>(cx, order_id, by).await
            }
            // An operator's refund by hand (in the gateway's console) is
            // recorded, the gateway not called again; a customer's cancel
            // refunds.
            other => compensation::undone_from_outside::<Payment, _>(cx, other, self).await,
        }
    }
}

impl PaymentHandler {
    async fn charge(
        &self,
        cx: Applying<'_, Cancels>,
        order: OrderPlaced,
    ) -> Result<Outcome, HandlerError> {
        let tx = &mut *cx.tx;
        if let Some(reason) = cx.prepared.ended(tx, order.order_id).await? {
            return Ok(Outcome::Skipped(format!(
                "order cancelled before it was charged ({reason}): nothing charged"
            )));
        }
        let payment_id = gateway::payment_id(order.order_id);
        let balance = store::lock_balance(tx, &order.customer_id).await?;
        let mut decision = domain::decide_charge(&order.customer_id, balance, order.total);
        if let ChargeDecision::Charge { .. } = decision {
            // Same payment id on every attempt: the gateway charges once.
            match self
                .gateway
                .charge(payment_id, &order.customer_id, order.total)
                .await
            {
                Ok(()) => {}
                Err(GatewayError::Refused(why)) => {
                    decision = ChargeDecision::Decline {
                        reason: limits::reason(format!("payment declined by the gateway: {why}")),
                    }
                }
                Err(e @ GatewayError::TimedOut(_)) => {
                    return Err(HandlerError::Unavailable {
                        reason: format!("charging {payment_id}: {e}"),
                        retries: self.retries.clone(),
                        report: None,
                    });
                }
            }
        }
        let payment = Payment {
            order_id: order.order_id,
            payment_id,
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
        let balance = match decision {
            ChargeDecision::Charge { new_balance } => Some(new_balance),
            ChargeDecision::Decline { .. } => None,
        };
        if !store::record_payment(tx, &payment, reason, balance).await? {
            return Ok(Outcome::Skipped("order already has a payment".into()));
        }
        let event = match decision {
            ChargeDecision::Charge { .. } => Event::PaymentProcessed(PaymentProcessed {
                order_id: order.order_id,
                payment_id: payment.payment_id,
                customer_id: order.customer_id,
                amount: order.total,
                lines: order.lines,
                shipping_address: order.shipping_address,
            }),
            ChargeDecision::Decline { reason } => Event::PaymentFailed(PaymentFailed {
                order_id: order.order_id,
                customer_id: order.customer_id,
                amount: order.total,
                reason,
            }),
        };
        Ok(compensation::step_taken(
            cx.cause,
            &event,
            payment.payment_id.to_string(),
        ))
    }
}

/// The refund: payment's compensation, under the payment's aggregate id.
impl Step for Payment {
    const NAME: &'static str = "payment";
    type With = PaymentHandler;

    fn state(&self) -> StepState {
        self.status.step_state()
    }

    async fn record_undone(&self, tx: &mut PgConnection, reason: &str) -> Result<(), HandlerError> {
        store::refund(tx, self, reason).await?;
        Ok(())
    }

    async fn undo<P: Sync>(
        self,
        cx: Applying<'_, P>,
        reason: String,
        with: &PaymentHandler,
    ) -> Result<Undone, HandlerError> {
        let refunded = with
            .gateway
            .refund(self.payment_id, &self.customer_id, self.amount)
            .await;
        if let Err(e) = refunded {
            // On record for every attempt; retried on the schedule, then
            // dead-lettered, which halts the saga for an operator.
            let failed = Event::PaymentRefundFailed(PaymentRefundFailed {
                order_id: self.order_id,
                payment_id: self.payment_id,
                customer_id: self.customer_id.clone(),
                amount: self.amount,
                attempt: cx.delivered,
                reason: limits::reason(e.to_string()),
            });
            let report = Envelope::caused_by(
                cx.cause,
                &failed,
                self.payment_id.to_string(),
                COMPENSATION_VERSION,
            );
            return Err(HandlerError::Unavailable {
                reason: format!("refunding {}: {e}", self.payment_id),
                retries: with.retries.clone(),
                report: Some(Box::new(report)),
            });
        }
        self.record_undone(cx.tx, &reason).await?;
        Ok(self.undone(reason))
    }

    /// A charge the gateway did not answer may have gone through: the
    /// payment id is voided, so whatever became of it, the customer keeps
    /// their money (a void of a payment never charged changes nothing).
    async fn call_off(order_id: Uuid, with: &PaymentHandler) -> Result<(), HandlerError> {
        let payment_id = gateway::payment_id(order_id);
        // The simulation answers per customer; a gateway of record needs
        // only the payment id. The customer is not known here (no charge
        // was recorded): the rules for everyone apply.
        match with.gateway.void(payment_id, "").await {
            Ok(Voided::Nothing) => Ok(()),
            Ok(Voided::Charge(amount)) => {
                tracing::warn!(%order_id, %payment_id, amount, "a charge whose answer was lost had gone through: voided");
                Ok(())
            }
            Err(e) => Err(HandlerError::Unavailable {
                reason: format!("voiding {payment_id}: {e}"),
                retries: with.retries.clone(),
                report: None,
            }),
        }
    }

    fn undone(self, reason: String) -> Undone {
        let event = Event::PaymentRefunded(PaymentRefunded {
            order_id: self.order_id,
            payment_id: self.payment_id,
            customer_id: self.customer_id,
            amount: self.amount,
            reason,
        });
        Undone {
            event,
            aggregate_id: self.payment_id.to_string(),
        }
    }
}
