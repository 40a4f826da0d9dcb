//! Transport security: the services reach Postgres (`ssl = on`, TCP over TLS
//! only), Redis (its TLS port only, `rediss://`) and nats-server (TLS
//! required) over TLS, verifying the servers' certificates against an
//! authority made for the test (rustls, trust anchors from
//! `SSL_CERT_FILE`; Postgres with `sslmode=verify-full`). A saga goes
//! through; every Postgres session of the services is encrypted; a plain
//! connection is refused by each server.

use std::time::Duration;

use anyhow::Result;
use saga_tests::{Stack, TestCertificates};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_service_works_over_tls_to_postgres_redis_and_nats() -> Result<()> {
    let certs = TestCertificates::create()?;
    // Each test runs in a process of its own: these reach this test's
    // clients only. The operating system's trust store is replaced by the
    // test's authority, as an operator with a private authority would.
    // SAFETY: set before any thread of this test reads the environment.
    unsafe {
        std::env::set_var("SSL_CERT_FILE", &certs.ca);
        std::env::set_var("PGSSLMODE", "verify-full");
        std::env::set_var("PGSSLROOTCERT", &certs.ca);
    }
    let stack = Stack::start_with_tls(certs).await?;
    assert!(stack.config("payment").redis_url.starts_with("rediss://"));
    stack.set_balance("alice", 10_000).await?;
    stack.set_stock("widget", 5).await?;
    let (_, order) = stack
        .run_saga("alice", &[("widget", 2, 1_000)], "US")
        .await?;
    assert_eq!(order["status"], "CONFIRMED", "{order}");
    stack.assert_invariants().await?;

    // Every session of the services' databases is encrypted.
    let sessions: Vec<(String, bool)> = sqlx::query_as(
        "SELECT a.datname::text, s.ssl FROM pg_stat_ssl s JOIN pg_stat_activity a USING (pid)
         WHERE a.datname LIKE 'sagatest%'",
    )
    .fetch_all(&stack.pool("order").await?)
    .await?;
    assert!(!sessions.is_empty());
    assert!(sessions.iter().all(|(_, ssl)| *ssl), "{sessions:?}");

    // A client that does not speak TLS gets nowhere.
    let plain = format!(
        "{}?sslmode=disable",
        stack.postgres.as_ref().expect("its own server").admin_url()
    );
    let refused = sqlx::PgPool::connect(&plain).await.expect_err("plain TCP");
    assert!(refused.to_string().contains("no encryption"), "{refused}");
    let redis_plain = stack.redis.url().replace("rediss://", "redis://");
    let redis = redis::Client::open(redis_plain)?;
    let answer = tokio::time::timeout(Duration::from_secs(3), async {
        let mut c = redis.get_multiplexed_async_connection().await?;
        redis::cmd("PING").query_async::<String>(&mut c).await
    })
    .await;
    assert!(!matches!(answer, Ok(Ok(_))), "redis answered in plain text");
    // nats-server tells every client at once that TLS is required, and
    // speaks nothing else before the handshake.
    let address = stack
        .nats
        .url()
        .rsplit("//")
        .next()
        .unwrap_or_default()
        .to_string();
    let mut socket = tokio::net::TcpStream::connect(&address).await?;
    let mut info = vec![0u8; 4096];
    let n = tokio::time::timeout(
        Duration::from_secs(3),
        tokio::io::AsyncReadExt::read(&mut socket, &mut info),
    )
    .await??;
    let info = String::from_utf8_lossy(&info[..n]);
    assert!(info.contains("\"tls_required\":true"), "{info}");
    Ok(())
}
