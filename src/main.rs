//! The `walvault` binary: parse arguments, run, print any error as one line.

use clap::Parser;

fn main() -> std::process::ExitCode {
    let cli = walvault::cli::Cli::parse();
    match walvault::cli::run(cli) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        // the reader of the output went away (`| head`): nothing is wrong
        Err(e) if walvault::cli::output::is_stdout_closed(&e) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("walvault: error: {}", walvault::cli::one_line(&e));
            std::process::ExitCode::from(walvault::cli::exit_code(&e))
        }
    }
}
