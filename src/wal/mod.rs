//! Write-ahead log, sans-IO (bytes in, values out; no network or storage):
//! - [`decode`]: the record reader — pages and records in any chunking, every
//!   record's CRC-32C checked;
//! - [`records`]: what the records walvault reads mean (transaction ends,
//!   restore points, checkpoints, switch, end of recovery);
//! - [`summary`]: per-segment summaries of those records, for PITR planning
//!   and `wal-inspect`;
//! - [`verify`]: checking a segment's pages and records before it is archived;
//! - [`receive`]: START_REPLICATION messages and the assembly of streamed WAL
//!   into segments;
//! - [`history`]: timeline history files and the timeline path of a target.
//!
//! Uses only [`crate::pg`]'s quantities; storing WAL is `archive`'s and
//! `repo`'s job.

pub mod decode;
pub mod history;
pub mod receive;
pub mod records;
pub mod summary;
pub mod verify;
