//! HTTP pieces every service shares: the error type that maps to status codes,
//! JSON and query extractors whose rejections are 4xx with a readable message, the
//! request limits, and the liveness/readiness router.

use std::{future::Future, time::Duration};

use axum::{
    Json,
    extract::{FromRequest, FromRequestParts, Query, Request, State, rejection::JsonRejection},
    http::request::Parts,
    http::{HeaderMap, StatusCode, header, header::IF_MATCH},
    response::{IntoResponse, Response},
};
use futures::StreamExt;
use serde::{Serialize, de::DeserializeOwned};
use serde_json::json;
use sqlx::PgPool;
use utoipa::ToSchema;
use utoipa_axum::{router::OpenApiRouter, routes};

use crate::{
    health::{Condition, Health},
    idempotency::Redis,
};

/// Error of an HTTP handler. 4xx messages go to the caller; the cause of a
/// 500 is logged and never sent.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    Unprocessable(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    PreconditionFailed(String),
    #[error("{0}")]
    PreconditionRequired(String),
    #[error("{0}")]
    TooLarge(String),
    /// An operator endpoint without the admin token, or a customer's
    /// command without its credential.
    #[error("{0}")]
    Unauthorized(String),
    /// A credential that does not grant what was asked.
    #[error("{0}")]
    Forbidden(String),
    /// What this service relies on (the broker, another service) failed
    /// or did not answer: the message says which, and what it said.
    #[error("{0}")]
    BadGateway(String),
    #[error("internal error")]
    Internal(#[source] anyhow::Error),
}

impl From<sqlx::Error> for ApiError {
    fn from(e: sqlx::Error) -> Self {
        ApiError::Internal(e.into())
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = match &self {
            ApiError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ApiError::Unprocessable(_) => StatusCode::UNPROCESSABLE_ENTITY,
            ApiError::NotFound(_) => StatusCode::NOT_FOUND,
            ApiError::Conflict(_) => StatusCode::CONFLICT,
            ApiError::PreconditionFailed(_) => StatusCode::PRECONDITION_FAILED,
            ApiError::PreconditionRequired(_) => StatusCode::PRECONDITION_REQUIRED,
            ApiError::TooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            ApiError::Forbidden(_) => StatusCode::FORBIDDEN,
            ApiError::BadGateway(m) => {
                tracing::warn!(error = %m, "a dependency failed");
                StatusCode::BAD_GATEWAY
            }
            ApiError::Internal(e) => {
                tracing::error!(error = ?e, "request failed");
                StatusCode::INTERNAL_SERVER_ERROR
            }
        };
        let mut response = (status, Json(json!({ "error": self.to_string() }))).into_response();
        if status == StatusCode::UNAUTHORIZED {
            response.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                header::HeaderValue::from_static("Bearer"),
            );
        }
        response
    }
}

/// `Json<T>` whose rejections are `ApiError::BadRequest` with serde's message
/// (which names the field and position), and a 413 for a body over
/// [`crate::limits::MAX_BODY_BYTES`].
pub struct ValidJson<T>(pub T);

/// How much of an oversized body is read and thrown away so the client,
/// still uploading, can read its 413. Past this the connection is closed
/// mid-upload (which the client may see as a reset).
const OVERSIZED_BODY_DRAINED: usize = 16 << 20;

impl<T: DeserializeOwned, S: Send + Sync> FromRequest<S> for ValidJson<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        let (parts, body) = req.into_parts();
        let mut chunks = body.into_data_stream();
        let mut kept = Vec::new();
        let mut seen = 0usize;
        while let Some(chunk) = chunks.next().await {
            let chunk = chunk
                .map_err(|e| ApiError::BadRequest(format!("reading the request body: {e}")))?;
            seen = seen.saturating_add(chunk.len());
            if seen <= crate::limits::MAX_BODY_BYTES {
                kept.extend_from_slice(&chunk);
            } else if seen > OVERSIZED_BODY_DRAINED {
                break;
            }
        }
        if seen > crate::limits::MAX_BODY_BYTES {
            return Err(ApiError::TooLarge(format!(
                "request body larger than {} bytes",
                crate::limits::MAX_BODY_BYTES
            )));
        }
        let req = Request::from_parts(parts, axum::body::Body::from(kept));
        match Json::<T>::from_request(req, state).await {
            Ok(Json(v)) => Ok(ValidJson(v)),
            Err(JsonRejection::JsonDataError(e)) => Err(ApiError::Unprocessable(e.body_text())),
            Err(e) => Err(ApiError::BadRequest(e.body_text())),
        }
    }
}

