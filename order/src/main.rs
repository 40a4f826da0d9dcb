#[tokio::main]
async fn main() -> anyhow::Result<()> {
    order::cli::main(std::env::args_os()).await
}
