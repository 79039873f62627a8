//! `s3://bucket/prefix` storage on any S3-compatible service (AWS, MinIO, Ceph, R2).
//!
//! The trainer is synchronous, so the backend owns a small tokio runtime and blocks on
//! each call. The SDK's own retries are off: this module retries throttling, 5xx,
//! timeouts and dropped connections itself with exponential backoff, so every retry is
//! counted by kind in `stats`. Every object written carries its SHA-256 as user metadata
//! (`x-amz-meta-sha256`); reads check it after the transfer.

mod errors;
mod multipart;

use std::future::Future;
use std::io::Write;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use aws_config::BehaviorVersion;
use aws_config::meta::region::RegionProviderChain;
use aws_sdk_s3::Client;
use aws_sdk_s3::config::{
    Credentials, Region, RequestChecksumCalculation, ResponseChecksumValidation,
};
use aws_sdk_s3::primitives::ByteStream;
use aws_smithy_types::retry::RetryConfig;
use aws_smithy_types::timeout::TimeoutConfig;

use super::retry::{Failure, RetryPolicy, clock_jitter};
use super::{
    ObjectInfo, Storage, StorageError, StorageSettings, StreamHash, Transferred, stats,
    validate_key, validate_prefix,
};
pub(crate) use errors::classify;

/// The user-metadata key holding an object's SHA-256 (lower-case hex).
pub const SHA256_METADATA: &str = "sha256";

/// Used when neither the session nor the environment names a region; self-hosted
/// servers accept any.
const FALLBACK_REGION: &str = "us-east-1";

/// Transfer sizes and limits of the S3 backend.
#[derive(Debug, Clone, PartialEq)]
pub struct TransferTuning {
    pub retry: RetryPolicy,
    /// Files at least this large upload in parts.
    pub multipart_threshold: u64,
    /// Bytes per part (S3 wants at least 5 MiB for all parts but the last).
    pub part_size: u64,
    /// Parts in flight at once; memory held is about `part_size × concurrency`.
    pub concurrency: usize,
    pub connect_timeout: Duration,
    /// Longest silence while reading a response before the attempt counts as timed out.
    pub read_timeout: Duration,
}

impl Default for TransferTuning {
    fn default() -> Self {
        TransferTuning {
            retry: RetryPolicy::default(),
            multipart_threshold: 64 << 20,
            part_size: 16 << 20,
            concurrency: 4,
            connect_timeout: Duration::from_secs(5),
            read_timeout: Duration::from_secs(60),
        }
    }
}

/// What `head` learns about one object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RemoteObject {
    pub size: u64,
    pub etag: String,
    /// From `x-amz-meta-sha256`, when whoever wrote the object set it.
    pub sha256: Option<String>,
}

pub struct S3Storage {
    bucket: String,
    /// Empty or ending in `/`.
    prefix: String,
    client: Client,
    runtime: Arc<tokio::runtime::Runtime>,
    tuning: TransferTuning,
}

impl std::fmt::Debug for S3Storage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("S3Storage")
            .field("bucket", &self.bucket)
            .field("prefix", &self.prefix)
            .finish_non_exhaustive()
    }
}

/// Splits `s3://bucket/some/prefix` into the bucket and the key prefix (no leading `/`).
pub fn parse_s3_uri(uri: &str) -> Result<(String, String), StorageError> {
    let invalid = |reason: &str| StorageError::InvalidUri {
        uri: uri.to_string(),
        reason: reason.to_string(),
    };
    let rest = uri
        .strip_prefix("s3://")
        .ok_or_else(|| invalid("expected `s3://bucket/prefix`"))?;
    let (bucket, key) = rest.split_once('/').unwrap_or((rest, ""));
    let bucket_ok = (3..=63).contains(&bucket.len())
        && bucket
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.');
    if !bucket_ok {
        return Err(invalid(
            "the bucket name must be 3-63 lower-case letters, digits, `-` or `.`",
        ));
    }
    validate_prefix(key).map_err(|e| invalid(&e.to_string()))?;
    Ok((bucket.to_string(), key.to_string()))
}

impl S3Storage {
    /// Opens `s3://bucket/prefix` and checks that the bucket exists and is reachable,
    /// so a wrong bucket or endpoint fails before any training starts.
    pub fn open(uri: &str, settings: &StorageSettings) -> Result<Self, StorageError> {
        let (bucket, prefix) = parse_s3_uri(uri)?;
        let prefix = if prefix.is_empty() || prefix.ends_with('/') {
            prefix
        } else {
            format!("{prefix}/")
        };
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("s3-transfer")
            .enable_all()
            .build()
            .map_err(|e| StorageError::io(Path::new("<tokio runtime>"), "start", e))?;
        let client = runtime.block_on(make_client(settings));
        let storage = S3Storage {
            bucket,
            prefix,
            client,
            runtime: Arc::new(runtime),
            tuning: settings.tuning.clone(),
        };
        storage.check_bucket()?;
        Ok(storage)
    }

