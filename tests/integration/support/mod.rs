//! The test harness: real PostgreSQL clusters ([`pg::PgCluster`]) and a real
//! S3-compatible server ([`s3::S3Server`], Garage) on 127.0.0.1, each in its own
//! temporary directory and always torn down, also when a test panics.

pub mod pg;
pub mod s3;

use std::net::TcpListener;
use std::path::PathBuf;

/// Where install scripts put Garage and extra PostgreSQL majors:
/// `WALVAULT_CACHE`, else `/var/cache/walvault` for root (so that the
/// unprivileged `postgres` user can reach the binaries), else `~/.cache/walvault`.
pub fn cache_root() -> PathBuf {
    if let Some(p) = std::env::var_os("WALVAULT_CACHE") {
        return PathBuf::from(p);
    }
    if nix::unistd::geteuid().is_root() {
        PathBuf::from("/var/cache/walvault")
    } else {
        PathBuf::from(std::env::var_os("HOME").unwrap_or_default()).join(".cache/walvault")
    }
}

/// Base directory for test temp dirs (`WALVAULT_TEST_TMPDIR`, else the system's).
pub fn tmp_base() -> PathBuf {
    std::env::var_os("WALVAULT_TEST_TMPDIR")
        .map(PathBuf::from)
        .unwrap_or_else(std::env::temp_dir)
}

/// A TCP port on 127.0.0.1 that was free a moment ago.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("no free port on 127.0.0.1")
}

/// Random lowercase hex of `bytes` bytes.
pub fn hex(bytes: usize) -> String {
    (0..bytes)
        .map(|_| format!("{:02x}", rand::random::<u8>()))
        .collect()
}

/// The walvault binary built for these tests.
pub fn walvault_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_walvault"))
}

/// Deterministic pseudo-random bytes (xorshift), fast enough for 100 MiB.
pub fn pseudo_random(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}
