//! Placing an order, shared by `POST /orders` and the NATS request-reply
//! command; and every other command a person gives an existing order (the
//! customer's cancel, an operator's resolution).

use std::{
    collections::HashMap,
    panic::AssertUnwindSafe,
    sync::{Arc, LazyLock},
};

use common::{
    Envelope, Subjects,
    event::Address,
    limits,
    outbox::{self, EnqueueError, Handover, OutboxRows, OutboxSignal},
    trace::{self, Trace},
};
use futures::FutureExt;
use serde::{Deserialize, Serialize};
use sqlx::{PgConnection, PgPool};
use tokio::sync::{Mutex, mpsc, oneshot};
use uuid::Uuid;

use crate::{
    capability::{self, CancelToken},
    catalog,
    domain::{self, Command, DomainError, Order},
    placement_keys,
    pricing::{self, RequestedLine},
    store::{self, ExecError, Snapshots},
};

/// Request body: `{"customerId", "lines": [{"productId","quantity"}], "shippingAddress": {...}}`.
/// Each line is priced from the catalog ([`pricing`]); a line's optional
/// `unitPrice` must be the catalog's. Unknown fields are refused at every
/// level (the line and address types refuse them too); the bounds are in
/// [`common::limits`].
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[schema(example = json!({
    "customerId": "alice",
    "lines": [{"productId": "widget", "quantity": 2}],
    "shippingAddress": {"name": "Ada", "street": "1 Main St", "city": "Springfield", "postalCode": "12345", "country": "US"}
}))]
pub struct PlaceOrder {
    pub customer_id: String,
    pub lines: Vec<RequestedLine>,
    pub shipping_address: Address,
}

#[derive(Debug, thiserror::Error)]
pub enum PlaceError {
    #[error("{0}")]
    Invalid(String),
    /// The idempotency key was first used with a different request.
    #[error("{0}")]
    KeyReused(String),
    #[error(transparent)]
    Internal(#[from] ExecError),
}

impl From<sqlx::Error> for PlaceError {
    fn from(e: sqlx::Error) -> Self {
        PlaceError::Internal(ExecError::Db(e))
    }
}

/// Everything writing orders needs.
#[derive(Clone)]
pub struct Writer {
    pub pool: PgPool,
    pub subjects: Subjects,
    pub outbox: OutboxSignal,
    /// The broker's `max_payload`: no event larger is ever written.
    pub max_payload: usize,
    pub snapshots: Snapshots,
}

/// Places orders and runs commands on them. Placements that arrive while
/// others are being written wait and are then written together, by one
/// statement ([`GROUP`] at most, [`writers`] writing at once): under load a
/// placement costs a share of a statement instead of one of its own, and a
/// lone placement is written at once, as before. A placement with
/// an idempotency key is written on its own (it may have to wait for the
/// first request of its key).
#[derive(Clone)]
pub struct Placer {
    writer: Writer,
    waiting: mpsc::Sender<Waiting>,
}

impl std::ops::Deref for Placer {
    type Target = Writer;
    fn deref(&self) -> &Writer {
        &self.writer
    }
}

/// Most placements written by one statement.
pub const GROUP: usize = 64;
/// Most placement writers at once, each writing whatever waited.
pub const WRITERS: usize = 4;

/// Placement writers at once on a pool of `max_connections`: a
/// quarter of it (1 to [`WRITERS`]), so that the consumer, the watches and
/// the API always have connections too.
pub fn writers(max_connections: u32) -> usize {
    (max_connections as usize / 4).clamp(1, WRITERS)
}

/// A placement written in a group: its order id, cancel token, request
/// and the trace of the request that asked for it.
type Requested<'a> = (Uuid, &'a CancelToken, &'a PlaceOrder, Option<&'a Trace>);