    pub fn bucket(&self) -> &str {
        &self.bucket
    }

    fn object_key(&self, key: &str) -> Result<String, StorageError> {
        validate_key(key)?;
        Ok(format!("{}{key}", self.prefix))
    }

    fn block_on<T>(&self, future: impl Future<Output = T>) -> T {
        self.runtime.block_on(future)
    }

    fn check_bucket(&self) -> Result<(), StorageError> {
        let uri = format!("s3://{}/", self.bucket);
        self.block_on(retrying(&self.tuning.retry, &uri, || async {
            self.client
                .head_bucket()
                .bucket(&self.bucket)
                .send()
                .await
                .map(|_| ())
                .map_err(|e| match classify(e, &uri, &self.bucket) {
                    // HEAD has no body, so a missing bucket is a bare 404.
                    Failure::Permanent(StorageError::NotFound { .. }) => {
                        Failure::Permanent(StorageError::NoSuchBucket {
                            uri: uri.clone(),
                            bucket: self.bucket.clone(),
                        })
                    }
                    other => other,
                })
        }))
    }

    /// Size, ETag and recorded SHA-256 of `key`, or `None` when it does not exist.
    pub fn head(&self, key: &str) -> Result<Option<RemoteObject>, StorageError> {
        let object_key = self.object_key(key)?;
        let uri = self.uri(key);
        self.block_on(retrying(&self.tuning.retry, &uri, || async {
            match self
                .client
                .head_object()
                .bucket(&self.bucket)
                .key(&object_key)
                .send()
                .await
            {
                Ok(head) => Ok(Some(RemoteObject {
                    size: head.content_length().unwrap_or(0).max(0) as u64,
                    etag: head.e_tag().unwrap_or("").trim_matches('"').to_string(),
                    sha256: head
                        .metadata()
                        .and_then(|m| m.get(SHA256_METADATA))
                        .map(|s| s.to_ascii_lowercase()),
                })),
                Err(e) => match classify(e, &uri, &self.bucket) {
                    Failure::Permanent(StorageError::NotFound { .. }) => Ok(None),
                    other => Err(other),
                },
            }
        }))
    }

    /// One `PutObject` of an in-memory body, tagged with its SHA-256.
    fn put_whole(&self, key: &str, body: &[u8]) -> Result<Transferred, StorageError> {
        let object_key = self.object_key(key)?;
        let uri = self.uri(key);
        let mut hash = StreamHash::default();
        hash.update(body);
        let done = hash.finish();
        // One buffer shared by every attempt, not a copy per retry.
        let body = bytes::Bytes::copy_from_slice(body);
        let started = Instant::now();
        self.block_on(retrying(&self.tuning.retry, &uri, || async {
            self.client
                .put_object()
                .bucket(&self.bucket)
                .key(&object_key)
                .content_length(body.len() as i64)
                .metadata(SHA256_METADATA, &done.sha256)
                .body(ByteStream::from(body.clone()))
                .send()
                .await
                .map(|_| ())
                .map_err(|e| classify(e, &uri, &self.bucket))
        }))?;
        stats::record_upload(done.bytes, started.elapsed());
        self.verify_written(key, &done)?;
        Ok(done)
    }

    /// Reads the object back by HEAD: the size and the recorded hash must be ours.
    fn verify_written(&self, key: &str, done: &Transferred) -> Result<(), StorageError> {
        let uri = self.uri(key);
        match self.head(key)? {
            Some(remote)
                if remote.size == done.bytes
                    && remote.sha256.as_deref() == Some(done.sha256.as_str()) =>
            {
                Ok(())
            }
            Some(remote) => Err(StorageError::ChecksumMismatch {
                uri,
                expected: format!("{} ({} bytes)", done.sha256, done.bytes),
                actual: format!(
                    "{} ({} bytes)",
                    remote.sha256.unwrap_or_else(|| "unrecorded".into()),
                    remote.size
                ),
            }
            .counted()),
            None => Err(StorageError::NotFound { location: uri }.counted()),
        }
    }

