//! Write-ahead log: the streaming-replication messages (sans-IO) and the
//! assembly of streamed WAL into segment files.

pub mod decode;
pub mod history;
pub mod receive;
pub mod records;
pub mod summary;
pub mod verify;
