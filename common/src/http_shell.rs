//! The shell every service's routes are served in: bounded request bodies
//! and a deadline per request (408), so no client can make a handler hold
//! a connection or memory indefinitely; a request id on every request
//! (`x-request-id`: the caller's, if it is a sane one, else a new one,
//! echoed in the answer); a span per request (tower-http) that every log
//! line of its handling carries, with the id and the route; and request
//! metrics by route and status.

use std::{sync::Arc, time::Instant};

use axum::{
    Router,
    extract::{DefaultBodyLimit, MatchedPath, Request},
    http::{HeaderName, HeaderValue, Method, StatusCode, header},
    middleware::{self, Next},
    response::Response,
};
use tower_http::{
    request_id::{MakeRequestUuid, PropagateRequestIdLayer, SetRequestIdLayer},
    timeout::TimeoutLayer,
    trace::{DefaultOnResponse, TraceLayer},
};
use tracing::Level;

use opentelemetry::{KeyValue, trace::SpanKind};

use crate::{
    meter::names,
    trace::{self, Trace, Tracing},
};

/// Longest a request may take.
pub use crate::http::REQUEST_TIMEOUT;

/// The request id's header.
pub const REQUEST_ID: &str = "x-request-id";

/// Longest request id taken from a caller; a longer one (or one with other
/// than letters, digits and `-_.:`) is replaced.
pub const MAX_REQUEST_ID: usize = 128;

/// `router` in the shell, for `service`'s metrics, its requests traced by
/// `tracing`.
pub fn shell(router: Router, service: &str, tracing: Tracing) -> Router {
    let service: Arc<str> = service.into();
    let request_id = HeaderName::from_static(REQUEST_ID);
    router
        .layer(DefaultBodyLimit::max(crate::limits::MAX_BODY_BYTES))
        .layer(TimeoutLayer::with_status_code(
            StatusCode::REQUEST_TIMEOUT,
            REQUEST_TIMEOUT,
        ))
        .layer(middleware::from_fn(with_message))
        .layer(middleware::from_fn(move |request: Request, next: Next| {
            measured(service.clone(), request, next)
        }))
        .layer(
            TraceLayer::new_for_http()
                .make_span_with(|request: &Request| {
                    let route = request
                        .extensions()
                        .get::<MatchedPath>()
                        .map_or("unmatched", MatchedPath::as_str);
                    let id = request
                        .headers()
                        .get(REQUEST_ID)
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or_default();
                    let trace_id = request
                        .extensions()
                        .get::<Trace>()
                        .map(Trace::trace_id)
                        .unwrap_or_default();
                    tracing::info_span!("request", method = %request.method(), route, request_id = id, trace_id)
                })
                .on_request(())
                .on_response(DefaultOnResponse::new().level(Level::DEBUG)),
        )
        .layer(middleware::from_fn(move |request: Request, next: Next| {
            traced(tracing.clone(), request, next)
        }))
        .layer(PropagateRequestIdLayer::new(request_id.clone()))
        .layer(SetRequestIdLayer::new(request_id, MakeRequestUuid))
        .layer(middleware::from_fn(sane_request_id))
}

/// Longest text of a refusal made outside the handlers (axum's, the
/// shell's) that is carried into its message.
const MAX_REFUSAL_TEXT: usize = 1024;

/// Gives every 4xx and 5xx an [`ErrorBody`](crate::api_doc::ErrorBody):
/// the handlers' own already are one; the refusals of the router (no
/// such route, a method it does not take, a path it cannot decode) and of
/// the shell (past the deadline, too large) are plain text or empty, and
/// become one saying what they said, or what their status means.
async fn with_message(request: Request, next: Next) -> Response {
    let method = request.method().clone();
    let path = request.uri().path().to_string();
    let response = next.run(request).await;
    let status = response.status();
    let json = response
        .headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/json"));
    if !(status.is_client_error() || status.is_server_error()) || json {
        return response;
    }
    let (mut parts, body) = response.into_parts();
    let said = axum::body::to_bytes(body, MAX_REFUSAL_TEXT)
        .await
        .map(|b| String::from_utf8_lossy(&b).trim().to_string())
        .unwrap_or_default();
    let reason = status.canonical_reason().unwrap_or("refused");
    let error = match status {
        StatusCode::NOT_FOUND if said.is_empty() => {
            let path: String = path.chars().take(MAX_REFUSAL_TEXT).collect();
            format!("no route {method} {path}")
        }
        StatusCode::METHOD_NOT_ALLOWED => {
            let allowed = parts
                .headers
                .get(header::ALLOW)
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default();
            format!("{method} is not allowed here; allowed: {allowed}")
        }
        StatusCode::REQUEST_TIMEOUT => {
            format!("no answer within {REQUEST_TIMEOUT:?}")
        }
        _ if said.is_empty() => reason.to_lowercase(),
        _ => format!("{}: {said}", reason.to_lowercase()),
    };
    let body = serde_json::to_vec(&crate::api_doc::ErrorBody { error }).unwrap_or_default();
    parts.headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    parts.headers.remove(header::CONTENT_LENGTH);
    Response::from_parts(parts, axum::body::Body::from(body))
}