    /// Streams `key` into `out`, hashing; checks the hash against the recorded one.
    /// A body cut short or a mismatch is retried from the start.
    fn download(
        &self,
        key: &str,
        mut sink: impl FnMut() -> Result<Box<dyn Write + Send>, StorageError>,
    ) -> Result<Transferred, StorageError> {
        let object_key = self.object_key(key)?;
        let uri = self.uri(key);
        let started = Instant::now();
        let done = self.block_on(retrying(&self.tuning.retry, &uri, || {
            let out = sink();
            async {
                let mut out = out.map_err(Failure::Permanent)?;
                let response = self
                    .client
                    .get_object()
                    .bucket(&self.bucket)
                    .key(&object_key)
                    .send()
                    .await
                    .map_err(|e| classify(e, &uri, &self.bucket))?;
                let expected = response
                    .metadata()
                    .and_then(|m| m.get(SHA256_METADATA))
                    .map(|s| s.to_ascii_lowercase());
                let mut body = response.body;
                let mut hash = StreamHash::default();
                loop {
                    match body.try_next().await {
                        Ok(Some(chunk)) => {
                            out.write_all(&chunk).map_err(|e| {
                                Failure::Permanent(StorageError::io(
                                    Path::new(&uri),
                                    "write the download of",
                                    e,
                                ))
                            })?;
                            hash.update(&chunk);
                        }
                        Ok(None) => break,
                        Err(e) => {
                            return Err(Failure::Transient {
                                kind: "connection",
                                message: format!("reading the body: {e}"),
                            });
                        }
                    }
                }
                out.flush().map_err(|e| {
                    Failure::Permanent(StorageError::io(Path::new(&uri), "write", e))
                })?;
                let done = hash.finish();
                match expected {
                    Some(expected) if expected != done.sha256 => Err(Failure::Transient {
                        kind: "checksum",
                        message: format!("sha256 is {}, expected {expected}", done.sha256),
                    }),
                    _ => Ok(done),
                }
            }
        }))?;
        stats::record_download(done.bytes, started.elapsed());
        Ok(done)
    }
}

async fn make_client(settings: &StorageSettings) -> Client {
    let region = RegionProviderChain::first_try(settings.region.clone().map(Region::new))
        .or_default_provider()
        .or_else(Region::new(FALLBACK_REGION));
    let mut loader = aws_config::defaults(BehaviorVersion::latest()).region(region);
    if let Some(endpoint) = &settings.endpoint {
        loader = loader.endpoint_url(endpoint);
    }
    if let Some(keys) = &settings.access_keys {
        loader = loader.credentials_provider(Credentials::new(
            &keys.access_key_id,
            &keys.secret_access_key,
            None,
            None,
            "dreambooth-settings",
        ));
    }
    let shared = loader.load().await;
    let tuning = &settings.tuning;
    let config = aws_sdk_s3::config::Builder::from(&shared)
        .force_path_style(settings.force_path_style)
        .retry_config(RetryConfig::disabled())
        .timeout_config(
            TimeoutConfig::builder()
                .connect_timeout(tuning.connect_timeout)
                .read_timeout(tuning.read_timeout)
                .build(),
        )
        // Our own SHA-256 metadata is the integrity check; the SDK's default CRC
        // trailers are not understood by every S3-compatible server.
        .request_checksum_calculation(RequestChecksumCalculation::WhenRequired)
        .response_checksum_validation(ResponseChecksumValidation::WhenRequired)
        .build();
    Client::from_conf(config)
}

/// Runs `attempt` until it succeeds, fails permanently, or `policy` runs out; waits
/// with backoff between attempts and counts each retry and the final error.
pub(crate) async fn retrying<T, F, Fut>(
    policy: &RetryPolicy,
    uri: &str,
    mut attempt: F,
) -> Result<T, StorageError>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, Failure<StorageError>>>,
{
    let mut tries = 1;
    loop {
        match attempt().await {
            Ok(value) => return Ok(value),
            Err(Failure::Permanent(error)) => return Err(error.counted()),
            Err(Failure::Transient { kind, message }) => {
                if tries >= policy.max_attempts {
                    return Err(StorageError::Unavailable {
                        uri: uri.to_string(),
                        attempts: tries,
                        message,
                    }
                    .counted());
                }
                stats::record_retry(kind);
                let wait = policy.delay(tries, clock_jitter());
                tracing::warn!(%uri, kind, %message, attempt = tries, "retrying in {wait:?}");
                tokio::time::sleep(wait).await;
                tries += 1;
            }
        }
    }
}

impl Storage for S3Storage {
    fn uri(&self, key: &str) -> String {
        format!("s3://{}/{}{key}", self.bucket, self.prefix)
    }

    fn put_file(&self, local: &Path, key: &str) -> Result<Transferred, StorageError> {
        let size = std::fs::metadata(local)
            .map_err(|e| StorageError::io(local, "inspect", e).counted())?
            .len();
        if size < self.tuning.multipart_threshold {
            let body = std::fs::read(local).map_err(|e| StorageError::io(local, "read", e))?;
            return self.put_whole(key, &body);
        }
        let object_key = self.object_key(key)?;
        let done = multipart::upload(self, local, &object_key, &self.uri(key))?;
        self.verify_written(key, &done)?;
        Ok(done)
    }