/// A checked placement request, the id its order gets, and where its
/// answer goes.
struct Waiting {
    /// Fixed before the first attempt to write it: every attempt writes
    /// the same order, so one whose commit went through although its
    /// answer was lost is found, not placed again.
    order_id: Uuid,
    /// Its cancel token, fixed likewise (its hash is written with it).
    token: CancelToken,
    request: PlaceOrder,
    /// The trace of the request that asked for it (its OrderPlaced carries it).
    trace: Option<Trace>,
    reply: oneshot::Sender<Result<Order, PlaceError>>,
}

/// A placement's answer.
#[derive(Debug)]
pub struct Placed {
    pub order: Order,
    /// `false`: the order an earlier request with the same idempotency key
    /// placed.
    pub created: bool,
    /// What the customer's cancel must present; `None` when the order has
    /// been answered with [`capability::MAX_TOKENS_PER_ORDER`] tokens.
    pub cancel_token: Option<CancelToken>,
}

impl Placer {
    /// Placements received and not yet taken by a writer.
    pub fn waiting(&self) -> usize {
        self.waiting.max_capacity() - self.waiting.capacity()
    }

    /// Starts `writers` placement writers; they end when the last clone of
    /// the placer is dropped (they hold none themselves).
    pub fn start(writer: Writer, writers: usize) -> Placer {
        let (waiting, queue) = mpsc::channel(GROUP * WRITERS);
        let queue = Arc::new(Mutex::new(queue));
        for _ in 0..writers.max(1) {
            let (writer, queue) = (writer.clone(), queue.clone());
            tokio::spawn(async move { writer.write_groups(queue).await });
        }
        Placer { writer, waiting }
    }

    /// Places the order and starts the saga. With an idempotency key, a
    /// repeated request of the same customer returns the order the first one
    /// created (`created` = false) instead of placing another, also while
    /// the first is still being placed: the second waits for it.
    pub async fn place(
        &self,
        request: PlaceOrder,
        idempotency_key: Option<&str>,
    ) -> Result<Placed, PlaceError> {
        if let Some(key) = idempotency_key {
            limits::check_text("Idempotency-Key", key, limits::MAX_IDEMPOTENCY_KEY_CHARS)
                .map_err(PlaceError::Invalid)?;
        }
        // Before the key is stored under it: a customer id must fit an index.
        limits::check_id("customerId", &request.customer_id).map_err(PlaceError::Invalid)?;
        // The whole shape before the catalog is asked: a bad request is told
        // what is wrong with it whatever it orders.
        pricing::check(&request.lines).map_err(PlaceError::Invalid)?;
        common::event::validate_address("shippingAddress", &request.shipping_address)
            .map_err(PlaceError::Invalid)?;
        if let Some(key) = idempotency_key {
            return self.writer.place_keyed(request, key).await;
        }
        let (reply, answer) = oneshot::channel();
        let stopping = || PlaceError::Internal(ExecError::Db(sqlx::Error::PoolClosed));
        let (order_id, token) = (Uuid::now_v7(), CancelToken::new());
        self.waiting
            .send(Waiting {
                order_id,
                token: token.clone(),
                request,
                trace: trace::current(),
                reply,
            })
            .await
            .map_err(|_| stopping())?;
        let order = answer.await.map_err(|_| stopping())??;
        Ok(Placed {
            order,
            created: true,
            cancel_token: Some(token),
        })
    }
}

impl Writer {
    /// Puts what a command emitted in the outbox and commits, then wakes the
    /// relay; rolled back if an event is too large to publish. The events
    /// carry the trace of the request being served.
    async fn publish(
        &self,
        mut tx: sqlx::Transaction<'_, sqlx::Postgres>,
        emitted: &[Envelope],
    ) -> Result<(), EnqueueError> {
        if let Err(e) = outbox::enqueue(&mut tx, &self.subjects, emitted, self.max_payload).await {
            tx.rollback().await?;
            return Err(e);
        }
        tx.commit().await?;
        self.outbox.notify();
        Ok(())
    }

