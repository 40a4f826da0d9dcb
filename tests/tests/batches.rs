//! Events applied in batches: a consumer lane that finds several events
//! waiting applies them in one transaction. A poison event in a batch costs
//! only itself, a crash in the middle of a batch loses and doubles nothing,
//! and one order's events keep their order from one batch to the next.
//!
//! The batches are shaped on purpose: the payment service runs one lane,
//! and the first event waits on a row lock the test holds while the others
//! queue up behind it, so the next batch holds all of them.

use anyhow::{Context, Result};
use async_nats::jetstream;
use common::{
    Envelope, Event,
    event::{
        Address, InventoryReservationFailed, OrderCancelledByCustomer, OrderLine, OrderPlaced,
        PaymentProcessed, ShipmentFailed,
    },
    topology,
};
use saga_tests::{DEADLINE, Stack, eventually};
use sqlx::{PgPool, Postgres, Transaction};
use uuid::Uuid;

const BALANCE: i64 = 10_000;

/// `event` as a producer publishes it, `version` of aggregate `aggregate_id`
/// (a new id for `None`): (subject, bytes).
fn wire(
    stack: &Stack,
    event: &Event,
    aggregate_id: Option<Uuid>,
    version: i64,
) -> (String, Vec<u8>) {
    let order_id = event.order_id();
    let aggregate_id = aggregate_id.unwrap_or_else(Uuid::now_v7).to_string();
    let envelope = Envelope::new(event, aggregate_id, version, order_id, Uuid::now_v7());
    let subject = stack.subjects.event_of(event.kind(), order_id);
    (subject, envelope.to_bytes())
}

/// An OrderPlaced of one widget at `total` for `customer`, as the order
/// service would publish it: (order id, subject, bytes).
fn placed(stack: &Stack, customer: &str, total: i64) -> (Uuid, String, Vec<u8>) {
    placed_as(stack, Uuid::now_v7(), customer, total)
}

/// The same, for `order_id`.
fn placed_as(stack: &Stack, order_id: Uuid, customer: &str, total: i64) -> (Uuid, String, Vec<u8>) {
    let event = Event::OrderPlaced(OrderPlaced {
        order_id,
        customer_id: customer.into(),
        lines: vec![OrderLine {
            product_id: "widget".into(),
            quantity: 1,
            unit_price: total,
        }],
        total,
        shipping_address: Address::example(),
    });
    let (subject, body) = wire(stack, &event, Some(order_id), 1);
    (order_id, subject, body)
}

/// Inventory's answer that it could not reserve `order_id`'s stock: payment
/// refunds the order.
fn reservation_failed(stack: &Stack, order_id: Uuid) -> (String, Vec<u8>) {
    let event = Event::InventoryReservationFailed(InventoryReservationFailed {
        order_id,
        reason: "out of stock".into(),
    });
    wire(stack, &event, None, 1)
}

/// The customer's cancel of `order_id`, as the order service publishes it.
fn cancelled(stack: &Stack, order_id: Uuid) -> (String, Vec<u8>) {
    let event = Event::OrderCancelledByCustomer(OrderCancelledByCustomer {
        order_id,
        reason: "changed my mind".into(),
    });
    wire(stack, &event, Some(order_id), 2)
}

/// Lanes of the services in the tests of lanes that lock the same rows.
const LANES: usize = 2;

/// A new order id whose events go down lane `lane` of [`LANES`].
fn on_lane(lane: usize) -> Uuid {
    loop {
        let id = Uuid::now_v7();
        if common::consumer::lane_of(id, LANES) == lane {
            return id;
        }
    }
}

/// Payment's charge of one `product` for `order_id`, as inventory takes it:
/// (subject, bytes).
fn paid(stack: &Stack, order_id: Uuid, product: &str) -> (String, Vec<u8>) {
    let event = Event::PaymentProcessed(PaymentProcessed {
        order_id,
        payment_id: Uuid::now_v7(),
        customer_id: "c".into(),
        amount: 10,
        lines: vec![OrderLine {
            product_id: product.into(),
            quantity: 1,
            unit_price: 10,
        }],
        shipping_address: Address::example(),
    });
    wire(stack, &event, None, 1)
}

