//! The `walvault` binary: parse arguments, run, print any error as one line.

use clap::Parser;

/// glibc's allocator gives threads that allocate their own arena (up to
/// eight per core) and keeps what is freed in each: a `restore-pitr` that
/// decodes 16 MiB WAL segments on the blocking pool's threads peaked at
/// 369 MB of RSS for 95 MB of live heap; with two arenas, 132 MB, and no
/// slower (docs/benchmarks.md). The limit is read when the process starts,
/// so walvault sets it and executes itself once more; an explicit
/// `MALLOC_ARENA_MAX` is left alone, and if the re-execution fails the
/// process simply goes on.
fn limit_malloc_arenas() {
    use std::os::unix::process::CommandExt;
    const VAR: &str = "MALLOC_ARENA_MAX";
    if std::env::var_os(VAR).is_some() {
        return;
    }
    let Ok(exe) = std::env::current_exe() else {
        return;
    };
    let mut args = std::env::args_os();
    let mut cmd = std::process::Command::new(exe);
    if let Some(arg0) = args.next() {
        cmd.arg0(arg0);
    }
    // returns only when it failed
    let _ = cmd.args(args).env(VAR, "2").exec();
}

fn main() -> std::process::ExitCode {
    limit_malloc_arenas();
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
