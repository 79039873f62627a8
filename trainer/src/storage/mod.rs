//! Where a session reads and writes: one interface over object keys below a prefix URI,
//! so training and export code never care whether the bytes land on a local disk or in
//! S3. Keys are `/`-separated and relative to the prefix, like S3 object keys. Inputs
//! (`fetch`) may also come read-only from `https://` and `hf://`.

mod error;
pub mod fetch;
pub mod file;
pub mod hf;
pub mod https;
pub mod retry;
pub mod s3;
pub mod stats;

use std::path::Path;

use sha2::{Digest, Sha256};

pub use error::StorageError;
pub use fetch::Fetcher;
pub use file::FileStorage;
pub use s3::{S3Storage, TransferTuning};

/// One stored object, as `list` reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectInfo {
    /// The key relative to the storage prefix.
    pub key: String,
    pub size: u64,
}

/// What a transfer moved: its length and the SHA-256 of exactly those bytes, computed
/// while they streamed, so a manifest never hashes a different copy than the one written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transferred {
    pub bytes: u64,
    /// Lower-case hexadecimal.
    pub sha256: String,
}

/// A place holding objects under one prefix. Object-safe so the session picks the
/// backend at run time from its URI (`open_storage`).
pub trait Storage: Send + Sync + std::fmt::Debug {
    /// The full URI of `key` (with `key == ""`, the prefix itself, ending in `/`).
    fn uri(&self, key: &str) -> String;

    /// Uploads a local file; the object appears whole or not at all.
    fn put_file(&self, local: &Path, key: &str) -> Result<Transferred, StorageError>;

    /// Stores `bytes`; the object appears whole or not at all.
    fn put_bytes(&self, key: &str, bytes: &[u8]) -> Result<Transferred, StorageError>;

    /// Downloads `key` to `local` (parent folders created); `local` is written whole or
    /// not at all, so a failed download never leaves a partial file to be used later.
    fn get_to_file(&self, key: &str, local: &Path) -> Result<Transferred, StorageError>;

    /// Reads a whole object into memory (manifests, configs, small files).
    fn get_bytes(&self, key: &str) -> Result<Vec<u8>, StorageError>;

    /// Size of `key`, or `None` when there is no such object.
    fn stat(&self, key: &str) -> Result<Option<ObjectInfo>, StorageError>;

    fn exists(&self, key: &str) -> Result<bool, StorageError> {
        Ok(self.stat(key)?.is_some())
    }

    /// Every object whose key starts with `prefix` (a plain string prefix, as in S3:
    /// `samples/step_1` also matches `samples/step_10/0.png`), sorted by key.
    fn list(&self, prefix: &str) -> Result<Vec<ObjectInfo>, StorageError>;

    /// Removes `key`; removing a missing object is not an error (as in S3), so cleanup
    /// can be retried.
    fn delete(&self, key: &str) -> Result<(), StorageError>;

    /// Removes every object under a non-empty `prefix`; returns how many were removed.
    /// An empty prefix is refused so a bug cannot wipe a whole output location.
    fn delete_prefix(&self, prefix: &str) -> Result<usize, StorageError> {
        if prefix.is_empty() {
            return Err(StorageError::InvalidKey {
                key: prefix.to_string(),
                reason: "refusing to delete everything under the storage prefix",
            });
        }
        let objects = self.list(prefix)?;
        for object in &objects {
            self.delete(&object.key)?;
        }
        Ok(objects.len())
    }
}

/// How to reach object storage: the session's `spec.storage`, plus transfer tuning.
/// Unset fields fall back to the AWS default chain (`AWS_ENDPOINT_URL_S3`, `AWS_REGION`,
/// web identity, profile).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct StorageSettings {
    pub endpoint: Option<String>,
    pub region: Option<String>,
    pub force_path_style: bool,
    /// Fixed access keys for a local run or a test server; `None` (the norm, and always
    /// in a cluster) uses the default chain: env, web identity, profile.
    pub access_keys: Option<AccessKeys>,
    pub tuning: TransferTuning,
}

