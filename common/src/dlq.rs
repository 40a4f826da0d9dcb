//! Dead letters as an operator sees them: read from the dead-letter stream
//! without consuming them, and redriven under the operator's broker
//! identity (`sagactl`): no service may publish another service's events.

use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use async_nats::{
    HeaderMap,
    header::NATS_MESSAGE_ID,
    jetstream::{self, stream::LastRawMessageErrorKind},
};
use bytes::Bytes;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::{Envelope, Subjects, limits, operator::OperatorAction, trace};

/// Names the dead-letter headers; the body is the original bytes, unchanged
/// (unless they no longer fit with the headers: see [`BODY_OMITTED`](dlq_headers::BODY_OMITTED)).
pub mod dlq_headers {
    pub const REASON: &str = "Saga-Dlq-Reason";
    pub const CONSUMER: &str = "Saga-Dlq-Consumer";
    pub const SUBJECT: &str = "Saga-Dlq-Subject";
    pub const STREAM_SEQUENCE: &str = "Saga-Dlq-Stream-Sequence";
    pub const DELIVERIES: &str = "Saga-Dlq-Deliveries";
    /// The `Nats-Msg-Id` the original was published with.
    pub const MSG_ID: &str = "Saga-Dlq-Msg-Id";
    /// Set when the body decoded: the event's id, type and saga.
    pub const EVENT_ID: &str = "Saga-Dlq-Event-Id";
    pub const EVENT_TYPE: &str = "Saga-Dlq-Event-Type";
    pub const CORRELATION_ID: &str = "Saga-Dlq-Correlation-Id";
    /// Set when the original with these headers would exceed the broker's
    /// `max_payload`: the body is left out and this says where it is.
    pub const BODY_OMITTED: &str = "Saga-Dlq-Body-Omitted";
}

/// What a dead letter says about the event it holds, when the bytes were one.
#[derive(Debug, Clone, Copy)]
pub struct About<'a> {
    pub event_id: Uuid,
    pub event_type: &'a str,
    /// The saga it belongs to; `None` for an event of no saga (a product's
    /// catalog event), so that no saga's timeline or state takes it up.
    pub correlation_id: Option<Uuid>,
}

impl About<'_> {
    /// A saga event: its saga is its correlation id.
    pub fn saga_event(envelope: &Envelope) -> About<'_> {
        About {
            event_id: envelope.event_id,
            event_type: &envelope.event_type,
            correlation_id: Some(envelope.metadata.correlation_id),
        }
    }
}

/// One delivered message that a consumer gives up on, and why.
pub struct Letter<'a> {
    /// The consumer giving up: the dead letter's subject is `saga.dlq.<consumer>`.
    pub consumer: &'a str,
    pub msg: &'a jetstream::Message,
    pub delivered: i64,
    pub stream_seq: u64,
    /// The stream the message came from (named when its body is omitted).
    pub stream: String,
    pub about: Option<About<'a>>,
    pub reason: &'a str,
}

