//! walvault: PostgreSQL backup and point-in-time recovery.
//!
//! Modules by layer; each uses only those in the layers below it, with the
//! exceptions listed in `docs/architecture.md` (backup and restore use
//! archive's WAL catalog and summaries):
//! - [`cli`]: the commands (`main.rs` parses, calls [`cli::run`], prints
//!   the error);
//! - [`backup`], [`archive`], [`restore`]: base backups; continuous WAL
//!   archiving (`stream`, `wal-push`, `wal-verify`); restore, `wal-fetch` and
//!   point-in-time recovery;
//! - [`repo`]: the content-addressed repository (packs, index, manifests,
//!   WAL objects, leases, garbage collection); [`wal`]: the sans-IO WAL
//!   decoder, record meanings and segment summaries;
//! - [`ops`]: operating the repository (retention and `expire`, holds, `verify`, the records they leave);
//! - [`pg`]: PostgreSQL quantities and the replication client; [`codec`]:
//!   compression, encryption, block ids; [`storage`]: object storage with one
//!   contract (local directory, S3); [`progress`]: progress counters; and
//!   the helpers `reader` (one checked byte reader for every decoder) and
//!   `flock` (advisory file locks).
//!
//! The library never prints: it returns typed errors and logs with `tracing`;
//! only [`cli`] (and `main.rs`) write to the terminal.

pub mod archive;
pub mod backup;
pub mod cli;
pub mod codec;
pub mod daemon;
pub mod duration;
pub mod files;
mod flock;
pub mod ops;
pub mod pg;
pub mod progress;
pub mod reader;
pub mod repo;
pub mod restore;
pub mod storage;
pub mod wal;
