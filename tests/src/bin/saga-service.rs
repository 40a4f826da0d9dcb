//! Runs one service of the roster by name, exactly as its own binary would.
//! The integration tests run services through this when they need a real
//! process to SIGKILL.

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let name = std::env::args().nth(1).unwrap_or_default();
    stack::services::serve(&name).await
}
