//! The S3 backend (any S3-compatible store: AWS S3, Garage, MinIO, Ceph RGW, R2).
//!
//! - Objects above `multipart_threshold` are uploaded in parts of `part_size`,
//!   `upload_concurrency` at a time; a failed multipart upload is aborted so no
//!   invisible parts are left behind. A multipart object becomes visible only at
//!   CompleteMultipartUpload, so a reader never sees a prefix.
//! - The SDK's own retries are off: [`super::Retrying`] applies walvault's one
//!   policy. Errors are classified transient (connect/IO failures, timeouts, 5xx,
//!   429, SlowDown) or permanent (403, 404, missing bucket), and name the bucket
//!   and key.
//! - Credentials: `[s3]` in walvault.toml, else the environment
//!   (`AWS_ACCESS_KEY_ID`, ...), else the shared profile files. Instance metadata
//!   (EC2 IMDS / ECS) is asked only when `instance_metadata = true`, so a missing
//!   key never turns into a wait on a link-local address.
//! - Besides the repository's [`Storage`], inherent calls serve a bucket of
//!   user files that walvault backs up or restores into (the last section):
//!   any key S3 allows, attributes and user metadata that round-trip, ranged
//!   reads pinned to one ETag ([`StorageError::Changed`] when the object was
//!   replaced), and explicit multipart uploads ([`MultipartUpload`]).

use std::collections::{BTreeMap, HashMap};
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use async_trait::async_trait;
use aws_config::environment::EnvironmentVariableCredentialsProvider;
use aws_config::meta::credentials::CredentialsProviderChain;
use aws_config::profile::ProfileFileCredentialsProvider;
use aws_config::retry::RetryConfig;
use aws_config::timeout::TimeoutConfig;
use aws_config::BehaviorVersion;
use aws_sdk_s3::config::{
    Credentials, Region, RequestChecksumCalculation, ResponseChecksumValidation,
};
use aws_sdk_s3::error::{DisplayErrorContext, ProvideErrorMetadata, SdkError};
use aws_sdk_s3::primitives::ByteStream;
use aws_sdk_s3::types::{CompletedMultipartUpload, CompletedPart};
use aws_sdk_s3::Client;
use bytes::Bytes;
use futures::{StreamExt, TryStreamExt};
use serde::{Deserialize, Serialize};

use super::{validate_key, validate_prefix, ListPage, ObjectMeta, Storage, StorageError};

/// How to reach an S3-compatible store: the `[s3]` table of walvault.toml.
/// Bucket and prefix come from the repository URL `s3://bucket/prefix`.
#[cfg_attr(test, derive(schemars::JsonSchema))]
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct S3Config {
    /// Endpoint URL, e.g. `http://127.0.0.1:3900`; default: env `AWS_ENDPOINT_URL_S3`
    /// or `AWS_ENDPOINT_URL`, else AWS.
    pub endpoint: Option<String>,
    /// Region; default: env `AWS_REGION` or `AWS_DEFAULT_REGION`, else `us-east-1`.
    pub region: Option<String>,
    /// Access key id; default: the environment / profile chain.
    pub access_key_id: Option<String>,
    /// Secret access key, with `access_key_id`.
    pub secret_access_key: Option<String>,
    /// Path-style addressing (`endpoint/bucket/key`); default: on with a custom
    /// endpoint (what most S3-compatible stores need), off for AWS.
    pub path_style: Option<bool>,
    /// Ask EC2/ECS instance metadata for credentials when none are configured.
    pub instance_metadata: bool,
    /// Objects of at least this many bytes are uploaded in parts.
    pub multipart_threshold: u64,
    /// Size of each part, bytes (S3 needs at least 5 MiB).
    pub part_size: u64,
    /// Parts uploaded at once for one object.
    pub upload_concurrency: usize,
    /// Seconds to wait for a TCP connection.
    pub connect_timeout_secs: u64,
    /// Seconds to wait for the next bytes of a response.
    pub read_timeout_secs: u64,
    /// Storage class of every object written (`STANDARD_IA`, `GLACIER_IR`,
    /// … : classes read with ordinary GETs); default: the bucket's.
    pub storage_class: Option<String>,
    /// A write-once repository: every object is written with an S3 Object
    /// Lock retention of this many days (the bucket must have Object Lock
    /// enabled); `expire` extends the locks of what is still needed.
    pub object_lock_days: Option<u32>,
    /// `compliance` (nobody can shorten or remove a lock, the root account
    /// included) or `governance` (a principal with
    /// s3:BypassGovernanceRetention can).
    pub object_lock_mode: Option<String>,
}

impl Default for S3Config {
    fn default() -> Self {
        S3Config {
            endpoint: None,
            region: None,
            access_key_id: None,
            secret_access_key: None,
            path_style: None,
            instance_metadata: false,
            multipart_threshold: 32 << 20,
            part_size: 16 << 20,
            upload_concurrency: 4,
            connect_timeout_secs: 5,
            read_timeout_secs: 60,
            storage_class: None,
            object_lock_days: None,
            object_lock_mode: None,
        }
    }
}

