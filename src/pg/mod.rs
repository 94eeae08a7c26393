//! PostgreSQL quantities and the replication client.
//!
//! Every number PostgreSQL gives walvault gets a newtype here so that a byte
//! offset can never be mistaken for a segment number or a timeline: [`Lsn`],
//! [`TimelineId`], [`SegmentNo`], [`WalSegSize`], [`SystemId`] and the parsed
//! WAL file names in [`WalFileName`].
//!
//! The client speaks the protocol itself (no libpq): connection parameters
//! ([`ConnParams`]: conninfo, URL, `PG*` environment, `~/.pgpass`), the
//! sans-IO backend message parser ([`wire`]), the async connection
//! ([`PgConnection`]: TLS per `sslmode`, password/MD5/SCRAM authentication,
//! simple queries, COPY streams) and the replication commands
//! (IDENTIFY_SYSTEM, slots, timeline history). [`checksum`] computes data
//! page checksums as the server does. Nothing here depends on another
//! walvault module.

pub mod checksum;
mod conn;
mod conninfo;
mod lsn;
mod replication;
mod tls;
mod walfile;
pub mod wire;

pub use conn::{PgConnection, PgError, QueryResult};
pub use conninfo::{ConnInfoError, ConnParams, Host, SslMode};
pub use lsn::{Lsn, SegmentNo, SystemId, TimelineId, WalSegSize};
pub use replication::{validate_slot_name, SlotInfo, SystemInfo};
pub use walfile::{SegmentFile, WalFileName};

/// The name prefix of a file PostgreSQL 17+ sends in an incremental backup
/// in place of a relation file (`base/5/INCREMENTAL.16384`): only the
/// blocks changed since the backup it is taken against.
pub const INCREMENTAL_PREFIX: &str = "INCREMENTAL.";

/// A value PostgreSQL would reject, with the text that failed and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid {what} {input:?}: {reason}")]
pub struct ParseError {
    /// What was being parsed ("LSN", "WAL file name", ...).
    pub what: &'static str,
    /// The input, as given.
    pub input: String,
    /// Why it is not valid.
    pub reason: String,
}

impl ParseError {
    pub(crate) fn new(what: &'static str, input: &str, reason: impl Into<String>) -> Self {
        ParseError {
            what,
            input: input.to_owned(),
            reason: reason.into(),
        }
    }
}
