//! Tests of the output writer: what the manifest lists, and when it is (not) written.

use std::sync::{Arc, Mutex};

use super::*;
use crate::export::{checkpoint_key, model_key};
use crate::storage::{FileStorage, ObjectInfo, StorageError, sha256_hex};

/// File storage that logs every change, to check the order of writes.
#[derive(Debug)]
struct Logged {
    inner: FileStorage,
    log: Arc<Mutex<Vec<String>>>,
}

impl Logged {
    fn note(&self, what: &str, key: &str) {
        self.log.lock().unwrap().push(format!("{what} {key}"));
    }
}

impl Storage for Logged {
    fn uri(&self, key: &str) -> String {
        self.inner.uri(key)
    }
    fn put_file(&self, local: &Path, key: &str) -> Result<Transferred, StorageError> {
        self.note("put", key);
        self.inner.put_file(local, key)
    }
    fn put_bytes(&self, key: &str, bytes: &[u8]) -> Result<Transferred, StorageError> {
        self.note("put", key);
        self.inner.put_bytes(key, bytes)
    }
    fn get_to_file(&self, key: &str, local: &Path) -> Result<Transferred, StorageError> {
        self.inner.get_to_file(key, local)
    }
    fn get_bytes(&self, key: &str) -> Result<Vec<u8>, StorageError> {
        self.inner.get_bytes(key)
    }
    fn stat(&self, key: &str) -> Result<Option<ObjectInfo>, StorageError> {
        self.inner.stat(key)
    }
    fn list(&self, prefix: &str) -> Result<Vec<ObjectInfo>, StorageError> {
        self.inner.list(prefix)
    }
    fn delete(&self, key: &str) -> Result<(), StorageError> {
        self.note("delete", key);
        self.inner.delete(key)
    }
}

struct Fixture {
    dir: tempfile::TempDir,
    root: std::path::PathBuf,
}

impl Fixture {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("out");
        Fixture { dir, root }
    }
    fn storage(&self) -> Box<dyn Storage> {
        Box::new(FileStorage::new(&self.root).unwrap())
    }
    fn logged(&self) -> (Box<dyn Storage>, Arc<Mutex<Vec<String>>>) {
        let log = Arc::new(Mutex::new(Vec::new()));
        let storage = Logged {
            inner: FileStorage::new(&self.root).unwrap(),
            log: log.clone(),
        };
        (Box::new(storage), log)
    }
    fn local_file(&self, name: &str, len: usize) -> std::path::PathBuf {
        let path = self.dir.path().join(name);
        let bytes: Vec<u8> = (0..len).map(|i| (i * 7 % 256) as u8).collect();
        fs::write(&path, bytes).unwrap();
        path
    }
}

fn fields() -> Manifest {
    Manifest {
        session: "anna".into(),
        base_model: "file:///models/tiny".into(),
        step: 20,
        total_steps: 20,
        seed: 7,
        dataset: Some(dreambooth_api::DatasetReport::default()),
        config: serde_json::json!({"training": {"unetSteps": 20}}),
        ..Manifest::default()
    }
}

fn keys(writer: &OutputWriter) -> Vec<String> {
    writer.recorded.iter().map(|r| r.key.clone()).collect()
}

#[test]
fn the_manifest_lists_every_artifact_with_the_hash_of_the_bytes_on_disk() {
    let fx = Fixture::new();
    let mut writer = OutputWriter::new(fx.storage());
    let ckpt = fx.local_file("ckpt.bin", 1_500_000);
    writer
        .record_path(
            ArtifactKind::Checkpoint,
            10,
            &checkpoint_key("anna", 10),
            &ckpt,
        )
        .unwrap();
    writer
        .record_bytes(
            ArtifactKind::Sample,
            10,
            "samples/step_10/0.png",
            b"not really a png",
        )
        .unwrap();
    let state = fx.dir.path().join("state");
    fs::create_dir_all(state.join("nested")).unwrap();
    fs::write(state.join("optimizer.bin"), b"adam").unwrap();
    fs::write(state.join("nested/rng.bin"), b"rng!!").unwrap();
    let states = writer
        .record_dir(ArtifactKind::State, 10, "state/step_10", &state)
        .unwrap();
    assert_eq!(states.len(), 2);
    let model = fx.local_file("model.bin", 4097);
    writer
        .record_path(ArtifactKind::Model, 20, &model_key("anna"), &model)
        .unwrap();

    let uri = writer.finish(fields()).unwrap();
    assert_eq!(uri, format!("file://{}/manifest.json", fx.root.display()));
    let loaded = load_manifest(writer.storage()).unwrap().unwrap();
    assert_eq!(loaded.session, "anna");
    assert_eq!(loaded.created_at.len(), "2023-11-14T22:13:20Z".len());
    assert_eq!(loaded.config["training"]["unetSteps"], 20);
    assert_eq!(loaded.models().count(), 1);
    let expected_keys = [
        "anna_step_10.safetensors",
        "samples/step_10/0.png",
        "state/step_10/nested/rng.bin",
        "state/step_10/optimizer.bin",
        "anna.safetensors",
    ];
    assert_eq!(loaded.artifacts.len(), expected_keys.len());
    for (artifact, key) in loaded.artifacts.iter().zip(expected_keys) {
        let path = fx.root.join(key);
        assert_eq!(artifact.uri, format!("file://{}", path.display()));
        let on_disk = fs::read(&path).unwrap();
        assert_eq!(artifact.bytes, on_disk.len() as u64, "{key}");
        assert_eq!(artifact.sha256, sha256_hex(&on_disk), "{key}");
    }
    let text = fs::read_to_string(fx.root.join(MANIFEST_FILE)).unwrap();
    assert!(
        text.contains("\n  \"session\": \"anna\""),
        "pretty JSON: {text}"
    );
}

