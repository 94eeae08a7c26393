//! Compression-group study (issue 14, item 1): how many bytes a first and a
//! second backup would store if consecutive new 8 KiB blocks of one file
//! were compressed together in groups of N, for LZ4, zstd at low levels and
//! zstd with a dictionary trained on the repository's own blocks; and what
//! that costs in compression speed and in decoding one block (a group is
//! decompressed whole to read any of its blocks).
//!
//! usage: cargo run --release --example compression_groups -- BEFORE [AFTER]
//!
//! BEFORE and AFTER are copies of a stopped cluster's data directory (AFTER:
//! the same cluster after churn). Files are walked as a base backup sends
//! them (pg_wal and the other skipped directories left out), cut at 8 KiB;
//! a block is new when its BLAKE3 digest was not seen before (in BEFORE for
//! the second backup). One thread: the figures are per core.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::time::Instant;

const PAGE: usize = 8192;
const SKIP_DIRS: &[&str] = &[
    "pg_wal",
    "pg_stat_tmp",
    "pg_replslot",
    "pg_dynshmem",
    "pg_notify",
    "pg_serial",
    "pg_snapshots",
    "pg_subtrans",
];
const SKIP_FILES: &[&str] = &["postmaster.pid", "postmaster.opts", "pg_internal.init"];

fn files(root: &Path, out: &mut Vec<PathBuf>) {
    let mut entries: Vec<_> = std::fs::read_dir(root)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    entries.sort();
    for p in entries {
        let name = p.file_name().unwrap().to_string_lossy().into_owned();
        let meta = std::fs::metadata(&p).unwrap();
        if meta.is_dir() {
            if !SKIP_DIRS.contains(&name.as_str()) {
                files(&p, out);
            }
        } else if !SKIP_FILES.contains(&name.as_str()) {
            out.push(p);
        }
    }
}

/// The new blocks of `dir` (not in `seen`, which learns them), as runs of
/// consecutive new blocks per file (a run ends at a known block or the
/// file's end).
fn new_runs(dir: &Path, seen: &mut HashSet<[u8; 32]>) -> (Vec<Vec<Vec<u8>>>, u64) {
    let mut list = Vec::new();
    files(dir, &mut list);
    let mut runs = Vec::new();
    let mut total = 0u64;
    for f in list {
        let data = std::fs::read(&f).unwrap();
        total += data.len() as u64;
        let mut run: Vec<Vec<u8>> = Vec::new();
        for block in data.chunks(PAGE) {
            let id = *blake3::hash(block).as_bytes();
            if seen.insert(id) {
                run.push(block.to_vec());
            } else if !run.is_empty() {
                runs.push(std::mem::take(&mut run));
            }
        }
        if !run.is_empty() {
            runs.push(run);
        }
    }
    (runs, total)
}

#[derive(Clone, Copy, Debug)]
enum Codec {
    Lz4,
    Zstd(i32),
    ZstdDict(i32),
}

impl Codec {
    fn name(self) -> String {
        match self {
            Codec::Lz4 => "lz4".into(),
            Codec::Zstd(l) => format!("zstd-{l}"),
            Codec::ZstdDict(l) => format!("zstd-{l}+dict"),
        }
    }
}

struct Outcome {
    stored: u64,
    raw: u64,
    groups: u64,
    compress_s: f64,
    decompress_s: f64,
}