/// Serves the request as a unit of work of its trace: the caller's
/// (`traceparent`), or a new one. What it writes to the outbox carries the
/// trace on; with an exporter, it is a server span with the route and
/// status.
async fn traced(tracing: Tracing, mut request: Request, next: Next) -> Response {
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| "unmatched".to_string(), |p| p.as_str().to_string());
    let parent = request
        .headers()
        .get(trace::TRACEPARENT)
        .and_then(|v| v.to_str().ok());
    let work = tracing.start(SpanKind::Server, trace::parse(parent), || {
        let method = request.method().to_string();
        (
            format!("{method} {route}"),
            vec![
                KeyValue::new("http.request.method", method),
                KeyValue::new("http.route", route.clone()),
            ],
        )
    });
    request.extensions_mut().insert(work.trace.clone());
    let response = trace::within(work.trace.clone(), next.run(request)).await;
    let status = response.status();
    work.end(
        status
            .is_server_error()
            .then(|| status.canonical_reason().unwrap_or("server error")),
        || {
            vec![KeyValue::new(
                "http.response.status_code",
                i64::from(status.as_u16()),
            )]
        },
    );
    response
}

/// Drops a caller's request id that is too long or holds other than
/// letters, digits and `-_.:`, so that a new one is made: it goes into
/// every log line of the request.
async fn sane_request_id(mut request: Request, next: Next) -> Response {
    let sane = |v: &HeaderValue| {
        let bytes = v.as_bytes();
        !bytes.is_empty()
            && bytes.len() <= MAX_REQUEST_ID
            && bytes
                .iter()
                .all(|b| b.is_ascii_alphanumeric() || b"-_.:".contains(b))
    };
    if request.headers().get(REQUEST_ID).is_some_and(|v| !sane(v)) {
        request.headers_mut().remove(REQUEST_ID);
    }
    next.run(request).await
}

/// Counts the request and times it, by method, route (the route's
/// pattern, never the path: ids stay out of the labels) and status.
async fn measured(service: Arc<str>, request: Request, next: Next) -> Response {
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| "unmatched".to_string(), |p| p.as_str().to_string());
    let method = match *request.method() {
        Method::GET => "GET",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::DELETE => "DELETE",
        Method::PATCH => "PATCH",
        Method::HEAD => "HEAD",
        Method::OPTIONS => "OPTIONS",
        _ => "other",
    };
    let started = Instant::now();
    let response = next.run(request).await;
    let status = response.status().as_u16().to_string();
    let labels = [
        ("service", service.to_string()),
        ("method", method.to_string()),
        ("route", route),
        ("status", status),
    ];
    metrics::counter!(names::HTTP_REQUESTS, &labels).increment(1);
    metrics::histogram!(names::HTTP_SECONDS, &labels).record(started.elapsed().as_secs_f64());
    response
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use axum::routing::get;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tracing_subscriber::prelude::*;

    use super::*;

    /// Collects what is logged, for one test.
    #[derive(Clone, Default)]
    struct Lines(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Lines {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().expect("lines").extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl<'w> tracing_subscriber::fmt::MakeWriter<'w> for Lines {
        type Writer = Lines;
        fn make_writer(&'w self) -> Self::Writer {
            self.clone()
        }
    }

    /// What a handler logs carries its request's id, route and the trace id
    /// of the caller's `traceparent`, in the JSON lines the services write.
    #[tokio::test]
    async fn a_handlers_log_line_carries_the_request_id_and_trace_id() {
        let lines = Lines::default();
        let subscriber =
            tracing_subscriber::registry().with(crate::telemetry::json_lines(lines.clone()));
        let _scope = tracing::subscriber::set_default(subscriber);
        let routes = Router::new().route(
            "/things/{id}",
            get(|| async {
                tracing::info!("handled the thing");
                "ok"
            }),
        );
        let app = shell(routes, "test", Tracing::off());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let server = tokio::spawn(async move { axum::serve(listener, app).await });
        let mut stream = tokio::net::TcpStream::connect(address).await.unwrap();
        let request = "GET /things/7 HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\
             x-request-id: req-42\r\n\
             traceparent: 00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01\r\n\r\n";
        stream.write_all(request.as_bytes()).await.unwrap();
        let mut answer = String::new();
        stream.read_to_string(&mut answer).await.unwrap();
        server.abort();
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
        let written = String::from_utf8(lines.0.lock().unwrap().clone()).unwrap();
        let line: serde_json::Value = written
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .find(|l: &serde_json::Value| l["fields"]["message"] == "handled the thing")
            .unwrap_or_else(|| panic!("the handler's line is not among {written}"));
        let span = &line["span"];
        assert_eq!(span["request_id"], "req-42", "{line}");
        assert_eq!(span["route"], "/things/{id}", "{line}");
        assert_eq!(
            span["trace_id"], "4bf92f3577b34da6a3ce929d0e0e4736",
            "{line}"
        );
    }
}