/// A bucket (and optional key prefix) of an S3-compatible store.
#[derive(Debug, Clone)]
pub struct S3 {
    client: Client,
    bucket: String,
    /// "" or ending in '/'.
    prefix: String,
    endpoint: String,
    multipart_threshold: u64,
    part_size: u64,
    upload_concurrency: usize,
    storage_class: Option<aws_sdk_s3::types::StorageClass>,
    /// Object Lock: days and mode of every new object's retention.
    lock: Option<(u32, aws_sdk_s3::types::ObjectLockRetentionMode)>,
}

impl S3 {
    /// A client for `bucket` with every key under `prefix` (may be empty).
    /// Makes no request: a wrong endpoint or key shows at the first operation.
    pub async fn connect(bucket: &str, prefix: &str, cfg: &S3Config) -> Result<S3, StorageError> {
        let location = format!("s3://{bucket}/{prefix}");
        let bad = |reason: String| StorageError::BadLocation {
            location: location.clone(),
            reason,
        };
        if cfg.part_size < 5 << 20 {
            return Err(bad(
                "s3.part_size must be at least 5 MiB (an S3 limit)".into()
            ));
        }
        let env = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
        let endpoint = cfg
            .endpoint
            .clone()
            .or_else(|| env("AWS_ENDPOINT_URL_S3"))
            .or_else(|| env("AWS_ENDPOINT_URL"));
        if let Some(ep) = &endpoint {
            if !(ep.starts_with("http://") || ep.starts_with("https://")) {
                return Err(bad(format!(
                    "endpoint {ep:?} must start with http:// or https://"
                )));
            }
        }
        let region = cfg
            .region
            .clone()
            .or_else(|| env("AWS_REGION"))
            .or_else(|| env("AWS_DEFAULT_REGION"))
            .unwrap_or_else(|| "us-east-1".to_owned());

        let mut loader = aws_config::defaults(BehaviorVersion::latest())
            .region(Region::new(region))
            .retry_config(RetryConfig::disabled())
            .timeout_config(
                TimeoutConfig::builder()
                    .connect_timeout(Duration::from_secs(cfg.connect_timeout_secs))
                    .read_timeout(Duration::from_secs(cfg.read_timeout_secs))
                    .build(),
            );
        loader = match (&cfg.access_key_id, &cfg.secret_access_key) {
            (Some(id), Some(secret)) => loader.credentials_provider(Credentials::new(
                id,
                secret,
                None,
                None,
                "walvault.toml",
            )),
            (None, None) => {
                let chain = CredentialsProviderChain::first_try(
                    "Environment",
                    EnvironmentVariableCredentialsProvider::new(),
                )
                .or_else("Profile", ProfileFileCredentialsProvider::builder().build());
                if cfg.instance_metadata {
                    loader.credentials_provider(chain.or_default_provider().await)
                } else {
                    loader.credentials_provider(chain)
                }
            }
            _ => {
                return Err(bad(
                    "set both s3.access_key_id and s3.secret_access_key, or neither".into(),
                ))
            }
        };
        if let Some(ep) = &endpoint {
            loader = loader.endpoint_url(ep);
        }
        let sdk = loader.load().await;
        let conf = aws_sdk_s3::config::Builder::from(&sdk)
            .force_path_style(cfg.path_style.unwrap_or(endpoint.is_some()))
            // Checksums "when required" only: several S3-compatible stores reject
            // the aws-chunked uploads that default checksums bring, and every
            // repository object is verified by walvault's own hash or AEAD tag.
            .request_checksum_calculation(RequestChecksumCalculation::WhenRequired)
            .response_checksum_validation(ResponseChecksumValidation::WhenRequired)
            .build();
        Ok(S3 {
            client: Client::from_conf(conf),
            bucket: bucket.to_owned(),
            prefix: if prefix.is_empty() || prefix.ends_with('/') {
                prefix.to_owned()
            } else {
                format!("{prefix}/")
            },
            endpoint: endpoint.unwrap_or_else(|| "AWS S3".to_owned()),
            multipart_threshold: cfg.multipart_threshold.max(cfg.part_size),
            part_size: cfg.part_size,
            upload_concurrency: cfg.upload_concurrency.max(1),
            storage_class: cfg
                .storage_class
                .as_deref()
                .map(aws_sdk_s3::types::StorageClass::from),
            lock: match cfg.object_lock_days {
                None => None,
                Some(0) => {
                    return Err(StorageError::BadLocation {
                        location: format!("s3://{bucket}/{prefix}"),
                        reason: "object_lock_days must be at least 1".into(),
                    })
                }
                Some(d) => Some((
                    d,
                    match cfg.object_lock_mode.as_deref().unwrap_or("compliance") {
                        "compliance" | "COMPLIANCE" => {
                            aws_sdk_s3::types::ObjectLockRetentionMode::Compliance
                        }
                        "governance" | "GOVERNANCE" => {
                            aws_sdk_s3::types::ObjectLockRetentionMode::Governance
                        }
                        other => {
                            return Err(StorageError::BadLocation {
                                location: format!("s3://{bucket}/{prefix}"),
                                reason: format!(
                                    "object_lock_mode {other:?}: give compliance or governance"
                                ),
                            })
                        }
                    },
                )),
            },
        })
    }