fn run(codec: Codec, n: usize, runs: &[Vec<Vec<u8>>], dict: &[u8]) -> Outcome {
    let mut out = Outcome {
        stored: 0,
        raw: 0,
        groups: 0,
        compress_s: 0.0,
        decompress_s: 0.0,
    };
    let level = match codec {
        Codec::Zstd(l) | Codec::ZstdDict(l) => l,
        Codec::Lz4 => 0,
    };
    let mut cz = match codec {
        Codec::ZstdDict(_) => zstd::bulk::Compressor::with_dictionary(level, dict).unwrap(),
        _ => zstd::bulk::Compressor::new(level).unwrap(),
    };
    let mut dz = match codec {
        Codec::ZstdDict(_) => zstd::bulk::Decompressor::with_dictionary(dict).unwrap(),
        _ => zstd::bulk::Decompressor::new().unwrap(),
    };
    let mut buf = Vec::with_capacity(n * PAGE);
    for r in runs {
        for group in r.chunks(n) {
            buf.clear();
            for b in group {
                buf.extend_from_slice(b);
            }
            let t = Instant::now();
            let c = match codec {
                Codec::Lz4 => lz4_flex::block::compress(&buf),
                _ => cz.compress(&buf).unwrap(),
            };
            out.compress_s += t.elapsed().as_secs_f64();
            let t = Instant::now();
            let d = match codec {
                Codec::Lz4 => lz4_flex::block::decompress(&c, buf.len()).unwrap(),
                _ => dz.decompress(&c, buf.len()).unwrap(),
            };
            out.decompress_s += t.elapsed().as_secs_f64();
            assert_eq!(d.len(), buf.len());
            // stored as is when compression does not pay
            out.stored += c.len().min(buf.len()) as u64;
            out.raw += buf.len() as u64;
            out.groups += 1;
        }
    }
    out
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let before = PathBuf::from(args.first().expect("usage: BEFORE [AFTER]"));
    let mut seen = HashSet::new();
    let (first, size) = new_runs(&before, &mut seen);
    let mut sets = vec![("first backup", first, size)];
    if let Some(after) = args.get(1) {
        let (second, size) = new_runs(Path::new(after), &mut seen);
        sets.push(("second backup", second, size));
    }
    // a dictionary trained on a sample of the first backup's blocks (every
    // 50th block, up to 4000), as a repository would train one
    let samples: Vec<&Vec<u8>> = sets[0].1.iter().flatten().step_by(50).take(4000).collect();
    let t = Instant::now();
    let dict = zstd::dict::from_samples(&samples, 112 * 1024).unwrap();
    eprintln!(
        "# dictionary: {} bytes from {} blocks in {:.1} s",
        dict.len(),
        samples.len(),
        t.elapsed().as_secs_f64()
    );
    // CODECS="lz4,zstd:1,zstd:-3,zstd+dict:1" and NS="1,16" narrow the table
    let codecs: Vec<Codec> = std::env::var("CODECS")
        .unwrap_or_else(|_| "lz4,zstd:1,zstd:3,zstd+dict:1".into())
        .split(',')
        .map(|c| match c.split_once(':') {
            None if c == "lz4" => Codec::Lz4,
            Some(("zstd", l)) => Codec::Zstd(l.parse().expect("zstd:LEVEL")),
            Some(("zstd+dict", l)) => Codec::ZstdDict(l.parse().expect("zstd+dict:LEVEL")),
            _ => panic!("unknown codec {c}: lz4, zstd:LEVEL, zstd+dict:LEVEL"),
        })
        .collect();
    let ns: Vec<usize> = std::env::var("NS")
        .unwrap_or_else(|_| "1,4,8,16,32,64".into())
        .split(',')
        .map(|n| n.parse().expect("NS: group sizes"))
        .collect();
    for (name, runs, size) in &sets {
        let blocks: usize = runs.iter().map(Vec::len).sum();
        println!(
            "\n### {name}: {} MiB of files, {blocks} new blocks ({} MiB) in {} runs\n",
            size >> 20,
            (blocks * PAGE) >> 20,
            runs.len()
        );
        println!("| codec | N | stored MiB | vs N=1 | compress MB/s | decompress MB/s | one-block read µs |");
        println!("|---|---|---|---|---|---|---|");
        for &codec in &codecs {
            let mut one = 0u64;
            for &n in &ns {
                let o = run(codec, n, runs, &dict);
                if n == 1 {
                    one = o.stored;
                }
                println!(
                    "| {} | {n} | {:.1} | {:.2} | {:.0} | {:.0} | {:.1} |",
                    codec.name(),
                    o.stored as f64 / 1048576.0,
                    o.stored as f64 / one as f64,
                    o.raw as f64 / 1e6 / o.compress_s,
                    o.raw as f64 / 1e6 / o.decompress_s,
                    o.decompress_s / o.groups as f64 * 1e6,
                );
            }
        }
    }
}
