//! `sagactl audit`: the cross-service invariants, checked from each
//! service's own database. What it reads is each service's record of the
//! saga — the order's status (the read model), the payment, the
//! reservation, the shipment, the stock counters — and what it checks is
//! that they tell one story:
//!
//! - every saga has ended, or started less than `--in-flight-for` ago;
//! - a confirmed order was charged its total, a cancelled (or manually
//!   compensated) one was not charged or was refunded;
//! - a confirmed order holds its quantities in a reservation, a cancelled
//!   one holds nothing;
//! - a shipment was created for every confirmed order and for no other;
//! - each product's reserved counter is the sum of its reservations;
//! - per customer, charged minus refunded is the total of the confirmed
//!   orders; per product, the quantity held is the confirmed quantity.
//!
//! A saga still in flight, or halted awaiting an operator
//! (REQUIRES_INTERVENTION), is not held to its end state: it is counted and
//! listed. The checks are pure ([`check`]); reading is at the edge
//! ([`read`]).

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    io::Write,
    time::Duration,
};

use anyhow::{Context, Result};
use common::event::OrderLine;
use sqlx::{Connection as _, PgConnection, types::Json};
use uuid::Uuid;

use crate::CALL_TIMEOUT;

/// An order as the order service's read model has it.
#[derive(Debug, Clone)]
pub struct Order {
    pub id: Uuid,
    pub customer: String,
    pub status: String,
    pub total: i64,
    /// Quantity per product.
    pub lines: BTreeMap<String, i64>,
    /// Since the saga started.
    pub age: Duration,
}

/// What each service holds, as read.
#[derive(Debug, Clone, Default)]
pub struct Records {
    pub orders: Vec<Order>,
    /// Ids of orders the event store holds that the read model has not
    /// applied yet (placed a moment ago): in flight.
    pub unprojected: BTreeSet<Uuid>,
    /// order id -> (customer, amount, status).
    pub payments: HashMap<Uuid, (String, i64, String)>,
    /// order id -> (quantity per product, status).
    pub reservations: HashMap<Uuid, (BTreeMap<String, i64>, String)>,
    /// order id -> status.
    pub shipments: HashMap<Uuid, String>,
    /// product -> its reserved counter.
    pub reserved: BTreeMap<String, i64>,
}

/// One disagreement: which check, about what (an order, a customer, a
/// product), and what the services say.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finding {
    pub check: &'static str,
    pub id: String,
    pub detail: String,
}

/// The outcome: what was checked and what disagrees.
#[derive(Debug, Default)]
pub struct Report {
    /// check -> how many things it looked at.
    pub checked: BTreeMap<&'static str, usize>,
    pub findings: Vec<Finding>,
    /// Sagas not yet ended, younger than the threshold.
    pub in_flight: Vec<Uuid>,
    /// Sagas halted awaiting an operator.
    pub awaiting_operator: Vec<Uuid>,
}

pub const SAGAS_ENDED: &str = "every saga ended";
pub const PAYMENTS: &str = "payment agrees with order";
pub const RESERVATIONS: &str = "reservation agrees with order";
pub const SHIPMENTS: &str = "shipment agrees with order";
pub const RESERVED_COUNTERS: &str = "reserved stock adds up";
pub const MONEY: &str = "money per customer";
pub const STOCK: &str = "stock per product";

/// The order of the table.
const CHECKS: [&str; 7] = [
    SAGAS_ENDED,
    PAYMENTS,
    RESERVATIONS,
    SHIPMENTS,
    RESERVED_COUNTERS,
    MONEY,
    STOCK,
];

/// How a saga stands for the audit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Standing {
    Confirmed,
    /// Cancelled or manually compensated: nothing may stay taken.
    Undone,
    /// Pending, or awaiting an operator: no end state to hold it to.
    Open,
}

fn standing(status: &str) -> Standing {
    match status {
        "CONFIRMED" => Standing::Confirmed,
        "CANCELLED" | "MANUALLY_COMPENSATED" => Standing::Undone,
        _ => Standing::Open,
    }
}

