//! Traces across the services (W3C trace context, OpenTelemetry).
//!
//! A unit of work is an HTTP request or one applied event. Each takes its
//! parent from the `traceparent` it came with (the request's header, the
//! message's NATS header) or starts a trace; what it emits carries its own
//! context on: an event's outbox row keeps the `traceparent` of the work
//! that wrote it, and the relay publishes it as the message's header. So a
//! saga placed over HTTP is one trace, from the request through every hop
//! and compensation. Every log line of the work carries its `trace_id`.
//!
//! With an OTLP endpoint configured (`OTEL_EXPORTER_OTLP_ENDPOINT`), each
//! unit of work is also exported as a span (OTLP over HTTP/protobuf, in
//! batches from a thread of its own); without one, the context is carried
//! all the same and nothing is exported.

use std::{borrow::Cow, collections::HashMap, sync::Mutex, time::SystemTime};

use opentelemetry::{
    Context, KeyValue,
    propagation::TextMapPropagator,
    trace::{
        Span as _, SpanContext, SpanKind, Status, TraceContextExt, TraceFlags, TraceId,
        Tracer as _, TracerProvider as _,
    },
};
use opentelemetry_otlp::{WithExportConfig, WithHttpConfig};
use opentelemetry_sdk::{
    Resource,
    propagation::TraceContextPropagator,
    trace::{IdGenerator, RandomIdGenerator, SdkTracerProvider, Span, Tracer},
};

/// The header (HTTP and NATS) the context travels in.
pub const TRACEPARENT: &str = "traceparent";

/// Longest `traceparent` value read: version 00's is 55 characters; a
/// later version may append fields.
const MAX_TRACEPARENT: usize = 256;

/// Where a unit of work stands in its trace: its trace id and its own span
/// id (the parent of what it causes).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Trace(SpanContext);

impl Trace {
    /// The trace id, as log lines and tools show it (32 hex digits).
    pub fn trace_id(&self) -> String {
        self.0.trace_id().to_string()
    }

    /// The `traceparent` of what this work causes.
    pub fn traceparent(&self) -> String {
        let mut carrier = HashMap::new();
        let cx = Context::new().with_remote_span_context(self.0.clone());
        TraceContextPropagator::new().inject_context(&cx, &mut carrier);
        carrier.remove(TRACEPARENT).unwrap_or_default()
    }
}

/// The parent a `traceparent` value names, if it is a valid one (W3C
/// trace context, parsed by OpenTelemetry's propagator).
pub fn parse(traceparent: Option<&str>) -> Option<SpanContext> {
    let value = traceparent.filter(|v| v.len() <= MAX_TRACEPARENT)?;
    let carrier = HashMap::from([(TRACEPARENT.to_string(), value.to_string())]);
    let cx = TraceContextPropagator::new().extract(&carrier);
    let parent = cx.span().span_context().clone();
    parent.is_valid().then_some(parent)
}

/// The trace id (32 hex digits) a `traceparent` value names, if valid.
pub fn trace_id(traceparent: Option<&str>) -> Option<String> {
    parse(traceparent).map(|parent| parent.trace_id().to_string())
}

tokio::task_local! {
    static CURRENT: Trace;
}

/// The trace of the work this task is doing, if any.
pub fn current() -> Option<Trace> {
    CURRENT.try_with(Trace::clone).ok()
}

/// Runs `work` as part of `trace` (what it writes to the outbox carries it).
pub async fn within<F: Future>(trace: Trace, work: F) -> F::Output {
    CURRENT.scope(trace, work).await
}

/// A service's traces: where its spans go, if anywhere.
#[derive(Clone)]
pub struct Tracing {
    exporting: Option<(SdkTracerProvider, Tracer)>,
}

impl std::fmt::Debug for Tracing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tracing")
            .field("exporting", &self.exporting.is_some())
            .finish()
    }
}

impl Tracing {
    /// Carries trace context, exports nothing.
    pub fn off() -> Tracing {
        Tracing { exporting: None }
    }

    /// Exports `service`'s spans to the OTLP endpoint `endpoint`
    /// (`http://host:4318`; the signal's path `/v1/traces` is added).
    pub fn exporting(service: &str, endpoint: &str) -> Result<Tracing, String> {
        let endpoint = format!("{}/v1/traces", endpoint.trim_end_matches('/'));
        let exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .with_endpoint(endpoint)
            .with_timeout(std::time::Duration::from_secs(5))
            .with_headers(HashMap::new())
            .build()
            .map_err(|e| format!("OTLP exporter: {e}"))?;
        let provider = SdkTracerProvider::builder()
            .with_batch_exporter(exporter)
            .with_resource(
                Resource::builder_empty()
                    .with_service_name(service.to_string())
                    .build(),
            )
            .build();
        let tracer = provider.tracer("saga");
        Ok(Tracing {
            exporting: Some((provider, tracer)),
        })
    }

