// jemalloc: glibc's malloc cost a quarter of the service's CPU (docs/benchmarks.md).
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

// One worker thread unless TOKIO_WORKER_THREADS says otherwise
// (common::service::WORKER_THREADS).
fn main() -> anyhow::Result<()> {
    common::service::runtime()?.block_on(shipping::main(std::env::args_os()))
}
