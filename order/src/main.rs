#[tokio::main]
async fn main() -> anyhow::Result<()> {
    common::service::main_with("order", order::build).await
}