    /// Starts a unit of work whose parent is `parent` (none: a new trace).
    /// `describe` gives its span's name and attributes; it runs only when
    /// spans are exported, so work that is not exported allocates nothing
    /// for them (every event goes through here).
    pub fn start<N: Into<Cow<'static, str>>>(
        &self,
        kind: SpanKind,
        parent: Option<SpanContext>,
        describe: impl FnOnce() -> (N, Vec<KeyValue>),
    ) -> Work {
        let Some((_, tracer)) = &self.exporting else {
            let ids = RandomIdGenerator::default();
            let (trace_id, flags) = match &parent {
                Some(p) => (p.trace_id(), p.trace_flags()),
                None => (ids.new_trace_id(), TraceFlags::SAMPLED),
            };
            let own = SpanContext::new(
                trace_id,
                ids.new_span_id(),
                flags,
                false,
                Default::default(),
            );
            return Work {
                trace: Trace(own),
                span: Mutex::new(None),
            };
        };
        let cx = match parent {
            Some(p) => Context::new().with_remote_span_context(p),
            None => Context::new(),
        };
        let (name, attributes) = describe();
        let span = tracer
            .span_builder(name)
            .with_kind(kind)
            .with_start_time(SystemTime::now())
            .with_attributes(attributes)
            .start_with_context(tracer, &cx);
        let own = span.span_context().clone();
        debug_assert!(own.trace_id() != TraceId::INVALID);
        Work {
            trace: Trace(own),
            span: Mutex::new(Some(span)),
        }
    }

    /// Exports what is buffered (at shutdown).
    pub fn flush(&self) {
        if let Some((provider, _)) = &self.exporting
            && let Err(e) = provider.force_flush()
        {
            tracing::warn!(error = %e, "traces not exported");
        }
    }
}

/// A unit of work under way: its trace, and its span while exported.
#[derive(Debug)]
pub struct Work {
    pub trace: Trace,
    span: Mutex<Option<Span>>,
}

impl Work {
    /// Ends the work's span (once; later calls do nothing), with what it
    /// came to: `error` marks it failed, `attributes` (asked only when the
    /// span is exported) are added.
    pub fn end(&self, error: Option<&str>, attributes: impl FnOnce() -> Vec<KeyValue>) {
        let span = self.span.lock().ok().and_then(|mut s| s.take());
        if let Some(mut span) = span {
            span.set_attributes(attributes());
            if let Some(why) = error {
                span.set_status(Status::error(why.to_string()));
            }
            span.end();
        }
    }
}

impl Drop for Work {
    fn drop(&mut self) {
        self.end(None, Vec::new);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PARENT: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn a_valid_traceparent_is_the_parent_and_the_work_keeps_its_trace() {
        let parent = parse(Some(PARENT)).expect("valid");
        let work = Tracing::off().start(SpanKind::Server, Some(parent.clone()), || ("x", vec![]));
        assert_eq!(work.trace.trace_id(), "4bf92f3577b34da6a3ce929d0e0e4736");
        let own = work.trace.traceparent();
        assert!(
            own.starts_with("00-4bf92f3577b34da6a3ce929d0e0e4736-"),
            "{own}"
        );
        assert!(own.ends_with("-01"), "{own}");
        assert_ne!(own, PARENT, "the work has a span id of its own");
        assert_eq!(
            parse(Some(&own)).map(|c| c.trace_id()),
            Some(parent.trace_id())
        );
    }

    #[test]
    fn an_invalid_or_absent_traceparent_starts_a_trace() {
        for bad in [
            None,
            Some(""),
            Some("00-00000000000000000000000000000000-00f067aa0ba902b7-01"),
            Some("00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01"),
            Some("garbage"),
            Some("00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01-"),
        ] {
            assert!(parse(bad).is_none(), "{bad:?}");
        }
        let long = format!("{PARENT}-{}", "a".repeat(MAX_TRACEPARENT));
        assert!(parse(Some(&long)).is_none());
        let a = Tracing::off().start(SpanKind::Server, None, || ("x", vec![]));
        let b = Tracing::off().start(SpanKind::Server, None, || ("x", vec![]));
        assert_ne!(a.trace.trace_id(), b.trace.trace_id());
        assert_eq!(a.trace.trace_id().len(), 32);
    }
}
