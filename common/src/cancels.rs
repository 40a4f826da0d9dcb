//! Where a service learns, before it takes its forward step for an order,
//! that the order ended from outside its saga (the customer cancelled it,
//! an operator resolved it), and the saga's hook before a batch is applied
//! ([`BeforeStep`]): it asks the stream about the orders whose steps the
//! batch takes as soon as the batch arrives, holds those orders from the
//! transaction's first statement, and takes the rows the batch will lock in
//! one order.

use std::{collections::HashMap, future::Future, sync::Arc, time::Duration};

use async_nats::jetstream::stream::LastRawMessageErrorKind;
use futures::{
    FutureExt, StreamExt,
    future::{BoxFuture, Shared},
};
use sqlx::{PgConnection, PgPool, Postgres, Transaction};
use uuid::Uuid;

use crate::{
    consumer::{self, Arriving, BeforeApply, GENERIC_PLANS, HandlerError},
    event::{Envelope, Event, EventKind},
    service::Infra,
    subjects::Subjects,
};

/// Holds `order_id` for this transaction (an advisory lock): a service's
/// forward step for the order and the customer's cancel of it take turns.
/// The lock is the database's `hold_orders` (a common migration), which
/// [`Cancels::begin_holding`] takes too.
pub async fn hold_order(tx: &mut PgConnection, order_id: Uuid) -> sqlx::Result<()> {
    sqlx::query("SELECT hold_orders($1)")
        .bind([order_id].as_slice())
        .execute(tx)
        .await?;
    Ok(())
}

/// The SQLSTATE `hold_orders_not_cancelled` fails with when a cancel is
/// recorded for an order it held.
const CANCEL_RECORDED: &str = "SG001";

/// How long asking the broker for an order's cancel may take.
const LOOKUP_TIMEOUT: Duration = Duration::from_secs(2);
/// Most questions to the broker a batch has open at once.
const LOOKUPS_AT_ONCE: usize = 32;

/// Where a service learns that an order ended from outside its saga before
/// it took its step — the customer cancelled it, or an operator resolved
/// it: its own record (it heard of it first), or the stream, which keeps
/// every cancel and resolution under a subject of its own per order (one
/// may be queued behind the event being applied, when the service was
/// away, or the event may be a dead letter redriven after the resolution:
/// it still charges, reserves or ships nothing).
#[derive(Clone)]
pub struct Cancels {
    js: async_nats::jetstream::Context,
    subjects: Subjects,
    /// The stream's answers for the orders whose steps are about to be
    /// taken, asked as soon as their events were taken
    /// ([`Cancels::ask_ahead`]).
    answered: Option<Answers>,
    /// Orders the transaction holds already, with the cancel this service
    /// recorded for each, read once the hold was taken ([`Cancels::begin_holding`]).
    held: Arc<HashMap<Uuid, Option<String>>>,
}

/// The stream's answers, once they are all in; an order it did not answer
/// for is not among them.
type Answers = Shared<BoxFuture<'static, Arc<HashMap<Uuid, Option<String>>>>>;

impl Cancels {
    pub fn new(js: async_nats::jetstream::Context, subjects: Subjects) -> Cancels {
        Cancels {
            js,
            subjects,
            answered: None,
            held: Arc::default(),
        }
    }

