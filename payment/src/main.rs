#[tokio::main]
async fn main() -> anyhow::Result<()> {
    common::service::main_with("payment", payment::build).await
}
