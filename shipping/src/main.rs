#[tokio::main]
async fn main() -> anyhow::Result<()> {
    shipping::main(std::env::args_os()).await
}
