//! Store a synthetic relation set of N GiB into a local repository through the
//! real block pipeline, and print what it did — for measuring throughput and
//! peak memory (`/usr/bin/time -v`), see docs/repository-format.md.
//!
//! usage: cargo run --release --example store_synthetic -- REPO_DIR GIB [--encrypt]

use std::io::Read;
use std::sync::Arc;
use std::time::Instant;

use walvault::repo::{InitParams, KdfCost, Repository, Secret, Session, SessionOptions};
use walvault::storage::{LocalDir, Storage};

/// 1 GiB "relation segments" of 8 KiB pages that look like heap pages: a
/// header, a line-pointer array, and tuples with a random part and padding,
/// so they compress about as well as pgbench's tables, and every page is unique.
struct Segment {
    seg: u64,
    page: u64,
    pos: usize,
    buf: Vec<u8>,
    rng: u64,
}

impl Segment {
    fn fill(&mut self) {
        self.buf.clear();
        self.buf.extend_from_slice(&self.seg.to_le_bytes());
        self.buf.extend_from_slice(&self.page.to_le_bytes());
        while self.buf.len() < 8192 {
            self.rng ^= self.rng << 13;
            self.rng ^= self.rng >> 7;
            self.rng ^= self.rng << 17;
            self.buf.extend_from_slice(&self.rng.to_le_bytes()[..4]);
            self.buf.extend_from_slice(&[b' '; 60]);
        }
        self.buf.truncate(8192);
        self.pos = 0;
    }
}

impl Read for Segment {
    fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
        if self.pos == self.buf.len() {
            if self.page == 131_072 {
                return Ok(0);
            }
            self.fill();
            self.page += 1;
        }
        let n = out.len().min(self.buf.len() - self.pos);
        out[..n].copy_from_slice(&self.buf[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    anyhow::ensure!(
        args.len() >= 3,
        "usage: store_synthetic REPO_DIR GIB [--encrypt]"
    );
    let gib: u64 = args[2].parse()?;
    let secret = args
        .iter()
        .any(|a| a == "--encrypt")
        .then(|| Secret::Passphrase("synthetic test passphrase".into()));
    let storage: Arc<dyn Storage> = Arc::new(LocalDir::open(&args[1])?);
    let repo = Arc::new(
        Repository::init(
            storage,
            &InitParams::default(),
            secret.as_ref(),
            KdfCost::default(),
        )
        .await?,
    );
    let t = Instant::now();
    let session = Session::start(repo, "main", SessionOptions::default()).await?;
    let session = tokio::task::spawn_blocking(move || -> anyhow::Result<Session> {
        for seg in 0..gib {
            let mut s = Segment {
                seg,
                page: 0,
                pos: 0,
                buf: Vec::new(),
                rng: 0x9e37_79b9 ^ (seg + 1),
            };
            session.store_reader(&mut s)?;
        }
        Ok(session)
    })
    .await??;
    let stats = session.finish().await?;
    let secs = t.elapsed().as_secs_f64();
    println!(
        "stored {} GiB in {secs:.1} s ({:.0} MB/s): {} blocks, {} new, {} MiB in {} packs",
        gib,
        stats.logical_bytes as f64 / secs / 1e6,
        stats.blocks,
        stats.new_blocks,
        stats.stored_bytes >> 20,
        stats.packs
    );
    Ok(())
}
