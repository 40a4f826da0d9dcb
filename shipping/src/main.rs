#[tokio::main]
async fn main() -> anyhow::Result<()> {
    common::service::main_with("shipping", shipping::build).await
}