/// Publishes a dead letter: the original body with the reason and where it
/// came from in headers ([`dlq_headers`]), under an id unique to the event
/// and the consumer, so that dead-lettering the same delivery twice stores
/// it once. The body is left out (and the headers say where it is) when it
/// would not fit `max_payload`.
pub async fn send(
    js: &jetstream::Context,
    subjects: &Subjects,
    max_payload: usize,
    letter: Letter<'_>,
) -> Result<(), String> {
    let Letter {
        consumer,
        msg,
        delivered,
        stream_seq,
        stream,
        about,
        reason,
    } = letter;
    // Unique to the delivered event and this consumer: a retried dead
    // letter of the same event is dropped by the broker, two different
    // ones never share an id. Undecodable bytes have no event id.
    let mut id = match about {
        Some(a) => format!("{consumer}.{}", a.event_id),
        None => format!("{consumer}.{}", Uuid::now_v7()),
    };
    let mut headers = HeaderMap::new();
    headers.insert(dlq_headers::REASON, header_safe(reason).as_str());
    headers.insert(dlq_headers::CONSUMER, consumer);
    headers.insert(dlq_headers::SUBJECT, msg.subject.as_str());
    headers.insert(
        dlq_headers::STREAM_SEQUENCE,
        stream_seq.to_string().as_str(),
    );
    headers.insert(dlq_headers::DELIVERIES, delivered.to_string().as_str());
    if let Some(original) = msg.headers.as_ref().and_then(|h| h.get(NATS_MESSAGE_ID)) {
        headers.insert(dlq_headers::MSG_ID, header_safe(original.as_str()).as_str());
    }
    // The saga's trace goes with its dead letter (the timeline shows it, a
    // redrive carries it on); a header that is not a valid one is left.
    if let Some(traceparent) = msg
        .headers
        .as_ref()
        .and_then(|h| h.get(trace::TRACEPARENT))
        .map(|v| v.as_str())
        .filter(|v| trace::parse(Some(v)).is_some())
    {
        headers.insert(trace::TRACEPARENT, traceparent);
    }
    if let Some(a) = about {
        headers.insert(dlq_headers::EVENT_ID, a.event_id.to_string().as_str());
        headers.insert(dlq_headers::EVENT_TYPE, header_safe(a.event_type).as_str());
        if let Some(saga) = a.correlation_id {
            headers.insert(dlq_headers::CORRELATION_ID, saga.to_string().as_str());
        }
    }
    let mut body = msg.payload.clone();
    // Room for the id header too; 64 bytes covers its name and framing.
    let size = headers_len(&headers) + id.len() + 64 + body.len();
    if size > max_payload {
        headers.insert(
            dlq_headers::BODY_OMITTED,
            format!(
                "{} bytes would exceed the broker's max_payload with these headers; the original is sequence {stream_seq} of stream {stream}",
                body.len(),
            )
            .as_str(),
        );
        body = Bytes::new();
    }
    let subject = subjects.dead_letter(consumer);
    for attempt in 0..2 {
        let mut h = headers.clone();
        h.insert(NATS_MESSAGE_ID, id.as_str());
        let ack = js
            .publish_with_headers(subject.clone(), h, body.clone())
            .await
            .map_err(|e| e.to_string())?
            .await
            .map_err(|e| e.to_string())?;
        if !ack.duplicate {
            return Ok(());
        }
        // The broker already holds a dead letter under this id: fine if
        // it is this one (a retried dead-lettering), not if another body
        // got there first. Then this one goes under an id of its own.
        let stored = js
            .get_stream(subjects.dead_letter_stream())
            .await
            .map_err(|e| e.to_string())?
            .get_raw_message(ack.sequence)
            .await
            .map_err(|e| e.to_string())?;
        if stored.payload == body {
            return Ok(());
        }
        tracing::warn!(%consumer, %id, attempt, "a different dead letter holds this id; publishing under a fresh one");
        id = format!("{id}.{}", Uuid::now_v7());
    }
    Err("dead letter kept colliding with other ids".into())
}

/// A corrected body replaces a dead letter's bytes, not the event: it keeps
/// the dead letter's event id, type and saga where the dead letter knows
/// them, and where it does not (its bytes were not an event), it goes to
/// the subject the dead letter came from. Otherwise a redrive could publish
/// any event for any saga under an old dead letter's name.
fn keeps_what_it_replaces(d: &DeadLetter, event: &Envelope, subject: &str) -> Result<(), String> {
    let differs = |what: &str, kept: &str, got: &str| {
        format!("the corrected body must keep the dead letter's {what} {kept}, not {got}")
    };
    if let Some(id) = d.header(dlq_headers::EVENT_ID)
        && id != event.event_id.to_string()
    {
        return Err(differs("event id", id, &event.event_id.to_string()));
    }
    if let Some(kind) = d.header(dlq_headers::EVENT_TYPE)
        && kind != event.event_type
    {
        return Err(differs("event type", kind, &event.event_type));
    }
    if let Some(saga) = d.header(dlq_headers::CORRELATION_ID)
        && saga != event.metadata.correlation_id.to_string()
    {
        return Err(differs(
            "saga",
            saga,
            &event.metadata.correlation_id.to_string(),
        ));
    }
    if d.header(dlq_headers::EVENT_ID).is_none() {
        let original = d.header(dlq_headers::SUBJECT).unwrap_or_default();
        if original != subject {
            return Err(differs("subject", original, subject));
        }
    }
    Ok(())
}

