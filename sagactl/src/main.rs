use std::process::ExitCode;

#[tokio::main]
async fn main() -> ExitCode {
    sagactl::main(std::env::args_os()).await
}
