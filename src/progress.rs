//! Progress of long operations (backup, restore): counters the library
//! updates, and a reporter the commands run beside the work — a progress bar
//! when standard error is a terminal, a log line every
//! [`LOG_INTERVAL`] otherwise (so logs of a cron job or a sidecar say how far
//! a backup got without drowning in lines).

use std::io::IsTerminal;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How often a progress line is logged when there is no terminal.
pub const LOG_INTERVAL: Duration = Duration::from_secs(10);

/// Bytes done of bytes expected. The total is an estimate (a base backup's
/// size is the server's estimate at its start) and may be exceeded.
#[derive(Debug, Default)]
pub struct Progress {
    done: AtomicU64,
    total: AtomicU64,
}

impl Progress {
    /// Nothing done, nothing expected yet.
    pub fn new() -> Arc<Progress> {
        Arc::new(Progress::default())
    }

    /// `bytes` more are done.
    pub fn add(&self, bytes: u64) {
        self.done.fetch_add(bytes, Ordering::Relaxed);
    }

    /// `bytes` are expected in all.
    pub fn set_total(&self, bytes: u64) {
        self.total.store(bytes, Ordering::Relaxed);
    }

    /// Bytes done so far.
    pub fn done(&self) -> u64 {
        self.done.load(Ordering::Relaxed)
    }

    /// Bytes expected (0 while unknown).
    pub fn total(&self) -> u64 {
        self.total.load(Ordering::Relaxed)
    }
}

/// Shows a [`Progress`] until [`Reporter::finish`].
#[derive(Debug)]
pub struct Reporter {
    task: tokio::task::JoinHandle<()>,
    bar: Option<indicatif::ProgressBar>,
}

impl Reporter {
    /// Report `progress` of the operation `what` ("backup", "restore"):
    /// a bar when `interactive` and standard error is a terminal, log lines
    /// otherwise. Call from within a tokio runtime.
    pub fn start(what: &'static str, progress: Arc<Progress>, interactive: bool) -> Reporter {
        if interactive && std::io::stderr().is_terminal() {
            let bar = indicatif::ProgressBar::new(0);
            bar.set_style(
                indicatif::ProgressStyle::with_template(
                    "{prefix} [{elapsed_precise}] {wide_bar} {bytes}/{total_bytes} {binary_bytes_per_sec} eta {eta}",
                )
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
            );
            bar.set_prefix(what);
            let b = bar.clone();
            let task = tokio::spawn(async move {
                let mut tick = tokio::time::interval(Duration::from_millis(200));
                loop {
                    tick.tick().await;
                    b.set_length(progress.total().max(progress.done()));
                    b.set_position(progress.done());
                }
            });
            return Reporter {
                task,
                bar: Some(bar),
            };
        }
        let task = tokio::spawn(async move {
            let started = Instant::now();
            let mut tick = tokio::time::interval(LOG_INTERVAL);
            tick.tick().await;
            loop {
                tick.tick().await;
                let (done, total) = (progress.done(), progress.total());
                let secs = started.elapsed().as_secs_f64().max(1e-3);
                let pct = if total > 0 {
                    format!("{:.0} %", 100.0 * done as f64 / total as f64)
                } else {
                    "size unknown".into()
                };
                tracing::info!(
                    "{what}: {:.1} of {:.1} GiB ({pct}), {:.0} MB/s",
                    done as f64 / (1u64 << 30) as f64,
                    total.max(done) as f64 / (1u64 << 30) as f64,
                    done as f64 / secs / 1e6
                );
            }
        });
        Reporter { task, bar: None }
    }

    /// Stop reporting (and clear the bar).
    pub fn finish(self) {
        self.task.abort();
        if let Some(b) = self.bar {
            b.finish_and_clear();
        }
    }
}

/// A byte count for people: `1.5 GiB`, `212.0 MiB`, `8.0 KiB`, `12 B`.
pub fn human_bytes(b: u64) -> String {
    let (v, u) = match b {
        b if b >= 1 << 30 => (b as f64 / (1u64 << 30) as f64, "GiB"),
        b if b >= 1 << 20 => (b as f64 / (1u64 << 20) as f64, "MiB"),
        b if b >= 1 << 10 => (b as f64 / 1024.0, "KiB"),
        b => return format!("{b} B"),
    };
    format!("{v:.1} {u}")
}