#[derive(Clone, PartialEq, Eq)]
pub struct AccessKeys {
    pub access_key_id: String,
    pub secret_access_key: String,
}

impl std::fmt::Debug for AccessKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print the secret, not even in a debug log.
        f.debug_struct("AccessKeys")
            .field("access_key_id", &self.access_key_id)
            .finish_non_exhaustive()
    }
}

impl From<&dreambooth_api::spec::Storage> for StorageSettings {
    fn from(spec: &dreambooth_api::spec::Storage) -> Self {
        StorageSettings {
            endpoint: spec.endpoint.clone(),
            region: spec.region.clone(),
            force_path_style: spec.force_path_style,
            access_keys: None,
            tuning: TransferTuning::default(),
        }
    }
}

/// Opens `uri` with default settings (see `open_storage_with`).
pub fn open_storage(uri: &str) -> Result<Box<dyn Storage>, StorageError> {
    open_storage_with(uri, &StorageSettings::default())
}

/// Opens the read-write storage a URI names: `file:///abs/path`, `file://./relative`
/// or `file://relative` (both relative to the current directory), or
/// `s3://bucket/prefix`. `https://` and `hf://` are read-only sources, refused here by
/// name so a user sees which URI is the problem.
pub fn open_storage_with(
    uri: &str,
    settings: &StorageSettings,
) -> Result<Box<dyn Storage>, StorageError> {
    let Some((scheme, rest)) = uri.split_once("://") else {
        return Err(StorageError::InvalidUri {
            uri: uri.to_string(),
            reason:
                "expected `file:///absolute/path`, `file://relative/path` or `s3://bucket/prefix`"
                    .into(),
        });
    };
    match scheme {
        "file" => {
            if rest.is_empty() {
                return Err(StorageError::InvalidUri {
                    uri: uri.to_string(),
                    reason: "no path after `file://`".into(),
                });
            }
            Ok(Box::new(FileStorage::new(rest).map_err(|source| {
                StorageError::InvalidUri {
                    uri: uri.to_string(),
                    reason: format!("cannot make the path absolute: {source}"),
                }
            })?))
        }
        "s3" => Ok(Box::new(S3Storage::open(uri, settings)?)),
        "http" | "https" => Err(StorageError::ReadOnly {
            uri: uri.to_string(),
            scheme: "https",
        }),
        "hf" => Err(StorageError::ReadOnly {
            uri: uri.to_string(),
            scheme: "hf",
        }),
        _ => Err(StorageError::InvalidUri {
            uri: uri.to_string(),
            reason: format!("unknown scheme `{scheme}`; use file:// or s3://"),
        }),
    }
}

/// Checks an object key: relative, `/`-separated, no empty, `.` or `..` segments, so a
/// key can never address anything outside the storage prefix.
pub fn validate_key(key: &str) -> Result<(), StorageError> {
    let invalid = |reason| {
        Err(StorageError::InvalidKey {
            key: key.to_string(),
            reason,
        })
    };
    if key.is_empty() {
        return invalid("the key is empty");
    }
    if key.ends_with('/') {
        return invalid("a key names an object, not a folder; it must not end in `/`");
    }
    validate_segments(key)
}

/// Like `validate_key` for a listing prefix: may be empty, may end in `/`, and its last
/// segment may be partial.
pub fn validate_prefix(prefix: &str) -> Result<(), StorageError> {
    match prefix.rsplit_once('/') {
        Some((folders, _)) => validate_segments(folders).map_err(|_| StorageError::InvalidKey {
            key: prefix.to_string(),
            reason: "prefix folders must be plain names (no empty, `.` or `..` segments)",
        }),
        None if prefix == "." || prefix == ".." => Err(StorageError::InvalidKey {
            key: prefix.to_string(),
            reason: "`.` and `..` are not allowed",
        }),
        None => check_characters(prefix),
    }
}