    fn put_bytes(&self, key: &str, bytes: &[u8]) -> Result<Transferred, StorageError> {
        self.put_whole(key, bytes)
    }

    fn get_to_file(&self, key: &str, local: &Path) -> Result<Transferred, StorageError> {
        let dir = local.parent().unwrap_or(Path::new("."));
        std::fs::create_dir_all(dir).map_err(|e| StorageError::io(dir, "create the folder", e))?;
        let name = local
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let mut temp = None;
        let done = self.download(key, || {
            // A fresh temp file per attempt, so a retry never appends to a partial one.
            let file = tempfile::Builder::new()
                .prefix(&format!(".{name}."))
                .suffix(".partial")
                .tempfile_in(dir)
                .map_err(|e| StorageError::io(dir, "create a temp file in", e))?;
            let handle = file
                .reopen()
                .map_err(|e| StorageError::io(file.path(), "open", e))?;
            temp = Some(file);
            Ok(Box::new(std::io::BufWriter::with_capacity(1 << 20, handle)))
        })?;
        let temp = temp.expect("a download opens its temp file first");
        temp.as_file()
            .sync_all()
            .map_err(|e| StorageError::io(temp.path(), "fsync", e))?;
        temp.persist(local)
            .map_err(|e| StorageError::io(local, "rename the temp file onto", e.error))?;
        Ok(done)
    }

    fn get_bytes(&self, key: &str) -> Result<Vec<u8>, StorageError> {
        let buffer = Arc::new(std::sync::Mutex::new(Vec::new()));
        self.download(key, || {
            buffer.lock().expect("buffer lock").clear();
            Ok(Box::new(SharedBuffer(buffer.clone())))
        })?;
        let bytes = std::mem::take(&mut *buffer.lock().expect("buffer lock"));
        Ok(bytes)
    }

    fn stat(&self, key: &str) -> Result<Option<ObjectInfo>, StorageError> {
        Ok(self.head(key)?.map(|remote| ObjectInfo {
            key: key.to_string(),
            size: remote.size,
        }))
    }

    fn list(&self, prefix: &str) -> Result<Vec<ObjectInfo>, StorageError> {
        validate_prefix(prefix)?;
        let full = format!("{}{prefix}", self.prefix);
        let uri = self.uri(prefix);
        let mut objects = Vec::new();
        let mut token: Option<String> = None;
        loop {
            let page = self.block_on(retrying(&self.tuning.retry, &uri, || async {
                self.client
                    .list_objects_v2()
                    .bucket(&self.bucket)
                    .prefix(&full)
                    .set_continuation_token(token.clone())
                    .send()
                    .await
                    .map_err(|e| classify(e, &uri, &self.bucket))
            }))?;
            for object in page.contents() {
                let Some(key) = object.key().and_then(|k| k.strip_prefix(&self.prefix)) else {
                    continue;
                };
                objects.push(ObjectInfo {
                    key: key.to_string(),
                    size: object.size().unwrap_or(0).max(0) as u64,
                });
            }
            token = page.next_continuation_token().map(str::to_string);
            if token.is_none() {
                break;
            }
        }
        objects.sort_by(|a, b| a.key.cmp(&b.key));
        Ok(objects)
    }

    fn delete(&self, key: &str) -> Result<(), StorageError> {
        let object_key = self.object_key(key)?;
        let uri = self.uri(key);
        self.block_on(retrying(&self.tuning.retry, &uri, || async {
            self.client
                .delete_object()
                .bucket(&self.bucket)
                .key(&object_key)
                .send()
                .await
                .map(|_| ())
                .map_err(|e| classify(e, &uri, &self.bucket))
        }))
    }
}

/// A `Write` into a shared vector, so a retried in-memory download can start over.
struct SharedBuffer(Arc<std::sync::Mutex<Vec<u8>>>);

impl Write for SharedBuffer {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().expect("buffer lock").extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn s3_uris_split_into_bucket_and_prefix() {
        assert_eq!(
            parse_s3_uri("s3://my-bucket/runs/anna").unwrap(),
            ("my-bucket".into(), "runs/anna".into())
        );
        assert_eq!(
            parse_s3_uri("s3://my.bucket").unwrap(),
            ("my.bucket".into(), String::new())
        );
        for bad in [
            "s3://",
            "s3://UPPER/x",
            "s3://ab/x",
            "s3://b_b/x",
            "s3://bkt/a//b/",
        ] {
            let err = parse_s3_uri(bad).unwrap_err();
            assert!(err.to_string().contains(bad), "{err}");
        }
    }
}