    fn full_key(&self, key: &str) -> String {
        format!("{}{key}", self.prefix)
    }

    /// Turn an SDK error into a [`StorageError`] that names bucket and key and
    /// says whether a retry can help.
    fn classify<E>(
        &self,
        op: &'static str,
        key: &str,
        err: SdkError<E, aws_sdk_s3::config::http::HttpResponse>,
    ) -> StorageError
    where
        E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
    {
        let backend = |transient: bool, message: String| StorageError::Backend {
            op,
            location: self.location(),
            key: key.to_owned(),
            transient,
            message,
        };
        match &err {
            SdkError::ServiceError(se) => {
                let status = se.raw().status().as_u16();
                let code = se.err().code().unwrap_or("");
                let detail = se.err().message().unwrap_or("");
                let what = if code.is_empty() {
                    format!("HTTP {status}")
                } else {
                    format!("HTTP {status} {code}: {detail}")
                };
                match (status, code) {
                    (_, "NoSuchBucket") => backend(
                        false,
                        format!(
                            "{what}; bucket {:?} does not exist at {}: create it or fix the repository URL",
                            self.bucket, self.endpoint
                        ),
                    ),
                    (404, "NoSuchKey" | "NotFound" | "") => StorageError::NotFound {
                        location: self.location(),
                        key: key.to_owned(),
                    },
                    (403, _) | (_, "AccessDenied" | "InvalidAccessKeyId" | "SignatureDoesNotMatch") => backend(
                        false,
                        format!(
                            "{what}; access denied to bucket {:?}: check the access key id and secret \
                             (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY or [s3] in walvault.toml) \
                             and the key's permissions on the bucket",
                            self.bucket
                        ),
                    ),
                    (500.., _) | (429, _) | (_, "SlowDown" | "Throttling" | "RequestTimeout" | "InternalError") => {
                        backend(true, what)
                    }
                    _ => backend(false, what),
                }
            }
            SdkError::TimeoutError(_) => backend(true, format!("timed out talking to {}", self.endpoint)),
            SdkError::DispatchFailure(df) if df.is_io() || df.is_timeout() => backend(
                true,
                format!(
                    "cannot reach the S3 endpoint {}: {}; check the endpoint URL and that the store is running",
                    self.endpoint,
                    root_cause(&err)
                ),
            ),
            SdkError::DispatchFailure(df) if df.is_user() => backend(false, DisplayErrorContext(&err).to_string()),
            SdkError::DispatchFailure(_) | SdkError::ResponseError(_) => {
                backend(true, DisplayErrorContext(&err).to_string())
            }
            _ => backend(false, DisplayErrorContext(&err).to_string()),
        }
    }

    /// `data` in parts of `part_size`, `upload_concurrency` at a time; the
    /// upload is aborted when a part or the completion fails.
    async fn put_multipart(&self, key: &str, data: Bytes) -> Result<(), StorageError> {
        let upload = self.start_multipart(key, &ObjectAttrs::default()).await?;
        let part_size = usize::try_from(self.part_size).unwrap_or(usize::MAX);
        let parts = (0..data.len())
            .step_by(part_size)
            .enumerate()
            .map(|(i, off)| {
                (
                    i as i32 + 1,
                    data.slice(off..(off + part_size).min(data.len())),
                )
            });
        let uploaded = futures::stream::iter(parts.map(|(n, body)| upload.upload_part(n, body)))
            .buffer_unordered(self.upload_concurrency)
            .try_collect::<Vec<()>>()
            .await;
        match uploaded {
            // complete aborts the upload itself when it fails
            Ok(_) => upload.complete().await,
            Err(e) => {
                upload.abort().await;
                Err(e)
            }
        }
    }
}

#[async_trait]
impl Storage for S3 {
    fn location(&self) -> String {
        format!("s3://{}/{} at {}", self.bucket, self.prefix, self.endpoint)
    }

    async fn put(&self, key: &str, data: Bytes) -> Result<(), StorageError> {
        validate_key(key)?;
        // a locked object goes up in one request: S3 wants a checksum with
        // every request that sets a retention, one PUT carries it simply
        if data.len() as u64 >= self.multipart_threshold && self.lock.is_none() {
            return self.put_multipart(key, data).await;
        }
        let (mode, until) = match &self.lock {
            Some((days, mode)) => (
                Some(aws_sdk_s3::types::ObjectLockMode::from(mode.as_str())),
                Some(aws_smithy_types::DateTime::from_secs(
                    chrono::Utc::now().timestamp() + i64::from(*days) * 86_400,
                )),
            ),
            None => (None, None),
        };
        self.client
            .put_object()
            .bucket(&self.bucket)
            .key(self.full_key(key))
            .set_storage_class(self.storage_class.clone())
            .set_object_lock_mode(mode)
            .set_object_lock_retain_until_date(until)
            .set_checksum_algorithm(
                self.lock
                    .as_ref()
                    .map(|_| aws_sdk_s3::types::ChecksumAlgorithm::Crc32),
            )
            .body(ByteStream::from(data))
            .send()
            .await
            .map(|_| ())
            .map_err(|e| self.classify("put", key, e))
    }

