//! The `pageviews` binary: parses the command line and runs one command (see `cli`).

use clap::Parser;

fn main() -> std::process::ExitCode {
    let cli = pageviews::cli::Cli::parse();
    pageviews::cli::init_logging();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(err) => {
            eprintln!("error: cannot start the async runtime: {err}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(pageviews::cli::run(cli));
    // A blocking task still waiting (stdin, a broker that does not answer) must not keep the
    // process alive after the command is done.
    runtime.shutdown_timeout(std::time::Duration::from_secs(2));
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {}", pageviews::one_line(err.as_ref()));
            std::process::ExitCode::FAILURE
        }
    }
}
