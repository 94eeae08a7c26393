//! The per-block CPU path of a backup: cut → block id → compress (lz4) →
//! encrypt (AES-256-GCM), at the default 8 KiB block size.
//!
//! Inputs, 64 MiB each:
//! - real pgbench relation pages: the file named by `WALVAULT_BENCH_PAGES`, else
//!   `target/bench-data/pgbench_accounts.pages`, made by
//!   `bench/make-pgbench-pages.sh` when missing (needs PostgreSQL 15);
//! - random bytes (incompressible: lz4 gives up and the block is stored).
//!
//! Groups:
//! - `pipeline/<input>/single` and `.../all_cores`: the whole path, one thread,
//!   then rayon `par_chunks` with one block per item (the backup runs these
//!   steps in rayon workers);
//! - `pipeline/<input>/grouped_*`: the path of config version 3 repositories,
//!   an id per block, then 16 blocks compressed and sealed together
//!   (`encode_group`), per rayon item;
//! - `pieces/<step>`: each step alone on pgbench pages, one thread, to show
//!   where the time goes.
//!
//! Run: `cargo bench --bench block_pipeline` (a few minutes on 2 cores).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use criterion::measurement::WallTime;
use criterion::{
    black_box, criterion_group, criterion_main, BenchmarkGroup, Criterion, SamplingMode, Throughput,
};
use rand::{RngCore, SeedableRng};
use rayon::prelude::*;

use walvault::codec::{Compression, IdHasher, Keys, MasterKey};
use walvault::repo::{encode_blob, encode_group, DEFAULT_BLOCK_SIZE};

/// Bytes of each input.
const INPUT_BYTES: usize = 64 << 20;
/// Bytes per block: one PostgreSQL page, the repository default.
const BLOCK: usize = DEFAULT_BLOCK_SIZE as usize;

/// The pgbench pages: `WALVAULT_BENCH_PAGES`, or the cached file (made on demand).
fn pgbench_pages() -> Vec<u8> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let path = match std::env::var_os("WALVAULT_BENCH_PAGES") {
        Some(p) => PathBuf::from(p),
        None => {
            let p = root.join("target/bench-data/pgbench_accounts.pages");
            if !p.exists() {
                let script = root.join("bench/make-pgbench-pages.sh");
                eprintln!("# {} missing: running {}", p.display(), script.display());
                let status = Command::new("bash")
                    .arg(&script)
                    .arg(&p)
                    .status()
                    .unwrap_or_else(|e| panic!("cannot run {}: {e}", script.display()));
                if !status.success() {
                    panic!(
                        "{} failed ({status}); set WALVAULT_BENCH_PAGES to a file of PostgreSQL relation pages instead",
                        script.display()
                    );
                }
            }
            p
        }
    };
    let mut data =
        std::fs::read(&path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    // Whole blocks only, at most INPUT_BYTES: the cases stay comparable.
    let len = data.len().min(INPUT_BYTES) / BLOCK * BLOCK;
    assert!(
        len > 0,
        "{} holds less than one {BLOCK}-byte block",
        path.display()
    );
    if len < INPUT_BYTES {
        eprintln!(
            "# {} has only {len} bytes; benchmarking those",
            path.display()
        );
    }
    data.truncate(len);
    data
}

/// Incompressible input, the same on every run.
fn random_bytes() -> Vec<u8> {
    let mut data = vec![0u8; INPUT_BYTES];
    rand::rngs::StdRng::seed_from_u64(0x5741_4c56).fill_bytes(&mut data);
    data
}

/// The work done for one block: its id, then its blob. Returns the blob's
/// length so that nothing is optimized away.
fn one_block(block: &[u8], hasher: &IdHasher, keys: &Keys) -> usize {
    let id = hasher.id(block);
    let (blob, _used) = encode_blob(block, &id, Compression::Lz4, Some(keys));
    blob.len()
}

/// Blocks per group in version 3 repositories.
const GROUP: usize = 16;

/// The work done for a group of blocks: an id each, then one blob.
fn one_group(blocks: &[u8], hasher: &IdHasher, keys: &Keys) -> usize {
    let members: Vec<_> = blocks.chunks(BLOCK).map(|b| (hasher.id(b), b)).collect();
    let (blob, _used) = encode_group(&members, Compression::Lz4, Some(keys));
    blob.len()
}

/// Slow cases take ~0.2 s per iteration: flat sampling keeps each under ~10 s.
fn configure(group: &mut BenchmarkGroup<'_, WallTime>, bytes: usize) {
    group
        .sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(5))
        .sampling_mode(SamplingMode::Flat)
        .throughput(Throughput::Bytes(bytes as u64));
}

fn keys() -> Keys {
    Keys::derive(&MasterKey([7; 32]), b"walvault bench repository")
}

