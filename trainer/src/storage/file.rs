//! `file://` storage: objects are files below a root folder. Every write goes to a temp
//! file in the destination folder, is fsynced and then renamed over the final name, so a
//! crash or a full disk never leaves a partial file under a name a reader trusts.

use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::time::Instant;

use super::{
    ObjectInfo, Storage, StorageError, StreamHash, Transferred, stats, validate_key,
    validate_prefix,
};

/// Temp files are `.<name>.<random>.partial`; listings skip them so a crashed writer's
/// leftovers never look like objects.
const TEMP_SUFFIX: &str = ".partial";

const COPY_BUFFER: usize = 1 << 20;

#[derive(Debug, Clone)]
pub struct FileStorage {
    root: PathBuf,
}

impl FileStorage {
    /// Storage rooted at `root`; a relative root is taken from the current directory now,
    /// so later `chdir`s do not move the output. The folder is created on first write.
    pub fn new(root: impl AsRef<Path>) -> io::Result<Self> {
        Ok(FileStorage {
            root: std::path::absolute(root.as_ref())?,
        })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The local path of a (validated) key.
    pub fn path_of(&self, key: &str) -> Result<PathBuf, StorageError> {
        validate_key(key)?;
        Ok(key.split('/').fold(self.root.clone(), |p, s| p.join(s)))
    }

    fn not_found(path: &Path) -> StorageError {
        StorageError::NotFound {
            location: path.display().to_string(),
        }
    }

    /// Opens an object for reading, mapping a missing file to `NotFound`.
    fn open_object(&self, key: &str) -> Result<(PathBuf, File), StorageError> {
        let path = self.path_of(key)?;
        match File::open(&path) {
            Ok(file) if file.metadata().is_ok_and(|m| m.is_file()) => Ok((path, file)),
            Ok(_) => Err(Self::not_found(&path)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Err(Self::not_found(&path)),
            Err(e) => Err(StorageError::io(&path, "open", e)),
        }
    }

    /// Removes now-empty folders from `dir` up to (not including) the root, so deleting
    /// the last object of a prefix leaves no empty folder, as in an object store.
    fn prune_empty_dirs(&self, mut dir: &Path) {
        while dir != self.root && dir.starts_with(&self.root) {
            if fs::remove_dir(dir).is_err() {
                break;
            }
            match dir.parent() {
                Some(parent) => dir = parent,
                None => break,
            }
        }
    }

    fn walk(
        &self,
        dir: &Path,
        key_prefix: &str,
        out: &mut Vec<ObjectInfo>,
    ) -> Result<(), StorageError> {
        let entries = match fs::read_dir(dir) {
            Ok(entries) => entries,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotADirectory => return Ok(()),
            Err(e) => return Err(StorageError::io(dir, "list", e)),
        };
        for entry in entries {
            let entry = entry.map_err(|e| StorageError::io(dir, "list", e))?;
            let path = entry.path();
            let Some(name) = entry.file_name().to_str().map(str::to_string) else {
                tracing::warn!(path = %path.display(), "skipping a file whose name is not UTF-8");
                continue;
            };
            // Follows symlinks: a dataset folder may link its images from elsewhere.
            let meta = match fs::metadata(&path) {
                Ok(meta) => meta,
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(StorageError::io(&path, "inspect", e)),
            };
            let key = format!("{key_prefix}{name}");
            if meta.is_dir() {
                self.walk(&path, &format!("{key}/"), out)?;
            } else if meta.is_file() && !is_temp_name(&name) {
                out.push(ObjectInfo {
                    key,
                    size: meta.len(),
                });
            }
        }
        Ok(())
    }
}

fn is_temp_name(name: &str) -> bool {
    name.starts_with('.') && name.ends_with(TEMP_SUFFIX)
}

/// Writes `dest` through a temp file in the same folder: `fill` streams the content,
/// then fsync, mode 0644 and an atomic rename; the folder is fsynced so the rename
/// itself survives a crash. On any error the temp file is removed.
fn write_atomically(
    dest: &Path,
    fill: impl FnOnce(&mut File) -> Result<Transferred, StorageError>,
) -> Result<Transferred, StorageError> {
    let dir = dest
        .parent()
        .ok_or_else(|| StorageError::io(dest, "write", io::Error::other("no parent folder")))?;
    fs::create_dir_all(dir).map_err(|e| StorageError::io(dir, "create the folder", e))?;
    let name = dest
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let mut temp = tempfile::Builder::new()
        .prefix(&format!(".{name}."))
        .suffix(TEMP_SUFFIX)
        .tempfile_in(dir)
        .map_err(|e| StorageError::io(dir, "create a temp file in", e))?;
    let done = fill(temp.as_file_mut())?;
    let temp_path = temp.path().to_path_buf();
    let file = temp.as_file();
    file.sync_all()
        .map_err(|e| StorageError::io(&temp_path, "fsync", e))?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        file.set_permissions(fs::Permissions::from_mode(0o644))
            .map_err(|e| StorageError::io(&temp_path, "set permissions on", e))?;
    }
    temp.persist(dest)
        .map_err(|e| StorageError::io(dest, "rename the temp file onto", e.error))?;
    #[cfg(unix)]
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| StorageError::io(dir, "fsync the folder", e))?;
    Ok(done)
}

