//! Whole sessions of `dreambooth-trainer train` against a real S3 server (moto on
//! 127.0.0.1): the base model and the photos come from `s3://`, every output goes to
//! `s3://`, and the manifest matches the objects byte for byte. An unreachable endpoint
//! ends the run with the retriable exit code.

#[path = "common/moto.rs"]
mod moto;

use std::path::{Path, PathBuf};
use std::process::Command;

use dreambooth_api::{ExitKind, Manifest, Outcome};
use dreambooth_trainer::storage::{
    AccessKeys, S3Storage, Storage, StorageSettings, open_storage_with, sha256_hex,
};
use moto::MotoServer;

const TRAINER: &str = env!("CARGO_BIN_EXE_dreambooth-trainer");

fn settings(endpoint: &str) -> StorageSettings {
    StorageSettings {
        endpoint: Some(endpoint.to_string()),
        region: Some(moto::REGION.into()),
        force_path_style: true,
        access_keys: Some(AccessKeys {
            access_key_id: moto::ACCESS_KEY_ID.into(),
            secret_access_key: moto::SECRET_ACCESS_KEY.into(),
        }),
        ..StorageSettings::default()
    }
}

fn p(path: &Path) -> &str {
    path.to_str().unwrap()
}

/// Runs the trainer with the S3 keys in its environment, as a pod gets them.
fn trainer(args: &[&str]) -> (i32, String) {
    let out = Command::new(TRAINER)
        .args(args)
        .env("AWS_ACCESS_KEY_ID", moto::ACCESS_KEY_ID)
        .env("AWS_SECRET_ACCESS_KEY", moto::SECRET_ACCESS_KEY)
        .env_remove("AWS_PROFILE")
        .env_remove("AWS_ENDPOINT_URL")
        .env_remove("AWS_ENDPOINT_URL_S3")
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Uploads every file below `dir` to `storage` under `prefix`, keyed by relative path.
fn upload_folder(storage: &dyn Storage, dir: &Path, prefix: &str) -> usize {
    let mut count = 0;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(folder) = stack.pop() {
        for entry in std::fs::read_dir(&folder).unwrap().flatten() {
            let path = entry.path();
            if path.is_dir() {
                stack.push(path);
                continue;
            }
            let key = path.strip_prefix(dir).unwrap().to_str().unwrap();
            storage.put_file(&path, &format!("{prefix}{key}")).unwrap();
            count += 1;
        }
    }
    count
}

fn session_yaml(endpoint: &str, output: &str) -> String {
    format!(
        "name: toy\nbaseModel:\n  uri: s3://dreambooth/models/tiny\ndataset:\n  uri: s3://dreambooth/datasets/toy\n  \
         token: zwxtoy\n  resolution: 64\noutput:\n  uri: {output}\nstorage:\n  endpoint: {endpoint}\n  region: us-east-1\n  \
         forcePathStyle: true\ntraining:\n  unet:\n    steps: 4\n    learningRate: 2.0e-4\n  textEncoder:\n    steps: 2\n    \
         learningRate: 1.0e-4\n  seed: 11\ncheckpoints:\n  every: 3\n  precision: fp32\nsamples:\n  prompts: [photo of zwxtoy]\n  \
         steps: 2\n"
    )
}

fn workspace(dir: &Path) -> (PathBuf, PathBuf) {
    let (model, photos) = (dir.join("model"), dir.join("photos"));
    let (code, log) = trainer(&["tiny-model", "--out", p(&model), "--seed", "1"]);
    assert_eq!(code, 0, "{log}");
    let (code, log) = trainer(&[
        "demo-photos",
        "--out",
        p(&photos),
        "--count",
        "4",
        "--size",
        "48",
    ]);
    assert_eq!(code, 0, "{log}");
    (model, photos)
}

#[test]
fn a_session_reads_from_and_writes_to_s3_and_its_manifest_matches_the_objects() {
    let server = MotoServer::start();
    server.create_bucket("dreambooth");
    let dir = tempfile::tempdir().unwrap();
    let (model, photos) = workspace(dir.path());
    let inputs = S3Storage::open("s3://dreambooth", &settings(&server.endpoint())).unwrap();
    assert!(upload_folder(&inputs, &model, "models/tiny/") >= 8);
    assert_eq!(upload_folder(&inputs, &photos, "datasets/toy/"), 4);

    let session = dir.path().join("session.yaml");
    std::fs::write(
        &session,
        session_yaml(&server.endpoint(), "s3://dreambooth/runs/toy"),
    )
    .unwrap();
    let (cache, termination) = (dir.path().join("cache"), dir.path().join("termination"));
    let (code, log) = trainer(&[
        "train",
        p(&session),
        "--termination-log",
        p(&termination),
        "--cache-dir",
        p(&cache),
    ]);
    assert_eq!(code, 0, "{log}");

    let outcome: Outcome = serde_json::from_slice(&std::fs::read(&termination).unwrap()).unwrap();
    assert_eq!(outcome.outcome, ExitKind::Succeeded);
    assert_eq!(
        outcome.manifest_uri.as_deref(),
        Some("s3://dreambooth/runs/toy/manifest.json")
    );
    let output =
        open_storage_with("s3://dreambooth/runs/toy", &settings(&server.endpoint())).unwrap();
    let manifest: Manifest =
        serde_json::from_slice(&output.get_bytes("manifest.json").unwrap()).unwrap();
    assert_eq!(manifest.step, 6);
    assert!(manifest.artifacts.len() >= 4, "{:?}", manifest.artifacts);
    let listed: Vec<String> = output
        .list("")
        .unwrap()
        .into_iter()
        .map(|o| o.key)
        .collect();
    for artifact in &manifest.artifacts {
        let key = artifact
            .uri
            .strip_prefix("s3://dreambooth/runs/toy/")
            .unwrap_or_else(|| panic!("{} is outside the output prefix", artifact.uri));
        assert!(listed.iter().any(|k| k == key), "{key} not in {listed:?}");
        let bytes = output.get_bytes(key).unwrap();
        assert_eq!(bytes.len() as u64, artifact.bytes, "{key}");
        assert_eq!(sha256_hex(&bytes), artifact.sha256, "{key}");
    }
    assert!(listed.iter().any(|k| k == "toy.safetensors"), "{listed:?}");
    assert!(
        listed.iter().any(|k| k.starts_with("samples/")),
        "{listed:?}"
    );

    // The inputs sit in the cache for the next attempt.
    assert!(cache.join("s3/dreambooth/datasets/toy").is_dir());
    assert!(
        cache
            .join("s3/dreambooth/models/tiny/model_index.json")
            .is_file()
    );
}

#[test]
fn an_unreachable_endpoint_exits_retriable_with_the_uri_in_the_message() {
    let dir = tempfile::tempdir().unwrap();
    let endpoint = format!("http://127.0.0.1:{}", moto::free_port());
    let session = dir.path().join("session.yaml");
    std::fs::write(
        &session,
        session_yaml(&endpoint, "s3://dreambooth/runs/toy"),
    )
    .unwrap();
    let termination = dir.path().join("termination");
    let (code, log) = trainer(&["train", p(&session), "--termination-log", p(&termination)]);
    assert_eq!(code, ExitKind::Retriable.code(), "{log}");
    let outcome: Outcome = serde_json::from_slice(&std::fs::read(&termination).unwrap()).unwrap();
    assert_eq!(outcome.outcome, ExitKind::Retriable);
    let message = outcome.message.unwrap();
    assert!(message.contains("s3://dreambooth/"), "{message}");
    assert!(message.contains("spec.output.uri"), "{message}");
}

#[test]
fn a_missing_bucket_exits_as_a_bad_config_naming_the_bucket() {
    let server = MotoServer::start();
    let dir = tempfile::tempdir().unwrap();
    let session = dir.path().join("session.yaml");
    std::fs::write(
        &session,
        session_yaml(&server.endpoint(), "s3://dreambooth/runs/toy"),
    )
    .unwrap();
    let termination = dir.path().join("termination");
    let (code, log) = trainer(&["train", p(&session), "--termination-log", p(&termination)]);
    assert_eq!(code, ExitKind::BadConfig.code(), "{log}");
    assert!(log.contains("bucket `dreambooth` does not exist"), "{log}");
}

#[test]
fn a_server_lost_mid_run_ends_with_the_retriable_exit_code() {
    let mut server = MotoServer::start();
    server.create_bucket("dreambooth");
    let dir = tempfile::tempdir().unwrap();
    let (model, photos) = workspace(dir.path());
    let settings = settings(&server.endpoint());
    let inputs = S3Storage::open("s3://dreambooth", &settings).unwrap();
    upload_folder(&inputs, &model, "models/tiny/");
    upload_folder(&inputs, &photos, "datasets/toy/");
    // Many checkpoints, so the run is uploading most of the time.
    let yaml = session_yaml(&server.endpoint(), "s3://dreambooth/runs/toy")
        .replace("steps: 4\n", "steps: 400\n")
        .replace("every: 3\n", "every: 1\n");
    let session = dir.path().join("session.yaml");
    std::fs::write(&session, yaml).unwrap();
    let termination = dir.path().join("termination");
    let mut child = Command::new(TRAINER)
        .args(["train", p(&session), "--termination-log", p(&termination)])
        .env("AWS_ACCESS_KEY_ID", moto::ACCESS_KEY_ID)
        .env("AWS_SECRET_ACCESS_KEY", moto::SECRET_ACCESS_KEY)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();

    // Wait for the first checkpoint's objects, then pull the server away.
    let output = open_storage_with("s3://dreambooth/runs/toy", &settings).unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(300);
    while output.list("state/").unwrap().is_empty() {
        assert!(
            std::time::Instant::now() < deadline,
            "no checkpoint written"
        );
        assert!(
            child.try_wait().unwrap().is_none(),
            "the trainer ended early"
        );
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    assert!(!output.exists("manifest.json").unwrap());
    server.kill();

    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(ExitKind::Retriable.code()));
    let outcome: Outcome = serde_json::from_slice(&std::fs::read(&termination).unwrap()).unwrap();
    assert_eq!(outcome.outcome, ExitKind::Retriable);
    assert!(outcome.manifest_uri.is_none());
    let message = outcome.message.unwrap();
    assert!(message.contains("s3://dreambooth/runs/toy/"), "{message}");
}