/// An audit under way: what the pages read so far found, and the totals
/// the invariants compare once every page is in.
#[derive(Debug)]
pub struct Audit {
    in_flight_for: Duration,
    report: Report,
    /// customer -> (charged and not refunded, confirmed orders' total).
    charged: BTreeMap<String, (i64, i64)>,
    /// product -> (held by reservations of ended sagas, confirmed quantity).
    taken: BTreeMap<String, (i64, i64)>,
    /// product -> held by every reservation still reserved.
    held: BTreeMap<String, i64>,
}

/// Checks `records` in one page; a saga not ended counts as in flight
/// while younger than `in_flight_for`.
pub fn check(records: &Records, in_flight_for: Duration) -> Report {
    let mut audit = Audit::new(in_flight_for);
    audit.page(records);
    audit.finish(&records.reserved)
}

impl Audit {
    pub fn new(in_flight_for: Duration) -> Audit {
        Audit {
            in_flight_for,
            report: Report::default(),
            charged: BTreeMap::new(),
            taken: BTreeMap::new(),
            held: BTreeMap::new(),
        }
    }

    fn counted(&mut self, check: &'static str, n: usize) {
        *self.report.checked.entry(check).or_default() += n;
    }

    /// A finding of `check` for each key whose two figures differ.
    fn compare(
        &mut self,
        check: &'static str,
        figures: BTreeMap<String, (i64, i64)>,
        say: impl Fn(i64, i64) -> String,
    ) {
        self.counted(check, figures.len());
        for (id, (a, b)) in figures {
            if a != b {
                let detail = say(a, b);
                self.report.findings.push(Finding { check, id, detail });
            }
        }
    }

    /// Checks one page: the orders of a range of ids and every other
    /// service's records in that range (`reserved` is not used here).
    pub fn page(&mut self, records: &Records) {
        let find = |check: &'static str, id: String, detail: String| Finding { check, id, detail };
        let known: HashMap<Uuid, &Order> = records.orders.iter().map(|o| (o.id, o)).collect();
        // Orders the other services name: each must be known to the order
        // service (or be on its way to the read model).
        let open = |id: &Uuid| {
            known.get(id).map_or(records.unprojected.contains(id), |o| {
                standing(&o.status) == Standing::Open
            })
        };

        for o in &records.orders {
            match o.status.as_str() {
                "PENDING" if o.age >= self.in_flight_for => self.report.findings.push(find(
                    SAGAS_ENDED,
                    o.id.to_string(),
                    format!("pending for {}s", o.age.as_secs()),
                )),
                "PENDING" => self.report.in_flight.push(o.id),
                "REQUIRES_INTERVENTION" => self.report.awaiting_operator.push(o.id),
                _ => {}
            }
        }
        self.report
            .in_flight
            .extend(records.unprojected.iter().copied());
        self.counted(
            SAGAS_ENDED,
            records.orders.len() + records.unprojected.len(),
        );

        // Each order's record in payment, inventory and shipping against its
        // status: a confirmed order has the record it needs, an undone one
        // keeps nothing taken.
        let agreement = Agreement {
            orders: &records.orders,
            known: &known,
            open: &open,
        };
        let payments = agreement.judge(PAYMENTS, "payment", &records.payments, payment_mismatch);
        let reservations = agreement.judge(
            RESERVATIONS,
            "reservation",
            &records.reservations,
            reservation_mismatch,
        );
        let shipments =
            agreement.judge(SHIPMENTS, "shipment", &records.shipments, shipment_mismatch);
        for (check, checked, found) in [payments, reservations, shipments] {
            self.counted(check, checked);
            self.report.findings.extend(found);
        }

        self.add_totals(records, &open);
    }

    /// Adds the totals the invariants speak of, over sagas that ended
    /// (not `open`); and what every reservation still holds, for
    /// inventory's counters.
    fn add_totals(&mut self, records: &Records, open: &dyn Fn(&Uuid) -> bool) {
        let ended = |id: &Uuid| !open(id);
        for (id, (customer, amount, status)) in &records.payments {
            if status == "charged" && ended(id) {
                self.charged.entry(customer.clone()).or_default().0 += amount;
            }
        }
        for (id, (lines, status)) in &records.reservations {
            if status == "reserved" {
                for (product, q) in lines {
                    *self.held.entry(product.clone()).or_default() += q;
                    if ended(id) {
                        self.taken.entry(product.clone()).or_default().0 += q;
                    }
                }
            }
        }
        let confirmed = records.orders.iter();
        for o in confirmed.filter(|o| standing(&o.status) == Standing::Confirmed) {
            self.charged.entry(o.customer.clone()).or_default().1 += o.total;
            for (product, q) in &o.lines {
                self.taken.entry(product.clone()).or_default().1 += q;
            }
        }
    }