    async fn get(&self, key: &str) -> Result<Bytes, StorageError> {
        validate_key(key)?;
        let out = self
            .client
            .get_object()
            .bucket(&self.bucket)
            .key(self.full_key(key))
            .send()
            .await
            .map_err(|e| self.classify("get", key, e))?;
        read_body(out.body)
            .await
            .map_err(|m| self.body_error(key, m))
    }

    async fn get_range(&self, key: &str, start: u64, len: u64) -> Result<Bytes, StorageError> {
        validate_key(key)?;
        // An empty range, or one S3 answers with 416 (it does so for a range
        // starting at or past the end, even exactly at the end): the object's
        // size decides between "empty" and InvalidRange.
        let at_edge = || async {
            let size = self
                .head(key)
                .await?
                .ok_or_else(|| StorageError::NotFound {
                    location: self.location(),
                    key: key.to_owned(),
                })?
                .size;
            if start > size {
                Err(StorageError::InvalidRange {
                    location: self.location(),
                    key: key.to_owned(),
                    start,
                    size,
                })
            } else {
                Ok(Bytes::new())
            }
        };
        if len == 0 {
            return at_edge().await;
        }
        let range = match start.checked_add(len - 1) {
            Some(last) => format!("bytes={start}-{last}"),
            None => format!("bytes={start}-"),
        };
        let out = self
            .client
            .get_object()
            .bucket(&self.bucket)
            .key(self.full_key(key))
            .range(range)
            .send()
            .await;
        match out {
            Ok(out) => read_body(out.body)
                .await
                .map_err(|m| self.body_error(key, m)),
            Err(SdkError::ServiceError(se)) if se.raw().status().as_u16() == 416 => at_edge().await,
            Err(e) => Err(self.classify("get", key, e)),
        }
    }

    fn lock_days(&self) -> Option<u32> {
        self.lock.as_ref().map(|(d, _)| *d)
    }

    async fn locked_until(
        &self,
        key: &str,
    ) -> Result<Option<chrono::DateTime<chrono::Utc>>, StorageError> {
        validate_key(key)?;
        if self.lock.is_none() {
            return Ok(None);
        }
        match self
            .client
            .head_object()
            .bucket(&self.bucket)
            .key(self.full_key(key))
            .send()
            .await
        {
            Ok(out) => Ok(out
                .object_lock_retain_until_date()
                .and_then(|d| chrono::DateTime::from_timestamp(d.secs(), d.subsec_nanos()))
                .filter(|u| *u > chrono::Utc::now())),
            Err(e) => match self.classify("head", key, e) {
                StorageError::NotFound { .. } => Ok(None),
                other => Err(other),
            },
        }
    }

    async fn extend_lock(
        &self,
        key: &str,
        until: chrono::DateTime<chrono::Utc>,
    ) -> Result<(), StorageError> {
        validate_key(key)?;
        let Some((_, mode)) = &self.lock else {
            return Ok(());
        };
        let retention = aws_sdk_s3::types::ObjectLockRetention::builder()
            .mode(mode.clone())
            .retain_until_date(aws_smithy_types::DateTime::from_secs(until.timestamp()))
            .build();
        self.client
            .put_object_retention()
            .bucket(&self.bucket)
            .key(self.full_key(key))
            .retention(retention)
            .checksum_algorithm(aws_sdk_s3::types::ChecksumAlgorithm::Crc32)
            .send()
            .await
            .map(|_| ())
            .map_err(|e| self.classify("extend lock", key, e))
    }

    async fn head(&self, key: &str) -> Result<Option<ObjectMeta>, StorageError> {
        validate_key(key)?;
        match self
            .client
            .head_object()
            .bucket(&self.bucket)
            .key(self.full_key(key))
            .send()
            .await
        {
            Ok(out) => Ok(Some(ObjectMeta {
                key: key.to_owned(),
                size: out.content_length().unwrap_or(0).max(0) as u64,
            })),
            Err(e) => match self.classify("head", key, e) {
                StorageError::NotFound { .. } => Ok(None),
                other => Err(other),
            },
        }
    }

    async fn list_page(&self, prefix: &str, token: Option<&str>) -> Result<ListPage, StorageError> {
        validate_prefix(prefix)?;
        let (listed, next) = self.list_objects(prefix, token).await?;
        let objects = listed
            .into_iter()
            .map(|o| ObjectMeta {
                key: o.key,
                size: o.size,
            })
            .collect();
        Ok(ListPage { objects, next })
    }

