#[tokio::main]
async fn main() -> anyhow::Result<()> {
    payment::main(std::env::args_os()).await
}
