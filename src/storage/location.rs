//! Repository locations as URLs: a plain path or `file:///path` is a
//! [`LocalDir`]; `s3://bucket/prefix` is an [`S3`] bucket.

use std::path::PathBuf;
use std::sync::Arc;

use serde::Deserialize;

use super::{LocalDir, RetryPolicy, Retrying, S3Config, Storage, StorageError, S3};

/// A parsed repository location.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Location {
    /// A directory on a local or mounted file system.
    Local(PathBuf),
    /// A bucket and a key prefix ("" for the bucket's root).
    S3 {
        /// Bucket name.
        bucket: String,
        /// Key prefix without leading or trailing '/'.
        prefix: String,
    },
}

impl Location {
    /// Parse `url`: `/path`, `relative/path`, `file:///path` or `s3://bucket[/prefix]`.
    pub fn parse(url: &str) -> Result<Location, StorageError> {
        let bad = |reason: &str| StorageError::BadLocation {
            location: url.to_owned(),
            reason: reason.to_owned(),
        };
        if url.trim().is_empty() {
            return Err(bad(
                "empty; give a directory path or s3://bucket/prefix (--repo or WALVAULT_REPO)",
            ));
        }
        if let Some(rest) = url.strip_prefix("s3://") {
            let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
            if bucket.is_empty() {
                return Err(bad("no bucket name; write s3://BUCKET/optional/prefix"));
            }
            let valid_bucket = bucket.len() >= 3
                && bucket.len() <= 63
                && bucket.bytes().all(|b| {
                    b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.'
                });
            if !valid_bucket {
                return Err(bad(&format!(
                    "{bucket:?} is not a valid bucket name (3-63 characters: a-z, 0-9, '-', '.')"
                )));
            }
            let prefix = prefix.trim_matches('/');
            if !prefix.is_empty() {
                super::validate_prefix(prefix).map_err(|e| bad(&e.to_string()))?;
            }
            return Ok(Location::S3 {
                bucket: bucket.to_owned(),
                prefix: prefix.to_owned(),
            });
        }
        if let Some(path) = url.strip_prefix("file://") {
            if !path.starts_with('/') {
                return Err(bad(
                    "a file:// URL needs an absolute path: file:///srv/walvault",
                ));
            }
            return Ok(Location::Local(PathBuf::from(path)));
        }
        if let Some((scheme, _)) = url.split_once("://") {
            return Err(bad(&format!(
                "unsupported scheme {scheme:?}; use a directory path, file:///path or s3://bucket/prefix"
            )));
        }
        Ok(Location::Local(PathBuf::from(url)))
    }
}

/// Settings for opening a location: the storage part of walvault.toml.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StorageOptions {
    /// The `[s3]` table.
    pub s3: S3Config,
    /// The `[retry]` table.
    pub retry: RetrySettings,
}

/// The `[retry]` table of walvault.toml.
#[cfg_attr(test, derive(schemars::JsonSchema))]
#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RetrySettings {
    /// Attempts in all for one storage operation.
    pub max_attempts: u32,
    /// Upper bound of the first back-off, milliseconds (doubles per attempt).
    pub base_delay_ms: u64,
    /// Cap of any back-off, milliseconds.
    pub max_delay_ms: u64,
}

impl Default for RetrySettings {
    fn default() -> Self {
        let p = RetryPolicy::default();
        RetrySettings {
            max_attempts: p.max_attempts,
            base_delay_ms: p.base_delay.as_millis() as u64,
            max_delay_ms: p.max_delay.as_millis() as u64,
        }
    }
}

impl RetrySettings {
    /// As a policy.
    pub fn policy(&self) -> RetryPolicy {
        RetryPolicy {
            max_attempts: self.max_attempts.max(1),
            base_delay: std::time::Duration::from_millis(self.base_delay_ms),
            max_delay: std::time::Duration::from_millis(self.max_delay_ms),
        }
    }
}

/// Open the storage at `url`, wrapped in the retry policy of `opts`.
pub async fn open(url: &str, opts: &StorageOptions) -> Result<Arc<dyn Storage>, StorageError> {
    let policy = opts.retry.policy();
    Ok(match Location::parse(url)? {
        Location::Local(path) => Arc::new(Retrying::new(LocalDir::open(path)?, policy)),
        Location::S3 { bucket, prefix } => Arc::new(Retrying::new(
            S3::connect(&bucket, &prefix, &opts.s3).await?,
            policy,
        )),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        assert_eq!(
            Location::parse("/srv/r").unwrap(),
            Location::Local("/srv/r".into())
        );
        assert_eq!(
            Location::parse("rel/dir").unwrap(),
            Location::Local("rel/dir".into())
        );
        assert_eq!(
            Location::parse("file:///srv/r").unwrap(),
            Location::Local("/srv/r".into())
        );
        assert_eq!(
            Location::parse("s3://my-bucket/a/b/").unwrap(),
            Location::S3 {
                bucket: "my-bucket".into(),
                prefix: "a/b".into()
            }
        );
        assert_eq!(
            Location::parse("s3://my-bucket").unwrap(),
            Location::S3 {
                bucket: "my-bucket".into(),
                prefix: "".into()
            }
        );
        for bad in [
            "",
            "s3://",
            "s3:///prefix",
            "s3://B/x",
            "s3://b",
            "gs://x/y",
            "file://rel",
            "s3://bkt/a/../b",
        ] {
            let e = Location::parse(bad).unwrap_err();
            assert!(
                matches!(e, StorageError::BadLocation { .. }),
                "{bad:?}: {e}"
            );
        }
        let e = Location::parse("s3:///x").unwrap_err().to_string();
        assert!(e.contains("no bucket name"), "{e}");
    }
}
