//! What a `walvault stream` child process leaves for a test to read: its
//! `--status-file` and its log.

use std::path::PathBuf;
use std::process::Child;
use std::time::{Duration, Instant};

use walvault::pg::Lsn;

/// The status file and the log of one stream.
#[derive(Debug)]
pub struct StreamFiles {
    pub status: PathBuf,
    pub log: PathBuf,
}

impl StreamFiles {
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The durable position from the status file.
    pub fn durable(&self) -> Option<Lsn> {
        let text = std::fs::read_to_string(&self.status).ok()?;
        let v: serde_json::Value = serde_json::from_str(&text).ok()?;
        v["durable_lsn"].as_str()?.parse().ok()
    }

    pub fn wait_durable(&self, lsn: Lsn, within: Duration) {
        let deadline = Instant::now() + within;
        while self.durable().is_none_or(|d| d < lsn) {
            assert!(
                Instant::now() < deadline,
                "WAL up to {lsn} not durable within {within:?} (at {:?}):\n{}",
                self.durable(),
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGTERM the stream `child`: it uploads what it received and exits 0.
    pub fn terminate(&self, mut child: Child) {
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        )
        .unwrap();
        let status = child.wait().unwrap();
        assert!(
            status.success(),
            "stream exited with {status}:\n{}",
            self.log()
        );
    }
}
