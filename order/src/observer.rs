//! The saga observer: a passive reader of the events stream and the
//! dead-letter stream that records every event and dead letter of every
//! saga by correlation id (`saga_timeline`) and keeps where each saga
//! stands (`sagas`). It publishes nothing and decides nothing: the timeline
//! API and the stall report read what it wrote.
//!
//! Recording is idempotent by the entry's key (the event id, or the dead
//! letter's stream sequence), so redeliveries and replays are harmless and a
//! new observer catches up from the streams' start.

use std::{sync::Arc, time::Duration};

use async_nats::jetstream::{self, AckKind};
use chrono::{DateTime, Utc};
use common::{
    Envelope, EventKind,
    dlq::dlq_headers,
    limits,
    meter::Meter,
    operator::OperatorAction,
    topology::{TIMELINE_DEAD_LETTERS, TIMELINE_EVENTS},
};
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::{
    timeline::{self, EntryKind, NewEntry},
    watch::{Source, Started, ack, header},
};

/// Names of the observer's parts in the health board.
pub const HEALTH_EVENTS: &str = "timelineEvents";
pub const HEALTH_DEAD_LETTERS: &str = "timelineDeadLetters";

/// How long the observer waits, after a message, for more to record with it:
/// a saga's events a few milliseconds apart are recorded together, in one
/// transaction, instead of one each, and a timeline is this much behind at
/// most (when the broker is not behind).
const LINGER: Duration = Duration::from_millis(100);

/// Records what the watches deliver.
pub struct Observer {
    pub pool: PgPool,
    pub meter: Meter,
    /// How long a saga may wait at one step before it is reported stalled.
    pub stall_after: Duration,
}

impl Observer {
    /// Creates both durable consumers now, then returns the loops to run:
    /// events, dead letters and the stall report.
    pub async fn start(self, source: Source, shutdown: CancellationToken) -> Started {
        let this = Arc::new(self);
        let record = |spec, health, decode: fn(&jetstream::Message) -> Option<NewEntry>| {
            let this = this.clone();
            source
                .clone()
                .watch_batches(spec, health, shutdown.clone(), LINGER, move |msgs| {
                    let this = this.clone();
                    async move { this.record(msgs, decode).await }
                })
        };
        let events = record(TIMELINE_EVENTS, HEALTH_EVENTS, event_entry).await?;
        let dead_letters = record(
            TIMELINE_DEAD_LETTERS,
            HEALTH_DEAD_LETTERS,
            dead_letter_entry,
        )
        .await?;
        Ok(Box::pin(async move {
            tokio::join!(events, dead_letters, this.report_stalls(shutdown));
        }))
    }

    /// Records the messages' entries (a message that belongs to no saga has
    /// none) in one transaction and acks them all; naks them all when the
    /// database cannot take them now.
    async fn record(
        &self,
        msgs: Vec<jetstream::Message>,
        decode: fn(&jetstream::Message) -> Option<NewEntry>,
    ) {
        let entries: Vec<NewEntry> = msgs.iter().filter_map(decode).collect();
        let kind = if entries.is_empty() {
            AckKind::Ack
        } else {
            match timeline::store::record_entries(&self.pool, &entries).await {
                Ok(fresh) => {
                    for (entry, fresh) in entries.iter().zip(fresh) {
                        // Counted once: a redelivered or replayed event is not fresh.
                        if fresh
                            && entry.kind == EntryKind::Event
                            && let Some(outcome) =
                                EventKind::from_name(&entry.event_type).and_then(timeline::ending)
                        {
                            self.meter.saga_ended(outcome);
                        }
                    }
                    AckKind::Ack
                }
                Err(e) => {
                    tracing::warn!(entries = entries.len(), error = %e, "cannot record timeline entries; retrying");
                    AckKind::Nak(Some(Duration::from_secs(1)))
                }
            }
        };
        futures::future::join_all(msgs.iter().map(|msg| ack(msg, kind))).await;
    }

