//! Runs one service of the roster by name, exactly as its own binary would.
//! The integration tests run services through this when they need a real
//! process to SIGKILL.

#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

// On the runtime the service's own binary runs on.
fn main() -> anyhow::Result<()> {
    let mut args = std::env::args_os().skip(1);
    let name = args.next().unwrap_or_default();
    common::service::runtime()?.block_on(stack::services::serve(
        &name.to_string_lossy(),
        args.collect(),
    ))
}
