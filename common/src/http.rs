//! HTTP pieces every service shares: the error type that maps to status codes,
//! a JSON extractor whose rejections are 400s with a readable message, and the
//! liveness/readiness router.

use axum::{
    Json, Router,
    extract::{FromRequest, Request, State, rejection::JsonRejection},
    http::StatusCode,
    response::{IntoResponse, Response},
    routing::get,
};
use redis::aio::ConnectionManager;
use serde::de::DeserializeOwned;
use serde_json::json;
use sqlx::PgPool;

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
            ApiError::Internal(e) => {
                tracing::error!(error = ?e, "request failed");
                StatusCode::INTERNAL_SERVER_ERROR
            }
        };
        (status, Json(json!({ "error": self.to_string() }))).into_response()
    }
}

/// `Json<T>` whose rejections are `ApiError::BadRequest` with serde's message
/// (which names the field and position).
pub struct ValidJson<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequest<S> for ValidJson<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        match Json::<T>::from_request(req, state).await {
            Ok(Json(v)) => Ok(ValidJson(v)),
            Err(JsonRejection::JsonDataError(e)) => Err(ApiError::Unprocessable(e.body_text())),
            Err(e) => Err(ApiError::BadRequest(e.body_text())),
        }
    }
}

/// What readiness checks.
#[derive(Clone)]
pub struct HealthState {
    pub pool: PgPool,
    pub redis: ConnectionManager,
    pub nats: async_nats::Client,
}

/// `GET /health/live` (the process answers) and `GET /health/ready`
/// (Postgres, Redis and NATS all reachable; 503 naming what is not).
pub fn health_router(state: HealthState) -> Router {
    Router::new()
        .route(
            "/health/live",
            get(|| async { Json(json!({ "status": "ok" })) }),
        )
        .route("/health/ready", get(ready))
        .with_state(state)
}

async fn ready(State(s): State<HealthState>) -> Response {
    let pg = sqlx::query_scalar::<_, i32>("SELECT 1")
        .fetch_one(&s.pool)
        .await
        .map(|_| ())
        .map_err(|e| e.to_string());
    let mut conn = s.redis.clone();
    let redis = redis::cmd("PING")
        .query_async::<String>(&mut conn)
        .await
        .map(|_| ())
        .map_err(|e| e.to_string());
    let nats = match s.nats.connection_state() {
        async_nats::connection::State::Connected => Ok(()),
        other => Err(format!("{other:?}").to_lowercase()),
    };
    let show = |r: &Result<(), String>| match r {
        Ok(()) => "ok".to_string(),
        Err(e) => e.clone(),
    };
    let ok = pg.is_ok() && redis.is_ok() && nats.is_ok();
    let body = json!({
        "status": if ok { "ready" } else { "unavailable" },
        "checks": { "postgres": show(&pg), "redis": show(&redis), "nats": show(&nats) },
    });
    let status = if ok {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, Json(body)).into_response()
}