/// Bytes the headers take on the wire (`NATS/1.0`, one `K: V` line each, blank line).
fn headers_len(h: &HeaderMap) -> usize {
    let mut n = "NATS/1.0\r\n\r\n".len();
    for (k, values) in h.iter() {
        for v in values {
            n += k.to_string().len() + 2 + v.as_str().len() + 2;
        }
    }
    n
}

/// Header values are one line of visible ASCII.
fn header_safe(s: &str) -> String {
    let cleaned: String = s
        .chars()
        .map(|c| {
            if c.is_ascii_graphic() || c == ' ' {
                c
            } else {
                ' '
            }
        })
        .collect();
    cleaned.chars().take(1024).collect()
}

/// How long one call to the broker may take.
const CALL_TIMEOUT: Duration = Duration::from_secs(10);

/// Most dead letters one redrive takes on (the rest wait for the next).
pub const MAX_REDRIVE: usize = 200;

/// Which dead letters (also `sagactl`'s options).
#[derive(Debug, Clone, Default, Serialize, Deserialize, clap::Args)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Filter {
    /// Only this consumer's (the service that gave up: order, payment, …).
    #[serde(default)]
    #[arg(long)]
    pub consumer: Option<String>,
    /// Only those whose reason contains this text (case-insensitive).
    #[serde(default)]
    #[arg(long)]
    pub reason_contains: Option<String>,
    /// Only those dead-lettered at or after this time (RFC 3339, e.g.
    /// 2026-11-26T10:00:00Z).
    #[serde(default)]
    #[arg(long)]
    pub since: Option<DateTime<Utc>>,
    /// Only this saga's (its order id).
    #[serde(default)]
    #[arg(long)]
    pub saga: Option<Uuid>,
}

/// The operator action a redrive records.
pub const REDRIVE: &str = "dlq-redrive";

/// Most dead letters one command reads: a larger stream is read in part
/// and says so.
const MAX_READ: u64 = 100_000;

/// The dead-letter stream of one system.
pub struct Dlq {
    js: jetstream::Context,
    subjects: Subjects,
}

/// One dead letter: the original bytes with the headers that say why.
#[derive(Debug, Clone)]
pub struct DeadLetter {
    pub seq: u64,
    pub at: DateTime<Utc>,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl DeadLetter {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).map(|v| v.as_str())
    }

    pub fn or_dash(&self, name: &str) -> &str {
        self.header(name).unwrap_or("-")
    }

    fn matches(&self, filter: &Filter) -> bool {
        filter
            .consumer
            .as_deref()
            .is_none_or(|c| self.header(dlq_headers::CONSUMER) == Some(c))
            && filter.since.is_none_or(|since| self.at >= since)
            && filter.saga.is_none_or(|saga| {
                self.header(dlq_headers::CORRELATION_ID) == Some(saga.to_string().as_str())
            })
            && filter.reason_contains.as_deref().is_none_or(|text| {
                self.header(dlq_headers::REASON)
                    .unwrap_or_default()
                    .to_lowercase()
                    .contains(&text.to_lowercase())
            })
    }
}

/// What to redrive, and who asks why.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Redrive {
    /// These dead letters; without any, every one `filter` selects.
    #[serde(default)]
    pub seqs: Vec<u64>,
    #[serde(default)]
    pub filter: Filter,
    /// A corrected event to publish instead of the dead letter's bytes
    /// (only with exactly one seq).
    #[serde(default)]
    pub body: Option<String>,
    #[serde(default)]
    pub note: String,
    #[serde(default)]
    pub operator: String,
    #[serde(default)]
    pub dry_run: bool,
    /// Redrive dead letters of sagas that have ended too, for this reason
    /// (recorded in the audit record). Without it they are refused: a
    /// redrive must not move a saga that was settled.
    #[serde(default)]
    pub force: Option<String>,
}

