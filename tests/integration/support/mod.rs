//! The test harness: real PostgreSQL clusters ([`pg::PgCluster`]) and a real
//! S3-compatible server ([`s3::S3Server`], Garage) on 127.0.0.1, each in its own
//! temporary directory and always torn down, also when a test panics.

pub mod backend;
pub mod daemon;
pub mod garage_cluster;
pub mod moto;
pub mod pg;
pub mod s3;
pub mod stream;
pub mod wait;
pub mod walvault;

pub use wait::{hold, wait_for, wait_for_async, wait_until, wait_until_async};
pub use walvault::Walvault;

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

/// Hand `path` (recursively) to the server's OS user when the tests run as
/// root: PostgreSQL runs as `postgres` and reads repositories and
/// tablespace directories the test created.
pub fn give_to_postgres(path: &std::path::Path) {
    if nix::unistd::geteuid().is_root() {
        let st = std::process::Command::new("chown")
            .args(["-R", "postgres:postgres"])
            .arg(path)
            .status()
            .unwrap();
        assert!(st.success(), "chown -R postgres {}", path.display());
    }
}

/// Deterministic pseudo-random bytes (xorshift), fast enough for 100 MiB.
pub fn pseudo_random(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
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

/// A stream of `len` deterministic pseudo-random bytes, generated 8 KiB page
/// by page (so a 1 GiB "relation" needs no memory), optionally with one page
/// replaced by different content.
pub struct SynthReader {
    len: u64,
    pos: u64,
    seed: u64,
    changed_page: Option<u64>,
    page: Vec<u8>,
    filler: Vec<u8>,
}

impl SynthReader {
    /// `len` bytes from `seed`.
    pub fn new(len: u64, seed: u64) -> SynthReader {
        SynthReader {
            len,
            pos: 0,
            seed,
            changed_page: None,
            page: Vec::new(),
            filler: Vec::new(),
        }
    }

    /// The same stream with page `n` (8 KiB) different.
    pub fn with_changed_page(mut self, n: u64) -> SynthReader {
        self.changed_page = Some(n);
        self
    }

    /// Page `n` of the stream: a random filler (the same for every page, so
    /// generating a gigabyte costs only copies) under a header that makes each
    /// page unique.
    pub fn page(&self, n: u64) -> Vec<u8> {
        let salt = if self.changed_page == Some(n) {
            0xdead_beef
        } else {
            0
        };
        let mut p = pseudo_random(8192, self.seed);
        p[..8].copy_from_slice(&n.to_le_bytes());
        p[8..16].copy_from_slice(&(self.seed ^ salt).to_le_bytes());
        p
    }
}

impl std::io::Read for SynthReader {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if self.pos >= self.len {
            return Ok(0);
        }
        let n = self.pos / 8192;
        let off = (self.pos % 8192) as usize;
        if self.filler.is_empty() {
            self.filler = pseudo_random(8192, self.seed);
        }
        if off == 0 || self.page.is_empty() {
            let salt = if self.changed_page == Some(n) {
                0xdead_beef
            } else {
                0
            };
            self.page.clear();
            self.page.extend_from_slice(&self.filler);
            self.page[..8].copy_from_slice(&n.to_le_bytes());
            self.page[8..16].copy_from_slice(&(self.seed ^ salt).to_le_bytes());
        }
        let avail = (8192 - off)
            .min((self.len - self.pos) as usize)
            .min(buf.len());
        buf[..avail].copy_from_slice(&self.page[off..off + avail]);
        self.pos += avail as u64;
        Ok(avail)
    }
}

/// Say that the running test is skipped, and why, in one line on standard
/// error (`SKIPPED: <test>: <reason>`); the test then returns. The nextest
/// profiles show the output of the tests that can skip even when they pass.
pub fn skip(reason: &str) {
    let test = std::thread::current()
        .name()
        .unwrap_or("(unnamed test)")
        .to_owned();
    eprintln!("SKIPPED: {test}: {reason}");
}

/// A random number generator for a randomized test, from the seed in
/// `WALVAULT_TEST_SEED` (to replay a run) or a fresh one. The seed is
/// printed first, so a failure's output tells how to replay it.
pub fn seeded_rng() -> rand::rngs::StdRng {
    use rand::SeedableRng;
    let seed = match std::env::var("WALVAULT_TEST_SEED") {
        Ok(s) => s
            .trim()
            .parse()
            .unwrap_or_else(|e| panic!("WALVAULT_TEST_SEED={s:?} is not a u64: {e}")),
        Err(_) => rand::random::<u64>(),
    };
    eprintln!("seed {seed} (replay with WALVAULT_TEST_SEED={seed})");
    rand::rngs::StdRng::seed_from_u64(seed)
}

/// Whether a process runs with `dir` in its command line (a server left
/// running in a scratch directory).
pub fn process_runs_in(dir: &std::path::Path) -> bool {
    let ps = std::process::Command::new("ps")
        .args(["-eo", "args"])
        .output()
        .expect("ps");
    String::from_utf8_lossy(&ps.stdout).contains(&*dir.to_string_lossy())
}
