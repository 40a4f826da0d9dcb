//! Runs one of the four services by name, exactly as its own binary would.
//! The integration tests run services through this when they need a real
//! process to SIGKILL.

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let name = std::env::args().nth(1).unwrap_or_default();
    match name.as_str() {
        "order" => common::service::main_with("order", order::build).await,
        "payment" => common::service::main_with("payment", payment::build).await,
        "inventory" => common::service::main_with("inventory", inventory::build).await,
        "shipping" => common::service::main_with("shipping", shipping::build).await,
        _ => anyhow::bail!("usage: saga-service order|payment|inventory|shipping"),
    }
}
