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

use crate::meter::names;

/// Longest a request may take.
pub use crate::http::REQUEST_TIMEOUT;

/// The request id's header.
pub const REQUEST_ID: &str = "x-request-id";

/// Longest request id taken from a caller; a longer one (or one with other
/// than letters, digits and `-_.:`) is replaced.
pub const MAX_REQUEST_ID: usize = 128;

/// `router` in the shell, for `service`'s metrics.
pub fn shell(router: Router, service: &str) -> Router {
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
                    tracing::info_span!("request", method = %request.method(), route, request_id = id)
                })
                .on_request(())
                .on_response(DefaultOnResponse::new().level(Level::DEBUG)),
        )
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