    /// These cancels with the stream asked, in the background and all at
    /// once, about `orders` (the orders whose steps are about to be taken):
    /// the answers come while the Redis claim is made and the transaction
    /// begins, instead of one by one inside it. An order the broker did not
    /// answer for is asked again when its step asks, as if alone. The
    /// stream is not asked about `clear` (orders it cannot hold a cancel
    /// for that was published before their steps were taken), unless they
    /// are among `orders` too.
    ///
    /// Asking before the transaction instead of in it changes nothing a
    /// step can observe: the answer is still about the cancels published
    /// before the step was taken, and a cancel published after it (like
    /// one published after the step committed) finds the step done and
    /// undoes it.
    pub fn ask_ahead(&self, orders: Vec<Uuid>, clear: Vec<Uuid>) -> Cancels {
        let mut orders = orders;
        if orders.is_empty() && clear.is_empty() {
            return Cancels {
                answered: None,
                ..self.clone()
            };
        }
        orders.sort_unstable();
        orders.dedup();
        let clear: HashMap<Uuid, Option<String>> = clear
            .into_iter()
            .filter(|id| orders.binary_search(id).is_err())
            .map(|id| (id, None))
            .collect();
        let answered = if orders.is_empty() {
            futures::future::ready(Arc::new(clear)).boxed()
        } else {
            let asking = self.clone();
            let task = tokio::spawn(async move {
                let mut answers = clear;
                let asked: Vec<(Uuid, Option<String>)> = futures::stream::iter(orders)
                    .map(|order_id| {
                        let asking = &asking;
                        async move { (order_id, asking.in_stream(order_id).await) }
                    })
                    .buffer_unordered(LOOKUPS_AT_ONCE)
                    .filter_map(|(order_id, answer)| async move { Some((order_id, answer.ok()?)) })
                    .collect()
                    .await;
                answers.extend(asked);
                answers
            });
            async move { Arc::new(task.await.unwrap_or_default()) }.boxed()
        };
        Cancels {
            answered: Some(answered.shared()),
            ..self.clone()
        }
    }

    /// Waits until the stream has answered what [`Cancels::ask_ahead`]
    /// asked (or given up): a batch waits before it takes its locks, not
    /// while it holds them.
    pub async fn answers(&self) {
        if let Some(answered) = &self.answered {
            answered.clone().await;
        }
    }

