//! Base backups: the BASE_BACKUP tar streams, parsed into files and fed to
//! the repository's block pipeline.

pub mod stream;
pub mod tar;
