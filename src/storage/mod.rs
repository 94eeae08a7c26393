//! Object storage for the repository: one async trait, a local-directory backend,
//! an S3 backend, a retry layer and a fault-injection wrapper for tests.
//!
//! The contract every backend meets (checked by one conformance suite in
//! `tests/integration/storage_conformance.rs`):
//! - `put` is atomic: a reader sees the whole new object, the whole old one, or
//!   nothing — never a mix or a prefix. It overwrites. It is durable when it returns.
//! - Nothing depends on conditional writes (`If-None-Match`): S3-compatible stores
//!   such as Garage ignore them. The repository makes names unique or content-derived.
//! - `get` of a missing key is [`StorageError::NotFound`]; `delete` of a missing key
//!   succeeds; `head` of a missing key is `Ok(None)`.
//! - `list_page` returns keys under a prefix in byte order, recursively (no
//!   delimiter), in pages; the pages concatenated are the whole listing.
//! - Errors say which operation, which key, which location, and whether a retry
//!   could help ([`StorageError::is_transient`]).

mod fault;
mod local;
mod location;
mod retry;
mod s3;

use std::fmt;

use async_trait::async_trait;
use bytes::Bytes;

pub use fault::{Fault, FaultInjecting};
pub use local::{InPlaceFile, LocalDir, ZeroedFile};
pub use location::{open, Location, RetrySettings, StorageOptions};
pub use retry::{RetryPolicy, Retrying};
pub use s3::{ListedObject, MultipartUpload, ObjectAttrs, ObjectDetails, S3Config, S3};

/// An object as listed: its key and size in bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectMeta {
    /// Key relative to the backend's root.
    pub key: String,
    /// Size in bytes.
    pub size: u64,
}

/// One page of a listing.
#[derive(Debug, Clone, Default)]
pub struct ListPage {
    /// Objects of this page, in byte order of their keys.
    pub objects: Vec<ObjectMeta>,
    /// Token for the next page; `None` on the last page.
    pub next: Option<String>,
}

/// What the repository needs from a place that stores objects.
#[async_trait]
pub trait Storage: Send + Sync + fmt::Debug {
    /// Where the objects live, for messages: `/srv/backups`, `s3://bucket/prefix`.
    fn location(&self) -> String;

    /// Store `data` under `key`, replacing any previous object, atomically and durably.
    async fn put(&self, key: &str, data: Bytes) -> Result<(), StorageError>;

    /// The whole object.
    async fn get(&self, key: &str) -> Result<Bytes, StorageError>;

    /// `len` bytes from byte `start`, fewer when the object ends first. A range
    /// starting exactly at the end is empty; one starting past it is an error.
    async fn get_range(&self, key: &str, start: u64, len: u64) -> Result<Bytes, StorageError>;

    /// Size of the object, or `None` when it does not exist.
    async fn head(&self, key: &str) -> Result<Option<ObjectMeta>, StorageError>;

    /// One page of the keys starting with `prefix`; pass the previous page's
    /// `next` to continue.
    async fn list_page(&self, prefix: &str, token: Option<&str>) -> Result<ListPage, StorageError>;

    /// Remove the object; removing a missing object succeeds. In a
    /// write-once repository a locked object is [`StorageError::Locked`].
    async fn delete(&self, key: &str) -> Result<(), StorageError>;

    /// Days every new object stays write-once (S3 Object Lock), when this
    /// is a write-once repository.
    fn lock_days(&self) -> Option<u32> {
        None
    }

    /// The local directory underneath, for what only a file system offers
    /// (objects written in place: [`LocalDir::install`]); `None` for object
    /// stores.
    fn local_dir(&self) -> Option<&LocalDir> {
        None
    }

    /// Until when the object cannot be deleted or overwritten; `None` when
    /// it is not locked (or the backend has no locks).
    async fn locked_until(
        &self,
        _key: &str,
    ) -> Result<Option<chrono::DateTime<chrono::Utc>>, StorageError> {
        Ok(None)
    }

    /// Keep the object locked until `until` (a lock is never shortened).
    /// Nothing to do without locks.
    async fn extend_lock(
        &self,
        _key: &str,
        _until: chrono::DateTime<chrono::Utc>,
    ) -> Result<(), StorageError> {
        Ok(())
    }
}

/// A shared backend is a backend (lets wrappers hold an `Arc<dyn Storage>`).
#[async_trait]
impl<S: Storage + ?Sized> Storage for std::sync::Arc<S> {
    fn location(&self) -> String {
        (**self).location()
    }
    async fn put(&self, key: &str, data: Bytes) -> Result<(), StorageError> {
        (**self).put(key, data).await
    }
    async fn get(&self, key: &str) -> Result<Bytes, StorageError> {
        (**self).get(key).await
    }
    async fn get_range(&self, key: &str, start: u64, len: u64) -> Result<Bytes, StorageError> {
        (**self).get_range(key, start, len).await
    }
    async fn head(&self, key: &str) -> Result<Option<ObjectMeta>, StorageError> {
        (**self).head(key).await
    }
    async fn list_page(&self, prefix: &str, token: Option<&str>) -> Result<ListPage, StorageError> {
        (**self).list_page(prefix, token).await
    }
    async fn delete(&self, key: &str) -> Result<(), StorageError> {
        (**self).delete(key).await
    }
    fn lock_days(&self) -> Option<u32> {
        (**self).lock_days()
    }
    fn local_dir(&self) -> Option<&LocalDir> {
        (**self).local_dir()
    }
    async fn locked_until(
        &self,
        key: &str,
    ) -> Result<Option<chrono::DateTime<chrono::Utc>>, StorageError> {
        (**self).locked_until(key).await
    }
    async fn extend_lock(
        &self,
        key: &str,
        until: chrono::DateTime<chrono::Utc>,
    ) -> Result<(), StorageError> {
        (**self).extend_lock(key, until).await
    }
}

