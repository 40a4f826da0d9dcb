//! Reactions to saga events: reserve on PaymentProcessed, release on ShipmentFailed.

use std::collections::HashMap;

use common::{
    Envelope, Event, Handler, HandlerError, Outcome,
    event::{
        InventoryReleased, InventoryReservationFailed, InventoryReserved, OrderLine,
        PaymentProcessed,
    },
};
use sqlx::{PgConnection, types::Json};
use uuid::Uuid;

use crate::domain::{self, ReleaseDecision, ReservationStatus};

pub struct InventoryHandler;

impl Handler for InventoryHandler {
    async fn handle(
        &self,
        tx: &mut PgConnection,
        env: &Envelope,
        event: Event,
    ) -> Result<Outcome, HandlerError> {
        match event {
            Event::PaymentProcessed(p) => reserve(tx, env, p).await,
            Event::ShipmentFailed(e) => release(tx, env, e.order_id, e.reason).await,
            other => Ok(Outcome::not_handled("inventory", &other)),
        }
    }
}

async fn reserve(
    tx: &mut PgConnection,
    env: &Envelope,
    paid: PaymentProcessed,
) -> Result<Outcome, HandlerError> {
    let order_id = paid.order_id;
    let demand = match domain::demand(&paid.lines) {
        Ok(d) => d,
        Err(reason) => return Ok(Outcome::Rejected(reason)),
    };
    let products: Vec<&String> = demand.keys().collect();
    // Rows locked in product order: concurrent reservations queue, never
    // deadlock, and each sees what the previous one left.
    let available: HashMap<String, i64> = sqlx::query_as::<_, (String, i64)>(
        "SELECT product_id, available FROM stock WHERE product_id = ANY($1) ORDER BY product_id FOR UPDATE",
    )
    .bind(&products)
    .fetch_all(&mut *tx)
    .await?
    .into_iter()
    .collect();
    let decision = domain::decide_reservation(&demand, &available);
    let (status, reason) = match &decision {
        Ok(()) => (ReservationStatus::Reserved, None),
        Err(reason) => (ReservationStatus::Failed, Some(reason.as_str())),
    };
    // One reservation per order (primary key): a second one finds it taken.
    let recorded = sqlx::query(
        "INSERT INTO reservations (order_id, lines, status, reason) VALUES ($1, $2, $3, $4)
         ON CONFLICT (order_id) DO NOTHING",
    )
    .bind(order_id)
    .bind(Json(&paid.lines))
    .bind(status.as_str())
    .bind(reason)
    .execute(&mut *tx)
    .await?
    .rows_affected();
    if recorded == 0 {
        return Ok(Outcome::Skipped("order already has a reservation".into()));
    }
    let event = match decision {
        Ok(()) => {
            move_stock(tx, &demand, 1).await?;
            Event::InventoryReserved(InventoryReserved {
                order_id,
                lines: paid.lines,
                shipping_address: paid.shipping_address,
            })
        }
        Err(reason) => {
            Event::InventoryReservationFailed(InventoryReservationFailed { order_id, reason })
        }
    };
    Ok(Outcome::Applied(vec![Envelope::caused_by(
        env,
        &event,
        order_id.to_string(),
        1,
    )]))
}

async fn release(
    tx: &mut PgConnection,
    env: &Envelope,
    order_id: Uuid,
    reason: String,
) -> Result<Outcome, HandlerError> {
    let row: Option<(Json<Vec<OrderLine>>, String)> =
        sqlx::query_as("SELECT lines, status FROM reservations WHERE order_id = $1 FOR UPDATE")
            .bind(order_id)
            .fetch_optional(&mut *tx)
            .await?;
    let Some((Json(lines), status)) = row else {
        return Ok(Outcome::NotYet(format!(
            "no reservation for order {order_id} yet"
        )));
    };
    let status = ReservationStatus::parse(&status)
        .ok_or_else(|| HandlerError::Permanent(format!("unknown reservation status '{status}'")))?;
    match domain::decide_release(status) {
        ReleaseDecision::AlreadyReleased => Ok(Outcome::Skipped("already released".into())),
        ReleaseDecision::NothingReserved => Ok(Outcome::Skipped("nothing was reserved".into())),
        ReleaseDecision::Release => {
            let demand = domain::demand(&lines).map_err(HandlerError::Permanent)?;
            let products: Vec<&String> = demand.keys().collect();
            sqlx::query(
                "SELECT 1 FROM stock WHERE product_id = ANY($1) ORDER BY product_id FOR UPDATE",
            )
            .bind(&products)
            .execute(&mut *tx)
            .await?;
            move_stock(tx, &demand, -1).await?;
            sqlx::query("UPDATE reservations SET status = 'released', reason = $2, updated_at = now() WHERE order_id = $1")
                .bind(order_id)
                .bind(&reason)
                .execute(&mut *tx)
                .await?;
            let event = Event::InventoryReleased(InventoryReleased {
                order_id,
                lines,
                reason,
            });
            Ok(Outcome::Applied(vec![Envelope::caused_by(
                env,
                &event,
                order_id.to_string(),
                2,
            )]))
        }
    }
}

/// Moves quantities from available to reserved (`sign` 1) or back (`sign` -1).
async fn move_stock(
    tx: &mut PgConnection,
    demand: &std::collections::BTreeMap<String, i64>,
    sign: i64,
) -> Result<(), sqlx::Error> {
    let products: Vec<&String> = demand.keys().collect();
    // Demand is positive and bounded (validated lines, checked sums): no overflow.
    let quantities: Vec<i64> = demand.values().map(|q| q * sign).collect();
    sqlx::query(
        "UPDATE stock SET available = available - d.q, reserved = reserved + d.q,
                          version = version + 1, updated_at = now()
         FROM UNNEST($1::text[], $2::bigint[]) AS d(p, q) WHERE stock.product_id = d.p",
    )
    .bind(&products)
    .bind(&quantities)
    .execute(tx)
    .await?;
    Ok(())
}