    async fn delete(&self, key: &str) -> Result<(), StorageError> {
        validate_key(key)?;
        if self.lock.is_some() {
            return self.delete_versions(key).await;
        }
        match self
            .client
            .delete_object()
            .bucket(&self.bucket)
            .key(self.full_key(key))
            .send()
            .await
        {
            Ok(_) => Ok(()),
            Err(e) => match self.classify("delete", key, e) {
                StorageError::NotFound { .. } => Ok(()),
                other => Err(other),
            },
        }
    }
}

impl S3 {
    /// In a write-once (versioned) bucket: delete every version and delete
    /// marker of `key`, so the space is freed (a plain delete would only add
    /// a marker and keep the data). A locked version is
    /// [`StorageError::Locked`].
    async fn delete_versions(&self, key: &str) -> Result<(), StorageError> {
        let full = self.full_key(key);
        let out = self
            .client
            .list_object_versions()
            .bucket(&self.bucket)
            .prefix(&full)
            .send()
            .await
            .map_err(|e| self.classify("list versions", key, e))?;
        let ids: Vec<String> = out
            .versions()
            .iter()
            .filter(|v| v.key() == Some(full.as_str()))
            .filter_map(|v| v.version_id().map(str::to_owned))
            .chain(
                out.delete_markers()
                    .iter()
                    .filter(|m| m.key() == Some(full.as_str()))
                    .filter_map(|m| m.version_id().map(str::to_owned)),
            )
            .collect();
        for id in ids {
            let deleted = self
                .client
                .delete_object()
                .bucket(&self.bucket)
                .key(&full)
                .version_id(&id)
                .send()
                .await;
            if let Err(e) = deleted {
                let err = self.classify("delete", key, e);
                // a refusal is a lock only when the object says it is
                // locked; otherwise (credentials without
                // s3:DeleteObjectVersion, say) it is the error it is
                if let StorageError::Backend { .. } = &err {
                    if let Ok(Some(until)) = self.locked_until(key).await {
                        return Err(StorageError::Locked {
                            location: self.location(),
                            key: key.to_owned(),
                            until: Some(until),
                        });
                    }
                }
                match err {
                    StorageError::NotFound { .. } => {}
                    other => return Err(other),
                }
            }
        }
        Ok(())
    }

    fn body_error(
        &self,
        key: &str,
        e: aws_smithy_types::byte_stream::error::Error,
    ) -> StorageError {
        StorageError::Backend {
            op: "get",
            location: self.location(),
            key: key.to_owned(),
            transient: true,
            message: format!("reading the response body: {}", DisplayErrorContext(&e)),
        }
    }
}

// ---------------------------------------------------------------------------
// Objects of a file source or target
//
// A file backup reads an S3 bucket of user uploads and a file restore writes
// one back: their keys are whatever the users' application chose (spaces,
// unicode, a trailing '/', "..", anything S3 allows), so nothing here goes
// through `validate_key`, which guards repository keys. Keys are relative to
// the prefix, as everywhere in this file. No retry layer wraps these calls:
// the caller retries what `StorageError::is_transient` says may succeed.
// Object Lock (`object_lock_days`) is the repository's and is not applied to
// these objects; the storage class is.
// ---------------------------------------------------------------------------

/// An object as a listing shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListedObject {
    /// Key relative to the S3's prefix (`""` for an object named exactly
    /// like the prefix, such as a folder marker).
    pub key: String,
    /// Size in bytes.
    pub size: u64,
    /// ETag without the surrounding quotes: identifies this version of the
    /// content (the MD5 of a single-part upload; something else for a
    /// multipart one, so not a checksum to verify bytes against).
    pub etag: String,
    /// When the object was last written, when the store says.
    pub last_modified: Option<chrono::DateTime<chrono::Utc>>,
}

/// Attributes that travel with an object's content (what a restore writes back).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct ObjectAttrs {
    /// `Content-Type`.
    pub content_type: Option<String>,
    /// `Content-Encoding`.
    pub content_encoding: Option<String>,
    /// `Content-Disposition`.
    pub content_disposition: Option<String>,
    /// `Content-Language`.
    pub content_language: Option<String>,
    /// `Cache-Control`.
    pub cache_control: Option<String>,
    /// User metadata: the `x-amz-meta-*` headers without that prefix. S3
    /// gives the names back lower-cased, and values travel as HTTP headers
    /// (ASCII).
    pub metadata: BTreeMap<String, String>,
}

/// What a HEAD says about an object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectDetails {
    /// Size in bytes.
    pub size: u64,
    /// ETag without the surrounding quotes (see [`ListedObject::etag`]).
    pub etag: String,
    /// When the object was last written, when the store says.
    pub last_modified: Option<chrono::DateTime<chrono::Utc>>,
    /// Content type, encoding, … and user metadata.
    pub attrs: ObjectAttrs,
}