#[test]
fn the_manifest_is_the_last_object_written() {
    let fx = Fixture::new();
    let (storage, log) = fx.logged();
    let mut writer = OutputWriter::new(storage);
    writer
        .record_bytes(ArtifactKind::Sample, 5, "samples/step_5/0.png", b"a")
        .unwrap();
    writer
        .record_bytes(ArtifactKind::Model, 5, "anna.safetensors", b"bb")
        .unwrap();
    writer.finish(fields()).unwrap();
    let puts: Vec<String> = log
        .lock()
        .unwrap()
        .iter()
        .filter(|e| e.starts_with("put"))
        .cloned()
        .collect();
    assert_eq!(
        puts,
        [
            "put samples/step_5/0.png",
            "put anna.safetensors",
            "put manifest.json"
        ]
    );

    // A change after finishing first takes the now-stale manifest away.
    log.lock().unwrap().clear();
    writer
        .record_bytes(ArtifactKind::Sample, 6, "samples/step_6/0.png", b"c")
        .unwrap();
    assert_eq!(
        *log.lock().unwrap(),
        ["delete manifest.json", "put samples/step_6/0.png"]
    );
    assert!(load_manifest(writer.storage()).unwrap().is_none());
}

#[test]
fn no_manifest_is_written_when_an_artifact_vanished() {
    let fx = Fixture::new();
    let mut writer = OutputWriter::new(fx.storage());
    writer
        .record_bytes(ArtifactKind::Sample, 1, "samples/step_1/0.png", b"x")
        .unwrap();
    writer
        .record_bytes(ArtifactKind::Model, 1, "anna.safetensors", b"model")
        .unwrap();
    fs::remove_file(fx.root.join("anna.safetensors")).unwrap();

    let err = writer.finish(fields()).unwrap_err();
    assert!(matches!(err, ExportError::ArtifactMissing { .. }), "{err}");
    let path = fx.root.join("anna.safetensors");
    assert!(
        err.to_string().contains(&path.display().to_string()),
        "{err}"
    );
    assert!(!fx.root.join(MANIFEST_FILE).exists());
}

#[test]
fn no_manifest_is_written_when_an_artifact_changed_size() {
    let fx = Fixture::new();
    let mut writer = OutputWriter::new(fx.storage());
    writer
        .record_bytes(ArtifactKind::Model, 1, "anna.safetensors", b"model")
        .unwrap();
    fs::write(fx.root.join("anna.safetensors"), b"truncat").unwrap();
    let err = writer.finish(fields()).unwrap_err();
    assert!(
        matches!(
            err,
            ExportError::ArtifactSize {
                recorded: 5,
                found: 7,
                ..
            }
        ),
        "{err}"
    );
    assert!(!fx.root.join(MANIFEST_FILE).exists());
}

#[test]
fn a_rerun_carries_on_from_the_previous_manifest() {
    let fx = Fixture::new();
    let mut first = OutputWriter::new(fx.storage());
    first
        .record_bytes(
            ArtifactKind::Checkpoint,
            10,
            "anna_step_10.safetensors",
            b"10",
        )
        .unwrap();
    first
        .record_bytes(ArtifactKind::Sample, 10, "samples/step_10/0.png", b"s")
        .unwrap();
    first.finish(fields()).unwrap();
    fs::remove_file(fx.root.join("samples/step_10/0.png")).unwrap();

    let previous = load_manifest(fx.storage().as_ref()).unwrap().unwrap();
    let mut again = OutputWriter::resume(fx.storage(), &previous.artifacts).unwrap();
    // The vanished sample is left out; the old manifest survives until a change.
    assert_eq!(keys(&again), ["anna_step_10.safetensors"]);
    assert!(fx.root.join(MANIFEST_FILE).exists());
    again
        .record_bytes(ArtifactKind::Model, 20, "anna.safetensors", b"20")
        .unwrap();
    assert!(!fx.root.join(MANIFEST_FILE).exists());
    let stamped = Manifest {
        created_at: "2030-01-01T00:00:00Z".into(),
        ..fields()
    };
    again.finish(stamped).unwrap();
    let manifest = load_manifest(again.storage()).unwrap().unwrap();
    assert_eq!(manifest.created_at, "2030-01-01T00:00:00Z");
    let uris: Vec<&str> = manifest.artifacts.iter().map(|a| a.uri.as_str()).collect();
    assert_eq!(
        uris,
        [
            format!("file://{}/anna_step_10.safetensors", fx.root.display()),
            format!("file://{}/anna.safetensors", fx.root.display()),
        ]
    );
}