/// `Query<T>` whose rejection is an `ApiError::BadRequest` naming the
/// parameter that did not parse.
pub struct ValidQuery<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequestParts<S> for ValidQuery<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        match Query::<T>::from_request_parts(parts, state).await {
            Ok(Query(v)) => Ok(ValidQuery(v)),
            Err(e) => Err(ApiError::BadRequest(e.body_text())),
        }
    }
}

/// The admin token operator endpoints require (`ADMIN_TOKEN`); without
/// one, they refuse everyone.
#[derive(Clone, Default)]
pub struct AdminToken(Option<std::sync::Arc<str>>);

impl AdminToken {
    pub fn new(token: Option<&str>) -> AdminToken {
        AdminToken(token.map(Into::into))
    }

    /// Whether `given` (a bearer credential) is the admin token.
    pub fn admits(&self, given: &str) -> bool {
        self.0
            .as_ref()
            .is_some_and(|token| same(token.as_bytes(), given.as_bytes()))
    }

    /// The request's bearer credential (`Authorization: Bearer <it>`), if any.
    pub fn bearer(headers: &HeaderMap) -> Option<&str> {
        headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
    }

    /// Lets a request through if it carries `Authorization: Bearer
    /// <token>`; a 401 that says what is missing otherwise. Every refusal is
    /// logged.
    pub fn check(&self, headers: &HeaderMap, what: &str) -> Result<(), ApiError> {
        let given = AdminToken::bearer(headers);
        let refusal = match (&self.0, given) {
            (None, _) => "operator endpoints are disabled: the service has no ADMIN_TOKEN",
            (Some(_), None) => "an operator endpoint: send Authorization: Bearer <ADMIN_TOKEN>",
            (Some(token), Some(given)) if !same(token.as_bytes(), given.as_bytes()) => {
                "wrong admin token"
            }
            _ => return Ok(()),
        };
        tracing::warn!(%what, %refusal, "operator request refused");
        Err(ApiError::Unauthorized(refusal.into()))
    }
}

/// A layer's function for routes only the operator may call, reads
/// included: the request goes on only with the admin token
/// (`axum::middleware::from_fn_with_state(admin, operator_only)`).
pub async fn operator_only(
    State(admin): State<AdminToken>,
    request: Request,
    next: axum::middleware::Next,
) -> Result<Response, ApiError> {
    let what = format!("{} {}", request.method(), request.uri().path());
    admin.check(request.headers(), &what)?;
    Ok(next.run(request).await)
}

/// Equal, in time that depends neither on where they differ nor on the
/// secret's length: both are hashed to 32 bytes first, and the digests are
/// compared whole.
pub fn same(a: &[u8], b: &[u8]) -> bool {
    use sha2::{Digest, Sha256};
    let (a, b) = (Sha256::digest(a), Sha256::digest(b));
    a.iter()
        .zip(b.iter())
        .fold(0u8, |acc, (x, y)| acc | (x ^ y))
        == 0
}

/// A web origin, as a browser names the page it runs (`Origin`) and as
/// CORS and a content security policy name it: `http://` or `https://`,
/// a host of letters, digits, `.` and `-` (or a bracketed IPv6 address)
/// and an optional port, nothing else. Returned lowercased, without a
/// trailing `/`.
pub fn origin(text: &str) -> Result<String, String> {
    let refused = |why: &str| format!("{text:?} is not an origin (http://host[:port]): {why}");
    let uri: axum::http::Uri = text.parse().map_err(|e| refused(&format!("{e}")))?;
    let scheme = uri
        .scheme_str()
        .filter(|s| *s == "http" || *s == "https")
        .ok_or_else(|| refused("the scheme must be http or https"))?;
    let authority = uri.authority().ok_or_else(|| refused("no host"))?;
    if authority.as_str().contains('@') {
        return Err(refused("no user or password"));
    }
    if !matches!(uri.path(), "" | "/") || uri.query().is_some() {
        return Err(refused("no path or query"));
    }
    let host = authority.host();
    let plain = !host.is_empty()
        && host
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '.' || c == '-');
    let ipv6 = host.len() > 2
        && host.starts_with('[')
        && host.ends_with(']')
        && host[1..host.len() - 1]
            .chars()
            .all(|c| c.is_ascii_hexdigit() || c == ':' || c == '.');
    if !(plain || ipv6) {
        return Err(refused("the host has characters no host name has"));
    }
    let port = match (authority.as_str().len() > host.len(), authority.port_u16()) {
        (false, _) => String::new(),
        (true, Some(port)) => format!(":{port}"),
        (true, None) => return Err(refused("the port is not a number from 0 to 65535")),
    };
    Ok(format!("{scheme}://{}{port}", host.to_ascii_lowercase()))
}

/// An `If-Match` precondition on a versioned resource, whose `ETag` is
/// its version in quotes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Version {
    /// `If-Match: *`: whatever version is there.
    Any,
    Exactly(i64),
}

