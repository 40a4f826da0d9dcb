//! How a commit reaches the relay: a wake-up, and, when the committer
//! knows them, the rows it just committed, handed over so that the relay
//! publishes them without reading them back.
//!
//! A row handed over is published without a read only when nothing
//! earlier of its aggregate was in the outbox as it was written, or the
//! latest such row is one the relay has published itself (and so every
//! earlier one: see [`super::OutboxRows::insert_ctes`]): publishing it at
//! once cannot overtake an earlier event of the same order. The leading
//! relay takes hand-overs only while it has read everything the outbox
//! held (its last read found nothing more) and nothing else woke it since;
//! otherwise what is handed over is dropped, and the relay reads the
//! outbox, where the rows are: a hand-over only ever saves a read, it
//! never carries the only copy of an event.

use std::{
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::Instant,
};

use tokio::sync::Notify;
use uuid::Uuid;

/// Most rows waiting to be taken by the relay; beyond, the relay reads
/// them from the outbox instead.
const HANDED_MOST: usize = 4_096;

/// Wakes the relay after a commit, and whatever else follows this
/// process's writes (the order service's projections). Cheap to clone; a
/// wake-up while one is busy is remembered, so no commit is ever left
/// waiting for a poll.
#[derive(Clone, Default)]
pub struct OutboxSignal {
    relay: Arc<Notify>,
    waiting: Arc<Mutex<Waiting>>,
    /// Whether the relay takes rows handed over (it leads, and has read
    /// everything the outbox held).
    taking: Arc<AtomicBool>,
    followers: Arc<Mutex<Vec<Arc<Notify>>>>,
}

/// What commits left for the relay since it last looked.
#[derive(Default)]
pub(super) struct Waiting {
    /// Rows handed over, in the order they were committed.
    pub rows: Vec<HandedRow>,
    /// Whether something was committed that the relay must read.
    pub read: bool,
}

/// A row as its committer wrote it.
pub(super) struct HandedRow {
    pub id: i64,
    pub event_id: Uuid,
    pub subject: String,
    pub body: Vec<u8>,
    pub traceparent: Option<String>,
    /// The latest earlier row of its aggregate that was in the outbox as
    /// it was written: it waits for that one to be published (by this
    /// relay, or the relay reads).
    pub after: Option<i64>,
    /// When its statement returned: it was in the outbox by then.
    pub written: Instant,
}

/// Its body by size only: an event's payload is a customer's data.
impl std::fmt::Debug for HandedRow {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HandedRow")
            .field("id", &self.id)
            .field("event_id", &self.event_id)
            .field("subject", &self.subject)
            .field("body_bytes", &self.body.len())
            .field("after", &self.after)
            .finish_non_exhaustive()
    }
}

/// The rows a statement wrote to the outbox, as the relay may take them
/// once they are committed ([`OutboxSignal::hand_over`]).
#[derive(Default, Debug)]
pub struct Handover {
    pub(super) rows: Vec<HandedRow>,
    /// Whether the statement wrote rows that must wait behind an earlier
    /// row of their aggregate: the relay reads those.
    pub(super) behind: bool,
}

impl Handover {
    /// How many rows it hands over.
    pub fn len(&self) -> usize {
        self.rows.len()
    }

    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }

    /// Whether rows were written that the relay must read from the outbox
    /// (behind an earlier event of their aggregate).
    pub fn leaves_rows_to_read(&self) -> bool {
        self.behind
    }
}

impl OutboxSignal {
    /// Wakes the relay to read the outbox: something was committed.
    pub fn notify(&self) {
        self.lock().read = true;
        self.wake();
    }

    /// Hands the rows of a committed transaction to the relay, and wakes
    /// it. Only after the commit: a row handed over may be published at
    /// once.
    pub fn hand_over(&self, handover: Handover) {
        {
            let mut waiting = self.lock();
            let taken = self.taking.load(Ordering::Acquire)
                && !handover.behind
                && waiting.rows.len() + handover.rows.len() <= HANDED_MOST;
            if taken {
                waiting.rows.extend(handover.rows);
            } else {
                waiting.read = true;
            }
        }
        self.wake();
    }

    /// A further waker, notified with the relay after every commit.
    pub fn follower(&self) -> Arc<Notify> {
        let follower = Arc::new(Notify::new());
        self.followers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(follower.clone());
        follower
    }

    /// Whether the relay takes rows handed over now.
    pub fn takes_handovers(&self) -> bool {
        self.taking.load(Ordering::Acquire)
    }

    /// Said by the relay: whether it takes rows handed over from now on.
    pub(super) fn set_taking(&self, taking: bool) {
        self.taking.store(taking, Ordering::Release);
    }

    /// What was left since the relay last looked, taken.
    pub(super) fn take(&self) -> Waiting {
        std::mem::take(&mut *self.lock())
    }

    pub(super) async fn notified(&self) {
        self.relay.notified().await
    }

    fn wake(&self) {
        self.relay.notify_one();
        let followers = self.followers.lock().unwrap_or_else(|e| e.into_inner());
        for f in followers.iter() {
            f.notify_one();
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Waiting> {
        self.waiting.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_handed_row_prints_its_body_by_size_only() {
        let row = HandedRow {
            id: 7,
            event_id: Uuid::nil(),
            subject: "saga.payment.PaymentProcessed".into(),
            body: br#"{"customerId":"alice","card":"4111"}"#.to_vec(),
            traceparent: None,
            after: Some(6),
            written: Instant::now(),
        };
        let printed = format!("{row:?}");
        // Neither as text nor as the byte list a derived Debug prints.
        assert!(!printed.contains("alice"), "{printed}");
        assert!(!printed.contains("123, 34"), "{printed}");
        assert!(printed.contains("body_bytes: 36"), "{printed}");
    }
}