    /// The invariants over every page, with inventory's `reserved`
    /// counters (product -> counter): the report.
    pub fn finish(mut self, reserved: &BTreeMap<String, i64>) -> Report {
        let held = std::mem::take(&mut self.held);
        let mut counters: BTreeMap<String, (i64, i64)> = BTreeMap::new();
        for (product, counter) in reserved {
            counters.entry(product.clone()).or_default().0 = *counter;
        }
        for (product, sum) in held {
            counters.entry(product).or_default().1 = sum;
        }
        self.compare(RESERVED_COUNTERS, counters, |counter, sum| {
            format!("reserved counter {counter}, reservations hold {sum}")
        });
        let charged = std::mem::take(&mut self.charged);
        self.compare(MONEY, charged, |money, confirmed| {
            format!("charged minus refunded {money}, confirmed orders total {confirmed}")
        });
        let taken = std::mem::take(&mut self.taken);
        self.compare(STOCK, taken, |held, confirmed| {
            format!("held {held}, confirmed quantity {confirmed}")
        });
        self.report
    }
}

/// What a service's record of an order must agree with.
struct Agreement<'a> {
    orders: &'a [Order],
    known: &'a HashMap<Uuid, &'a Order>,
    /// Whether an order is not held to an end state (or on its way).
    open: &'a dyn Fn(&Uuid) -> bool,
}

/// A record's status, to name one of an order the order service lacks.
trait Status {
    fn status(&self) -> &str;
}

impl Status for (String, i64, String) {
    fn status(&self) -> &str {
        &self.2
    }
}

impl Status for (BTreeMap<String, i64>, String) {
    fn status(&self) -> &str {
        &self.1
    }
}

impl Status for String {
    fn status(&self) -> &str {
        self
    }
}

impl Agreement<'_> {
    /// Checks one service's records (`what`, keyed by order) against the
    /// orders: every record, and every confirmed order (which needs one).
    /// `mismatch` says what disagrees for an order that has ended.
    fn judge<R: Status>(
        &self,
        check: &'static str,
        what: &str,
        records: &HashMap<Uuid, R>,
        mismatch: impl Fn(&Order, Option<&R>) -> Option<String>,
    ) -> (&'static str, usize, Vec<Finding>) {
        let mut ids: BTreeSet<Uuid> = records.keys().copied().collect();
        let confirmed = self
            .orders
            .iter()
            .filter(|o| standing(&o.status) == Standing::Confirmed);
        ids.extend(confirmed.map(|o| o.id));
        let mut found = Vec::new();
        for id in &ids {
            if (self.open)(id) {
                continue;
            }
            let record = records.get(id);
            let detail = match self.known.get(id) {
                Some(o) => mismatch(o, record),
                None => record.map(|r| {
                    format!(
                        "{what} {} for an order the order service does not know",
                        r.status()
                    )
                }),
            };
            if let Some(detail) = detail {
                found.push(Finding {
                    check,
                    id: id.to_string(),
                    detail,
                });
            }
        }
        (check, ids.len(), found)
    }
}

/// `widget×2, gadget×1`.
fn quantities(lines: &BTreeMap<String, i64>) -> String {
    let each: Vec<String> = lines.iter().map(|(p, q)| format!("{p}×{q}")).collect();
    each.join(", ")
}

/// Quantity per product of order lines (a product on two lines adds up).
fn per_product(lines: &[OrderLine]) -> BTreeMap<String, i64> {
    let mut out = BTreeMap::new();
    for l in lines {
        *out.entry(l.product_id.clone()).or_default() += l.quantity;
    }
    out
}

/// Where each service's database is: service name -> URL.
pub type Databases = BTreeMap<String, String>;