    /// Takes whatever placements wait (at least one, at most [`GROUP`]) and
    /// writes them, until the placer is gone. A writer that panics answers
    /// nobody in its group (each gets an internal error) and goes on.
    async fn write_groups(self, queue: Arc<Mutex<mpsc::Receiver<Waiting>>>) {
        loop {
            let mut group = Vec::new();
            {
                let mut queue = queue.lock().await;
                let Some(first) = queue.recv().await else {
                    return;
                };
                group.push(first);
                while group.len() < GROUP {
                    match queue.try_recv() {
                        Ok(next) => group.push(next),
                        Err(_) => break,
                    }
                }
            }
            if let Err(panic) = AssertUnwindSafe(self.write_group(group))
                .catch_unwind()
                .await
            {
                let panic = common::consumer::panic_message(&*panic);
                tracing::error!(
                    panic,
                    "placement writer panicked; its group was not answered"
                );
            }
        }
    }

    /// One placement on its own; several by one statement, or, if that
    /// statement fails, each on its own again, so that what fails one
    /// fails only that one.
    async fn write_group(&self, mut group: Vec<Waiting>) {
        if group.len() == 1 {
            let Waiting {
                order_id,
                token,
                request,
                trace,
                reply,
            } = group.pop().expect("one");
            let _ = reply.send(
                self.place_new_traced(order_id, &token, request, trace)
                    .await,
            );
            return;
        }
        let requests: Vec<Requested> = group
            .iter()
            .map(|w| (w.order_id, &w.token, &w.request, w.trace.as_ref()))
            .collect();
        let meter = &self.snapshots.meter;
        match self.place_together(&requests).await {
            Ok(answers) => {
                meter.placement_group("committed", group.len());
                for (w, answer) in group.into_iter().zip(answers) {
                    let _ = w.reply.send(answer);
                }
            }
            Err(why) => {
                meter.placement_group("one_by_one", group.len());
                tracing::warn!(placements = group.len(), error = %why, "placements not written together; writing each on its own");
                for Waiting {
                    order_id,
                    token,
                    request,
                    trace,
                    reply,
                } in group
                {
                    let _ = reply.send(
                        self.place_new_traced(order_id, &token, request, trace)
                            .await,
                    );
                }
            }
        }
    }

