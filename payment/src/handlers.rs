//! Reactions to saga events: charge on OrderPlaced, refund on
//! InventoryReservationFailed or InventoryReleased.

use common::{
    Envelope, Event, Handler, HandlerError, Outcome,
    event::{OrderPlaced, PaymentFailed, PaymentProcessed, PaymentRefunded},
};
use sqlx::PgConnection;
use uuid::Uuid;

use crate::domain::{self, ChargeDecision, PaymentStatus, RefundDecision};

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
            Event::InventoryReservationFailed(e) => refund(tx, env, e.order_id, e.reason).await,
            Event::InventoryReleased(e) => refund(tx, env, e.order_id, e.reason).await,
            other => Ok(Outcome::not_handled("payment", &other)),
        }
    }
}

async fn charge(
    tx: &mut PgConnection,
    env: &Envelope,
    order: OrderPlaced,
) -> Result<Outcome, HandlerError> {
    // Lock the account first: charges to one account queue here, and each
    // sees the balance the previous one left.
    let balance: Option<i64> =
        sqlx::query_scalar("SELECT balance FROM accounts WHERE customer_id = $1 FOR UPDATE")
            .bind(&order.customer_id)
            .fetch_optional(&mut *tx)
            .await?;
    let payment_id = Uuid::now_v7();
    let decision = domain::decide_charge(&order.customer_id, balance, order.total);
    let (status, reason) = match &decision {
        ChargeDecision::Charge { .. } => (PaymentStatus::Charged, None),
        ChargeDecision::Decline { reason } => (PaymentStatus::Failed, Some(reason.as_str())),
    };
    // One payment per order (primary key): a second charge finds it taken.
    let recorded = sqlx::query(
        "INSERT INTO payments (order_id, payment_id, customer_id, amount, status, reason)
         VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (order_id) DO NOTHING",
    )
    .bind(order.order_id)
    .bind(payment_id)
    .bind(&order.customer_id)
    .bind(order.total)
    .bind(status.as_str())
    .bind(reason)
    .execute(&mut *tx)
    .await?
    .rows_affected();
    if recorded == 0 {
        return Ok(Outcome::Skipped("order already has a payment".into()));
    }
    let event = match decision {
        ChargeDecision::Charge { new_balance } => {
            sqlx::query(
                "UPDATE accounts SET balance = $2, version = version + 1, updated_at = now()
                 WHERE customer_id = $1",
            )
            .bind(&order.customer_id)
            .bind(new_balance)
            .execute(&mut *tx)
            .await?;
            Event::PaymentProcessed(PaymentProcessed {
                order_id: order.order_id,
                payment_id,
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
        payment_id.to_string(),
        1,
    )]))
}

async fn refund(
    tx: &mut PgConnection,
    env: &Envelope,
    order_id: Uuid,
    reason: String,
) -> Result<Outcome, HandlerError> {
    let row: Option<(Uuid, String, i64, String)> = sqlx::query_as(
        "SELECT payment_id, customer_id, amount, status FROM payments WHERE order_id = $1 FOR UPDATE",
    )
    .bind(order_id)
    .fetch_optional(&mut *tx)
    .await?;
    let Some((payment_id, customer_id, amount, status)) = row else {
        return Ok(Outcome::NotYet(format!(
            "no payment for order {order_id} yet"
        )));
    };
    let status = PaymentStatus::parse(&status)
        .ok_or_else(|| HandlerError::Permanent(format!("unknown payment status '{status}'")))?;
    match domain::decide_refund(status) {
        RefundDecision::AlreadyRefunded => Ok(Outcome::Skipped("already refunded".into())),
        RefundDecision::NothingCharged => Ok(Outcome::Skipped(
            "payment was declined; nothing to refund".into(),
        )),
        RefundDecision::Refund => {
            sqlx::query("UPDATE accounts SET balance = balance + $2, version = version + 1, updated_at = now() WHERE customer_id = $1")
                .bind(&customer_id)
                .bind(amount)
                .execute(&mut *tx)
                .await?;
            sqlx::query("UPDATE payments SET status = 'refunded', reason = $2, updated_at = now() WHERE order_id = $1")
                .bind(order_id)
                .bind(&reason)
                .execute(&mut *tx)
                .await?;
            let event = Event::PaymentRefunded(PaymentRefunded {
                order_id,
                payment_id,
                customer_id,
                amount,
                reason,
            });
            Ok(Outcome::Applied(vec![Envelope::caused_by(
                env,
                &event,
                payment_id.to_string(),
                2,
            )]))
        }
    }
}
