//! WAL decoding throughput on real pgbench WAL: records read with every
//! CRC checked, records interpreted, and whole segment summaries.
//!
//! Input: four 16 MiB segments of pgbench WAL, the file named by
//! `WALVAULT_BENCH_WAL`, else `target/bench-data/pgbench.wal`, made by
//! `bench/make-pgbench-wal.sh` when missing (needs PostgreSQL 15).
//!
//! Run: `cargo bench --bench wal_decode`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::process::Command;

use criterion::{black_box, criterion_group, criterion_main, Criterion, Throughput};
use walvault::pg::{SegmentNo, WalSegSize};
use walvault::wal::decode::{Next, WalReader};
use walvault::wal::records::interpret;
use walvault::wal::summary::summarize;

fn input() -> (Vec<u8>, u64) {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let path = match std::env::var_os("WALVAULT_BENCH_WAL") {
        Some(p) => PathBuf::from(p),
        None => {
            let p = root.join("target/bench-data/pgbench.wal");
            if !p.exists() {
                let script = root.join("bench/make-pgbench-wal.sh");
                let status = Command::new("bash")
                    .arg(&script)
                    .arg(&p)
                    .status()
                    .unwrap_or_else(|e| panic!("cannot run {}: {e}", script.display()));
                assert!(status.success(), "{} failed", script.display());
            }
            p
        }
    };
    let data = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let segno: u64 = std::fs::read_to_string(path.with_extension("wal.segno"))
        .or_else(|_| std::fs::read_to_string(format!("{}.segno", path.display())))
        .expect("the .segno file beside the WAL")
        .trim()
        .parse()
        .expect("segment number");
    (data, segno)
}

fn bench(c: &mut Criterion) {
    let (data, segno) = input();
    let seg = WalSegSize::new(16 << 20).unwrap();
    let start = SegmentNo(segno).start_lsn(seg).unwrap();
    let mut g = c.benchmark_group("wal_decode");
    g.throughput(Throughput::Bytes(data.len() as u64));
    g.sample_size(10);
    g.bench_function("records_crc_checked", |b| {
        b.iter(|| {
            let mut r = WalReader::new(start, seg);
            r.feed(&data);
            let mut n = 0u64;
            while let Ok(Next::Record(rec)) = r.next_record() {
                n += rec.bytes.len() as u64;
            }
            black_box(n)
        })
    });
    g.bench_function("records_interpreted", |b| {
        b.iter(|| {
            let mut r = WalReader::new(start, seg);
            r.feed(&data);
            let mut n = 0u64;
            while let Ok(Next::Record(rec)) = r.next_record() {
                if interpret(&rec, 15).is_ok() {
                    n += 1;
                }
            }
            black_box(n)
        })
    });
    g.bench_function("segment_summaries", |b| {
        b.iter(|| {
            for (i, s) in data.chunks(16 << 20).enumerate() {
                black_box(summarize(
                    s,
                    None,
                    walvault::pg::TimelineId::FIRST,
                    SegmentNo(segno + i as u64),
                    seg,
                ));
            }
        })
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