/// Where sagas stand, as far as redriving their dead letters goes (the
/// order service answers from its orders).
pub trait Sagas: Sync {
    /// How saga `id` ended (`CONFIRMED`, `CANCELLED`,
    /// `MANUALLY_COMPENSATED`), or `None` while it may still move (pending,
    /// awaiting an operator) or is not known.
    fn ended(&self, id: Uuid) -> impl Future<Output = Result<Option<String>>> + Send;
}

/// A redrive named a dead letter the stream does not hold.
#[derive(Debug, thiserror::Error)]
#[error("no dead letter {0} (redriven, or never there)")]
pub struct NoSuchDeadLetter(pub u64);

/// What became of one dead letter.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Redriven {
    /// Its sequence in the dead-letter stream.
    pub seq: u64,
    /// `redrove`, `would redrive`, `refused` (with why), or `failed` (it
    /// stays in the stream).
    pub outcome: String,
    /// What was (or would be) published, or why not.
    pub detail: String,
}

impl Redriven {
    /// Whether it stays in the stream: refused, or its redrive failed.
    pub fn stays(&self) -> bool {
        self.outcome == "refused" || self.outcome == "failed"
    }
}

/// What one dead letter's redrive would publish.
struct Plan {
    subject: String,
    bytes: Bytes,
    envelope: Envelope,
}

impl Dlq {
    pub fn new(js: jetstream::Context, subjects: Subjects) -> Dlq {
        Dlq { js, subjects }
    }

    async fn stream(&self) -> Result<jetstream::stream::Stream> {
        let name = self.subjects.dead_letter_stream();
        tokio::time::timeout(CALL_TIMEOUT, self.js.get_stream(&name))
            .await
            .ok()
            .with_context(|| format!("no answer about stream {name} within {CALL_TIMEOUT:?}"))?
            .with_context(|| format!("the dead-letter stream {name}"))
    }

    /// One dead letter, if the stream still holds it.
    async fn get(
        &self,
        stream: &jetstream::stream::Stream,
        seq: u64,
    ) -> Result<Option<DeadLetter>> {
        let got = tokio::time::timeout(CALL_TIMEOUT, stream.get_raw_message(seq))
            .await
            .ok()
            .with_context(|| format!("no answer for dead letter {seq} within {CALL_TIMEOUT:?}"))?;
        match got {
            Ok(m) => Ok(Some(DeadLetter {
                seq: m.sequence,
                at: DateTime::from_timestamp_nanos(
                    m.time.unix_timestamp_nanos().clamp(0, i64::MAX as i128) as i64,
                ),
                headers: m.headers,
                body: m.payload,
            })),
            Err(e) if e.kind() == LastRawMessageErrorKind::NoMessageFound => Ok(None),
            Err(e) if e.to_string().contains("no message found") => Ok(None),
            Err(e) => Err(anyhow!(e).context(format!("reading dead letter {seq}"))),
        }
    }

    /// Dead letter `seq`, if the stream still holds it.
    pub async fn one(&self, seq: u64) -> Result<Option<DeadLetter>> {
        let stream = self.stream().await?;
        self.get(&stream, seq).await
    }

    /// Every dead letter `filter` selects, oldest first.
    pub async fn read(&self, filter: &Filter) -> Result<Vec<DeadLetter>> {
        let mut stream = self.stream().await?;
        let state = tokio::time::timeout(CALL_TIMEOUT, stream.info())
            .await
            .ok()
            .context("no answer about the dead-letter stream")??
            .state
            .clone();
        if state.messages == 0 {
            return Ok(Vec::new());
        }
        let first = state
            .first_sequence
            .max(state.last_sequence.saturating_sub(MAX_READ - 1));
        let mut found = Vec::new();
        for seq in first..=state.last_sequence {
            if let Some(d) = self.get(&stream, seq).await?
                && d.matches(filter)
            {
                found.push(d);
            }
        }
        Ok(found)
    }