async fn connect(databases: &Databases, service: &str) -> Result<PgConnection> {
    let url = databases
        .get(service)
        .with_context(|| format!("no database given for {service}"))?;
    tokio::time::timeout(CALL_TIMEOUT, PgConnection::connect(url))
        .await
        .map_err(|_| {
            crate::Failure::Unreachable(format!(
                "{service}'s database: no answer within {CALL_TIMEOUT:?}"
            ))
        })?
        .map_err(|e| crate::failure::of_database(e, &format!("connecting to {service}'s database")))
}

/// `query`, with [`CALL_TIMEOUT`]; `what` names it in the error.
async fn within<T>(what: &str, query: impl Future<Output = sqlx::Result<T>>) -> Result<T> {
    tokio::time::timeout(CALL_TIMEOUT, query)
        .await
        .ok()
        .with_context(|| format!("reading {what}: no answer within {CALL_TIMEOUT:?}"))?
        .with_context(|| format!("reading {what}"))
}

/// An order row as read.
#[derive(sqlx::FromRow)]
struct OrderRow {
    order_id: Uuid,
    customer_id: String,
    status: String,
    total: i64,
    lines: Json<Vec<OrderLine>>,
    age: f64,
}

/// The four services' databases, open.
struct Connections {
    order: PgConnection,
    payment: PgConnection,
    inventory: PgConnection,
    shipping: PgConnection,
}

/// A range of order ids, `(after, upto]`; unbounded where `None`.
#[derive(Debug, Clone, Copy)]
struct Range {
    after: Option<Uuid>,
    upto: Option<Uuid>,
}

/// The condition on `order_id` for a range bound as `$1`, `$2`.
const IN_RANGE: &str =
    "($1::uuid IS NULL OR order_id > $1) AND ($2::uuid IS NULL OR order_id <= $2)";

/// Audits every order, a page of `page` order ids at a time (with every
/// other service's records in the same range of ids), then inventory's
/// counters: the report. Exact when nothing moves; while sagas run, what
/// changed between two reads may show (a saga in flight is not held to an
/// end state, a counter read after its reservations may differ).
pub async fn run(databases: &Databases, in_flight_for: Duration, page: u32) -> Result<Report> {
    let mut db = Connections {
        order: connect(databases, "order").await?,
        payment: connect(databases, "payment").await?,
        inventory: connect(databases, "inventory").await?,
        shipping: connect(databases, "shipping").await?,
    };
    let mut audit = Audit::new(in_flight_for);
    let mut after = None;
    // Its progress, by orders read (a bar on a terminal, lines otherwise).
    let total: i64 = within(
        "orders",
        sqlx::query_scalar("SELECT count(*) FROM orders").fetch_one(&mut db.order),
    )
    .await?;
    let mut progress = common::progress::Progress::stderr("audit", "orders", total as u64);
    let mut read_so_far = 0;
    loop {
        // The page ends at the page-th order id after the last page; the
        // last page takes everything after.
        let sql = "SELECT order_id FROM orders WHERE ($1::uuid IS NULL OR order_id > $1)
                   ORDER BY order_id OFFSET $2 LIMIT 1";
        let query = sqlx::query_scalar(sql)
            .bind(after)
            .bind(i64::from(page.max(1)) - 1);
        let upto: Option<Uuid> = within("orders", query.fetch_optional(&mut db.order)).await?;
        let range = Range { after, upto };
        let records = read(&mut db, range).await?;
        read_so_far += records.orders.len() as u64;
        progress.set(read_so_far);
        audit.page(&records);
        match upto {
            Some(id) => after = Some(id),
            None => break,
        }
    }
    progress.finish();
    let sql = "SELECT product_id, reserved FROM stock";
    let reserved: Vec<(String, i64)> =
        within("stock", sqlx::query_as(sql).fetch_all(&mut db.inventory)).await?;
    Ok(audit.finish(&reserved.into_iter().collect()))
}

