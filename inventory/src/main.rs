#[tokio::main]
async fn main() -> anyhow::Result<()> {
    common::service::main_with("inventory", inventory::build).await
}