    /// What redriving `d` would publish, or why it cannot be.
    fn plan(&self, d: &DeadLetter, replacement: Option<&[u8]>) -> Result<Plan, String> {
        let bytes = match replacement {
            Some(bytes) => Bytes::copy_from_slice(bytes),
            None => {
                if let Some(where_) = d.header(dlq_headers::BODY_OMITTED) {
                    return Err(format!(
                        "its body was too large to keep ({where_}): fetch the original, and redrive it alone with a corrected body (sagactl: --seq {} --body FILE)",
                        d.seq
                    ));
                }
                if d.header(dlq_headers::EVENT_ID).is_none() {
                    return Err(format!(
                        "its bytes are not an event ({}): fix them (sagactl dlq show {}) and redrive it alone with a corrected body (sagactl: --seq {} --body FILE)",
                        d.or_dash(dlq_headers::REASON),
                        d.seq,
                        d.seq
                    ));
                }
                d.body.clone()
            }
        };
        let (envelope, event) = Envelope::decode(&bytes).map_err(|e| match replacement {
            Some(_) => format!("the replacement body is not a valid event: {e}"),
            None => format!("its bytes no longer decode as an event: {e}"),
        })?;
        let subject = self.subjects.event_of(event.kind(), event.order_id());
        if replacement.is_some() {
            keeps_what_it_replaces(d, &envelope, &subject)?;
        }
        Ok(Plan {
            subject,
            bytes,
            envelope,
        })
    }

    /// Redrives what `request` selects: for each dead letter, what became
    /// of it. Stops at the first that fails (it and the rest stay). A dead
    /// letter of a saga that has ended, as `sagas` says, is refused unless
    /// the request forces it with a reason.
    /// `progress` hears after each dead letter how many of the selected
    /// ones were dealt with.
    pub async fn redrive(
        &self,
        request: &Redrive,
        sagas: &impl Sagas,
        progress: &mut (dyn FnMut(usize, usize) + Send),
    ) -> Result<Vec<Redriven>> {
        if request.body.is_some() && request.seqs.len() != 1 {
            bail!("a corrected body replaces one dead letter: name exactly one seq");
        }
        if request.seqs.len() > MAX_REDRIVE {
            bail!(
                "at most {MAX_REDRIVE} dead letters at a time, got {}",
                request.seqs.len()
            );
        }
        if !request.dry_run {
            limits::check_id("operator", &request.operator).map_err(|e| anyhow!(e))?;
            limits::check_reason("note", &request.note).map_err(|e| anyhow!(e))?;
        }
        if let Some(why) = &request.force {
            limits::check_reason("force", why).map_err(|e| anyhow!(e))?;
        }
        let stream = self.stream().await?;
        let selected = if request.seqs.is_empty() {
            let mut all = self.read(&request.filter).await?;
            all.truncate(MAX_REDRIVE);
            all
        } else {
            let mut selected = Vec::new();
            for &seq in &request.seqs {
                let d = self.get(&stream, seq).await?.ok_or(NoSuchDeadLetter(seq))?;
                selected.push(d);
            }
            selected
        };
        let mut results = Vec::with_capacity(selected.len());
        let said = |d: &DeadLetter, outcome: &str, detail: String| Redriven {
            seq: d.seq,
            outcome: outcome.into(),
            detail,
        };
        for (i, d) in selected.iter().enumerate() {
            progress(i, selected.len());
            let plan = match self.plan(d, request.body.as_deref().map(str::as_bytes)) {
                Ok(plan) => plan,
                Err(why) => {
                    results.push(said(d, "refused", why));
                    continue;
                }
            };
            let saga = plan.envelope.metadata.correlation_id;
            let mut what = format!(
                "{} {} of saga {saga} to {}",
                plan.envelope.event_type, plan.envelope.event_id, plan.subject
            );
            let forced = match (sagas.ended(saga).await?, &request.force) {
                (None, _) => None,
                (Some(status), None) => {
                    results.push(said(
                        d,
                        "refused",
                        format!(
                            "saga {saga} has ended ({status}): redriving its {} could move it again; \
                             to redrive it anyway, force it with a reason (sagactl: --force REASON), which the audit record keeps",
                            plan.envelope.event_type
                        ),
                    ));
                    continue;
                }
                (Some(status), Some(why)) => {
                    what.push_str(&format!(", forced past the saga's end ({status}): {why}"));
                    Some(format!("forced past the saga's end ({status}): {why}; "))
                }
            };
            if request.dry_run {
                results.push(said(d, "would redrive", what));
                continue;
            }
            match self.republish(d, &plan, request, forced.as_deref()).await {
                Ok(()) => results.push(said(d, "redrove", what)),
                Err(e) => {
                    results.push(said(d, "failed", format!("{e:#}; it stays in the stream")));
                    break;
                }
            }
        }
        progress(results.len(), selected.len());
        Ok(results)
    }