/// Stored bytes per raw byte of the pipeline on `data` (context for the numbers).
fn stored_ratio(data: &[u8], hasher: &IdHasher, keys: &Keys, group: usize) -> f64 {
    let stored: usize = data
        .par_chunks(BLOCK * group)
        .map(|b| one_group(b, hasher, keys))
        .sum();
    stored as f64 / data.len() as f64
}

fn pipeline(c: &mut Criterion) {
    let keys = keys();
    // the id function of new encrypted repositories (config version 4;
    // versions 2-3 keep all 256 bits at the same cost), and of version-1 ones
    let hashers = [
        (
            "blake3_keyed",
            IdHasher::named("blake3-keyed-128", Some(&keys)).unwrap_or_else(|| unreachable!()),
        ),
        ("hmac", IdHasher::new(Some(&keys))),
    ];
    for (name, data) in [("pgbench", pgbench_pages()), ("random", random_bytes())] {
        eprintln!(
            "# {name}: {} MiB in {} blocks of {BLOCK} bytes; stored/raw = {:.3} alone, {:.3} in groups of {GROUP}; rayon threads: {}",
            data.len() >> 20,
            data.len() / BLOCK,
            stored_ratio(&data, &hashers[0].1, &keys, 1),
            stored_ratio(&data, &hashers[0].1, &keys, GROUP),
            rayon::current_num_threads()
        );
        let mut group = c.benchmark_group(format!("pipeline/{name}"));
        configure(&mut group, data.len());
        for (id_name, hasher) in &hashers {
            group.bench_function(format!("single/{id_name}"), |b| {
                b.iter(|| {
                    black_box(&data)
                        .chunks(BLOCK)
                        .map(|blk| one_block(blk, hasher, &keys))
                        .sum::<usize>()
                })
            });
            group.bench_function(format!("all_cores/{id_name}"), |b| {
                b.iter(|| {
                    black_box(&data)
                        .par_chunks(BLOCK)
                        .map(|blk| one_block(blk, hasher, &keys))
                        .sum::<usize>()
                })
            });
        }
        let hasher = &hashers[0].1;
        group.bench_function("grouped_single/blake3_keyed", |b| {
            b.iter(|| {
                black_box(&data)
                    .chunks(BLOCK * GROUP)
                    .map(|g| one_group(g, hasher, &keys))
                    .sum::<usize>()
            })
        });
        group.bench_function("grouped_all_cores/blake3_keyed", |b| {
            b.iter(|| {
                black_box(&data)
                    .par_chunks(BLOCK * GROUP)
                    .map(|g| one_group(g, hasher, &keys))
                    .sum::<usize>()
            })
        });
        group.finish();
    }
}

fn pieces(c: &mut Criterion) {
    let keys = keys();
    let sha = IdHasher::new(None);
    let hmac = IdHasher::new(Some(&keys));
    let data = pgbench_pages();
    // Any fixed id: the aad of the seal, not checked here.
    let id = sha.id(&data[..BLOCK]);

    let mut group = c.benchmark_group("pieces");
    configure(&mut group, data.len());
    group.bench_function("sha256_id", |b| {
        b.iter(|| {
            black_box(&data)
                .chunks(BLOCK)
                .map(|blk| sha.id(blk).0[0])
                .fold(0u8, |a, x| a ^ x)
        })
    });
    group.bench_function("hmac_id", |b| {
        b.iter(|| {
            black_box(&data)
                .chunks(BLOCK)
                .map(|blk| hmac.id(blk).0[0])
                .fold(0u8, |a, x| a ^ x)
        })
    });
    let blake3 = IdHasher::named("blake3", None).unwrap_or_else(|| unreachable!());
    group.bench_function("blake3_id", |b| {
        b.iter(|| {
            black_box(&data)
                .chunks(BLOCK)
                .map(|blk| blake3.id(blk).0[0])
                .fold(0u8, |a, x| a ^ x)
        })
    });
    let blake3_keyed =
        IdHasher::named("blake3-keyed", Some(&keys)).unwrap_or_else(|| unreachable!());
    group.bench_function("blake3_keyed_id", |b| {
        b.iter(|| {
            black_box(&data)
                .chunks(BLOCK)
                .map(|blk| blake3_keyed.id(blk).0[0])
                .fold(0u8, |a, x| a ^ x)
        })
    });
    group.bench_function("lz4_compress", |b| {
        b.iter(|| {
            black_box(&data)
                .chunks(BLOCK)
                .map(|blk| Compression::Lz4.compress(blk).1.len())
                .sum::<usize>()
        })
    });
    group.bench_function("aes_gcm_encrypt", |b| {
        b.iter(|| {
            black_box(&data)
                .chunks(BLOCK)
                .map(|blk| {
                    encode_blob(blk, &id, Compression::None, Some(&keys))
                        .0
                        .len()
                })
                .sum::<usize>()
        })
    });
    group.finish();
}

criterion_group!(benches, pipeline, pieces);
criterion_main!(benches);
