//! Inputs as local paths: the dataset, the base model and class images may live at any
//! URI the session accepts; training code wants files. `Fetcher` downloads remote inputs
//! into a cache folder (`--cache-dir`, else a temp dir) and hands back the local path,
//! reusing a cached copy when its size and SHA-256 still match the source.

use std::collections::BTreeSet;
use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::s3::{RemoteObject, S3Storage, parse_s3_uri};
use super::{Storage, StorageError, StorageSettings, StreamHash, Transferred, hf, https};

/// Sidecar records of cached S3 objects live apart from the files, so a cached dataset
/// folder holds exactly the dataset's files.
const RECORDS_DIR: &str = ".records";

pub struct Fetcher {
    root: PathBuf,
    /// Holds a default temp cache alive (and deletes it) for the fetcher's lifetime.
    _temp: Option<tempfile::TempDir>,
    settings: StorageSettings,
    https: https::HttpsOptions,
}

impl std::fmt::Debug for Fetcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Fetcher").field("root", &self.root).finish()
    }
}

/// What `record` remembers of a cached S3 object.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct CacheRecord {
    size: u64,
    etag: String,
    sha256: String,
}

impl Fetcher {
    /// A fetcher caching under `cache_dir` (created if missing), or under a fresh temp
    /// folder removed when the fetcher is dropped.
    pub fn new(cache_dir: Option<&Path>, settings: StorageSettings) -> Result<Self, StorageError> {
        let (root, temp) = match cache_dir {
            Some(dir) => {
                fs::create_dir_all(dir)
                    .map_err(|e| StorageError::io(dir, "create the cache folder", e))?;
                let root = std::path::absolute(dir)
                    .map_err(|e| StorageError::io(dir, "resolve the cache folder", e))?;
                (root, None)
            }
            None => {
                let temp = tempfile::Builder::new()
                    .prefix("dreambooth-cache-")
                    .tempdir()
                    .map_err(|e| StorageError::io(&std::env::temp_dir(), "create a cache in", e))?;
                (temp.path().to_path_buf(), Some(temp))
            }
        };
        Ok(Fetcher {
            root,
            _temp: temp,
            settings,
            https: https::HttpsOptions::default(),
        })
    }

    /// Replaces the limits for `https://` downloads.
    pub fn with_https_options(mut self, options: https::HttpsOptions) -> Self {
        self.https = options;
        self
    }

    pub fn cache_dir(&self) -> &Path {
        &self.root
    }

    /// A local file or folder holding what `uri` names. `file://` paths are used where
    /// they are; `s3://` a single object or every object under a prefix; `https://` one
    /// file; `hf://org/repo[@revision]` the files of a diffusers folder. With `sha256`,
    /// a single file must hash to it or it is refused (and not kept in the cache).
    pub fn fetch(&self, uri: &str, sha256: Option<&str>) -> Result<PathBuf, StorageError> {
        let scheme = uri.split_once("://").map(|(s, _)| s).unwrap_or("");
        let path = match scheme {
            "file" => local_file(uri)?,
            "s3" => self.fetch_s3(uri)?,
            "http" | "https" => {
                let folder = self.root.join("https").join(short_hash(uri));
                return https::download_cached(uri, &folder, sha256, &self.https);
            }
            "hf" => hf::fetch_diffusers(uri, &self.root.join("hf"))?,
            _ => {
                return Err(StorageError::InvalidUri {
                    uri: uri.to_string(),
                    reason: "expected file://, s3://, https:// or hf://".into(),
                });
            }
        };
        if let Some(expected) = sha256 {
            check_pin(uri, &path, expected)?;
        }
        Ok(path)
    }

    fn fetch_s3(&self, uri: &str) -> Result<PathBuf, StorageError> {
        let (bucket, key) = parse_s3_uri(uri)?;
        let store = S3Storage::open(&format!("s3://{bucket}"), &self.settings)?;
        let local_root = self.root.join("s3").join(&bucket);
        let records = self.root.join(RECORDS_DIR).join("s3").join(&bucket);
        if !key.is_empty()
            && !key.ends_with('/')
            && let Some(remote) = store.head(&key)?
        {
            self.fetch_object(&store, &key, &remote, &local_root, &records)?;
            return Ok(join_key(&local_root, &key));
        }
        let folder = if key.is_empty() || key.ends_with('/') {
            key.clone()
        } else {
            format!("{key}/")
        };
        let listed = store.list(&folder)?;
        if listed.is_empty() {
            return Err(StorageError::NotFound {
                location: uri.to_string(),
            }
            .counted());
        }
        let mut wanted = BTreeSet::new();
        for object in &listed {
            let remote = store
                .head(&object.key)?
                .ok_or_else(|| StorageError::NotFound {
                    location: store.uri(&object.key),
                })?;
            self.fetch_object(&store, &object.key, &remote, &local_root, &records)?;
            wanted.insert(join_key(&local_root, &object.key));
        }
        let local_folder = join_key(&local_root, folder.trim_end_matches('/'));
        remove_unlisted(&local_folder, &wanted)?;
        Ok(local_folder)
    }

