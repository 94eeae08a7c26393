//! A wrapper that makes a real backend fail on purpose, for tests of retries,
//! crash safety and error reporting: fail the Nth call, fail the next N calls,
//! or delay every call. Calls are numbered from 1 across all operations.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;

use super::{ListPage, ObjectMeta, Storage, StorageError};

/// What an injected fault does to a call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// Fail with an error a retry may cure (as a dropped connection or a 503).
    Transient,
    /// Fail with an error no retry cures (as a 403).
    Permanent,
}

#[derive(Debug, Default)]
struct Plan {
    calls: u64,
    at: BTreeMap<u64, Fault>,
    next: Vec<Fault>,
    delay: Duration,
}

/// A backend that passes calls to `inner` except where told to fail.
#[derive(Debug)]
pub struct FaultInjecting<S> {
    inner: S,
    plan: Mutex<Plan>,
}

impl<S: Storage> FaultInjecting<S> {
    /// Wrap `inner`; no faults until some are planned.
    pub fn new(inner: S) -> Self {
        FaultInjecting {
            inner,
            plan: Mutex::new(Plan::default()),
        }
    }

    /// Make call number `n` (counted from 1, all operations together) fail.
    pub fn fail_call(&self, n: u64, fault: Fault) {
        self.with_plan(|p| {
            p.at.insert(n, fault);
        });
    }

    /// Make each of the next `count` calls fail.
    pub fn fail_next(&self, count: usize, fault: Fault) {
        self.with_plan(|p| p.next.extend(std::iter::repeat_n(fault, count)));
    }

    /// Delay every call by `delay` before it reaches the backend (a slow store).
    pub fn set_delay(&self, delay: Duration) {
        self.with_plan(|p| p.delay = delay);
    }

    /// Calls made so far, failed ones included.
    pub fn calls(&self) -> u64 {
        self.with_plan(|p| p.calls)
    }

    fn with_plan<T>(&self, f: impl FnOnce(&mut Plan) -> T) -> T {
        // A poisoned lock only means another test thread panicked; the plan is
        // still consistent (every update is a single assignment).
        let mut guard = self.plan.lock().unwrap_or_else(|e| e.into_inner());
        f(&mut guard)
    }

    async fn enter(&self, op: &'static str, key: &str) -> Result<(), StorageError> {
        let (fault, delay) = self.with_plan(|p| {
            p.calls += 1;
            let n = p.calls;
            let fault =
                p.at.remove(&n)
                    .or_else(|| (!p.next.is_empty()).then(|| p.next.remove(0)));
            (fault, p.delay)
        });
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
        match fault {
            None => Ok(()),
            Some(f) => Err(StorageError::Backend {
                op,
                location: self.inner.location(),
                key: key.to_owned(),
                transient: f == Fault::Transient,
                message: format!(
                    "injected {} fault",
                    if f == Fault::Transient {
                        "transient"
                    } else {
                        "permanent"
                    }
                ),
            }),
        }
    }
}

#[async_trait]
impl<S: Storage> Storage for FaultInjecting<S> {
    fn location(&self) -> String {
        self.inner.location()
    }

    async fn put(&self, key: &str, data: Bytes) -> Result<(), StorageError> {
        self.enter("put", key).await?;
        self.inner.put(key, data).await
    }

    async fn get(&self, key: &str) -> Result<Bytes, StorageError> {
        self.enter("get", key).await?;
        self.inner.get(key).await
    }

    async fn get_range(&self, key: &str, start: u64, len: u64) -> Result<Bytes, StorageError> {
        self.enter("get", key).await?;
        self.inner.get_range(key, start, len).await
    }

    async fn head(&self, key: &str) -> Result<Option<ObjectMeta>, StorageError> {
        self.enter("head", key).await?;
        self.inner.head(key).await
    }

    async fn list_page(&self, prefix: &str, token: Option<&str>) -> Result<ListPage, StorageError> {
        self.enter("list", prefix).await?;
        self.inner.list_page(prefix, token).await
    }

    async fn delete(&self, key: &str) -> Result<(), StorageError> {
        self.enter("delete", key).await?;
        self.inner.delete(key).await
    }

    fn lock_days(&self) -> Option<u32> {
        self.inner.lock_days()
    }

    async fn locked_until(
        &self,
        key: &str,
    ) -> Result<Option<chrono::DateTime<chrono::Utc>>, StorageError> {
        self.inner.locked_until(key).await
    }

    async fn extend_lock(
        &self,
        key: &str,
        until: chrono::DateTime<chrono::Utc>,
    ) -> Result<(), StorageError> {
        self.inner.extend_lock(key, until).await
    }
}
