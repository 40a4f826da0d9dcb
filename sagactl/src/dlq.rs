//! Dead letters in the terminal: listed, shown and redriven straight from
//! the dead-letter stream, under the operator's broker identity (no service
//! may publish another service's events). Whether a dead letter's saga has
//! ended is asked of the order service (`GET /orders/{id}`).

use std::io::Write;

use anyhow::{Result, bail};
use common::{
    dlq::dlq_headers,
    dlq::{Dlq, Filter, Redrive, Redriven, Sagas},
};
use serde_json::{Value, json};

use crate::{Connection, Failure};

/// A dead letter as `--json` prints it in a list.
fn summary(d: &common::dlq::DeadLetter) -> Value {
    json!({
        "seq": d.seq,
        "deadLetteredAt": d.at.to_rfc3339(),
        "consumer": d.header(dlq_headers::CONSUMER),
        "eventType": d.header(dlq_headers::EVENT_TYPE),
        "eventId": d.header(dlq_headers::EVENT_ID),
        "saga": d.header(dlq_headers::CORRELATION_ID),
        "subject": d.header(dlq_headers::SUBJECT),
        "reason": d.header(dlq_headers::REASON),
    })
}

pub async fn list(
    dlq: &Dlq,
    filter: &Filter,
    limit: usize,
    json: bool,
    out: &mut (dyn Write + Send),
) -> Result<()> {
    let all = dlq.read(filter).await?;
    if json {
        let listed: Vec<Value> = all.iter().take(limit).map(summary).collect();
        writeln!(
            out,
            "{}",
            json!({ "deadLetters": listed, "total": all.len() })
        )?;
        return Ok(());
    }
    writeln!(
        out,
        "{:>6}  {:<24}  {:<10}  {:<26}  {:<36}  REASON",
        "SEQ", "DEAD-LETTERED (UTC)", "CONSUMER", "EVENT", "SAGA"
    )?;
    for d in all.iter().take(limit) {
        writeln!(
            out,
            "{:>6}  {:<24}  {:<10}  {:<26}  {:<36}  {}",
            d.seq,
            d.at.format("%Y-%m-%d %H:%M:%S%.3f"),
            d.or_dash(dlq_headers::CONSUMER),
            d.header(dlq_headers::EVENT_TYPE)
                .unwrap_or("(not an event)"),
            d.or_dash(dlq_headers::CORRELATION_ID),
            shorten(d.or_dash(dlq_headers::REASON), 160),
        )?;
    }
    writeln!(
        out,
        "{} of {} dead letter(s)",
        all.len().min(limit),
        all.len()
    )?;
    Ok(())
}

pub async fn show(dlq: &Dlq, seq: u64, json: bool, out: &mut (dyn Write + Send)) -> Result<()> {
    let d = dlq.one(seq).await?.ok_or_else(|| {
        Failure::NotFound(format!("no dead letter {seq} (redriven, or never there)"))
    })?;
    if json {
        let mut shown = summary(&d);
        let headers: serde_json::Map<String, Value> = d
            .headers
            .iter()
            .map(|(k, vs)| {
                let values: Vec<&str> = vs.iter().map(|v| v.as_str()).collect();
                (k.to_string(), json!(values))
            })
            .collect();
        shown["headers"] = Value::Object(headers);
        shown["bodyBytes"] = json!(d.body.len());
        // The body as the JSON it is, or as text when it is not JSON.
        shown["body"] = serde_json::from_slice(&d.body)
            .unwrap_or_else(|_| json!(String::from_utf8_lossy(&d.body)));
        writeln!(out, "{shown}")?;
        return Ok(());
    }
    writeln!(out, "dead letter {seq}, {}", d.at.to_rfc3339())?;
    writeln!(out, "reason: {}", d.or_dash(dlq_headers::REASON))?;
    writeln!(out, "headers:")?;
    let mut headers: Vec<(String, String)> = d
        .headers
        .iter()
        .flat_map(|(k, vs)| vs.iter().map(move |v| (k.to_string(), v.to_string())))
        .collect();
    headers.sort();
    for (k, v) in headers {
        writeln!(out, "  {k}: {v}")?;
    }
    writeln!(out, "body ({} bytes):", d.body.len())?;
    match serde_json::from_slice::<Value>(&d.body) {
        Ok(v) => writeln!(out, "{}", serde_json::to_string_pretty(&v)?)?,
        Err(_) => writeln!(out, "{}", String::from_utf8_lossy(&d.body))?,
    }
    Ok(())
}

/// The sagas as the order service tells them: one has ended when its
/// order is confirmed, cancelled or resolved by hand.
pub(crate) struct OrderService {
    connection: Connection,
    http: reqwest::Client,
}

impl OrderService {
    pub(crate) fn new(connection: Connection) -> OrderService {
        OrderService {
            connection,
            http: reqwest::Client::new(),
        }
    }
}

/// The statuses of an order whose saga has ended.
const ENDED: [&str; 3] = ["CONFIRMED", "CANCELLED", "MANUALLY_COMPENSATED"];

impl Sagas for OrderService {
    async fn ended(&self, id: uuid::Uuid) -> Result<Option<String>> {
        // From the event store: the read model may not show a resolution
        // made a moment ago, and a redrive must not move a settled saga.
        let path = format!("/orders/{id}?latest=true");
        let Some(order) = self.connection.order_get(&self.http, &path, None).await? else {
            return Ok(None);
        };
        let state = order["status"].as_str().unwrap_or_default();
        Ok(ENDED.contains(&state).then(|| state.to_string()))
    }
}

/// Redrives under the operator's broker identity, and prints what became
/// of each dead letter.
pub async fn redrive(
    dlq: &Dlq,
    connection: &Connection,
    request: &Redrive,
    json: bool,
    out: &mut (dyn Write + Send),
) -> Result<()> {
    let sagas = OrderService::new(connection.clone());
    // A bar (or lines) once there is more than one to go through.
    let mut shown: Option<common::progress::Progress> = None;
    let mut progress = |done: usize, total: usize| {
        if total > 1 {
            let label = if request.dry_run {
                "dry run"
            } else {
                "redrive"
            };
            shown
                .get_or_insert_with(|| {
                    common::progress::Progress::stderr(label, "dead letters", total as u64)
                })
                .set(done as u64);
        }
    };
    let results: Vec<Redriven> =
        dlq.redrive(request, &sagas, &mut progress)
            .await
            .map_err(
                |e| match e.downcast_ref::<common::dlq::NoSuchDeadLetter>() {
                    Some(missing) => Failure::NotFound(missing.to_string()).into(),
                    None => e,
                },
            )?;
    if let Some(shown) = shown {
        shown.finish();
    }
    let left = results.iter().filter(|r| r.stays()).count();
    if json {
        writeln!(
            out,
            "{}",
            json!({ "results": results, "notRedriven": left })
        )?;
    } else {
        for r in &results {
            writeln!(out, "{} {}: {}", r.outcome, r.seq, r.detail)?;
        }
    }
    if results.is_empty() {
        return Err(Failure::NotFound("no dead letter selected".into()).into());
    }
    if left > 0 {
        bail!(
            "{left} of {} dead letter(s) not redriven (see above)",
            results.len()
        );
    }
    Ok(())
}

fn shorten(text: &str, max: usize) -> String {
    if text.chars().count() <= max {
        return text.to_string();
    }
    let cut: String = text.chars().take(max - 1).collect();
    format!("{cut}…")
}