/// [`ObjectDetails`] from a HEAD or GET response (the same accessors).
macro_rules! details_of {
    ($out:expr) => {{
        let out = &$out;
        let owned = |v: Option<&str>| v.map(str::to_owned);
        ObjectDetails {
            size: out.content_length().unwrap_or(0).max(0) as u64,
            etag: unquote(out.e_tag().unwrap_or_default()).to_owned(),
            last_modified: out.last_modified().and_then(to_chrono),
            attrs: ObjectAttrs {
                content_type: owned(out.content_type()),
                content_encoding: owned(out.content_encoding()),
                content_disposition: owned(out.content_disposition()),
                content_language: owned(out.content_language()),
                cache_control: owned(out.cache_control()),
                metadata: out
                    .metadata()
                    .map(|m| {
                        m.iter()
                            .map(|(k, v)| (k.to_ascii_lowercase(), v.clone()))
                            .collect()
                    })
                    .unwrap_or_default(),
            },
        }
    }};
}

/// Set the attributes of `$attrs` on a PutObject or CreateMultipartUpload
/// request (two builder types with the same setters and no common trait).
macro_rules! with_attrs {
    ($req:expr, $attrs:expr) => {{
        let attrs: &ObjectAttrs = $attrs;
        $req.set_content_type(attrs.content_type.clone())
            .set_content_encoding(attrs.content_encoding.clone())
            .set_content_disposition(attrs.content_disposition.clone())
            .set_content_language(attrs.content_language.clone())
            .set_cache_control(attrs.cache_control.clone())
            .set_metadata((!attrs.metadata.is_empty()).then(|| {
                attrs
                    .metadata
                    .iter()
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect::<HashMap<_, _>>()
            }))
    }};
}

impl S3 {
    /// The bucket's name.
    pub fn bucket(&self) -> &str {
        &self.bucket
    }

    /// The key prefix every key is relative to: `""` or ending in '/'.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// One page (ListObjectsV2, up to 1000 objects) of the objects whose key
    /// starts with `prefix` (relative to the S3's prefix; any string, `""`
    /// for all), recursively, in byte order of their keys; and the token of
    /// the next page, `None` on the last one.
    pub async fn list_objects(
        &self,
        prefix: &str,
        token: Option<&str>,
    ) -> Result<(Vec<ListedObject>, Option<String>), StorageError> {
        let out = self
            .client
            .list_objects_v2()
            .bucket(&self.bucket)
            .prefix(self.full_key(prefix))
            .set_continuation_token(token.map(str::to_owned))
            .send()
            .await
            .map_err(|e| self.classify("list", prefix, e))?;
        let objects = out
            .contents()
            .iter()
            .filter_map(|o| {
                Some(ListedObject {
                    key: o.key()?.strip_prefix(self.prefix.as_str())?.to_owned(),
                    size: o.size().unwrap_or(0).max(0) as u64,
                    etag: unquote(o.e_tag().unwrap_or_default()).to_owned(),
                    last_modified: o.last_modified().and_then(to_chrono),
                })
            })
            .collect();
        let next = if out.is_truncated().unwrap_or(false) {
            out.next_continuation_token().map(str::to_owned)
        } else {
            None
        };
        Ok((objects, next))
    }

    /// Size, ETag, time and attributes of the object (a HEAD); `None` when
    /// it does not exist.
    pub async fn object_details(&self, key: &str) -> Result<Option<ObjectDetails>, StorageError> {
        let out = match self
            .client
            .head_object()
            .bucket(&self.bucket)
            .key(self.full_key(key))
            .send()
            .await
        {
            Ok(out) => out,
            Err(e) => {
                return match self.classify("head", key, e) {
                    StorageError::NotFound { .. } => Ok(None),
                    other => Err(other),
                }
            }
        };
        Ok(Some(details_of!(out)))
    }

    /// The whole object and what its headers say, only if its ETag is
    /// still `etag` (one request: for small objects, where a HEAD and a
    /// ranged GET would be two). A replaced object is
    /// [`StorageError::Changed`], a deleted one `NotFound`.
    pub async fn get_object_if_match(
        &self,
        key: &str,
        etag: &str,
    ) -> Result<(ObjectDetails, Bytes), StorageError> {
        let etag = unquote(etag);
        let out = self
            .client
            .get_object()
            .bucket(&self.bucket)
            .key(self.full_key(key))
            .if_match(format!("\"{etag}\""))
            .send()
            .await;
        match out {
            Ok(out) => {
                let details = details_of!(out);
                if details.etag != etag {
                    return Err(self.changed(key));
                }
                let body = read_body(out.body)
                    .await
                    .map_err(|m| self.body_error(key, m))?;
                Ok((details, body))
            }
            Err(SdkError::ServiceError(se)) if se.raw().status().as_u16() == 412 => {
                Err(self.changed(key))
            }
            Err(e) => Err(self.classify("get", key, e)),
        }
    }

