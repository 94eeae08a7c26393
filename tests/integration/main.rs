//! walvault's integration tests: one binary, a module per area, all against real
//! PostgreSQL servers and a real S3-compatible server (see `support`).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

mod backup_restore;
mod base_backup;
mod cli_logs;
mod cli_output;
mod cli_repo;
mod cli_storage;
mod copy;
mod daemon;
mod deployment;
mod extract;
mod files;
mod full_disk;
mod harness;
mod incremental;
mod object_lock;
mod old_format;
mod ops;
mod pg_client;
mod pitr;
mod repo;
mod restore_matrix;
mod s3_objects;
mod standby;
mod storage_conformance;
mod storage_outage;
mod wal_archive;
mod wal_decode;
mod wal_stream;
