//! A `walvault stream` child process under test: started from a
//! [`Walvault`] command (which names the repository), killed with -9 or
//! stopped with SIGTERM, restarted, and read through its `--status-file`
//! and its log. Killed when dropped; its log is printed when the test
//! panics.

use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use walvault::pg::Lsn;

use super::{tmp_base, wait_for, Walvault};

/// A `walvault stream` process and the files it writes.
pub struct Streamer {
    cmd: Walvault,
    child: Option<Child>,
    status: PathBuf,
    log: PathBuf,
    _dir: tempfile::TempDir,
}

impl Streamer {
    /// `walvault stream --pg CONNINFO --status-interval 1 --status-file …
    /// EXTRA…` with `wv`'s repository and environment; its standard error
    /// goes to the log.
    pub fn start(wv: &Walvault, conninfo: &str, extra: &[&str]) -> Streamer {
        let dir = tempfile::Builder::new()
            .prefix("walvault-stream-")
            .tempdir_in(tmp_base())
            .expect("temp dir");
        let status = dir.path().join("status.json");
        let log = dir.path().join("stream.log");
        let cmd = wv
            .args(["stream", "--pg", conninfo, "--status-interval", "1"])
            .arg("--status-file")
            .arg(&status)
            .args(extra);
        let mut s = Streamer {
            cmd,
            child: None,
            status,
            log,
            _dir: dir,
        };
        s.spawn();
        s
    }

    /// Start the process (again, after [`Streamer::kill9`]); the log goes on.
    pub fn spawn(&mut self) {
        assert!(self.child.is_none(), "the stream is already running");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("stream log");
        let child = self
            .cmd
            .command()
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", self.cmd.describe()));
        self.child = Some(child);
    }

    /// kill -9 (no final upload), and wait until the process is gone.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            c.wait().expect("wait for the stream");
        }
    }

    /// SIGTERM: the stream uploads what it received and must exit 0.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(child.id() as i32),
                nix::sys::signal::Signal::SIGTERM,
            )
            .expect("SIGTERM the stream");
            let status = child.wait().expect("wait for the stream");
            assert!(
                status.success(),
                "stream exited with {status}:\n{}",
                self.log()
            );
        }
    }

    /// The process was started and has not exited.
    pub fn running(&mut self) -> bool {
        matches!(
            self.child.as_mut().map(|c| c.try_wait().expect("try_wait")),
            Some(None)
        )
    }

    pub fn assert_running(&mut self, when: &str) {
        assert!(self.running(), "the stream exited {when}:\n{}", self.log());
    }

    /// Its standard error so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The durable position from the status file.
    pub fn durable(&self) -> Option<Lsn> {
        durable_in(&self.status)
    }

    /// Wait until WAL up to `lsn` is durable in the repository.
    pub fn wait_durable(&self, lsn: Lsn, within: Duration) {
        wait_for(
            within,
            &format!("WAL up to {lsn} to be durable"),
            || match self.durable() {
                Some(d) if d >= lsn => Ok(()),
                d => Err(format!("durable at {d:?}")),
            },
        );
    }

    /// A thread that reads the status file every 2 ms and records when each
    /// durable position first appeared (to measure how long commits take to
    /// become durable).
    pub fn sample_durable(&self) -> DurableSampler {
        DurableSampler::start(self.status.clone())
    }
}

impl Drop for Streamer {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "--- stream log ({}) ---\n{}",
                self.cmd.describe(),
                self.log()
            );
        }
        self.kill9();
    }
}

fn durable_in(status: &Path) -> Option<Lsn> {
    let text = std::fs::read_to_string(status).ok()?;
    let v: serde_json::Value = serde_json::from_str(&text).ok()?;
    v["durable_lsn"].as_str()?.parse().ok()
}

/// When each durable position of a stream first appeared in its status file.
pub struct DurableSampler {
    stop: Arc<AtomicBool>,
    seen: Arc<Mutex<Vec<(Instant, Lsn)>>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl DurableSampler {
    fn start(status: PathBuf) -> DurableSampler {
        let stop = Arc::new(AtomicBool::new(false));
        let seen = Arc::new(Mutex::new(Vec::new()));
        let thread = {
            let (stop, seen) = (stop.clone(), seen.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    if let Some(d) = durable_in(&status) {
                        let mut seen = seen.lock().expect("samples");
                        if seen.last().is_none_or(|(_, last)| d > *last) {
                            seen.push((Instant::now(), d));
                        }
                    }
                    // the sampling period of a measurement, not a wait for
                    // anything: its resolution
                    std::thread::sleep(Duration::from_millis(2));
                }
            })
        };
        DurableSampler {
            stop,
            seen,
            thread: Some(thread),
        }
    }

    /// When `lsn` was first seen durable, if it was.
    pub fn durable_at(&self, lsn: Lsn) -> Option<Instant> {
        let seen = self.seen.lock().expect("samples");
        seen.iter().find(|(_, d)| *d >= lsn).map(|(t, _)| *t)
    }
}

impl Drop for DurableSampler {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
