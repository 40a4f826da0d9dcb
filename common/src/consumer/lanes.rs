//! The consumer's lanes: each applies its deliveries in the order they
//! came, together when several are waiting (one transaction, see
//! [`Applier::apply_all`]); the lanes run side by side. A delivery's lane
//! follows from its event's order id, so one order's events are applied in
//! the order the consumer got them, and never two at once.

use std::sync::Arc;

use tokio::{
    sync::{OwnedSemaphorePermit, mpsc},
    task::JoinSet,
};
use uuid::Uuid;

use super::{
    Applier, Handler,
    lane_connection::{IDLE_FOR, LaneConnection},
    received::Received,
};

pub(super) struct Lanes<H> {
    applier: Arc<Applier<H>>,
    senders: Vec<mpsc::Sender<InFlight>>,
    tasks: JoinSet<()>,
    capacity: usize,
}

/// A delivery on its way to a lane, holding its place among those in
/// flight until it is disposed of.
struct InFlight {
    received: Received,
    place: OwnedSemaphorePermit,
}

/// The lane of `lanes` an order's events go down (all of them, in order).
pub fn lane_of(order_id: Uuid, lanes: usize) -> usize {
    (order_id.as_u128() % lanes.max(1) as u128) as usize
}

impl<H: Handler> Lanes<H> {
    pub fn new(applier: Arc<Applier<H>>, capacity: usize) -> Lanes<H> {
        let mut lanes = Lanes {
            senders: Vec::new(),
            tasks: JoinSet::new(),
            capacity,
            applier,
        };
        for _ in 0..lanes.applier.lanes.max(1) {
            let sender = lanes.spawn();
            lanes.senders.push(sender);
        }
        lanes
    }

    fn spawn(&mut self) -> mpsc::Sender<InFlight> {
        let (sender, mut receiver) = mpsc::channel::<InFlight>(self.capacity);
        let applier = self.applier.clone();
        let most = applier.batch.max(1);
        let lanes = self.applier.lanes.max(1);
        self.tasks.spawn(async move {
            let mut conn = LaneConnection::new(applier.pool.clone(), lanes);
            loop {
                let next = if conn.keeps_one() {
                    match tokio::time::timeout(IDLE_FOR, receiver.recv()).await {
                        Ok(next) => next,
                        Err(_) => {
                            conn.release();
                            continue;
                        }
                    }
                } else {
                    receiver.recv().await
                };
                let Some(first) = next else { break };
                let mut batch = vec![first];
                while batch.len() < most {
                    match receiver.try_recv() {
                        Ok(next) => batch.push(next),
                        Err(_) => break,
                    }
                }
                let (received, places): (Vec<_>, Vec<_>) =
                    batch.into_iter().map(|f| (f.received, f.place)).unzip();
                applier.apply_all(received, &mut conn).await;
                drop(places);
            }
        });
        sender
    }

    /// Hands `received` to its lane (waiting while the lane is full).
    pub async fn send(&mut self, received: Received, place: OwnedSemaphorePermit) {
        let lane = lane_of(received.event.order_id(), self.senders.len());
        let in_flight = InFlight { received, place };
        if let Err(mpsc::error::SendError(in_flight)) = self.senders[lane].send(in_flight).await {
            // The lane's task ended, which only a bug can do: a new lane
            // takes over, and this delivery with it.
            tracing::error!(consumer = %self.applier.name, lane, "a consumer lane ended; restarting it");
            self.senders[lane] = self.spawn();
            let _ = self.senders[lane].send(in_flight).await;
        }
    }

    /// Waits until every delivery handed over is applied and acked.
    pub async fn drain(mut self) {
        self.senders.clear();
        while self.tasks.join_next().await.is_some() {}
    }
}
