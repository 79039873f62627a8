//! The `s3://` backend against a real S3 server (moto on 127.0.0.1): round trips,
//! listing, multipart, checksums, the cache of fetched inputs, and the failures a user
//! must tell apart (missing object, missing bucket: permanent; unreachable: retriable).

#[path = "common/moto.rs"]
mod moto;

use std::path::Path;
use std::time::Duration;

use dreambooth_trainer::storage::retry::RetryPolicy;
use dreambooth_trainer::storage::{
    AccessKeys, Fetcher, S3Storage, Storage, StorageError, StorageSettings, TransferTuning,
    open_storage_with, sha256_hex, stats,
};
use moto::MotoServer;

fn settings(endpoint: &str) -> StorageSettings {
    StorageSettings {
        endpoint: Some(endpoint.to_string()),
        region: Some(moto::REGION.into()),
        force_path_style: true,
        access_keys: Some(AccessKeys {
            access_key_id: moto::ACCESS_KEY_ID.into(),
            secret_access_key: moto::SECRET_ACCESS_KEY.into(),
        }),
        tuning: TransferTuning {
            retry: RetryPolicy {
                max_attempts: 3,
                base_delay: Duration::from_millis(20),
                max_delay: Duration::from_millis(200),
            },
            multipart_threshold: 6 << 20,
            part_size: 5 << 20,
            concurrency: 3,
            connect_timeout: Duration::from_secs(2),
            read_timeout: Duration::from_secs(20),
        },
    }
}

fn server_with_bucket(bucket: &str) -> MotoServer {
    let server = MotoServer::start();
    server.create_bucket(bucket);
    server
}

/// Deterministic, incompressible-looking bytes.
fn content(len: usize, seed: u32) -> Vec<u8> {
    let mut state = seed.wrapping_mul(2_654_435_761).max(1);
    (0..len)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 17;
            state ^= state << 5;
            state as u8
        })
        .collect()
}

fn keys(storage: &dyn Storage, prefix: &str) -> Vec<String> {
    storage
        .list(prefix)
        .unwrap()
        .into_iter()
        .map(|o| o.key)
        .collect()
}

#[test]
fn objects_round_trip_under_the_prefix_with_their_sha256() {
    let server = server_with_bucket("runs");
    let storage = open_storage_with("s3://runs/anna", &settings(&server.endpoint())).unwrap();
    assert_eq!(storage.uri("a/b.png"), "s3://runs/anna/a/b.png");
    let before = stats::snapshot();

    let put = storage.put_bytes("samples/step_1/0.png", b"png-1").unwrap();
    assert_eq!(put.sha256, sha256_hex(b"png-1"));
    storage
        .put_bytes("samples/step_10/0.png", b"png-10")
        .unwrap();
    storage.put_bytes("state/step_1/state.json", b"{}").unwrap();
    let dir = tempfile::tempdir().unwrap();
    let local = dir.path().join("model.safetensors");
    let model = content(300_000, 1);
    std::fs::write(&local, &model).unwrap();
    let put = storage.put_file(&local, "anna.safetensors").unwrap();
    assert_eq!(
        (put.bytes, put.sha256.clone()),
        (300_000, sha256_hex(&model))
    );

    // String prefixes, as S3 lists them.
    assert_eq!(
        keys(storage.as_ref(), "samples/step_1"),
        ["samples/step_1/0.png", "samples/step_10/0.png"]
    );
    assert_eq!(
        keys(storage.as_ref(), "samples/step_1/"),
        ["samples/step_1/0.png"]
    );
    assert_eq!(keys(storage.as_ref(), "").len(), 4);
    // Another prefix of the same bucket sees none of it.
    let other = open_storage_with("s3://runs/bob", &settings(&server.endpoint())).unwrap();
    assert!(keys(other.as_ref(), "").is_empty());

    assert_eq!(
        storage.get_bytes("samples/step_10/0.png").unwrap(),
        b"png-10"
    );
    let copy = dir.path().join("down/copy.safetensors");
    let got = storage.get_to_file("anna.safetensors", &copy).unwrap();
    assert_eq!(got.sha256, sha256_hex(&model));
    assert_eq!(std::fs::read(&copy).unwrap(), model);
    assert_eq!(
        storage.stat("anna.safetensors").unwrap().unwrap().size,
        300_000
    );

    assert_eq!(storage.delete_prefix("samples/").unwrap(), 2);
    assert_eq!(
        keys(storage.as_ref(), ""),
        ["anna.safetensors", "state/step_1/state.json"]
    );
    storage.delete("never-existed").unwrap();

    let after = stats::snapshot();
    assert!(after.upload_bytes >= before.upload_bytes + 300_000 + 5 + 6 + 2);
    assert!(after.download_bytes >= before.download_bytes + 300_000 + 6);
    assert!(after.upload_seconds > before.upload_seconds);
}