impl Version {
    /// The request's `If-Match`, if any; 400 if it is not one we issued.
    pub fn if_match(headers: &HeaderMap) -> Result<Option<Version>, ApiError> {
        let Some(value) = headers.get(IF_MATCH) else {
            return Ok(None);
        };
        let text = value.to_str().unwrap_or_default().trim();
        if text == "*" {
            return Ok(Some(Version::Any));
        }
        let tag = text.strip_prefix("W/").unwrap_or(text).trim_matches('"');
        tag.parse::<i64>()
            .ok()
            .filter(|v| *v > 0)
            .map(|v| Some(Version::Exactly(v)))
            .ok_or_else(|| {
                ApiError::BadRequest(format!(
                    "If-Match must be * or the ETag of a GET (a quoted version such as \"3\"), got {text:?}"
                ))
            })
    }

    /// The `ETag` value for a version.
    pub fn etag(self) -> String {
        match self {
            Version::Any => "*".into(),
            Version::Exactly(v) => format!("\"{v}\""),
        }
    }
}

/// A resource created by `PUT` and overwritten by `PUT` only under
/// `If-Match` (accounts, stock): the one flow both follow. Without
/// `If-Match`, or with `*`, a missing resource is created (201); an existing
/// one is overwritten only with `If-Match` (428 without it), and only at the
/// version named (412 if it moved on; `*` takes any version).
pub struct VersionedPut<'a> {
    /// How messages name it: `account 'alice'`, `stock of 'widget'`.
    pub what: &'a str,
    /// Appended to the 428 message: how else to change it.
    pub hint: &'a str,
}

impl VersionedPut<'_> {
    /// Runs the flow. `create` inserts if absent and returns the new
    /// resource (`None`: it exists); `overwrite(expected)` updates it if at
    /// `expected` (`None`: any version) and returns it; `version` reads the
    /// current version to explain a 412.
    pub async fn run<T, C, O, V>(
        &self,
        headers: &HeaderMap,
        create: impl FnOnce() -> C,
        overwrite: impl FnOnce(Option<i64>) -> O,
        version: impl FnOnce() -> V,
    ) -> Result<(StatusCode, T), ApiError>
    where
        C: Future<Output = Result<Option<T>, sqlx::Error>>,
        O: Future<Output = Result<Option<T>, sqlx::Error>>,
        V: Future<Output = Result<Option<i64>, sqlx::Error>>,
    {
        let what = self.what;
        let precondition = Version::if_match(headers)?;
        // With a version named, only an overwrite of that version will do.
        if !matches!(precondition, Some(Version::Exactly(_)))
            && let Some(created) = create().await?
        {
            return Ok((StatusCode::CREATED, created));
        }
        let expected = match precondition {
            None => {
                return Err(ApiError::PreconditionRequired(format!(
                    "{what} exists: to overwrite it send If-Match with the ETag of a GET (or If-Match: *); {}",
                    self.hint
                )));
            }
            Some(Version::Any) => None,
            Some(Version::Exactly(v)) => Some(v),
        };
        if let Some(updated) = overwrite(expected).await? {
            return Ok((StatusCode::OK, updated));
        }
        Err(ApiError::PreconditionFailed(match version().await? {
            None => format!("{what} does not exist; create it without If-Match"),
            Some(v) => format!(
                "{what} is at version {v}, not {}: it changed since it was read; read it again",
                expected.unwrap_or_default()
            ),
        }))
    }
}

/// What readiness checks.
#[derive(Clone)]
pub struct HealthState {
    pub pool: PgPool,
    pub redis: Redis,
    pub nats: async_nats::Client,
    pub board: Health,
}

/// Deadline of each readiness check: a hung dependency makes the answer
/// "unavailable", never a hung probe.
pub const CHECK_TIMEOUT: Duration = Duration::from_secs(2);

/// `GET /health/live` (the process answers) and `GET /health/ready`.
pub fn health_routes() -> OpenApiRouter<HealthState> {
    OpenApiRouter::new()
        .routes(routes!(live))
        .routes(routes!(ready))
}

/// What `GET /health/live` answers.
#[derive(Serialize, ToSchema)]
struct Live {
    /// Always `ok`: the process answers.
    status: String,
}

/// `GET /health/live`: the process answers (liveness).
#[utoipa::path(get, path = "/health/live", tag = "health",
    responses((status = 200, description = "The process answers", body = Live)))]
async fn live() -> Json<Live> {
    Json(Live {
        status: "ok".into(),
    })
}

