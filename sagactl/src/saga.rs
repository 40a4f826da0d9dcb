//! A saga's timeline in the terminal, from the order service's
//! `GET /sagas/{orderId}`.

use std::io::Write;

use anyhow::Result;
use serde_json::Value;
use uuid::Uuid;

use crate::{CALL_TIMEOUT, Failure};

/// Prints saga `order_id` (an operator's read: the admin token).
pub async fn print(
    connection: &crate::Connection,
    order_id: Uuid,
    json: bool,
    out: &mut (dyn Write + Send),
) -> Result<()> {
    let token = connection.admin_token()?;
    let path = format!("/sagas/{order_id}");
    let body = connection
        .order_get(&reqwest::Client::new(), &path, Some(token))
        .await?
        .ok_or_else(|| Failure::NotFound(format!("no saga {order_id}")))?;
    if json {
        writeln!(out, "{}", serde_json::to_string_pretty(&body)?)?;
        return Ok(());
    }
    write_story(&body, out)
}

/// Resolves an order requiring intervention as compensated by hand.
pub async fn resolve(
    connection: &crate::Connection,
    order_id: Uuid,
    operator: &str,
    note: &str,
    json: bool,
    out: &mut (dyn Write + Send),
) -> Result<()> {
    let request = serde_json::json!({
        "resolution": "manually-compensated",
        "operator": operator,
        "note": note,
    });
    let body = connection
        .operator_post(
            &format!("/orders/{order_id}/resolution"),
            &request,
            CALL_TIMEOUT,
        )
        .await?;
    if json {
        writeln!(out, "{body}")?;
        return Ok(());
    }
    writeln!(
        out,
        "order {order_id}: {} (by {operator}: {note})",
        body["status"].as_str().unwrap_or("-")
    )?;
    Ok(())
}

/// The summary line (with the saga's trace, when its events carried one),
/// then one line per entry: time, time since the one
/// before, a mark (`->` a step, `<-` a compensation, `!!` a failure, `xx` a
/// dead letter, `op` an operator), the service, the event and its effect.
pub fn write_story(story: &Value, out: &mut (dyn Write + Send)) -> Result<()> {
    let text = |v: &Value| v.as_str().unwrap_or("-").to_string();
    let mut head = format!(
        "saga {}: {}",
        text(&story["correlationId"]),
        text(&story["status"])
    );
    if let Some(waiting) = story["waiting"].as_str() {
        head.push_str(&format!(", {waiting}"));
    }
    if story["stalled"] == true {
        head.push_str(" (STALLED)");
    }
    // The trace it was placed in, to look its spans up by.
    let traced = story["timeline"]
        .as_array()
        .into_iter()
        .flatten()
        .find_map(|e| e["traceId"].as_str());
    if let Some(trace) = traced {
        head.push_str(&format!(", trace {trace}"));
    }
    writeln!(out, "{head}")?;
    for entry in story["timeline"].as_array().into_iter().flatten() {
        let mark = match (
            entry["kind"].as_str(),
            entry["compensation"] == true,
            entry["failure"] == true,
        ) {
            (Some("dead_letter"), ..) => "xx",
            (Some("operator"), ..) => "op",
            (_, true, _) => "<-",
            (_, _, true) => "!!",
            _ => "->",
        };
        let since = entry["sincePreviousMs"]
            .as_i64()
            .map(|ms| format!("+{ms}ms"))
            .unwrap_or_default();
        let at = entry["occurredAt"].as_str().unwrap_or("-");
        let time = at.split('T').nth(1).unwrap_or(at).trim_end_matches('Z');
        let mut line = format!(
            "{time:<16} {since:>9}  {mark} {:<10} {:<27} {}",
            text(&entry["service"]),
            text(&entry["eventType"]),
            text(&entry["effect"])
        );
        if let Some(reason) = entry["reason"].as_str() {
            line.push_str(&format!(" ({reason})"));
        }
        writeln!(out, "{}", line.trim_end())?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_story_reads_as_one_line_per_entry_with_its_direction() {
        let story = json!({
            "correlationId": "0198",
            "status": "CANCELLED",
            "stalled": false,
            "timeline": [
                {"kind": "event", "service": "order", "eventType": "OrderPlaced",
                 "occurredAt": "2026-11-26T10:00:00.000Z", "effect": "placed 1 line, 1250",
                 "compensation": false, "failure": false},
                {"kind": "event", "service": "inventory", "eventType": "InventoryReservationFailed",
                 "occurredAt": "2026-11-26T10:00:00.020Z", "sincePreviousMs": 20,
                 "effect": "refused", "reason": "out of stock", "compensation": false, "failure": true},
                {"kind": "event", "service": "payment", "eventType": "PaymentRefunded",
                 "occurredAt": "2026-11-26T10:00:00.031Z", "sincePreviousMs": 11,
                 "effect": "refunded 1250 to alice", "compensation": true, "failure": false},
                {"kind": "operator", "service": "operator", "eventType": "dlq-redrive",
                 "occurredAt": "2026-11-26T10:00:01.000Z", "sincePreviousMs": 969,
                 "effect": "redrove X (by ada)", "reason": "fixed", "compensation": false, "failure": false}
            ]
        });
        let mut out = Vec::new();
        write_story(&story, &mut out).unwrap();
        let text = String::from_utf8(out).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines[0], "saga 0198: CANCELLED");
        assert!(
            lines[1].contains("-> order") && lines[1].contains("OrderPlaced"),
            "{text}"
        );
        assert!(
            lines[2].contains("+20ms  !! inventory") && lines[2].ends_with("(out of stock)"),
            "{text}"
        );
        assert!(lines[3].contains("<- payment"), "{text}");
        assert!(
            lines[4].contains("op operator") && lines[4].contains("(fixed)"),
            "{text}"
        );
    }

    #[test]
    fn the_summary_names_the_trace_the_saga_was_placed_in() {
        let story = json!({
            "correlationId": "0198",
            "status": "CONFIRMED",
            "timeline": [
                {"kind": "operator", "service": "operator", "eventType": "dlq-redrive",
                 "occurredAt": "2026-11-26T10:00:00.000Z", "effect": "redrove X (by ada)"},
                {"kind": "event", "service": "order", "eventType": "OrderPlaced",
                 "occurredAt": "2026-11-26T10:00:00.001Z", "effect": "placed",
                 "traceId": "4bf92f3577b34da6a3ce929d0e0e4736"}
            ]
        });
        let mut out = Vec::new();
        write_story(&story, &mut out).unwrap();
        let text = String::from_utf8(out).unwrap();
        assert_eq!(
            text.lines().next(),
            Some("saga 0198: CONFIRMED, trace 4bf92f3577b34da6a3ce929d0e0e4736")
        );
    }
}