    /// A transaction begun on `pool` that holds `orders` from its first
    /// statement (see [`hold_order`]), waits for no lock longer than
    /// `lock_timeout` (`None`: as long as it takes), and these cancels with
    /// this service's record of the orders' cancels, read once every hold
    /// was taken: what the steps the transaction takes for them would each
    /// ask in turn.
    ///
    /// One round trip when no cancel is recorded for them (the rule): the
    /// holds and the check run before the transaction's `BEGIN`, in the
    /// same simple query ([`consumer::begin`]); a hold that fails (a lock
    /// timeout, a deadlock) leaves no transaction behind.
    ///
    /// Only for orders the transaction has nothing else to apply for: an
    /// event that records a cancel would leave the answer stale.
    ///
    /// Begun on `conn`; when a cancel is recorded, on a connection from
    /// `pool` (the first attempt left `conn` outside any transaction).
    pub async fn begin_holding<'c>(
        &self,
        pool: &PgPool,
        conn: &'c mut PgConnection,
        lock_timeout: Option<Duration>,
        orders: &[Uuid],
    ) -> sqlx::Result<(Transaction<'c, Postgres>, Cancels)> {
        let mut orders = orders.to_vec();
        orders.sort_unstable();
        orders.dedup();
        if orders.is_empty() {
            let first = format!("SELECT {GENERIC_PLANS};");
            let tx = consumer::begin(conn, lock_timeout, &first).await?;
            return Ok((tx, self.clone()));
        }
        // The ids are uuids, printed by their type: nothing else reaches
        // the statement.
        let ids: Vec<String> = orders.iter().map(Uuid::to_string).collect();
        let ids = format!("'{{{}}}'::uuid[]", ids.join(","));
        let hold_unless_cancelled =
            format!("SELECT {GENERIC_PLANS}, hold_orders_not_cancelled({ids});");
        let begun = consumer::begin(conn, lock_timeout, &hold_unless_cancelled).await;
        let (tx, recorded) = match begun {
            Ok(tx) => (tx, Vec::new()),
            Err(e)
                if e.as_database_error().and_then(|e| e.code()).as_deref()
                    == Some(CANCEL_RECORDED) =>
            {
                // A cancel is recorded for one of them: which, and why. A
                // statement of its own, so its snapshot is taken after the
                // holds.
                let hold = format!("SELECT {GENERIC_PLANS}, hold_orders({ids});");
                let mut tx = consumer::begin_pooled(pool, lock_timeout, &hold).await?;
                let recorded: Vec<(Uuid, String)> = sqlx::query_as(
                    "SELECT order_id, reason FROM cancelled_orders WHERE order_id = ANY($1)",
                )
                .bind(&orders)
                .fetch_all(&mut *tx)
                .await?;
                (tx, recorded)
            }
            Err(e) => return Err(e),
        };
        let mut held: HashMap<Uuid, Option<String>> =
            orders.into_iter().map(|id| (id, None)).collect();
        for (id, reason) in recorded {
            held.insert(id, Some(reason));
        }
        Ok((
            tx,
            Cancels {
                held: Arc::new(held),
                ..self.clone()
            },
        ))
    }

    /// What a forward step asks first: holds the order (see
    /// [`hold_order`]) and says why it ended from outside its saga (the
    /// customer cancelled it, an operator resolved it), if it did. The step
    /// is then not taken.
    pub async fn ended(
        &self,
        tx: &mut PgConnection,
        order_id: Uuid,
    ) -> Result<Option<String>, HandlerError> {
        let recorded = match self.held.get(&order_id) {
            Some(recorded) => recorded.clone(),
            None => {
                hold_order(tx, order_id).await?;
                sqlx::query_scalar("SELECT reason FROM cancelled_orders WHERE order_id = $1")
                    .bind(order_id)
                    .fetch_optional(&mut *tx)
                    .await?
            }
        };
        if recorded.is_some() {
            return Ok(recorded);
        }
        if let Some(answered) = &self.answered
            && let Some(answer) = answered.clone().await.get(&order_id)
        {
            return Ok(answer.clone());
        }
        self.in_stream(order_id).await
    }

    /// Why `order_id` ended from outside its saga, if the stream holds the
    /// customer's cancel or the operator's resolution (at most one of them
    /// exists: only a pending order is cancelled by its customer, only one
    /// that requires intervention is resolved).
    async fn in_stream(&self, order_id: Uuid) -> Result<Option<String>, HandlerError> {
        let subject = self.subjects.ended_from_outside(order_id);
        let stream = self
            .js
            .get_stream_no_info(self.subjects.events_stream())
            .await
            .map_err(|e| HandlerError::Broker(e.to_string()))?;
        let found = tokio::time::timeout(
            LOOKUP_TIMEOUT,
            stream.get_last_raw_message_by_subject(&subject),
        )
        .await
        .map_err(|_| HandlerError::Broker(format!("no answer on {subject} in time")))?;
        match found {
            Ok(message) => match Envelope::decode(&message.payload) {
                Ok((_, Event::OrderCancelledByCustomer(cancel))) if cancel.order_id == order_id => {
                    Ok(Some(cancel.step_reason()))
                }
                Ok((_, Event::OrderManuallyCompensated(resolved)))
                    if resolved.order_id == order_id =>
                {
                    Ok(Some(resolved.reason()))
                }
                // Not an ending of this order (forged or garbage): the
                // consumer that gets it dead-letters it; it cancels nothing here.
                _ => Ok(None),
            },
            Err(e) if e.kind() == LastRawMessageErrorKind::NoMessageFound => Ok(None),
            Err(e) => Err(HandlerError::Broker(format!("looking up {subject}: {e}"))),
        }
    }
}

/// The saga's [`BeforeApply`] for a service whose forward step is taken on
/// `step` events: the step first asks whether the order ended from outside
/// its saga ([`Cancels::ended`]). The stream is asked about every step a
/// batch takes at once, as soon as the batch arrives
/// ([`Cancels::ask_ahead`]), their orders are held from the first statement
/// of its transaction ([`Cancels::begin_holding`]), and the rows its events
/// will lock are locked first, in one order ([`LockRows`]).
pub struct BeforeStep<R = ()> {
    cancels: Cancels,
    step: EventKind,
    rows: R,
}

