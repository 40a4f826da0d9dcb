#[tokio::main]
async fn main() -> anyhow::Result<()> {
    inventory::main(std::env::args_os()).await
}
