//! Advisory whole-file locks (`flock`) for roles one process at a time may
//! hold: the WAL prefetcher or stager of a spool, the background pusher of
//! a `pg_wal`. Released when the returned guard is dropped, or when the
//! process dies.

use std::fs::{File, OpenOptions};
use std::path::Path;

use nix::fcntl::{Flock, FlockArg};

/// Lock `path` (created when missing). `None` when another process holds it
/// and `wait` is false; with `wait`, blocks until it is free.
pub(crate) fn lock(path: &Path, wait: bool) -> std::io::Result<Option<Flock<File>>> {
    let f = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path)?;
    let how = if wait {
        FlockArg::LockExclusive
    } else {
        FlockArg::LockExclusiveNonblock
    };
    match Flock::lock(f, how) {
        Ok(held) => Ok(Some(held)),
        Err((_, nix::errno::Errno::EWOULDBLOCK)) => Ok(None),
        Err((_, e)) => Err(e.into()),
    }
}
