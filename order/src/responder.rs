//! The order service's NATS request-reply commands, so `nats req` can start
//! and cancel a saga without HTTP; queue group `order`.
//!
//! - `<prefix>.cmd.order.place`: the body is the `POST /orders` body;
//!   `Nats-Msg-Id` or `Idempotency-Key` headers make a retried request safe.
//! - `<prefix>.cmd.order.cancel`: `{"orderId": "...", "reason": "...",
//!   "cancelToken": "..."}`, as `POST /orders/{id}/cancel` with the token
//!   the placement answered with.
//!
//! The reply is the order as JSON (a placement's also carries its
//! `cancelToken`), or `{"error": "..."}` with a `Saga-Error` header
//! (`invalid`, `conflict`, `not_found`, `forbidden`, `internal`).

use std::time::Duration;

use async_nats::{HeaderMap, Message, header};
use common::{
    backoff::backoff,
    health::{Condition, Health},
};
use futures::StreamExt;
use serde::Deserialize;
use serde_json::json;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::{
    api::PlacedView,
    place::{Canceller, CommandError, PlaceError, PlaceOrder, Placer},
    read_model::OrderView,
};

/// Name of the responder in the health board.
pub const HEALTH_RESPONDER: &str = "commandResponder";

/// Subscribes now (so no request is missed once the service reports started)
/// and answers until shutdown, then finishes the requests in flight. If the
/// subscription ends while the service runs (the client lost it for good),
/// the responder says so in readiness and subscribes again.
pub async fn responder(
    nats: async_nats::Client,
    placer: Placer,
    health: Health,
    shutdown: CancellationToken,
) -> Result<impl std::future::Future<Output = ()>, async_nats::SubscribeError> {
    let subject = placer.subjects.order_commands();
    let mut requests = nats
        .queue_subscribe(subject.clone(), "order".into())
        .await?;
    health.ok(HEALTH_RESPONDER);
    Ok(async move {
        let mut tasks = JoinSet::new();
        'serve: loop {
            let msg = tokio::select! {
                _ = shutdown.cancelled() => break,
                m = requests.next() => m,
            };
            let Some(msg) = msg else {
                health.report(
                    HEALTH_RESPONDER,
                    Condition::Failing(format!("subscription to {subject} ended; resubscribing")),
                );
                tracing::error!(%subject, "place-order subscription ended; resubscribing");
                let mut attempt = 0;
                loop {
                    attempt += 1;
                    tokio::select! {
                        _ = shutdown.cancelled() => break 'serve,
                        _ = tokio::time::sleep(backoff(attempt, Duration::from_secs(5))) => {}
                    }
                    match nats.queue_subscribe(subject.clone(), "order".into()).await {
                        Ok(s) => {
                            requests = s;
                            health.ok(HEALTH_RESPONDER);
                            tracing::info!(%subject, "answering place-order commands again");
                            continue 'serve;
                        }
                        Err(e) => {
                            tracing::warn!(%subject, error = %e, "cannot resubscribe");
                        }
                    }
                }
            };
            let (nats, placer) = (nats.clone(), placer.clone());
            tasks.spawn(async move { answer(&nats, &placer, msg).await });
            while tasks.try_join_next().is_some() {}
        }
        let _ = requests.unsubscribe().await;
        while tasks.join_next().await.is_some() {}
    })
}

async fn answer(nats: &async_nats::Client, placer: &Placer, msg: Message) {
    let Some(reply) = msg.reply.clone() else {
        tracing::warn!(
            subject = %msg.subject,
            "order command without a reply subject ignored; use request-reply (nats req)"
        );
        return;
    };
    let result = if msg.subject.as_str() == placer.subjects.cancel_order_command() {
        cancel(placer, &msg).await
    } else if msg.subject.as_str() == placer.subjects.place_order_command() {
        place(placer, &msg).await
    } else {
        Err((
            "invalid",
            format!(
                "no command {}: use {} or {}",
                msg.subject,
                placer.subjects.place_order_command(),
                placer.subjects.cancel_order_command()
            ),
        ))
    };
    let (headers, body) = match result {
        Ok(answer) => (HeaderMap::new(), serde_json::to_vec(&answer)),
        Err((kind, message)) => {
            let mut h = HeaderMap::new();
            h.insert("Saga-Error", kind);
            (h, serde_json::to_vec(&json!({ "error": message })))
        }
    };
    let body = body.expect("replies serialize");
    if let Err(e) = nats.publish_with_headers(reply, headers, body.into()).await {
        tracing::warn!(error = %e, "could not reply to an order command");
    }
}

/// What a command failed with: its `Saga-Error` kind and message.
type Refusal = (&'static str, String);

/// What a command answers with.
#[derive(serde::Serialize)]
#[serde(untagged)]
enum Answer {
    Placed(PlacedView),
    Order(OrderView),
}

async fn place(placer: &Placer, msg: &Message) -> Result<Answer, Refusal> {
    // The library files a received Nats-Msg-Id under its own header name:
    // only its constant finds it.
    let key = msg
        .headers
        .as_ref()
        .and_then(|h| {
            h.get("Idempotency-Key")
                .or_else(|| h.get(header::NATS_MESSAGE_ID))
        })
        .map(|v| v.as_str().to_string());
    let result = match serde_json::from_slice::<PlaceOrder>(&msg.payload) {
        Err(e) => Err(PlaceError::Invalid(format!(
            "invalid place-order request: {e}"
        ))),
        Ok(request) => placer.place(request, key.as_deref()).await,
    };
    match result {
        Ok(placed) => Ok(Answer::Placed(placed.into())),
        Err(e) => Err(match &e {
            PlaceError::Invalid(m) => ("invalid", m.clone()),
            PlaceError::KeyReused(m) => ("conflict", m.clone()),
            PlaceError::Internal(cause) => {
                tracing::error!(error = ?cause, "place-order command failed");
                ("internal", "internal error".to_string())
            }
        }),
    }
}

async fn cancel(placer: &Placer, msg: &Message) -> Result<Answer, Refusal> {
    let request: CancelOrder = serde_json::from_slice(&msg.payload)
        .map_err(|e| ("invalid", format!("invalid cancel-order request: {e}")))?;
    let by = Canceller::TokenHolder(&request.cancel_token);
    placer
        .cancel(request.order_id, request.reason, by)
        .await
        .map(|order| Answer::Order(order.into()))
        .map_err(|e| match e {
            CommandError::NotFound(_) => ("not_found", e.to_string()),
            CommandError::Refused(m) => ("conflict", m),
            CommandError::Invalid(m) => ("invalid", m),
            CommandError::Forbidden(m) => ("forbidden", m),
            CommandError::Internal(cause) => {
                tracing::error!(error = ?cause, "cancel-order command failed");
                ("internal", "internal error".to_string())
            }
        })
}

/// `{"orderId": "...", "reason": "...", "cancelToken": "..."}`.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct CancelOrder {
    order_id: Uuid,
    reason: String,
    /// The token the order's placement answered with.
    cancel_token: String,
}