    /// Logs each stall once, at WARN with the saga's id, the step and the
    /// service that owes the next event.
    async fn report_stalls(&self, shutdown: CancellationToken) {
        let every =
            (self.stall_after / 4).clamp(Duration::from_millis(250), Duration::from_secs(5));
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tick.tick() => {}
            }
            let before = stalled_before(self.stall_after);
            match timeline::store::report_stalls(&self.pool, before).await {
                Ok(stalled) => {
                    self.meter.stalls(stalled.len() as u64);
                    for s in stalled {
                        let waited = (Utc::now() - s.last_event_at).num_seconds();
                        tracing::warn!(
                            correlation_id = %s.correlation_id,
                            waiting_for = s.waiting_for.as_deref().unwrap_or("?"),
                            step = s.step.as_deref().unwrap_or("?"),
                            last_event = %s.last_event_type,
                            waited_seconds = waited,
                            "saga stalled"
                        );
                    }
                }
                Err(e) => tracing::warn!(error = %e, "cannot check for stalled sagas"),
            }
        }
    }
}

/// The moment before which a saga still waiting counts as stalled.
pub fn stalled_before(stall_after: Duration) -> DateTime<Utc> {
    Utc::now() - chrono::Duration::from_std(stall_after).unwrap_or(chrono::Duration::MAX)
}

fn stream_seq(msg: &jetstream::Message) -> i64 {
    msg.info()
        .map(|i| i64::try_from(i.stream_sequence).unwrap_or(i64::MAX))
        .unwrap_or_default()
}

/// The trace a message belongs to, from its `traceparent` header.
fn trace_id(msg: &jetstream::Message) -> Option<String> {
    common::trace::trace_id(header(msg, common::trace::TRACEPARENT).as_deref())
}

/// The entry for an event, if it decodes (bytes that are not an event
/// belong to no saga; the consumers dead-letter them, and the dead letter
/// is recorded if it names a saga).
fn event_entry(msg: &jetstream::Message) -> Option<NewEntry> {
    let service = msg.subject.split('.').nth(1).unwrap_or("?").to_string();
    if service == "operator" {
        return operator_entry(msg);
    }
    let (env, event) = Envelope::decode(&msg.payload).ok()?;
    let kind = event.kind();
    Some(NewEntry {
        key: env.event_id.to_string(),
        correlation_id: env.metadata.correlation_id,
        kind: EntryKind::Event,
        service,
        event_type: kind.name().to_string(),
        event_id: Some(env.event_id),
        causation_id: Some(env.metadata.causation_id),
        aggregate_id: Some(env.aggregate_id.clone()),
        version: Some(env.version),
        occurred_at: env.timestamp,
        stream_seq: stream_seq(msg),
        effect: timeline::effect(&event),
        reason: timeline::reason(&event).map(str::to_string),
        trace_id: trace_id(msg),
    })
}

/// The entry for an operator's audit record that names its saga.
fn operator_entry(msg: &jetstream::Message) -> Option<NewEntry> {
    let action: OperatorAction = serde_json::from_slice(&msg.payload).ok()?;
    action.check().ok()?;
    Some(NewEntry {
        key: format!("op:{}", action.action_id),
        correlation_id: action.correlation_id?,
        kind: EntryKind::Operator,
        service: "operator".into(),
        event_type: action.action.clone(),
        event_id: None,
        causation_id: None,
        aggregate_id: None,
        version: None,
        occurred_at: action.at,
        stream_seq: stream_seq(msg),
        effect: limits::reason(format!("{} (by {})", action.effect, action.operator)),
        reason: Some(action.note.clone()),
        trace_id: None,
    })
}

/// The entry for a dead letter that names its saga.
fn dead_letter_entry(msg: &jetstream::Message) -> Option<NewEntry> {
    let correlation_id: Uuid = header(msg, dlq_headers::CORRELATION_ID)?.parse().ok()?;
    let seq = stream_seq(msg);
    let consumer = header(msg, dlq_headers::CONSUMER).unwrap_or_else(|| "?".into());
    let event_type = header(msg, dlq_headers::EVENT_TYPE).unwrap_or_else(|| "?".into());
    let occurred_at = msg
        .info()
        .ok()
        .and_then(|i| {
            DateTime::<Utc>::from_timestamp(i.published.unix_timestamp(), i.published.nanosecond())
        })
        .unwrap_or_else(Utc::now);
    Some(NewEntry {
        key: format!("dlq:{seq}"),
        correlation_id,
        kind: EntryKind::DeadLetter,
        effect: format!("{consumer} dead-lettered {event_type}"),
        service: consumer,
        event_type,
        event_id: header(msg, dlq_headers::EVENT_ID).and_then(|v| v.parse().ok()),
        causation_id: None,
        aggregate_id: None,
        version: None,
        occurred_at,
        stream_seq: seq,
        reason: header(msg, dlq_headers::REASON).map(limits::reason),
        trace_id: trace_id(msg),
    })
}
