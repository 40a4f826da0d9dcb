//! The Redis layer's done markers, against a real Redis: an applied event's
//! marker is written on the next claim's round trip, or on its own soon
//! after when no claim comes, and a redelivery sees it either way.

use std::time::Duration;

use anyhow::Result;
use common::{
    health::Health,
    idempotency::{Claim, DONE_RIDES_FOR, DoneTtl, IdempotencyStore, Redis},
};
use saga_tests::{RedisServer, eventually};
use uuid::Uuid;

/// A store on a private Redis, connected.
async fn store(redis: &RedisServer) -> Result<IdempotencyStore> {
    let connection = Redis::connect(&redis.url(), Health::default())?;
    eventually("the store to reach redis", Duration::from_secs(10), || {
        let connection = connection.clone();
        async move { Ok(connection.ping().await.ok()) }
    })
    .await?;
    Ok(IdempotencyStore::new(
        connection,
        "t",
        "payment",
        DoneTtl::default(),
    ))
}

/// What Redis holds for `event` (as the store names its keys).
async fn marker(redis: &RedisServer, event: Uuid) -> Result<Option<String>> {
    let mut conn = redis.connection().await?;
    Ok(redis::cmd("GET")
        .arg(format!("t:idem:payment:{event}"))
        .query_async(&mut conn)
        .await?)
}

/// Waits until Redis holds `event`'s done marker, written without a claim.
async fn written(redis: &RedisServer, event: Uuid) -> Result<()> {
    eventually(
        "the done marker written without a claim",
        DONE_RIDES_FOR + Duration::from_secs(5),
        || async move { Ok((marker(redis, event).await?.as_deref() == Some("done")).then_some(())) },
    )
    .await
}

#[tokio::test]
async fn a_marker_not_written_yet_is_written_with_the_next_claim_which_sees_it() -> Result<()> {
    let redis = RedisServer::start().await?;
    let store = store(&redis).await?;
    let (applied, next) = (Uuid::new_v4(), Uuid::new_v4());
    assert_eq!(store.claim_all(&[applied]).await, [Claim::Claimed]);

    store.mark_done_soon(&[applied]);
    // A redelivery of the applied event claimed with the next one, at once.
    assert_eq!(
        store.claim_all(&[applied, next]).await,
        [Claim::Done, Claim::Claimed]
    );
    assert_eq!(marker(&redis, applied).await?.as_deref(), Some("done"));
    assert_eq!(marker(&redis, next).await?.as_deref(), Some("started"));
    Ok(())
}

#[tokio::test]
async fn a_marker_no_claim_takes_along_is_written_on_its_own() -> Result<()> {
    let redis = RedisServer::start().await?;
    let store = store(&redis).await?;
    let applied: Vec<Uuid> = (0..3).map(|_| Uuid::new_v4()).collect();
    assert_eq!(store.claim_all(&applied).await, [Claim::Claimed; 3]);

    store.mark_done_soon(&applied[..2]);
    store.mark_done_soon(&applied[2..]);
    for event in &applied {
        written(&redis, *event).await?;
    }
    // Again, once the first batch is written: the writer wakes again.
    let later = Uuid::new_v4();
    assert_eq!(store.claim_all(&[later]).await, [Claim::Claimed]);
    store.mark_done_soon(&[later]);
    written(&redis, later).await
}

#[tokio::test]
async fn markers_waiting_are_written_by_a_flush() -> Result<()> {
    let redis = RedisServer::start().await?;
    let store = store(&redis).await?;
    let applied = Uuid::new_v4();
    assert_eq!(store.claim_all(&[applied]).await, [Claim::Claimed]);

    store.mark_done_soon(&[applied]);
    store.flush_done().await?;
    assert_eq!(marker(&redis, applied).await?.as_deref(), Some("done"));
    Ok(())
}