fn validate_segments(key: &str) -> Result<(), StorageError> {
    let invalid = |reason| {
        Err(StorageError::InvalidKey {
            key: key.to_string(),
            reason,
        })
    };
    if key.starts_with('/') {
        return invalid("keys are relative to the storage prefix; remove the leading `/`");
    }
    check_characters(key)?;
    for segment in key.split('/') {
        match segment {
            "" => return invalid("empty path segment (`//`)"),
            "." | ".." => return invalid("`.` and `..` segments are not allowed"),
            _ => {}
        }
    }
    Ok(())
}

fn check_characters(key: &str) -> Result<(), StorageError> {
    if key.contains('\\') || key.contains('\0') {
        return Err(StorageError::InvalidKey {
            key: key.to_string(),
            reason: "backslashes and NUL are not allowed; use `/` between segments",
        });
    }
    Ok(())
}

/// Running length and SHA-256 of a byte stream.
#[derive(Default)]
pub(crate) struct StreamHash {
    hasher: Sha256,
    bytes: u64,
}

impl StreamHash {
    pub(crate) fn update(&mut self, chunk: &[u8]) {
        self.hasher.update(chunk);
        self.bytes += chunk.len() as u64;
    }

    /// Bytes hashed so far.
    pub(crate) fn bytes(&self) -> u64 {
        self.bytes
    }

    pub(crate) fn finish(self) -> Transferred {
        Transferred {
            bytes: self.bytes,
            sha256: hex::encode(self.hasher.finalize()),
        }
    }
}

/// The SHA-256 of a byte slice, lower-case hex.
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_cannot_escape_the_prefix() {
        for bad in ["", "/abs", "a/../b", "..", "./a", "a//b", "a/", "a\\b"] {
            assert!(
                matches!(validate_key(bad), Err(StorageError::InvalidKey { .. })),
                "{bad:?} should be refused"
            );
        }
        for good in ["a", "samples/step_10/0.png", ".gitattributes", "a.b/c"] {
            validate_key(good).unwrap();
        }
    }

    #[test]
    fn prefixes_may_be_empty_partial_or_folders() {
        for good in ["", "samples/", "samples/step_1", "state"] {
            validate_prefix(good).unwrap();
        }
        for bad in ["/samples", "../x/", "a//b", "..", "a/../"] {
            assert!(validate_prefix(bad).is_err(), "{bad:?} should be refused");
        }
    }

    #[test]
    fn read_only_schemes_are_refused_as_outputs_naming_the_uri() {
        for uri in ["https://example.com/m.safetensors", "hf://org/repo"] {
            let err = open_storage(uri).unwrap_err();
            assert!(matches!(err, StorageError::ReadOnly { .. }), "{uri}");
            let message = err.to_string();
            assert!(message.contains(uri), "{message}");
            assert!(message.contains("read-only"), "{message}");
        }
    }

    #[test]
    fn strings_that_are_not_file_uris_are_refused() {
        for uri in ["/abs/path", "./out", "file://", "ftp://host/x"] {
            let err = open_storage(uri).unwrap_err();
            assert!(
                matches!(err, StorageError::InvalidUri { .. }),
                "{uri}: {err}"
            );
            assert!(err.to_string().contains(uri), "{err}");
        }
    }

    #[test]
    fn stream_hash_matches_a_one_shot_hash() {
        let mut hash = StreamHash::default();
        hash.update(b"hello ");
        hash.update(b"world");
        let done = hash.finish();
        assert_eq!(done.bytes, 11);
        assert_eq!(done.sha256, sha256_hex(b"hello world"));
        assert_eq!(
            done.sha256,
            "b94d27b9934d3e08a52e52d7da7dabfac484efe37a5380ee9088f7ace2efcde9"
        );
    }
}