    /// Publishes the event and the audit record, each acknowledged, and only
    /// then deletes the dead letter: a failure at any point leaves it there,
    /// and redriving it again is harmless (the consumers' idempotency).
    async fn republish(
        &self,
        d: &DeadLetter,
        plan: &Plan,
        request: &Redrive,
        forced: Option<&str>,
    ) -> Result<()> {
        // Stamped before the event goes out, so the record precedes every
        // consequence of it in the timeline.
        let action = OperatorAction {
            action_id: Uuid::now_v7(),
            action: REDRIVE.into(),
            operator: request.operator.clone(),
            note: request.note.clone(),
            at: Utc::now(),
            correlation_id: Some(plan.envelope.metadata.correlation_id),
            effect: limits::reason(format!(
                "{}redrove {} (dead letter {} of {}{}: {})",
                forced.unwrap_or_default(),
                plan.envelope.event_type,
                d.seq,
                d.or_dash(dlq_headers::CONSUMER),
                if request.body.is_some() {
                    ", corrected"
                } else {
                    ""
                },
                d.or_dash(dlq_headers::REASON)
            )),
        };
        action.check().map_err(|e| anyhow!(e))?;
        let mut headers = HeaderMap::new();
        headers.insert(
            NATS_MESSAGE_ID,
            format!("redrive.{}.{}", d.seq, Uuid::new_v4()).as_str(),
        );
        if let Some(traceparent) = d
            .header(trace::TRACEPARENT)
            .filter(|v| trace::parse(Some(v)).is_some())
        {
            headers.insert(trace::TRACEPARENT, traceparent);
        }
        self.publish(plan.subject.clone(), headers, plan.bytes.clone())
            .await
            .context("publishing the event")?;
        let mut headers = HeaderMap::new();
        headers.insert(NATS_MESSAGE_ID, action.action_id.to_string().as_str());
        self.publish(
            self.subjects.operator(REDRIVE),
            headers,
            serde_json::to_vec(&action)?.into(),
        )
        .await
        .context("publishing the audit record")?;
        let stream = self.stream().await?;
        tokio::time::timeout(CALL_TIMEOUT, stream.delete_message(d.seq))
            .await
            .ok()
            .context("no answer to the delete")?
            .context("deleting the dead letter (the event was redriven)")?;
        Ok(())
    }

    async fn publish(&self, subject: String, headers: HeaderMap, body: Bytes) -> Result<()> {
        let ack = tokio::time::timeout(CALL_TIMEOUT, async {
            self.js
                .publish_with_headers(subject.clone(), headers, body)
                .await?
                .await
        })
        .await
        .ok()
        .with_context(|| format!("no acknowledgement for {subject} within {CALL_TIMEOUT:?}"))?;
        ack.with_context(|| format!("publishing to {subject}"))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_values_lose_newlines_but_keep_the_words() {
        assert_eq!(header_safe("bad\r\nthing"), "bad  thing");
    }
}
