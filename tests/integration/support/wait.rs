//! How tests wait for something to happen: poll a condition until it holds,
//! with a deadline that names what was awaited. Never a fixed sleep as
//! synchronization: a sleep guesses how long something takes, and is too
//! short on a loaded machine and too long everywhere else.
//!
//! The only other sleep a test may need is one whose length is the subject
//! of the test (a store down for 30 s, commits at a given rate); [`hold`]
//! spends such a span checking an invariant all along.

use std::time::{Duration, Instant};

/// One wait: when it began, how long it may take, and the pause before
/// the next poll (5 ms at first, as most waits end quickly, doubling up to
/// 100 ms).
struct Wait<'a> {
    start: Instant,
    within: Duration,
    what: &'a str,
    pause: Duration,
}

impl Wait<'_> {
    fn new(within: Duration, what: &str) -> Wait<'_> {
        Wait {
            start: Instant::now(),
            within,
            what,
            pause: Duration::from_millis(5),
        }
    }

    /// After a poll that found `last` (the state it is in): the pause
    /// before the next one; panics when the time is up.
    fn pause_after(&mut self, last: String) -> Duration {
        if self.start.elapsed() >= self.within {
            let (within, what) = (self.within, self.what);
            if last.is_empty() {
                panic!("timed out after {within:?} waiting for {what}")
            }
            panic!("timed out after {within:?} waiting for {what}: {last}")
        }
        let pause = self.pause;
        self.pause = (self.pause * 2).min(Duration::from_millis(100));
        pause
    }
}

fn as_result(holds: bool) -> Result<(), String> {
    if holds {
        Ok(())
    } else {
        Err(String::new())
    }
}

/// Poll `cond` until it holds; panics naming `what` when it still does not
/// after `within`.
pub fn wait_until(within: Duration, what: &str, mut cond: impl FnMut() -> bool) {
    wait_for(within, what, || as_result(cond()))
}

/// Poll `probe` until it returns `Ok`, and return its value; panics naming
/// `what` after `within`, with the `Err` text of the last poll (the state
/// the wait ended in: "durable at 0/3000000", "archiver at …").
pub fn wait_for<T>(
    within: Duration,
    what: &str,
    mut probe: impl FnMut() -> Result<T, String>,
) -> T {
    let mut wait = Wait::new(within, what);
    loop {
        match probe() {
            Ok(v) => return v,
            Err(last) => std::thread::sleep(wait.pause_after(last)),
        }
    }
}

/// [`wait_until`] for a condition that awaits (an S3 request), without
/// blocking the runtime's thread between polls.
pub async fn wait_until_async(within: Duration, what: &str, mut cond: impl AsyncFnMut() -> bool) {
    wait_for_async(within, what, async || as_result(cond().await)).await
}

/// [`wait_for`] for a probe that awaits.
pub async fn wait_for_async<T>(
    within: Duration,
    what: &str,
    mut probe: impl AsyncFnMut() -> Result<T, String>,
) -> T {
    let mut wait = Wait::new(within, what);
    loop {
        match probe().await {
            Ok(v) => return v,
            Err(last) => tokio::time::sleep(wait.pause_after(last)).await,
        }
    }
}

/// Spend `period` (the subject of a test, such as how long a store stays
/// down) checking every 20 ms that `invariant` holds; panics naming `what`,
/// with the `Err` text, as soon as it does not.
pub fn hold(period: Duration, what: &str, mut invariant: impl FnMut() -> Result<(), String>) {
    let start = Instant::now();
    loop {
        if let Err(e) = invariant() {
            panic!("{what} stopped holding after {:?}: {e}", start.elapsed());
        }
        let left = period.saturating_sub(start.elapsed());
        if left.is_zero() {
            return;
        }
        std::thread::sleep(left.min(Duration::from_millis(20)));
    }
}