/// The carrier's refusal of `order_id`'s shipment: inventory releases its
/// stock.
fn shipment_failed(stack: &Stack, order_id: Uuid) -> (String, Vec<u8>) {
    let event = Event::ShipmentFailed(ShipmentFailed {
        order_id,
        reason: "no such street".into(),
    });
    wire(stack, &event, None, 1)
}

/// The payment service's durable consumer.
async fn payment_consumer(stack: &Stack) -> Result<jetstream::consumer::PullConsumer> {
    Ok(topology::bind_consumer(
        &stack.js,
        &stack.subjects,
        topology::Durable::Service("payment"),
    )
    .await?)
}

/// Waits until the payment service holds `n` events not yet acknowledged.
async fn taken(consumer: &jetstream::consumer::PullConsumer, n: usize) -> Result<()> {
    eventually(&format!("{n} events taken"), DEADLINE, || async {
        let info = consumer.clone().info().await?.clone();
        Ok((info.num_ack_pending == n && info.num_pending == 0).then_some(()))
    })
    .await
}

/// Holds `customer`'s account row until the transaction ends (on a
/// connection of its own).
async fn lock_account(stack: &Stack, customer: &str) -> Result<Transaction<'static, Postgres>> {
    let pool = PgPool::connect(&stack.dbs.url("payment")).await?;
    let mut tx = pool.begin().await?;
    sqlx::query("SELECT 1 FROM accounts WHERE customer_id = $1 FOR UPDATE")
        .bind(customer)
        .fetch_one(&mut *tx)
        .await
        .with_context(|| format!("lock {customer}'s account"))?;
    Ok(tx)
}

/// Waits until a transaction of the payment service waits on a lock;
/// with `written`, one that has already inserted payments (events of its
/// batch before the one that waits).
async fn waiting_on_a_lock(pool: &PgPool, written: bool) -> Result<()> {
    eventually("a transaction waiting on a lock", DEADLINE, || async {
        let n: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM pg_stat_activity a
             WHERE a.datname = current_database() AND a.wait_event_type = 'Lock'
               AND (NOT $1 OR EXISTS (
                   SELECT 1 FROM pg_locks l
                   WHERE l.pid = a.pid AND l.granted AND l.mode = 'RowExclusiveLock'
                     AND l.relation = 'payments'::regclass))",
        )
        .bind(written)
        .fetch_one(pool)
        .await?;
        Ok((n > 0).then_some(()))
    })
    .await
}

/// Places an order for each of `customers` (one widget at 100 plus its
/// place), the first account being held: the service's one lane takes the
/// first order alone and waits on the account, and the others queue up
/// behind it, to be taken together as the next batch.
async fn queue_behind_the_first(
    stack: &Stack,
    consumer: &jetstream::consumer::PullConsumer,
    pool: &PgPool,
    customers: &[String],
) -> Result<Vec<Uuid>> {
    let mut orders = Vec::new();
    for (i, c) in customers.iter().enumerate() {
        let (id, subject, body) = placed(stack, c, 100 + i as i64);
        stack.publish(&subject, body).await?;
        orders.push(id);
        if i == 0 {
            waiting_on_a_lock(pool, false).await?;
        }
    }
    taken(consumer, customers.len()).await?;
    Ok(orders)
}

async fn balances(pool: &PgPool, customers: &[String]) -> Result<Vec<i64>> {
    let mut out = Vec::new();
    for c in customers {
        out.push(
            sqlx::query_scalar("SELECT balance FROM accounts WHERE customer_id = $1")
                .bind(c)
                .fetch_one(pool)
                .await?,
        );
    }
    Ok(out)
}