    /// Writes the placements together: one catalog read, then one
    /// statement ([`Writer::write_placed`]). A request the catalog or the order refuses
    /// gets its refusal and the others are written. `Err`: nothing written,
    /// and why.
    async fn place_together(
        &self,
        requests: &[Requested<'_>],
    ) -> Result<Vec<Result<Order, PlaceError>>, String> {
        let mut conn = self.pool.acquire().await.map_err(|e| e.to_string())?;
        let mut products: Vec<&str> = requests
            .iter()
            .flat_map(|(_, _, r, _)| r.lines.iter().map(|l| l.product_id.as_str()))
            .collect();
        products.sort_unstable();
        products.dedup();
        let prices = prices(&mut conn, &products)
            .await
            .map_err(|e| e.to_string())?;
        let mut answers = Vec::with_capacity(requests.len());
        let mut placed = Vec::with_capacity(requests.len());
        let mut tokens = Vec::with_capacity(requests.len());
        for (order_id, token, request, trace) in requests {
            match decide_placement(*order_id, (*request).clone(), &prices) {
                Ok((order, emitted)) => {
                    answers.push(Ok(order.clone()));
                    placed.push((order, emitted, *trace));
                    tokens.push((*order_id, *token));
                }
                Err(refused) => answers.push(Err(refused)),
            }
        }
        if !placed.is_empty() {
            let placed: Vec<Placement> = placed
                .iter()
                .map(|(order, emitted, trace)| (order, emitted.as_slice(), *trace))
                .collect();
            let handover = (self.write_placed(&mut conn, &placed, &tokens).await)
                .map_err(|e| e.to_string())?;
            self.outbox.hand_over(handover);
        }
        for order in answers.iter().flatten() {
            placed_log(order);
        }
        Ok(answers)
    }

    /// A placement without an idempotency key, on its own, as order
    /// `order_id`. An earlier attempt may have written it already (its
    /// commit went through but the answer was lost, with the connection):
    /// then the order it wrote is the answer. So is it when this attempt's
    /// own answer is lost but the order is there when asked again.
    /// [`Writer::place_new`] as part of `trace` (the request's).
    async fn place_new_traced(
        &self,
        order_id: Uuid,
        token: &CancelToken,
        request: PlaceOrder,
        trace: Option<Trace>,
    ) -> Result<Order, PlaceError> {
        match trace {
            Some(trace) => trace::within(trace, self.place_new(order_id, token, request)).await,
            None => self.place_new(order_id, token, request).await,
        }
    }

    async fn place_new(
        &self,
        order_id: Uuid,
        token: &CancelToken,
        request: PlaceOrder,
    ) -> Result<Order, PlaceError> {
        let placed = match self.pool.acquire().await {
            Ok(mut conn) => self.place_in(&mut conn, order_id, token, request).await,
            Err(e) => Err(e.into()),
        };
        let placed = placed.map(|(order, handover)| {
            self.outbox.hand_over(handover);
            placed_log(&order);
            order
        });
        match placed {
            Err(PlaceError::Internal(e)) => match self.written(order_id).await {
                Some(order) => {
                    tracing::warn!(%order_id, correlation_id = %order_id, error = %e, "placement already written (an answer was lost): answering with it");
                    self.outbox.notify();
                    Ok(order)
                }
                None => Err(PlaceError::Internal(e)),
            },
            other => other,
        }
    }

    /// Order `order_id`, if it was written (`None` if it was not, or the
    /// database cannot say).
    async fn written(&self, order_id: Uuid) -> Option<Order> {
        let mut conn = self.pool.acquire().await.ok()?;
        store::load(&mut conn, order_id).await.ok().flatten()
    }

    /// A placement with an idempotency key: the order the key's first
    /// request placed if there was one (`false`), else this one (`true`).
    async fn place_keyed(&self, request: PlaceOrder, key: &str) -> Result<Placed, PlaceError> {
        let (order_id, token) = (Uuid::now_v7(), CancelToken::new());
        let mut tx = self.pool.begin().await?;
        let canonical =
            serde_json::to_vec(&request).map_err(|e| PlaceError::Invalid(e.to_string()))?;
        let (existing, same_request) =
            placement_keys::claim(&mut tx, &request.customer_id, key, order_id, &canonical).await?;
        if existing != order_id {
            if !same_request {
                tx.rollback().await?;
                return Err(PlaceError::KeyReused(format!(
                    "Idempotency-Key '{key}' was already used by this customer for a different request (order {existing})"
                )));
            }
            let order = match store::load(&mut tx, existing).await {
                Ok(Some(order)) => order,
                Ok(None) => {
                    tx.rollback().await?;
                    return Err(PlaceError::Internal(ExecError::Domain(
                        DomainError::NotFound,
                    )));
                }
                Err(e) => {
                    tx.rollback().await?;
                    return Err(e.into());
                }
            };
            // The repeat is answered like the first request: with a cancel
            // token of its own (the first one's is kept only hashed).
            let cancel_token = capability::another(&mut tx, existing).await?;
            tx.commit().await?;
            return Ok(Placed {
                order,
                created: false,
                cancel_token,
            });
        }
        let (order, handover) = match self.place_in(&mut tx, order_id, &token, request).await {
            Ok(placed) => placed,
            Err(e) => {
                tx.rollback().await?;
                return Err(e);
            }
        };
        tx.commit().await?;
        self.outbox.hand_over(handover);
        placed_log(&order);
        Ok(Placed {
            order,
            created: true,
            cancel_token: Some(token),
        })
    }

    /// Prices and places `request` as order `order_id` on `conn` (on its
    /// own, or in the caller's transaction); the caller hands what it wrote
    /// to the relay once it is committed.
    async fn place_in(
        &self,
        conn: &mut PgConnection,
        order_id: Uuid,
        token: &CancelToken,
        request: PlaceOrder,
    ) -> Result<(Order, Handover), PlaceError> {
        let products: Vec<&str> = request
            .lines
            .iter()
            .map(|l| l.product_id.as_str())
            .collect();
        let prices = prices(conn, &products).await?;
        let (order, emitted) = decide_placement(order_id, request, &prices)?;
        let trace = trace::current();
        let handover = self
            .write_placed(
                conn,
                &[(&order, &emitted, trace.as_ref())],
                &[(order_id, token)],
            )
            .await?;
        Ok((order, handover))
    }

    /// Writes placed orders to the event store, the hashes of their cancel
    /// tokens, and their events (each with the trace it carries) to the
    /// outbox, in one statement: atomic on its own, so a placement needs no
    /// transaction around it (two round trips with the catalog's read,
    /// instead of six). Refused whole if an event can never be published.
    /// What it wrote is the relay's to take once committed.
    async fn write_placed(
        &self,
        conn: &mut PgConnection,
        placed: &[Placement<'_>],
        tokens: &[(Uuid, &CancelToken)],
    ) -> Result<Handover, PlaceError> {
        static SQL: LazyLock<String> = LazyLock::new(|| {
            format!(
                "WITH {}, {}, {} SELECT {}",
                store::Appended::ctes(1),
                capability::Kept::cte(12),
                OutboxRows::insert_ctes(14, "true"),
                OutboxRows::HANDED,
            )
        });
        let decided: Vec<(&Order, &[Envelope])> = placed
            .iter()
            .map(|(order, emitted, _)| (*order, *emitted))
            .collect();
        let emitted: Vec<(&Envelope, Option<&Trace>)> = placed
            .iter()
            .flat_map(|(_, emitted, trace)| emitted.iter().map(move |e| (e, *trace)))
            .collect();
        let events = OutboxRows::traced(&self.subjects, &emitted, self.max_payload)
            .map_err(PlaceError::Invalid)?;
        let appended = store::Appended::of(&self.snapshots, 0, &decided);
        let kept = capability::Kept::of(tokens);
        let query = sqlx::query(sqlx::AssertSqlSafe(SQL.as_str()));
        let result = events
            .bind_to(kept.bind_to(appended.bind_to(query)))
            .fetch_one(conn)
            .await;
        let row = appended.written(result)?;
        Ok(events.handover(&row, 0)?)
    }
}

/// An order placed, its events and the trace of the request that placed it.
type Placement<'a> = (&'a Order, &'a [Envelope], Option<&'a Trace>);

/// The catalog's price of each of `products` it has, as of now: a later
/// change of the catalog does not change an order priced with it, whose
/// lines carry these prices from here on.
async fn prices(
    conn: &mut PgConnection,
    products: &[&str],
) -> sqlx::Result<HashMap<String, pricing::Price>> {
    Ok(catalog::lookup(conn, products)
        .await?
        .into_iter()
        .map(|(id, e)| {
            let price = pricing::Price {
                unit_price: e.unit_price,
                version: e.version,
            };
            (id, price)
        })
        .collect())
}

/// The order `request` places as `order_id` at `prices`, and its
/// OrderPlaced, or why it is refused. Reads and writes nothing.
fn decide_placement(
    order_id: Uuid,
    request: PlaceOrder,
    prices: &HashMap<String, pricing::Price>,
) -> Result<(Order, Vec<Envelope>), PlaceError> {
    let lines = pricing::price(request.lines, prices).map_err(PlaceError::Invalid)?;
    let command = Command::Place {
        order_id,
        customer_id: request.customer_id,
        lines,
        shipping_address: request.shipping_address,
    };
    // The placement request is the cause of OrderPlaced.
    match domain::decide_enveloped(None, order_id, command, order_id, order_id) {
        Ok((Some(order), emitted)) => Ok((order, emitted)),
        Ok((None, _)) => Err(PlaceError::Internal(ExecError::Domain(
            DomainError::NotFound,
        ))),
        Err(DomainError::Invalid(msg)) => Err(PlaceError::Invalid(msg)),
        Err(e) => Err(PlaceError::Internal(e.into())),
    }
}

fn placed_log(order: &Order) {
    tracing::info!(order_id = %order.id, correlation_id = %order.id, customer_id = %order.customer_id, total = order.total, "order placed");
}

/// How often a command is decided again when another writer changed the
/// order between its load and its append.
const ATTEMPTS: usize = 3;

/// Why a command for an existing order was not carried out.
#[derive(Debug, thiserror::Error)]
pub enum CommandError {
    #[error("order {0} not found")]
    NotFound(Uuid),
    /// Not in a state the command applies to (409).
    #[error("{0}")]
    Refused(String),
    /// Bad input (422).
    #[error("{0}")]
    Invalid(String),
    /// The credential does not grant it (403).
    #[error("{0}")]
    Forbidden(String),
    #[error(transparent)]
    Internal(ExecError),
}

/// Who asks to cancel an order.
#[derive(Debug, Clone, Copy)]
pub enum Canceller<'a> {
    /// The operator (the admin token): any order.
    Operator,
    /// Whoever holds a cancel token: only the order it was issued for.
    TokenHolder(&'a str),
}

impl From<sqlx::Error> for CommandError {
    fn from(e: sqlx::Error) -> Self {
        CommandError::Internal(ExecError::Db(e))
    }
}

impl Placer {
    /// Runs `command` against order `order_id` and publishes what it
    /// decides: the order as it is afterwards (unchanged if the command
    /// changed nothing). Decided again, up to [`ATTEMPTS`] times, when a
    /// saga event changed the order at the same moment.
    pub async fn run(&self, order_id: Uuid, command: Command) -> Result<Order, CommandError> {
        let mut attempt = 0;
        loop {
            attempt += 1;
            let mut tx = self.pool.begin().await?;
            let result = store::execute(
                &mut tx,
                &self.snapshots,
                order_id,
                command.clone(),
                order_id,
                Uuid::now_v7(),
            )
            .await;
            let (state, emitted) = match result {
                Ok(v) => v,
                Err(e) => {
                    let _ = tx.rollback().await;
                    match e {
                        ExecError::Conflict(_) if attempt < ATTEMPTS => continue,
                        ExecError::Domain(DomainError::NotFound) => {
                            return Err(CommandError::NotFound(order_id));
                        }
                        ExecError::Domain(DomainError::Refused(m)) => {
                            return Err(CommandError::Refused(m));
                        }
                        ExecError::Domain(e) => return Err(CommandError::Invalid(e.to_string())),
                        e => return Err(CommandError::Internal(e)),
                    }
                }
            };
            self.publish(tx, &emitted).await.map_err(|e| match e {
                EnqueueError::TooLarge(reason) => CommandError::Invalid(reason),
                EnqueueError::Db(e) => e.into(),
            })?;
            return state.ok_or(CommandError::NotFound(order_id));
        }
    }

    /// The customer's cancel: the order is cancelled unless it is
    /// confirmed (or otherwise ended), and every service undoes its step.
    /// Only with the order's cancel token or as the operator; a token that
    /// does not cancel this order is refused whether or not the order
    /// exists (a refusal says nothing of other people's orders).
    pub async fn cancel(
        &self,
        order_id: Uuid,
        reason: String,
        by: Canceller<'_>,
    ) -> Result<Order, CommandError> {
        if let Canceller::TokenHolder(token) = by {
            let mut conn = self.pool.acquire().await?;
            if !capability::grants(&mut conn, order_id, token).await? {
                tracing::warn!(%order_id, "cancel refused: the token does not cancel this order");
                return Err(CommandError::Forbidden(format!(
                    "this cancel token does not cancel order {order_id}: present the cancelToken its placement answered with"
                )));
            }
        }
        let order = self
            .run(order_id, Command::CancelByCustomer { reason })
            .await?;
        tracing::info!(%order_id, correlation_id = %order_id, status = order.status.name(), "customer cancelled the order");
        Ok(order)
    }
}