    /// `len` bytes from byte `start` of the object (fewer when it ends
    /// first), only if its ETag is still `etag` (quoted or not): the pieces
    /// of one object read this way all come from the same version.
    ///
    /// An object replaced since is [`StorageError::Changed`] (the store
    /// refused the `If-Match`, or answered with another ETag, for stores
    /// that ignore the header); a deleted one is [`StorageError::NotFound`].
    /// A range starting at the end is empty, one starting past it is
    /// [`StorageError::InvalidRange`]. `len` 0 is empty, without a request.
    pub async fn get_range_if_match(
        &self,
        key: &str,
        start: u64,
        len: u64,
        etag: &str,
    ) -> Result<Bytes, StorageError> {
        if len == 0 {
            return Ok(Bytes::new());
        }
        let etag = unquote(etag);
        let range = match start.checked_add(len - 1) {
            Some(last) => format!("bytes={start}-{last}"),
            None => format!("bytes={start}-"),
        };
        let out = self
            .client
            .get_object()
            .bucket(&self.bucket)
            .key(self.full_key(key))
            .range(range)
            .if_match(format!("\"{etag}\""))
            .send()
            .await;
        match out {
            Ok(out) => {
                if out.e_tag().is_some_and(|got| unquote(got) != etag) {
                    return Err(self.changed(key));
                }
                read_body(out.body)
                    .await
                    .map_err(|m| self.body_error(key, m))
            }
            Err(SdkError::ServiceError(se)) if se.raw().status().as_u16() == 412 => {
                Err(self.changed(key))
            }
            // S3 answers a range starting at or past the end with 416: the
            // object's size decides between "empty" and InvalidRange
            Err(SdkError::ServiceError(se)) if se.raw().status().as_u16() == 416 => {
                let details =
                    self.object_details(key)
                        .await?
                        .ok_or_else(|| StorageError::NotFound {
                            location: self.location(),
                            key: key.to_owned(),
                        })?;
                if details.etag != etag {
                    Err(self.changed(key))
                } else if start > details.size {
                    Err(StorageError::InvalidRange {
                        location: self.location(),
                        key: key.to_owned(),
                        start,
                        size: details.size,
                    })
                } else {
                    Ok(Bytes::new())
                }
            }
            Err(e) => Err(self.classify("get", key, e)),
        }
    }

    /// Store `data` under `key` with `attrs` and the configured storage
    /// class, replacing any object there, in one PutObject whatever the
    /// size (S3 takes up to 5 GiB in one request; use
    /// [`S3::start_multipart`] above that).
    pub async fn put_object_with(
        &self,
        key: &str,
        data: Bytes,
        attrs: &ObjectAttrs,
    ) -> Result<(), StorageError> {
        let req = self
            .client
            .put_object()
            .bucket(&self.bucket)
            .key(self.full_key(key))
            .set_storage_class(self.storage_class.clone());
        with_attrs!(req, attrs)
            .body(ByteStream::from(data))
            .send()
            .await
            .map(|_| ())
            .map_err(|e| self.classify("put", key, e))
    }

    /// Start a multipart upload to `key` carrying `attrs` and the configured
    /// storage class. Nothing is visible at `key` until
    /// [`MultipartUpload::complete`]; an upload dropped unfinished is aborted.
    pub async fn start_multipart(
        &self,
        key: &str,
        attrs: &ObjectAttrs,
    ) -> Result<MultipartUpload, StorageError> {
        let full_key = self.full_key(key);
        let req = self
            .client
            .create_multipart_upload()
            .bucket(&self.bucket)
            .key(&full_key)
            .set_storage_class(self.storage_class.clone());
        let created = with_attrs!(req, attrs)
            .send()
            .await
            .map_err(|e| self.classify("put", key, e))?;
        let upload_id = match created.upload_id() {
            Some(id) if !id.is_empty() => id.to_owned(),
            _ => {
                return Err(StorageError::Backend {
                    op: "put",
                    location: self.location(),
                    key: key.to_owned(),
                    transient: false,
                    message: format!(
                        "{} answered CreateMultipartUpload without an upload id: the store does \
                         not support multipart uploads; raise s3.multipart_threshold above the \
                         largest object",
                        self.endpoint
                    ),
                })
            }
        };
        Ok(MultipartUpload {
            s3: self.clone(),
            key: key.to_owned(),
            full_key,
            upload_id,
            parts: Mutex::new(BTreeMap::new()),
            finished: false,
        })
    }

    fn changed(&self, key: &str) -> StorageError {
        StorageError::Changed {
            location: self.location(),
            key: key.to_owned(),
        }
    }
}

/// A multipart upload in progress, from [`S3::start_multipart`]. Parts are
/// numbered from 1 (up to 10000), each but the last at least 5 MiB (S3
/// refuses smaller ones at completion); uploading a number again replaces
/// that part. Finish with [`MultipartUpload::complete`] or
/// [`MultipartUpload::abort`]; dropped unfinished (a failed or cancelled
/// task), it is aborted in the background so no invisible parts are left.
#[derive(Debug)]
pub struct MultipartUpload {
    s3: S3,
    /// Key relative to the prefix, for messages.
    key: String,
    full_key: String,
    upload_id: String,
    /// Uploaded parts by number: sorted and without duplicates, as
    /// CompleteMultipartUpload wants them.
    parts: Mutex<BTreeMap<i32, CompletedPart>>,
    /// Completed or aborted: nothing for `drop` to clean up.
    finished: bool,
}