#[test]
fn large_files_upload_in_parts_and_read_back_identical() {
    let server = server_with_bucket("big");
    let storage = S3Storage::open("s3://big/models", &settings(&server.endpoint())).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let local = dir.path().join("unet.safetensors");
    // Four parts: three of 5 MiB and a short last one.
    let data = content((15 << 20) + 12_345, 7);
    std::fs::write(&local, &data).unwrap();

    let put = storage.put_file(&local, "unet.safetensors").unwrap();
    assert_eq!(put.bytes, data.len() as u64);
    let head = storage.head("unet.safetensors").unwrap().unwrap();
    assert_eq!(head.size, data.len() as u64);
    assert_eq!(head.sha256.as_deref(), Some(sha256_hex(&data).as_str()));
    // S3 marks a multipart object's ETag with its part count.
    assert!(head.etag.ends_with("-4"), "ETag {}", head.etag);

    let copy = dir.path().join("copy");
    let got = storage.get_to_file("unet.safetensors", &copy).unwrap();
    assert_eq!(got.sha256, sha256_hex(&data));
    assert_eq!(std::fs::read(&copy).unwrap(), data);
}

#[test]
fn a_download_whose_bytes_do_not_match_the_recorded_sha256_is_refused() {
    let server = server_with_bucket("data");
    server.put_raw(
        "data",
        "in/photo.png",
        b"the real bytes",
        &sha256_hex(b"other"),
    );
    let storage = S3Storage::open("s3://data/in", &settings(&server.endpoint())).unwrap();
    let before = stats::snapshot();

    let err = storage.get_bytes("photo.png").unwrap_err();
    assert!(matches!(err, StorageError::Unavailable { .. }), "{err}");
    assert!(err.to_string().contains("s3://data/in/photo.png"), "{err}");
    assert!(err.to_string().contains("sha256"), "{err}");

    let dir = tempfile::tempdir().unwrap();
    let local = dir.path().join("photo.png");
    storage.get_to_file("photo.png", &local).unwrap_err();
    assert!(!local.exists(), "a refused download must leave no file");
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    let retried = |s: &stats::TransferStats| s.retries.get("checksum").copied().unwrap_or(0);
    assert!(retried(&stats::snapshot()) >= retried(&before) + 2);
}

#[test]
fn a_missing_object_is_a_permanent_error_naming_its_uri() {
    let server = server_with_bucket("outs");
    let storage = open_storage_with("s3://outs/x", &settings(&server.endpoint())).unwrap();
    let err = storage.get_bytes("manifest.json").unwrap_err();
    assert!(err.is_not_found(), "{err:?}");
    assert!(!err.is_retriable());
    assert!(
        err.to_string().contains("s3://outs/x/manifest.json"),
        "{err}"
    );
    assert!(storage.stat("manifest.json").unwrap().is_none());
    let dir = tempfile::tempdir().unwrap();
    let err = storage
        .get_to_file("manifest.json", &dir.path().join("m"))
        .unwrap_err();
    assert!(err.is_not_found(), "{err:?}");
    assert!(!dir.path().join("m").exists());
}

#[test]
fn a_missing_bucket_is_a_permanent_error_naming_the_bucket() {
    let server = server_with_bucket("exists");
    let err =
        open_storage_with("s3://no-such-bucket/out", &settings(&server.endpoint())).unwrap_err();
    assert!(matches!(err, StorageError::NoSuchBucket { .. }), "{err:?}");
    assert!(!err.is_retriable());
    assert!(err.to_string().contains("no-such-bucket"), "{err}");
}

#[test]
fn refused_credentials_are_a_permanent_error_naming_the_bucket() {
    let server = MotoServer::start_checking_credentials();
    let err = open_storage_with("s3://private/out", &settings(&server.endpoint())).unwrap_err();
    assert!(matches!(err, StorageError::AccessDenied { .. }), "{err:?}");
    assert!(!err.is_retriable());
    let message = err.to_string();
    assert!(message.contains("s3://private/"), "{message}");
    assert!(message.contains("credentials"), "{message}");
}