/// Streams `reader` into `writer`, hashing as it goes; errors name the side that failed.
fn copy_hashing(
    reader: &mut impl Read,
    source: &Path,
    writer: &mut impl Write,
    dest: &Path,
) -> Result<Transferred, StorageError> {
    let mut hash = StreamHash::default();
    let mut buffer = vec![0u8; COPY_BUFFER];
    loop {
        let n = match reader.read(&mut buffer) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(StorageError::io(source, "read", e)),
        };
        writer
            .write_all(&buffer[..n])
            .map_err(|e| StorageError::io(dest, "write", e))?;
        hash.update(&buffer[..n]);
    }
    writer
        .flush()
        .map_err(|e| StorageError::io(dest, "write", e))?;
    Ok(hash.finish())
}

enum Direction {
    Upload,
    Download,
}

/// Runs one transfer and records it (or its error) in `stats`.
fn counted(
    direction: Direction,
    transfer: impl FnOnce() -> Result<Transferred, StorageError>,
) -> Result<Transferred, StorageError> {
    let started = Instant::now();
    match transfer() {
        Ok(done) => {
            match direction {
                Direction::Upload => stats::record_upload(done.bytes, started.elapsed()),
                Direction::Download => stats::record_download(done.bytes, started.elapsed()),
            }
            Ok(done)
        }
        Err(error) => Err(error.counted()),
    }
}

impl Storage for FileStorage {
    fn uri(&self, key: &str) -> String {
        let root = self.root.to_string_lossy();
        format!("file://{}/{key}", root.trim_end_matches('/'))
    }

    fn put_file(&self, local: &Path, key: &str) -> Result<Transferred, StorageError> {
        counted(Direction::Upload, || {
            let dest = self.path_of(key)?;
            let mut source = File::open(local).map_err(|e| StorageError::io(local, "open", e))?;
            write_atomically(&dest, |out| copy_hashing(&mut source, local, out, &dest))
        })
    }

    fn put_bytes(&self, key: &str, bytes: &[u8]) -> Result<Transferred, StorageError> {
        counted(Direction::Upload, || {
            let dest = self.path_of(key)?;
            write_atomically(&dest, |out| {
                copy_hashing(&mut &bytes[..], Path::new("<memory>"), out, &dest)
            })
        })
    }

    fn get_to_file(&self, key: &str, local: &Path) -> Result<Transferred, StorageError> {
        counted(Direction::Download, || {
            let (path, mut source) = self.open_object(key)?;
            write_atomically(local, |out| copy_hashing(&mut source, &path, out, local))
        })
    }

    fn get_bytes(&self, key: &str) -> Result<Vec<u8>, StorageError> {
        let started = Instant::now();
        let read = self.open_object(key).and_then(|(path, mut source)| {
            let mut bytes = Vec::new();
            source
                .read_to_end(&mut bytes)
                .map_err(|e| StorageError::io(&path, "read", e))?;
            Ok(bytes)
        });
        match read {
            Ok(bytes) => {
                stats::record_download(bytes.len() as u64, started.elapsed());
                Ok(bytes)
            }
            Err(error) => Err(error.counted()),
        }
    }