impl MultipartUpload {
    /// Upload part `number` (1 to 10000). Several parts may be uploaded at
    /// once from several tasks.
    pub async fn upload_part(&self, number: i32, data: Bytes) -> Result<(), StorageError> {
        if !(1..=10_000).contains(&number) {
            return Err(StorageError::Backend {
                op: "put",
                location: self.s3.location(),
                key: self.key.clone(),
                transient: false,
                message: format!(
                    "part number {number} is outside 1..=10000 (an S3 limit): use larger parts"
                ),
            });
        }
        let out = self
            .s3
            .client
            .upload_part()
            .bucket(&self.s3.bucket)
            .key(&self.full_key)
            .upload_id(&self.upload_id)
            .part_number(number)
            .body(ByteStream::from(data))
            .send()
            .await
            .map_err(|e| self.s3.classify("put", &self.key, e))?;
        let part = CompletedPart::builder()
            .part_number(number)
            .set_e_tag(out.e_tag)
            .build();
        // a panic cannot leave the map half-updated: a poisoned lock is usable
        self.parts
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(number, part);
        Ok(())
    }

    /// Complete the upload: the object, made of the parts uploaded, becomes
    /// visible at once. On failure the upload is aborted.
    pub async fn complete(mut self) -> Result<(), StorageError> {
        let parts: Vec<CompletedPart> =
            std::mem::take(&mut *self.parts.lock().unwrap_or_else(PoisonError::into_inner))
                .into_values()
                .collect();
        let result = self
            .s3
            .client
            .complete_multipart_upload()
            .bucket(&self.s3.bucket)
            .key(&self.full_key)
            .upload_id(&self.upload_id)
            .multipart_upload(
                CompletedMultipartUpload::builder()
                    .set_parts(Some(parts))
                    .build(),
            )
            .send()
            .await
            .map(|_| ())
            .map_err(|e| self.s3.classify("put", &self.key, e));
        if result.is_err() {
            abort_upload(&self.s3, &self.key, &self.full_key, &self.upload_id).await;
        }
        self.finished = true;
        result
    }

    /// Abort the upload: the store drops the parts uploaded so far. Best
    /// effort: a failure is logged (the parts stay invisible, taking space
    /// until the bucket's lifecycle rule removes incomplete uploads).
    pub async fn abort(mut self) {
        abort_upload(&self.s3, &self.key, &self.full_key, &self.upload_id).await;
        self.finished = true;
    }
}

impl Drop for MultipartUpload {
    fn drop(&mut self) {
        if self.finished {
            return;
        }
        let (s3, key, full_key, upload_id) = (
            self.s3.clone(),
            std::mem::take(&mut self.key),
            std::mem::take(&mut self.full_key),
            std::mem::take(&mut self.upload_id),
        );
        match tokio::runtime::Handle::try_current() {
            Ok(rt) => {
                rt.spawn(async move { abort_upload(&s3, &key, &full_key, &upload_id).await });
            }
            Err(_) => tracing::warn!(
                bucket = %s3.bucket,
                key = %full_key,
                upload_id = %upload_id,
                "a multipart upload was dropped outside a tokio runtime and cannot be aborted: \
                 its parts take space until the bucket's lifecycle rule removes incomplete uploads"
            ),
        }
    }
}

/// Abort multipart upload `upload_id` of `full_key` (`key` relative to the
/// prefix), logging a failure: the caller has nothing better to do with it.
async fn abort_upload(s3: &S3, key: &str, full_key: &str, upload_id: &str) {
    let aborted = s3
        .client
        .abort_multipart_upload()
        .bucket(&s3.bucket)
        .key(full_key)
        .upload_id(upload_id)
        .send()
        .await;
    if let Err(e) = aborted {
        let e = s3.classify("abort upload", key, e);
        tracing::warn!(
            upload_id,
            "{e}; the parts uploaded stay invisible but take space until the bucket's \
             lifecycle rule removes incomplete multipart uploads"
        );
    }
}

/// An ETag without the double quotes S3 puts around it.
fn unquote(etag: &str) -> &str {
    etag.strip_prefix('"')
        .and_then(|e| e.strip_suffix('"'))
        .unwrap_or(etag)
}

fn to_chrono(t: &aws_smithy_types::DateTime) -> Option<chrono::DateTime<chrono::Utc>> {
    chrono::DateTime::from_timestamp(t.secs(), t.subsec_nanos())
}

/// The innermost cause of an error: "Connection refused (os error 111)" rather
/// than the SDK's nested wrappers.
fn root_cause(err: &(dyn std::error::Error + 'static)) -> String {
    let mut cur = err;
    while let Some(next) = cur.source() {
        cur = next;
    }
    cur.to_string()
}

async fn read_body(body: ByteStream) -> Result<Bytes, aws_smithy_types::byte_stream::error::Error> {
    body.collect().await.map(|b| b.into_bytes())
}