/// Reads what each service holds in `range`. The other services first, the
/// orders last: an order another service names was placed before it was read.
async fn read(db: &mut Connections, range: Range) -> Result<Records> {
    let mut records = Records::default();
    let bound = |sql: &str| format!("{sql} WHERE {IN_RANGE}");
    let sql = bound("SELECT order_id, customer_id, amount, status FROM payments");
    let query = sqlx::query_as(sqlx::AssertSqlSafe(sql))
        .bind(range.after)
        .bind(range.upto);
    let payments: Vec<(Uuid, String, i64, String)> =
        within("payments", query.fetch_all(&mut db.payment)).await?;
    records.payments = payments
        .into_iter()
        .map(|(id, customer, amount, status)| (id, (customer, amount, status)))
        .collect();

    let sql = bound("SELECT order_id, lines, status FROM reservations");
    let query = sqlx::query_as(sqlx::AssertSqlSafe(sql))
        .bind(range.after)
        .bind(range.upto);
    let reservations: Vec<(Uuid, Json<Vec<OrderLine>>, String)> =
        within("reservations", query.fetch_all(&mut db.inventory)).await?;
    records.reservations = reservations
        .into_iter()
        .map(|(id, lines, status)| (id, (per_product(&lines), status)))
        .collect();

    let sql = bound("SELECT order_id, status FROM shipments");
    let query = sqlx::query_as(sqlx::AssertSqlSafe(sql))
        .bind(range.after)
        .bind(range.upto);
    let shipments: Vec<(Uuid, String)> =
        within("shipments", query.fetch_all(&mut db.shipping)).await?;
    records.shipments = shipments.into_iter().collect();

    let sql = bound(
        "SELECT order_id, customer_id, status, total, lines,
                extract(epoch FROM now() - created_at)::float8 AS age
         FROM orders",
    );
    let query = sqlx::query_as(sqlx::AssertSqlSafe(sql))
        .bind(range.after)
        .bind(range.upto);
    let orders: Vec<OrderRow> = within("orders", query.fetch_all(&mut db.order)).await?;
    records.orders = orders
        .into_iter()
        .map(|o| Order {
            id: o.order_id,
            customer: o.customer_id,
            status: o.status,
            total: o.total,
            lines: per_product(&o.lines),
            age: Duration::try_from_secs_f64(o.age).unwrap_or_default(),
        })
        .collect();
    // Orders named elsewhere but not in the read model: placed, and on
    // their way to it if the event store has them.
    let known: BTreeSet<Uuid> = records.orders.iter().map(|o| o.id).collect();
    let named: BTreeSet<Uuid> = (records.payments.keys())
        .chain(records.reservations.keys())
        .chain(records.shipments.keys())
        .filter(|id| !known.contains(id))
        .copied()
        .collect();
    if !named.is_empty() {
        let named: Vec<Uuid> = named.into_iter().collect();
        let sql = "SELECT DISTINCT order_id FROM order_events WHERE order_id = ANY($1)";
        let query = sqlx::query_scalar(sql)
            .bind(&named)
            .fetch_all(&mut db.order);
        let stored: Vec<Uuid> = within("order events", query).await?;
        records.unprojected = stored.into_iter().collect();
    }
    Ok(records)
}

/// Prints the report: a table of checks, the sagas not held to an end
/// state, and every finding with its id. An error when anything disagrees.
pub fn print(
    report: &Report,
    in_flight_for: Duration,
    json: bool,
    out: &mut (dyn Write + Send),
) -> Result<()> {
    let mut wrong: BTreeMap<&str, usize> = BTreeMap::new();
    for f in &report.findings {
        *wrong.entry(f.check).or_default() += 1;
    }
    if json {
        let checks: Vec<serde_json::Value> = CHECKS
            .iter()
            .map(|check| {
                serde_json::json!({
                    "check": check,
                    "checked": report.checked.get(check).copied().unwrap_or(0),
                    "mismatches": wrong.get(check).copied().unwrap_or(0),
                })
            })
            .collect();
        let findings: Vec<serde_json::Value> = report
            .findings
            .iter()
            .map(|f| serde_json::json!({"check": f.check, "id": f.id, "detail": f.detail}))
            .collect();
        let shown = serde_json::json!({
            "invariantsHold": report.findings.is_empty(),
            "checks": checks,
            "findings": findings,
            "inFlightForSeconds": in_flight_for.as_secs(),
            "inFlight": report.in_flight,
            "awaitingOperator": report.awaiting_operator,
        });
        writeln!(out, "{shown}")?;
    } else {
        print_table(report, &wrong, in_flight_for, out)?;
    }
    match report.findings.len() {
        0 => Ok(()),
        n => Err(crate::Failure::Mismatch(n).into()),
    }
}