    /// Downloads one object unless the cache already holds the same bytes.
    fn fetch_object(
        &self,
        store: &S3Storage,
        key: &str,
        remote: &RemoteObject,
        local_root: &Path,
        records: &Path,
    ) -> Result<(), StorageError> {
        let local = join_key(local_root, key);
        let record_path = join_key(records, &format!("{key}.json"));
        if cached_copy_matches(&local, &record_path, remote) {
            tracing::debug!("{}: using the cached copy", store.uri(key));
            return Ok(());
        }
        let done = store.get_to_file(key, &local)?;
        let record = CacheRecord {
            size: done.bytes,
            etag: remote.etag.clone(),
            sha256: done.sha256,
        };
        if let Some(dir) = record_path.parent() {
            fs::create_dir_all(dir).map_err(|e| StorageError::io(dir, "create the folder", e))?;
        }
        let json = serde_json::to_vec(&record).expect("a cache record serialises");
        fs::write(&record_path, json).map_err(|e| StorageError::io(&record_path, "write", e))?;
        Ok(())
    }
}

/// The cached file is the remote object when sizes and ETags agree with the record, the
/// remote's recorded SHA-256 (if any) agrees, and the file still hashes to the record.
fn cached_copy_matches(local: &Path, record_path: &Path, remote: &RemoteObject) -> bool {
    let Ok(json) = fs::read(record_path) else {
        return false;
    };
    let Ok(record) = serde_json::from_slice::<CacheRecord>(&json) else {
        return false;
    };
    let same_source = record.size == remote.size
        && record.etag == remote.etag
        && remote
            .sha256
            .as_ref()
            .is_none_or(|sha| *sha == record.sha256);
    same_source
        && hash_file(local)
            .is_ok_and(|local| local.bytes == record.size && local.sha256 == record.sha256)
}

/// `file:///abs` and `file://relative` as a path; the path must exist.
fn local_file(uri: &str) -> Result<PathBuf, StorageError> {
    let path = uri.strip_prefix("file://").unwrap_or(uri);
    if path.is_empty() {
        return Err(StorageError::InvalidUri {
            uri: uri.to_string(),
            reason: "no path after `file://`".into(),
        });
    }
    let path = std::path::absolute(path).map_err(|e| StorageError::InvalidUri {
        uri: uri.to_string(),
        reason: format!("cannot make the path absolute: {e}"),
    })?;
    if !path.exists() {
        return Err(StorageError::NotFound {
            location: uri.to_string(),
        }
        .counted());
    }
    Ok(path)
}

fn check_pin(uri: &str, path: &Path, expected: &str) -> Result<(), StorageError> {
    if path.is_dir() {
        return Err(StorageError::InvalidUri {
            uri: uri.to_string(),
            reason: "a sha256 pin applies to a single file, but this is a folder".into(),
        });
    }
    let actual = hash_file(path)?.sha256;
    if !actual.eq_ignore_ascii_case(expected) {
        return Err(StorageError::ChecksumMismatch {
            uri: uri.to_string(),
            expected: expected.to_ascii_lowercase(),
            actual,
        }
        .counted());
    }
    Ok(())
}

/// Deletes files under `folder` that the listing no longer has, so a cached dataset
/// is exactly the remote one.
fn remove_unlisted(folder: &Path, wanted: &BTreeSet<PathBuf>) -> Result<(), StorageError> {
    let mut stack = vec![folder.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let Ok(entries) = fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            if path.is_dir() {
                stack.push(path);
            } else if !wanted.contains(&path) {
                fs::remove_file(&path).map_err(|e| StorageError::io(&path, "remove", e))?;
            }
        }
    }
    Ok(())
}

pub(crate) fn join_key(root: &Path, key: &str) -> PathBuf {
    key.split('/')
        .filter(|s| !s.is_empty())
        .fold(root.to_path_buf(), |p, s| p.join(s))
}

pub(crate) fn hash_file(path: &Path) -> Result<Transferred, StorageError> {
    let mut file = fs::File::open(path).map_err(|e| StorageError::io(path, "open", e))?;
    let mut hash = StreamHash::default();
    let mut buffer = vec![0u8; 1 << 20];
    loop {
        let n = file
            .read(&mut buffer)
            .map_err(|e| StorageError::io(path, "read", e))?;
        if n == 0 {
            return Ok(hash.finish());
        }
        hash.update(&buffer[..n]);
    }
}

/// A short, stable folder name for a URL.
fn short_hash(text: &str) -> String {
    super::sha256_hex(text.as_bytes())[..16].to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_uris_are_used_in_place_and_pins_are_checked() {
        let dir = tempfile::tempdir().unwrap();
        let model = dir.path().join("m.safetensors");
        fs::write(&model, b"weights").unwrap();
        let fetcher =
            Fetcher::new(Some(&dir.path().join("cache")), StorageSettings::default()).unwrap();
        let uri = format!("file://{}", model.display());
        assert_eq!(fetcher.fetch(&uri, None).unwrap(), model);
        let good = super::super::sha256_hex(b"weights");
        assert_eq!(fetcher.fetch(&uri, Some(&good)).unwrap(), model);
        let err = fetcher.fetch(&uri, Some(&"0".repeat(64))).unwrap_err();
        assert!(
            matches!(err, StorageError::ChecksumMismatch { .. }),
            "{err}"
        );
        assert!(err.to_string().contains(&uri), "{err}");

        let missing = format!("file://{}/nothing", dir.path().display());
        let err = fetcher.fetch(&missing, None).unwrap_err();
        assert!(
            err.is_not_found() && err.to_string().contains(&missing),
            "{err}"
        );
    }

    #[test]
    fn a_default_cache_is_a_temp_folder_removed_on_drop() {
        let fetcher = Fetcher::new(None, StorageSettings::default()).unwrap();
        let root = fetcher.cache_dir().to_path_buf();
        assert!(root.is_dir());
        drop(fetcher);
        assert!(!root.exists());
    }
}
