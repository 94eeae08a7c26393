//! Operating the repository: retention, verification, health checks, drills, copies.

pub mod retention;
