//! `https://` base models against a local HTTP server: redirects followed, the sha256
//! pin checked before anything is kept, a size limit, a stalled body timing out as a
//! retriable error, and unpinned files revalidated with their ETag. (Plain `http://` to
//! 127.0.0.1 takes the same code path.)

#[path = "common/http_server.rs"]
mod http_server;

use std::path::Path;
use std::time::Duration;

use dreambooth_trainer::storage::https::HttpsOptions;
use dreambooth_trainer::storage::retry::RetryPolicy;
use dreambooth_trainer::storage::{Fetcher, StorageError, StorageSettings, sha256_hex, stats};
use http_server::{Response, TestServer};

const MODEL: &[u8] = b"pretend these are safetensors bytes";

fn server() -> TestServer {
    TestServer::start(|request| match request.path.as_str() {
        "/models/anna.safetensors" => Response::new(200, MODEL),
        "/download/123" => Response::new(302, "").header("Location", "/models/anna.safetensors"),
        "/download/latest" => Response::new(301, "").header("Location", "/download/123"),
        "/huge.safetensors" => Response::new(200, vec![7u8; 4096]),
        "/stall.safetensors" => Response {
            stall_after: Some(10),
            ..Response::new(200, vec![1u8; 100])
        },
        "/busy.safetensors" => Response::new(503, "try later"),
        _ => Response::new(404, "no"),
    })
}

fn fetcher(cache: &Path) -> Fetcher {
    Fetcher::new(Some(cache), StorageSettings::default())
        .unwrap()
        .with_https_options(HttpsOptions {
            max_bytes: 1024,
            connect_timeout: Duration::from_secs(2),
            read_timeout: Duration::from_millis(500),
            max_redirects: 4,
            retry: RetryPolicy {
                max_attempts: 2,
                base_delay: Duration::from_millis(10),
                max_delay: Duration::from_millis(50),
            },
        })
}

/// Every file below `dir`, temp files included.
fn files_in(dir: &Path) -> Vec<String> {
    let mut found = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for entry in entries.flatten() {
            if entry.path().is_dir() {
                stack.push(entry.path());
            } else {
                found.push(entry.file_name().to_string_lossy().into_owned());
            }
        }
    }
    found.sort();
    found
}

#[test]
fn a_pinned_model_downloads_through_redirects_and_is_reused() {
    let server = server();
    let cache = tempfile::tempdir().unwrap();
    let fetcher = fetcher(cache.path());
    let pin = sha256_hex(MODEL);
    let url = server.url("/download/latest");
    let path = fetcher.fetch(&url, Some(&pin)).unwrap();
    assert_eq!(std::fs::read(&path).unwrap(), MODEL);
    assert_eq!(path.file_name().unwrap(), "latest");
    assert!(path.starts_with(cache.path()));
    let requests = server.requests();
    assert_eq!(
        requests,
        [
            "GET /download/latest",
            "GET /download/123",
            "GET /models/anna.safetensors"
        ]
    );

    // The pin matches the cached file: no second download.
    assert_eq!(fetcher.fetch(&url, Some(&pin)).unwrap(), path);
    assert_eq!(server.requests().len(), 3);

    // The file name comes from the URL, so the loader sees the extension.
    let direct = fetcher
        .fetch(&server.url("/models/anna.safetensors"), None)
        .unwrap();
    assert_eq!(direct.file_name().unwrap(), "anna.safetensors");
}

#[test]
fn a_wrong_sha256_is_refused_and_nothing_is_cached() {
    let server = server();
    let cache = tempfile::tempdir().unwrap();
    let url = server.url("/models/anna.safetensors");
    let err = fetcher(cache.path())
        .fetch(&url, Some(&sha256_hex(b"something else")))
        .unwrap_err();
    assert!(
        matches!(err, StorageError::ChecksumMismatch { .. }),
        "{err}"
    );
    assert!(!err.is_retriable());
    let message = err.to_string();
    assert!(
        message.contains(&url) && message.contains(&sha256_hex(MODEL)),
        "{message}"
    );
    assert_eq!(files_in(cache.path()), Vec::<String>::new());
}

