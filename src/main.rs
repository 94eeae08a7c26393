//! The `walvault` binary: parse arguments, run, print any error as one line.

use clap::Parser;

/// glibc's allocator, tuned by two variables read when the process starts
/// (walvault sets what is not set and executes itself once more; a value
/// already set is left alone, and if the re-execution fails the process
/// simply goes on):
///
/// - `MALLOC_ARENA_MAX=2`: glibc gives threads that allocate their own
///   arena (up to eight per core) and keeps what is freed in each: a
///   `restore-pitr` that decodes 16 MiB WAL segments on the blocking pool's
///   threads peaked at 369 MB of RSS for 95 MB of live heap; with two
///   arenas, 132 MB, and no slower (docs/benchmarks.md).
/// - `MALLOC_MMAP_THRESHOLD_=8388608`: allocations of 8 MiB and more (packs
///   being filled, WAL segments, manifests, the index) get pages of their
///   own and give them back when freed. glibc otherwise raises this
///   threshold to the size of each large block freed, up to 32 MiB, and
///   serves the next ones from its arenas, where the freed space stays: a
///   15 GB backup with 16 MiB packs peaked at 305 MiB of RSS for 210 MiB of
///   heap. Smaller buffers (a restore's reads of up to 4 MiB) stay in the
///   arenas.
fn tune_malloc() {
    use std::os::unix::process::CommandExt;
    const SETTINGS: [(&str, &str); 2] = [
        ("MALLOC_ARENA_MAX", "2"),
        ("MALLOC_MMAP_THRESHOLD_", "8388608"),
    ];
    let missing: Vec<(&str, &str)> = SETTINGS
        .into_iter()
        .filter(|(var, _)| std::env::var_os(var).is_none())
        .collect();
    if missing.is_empty() {
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
    let _ = cmd.args(args).envs(missing).exec();
}

fn main() -> std::process::ExitCode {
    tune_malloc();
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
