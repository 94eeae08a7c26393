//! walvault: PostgreSQL backup and point-in-time recovery.
//!
//! Layers, each depending only on those listed before it (see
//! `docs/architecture.md`):
//! - [`pg`]: PostgreSQL quantities (LSNs, timelines, segments, WAL file names);
//! - [`storage`]: object storage (local directory, S3) with one contract;
//! - [`cli`]: the commands, thin over the library.

pub mod archive;
pub mod backup;
pub mod cli;
pub mod codec;
mod flock;
pub mod pg;
pub mod progress;
pub mod reader;
pub mod repo;
pub mod restore;
pub mod storage;
pub mod wal;
