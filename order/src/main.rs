// jemalloc: glibc's malloc cost a quarter of the service's CPU (docs/benchmarks.md).
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    order::cli::main(std::env::args_os()).await
}
