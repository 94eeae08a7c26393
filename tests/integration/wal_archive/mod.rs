//! Continuous archiving against real servers, a module per area:
//! `walvault stream` on one timeline (with `wal-fetch` and `wal-verify` on
//! what it archived), across timelines, and `walvault wal-push` as
//! archive_command.

mod push;
mod rpo_zero;
mod stream;
mod timelines;
