//! Multipart upload of a large local file: parts read straight from the file and sent
//! with at most `concurrency` in flight, so memory stays near `part_size × concurrency`
//! whatever the file's size. A failed upload is aborted, so no half object and no
//! orphaned parts are left behind (the object simply does not appear).

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use aws_sdk_s3::primitives::ByteStream;
use aws_sdk_s3::types::{CompletedMultipartUpload, CompletedPart};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

use super::{S3Storage, SHA256_METADATA, classify, retrying};
use crate::storage::{StorageError, StreamHash, Transferred, stats};

/// S3 allows at most this many parts in one upload.
const MAX_PARTS: u64 = 10_000;

/// Uploads `local` to `object_key` in parts; returns its length and SHA-256 (hashed in a
/// first pass, since parts go out of order, and recorded as the object's metadata).
pub(super) fn upload(
    storage: &S3Storage,
    local: &Path,
    object_key: &str,
    uri: &str,
) -> Result<Transferred, StorageError> {
    let done = hash_file(local)?;
    // Very large files get bigger parts, to stay under the part-count limit.
    let part_size = storage
        .tuning
        .part_size
        .max(done.bytes.div_ceil(MAX_PARTS))
        .max(5 << 20);
    let started = Instant::now();
    storage.block_on(async {
        let upload_id = retrying(&storage.tuning.retry, uri, || async {
            storage
                .client
                .create_multipart_upload()
                .bucket(&storage.bucket)
                .key(object_key)
                .metadata(SHA256_METADATA, &done.sha256)
                .send()
                .await
                .map_err(|e| classify(e, uri, &storage.bucket))
        })
        .await?
        .upload_id()
        .ok_or_else(|| StorageError::Rejected {
            uri: uri.to_string(),
            message: "the server started a multipart upload without an upload id".into(),
        })?
        .to_string();
        let parts = send_parts(
            storage, local, object_key, uri, &upload_id, part_size, done.bytes,
        )
        .await;
        let result = match parts {
            Ok(parts) => match complete(storage, object_key, uri, &upload_id, parts).await {
                // A retried completion whose first try had succeeded finds no upload;
                // the HEAD check after the upload tells whether the object is whole.
                Err(StorageError::NotFound { .. }) => Ok(()),
                other => other,
            },
            Err(error) => Err(error),
        };
        if result.is_err() {
            // Best effort: the server may be the thing that failed.
            let _ = storage
                .client
                .abort_multipart_upload()
                .bucket(&storage.bucket)
                .key(object_key)
                .upload_id(&upload_id)
                .send()
                .await;
        }
        result
    })?;
    stats::record_upload(done.bytes, started.elapsed());
    Ok(done)
}

fn hash_file(local: &Path) -> Result<Transferred, StorageError> {
    let mut file = File::open(local).map_err(|e| StorageError::io(local, "open", e))?;
    let mut hash = StreamHash::default();
    let mut buffer = vec![0u8; 1 << 20];
    loop {
        let n = std::io::Read::read(&mut file, &mut buffer)
            .map_err(|e| StorageError::io(local, "read", e))?;
        if n == 0 {
            break;
        }
        hash.update(&buffer[..n]);
    }
    Ok(hash.finish())
}

async fn send_parts(
    storage: &S3Storage,
    local: &Path,
    object_key: &str,
    uri: &str,
    upload_id: &str,
    part_size: u64,
    size: u64,
) -> Result<Vec<CompletedPart>, StorageError> {
    let file = Arc::new(File::open(local).map_err(|e| StorageError::io(local, "open", e))?);
    let slots = Arc::new(Semaphore::new(storage.tuning.concurrency.max(1)));
    let mut running = JoinSet::new();
    let mut parts = Vec::new();
    let count = size.div_ceil(part_size).max(1);
    for index in 0..count {
        // Waiting for a slot before reading keeps at most `concurrency` parts in memory.
        let slot = slots.clone().acquire_owned().await.expect("semaphore open");
        while let Some(finished) = running.try_join_next() {
            parts.push(joined(finished)?);
        }
        let offset = index * part_size;
        let length = part_size.min(size - offset) as usize;
        let (client, bucket, key, upload_id, uri, file, policy, path) = (
            storage.client.clone(),
            storage.bucket.clone(),
            object_key.to_string(),
            upload_id.to_string(),
            uri.to_string(),
            file.clone(),
            storage.tuning.retry,
            local.to_path_buf(),
        );
        running.spawn(async move {
            let _slot = slot;
            let mut body = vec![0u8; length];
            file.read_exact_at(&mut body, offset)
                .map_err(|e| StorageError::io(&path, "read", e))?;
            // One buffer shared by every retry of the part, not a copy per attempt.
            let body = bytes::Bytes::from(body);
            let number = (index + 1) as i32;
            let part = retrying(&policy, &uri, || async {
                client
                    .upload_part()
                    .bucket(&bucket)
                    .key(&key)
                    .upload_id(&upload_id)
                    .part_number(number)
                    .content_length(length as i64)
                    .body(ByteStream::from(body.clone()))
                    .send()
                    .await
                    .map_err(|e| classify(e, &uri, &bucket))
            })
            .await?;
            Ok(CompletedPart::builder()
                .part_number(number)
                .set_e_tag(part.e_tag().map(str::to_string))
                .build())
        });
    }
    while let Some(finished) = running.join_next().await {
        parts.push(joined(finished)?);
    }
    parts.sort_by_key(|p| p.part_number());
    Ok(parts)
}

fn joined(
    finished: Result<Result<CompletedPart, StorageError>, tokio::task::JoinError>,
) -> Result<CompletedPart, StorageError> {
    finished.unwrap_or_else(|e| {
        Err(StorageError::io(
            Path::new("<upload task>"),
            "finish",
            std::io::Error::other(e.to_string()),
        ))
    })
}

async fn complete(
    storage: &S3Storage,
    object_key: &str,
    uri: &str,
    upload_id: &str,
    parts: Vec<CompletedPart>,
) -> Result<(), StorageError> {
    let upload = CompletedMultipartUpload::builder()
        .set_parts(Some(parts))
        .build();
    retrying(&storage.tuning.retry, uri, || async {
        storage
            .client
            .complete_multipart_upload()
            .bucket(&storage.bucket)
            .key(object_key)
            .upload_id(upload_id)
            .multipart_upload(upload.clone())
            .send()
            .await
            .map(|_| ())
            .map_err(|e| classify(e, uri, &storage.bucket))
    })
    .await
}