/// What `GET /health/ready` answers.
#[derive(Serialize, ToSchema)]
struct Readiness {
    /// `ready`, `degraded` (Redis down, or a part working with less than it
    /// should) or `unavailable`.
    status: String,
    /// `ok`, or what is wrong with each dependency.
    #[schema(value_type = std::collections::BTreeMap<String, String>)]
    checks: serde_json::Value,
    /// `part: detail` of each failing part.
    failing: Vec<String>,
    /// `part: detail` of what needs a person.
    alerts: Vec<String>,
    /// What each background part last reported.
    #[schema(value_type = Object)]
    parts: serde_json::Value,
}

/// Longest a request may take.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

async fn within<F: Future<Output = Result<(), String>>>(check: F) -> Result<(), String> {
    tokio::time::timeout(CHECK_TIMEOUT, check)
        .await
        .unwrap_or_else(|_| Err(format!("no answer within {CHECK_TIMEOUT:?}")))
}

#[utoipa::path(get, path = "/health/ready", tag = "health",
    responses(
        (status = 200, description = "Ready (or degraded): takes work", body = Readiness),
        (status = 503, description = "Unavailable: names what is wrong", body = Readiness),
    ))]
/// 200 when Postgres and NATS answer and no part of the service is failing
/// (`status` "ready", or "degraded" when Redis is down or a part works with
/// less than it should), 503 naming what is wrong otherwise. `parts` shows
/// what each background part last reported, `alerts` what needs a person.
async fn ready(State(s): State<HealthState>) -> Response {
    let (pg, redis) = tokio::join!(
        within(async {
            sqlx::query_scalar::<_, i32>("SELECT 1")
                .fetch_one(&s.pool)
                .await
                .map(|_| ())
                .map_err(|e| e.to_string())
        }),
        within(async { s.redis.ping().await.map_err(|e| e.to_string()) }),
    );
    let nats = match s.nats.connection_state() {
        async_nats::connection::State::Connected => Ok(()),
        other => Err(format!("{other:?}").to_lowercase()),
    };
    let parts = s.board.snapshot();
    // "part: detail" for every part whose condition `pick` selects.
    let listed = |pick: fn(&Condition) -> Option<&String>| -> Vec<String> {
        parts
            .iter()
            .filter_map(|(name, r)| pick(&r.condition).map(|d| format!("{name}: {d}")))
            .collect()
    };
    let failing = listed(|c| match c {
        Condition::Failing(d) => Some(d),
        _ => None,
    });
    let alerts = listed(|c| match c {
        Condition::Alert(d) => Some(d),
        _ => None,
    });
    let degraded = redis.is_err()
        || parts
            .values()
            .any(|r| matches!(r.condition, Condition::Degraded(_)));
    let show = |r: &Result<(), String>| match r {
        Ok(()) => "ok".to_string(),
        Err(e) => e.clone(),
    };
    let redis_shown = match &redis {
        Ok(()) => "ok".to_string(),
        Err(e) => format!("degraded: consuming on the Postgres guard alone ({e})"),
    };
    let ok = pg.is_ok() && nats.is_ok() && failing.is_empty();
    let status = match (ok, degraded) {
        (false, _) => "unavailable",
        (true, true) => "degraded",
        (true, false) => "ready",
    };
    let body = Readiness {
        status: status.into(),
        checks: json!({ "postgres": show(&pg), "redis": redis_shown, "nats": show(&nats) }),
        failing,
        alerts,
        parts: json!(parts),
    };
    let code = if ok {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (code, Json(body)).into_response()
}

#[cfg(test)]
mod tests {
    #[test]
    fn an_origin_is_a_scheme_a_host_and_a_port_and_nothing_else() {
        for (given, expected) in [
            ("http://127.0.0.1:8081", "http://127.0.0.1:8081"),
            (
                "https://Console.Example.com/",
                "https://console.example.com",
            ),
            ("http://[::1]:8090", "http://[::1]:8090"),
        ] {
            assert_eq!(super::origin(given).as_deref(), Ok(expected), "{given}");
        }
        for refused in [
            "ftp://example.com",
            "127.0.0.1:8090",
            "http://user:pw@example.com",
            "http://example.com/path",
            "http://example.com/?q=1",
            "http://exa;mple.com",
            "http://exa'mple.com",
            "http://example.com:99999",
            "",
        ] {
            assert!(super::origin(refused).is_err(), "{refused} taken");
        }
    }

    use super::*;

    #[test]
    fn tokens_are_the_same_only_when_every_byte_is() {
        assert!(same(b"0123456789abcdef", b"0123456789abcdef"));
        assert!(!same(b"0123456789abcdef", b"0123456789abcdeF"));
        assert!(!same(b"0123456789abcdef", b"0123456789abcde"));
        assert!(!same(b"0123456789abcdef", b"0123456789abcdef0"));
        assert!(!same(b"", b"0"));
    }
}
