//! The writer of one session's output prefix. Every artifact goes through it, so the
//! manifest it finally writes lists exactly what is in storage, each with the size and
//! SHA-256 of the bytes that were uploaded. `manifest.json` is written last and only
//! after every listed object has been checked, and any existing manifest is deleted
//! before the first change, so no manifest ever describes files that differ from it.

use std::fs;
use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

use dreambooth_api::manifest::{Artifact, ArtifactKind, MANIFEST_FILE, Manifest};

use super::{ExportError, state_prefix, state_step};
use crate::storage::{Storage, Transferred};

#[derive(Debug, Clone)]
struct Recorded {
    key: String,
    artifact: Artifact,
}

/// Uploads artifacts to one output prefix and keeps the list the manifest will hold.
#[derive(Debug)]
pub struct OutputWriter {
    storage: Box<dyn Storage>,
    recorded: Vec<Recorded>,
    /// A manifest from an earlier run or an earlier `finish` may be in storage; it is
    /// deleted before the next change so it can never describe changed files.
    manifest_may_exist: bool,
}

/// Reads `manifest.json` from the prefix, or `None` when the output is not complete.
pub fn load_manifest(storage: &dyn Storage) -> Result<Option<Manifest>, ExportError> {
    let bytes = match storage.get_bytes(MANIFEST_FILE) {
        Ok(bytes) => bytes,
        Err(e) if e.is_not_found() => return Ok(None),
        Err(e) => return Err(e.into()),
    };
    serde_json::from_slice(&bytes)
        .map(Some)
        .map_err(|source| ExportError::ManifestParse {
            uri: storage.uri(MANIFEST_FILE),
            source,
        })
}

impl OutputWriter {
    /// A writer with nothing recorded yet.
    pub fn new(storage: Box<dyn Storage>) -> Self {
        OutputWriter {
            storage,
            recorded: Vec::new(),
            manifest_may_exist: true,
        }
    }

    /// A writer that carries on from artifacts an earlier run recorded (from its manifest,
    /// or from a list saved with a training state). Entries whose object is gone or has
    /// another size are left out with a warning: they cannot be vouched for any more.
    pub fn resume(storage: Box<dyn Storage>, previous: &[Artifact]) -> Result<Self, ExportError> {
        let prefix = storage.uri("");
        let mut writer = OutputWriter::new(storage);
        for artifact in previous {
            let Some(key) = artifact.uri.strip_prefix(&prefix) else {
                return Err(ExportError::ForeignArtifact {
                    uri: artifact.uri.clone(),
                    prefix,
                });
            };
            match writer.storage.stat(key)? {
                Some(info) if info.size == artifact.bytes => {
                    writer.remember(key, artifact.clone());
                }
                _ => {
                    tracing::warn!(uri = %artifact.uri, "an earlier artifact is missing or changed; leaving it out")
                }
            }
        }
        Ok(writer)
    }

    pub fn storage(&self) -> &dyn Storage {
        self.storage.as_ref()
    }

    /// The artifacts recorded so far, in the order they were first recorded.
    pub fn artifacts(&self) -> Vec<Artifact> {
        self.recorded.iter().map(|r| r.artifact.clone()).collect()
    }

    /// The artifact recorded under `key`, if any.
    pub fn artifact(&self, key: &str) -> Option<&Artifact> {
        self.recorded
            .iter()
            .find(|r| r.key == key)
            .map(|r| &r.artifact)
    }

    /// Uploads a local file to `key` and records it.
    pub fn record_path(
        &mut self,
        kind: ArtifactKind,
        step: u32,
        key: &str,
        local: &Path,
    ) -> Result<Artifact, ExportError> {
        self.before_change()?;
        let sent = self.storage.put_file(local, key)?;
        Ok(self.remember(key, self.artifact_for(kind, step, key, sent)))
    }

    /// Stores `bytes` under `key` and records them.
    pub fn record_bytes(
        &mut self,
        kind: ArtifactKind,
        step: u32,
        key: &str,
        bytes: &[u8],
    ) -> Result<Artifact, ExportError> {
        self.before_change()?;
        let sent = self.storage.put_bytes(key, bytes)?;
        Ok(self.remember(key, self.artifact_for(kind, step, key, sent)))
    }

    /// Uploads every file below `local_dir` to `<prefix><relative path>` (e.g. a training
    /// state written locally to `state/step_<N>/`), in sorted order.
    pub fn record_dir(
        &mut self,
        kind: ArtifactKind,
        step: u32,
        prefix: &str,
        local_dir: &Path,
    ) -> Result<Vec<Artifact>, ExportError> {
        let mut files = Vec::new();
        collect_files(local_dir, "", &mut files)?;
        files.sort();
        let prefix = match prefix {
            "" => String::new(),
            p if p.ends_with('/') => p.to_string(),
            p => format!("{p}/"),
        };
        files
            .iter()
            .map(|rel| {
                let local = rel
                    .split('/')
                    .fold(local_dir.to_path_buf(), |p, s| p.join(s));
                self.record_path(kind, step, &format!("{prefix}{rel}"), &local)
            })
            .collect()
    }