/// Every object whose key starts with `prefix`, in key order.
pub async fn list_all(
    storage: &dyn Storage,
    prefix: &str,
) -> Result<Vec<ObjectMeta>, StorageError> {
    let mut out = Vec::new();
    let mut token: Option<String> = None;
    loop {
        let page = storage.list_page(prefix, token.as_deref()).await?;
        out.extend(page.objects);
        match page.next {
            Some(t) => token = Some(t),
            None => return Ok(out),
        }
    }
}

/// Why a storage operation failed.
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    /// The object does not exist.
    #[error("object {key} not found in {location}")]
    NotFound {
        /// Backend location.
        location: String,
        /// Key asked for.
        key: String,
    },
    /// A key that could escape the repository or that no backend can store.
    #[error("invalid object key {key:?}: {reason}")]
    InvalidKey {
        /// The key as given.
        key: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// A ranged read that starts past the end of the object.
    #[error(
        "range starting at byte {start} is past the end of {key} ({size} bytes) in {location}"
    )]
    InvalidRange {
        /// Backend location.
        location: String,
        /// Key read.
        key: String,
        /// First byte asked for.
        start: u64,
        /// Size of the object.
        size: u64,
    },
    /// The repository location itself is wrong (bad URL, a file where a
    /// directory belongs, missing bucket name).
    #[error("invalid repository location {location:?}: {reason}")]
    BadLocation {
        /// The location as given.
        location: String,
        /// What is wrong and what to do.
        reason: String,
    },
    /// A write-once repository refused to delete a locked object.
    #[error("{key} in {location} is locked{}: a write-once repository keeps it until then", until.map(|u| format!(" until {}", u.to_rfc3339())).unwrap_or_default())]
    Locked {
        /// Backend location.
        location: String,
        /// The key.
        key: String,
        /// Until when, if the store said.
        until: Option<chrono::DateTime<chrono::Utc>>,
    },
    /// An object read piece by piece was replaced (or rewritten) between
    /// two reads: its ETag is no longer the one the reader started with.
    /// Not transient: the same request fails the same way; read the object
    /// again from the start.
    #[error(
        "object {key} in {location} changed while it was read: it was overwritten since its \
         ETag was taken; read it again from the start"
    )]
    Changed {
        /// Backend location.
        location: String,
        /// Key read.
        key: String,
    },
    /// The backend refused or failed the operation.
    #[error("{op} {key:?} in {location} failed: {message}")]
    Backend {
        /// Operation: "put", "get", "list", ...
        op: &'static str,
        /// Backend location.
        location: String,
        /// Key or prefix involved.
        key: String,
        /// Whether trying again later may succeed.
        transient: bool,
        /// Cause and, where known, what to do.
        message: String,
    },
}

impl StorageError {
    /// True when the same request may succeed if tried again (network errors,
    /// timeouts, 5xx, throttling); false for missing objects, bad keys,
    /// refused credentials and the like.
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            StorageError::Backend {
                transient: true,
                ..
            }
        )
    }

    /// True for [`StorageError::NotFound`].
    pub fn is_not_found(&self) -> bool {
        matches!(self, StorageError::NotFound { .. })
    }
}

/// Checks that a key is a relative, normalized, '/'-separated path: no empty,
/// `.` or `..` segments, no leading '/', no NUL or backslash, at most 1024 bytes,
/// and not inside the local backend's private `.tmp/` directory.
pub fn validate_key(key: &str) -> Result<(), StorageError> {
    let bad = |reason| {
        Err(StorageError::InvalidKey {
            key: key.to_owned(),
            reason,
        })
    };
    if key.is_empty() {
        return bad("empty key");
    }
    if key.len() > 1024 {
        return bad("longer than 1024 bytes");
    }
    if key.starts_with('/') {
        return bad("absolute keys are not allowed");
    }
    if key.contains('\0') || key.contains('\\') {
        return bad("NUL and backslash are not allowed");
    }
    for seg in key.split('/') {
        match seg {
            "" => return bad("empty path segment (\"//\" or trailing '/')"),
            "." | ".." => return bad("'.' and '..' segments are not allowed"),
            _ => {}
        }
    }
    if key == local::TMP_DIR || key.starts_with(&format!("{}/", local::TMP_DIR)) {
        return bad("keys under .tmp/ are reserved");
    }
    Ok(())
}

/// Checks a listing prefix: empty, or a key prefix with the same rules as keys
/// except that it may end with '/'.
pub fn validate_prefix(prefix: &str) -> Result<(), StorageError> {
    if prefix.is_empty() {
        return Ok(());
    }
    validate_key(prefix.strip_suffix('/').unwrap_or(prefix)).map_err(|e| match e {
        StorageError::InvalidKey { reason, .. } => StorageError::InvalidKey {
            key: prefix.to_owned(),
            reason,
        },
        other => other,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_that_could_escape_are_refused() {
        for bad in [
            "",
            "/etc/passwd",
            "../x",
            "a/../b",
            "a//b",
            "a/",
            "./a",
            "a\\b",
            "a\0b",
            ".tmp/x",
            ".tmp",
        ] {
            assert!(validate_key(bad).is_err(), "{bad:?} accepted");
        }
        for good in ["a", "main/packs/ab/abcdef", "config", "a.b/c..d", ".tmpx/y"] {
            validate_key(good).unwrap();
        }
        validate_prefix("").unwrap();
        validate_prefix("main/").unwrap();
        validate_prefix("main/wal/0000").unwrap();
        assert!(validate_prefix("../").is_err());
    }
}