/// How many of each event type the stream holds for `order_id`.
async fn emitted(stack: &Stack, order_id: Uuid, event_type: &str) -> Result<usize> {
    Ok(stack
        .saga_event_types(order_id)
        .await?
        .iter()
        .filter(|t| *t == event_type)
        .count())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_poison_event_in_the_middle_of_a_batch_is_dead_lettered_alone() -> Result<()> {
    let mut stack = Stack::start_with(&[]).await?;
    let consumer = payment_consumer(&stack).await?;
    stack
        .start_service_with("payment", |l| l.config.consumer_lanes = 1)
        .await?;
    let customers: Vec<String> = (1..=9).map(|i| format!("c{i}")).collect();
    for c in &customers {
        stack.set_balance(c, BALANCE).await?;
    }
    // c5's payment can never be stored: a value the table refuses, as a
    // permanent database error.
    let pool = stack.pool("payment").await?;
    sqlx::query("ALTER TABLE payments ADD CONSTRAINT refuses_c5 CHECK (customer_id <> 'c5')")
        .execute(&pool)
        .await?;

    let held = lock_account(&stack, "c1").await?;
    let orders = queue_behind_the_first(&stack, &consumer, &pool, &customers).await?;
    held.commit().await?;

    let letters = stack.wait_for_dead_letters(1).await?;
    eventually("every other order charged", DEADLINE, || async {
        let charged: i64 = sqlx::query_scalar("SELECT count(*) FROM payments")
            .fetch_one(&pool)
            .await?;
        Ok((charged == 8).then_some(()))
    })
    .await?;
    stack.settle().await?;

    let reason = letters[0]
        .0
        .get(common::dlq::dlq_headers::REASON)
        .map(|v| v.to_string())
        .unwrap_or_default();
    assert!(
        reason.contains("permanent failure") && reason.contains("refuses_c5"),
        "{reason}"
    );
    let expected: Vec<i64> = (0..9)
        .map(|i| if i == 4 { BALANCE } else { BALANCE - 100 - i })
        .collect();
    assert_eq!(balances(&pool, &customers).await?, expected);
    for (i, id) in orders.iter().enumerate() {
        let n = emitted(&stack, *id, "PaymentProcessed").await?;
        assert_eq!(n, usize::from(i != 4), "order {i}");
    }
    // Events 2 to 9 were taken as one batch; c5 sank it, so each went on
    // its own: only c5's was ever retried.
    let m = stack.metrics("payment").await?;
    let payment = [("consumer", "payment")];
    let one_by_one = [("consumer", "payment"), ("outcome", "one_by_one")];
    assert_eq!(m.sum("saga_consumer_batches_total", &one_by_one), 1.0);
    assert_eq!(
        m.sum("saga_consumer_batched_events_total", &one_by_one),
        8.0
    );
    let by = |d| [payment[0], ("disposition", d)];
    assert_eq!(m.sum("saga_events_total", &by("applied")), 8.0);
    assert_eq!(m.sum("saga_events_total", &by("retry")), 2.0);
    assert_eq!(m.sum("saga_events_total", &by("dead_lettered")), 1.0);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_in_the_middle_of_a_batch_loses_and_doubles_nothing() -> Result<()> {
    let stack = Stack::start_with(&[]).await?;
    let consumer = payment_consumer(&stack).await?;
    let payment = stack.spawn_process("payment", &[("CONSUMER_LANES", "1")])?;
    let pool = stack.pool("payment").await?;
    stack.wait_for_table("payment", "accounts").await?;
    let customers: Vec<String> = (1..=9).map(|i| format!("c{i}")).collect();
    for c in &customers {
        sqlx::query("INSERT INTO accounts (customer_id, balance) VALUES ($1, $2)")
            .bind(c)
            .bind(BALANCE)
            .execute(&pool)
            .await?;
    }

    // c1 holds the first event. c5's order holds the batch of the eight
    // others in its middle, after c2 to c4 are charged in its transaction:
    // a payment row for it, inserted and not committed, which the batch's
    // insert of c5's payment waits on. (Not c5's account: the batch locks
    // its accounts before it charges any.)
    let first = lock_account(&stack, "c1").await?;
    let middle_order = Uuid::now_v7();
    let mut middle = PgPool::connect(&stack.dbs.url("payment"))
        .await?
        .begin()
        .await?;
    sqlx::query(
        "INSERT INTO payments (order_id, payment_id, customer_id, amount, status)
         VALUES ($1, $2, 'c5', 0, 'failed')",
    )
    .bind(middle_order)
    .bind(Uuid::now_v7())
    .execute(&mut *middle)
    .await?;
    let mut orders = Vec::new();
    for (i, c) in customers.iter().enumerate() {
        let id = if c == "c5" {
            middle_order
        } else {
            Uuid::now_v7()
        };
        let (id, subject, body) = placed_as(&stack, id, c, 100 + i as i64);
        stack.publish(&subject, body).await?;
        orders.push(id);
        if i == 0 {
            waiting_on_a_lock(&pool, false).await?;
        }
    }
    taken(&consumer, customers.len()).await?;
    first.commit().await?;
    waiting_on_a_lock(&pool, true).await?;
    payment.kill().await?;
    middle.rollback().await?;
    // The killed batch's charges went with its transaction.
    let committed: i64 = sqlx::query_scalar("SELECT count(*) FROM payments")
        .fetch_one(&pool)
        .await?;
    assert_eq!(committed, 1);

    // Redelivered to the next process (after the ack wait), each applied once.
    let _payment = stack.spawn_process("payment", &[("CONSUMER_LANES", "1")])?;
    eventually("all nine charged", DEADLINE, || async {
        let charged: i64 = sqlx::query_scalar("SELECT count(*) FROM payments")
            .fetch_one(&pool)
            .await?;
        Ok((charged == 9).then_some(()))
    })
    .await?;
    stack.settle().await?;
    let expected: Vec<i64> = (0..9).map(|i| BALANCE - 100 - i).collect();
    assert_eq!(balances(&pool, &customers).await?, expected);
    for id in &orders {
        assert_eq!(emitted(&stack, *id, "PaymentProcessed").await?, 1);
    }
    assert!(stack.dead_letters().await?.is_empty());
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_orders_events_keep_their_order_across_batches_and_lanes() -> Result<()> {
    let mut stack = Stack::start_with(&["payment"]).await?;
    let customers: Vec<String> = (0..25).map(|i| format!("c{i}")).collect();
    for c in &customers {
        stack.set_balance(c, BALANCE).await?;
    }
    stack.stop_service("payment").await?;

    // Each order placed and at once refunded, while payment is away: each
    // refund right behind its charge in the stream. Payment takes them all
    // at once when it is back, and applies them in small batches on three
    // lanes.
    let mut orders = Vec::new();
    for c in &customers {
        let (id, subject, body) = placed(&stack, c, 500);
        stack.publish(&subject, body).await?;
        let (subject, body) = reservation_failed(&stack, id);
        stack.publish(&subject, body).await?;
        orders.push(id);
    }
    stack
        .start_service_with("payment", |l| {
            l.config.consumer_lanes = 3;
            l.config.consumer_batch = 4;
            l.config.consumer_concurrency = 64;
        })
        .await?;

    let pool = stack.pool("payment").await?;
    eventually("every order refunded", DEADLINE, || async {
        let refunded: i64 =
            sqlx::query_scalar("SELECT count(*) FROM payments WHERE status = 'refunded'")
                .fetch_one(&pool)
                .await?;
        Ok((refunded == 25).then_some(()))
    })
    .await?;
    stack.settle().await?;
    assert_eq!(balances(&pool, &customers).await?, vec![BALANCE; 25]);
    for id in &orders {
        assert_eq!(emitted(&stack, *id, "PaymentProcessed").await?, 1);
        assert_eq!(emitted(&stack, *id, "PaymentRefunded").await?, 1);
    }
    // No refund was looked at before its charge: nothing was retried.
    let m = stack.metrics("payment").await?;
    let payment = [("consumer", "payment")];
    let by = |d| [payment[0], ("disposition", d)];
    assert_eq!(m.sum("saga_events_total", &by("applied")), 50.0);
    assert_eq!(m.sum("saga_events_total", &by("retry")), 0.0);
    let committed = [("consumer", "payment"), ("outcome", "committed")];
    assert!(m.sum("saga_consumer_batches_total", &committed) >= 2.0);
    assert!(stack.dead_letters().await?.is_empty());
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancels_queued_behind_a_batch_of_orders_keep_each_of_them_from_being_charged() -> Result<()>
{
    let mut stack = Stack::start_with(&["payment"]).await?;
    let customers: Vec<String> = (0..24).map(|i| format!("c{i}")).collect();
    for c in &customers {
        stack.set_balance(c, BALANCE).await?;
    }
    stack.stop_service("payment").await?;

    // While payment is away, every order is placed and every other one
    // cancelled by its customer: each cancel queued behind its order, the
    // cancelled orders among the others. Back, payment takes them in
    // batches on one lane, and asks the stream for the cancels of each
    // batch's orders at once, before the batch's transaction.
    let mut orders = Vec::new();
    for (i, c) in customers.iter().enumerate() {
        let (id, subject, body) = placed(&stack, c, 500);
        stack.publish(&subject, body).await?;
        orders.push((id, i % 2 == 1));
    }
    for (id, cancel) in &orders {
        if *cancel {
            let (subject, body) = cancelled(&stack, *id);
            stack.publish(&subject, body).await?;
        }
    }
    stack
        .start_service_with("payment", |l| {
            l.config.consumer_lanes = 1;
            l.config.consumer_batch = 8;
        })
        .await?;

    let pool = stack.pool("payment").await?;
    eventually("every order charged or never charged", DEADLINE, || async {
        let (charged, never): (i64, i64) = sqlx::query_as(
            "SELECT (SELECT count(*) FROM payments), (SELECT count(*) FROM cancelled_orders)",
        )
        .fetch_one(&pool)
        .await?;
        Ok((charged == 12 && never == 12).then_some(()))
    })
    .await?;
    stack.settle().await?;

    let expected: Vec<i64> = orders
        .iter()
        .map(|(_, cancel)| if *cancel { BALANCE } else { BALANCE - 500 })
        .collect();
    assert_eq!(balances(&pool, &customers).await?, expected);
    for (i, (id, cancel)) in orders.iter().enumerate() {
        let charged = emitted(&stack, *id, "PaymentProcessed").await?;
        assert_eq!(charged, usize::from(!cancel), "order {i}");
        assert_eq!(
            emitted(&stack, *id, "PaymentRefunded").await?,
            0,
            "order {i}"
        );
    }
    let m = stack.metrics("payment").await?;
    let committed = [("consumer", "payment"), ("outcome", "committed")];
    assert!(m.sum("saga_consumer_batches_total", &committed) >= 2.0);
    let retried = [("consumer", "payment"), ("disposition", "retry")];
    assert_eq!(m.sum("saga_events_total", &retried), 0.0);
    assert!(stack.dead_letters().await?.is_empty());
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lanes_charging_the_same_accounts_in_opposite_orders_queue_instead_of_deadlocking()
-> Result<()> {
    let mut stack = Stack::start_with(&["payment"]).await?;
    let customers = ["a".to_string(), "b".to_string()];
    for c in &customers {
        stack.set_balance(c, BALANCE).await?;
    }
    stack.stop_service("payment").await?;

    // While payment is away, orders for its two lanes: the first lane's
    // charge a then b, the second's b then a, round after round. Each lane
    // takes several at once when payment is back, so both lanes' batches
    // want both accounts at the same time, in opposite orders.
    const ROUNDS: usize = 12;
    for _ in 0..ROUNDS {
        for (lane, accounts) in [(0, ["a", "b"]), (1, ["b", "a"])] {
            for customer in accounts {
                let (_, subject, body) = placed_as(&stack, on_lane(lane), customer, 10);
                stack.publish(&subject, body).await?;
            }
        }
    }
    stack
        .start_service_with("payment", |l| {
            l.config.consumer_lanes = LANES;
            l.config.consumer_batch = 8;
            l.config.consumer_concurrency = 64;
        })
        .await?;

    let pool = stack.pool("payment").await?;
    let orders = (LANES * ROUNDS * 2) as i64;
    eventually("every order charged", DEADLINE, || async {
        let charged: i64 = sqlx::query_scalar("SELECT count(*) FROM payments")
            .fetch_one(&pool)
            .await?;
        Ok((charged == orders).then_some(()))
    })
    .await?;
    stack.settle().await?;
    let each = BALANCE - 10 * orders / 2;
    assert_eq!(balances(&pool, &customers).await?, vec![each, each]);

    no_batch_went_one_by_one(&stack, "payment").await?;
    let m = stack.metrics("payment").await?;
    let applied = [("consumer", "payment"), ("disposition", "applied")];
    assert_eq!(m.sum("saga_events_total", &applied), orders as f64);
    assert!(stack.dead_letters().await?.is_empty());
    Ok(())
}

/// Inventory on [`LANES`] lanes, taking up to 8 events a batch.
async fn start_inventory(stack: &mut Stack) -> Result<()> {
    stack
        .start_service_with("inventory", |l| {
            l.config.consumer_lanes = LANES;
            l.config.consumer_batch = 8;
            l.config.consumer_concurrency = 64;
        })
        .await
}

/// Every batch `service` took committed: none lost its transaction to a
/// deadlock (or a lock wait given up) and went one by one.
async fn no_batch_went_one_by_one(stack: &Stack, service: &str) -> Result<()> {
    let m = stack.metrics(service).await?;
    let by = |outcome| [("consumer", service), ("outcome", outcome)];
    assert_eq!(m.sum("saga_consumer_batches_total", &by("one_by_one")), 0.0);
    assert!(m.sum("saga_consumer_batches_total", &by("committed")) >= 2.0);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lanes_reserving_and_releasing_the_same_stock_in_opposite_orders_queue_instead_of_deadlocking()
-> Result<()> {
    const STOCK: i64 = 1_000;
    const ROUNDS: usize = 24;
    let mut stack = Stack::start_with(&["inventory"]).await?;
    for p in ["p", "q"] {
        stack.set_stock(p, STOCK).await?;
    }
    stack.stop_service("inventory").await?;
    // While inventory is away, orders for its two lanes: the first lane's
    // reserve p then q, the second's q then p, round after round.
    let mut orders = Vec::new();
    for _ in 0..ROUNDS {
        for (lane, products) in [(0, ["p", "q"]), (1, ["q", "p"])] {
            for product in products {
                let id = on_lane(lane);
                let (subject, body) = paid(&stack, id, product);
                stack.publish(&subject, body).await?;
                orders.push(id);
            }
        }
    }
    start_inventory(&mut stack).await?;
    let pool = stack.pool("inventory").await?;
    let count = |status: &'static str| {
        let pool = pool.clone();
        async move {
            let n: i64 = sqlx::query_scalar("SELECT count(*) FROM reservations WHERE status = $1")
                .bind(status)
                .fetch_one(&pool)
                .await?;
            anyhow::Ok(n as usize)
        }
    };
    eventually("every order reserved", DEADLINE, || async {
        Ok((count("reserved").await? == orders.len()).then_some(()))
    })
    .await?;
    stack.settle().await?;
    no_batch_went_one_by_one(&stack, "inventory").await?;

    // Then every shipment fails, in the same order: the first lane
    // releases p then q, the second q then p (rows its events do not
    // name: the batch finds them in the reservations).
    stack.stop_service("inventory").await?;
    for id in &orders {
        let (subject, body) = shipment_failed(&stack, *id);
        stack.publish(&subject, body).await?;
    }
    start_inventory(&mut stack).await?;
    eventually("every reservation released", DEADLINE, || async {
        Ok((count("released").await? == orders.len()).then_some(()))
    })
    .await?;
    stack.settle().await?;
    no_batch_went_one_by_one(&stack, "inventory").await?;
    let available: Vec<i64> =
        sqlx::query_scalar("SELECT available FROM stock WHERE product_id IN ('p', 'q')")
            .fetch_all(&pool)
            .await?;
    assert_eq!(available, vec![STOCK, STOCK]);
    assert!(stack.dead_letters().await?.is_empty());
    Ok(())
}