    /// Deletes one object and its entry.
    pub fn drop_key(&mut self, key: &str) -> Result<(), ExportError> {
        self.before_change()?;
        self.storage.delete(key)?;
        self.recorded.retain(|r| r.key != key);
        Ok(())
    }

    /// Deletes every object under `prefix` (recorded or not: a half-written state from a
    /// crash goes too) and drops their entries; returns how many objects were deleted.
    pub fn drop_prefix(&mut self, prefix: &str) -> Result<usize, ExportError> {
        self.before_change()?;
        let deleted = self.storage.delete_prefix(prefix)?;
        self.recorded.retain(|r| !r.key.starts_with(prefix));
        Ok(deleted)
    }

    /// Keeps the newest `keep_last` training states in storage and deletes the others
    /// (`keepLastStates`); returns the steps deleted, oldest first.
    pub fn prune_states(&mut self, keep_last: usize) -> Result<Vec<u32>, ExportError> {
        let steps = state_steps(self.storage())?;
        let old = steps.len().saturating_sub(keep_last);
        for &step in &steps[..old] {
            self.drop_prefix(&state_prefix(step))?;
        }
        Ok(steps[..old].to_vec())
    }

    /// Checks every recorded artifact is in storage with its recorded size, then writes
    /// `manifest.json` (pretty JSON) as the last object and returns its URI. Nothing is
    /// written when a check fails, so an incomplete output never gains a manifest.
    /// `manifest` gives the session fields; its `artifacts` are replaced by the recorded
    /// ones and an empty `created_at` is set to now.
    pub fn finish(&mut self, mut manifest: Manifest) -> Result<String, ExportError> {
        for r in &self.recorded {
            let uri = &r.artifact.uri;
            match self.storage.stat(&r.key)? {
                None => return Err(ExportError::ArtifactMissing { uri: uri.clone() }),
                Some(info) if info.size != r.artifact.bytes => {
                    return Err(ExportError::ArtifactSize {
                        uri: uri.clone(),
                        recorded: r.artifact.bytes,
                        found: info.size,
                    });
                }
                Some(_) => {}
            }
        }
        manifest.artifacts = self.artifacts();
        if manifest.created_at.is_empty() {
            manifest.created_at = rfc3339_utc(SystemTime::now());
        }
        let mut json = serde_json::to_vec_pretty(&manifest).expect("a manifest serializes");
        json.push(b'\n');
        self.storage.put_bytes(MANIFEST_FILE, &json)?;
        self.manifest_may_exist = true;
        Ok(self.storage.uri(MANIFEST_FILE))
    }

    fn before_change(&mut self) -> Result<(), ExportError> {
        if self.manifest_may_exist {
            self.storage.delete(MANIFEST_FILE)?;
            self.manifest_may_exist = false;
        }
        Ok(())
    }

    fn artifact_for(
        &self,
        kind: ArtifactKind,
        step: u32,
        key: &str,
        sent: Transferred,
    ) -> Artifact {
        Artifact {
            kind,
            step,
            uri: self.storage.uri(key),
            bytes: sent.bytes,
            sha256: sent.sha256,
        }
    }

    /// Records `artifact` under `key`, replacing an earlier entry for the same key (a
    /// rerun rewriting a sample) in place.
    fn remember(&mut self, key: &str, artifact: Artifact) -> Artifact {
        match self.recorded.iter_mut().find(|r| r.key == key) {
            Some(r) => r.artifact = artifact.clone(),
            None => self.recorded.push(Recorded {
                key: key.to_string(),
                artifact: artifact.clone(),
            }),
        }
        artifact
    }
}

/// The steps of the training states in storage, ascending.
pub fn state_steps(storage: &dyn Storage) -> Result<Vec<u32>, ExportError> {
    let mut steps: Vec<u32> = storage
        .list("state/")?
        .iter()
        .filter_map(|o| state_step(&o.key))
        .collect();
    steps.sort_unstable();
    steps.dedup();
    Ok(steps)
}

/// Relative `/`-separated paths of the files below `dir`.
fn collect_files(dir: &Path, rel: &str, out: &mut Vec<String>) -> Result<(), ExportError> {
    let read_err = |source| ExportError::ReadDir {
        path: dir.to_path_buf(),
        source,
    };
    for entry in fs::read_dir(dir).map_err(read_err)? {
        let entry = entry.map_err(read_err)?;
        let name = entry.file_name().to_string_lossy().into_owned();
        let rel_path = if rel.is_empty() {
            name
        } else {
            format!("{rel}/{name}")
        };
        let path = entry.path();
        if fs::metadata(&path).map_err(read_err)?.is_dir() {
            collect_files(&path, &rel_path, out)?;
        } else {
            out.push(rel_path);
        }
    }
    Ok(())
}

/// RFC 3339 UTC time with seconds, e.g. `2023-11-14T22:13:20Z` (civil-from-days, after
/// Howard Hinnant), so the trainer needs no date crate for one timestamp.
pub fn rfc3339_utc(time: SystemTime) -> String {
    let secs = time
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64);
    let (days, of_day) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        of_day / 3600,
        of_day % 3600 / 60,
        of_day % 60
    )
}

#[cfg(test)]
#[path = "manifest_tests.rs"]
mod tests;
