//! A command's output on standard output. [`outln!`] is `println!` that
//! returns an error instead of panicking: when the reader of the output goes
//! away (`walvault wal-inspect … | head -1`), the command stops with
//! [`StdoutClosed`] and `main` ends quietly with success, as ripgrep does.
//! Any other write error is an error.

/// Standard output was closed by its reader (EPIPE).
#[derive(Debug, thiserror::Error)]
#[error("standard output was closed")]
pub struct StdoutClosed;

/// An error writing to standard output, as the command returns it.
pub fn stdout_error(e: std::io::Error) -> anyhow::Error {
    if e.kind() == std::io::ErrorKind::BrokenPipe {
        anyhow::Error::new(StdoutClosed)
    } else {
        anyhow::Error::new(e).context("writing to standard output")
    }
}

/// Whether `e` only says that standard output was closed.
pub fn is_stdout_closed(e: &anyhow::Error) -> bool {
    e.chain().any(|c| c.is::<StdoutClosed>())
}

/// `println!` returning `anyhow::Result<()>`: use as `outln!(...)?`.
macro_rules! outln {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        writeln!(std::io::stdout().lock(), $($arg)*).map_err($crate::cli::output::stdout_error)
    }};
}
pub(crate) use outln;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_broken_pipe_is_told_apart_from_other_errors() {
        let closed = stdout_error(std::io::ErrorKind::BrokenPipe.into()).context("listing");
        assert!(is_stdout_closed(&closed));
        let full = stdout_error(std::io::Error::from_raw_os_error(28));
        assert!(!is_stdout_closed(&full));
        assert!(full.to_string().contains("standard output"), "{full}");
        // a broken pipe elsewhere (a server connection) is an error
        let net = anyhow::Error::new(std::io::Error::from(std::io::ErrorKind::BrokenPipe));
        assert!(!is_stdout_closed(&net));
    }
}
