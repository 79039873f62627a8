//! What can go wrong with storage, split the way the operator must act on it: retrying
//! helps for an unreachable or throttled service and a local I/O hiccup; it cannot help
//! for a wrong URI, missing object, refused credentials or a bad checksum pin.

use std::io;
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    #[error("`{uri}` is not a storage URI: {reason}")]
    InvalidUri { uri: String, reason: String },
    #[error("{key:?} is not a valid object key: {reason}")]
    InvalidKey { key: String, reason: &'static str },
    #[error("{location}: no such object")]
    NotFound { location: String },
    #[error("{uri}: the bucket `{bucket}` does not exist")]
    NoSuchBucket { uri: String, bucket: String },
    #[error("{uri}: access denied ({message}); check the credentials and the bucket policy")]
    AccessDenied { uri: String, message: String },
    #[error("{uri}: {message}")]
    Rejected { uri: String, message: String },
    /// Unreachable, timing out, throttled or failing with 5xx past the retries.
    #[error("{uri}: storage unavailable after {attempts} attempt(s): {message}")]
    Unavailable {
        uri: String,
        attempts: u32,
        message: String,
    },
    #[error("{uri}: sha256 is {actual}, expected {expected}")]
    ChecksumMismatch {
        uri: String,
        expected: String,
        actual: String,
    },
    #[error("{uri}: larger than the limit of {limit} bytes")]
    TooLarge { uri: String, limit: u64 },
    #[error("{uri}: {scheme}:// storage is read-only")]
    ReadOnly { uri: String, scheme: &'static str },
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

    /// Whether a later attempt may succeed where this one failed: the operator retries
    /// these (exit code 75) and the run resumes from its latest state.
    pub fn is_retriable(&self) -> bool {
        matches!(
            self,
            StorageError::Unavailable { .. } | StorageError::Io { .. }
        )
    }

    /// The label this error counts under in `stats` and the metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            StorageError::InvalidUri { .. } | StorageError::InvalidKey { .. } => "invalid",
            StorageError::NotFound { .. } => "not_found",
            StorageError::NoSuchBucket { .. } => "no_such_bucket",
            StorageError::AccessDenied { .. } => "access_denied",
            StorageError::Rejected { .. } => "rejected",
            StorageError::Unavailable { .. } => "unavailable",
            StorageError::ChecksumMismatch { .. } => "checksum",
            StorageError::TooLarge { .. } => "too_large",
            StorageError::ReadOnly { .. } => "read_only",
            StorageError::Io { .. } => "io",
        }
    }

    pub(crate) fn io(path: &Path, action: &'static str, source: io::Error) -> Self {
        StorageError::Io {
            path: path.to_path_buf(),
            action,
            source,
        }
    }

    /// Counts this error in `stats` and hands it back, for `map_err` chains. A missing
    /// object is not counted: most lookups expect that answer (is there a manifest, a
    /// state to resume?), and the session reports a missing input as its own failure.
    pub(crate) fn counted(self) -> Self {
        if !matches!(self, StorageError::NotFound { .. }) {
            super::stats::record_error(self.kind());
        }
        self
    }
}
