//! Where a session reads and writes: one interface over object keys below a prefix URI,
//! so training and export code never care whether the bytes land on a local disk or,
//! later, in S3. Keys are `/`-separated and relative to the prefix, like S3 object keys.

pub mod file;

use std::io;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

pub use file::FileStorage;

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

#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    #[error("`{uri}`: {scheme}:// storage is not supported yet; use a file:// URI")]
    Unsupported { uri: String, scheme: String },
    #[error("`{uri}` is not a storage URI: {reason}")]
    InvalidUri { uri: String, reason: String },
    #[error("{key:?} is not a valid object key: {reason}")]
    InvalidKey { key: String, reason: &'static str },
    #[error("{location}: no such object")]
    NotFound { location: String },
    #[error("{path}: cannot {action}: {source}")]
    Io {
        path: PathBuf,
        action: &'static str,
        source: io::Error,
    },
}

impl StorageError {
    pub fn is_not_found(&self) -> bool {
        matches!(self, StorageError::NotFound { .. })
    }

    pub(crate) fn io(path: &Path, action: &'static str, source: io::Error) -> Self {
        StorageError::Io {
            path: path.to_path_buf(),
            action,
            source,
        }
    }
}

/// Opens the storage a URI names: `file:///abs/path`, `file://./relative` or
/// `file://relative` (both relative to the current directory). Other schemes the
/// session format knows (`s3://`, `https://`, `hf://`) are refused by name until their
/// backends exist, so a user sees which URI is the problem rather than a parse error.
pub fn open_storage(uri: &str) -> Result<Box<dyn Storage>, StorageError> {
    let Some((scheme, rest)) = uri.split_once("://") else {
        return Err(StorageError::InvalidUri {
            uri: uri.to_string(),
            reason: "expected `file:///absolute/path` or `file://relative/path`".into(),
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
        "s3" | "http" | "https" | "hf" => Err(StorageError::Unsupported {
            uri: uri.to_string(),
            scheme: scheme.to_string(),
        }),
        _ => Err(StorageError::InvalidUri {
            uri: uri.to_string(),
            reason: format!("unknown scheme `{scheme}`; use file://"),
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
    fn unsupported_schemes_name_the_uri() {
        for uri in [
            "s3://bucket/anna",
            "https://example.com/m.safetensors",
            "hf://org/repo",
        ] {
            let err = open_storage(uri).unwrap_err();
            assert!(matches!(err, StorageError::Unsupported { .. }), "{uri}");
            let message = err.to_string();
            assert!(message.contains(uri), "{message}");
            assert!(message.contains("not supported yet"), "{message}");
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