/// The audit as a table, then the sagas awaiting an operator and every
/// mismatch.
fn print_table(
    report: &Report,
    wrong: &BTreeMap<&str, usize>,
    in_flight_for: Duration,
    out: &mut (dyn Write + Send),
) -> Result<()> {
    writeln!(out, "{:<32} {:>9} {:>11}", "CHECK", "CHECKED", "MISMATCHES")?;
    for check in CHECKS {
        let n = wrong.get(check).copied().unwrap_or(0);
        writeln!(
            out,
            "{check:<32} {:>9} {:>11}",
            report.checked.get(check).copied().unwrap_or(0),
            if n == 0 {
                "ok".to_string()
            } else {
                n.to_string()
            }
        )?;
    }
    writeln!(
        out,
        "\nin flight (started less than {}s ago): {}",
        in_flight_for.as_secs(),
        report.in_flight.len()
    )?;
    writeln!(
        out,
        "awaiting an operator (REQUIRES_INTERVENTION): {}",
        report.awaiting_operator.len()
    )?;
    for id in &report.awaiting_operator {
        writeln!(out, "  {id}")?;
    }
    if report.findings.is_empty() {
        writeln!(out, "\nall invariants hold")?;
        return Ok(());
    }
    writeln!(out, "\nMISMATCHES")?;
    for f in &report.findings {
        writeln!(out, "  {}: {}: {}", f.check, f.id, f.detail)?;
    }
    Ok(())
}

/// How an order's payment disagrees with its status, if it does.
fn payment_mismatch(o: &Order, p: Option<&(String, i64, String)>) -> Option<String> {
    match (standing(&o.status), p) {
        (Standing::Confirmed, Some((_, amount, status)))
            if status == "charged" && *amount == o.total =>
        {
            None
        }
        (Standing::Confirmed, Some((_, amount, status))) => Some(format!(
            "order CONFIRMED for {}, payment {status} ({amount})",
            o.total
        )),
        (Standing::Confirmed, None) => Some(format!("order CONFIRMED for {}, no payment", o.total)),
        (_, Some((_, amount, status))) if status == "charged" => Some(format!(
            "order {}, yet {amount} charged and not refunded",
            o.status
        )),
        _ => None,
    }
}

/// How an order's reservation disagrees with its status, if it does.
fn reservation_mismatch(o: &Order, r: Option<&(BTreeMap<String, i64>, String)>) -> Option<String> {
    match (standing(&o.status), r) {
        (Standing::Confirmed, Some((lines, status)))
            if status == "reserved" && *lines == o.lines =>
        {
            None
        }
        (Standing::Confirmed, Some((lines, status))) => Some(format!(
            "order CONFIRMED for {}, reservation {status} of {}",
            quantities(&o.lines),
            quantities(lines)
        )),
        (Standing::Confirmed, None) => Some(format!(
            "order CONFIRMED for {}, no reservation",
            quantities(&o.lines)
        )),
        (_, Some((lines, status))) if status == "reserved" => Some(format!(
            "order {}, yet {} still reserved",
            o.status,
            quantities(lines)
        )),
        _ => None,
    }
}

