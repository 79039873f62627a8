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

#[test]
fn throttled_requests_are_retried_until_the_server_accepts_them() {
    let server = server_with_bucket("busy");
    // Open through moto directly, so the throttling below hits the transfers themselves.
    let proxy = SlowDownProxy::start(&server.endpoint(), 0);
    let storage = open_storage_with("s3://busy/run", &settings(&proxy.endpoint())).unwrap();
    let before = stats::snapshot();
    proxy.throttle_next(2);
    let put = storage.put_bytes("a.txt", b"after two SlowDowns").unwrap();
    assert_eq!(put.sha256, sha256_hex(b"after two SlowDowns"));
    proxy.throttle_next(2);
    assert_eq!(storage.get_bytes("a.txt").unwrap(), b"after two SlowDowns");
    assert_eq!(proxy.throttled(), 4);
    let after = stats::snapshot();
    let count = |s: &stats::TransferStats| s.retries.get("throttled").copied().unwrap_or(0);
    assert!(count(&after) >= count(&before) + 4);
}

#[test]
fn throttling_past_the_retries_is_retriable_and_writes_nothing() {
    let server = server_with_bucket("busier");
    let proxy = SlowDownProxy::start(&server.endpoint(), 0);
    let storage = open_storage_with("s3://busier/run", &settings(&proxy.endpoint())).unwrap();
    proxy.throttle_next(100);
    let err = storage.put_bytes("b.txt", b"never lands").unwrap_err();
    assert!(
        matches!(err, StorageError::Unavailable { attempts: 3, .. }),
        "{err:?}"
    );
    assert!(err.is_retriable());
    let message = err.to_string();
    assert!(message.contains("s3://busier/run/b.txt"), "{message}");
    assert!(message.contains("SlowDown"), "{message}");
    assert_eq!(proxy.throttled(), 3);
    let direct = open_storage_with("s3://busier/run", &settings(&server.endpoint())).unwrap();
    assert!(direct.stat("b.txt").unwrap().is_none());
}

/// A TCP proxy in front of an S3 endpoint that answers the next `n` requests with
/// S3's `503 SlowDown` and passes the others through. Every request is made the last of
/// its connection (`Connection: close`), so each one meets the decision afresh.
struct SlowDownProxy {
    addr: std::net::SocketAddr,
    /// Requests still to throttle, and requests throttled so far.
    budget: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    throttled: std::sync::Arc<std::sync::atomic::AtomicUsize>,
}

impl SlowDownProxy {
    fn start(upstream_endpoint: &str, throttle: usize) -> Self {
        use std::sync::Arc;
        use std::sync::atomic::AtomicUsize;
        let upstream: std::net::SocketAddr = upstream_endpoint
            .trim_start_matches("http://")
            .parse()
            .expect("an http://host:port endpoint");
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let budget = Arc::new(AtomicUsize::new(throttle));
        let throttled = Arc::new(AtomicUsize::new(0));
        let (b, t) = (budget.clone(), throttled.clone());
        std::thread::spawn(move || {
            for client in listener.incoming().flatten() {
                let (b, t) = (b.clone(), t.clone());
                std::thread::spawn(move || Self::serve(client, upstream, &b, &t));
            }
        });
        SlowDownProxy {
            addr,
            budget,
            throttled,
        }
    }

    fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn throttle_next(&self, n: usize) {
        self.budget.store(n, std::sync::atomic::Ordering::SeqCst);
    }

    fn throttled(&self) -> usize {
        self.throttled.load(std::sync::atomic::Ordering::SeqCst)
    }

    fn serve(
        mut client: std::net::TcpStream,
        upstream: std::net::SocketAddr,
        budget: &std::sync::atomic::AtomicUsize,
        throttled: &std::sync::atomic::AtomicUsize,
    ) {
        use std::io::{BufRead, BufReader, Read, Write};
        use std::sync::atomic::Ordering;
        let mut reader = BufReader::new(client.try_clone().unwrap());
        // Look at the first request's head before deciding what to do with the connection.
        let mut head = Vec::new();
        loop {
            let mut line = String::new();
            if reader.read_line(&mut line).unwrap_or(0) == 0 {
                return;
            }
            let end = line == "\r\n";
            head.extend_from_slice(line.as_bytes());
            if end {
                break;
            }
        }
        let text = String::from_utf8_lossy(&head).to_ascii_lowercase();
        if budget
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok()
        {
            // Drain the body (unless the client waits for `100 Continue`), then refuse.
            let length = text
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .and_then(|v| v.trim().parse::<u64>().ok())
                .unwrap_or(0);
            if !text.contains("expect: 100-continue") {
                let _ = std::io::copy(&mut (&mut reader).take(length), &mut std::io::sink());
            }
            let body = "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Error><Code>SlowDown</Code>\
                        <Message>Please reduce your request rate.</Message>\
                        <RequestId>throttled</RequestId></Error>";
            let _ = write!(
                client,
                "HTTP/1.1 503 Slow Down\r\nContent-Type: application/xml\r\n\
                 Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            throttled.fetch_add(1, Ordering::SeqCst);
            return;
        }
        // Pass the request through, as its connection's last, then the response back.
        let Ok(mut server) = std::net::TcpStream::connect(upstream) else {
            return;
        };
        head.truncate(head.len() - 2);
        head.extend_from_slice(b"Connection: close\r\n\r\n");
        let _ = server.write_all(&head);
        let mut to_server = server.try_clone().unwrap();
        let forward = std::thread::spawn(move || {
            let _ = std::io::copy(&mut reader, &mut to_server);
            let _ = to_server.shutdown(std::net::Shutdown::Write);
        });
        let _ = std::io::copy(&mut server, &mut client);
        let _ = client.shutdown(std::net::Shutdown::Write);
        let _ = forward.join();
    }
}