    fn stat(&self, key: &str) -> Result<Option<ObjectInfo>, StorageError> {
        let path = self.path_of(key)?;
        match fs::metadata(&path) {
            Ok(meta) if meta.is_file() => Ok(Some(ObjectInfo {
                key: key.to_string(),
                size: meta.len(),
            })),
            Ok(_) => Ok(None),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) if e.kind() == io::ErrorKind::NotADirectory => Ok(None),
            Err(e) => Err(StorageError::io(&path, "inspect", e)),
        }
    }

    fn list(&self, prefix: &str) -> Result<Vec<ObjectInfo>, StorageError> {
        validate_prefix(prefix)?;
        // Walk only the deepest folder the prefix names, then filter by the partial rest.
        let (folder, key_prefix) = match prefix.rsplit_once('/') {
            Some((folder, _)) => (
                folder.split('/').fold(self.root.clone(), |p, s| p.join(s)),
                format!("{folder}/"),
            ),
            None => (self.root.clone(), String::new()),
        };
        let mut objects = Vec::new();
        self.walk(&folder, &key_prefix, &mut objects)?;
        objects.retain(|o| o.key.starts_with(prefix));
        objects.sort_by(|a, b| a.key.cmp(&b.key));
        Ok(objects)
    }

    fn delete(&self, key: &str) -> Result<(), StorageError> {
        let path = self.path_of(key)?;
        match fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(StorageError::io(&path, "delete", e)),
        }
        if let Some(parent) = path.parent() {
            self.prune_empty_dirs(parent);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::{open_storage, sha256_hex};

    fn storage() -> (tempfile::TempDir, FileStorage) {
        let dir = tempfile::tempdir().unwrap();
        let storage = FileStorage::new(dir.path().join("out")).unwrap();
        (dir, storage)
    }

    /// Every file below `dir`, relative, including hidden ones.
    fn all_files(dir: &Path) -> Vec<String> {
        let mut found = Vec::new();
        let mut stack = vec![dir.to_path_buf()];
        while let Some(d) = stack.pop() {
            for entry in fs::read_dir(&d).unwrap() {
                let path = entry.unwrap().path();
                if path.is_dir() {
                    stack.push(path);
                } else {
                    let rel = path.strip_prefix(dir).unwrap();
                    found.push(rel.to_string_lossy().into_owned());
                }
            }
        }
        found.sort();
        found
    }

    #[test]
    fn writes_leave_only_the_final_files_with_mode_0644() {
        let (dir, storage) = storage();
        let local = dir.path().join("model.bin");
        let content: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
        fs::write(&local, &content).unwrap();

        let put = storage.put_file(&local, "a/b/model.bin").unwrap();
        assert_eq!(put.bytes, content.len() as u64);
        assert_eq!(put.sha256, sha256_hex(&content));
        let small = storage.put_bytes("c.json", b"{}").unwrap();
        assert_eq!(small.sha256, sha256_hex(b"{}"));
        // Overwriting replaces the content whole.
        storage.put_bytes("c.json", b"[1]").unwrap();

        assert_eq!(all_files(storage.root()), ["a/b/model.bin", "c.json"]);
        assert_eq!(
            fs::read(storage.root().join("a/b/model.bin")).unwrap(),
            content
        );
        assert_eq!(fs::read(storage.root().join("c.json")).unwrap(), b"[1]");
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = fs::metadata(storage.root().join("c.json"))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o644);
        }
    }

    #[test]
    fn a_failed_upload_leaves_neither_temp_nor_final_file() {
        let (dir, storage) = storage();
        // Reading a folder as a file fails after the temp file exists.
        let err = storage.put_file(dir.path(), "x.bin").unwrap_err();
        assert!(
            err.to_string().contains(&dir.path().display().to_string()),
            "{err}"
        );
        assert_eq!(all_files(storage.root()), Vec::<String>::new());
        assert!(!storage.exists("x.bin").unwrap());
    }

    #[test]
    fn leftover_temp_files_are_not_listed() {
        let (_dir, storage) = storage();
        storage.put_bytes("state/step_5/a", b"1").unwrap();
        fs::write(storage.root().join("state/step_5/.b.x1y2.partial"), b"half").unwrap();
        let keys: Vec<_> = storage
            .list("")
            .unwrap()
            .into_iter()
            .map(|o| o.key)
            .collect();
        assert_eq!(keys, ["state/step_5/a"]);
    }

    #[test]
    fn missing_keys_are_not_found_errors_naming_the_full_path() {
        let (dir, storage) = storage();
        let expected = storage.root().join("samples/step_3/0.png");
        let err = storage.get_bytes("samples/step_3/0.png").unwrap_err();
        assert!(err.is_not_found(), "{err:?}");
        assert!(
            err.to_string().contains(&expected.display().to_string()),
            "{err}"
        );

        let err = storage
            .get_to_file("samples/step_3/0.png", &dir.path().join("copy.png"))
            .unwrap_err();
        assert!(err.is_not_found());
        assert!(
            err.to_string().contains(&expected.display().to_string()),
            "{err}"
        );
        assert!(!dir.path().join("copy.png").exists());
        assert!(storage.stat("samples/step_3/0.png").unwrap().is_none());
    }

    #[test]
    fn downloads_round_trip_and_report_the_hash() {
        let (dir, storage) = storage();
        storage.put_bytes("k/v.txt", b"hello").unwrap();
        let local = dir.path().join("down/deeper/v.txt");
        let got = storage.get_to_file("k/v.txt", &local).unwrap();
        assert_eq!(fs::read(&local).unwrap(), b"hello");
        assert_eq!(got.sha256, sha256_hex(b"hello"));
        assert_eq!(storage.get_bytes("k/v.txt").unwrap(), b"hello");
        let info = storage.stat("k/v.txt").unwrap().unwrap();
        assert_eq!(
            info,
            ObjectInfo {
                key: "k/v.txt".into(),
                size: 5
            }
        );
        // A folder is not an object.
        assert!(!storage.exists("k").unwrap());
    }

    #[test]
    fn list_matches_string_prefixes_and_delete_prefix_removes_only_them() {
        let (_dir, storage) = storage();
        for key in [
            "samples/step_1/0.png",
            "samples/step_10/0.png",
            "samples/step_10/grid.png",
            "samples/step_2/0.png",
            "state/step_1/weights.safetensors",
            "anna.safetensors",
        ] {
            storage.put_bytes(key, key.as_bytes()).unwrap();
        }
        let keys = |prefix: &str| -> Vec<String> {
            storage
                .list(prefix)
                .unwrap()
                .into_iter()
                .map(|o| o.key)
                .collect()
        };
        assert_eq!(
            keys("samples/step_1"),
            [
                "samples/step_1/0.png",
                "samples/step_10/0.png",
                "samples/step_10/grid.png"
            ]
        );
        assert_eq!(keys("samples/step_1/"), ["samples/step_1/0.png"]);
        assert_eq!(keys("an"), ["anna.safetensors"]);
        assert_eq!(keys("nothing/here/"), Vec::<String>::new());
        assert_eq!(storage.list("").unwrap().len(), 6);
        let sizes: Vec<u64> = storage
            .list("state/")
            .unwrap()
            .iter()
            .map(|o| o.size)
            .collect();
        assert_eq!(sizes, ["state/step_1/weights.safetensors".len() as u64]);

        assert_eq!(storage.delete_prefix("samples/step_10/").unwrap(), 2);
        assert_eq!(
            keys("samples/"),
            ["samples/step_1/0.png", "samples/step_2/0.png"]
        );
        // No empty folder is left behind, and deleting again is fine.
        assert!(!storage.root().join("samples/step_10").exists());
        storage.delete("samples/step_10/0.png").unwrap();
        assert!(storage.delete_prefix("").is_err());
        assert_eq!(storage.list("").unwrap().len(), 4);
    }

    #[test]
    fn keys_outside_the_prefix_are_refused() {
        let (_dir, storage) = storage();
        let err = storage.put_bytes("../escape", b"x").unwrap_err();
        assert!(matches!(err, StorageError::InvalidKey { .. }), "{err}");
        assert!(storage.get_bytes("/etc/passwd").is_err());
    }

    #[test]
    fn absolute_file_uris_name_their_folder() {
        let dir = tempfile::tempdir().unwrap();
        let uri = format!("file://{}", dir.path().join("run").display());
        let storage = open_storage(&uri).unwrap();
        assert_eq!(storage.uri(""), format!("{uri}/"));
        assert_eq!(storage.uri("a/b.png"), format!("{uri}/a/b.png"));
        storage.put_bytes("a/b.png", b"png").unwrap();
        assert_eq!(fs::read(dir.path().join("run/a/b.png")).unwrap(), b"png");
    }

    #[test]
    fn relative_file_uris_resolve_against_the_current_directory() {
        // A scratch folder inside the current directory, named relatively.
        let scratch = tempfile::Builder::new()
            .prefix(".storage-test-")
            .tempdir_in(".")
            .unwrap();
        let name = scratch
            .path()
            .file_name()
            .unwrap()
            .to_str()
            .unwrap()
            .to_string();
        let cwd = std::env::current_dir().unwrap();
        for uri in [format!("file://./{name}/out"), format!("file://{name}/out")] {
            let storage = open_storage(&uri).unwrap();
            let expected = cwd.join(&name).join("out");
            assert_eq!(
                storage.uri("m.bin"),
                format!("file://{}/m.bin", expected.display())
            );
            storage.put_bytes("m.bin", uri.as_bytes()).unwrap();
            assert_eq!(fs::read(expected.join("m.bin")).unwrap(), uri.as_bytes());
        }
    }
}