#[test]
fn bodies_over_the_size_limit_are_refused() {
    let server = server();
    let cache = tempfile::tempdir().unwrap();
    let err = fetcher(cache.path())
        .fetch(&server.url("/huge.safetensors"), None)
        .unwrap_err();
    assert!(
        matches!(err, StorageError::TooLarge { limit: 1024, .. }),
        "{err}"
    );
    assert_eq!(files_in(cache.path()), Vec::<String>::new());
}

#[test]
fn a_stalled_download_times_out_as_retriable_and_leaves_nothing() {
    let server = server();
    let cache = tempfile::tempdir().unwrap();
    let before = stats::snapshot();
    let started = std::time::Instant::now();
    let err = fetcher(cache.path())
        .fetch(&server.url("/stall.safetensors"), None)
        .unwrap_err();
    assert!(
        matches!(err, StorageError::Unavailable { attempts: 2, .. }),
        "{err:?}"
    );
    assert!(err.is_retriable());
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "{:?}",
        started.elapsed()
    );
    let timeouts = |s: &stats::TransferStats| s.retries.get("timeout").copied().unwrap_or(0);
    assert!(timeouts(&stats::snapshot()) > timeouts(&before));
    assert_eq!(files_in(cache.path()), Vec::<String>::new());
}

#[test]
fn missing_files_are_permanent_and_server_errors_retriable() {
    let server = server();
    let cache = tempfile::tempdir().unwrap();
    let fetcher = fetcher(cache.path());
    let url = server.url("/gone.safetensors");
    let err = fetcher.fetch(&url, None).unwrap_err();
    assert!(err.is_not_found() && !err.is_retriable(), "{err:?}");
    assert!(err.to_string().contains(&url), "{err}");

    let err = fetcher
        .fetch(&server.url("/busy.safetensors"), None)
        .unwrap_err();
    assert!(err.is_retriable(), "{err:?}");
    assert!(err.to_string().contains("503"), "{err}");
    assert_eq!(
        server
            .requests()
            .iter()
            .filter(|r| r.contains("busy"))
            .count(),
        2
    );
}

#[test]
fn an_unpinned_model_is_revalidated_instead_of_downloaded_again() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    // A server whose file has a version, named by its ETag, that honours If-None-Match.
    let version = Arc::new(AtomicUsize::new(1));
    let bodies = Arc::new(AtomicUsize::new(0));
    let (v, sent) = (version.clone(), bodies.clone());
    let server = TestServer::start(move |request| {
        let etag = format!("\"v{}\"", v.load(Ordering::SeqCst));
        if request.header("if-none-match") == Some(etag.as_str()) {
            return Response::new(304, "");
        }
        sent.fetch_add(1, Ordering::SeqCst);
        Response::new(200, format!("weights {etag}")).header("ETag", etag)
    });
    let cache = tempfile::tempdir().unwrap();
    let url = server.url("/models/m.safetensors");

    let path = fetcher(cache.path()).fetch(&url, None).unwrap();
    assert_eq!(std::fs::read(&path).unwrap(), b"weights \"v1\"");
    // A later attempt (a fresh fetcher, as a new pod would make) asks, and reuses.
    let again = fetcher(cache.path()).fetch(&url, None).unwrap();
    assert_eq!(again, path);
    assert_eq!(bodies.load(Ordering::SeqCst), 1, "the body was sent once");
    assert_eq!(server.requests().len(), 2);

    // Changed on the server: downloaded again.
    version.store(2, Ordering::SeqCst);
    let path = fetcher(cache.path()).fetch(&url, None).unwrap();
    assert_eq!(std::fs::read(&path).unwrap(), b"weights \"v2\"");
    assert_eq!(bodies.load(Ordering::SeqCst), 2);

    // A cached copy changed locally is not vouched for by its validators: downloaded
    // without asking (the server would have answered 304 to the ETag).
    std::fs::write(&path, b"damaged").unwrap();
    let path = fetcher(cache.path()).fetch(&url, None).unwrap();
    assert_eq!(std::fs::read(&path).unwrap(), b"weights \"v2\"");
    assert_eq!(bodies.load(Ordering::SeqCst), 3);
}
