//! Write-ahead log: the streaming-replication messages (sans-IO) and the
//! assembly of streamed WAL into segment files.

pub mod history;
pub mod receive;
pub mod verify;
