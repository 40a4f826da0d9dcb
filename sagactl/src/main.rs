use std::process::ExitCode;

use clap::Parser;

#[tokio::main]
async fn main() -> ExitCode {
    // A command line that does not parse exits 2 (clap's usage error).
    let cli = sagactl::Cli::parse();
    let json = cli.json;
    let mut out = std::io::stdout();
    match sagactl::run(cli, &mut out).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            match json {
                true => eprintln!("{}", sagactl::failure::as_json(&e)),
                false => eprintln!("error: {e:#}"),
            }
            ExitCode::from(sagactl::exit_code(&e))
        }
    }
}
