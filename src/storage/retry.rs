//! Retries with exponential backoff and full jitter, for transient errors only.
//!
//! The S3 SDK's own retries are switched off so that this is the one policy,
//! applied the same way to every backend and visible in tests through the
//! fault-injection wrapper. A permanent error (missing object, 403, bad bucket)
//! is returned at once; a transient one (connection refused or reset, timeout,
//! 5xx, throttling) is tried again up to `max_attempts` times in all.

use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;

use super::{ListPage, ObjectMeta, Storage, StorageError};

/// How often and how patiently to retry.
#[derive(Debug, Clone, Copy)]
pub struct RetryPolicy {
    /// Attempts in all, the first included (1 = no retry).
    pub max_attempts: u32,
    /// Upper bound of the first back-off; doubles each attempt.
    pub base_delay: Duration,
    /// Cap of any single back-off.
    pub max_delay: Duration,
}

impl Default for RetryPolicy {
    /// 6 attempts, back-offs drawn from 0..100 ms, 0..200 ms, ... capped at 5 s:
    /// rides out a store restarting or a node failing over (a few seconds)
    /// without hanging an `archive_command` for minutes.
    fn default() -> Self {
        RetryPolicy {
            max_attempts: 6,
            base_delay: Duration::from_millis(100),
            max_delay: Duration::from_secs(5),
        }
    }
}

impl RetryPolicy {
    /// The back-off before attempt `attempt + 1` (full jitter: uniform in 0..=cap).
    fn backoff(&self, attempt: u32) -> Duration {
        let cap = self
            .base_delay
            .saturating_mul(
                1u32.checked_shl(attempt.saturating_sub(1))
                    .unwrap_or(u32::MAX),
            )
            .min(self.max_delay);
        let nanos = u64::try_from(cap.as_nanos()).unwrap_or(u64::MAX);
        Duration::from_nanos(rand::random_range(0..=nanos))
    }

    /// Run `op` until it succeeds, fails permanently, or attempts run out.
    pub async fn run<T, F, Fut>(&self, what: &str, mut op: F) -> Result<T, StorageError>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<T, StorageError>>,
    {
        let mut attempt = 1;
        loop {
            match op().await {
                Err(e) if e.is_transient() && attempt < self.max_attempts => {
                    let wait = self.backoff(attempt);
                    tracing::warn!(
                        attempt,
                        max = self.max_attempts,
                        ?wait,
                        "{what}: {e}; retrying"
                    );
                    tokio::time::sleep(wait).await;
                    attempt += 1;
                }
                Err(StorageError::Backend {
                    op,
                    location,
                    key,
                    transient: true,
                    message,
                }) if attempt > 1 => {
                    return Err(StorageError::Backend {
                        op,
                        location,
                        key,
                        transient: true,
                        message: format!("{message} (gave up after {attempt} attempts)"),
                    })
                }
                other => return other,
            }
        }
    }
}

/// A backend whose every call is retried according to a [`RetryPolicy`].
#[derive(Debug)]
pub struct Retrying<S> {
    inner: S,
    policy: RetryPolicy,
}

impl<S> Retrying<S> {
    /// Wrap `inner`.
    pub fn new(inner: S, policy: RetryPolicy) -> Self {
        Retrying { inner, policy }
    }

    /// The wrapped backend.
    pub fn inner(&self) -> &S {
        &self.inner
    }
}

#[async_trait]
impl<S: Storage> Storage for Retrying<S> {
    fn location(&self) -> String {
        self.inner.location()
    }

    async fn put(&self, key: &str, data: Bytes) -> Result<(), StorageError> {
        // Bytes clones are reference counts, not copies.
        self.policy
            .run("put", || self.inner.put(key, data.clone()))
            .await
    }

    async fn get(&self, key: &str) -> Result<Bytes, StorageError> {
        self.policy.run("get", || self.inner.get(key)).await
    }

    async fn get_range(&self, key: &str, start: u64, len: u64) -> Result<Bytes, StorageError> {
        self.policy
            .run("get", || self.inner.get_range(key, start, len))
            .await
    }

    async fn head(&self, key: &str) -> Result<Option<ObjectMeta>, StorageError> {
        self.policy.run("head", || self.inner.head(key)).await
    }

    async fn list_page(&self, prefix: &str, token: Option<&str>) -> Result<ListPage, StorageError> {
        self.policy
            .run("list", || self.inner.list_page(prefix, token))
            .await
    }

    async fn delete(&self, key: &str) -> Result<(), StorageError> {
        self.policy.run("delete", || self.inner.delete(key)).await
    }

    fn lock_days(&self) -> Option<u32> {
        self.inner.lock_days()
    }

    fn local_dir(&self) -> Option<&super::LocalDir> {
        self.inner.local_dir()
    }

    async fn locked_until(
        &self,
        key: &str,
    ) -> Result<Option<chrono::DateTime<chrono::Utc>>, StorageError> {
        self.policy
            .run("head", || self.inner.locked_until(key))
            .await
    }

    async fn extend_lock(
        &self,
        key: &str,
        until: chrono::DateTime<chrono::Utc>,
    ) -> Result<(), StorageError> {
        self.policy
            .run("extend lock", || self.inner.extend_lock(key, until))
            .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_stays_under_its_cap() {
        let p = RetryPolicy::default();
        for attempt in 1..40 {
            let cap = p
                .base_delay
                .saturating_mul(1 << (attempt - 1).min(20))
                .min(p.max_delay);
            assert!(p.backoff(attempt) <= cap);
        }
    }
}