#[test]
fn an_unreachable_endpoint_is_retriable_after_the_retries() {
    let endpoint = format!("http://127.0.0.1:{}", moto::free_port());
    let before = stats::snapshot();
    let err = open_storage_with("s3://bucket/out", &settings(&endpoint)).unwrap_err();
    assert!(
        matches!(err, StorageError::Unavailable { attempts: 3, .. }),
        "{err:?}"
    );
    assert!(err.is_retriable());
    assert!(err.to_string().contains("s3://bucket/"), "{err}");
    let after = stats::snapshot();
    let count = |s: &stats::TransferStats| s.retries.get("connection").copied().unwrap_or(0);
    assert!(count(&after) >= count(&before) + 2);
    let errors = |s: &stats::TransferStats| s.errors.get("unavailable").copied().unwrap_or(0);
    assert!(errors(&after) > errors(&before));
}

#[test]
fn a_server_killed_mid_upload_fails_retriably_and_leaves_no_object() {
    let mut server = server_with_bucket("crash");
    let storage = S3Storage::open("s3://crash/run", &settings(&server.endpoint())).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let local = dir.path().join("big.bin");
    std::fs::write(&local, content(80 << 20, 3)).unwrap();
    let pid = server.pid();
    let killer = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(300));
        pid
    });
    // Kill from this thread once the upload is underway, through the handle.
    let upload = std::thread::scope(|scope| {
        let job = scope.spawn(|| storage.put_file(&local, "big.bin"));
        killer.join().unwrap();
        server.kill();
        job.join().unwrap()
    });
    let err = upload.unwrap_err();
    assert!(err.is_retriable(), "{err:?}");
    assert!(err.to_string().contains("s3://crash/run/big.bin"), "{err}");
}

#[test]
fn fetched_inputs_are_cached_and_follow_the_remote_prefix() {
    let server = server_with_bucket("inputs");
    let settings = settings(&server.endpoint());
    let source = S3Storage::open("s3://inputs/photos", &settings).unwrap();
    source.put_bytes("a.png", b"aaa").unwrap();
    source.put_bytes("b.png", b"bbb").unwrap();
    source.put_bytes("sub/c.txt", b"caption").unwrap();
    let cache = tempfile::tempdir().unwrap();
    let fetcher = Fetcher::new(Some(cache.path()), settings.clone()).unwrap();

    let folder = fetcher.fetch("s3://inputs/photos", None).unwrap();
    assert!(folder.starts_with(cache.path()));
    assert_eq!(std::fs::read(folder.join("a.png")).unwrap(), b"aaa");
    assert_eq!(std::fs::read(folder.join("sub/c.txt")).unwrap(), b"caption");
    let modified = |p: &Path| std::fs::metadata(p).unwrap().modified().unwrap();
    let first = modified(&folder.join("a.png"));

    // Unchanged objects are not downloaded again; changed and removed ones follow.
    std::thread::sleep(Duration::from_millis(20));
    source.put_bytes("b.png", b"bbb-new").unwrap();
    source.delete("sub/c.txt").unwrap();
    let again = fetcher.fetch("s3://inputs/photos/", None).unwrap();
    assert_eq!(again, folder);
    assert_eq!(modified(&folder.join("a.png")), first);
    assert_eq!(std::fs::read(folder.join("b.png")).unwrap(), b"bbb-new");
    assert!(!folder.join("sub/c.txt").exists());

    // A cached file damaged on disk is noticed and replaced.
    std::fs::write(folder.join("a.png"), b"aab").unwrap();
    fetcher.fetch("s3://inputs/photos", None).unwrap();
    assert_eq!(std::fs::read(folder.join("a.png")).unwrap(), b"aaa");

    // A single object, with a pin.
    let one = fetcher
        .fetch("s3://inputs/photos/a.png", Some(&sha256_hex(b"aaa")))
        .unwrap();
    assert_eq!(std::fs::read(&one).unwrap(), b"aaa");
    let err = fetcher
        .fetch("s3://inputs/photos/a.png", Some(&sha256_hex(b"zzz")))
        .unwrap_err();
    assert!(
        matches!(err, StorageError::ChecksumMismatch { .. }),
        "{err}"
    );

    let err = fetcher.fetch("s3://inputs/nothing-here", None).unwrap_err();
    assert!(err.is_not_found(), "{err:?}");
    assert!(
        err.to_string().contains("s3://inputs/nothing-here"),
        "{err}"
    );
}