#[test]
fn artifacts_from_another_prefix_are_refused() {
    let fx = Fixture::new();
    let foreign = Artifact {
        kind: ArtifactKind::Model,
        step: 1,
        uri: "file:///elsewhere/anna.safetensors".into(),
        bytes: 1,
        sha256: sha256_hex(b"x"),
    };
    let err = OutputWriter::resume(fx.storage(), &[foreign]).unwrap_err();
    assert!(matches!(err, ExportError::ForeignArtifact { .. }), "{err}");
    assert!(
        err.to_string()
            .contains("file:///elsewhere/anna.safetensors")
    );
}

#[test]
fn recording_a_key_again_replaces_its_entry() {
    let fx = Fixture::new();
    let mut writer = OutputWriter::new(fx.storage());
    writer
        .record_bytes(ArtifactKind::Sample, 3, "samples/step_3/0.png", b"old")
        .unwrap();
    writer
        .record_bytes(ArtifactKind::Model, 3, "anna.safetensors", b"m")
        .unwrap();
    writer
        .record_bytes(ArtifactKind::Sample, 3, "samples/step_3/0.png", b"newer")
        .unwrap();
    assert_eq!(keys(&writer), ["samples/step_3/0.png", "anna.safetensors"]);
    let sample = writer.artifact("samples/step_3/0.png").unwrap();
    assert_eq!(
        (sample.bytes, sample.sha256.as_str()),
        (5, sha256_hex(b"newer").as_str())
    );
}

#[test]
fn pruning_keeps_the_newest_states_and_forgets_the_rest() {
    let fx = Fixture::new();
    let mut writer = OutputWriter::new(fx.storage());
    // A half-written state from a crashed earlier attempt, never recorded.
    writer
        .storage()
        .put_bytes("state/step_5/weights.bin", b"half")
        .unwrap();
    for step in [10, 20, 30] {
        for file in ["weights.bin", "optimizer.bin"] {
            let key = format!("{}{file}", state_prefix(step));
            writer
                .record_bytes(ArtifactKind::State, step, &key, b"s")
                .unwrap();
        }
    }
    writer
        .record_bytes(ArtifactKind::Model, 30, "anna.safetensors", b"m")
        .unwrap();

    assert_eq!(writer.prune_states(2).unwrap(), [5, 10]);
    assert_eq!(state_steps(writer.storage()).unwrap(), [20, 30]);
    assert!(!fx.root.join("state/step_10").exists());
    assert_eq!(
        keys(&writer),
        [
            "state/step_20/weights.bin",
            "state/step_20/optimizer.bin",
            "state/step_30/weights.bin",
            "state/step_30/optimizer.bin",
            "anna.safetensors",
        ]
    );
    writer.drop_key("anna.safetensors").unwrap();
    assert!(writer.artifact("anna.safetensors").is_none());
    assert!(!fx.root.join("anna.safetensors").exists());
    writer.finish(fields()).unwrap();
    let manifest = load_manifest(writer.storage()).unwrap().unwrap();
    assert_eq!(manifest.artifacts.len(), 4);
}

#[test]
fn a_corrupt_manifest_is_an_error_naming_it() {
    let fx = Fixture::new();
    let storage = fx.storage();
    storage.put_bytes(MANIFEST_FILE, b"{ not json").unwrap();
    let err = load_manifest(storage.as_ref()).unwrap_err();
    assert!(
        err.to_string().contains(&storage.uri(MANIFEST_FILE)),
        "{err}"
    );
}

#[test]
fn timestamps_are_rfc3339_utc() {
    let at = |secs| rfc3339_utc(UNIX_EPOCH + std::time::Duration::from_secs(secs));
    assert_eq!(at(0), "1970-01-01T00:00:00Z");
    assert_eq!(at(951_782_400), "2000-02-29T00:00:00Z");
    assert_eq!(at(1_700_000_000), "2023-11-14T22:13:20Z");
    assert_eq!(at(4_107_628_799), "2100-03-01T23:59:59Z");
}