impl<R: LockRows> BeforeStep<R> {
    /// The hook of a service whose step is taken on `step` events, on the
    /// service's connections, locking `rows` ahead.
    pub fn new(infra: &Infra, step: EventKind, rows: R) -> Self {
        BeforeStep {
            cancels: Cancels::new(infra.js.clone(), infra.subjects.clone()),
            step,
            rows,
        }
    }

    fn is_step(&self, event: &Event) -> bool {
        event.kind() == self.step
    }
}

/// The rows a batch's events will lock (one customer's account, one
/// product's stock), taken before the first event is applied, all at once
/// and in the one order every such statement of the service follows (sorted
/// by key). Lanes' batches that touch the same rows then queue for each
/// other instead of each holding one row and waiting for another's (a
/// deadlock, which costs both batches their transaction). A lone event
/// takes its rows as it goes: there is no other event of its batch to
/// deadlock with. `()` locks nothing ahead.
pub trait LockRows: Send + Sync + 'static {
    /// Locks the rows of `steps` (the batch's forward-step events) and of
    /// `undoing` (the orders its other events are about: compensations).
    fn lock<'a>(
        &'a self,
        tx: &'a mut PgConnection,
        steps: &'a [&'a Event],
        undoing: &'a [Uuid],
    ) -> impl Future<Output = Result<(), HandlerError>> + Send + 'a;
}

impl LockRows for () {
    async fn lock(
        &self,
        _: &mut PgConnection,
        _: &[&Event],
        _: &[Uuid],
    ) -> Result<(), HandlerError> {
        Ok(())
    }
}

impl<R: LockRows> BeforeApply for BeforeStep<R> {
    type Prepared = Cancels;

    /// Asks the stream about the orders of the batch's steps. Not about a
    /// step whose event had nothing behind it when first delivered: a
    /// cancel published before it is delivered before it (or recorded:
    /// the step's transaction reads that once it holds the order), and one
    /// published after finds the step taken, or waits for its hold, and
    /// undoes it.
    fn arrived(&self, batch: &[Arriving<'_>]) -> Cancels {
        let (mut ask, mut clear) = (Vec::new(), Vec::new());
        for arriving in batch.iter().filter(|a| self.is_step(a.event)) {
            let order_id = arriving.event.order_id();
            match arriving.nothing_behind {
                true => clear.push(order_id),
                false => ask.push(order_id),
            }
        }
        self.cancels.ask_ahead(ask, clear)
    }

    /// Waits for the stream's answers first (not while holding locks),
    /// then holds the orders whose steps the batch takes (an order the
    /// batch has another event for, its cancel say, is asked in its turn),
    /// then locks the batch's rows.
    async fn begin<'a>(
        &'a self,
        pool: &'a PgPool,
        conn: &'a mut PgConnection,
        lock_timeout: Option<Duration>,
        batch: &'a [&'a Event],
        cancels: &'a Cancels,
    ) -> Result<(Transaction<'a, Postgres>, Cancels), HandlerError> {
        cancels.answers().await;
        let mut events_of: HashMap<Uuid, usize> = HashMap::new();
        for event in batch {
            *events_of.entry(event.order_id()).or_default() += 1;
        }
        let alone: Vec<Uuid> = (batch.iter())
            .filter(|e| self.is_step(e) && events_of.get(&e.order_id()) == Some(&1))
            .map(|e| e.order_id())
            .collect();
        let (mut tx, cancels) = cancels
            .begin_holding(pool, conn, lock_timeout, &alone)
            .await?;
        if batch.len() > 1 {
            let (steps, others): (Vec<&Event>, Vec<&Event>) =
                batch.iter().copied().partition(|e| self.is_step(e));
            let undoing: Vec<Uuid> = others.iter().map(|e| e.order_id()).collect();
            if let Err(e) = self.rows.lock(&mut tx, &steps, &undoing).await {
                // Rolled back now: the holds are not kept until the
                // connection is next used.
                if let Err(e) = tx.rollback().await {
                    tracing::warn!(error = %e, "rollback failed; the connection is discarded");
                }
                return Err(e);
            }
        }
        Ok((tx, cancels))
    }
}