/// How an order's shipment disagrees with its status, if it does.
fn shipment_mismatch(o: &Order, s: Option<&String>) -> Option<String> {
    match (standing(&o.status), s.map(String::as_str)) {
        (Standing::Confirmed, Some("created")) => None,
        (Standing::Confirmed, s) => Some(format!(
            "order CONFIRMED, shipment {}",
            s.unwrap_or("missing")
        )),
        (_, Some("created")) => Some(format!("order {}, yet a shipment", o.status)),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINUTE: Duration = Duration::from_secs(60);

    fn id(n: u128) -> Uuid {
        Uuid::from_u128(n)
    }

    fn order(n: u128, status: &str, total: i64, widgets: i64) -> Order {
        Order {
            id: id(n),
            customer: "alice".into(),
            status: status.into(),
            total,
            lines: BTreeMap::from([("widget".to_string(), widgets)]),
            age: Duration::from_secs(5),
        }
    }

    fn widgets(n: i64) -> BTreeMap<String, i64> {
        BTreeMap::from([("widget".to_string(), n)])
    }

    /// A confirmed order (1) and a cancelled one (2) whose compensation ran,
    /// as the services record them.
    fn consistent() -> Records {
        Records {
            orders: vec![order(1, "CONFIRMED", 300, 3), order(2, "CANCELLED", 100, 1)],
            unprojected: BTreeSet::new(),
            payments: HashMap::from([
                (id(1), ("alice".into(), 300, "charged".into())),
                (id(2), ("alice".into(), 100, "refunded".into())),
            ]),
            reservations: HashMap::from([
                (id(1), (widgets(3), "reserved".into())),
                (id(2), (widgets(1), "released".into())),
            ]),
            shipments: HashMap::from([(id(1), "created".into())]),
            reserved: BTreeMap::from([("widget".into(), 3)]),
        }
    }

    fn checks(report: &Report) -> Vec<(&'static str, String)> {
        let found = report.findings.iter();
        found.map(|f| (f.check, f.id.clone())).collect()
    }

    #[test]
    fn records_that_tell_one_story_pass() {
        let report = check(&consistent(), MINUTE);
        assert_eq!(report.findings, []);
        assert_eq!(report.checked[PAYMENTS], 2);
        assert_eq!(report.checked[MONEY], 1);
    }

    #[test]
    fn a_refund_that_never_happened_is_named_by_order_and_customer() {
        let mut records = consistent();
        records.payments.get_mut(&id(2)).unwrap().2 = "charged".into();
        let report = check(&records, MINUTE);
        assert_eq!(
            checks(&report),
            [(PAYMENTS, id(2).to_string()), (MONEY, "alice".into())]
        );
        assert!(
            report.findings[1].detail.contains("400"),
            "{:?}",
            report.findings
        );
    }

    #[test]
    fn stock_left_reserved_for_a_cancelled_order_is_named_and_its_counter_checked() {
        let mut records = consistent();
        records.reservations.get_mut(&id(2)).unwrap().1 = "reserved".into();
        let report = check(&records, MINUTE);
        assert_eq!(
            checks(&report),
            [
                (RESERVATIONS, id(2).to_string()),
                (RESERVED_COUNTERS, "widget".into()),
                (STOCK, "widget".into()),
            ]
        );
    }

    #[test]
    fn a_shipment_for_a_cancelled_order_and_a_confirmed_one_without_are_named() {
        let mut records = consistent();
        records.shipments = HashMap::from([(id(2), "created".into())]);
        let report = check(&records, MINUTE);
        assert_eq!(
            checks(&report),
            [
                (SHIPMENTS, id(1).to_string()),
                (SHIPMENTS, id(2).to_string())
            ]
        );
    }

    #[test]
    fn a_saga_pending_past_the_threshold_is_stuck_and_a_young_one_in_flight() {
        let mut records = consistent();
        let mut young = order(3, "PENDING", 100, 1);
        young.age = Duration::from_secs(59);
        let mut old = order(4, "PENDING", 100, 1);
        old.age = Duration::from_secs(61);
        // Charged, not yet confirmed: not held to an end state.
        records
            .payments
            .insert(id(3), ("alice".into(), 100, "charged".into()));
        records.orders.extend([young, old]);
        let report = check(&records, MINUTE);
        assert_eq!(checks(&report), [(SAGAS_ENDED, id(4).to_string())]);
        assert_eq!(report.in_flight, [id(3)]);
    }

    #[test]
    fn a_halted_saga_is_listed_not_held_to_an_end_state() {
        let mut records = consistent();
        records.orders[1].status = "REQUIRES_INTERVENTION".into();
        records.payments.get_mut(&id(2)).unwrap().2 = "charged".into();
        let report = check(&records, MINUTE);
        assert_eq!(report.findings, []);
        assert_eq!(report.awaiting_operator, [id(2)]);
    }

    #[test]
    fn records_of_an_order_the_order_service_never_had_are_named() {
        let mut records = consistent();
        records
            .payments
            .insert(id(9), ("mallory".into(), 50, "charged".into()));
        let report = check(&records, MINUTE);
        assert_eq!(
            checks(&report),
            [(PAYMENTS, id(9).to_string()), (MONEY, "mallory".into())]
        );
        // One on its way to the read model is in flight instead.
        records.unprojected.insert(id(9));
        let report = check(&records, MINUTE);
        assert_eq!(report.findings, []);
        assert_eq!(report.in_flight, [id(9)]);
    }

    #[test]
    fn a_confirmed_order_charged_the_wrong_amount_or_holding_the_wrong_lines_is_named() {
        let mut records = consistent();
        records.payments.get_mut(&id(1)).unwrap().1 = 299;
        records.reservations.get_mut(&id(1)).unwrap().0 = widgets(2);
        records.reserved.insert("widget".into(), 2);
        let report = check(&records, MINUTE);
        assert_eq!(
            checks(&report),
            [
                (PAYMENTS, id(1).to_string()),
                (RESERVATIONS, id(1).to_string()),
                (MONEY, "alice".into()),
                (STOCK, "widget".into()),
            ]
        );
    }

    /// The entries of `map` about the orders `ids`.
    fn of<V: Clone>(map: &HashMap<Uuid, V>, ids: &[Uuid]) -> HashMap<Uuid, V> {
        let kept = map.iter().filter(|(id, _)| ids.contains(id));
        kept.map(|(id, v)| (*id, v.clone())).collect()
    }

    /// The records of the orders `ids` (and other services' records of them).
    fn only(records: &Records, ids: &[Uuid]) -> Records {
        let orders = records.orders.iter().filter(|o| ids.contains(&o.id));
        let unprojected = records.unprojected.iter().filter(|id| ids.contains(id));
        Records {
            orders: orders.cloned().collect(),
            unprojected: unprojected.copied().collect(),
            payments: of(&records.payments, ids),
            reservations: of(&records.reservations, ids),
            shipments: of(&records.shipments, ids),
            reserved: BTreeMap::new(),
        }
    }

    #[test]
    fn an_audit_in_pages_finds_what_one_page_finds() {
        let mut records = consistent();
        records.payments.get_mut(&id(2)).unwrap().2 = "charged".into();
        records.reservations.get_mut(&id(2)).unwrap().1 = "reserved".into();
        records
            .payments
            .insert(id(9), ("mallory".into(), 50, "charged".into()));
        let whole = check(&records, MINUTE);
        let mut audit = Audit::new(MINUTE);
        for page in [vec![id(1)], vec![id(2)], vec![id(9)]] {
            audit.page(&only(&records, &page));
        }
        let paged = audit.finish(&records.reserved);
        let sorted = |r: &Report| {
            let mut found = checks(r);
            found.sort();
            found
        };
        assert_eq!(sorted(&paged), sorted(&whole));
        assert_eq!(paged.checked, whole.checked);
        assert_eq!(whole.findings.len(), 7, "{:?}", whole.findings);
    }

    #[test]
    fn the_table_names_every_check_and_a_mismatch_is_an_error() {
        let mut out = Vec::new();
        print(&check(&consistent(), MINUTE), MINUTE, false, &mut out).unwrap();
        let printed = String::from_utf8(out).unwrap();
        for c in CHECKS {
            assert!(printed.contains(c), "{printed}");
        }
        assert!(printed.contains("all invariants hold"));
        let mut records = consistent();
        records.shipments.clear();
        let mut out = Vec::new();
        let err = print(&check(&records, MINUTE), MINUTE, false, &mut out).unwrap_err();
        assert!(err.to_string().contains("1 mismatch"), "{err}");
        assert_eq!(crate::exit_code(&err), 5);
        let printed = String::from_utf8(out).unwrap();
        assert!(printed.contains(&id(1).to_string()), "{printed}");
    }

    #[test]
    fn as_json_the_audit_says_each_check_and_each_mismatch() {
        let mut out = Vec::new();
        print(&check(&consistent(), MINUTE), MINUTE, true, &mut out).unwrap();
        let shown: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(shown["invariantsHold"], true);
        assert_eq!(shown["checks"].as_array().unwrap().len(), CHECKS.len());
        let mut records = consistent();
        records.shipments.clear();
        let mut out = Vec::new();
        let err = print(&check(&records, MINUTE), MINUTE, true, &mut out).unwrap_err();
        assert_eq!(crate::exit_code(&err), 5);
        let shown: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(shown["invariantsHold"], false);
        assert_eq!(shown["findings"][0]["id"], id(1).to_string());
    }
}
