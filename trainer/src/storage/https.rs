//! Read-only `https://` inputs (a base model from a model hub or a Civitai-style link):
//! redirects followed, a size limit, stalls timed out, an optional SHA-256 pin checked
//! before the file is kept. The body streams into a temp file beside the destination and
//! is renamed into place only when complete and verified, so a partial or wrong download
//! is never used and never cached. An unpinned file is kept with the server's validators
//! (`ETag`, `Last-Modified`), and a later attempt asks the server whether it changed
//! (`If-None-Match`, `If-Modified-Since`) instead of downloading it again.

use std::fs;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::fetch::hash_file;
use super::retry::{Failure, RetryPolicy, clock_jitter};
use super::{StorageError, StreamHash, Transferred, stats};

/// Limits for one download.
#[derive(Debug, Clone, PartialEq)]
pub struct HttpsOptions {
    /// Larger bodies are refused (by `Content-Length` up front, else while streaming).
    pub max_bytes: u64,
    pub connect_timeout: Duration,
    /// Longest silence while reading before the attempt counts as stalled.
    pub read_timeout: Duration,
    pub max_redirects: u32,
    pub retry: RetryPolicy,
}

impl Default for HttpsOptions {
    fn default() -> Self {
        HttpsOptions {
            max_bytes: 32 << 30,
            connect_timeout: Duration::from_secs(10),
            read_timeout: Duration::from_secs(60),
            max_redirects: 8,
            retry: RetryPolicy::default(),
        }
    }
}

/// Beside a cached download: what the server said identifies its bytes, and what the
/// local copy must still be for those words to apply to it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Validators {
    etag: Option<String>,
    last_modified: Option<String>,
    size: u64,
    sha256: String,
}

const VALIDATORS_FILE: &str = ".validators.json";

/// The validators of the cached `dest`, when the file is still the one they describe.
fn cached_validators(folder: &Path, dest: &Path) -> Option<Validators> {
    let text = fs::read_to_string(folder.join(VALIDATORS_FILE)).ok()?;
    let validators: Validators = serde_json::from_str(&text).ok()?;
    let size = fs::metadata(dest).ok()?.len();
    let intact = size == validators.size
        && hash_file(dest)
            .ok()
            .is_some_and(|h| h.sha256 == validators.sha256);
    intact.then_some(validators)
}

/// What one attempt got.
enum Fetched {
    /// The server confirmed the cached copy (304).
    NotModified,
    Body {
        temp: tempfile::NamedTempFile,
        done: Transferred,
        etag: Option<String>,
        last_modified: Option<String>,
    },
}

/// Downloads `url` into `folder` (named after the URL's last path segment) and returns
/// the file. With a pin, a cached file that already hashes to it is reused. Without one,
/// a cached file is reused when the server answers 304 to its validators; otherwise (no
/// validators, or the server ignores them) the file is fetched again.
pub fn download_cached(
    url: &str,
    folder: &Path,
    sha256: Option<&str>,
    options: &HttpsOptions,
) -> Result<PathBuf, StorageError> {
    let dest = folder.join(file_name(url)?);
    if let Some(pin) = sha256
        && dest.is_file()
        && hash_file(&dest)?.sha256.eq_ignore_ascii_case(pin)
    {
        tracing::debug!("{url}: using the cached copy");
        return Ok(dest);
    }
    let cached = sha256
        .is_none()
        .then(|| cached_validators(folder, &dest))
        .flatten();
    fs::create_dir_all(folder).map_err(|e| StorageError::io(folder, "create the folder", e))?;
    let agent = ureq::AgentBuilder::new()
        .timeout_connect(options.connect_timeout)
        .timeout_read(options.read_timeout)
        .redirects(options.max_redirects)
        .build();
    let started = Instant::now();
    let mut attempt = 1;
    let (temp, done, etag, last_modified) = loop {
        match try_download(&agent, url, folder, options.max_bytes, cached.as_ref()) {
            Ok(Fetched::NotModified) => {
                tracing::info!("{url}: unchanged on the server (304), using the cached copy");
                return Ok(dest);
            }
            Ok(Fetched::Body {
                temp,
                done,
                etag,
                last_modified,
            }) => break (temp, done, etag, last_modified),
            Err(Failure::Permanent(error)) => return Err(error.counted()),
            Err(Failure::Transient { kind, message }) => {
                if attempt >= options.retry.max_attempts {
                    return Err(StorageError::Unavailable {
                        uri: url.to_string(),
                        attempts: attempt,
                        message,
                    }
                    .counted());
                }
                stats::record_retry(kind);
                tracing::warn!(%url, kind, %message, attempt, "retrying the download");
                std::thread::sleep(options.retry.delay(attempt, clock_jitter()));
                attempt += 1;
            }
        }
    };
    if let Some(pin) = sha256
        && !done.sha256.eq_ignore_ascii_case(pin)
    {
        // `temp` is deleted on drop: nothing of a wrong download stays behind.
        return Err(StorageError::ChecksumMismatch {
            uri: url.to_string(),
            expected: pin.to_ascii_lowercase(),
            actual: done.sha256,
        }
        .counted());
    }
    // Old validators go first: they must never describe the new bytes, even briefly.
    let validators_path = folder.join(VALIDATORS_FILE);
    match fs::remove_file(&validators_path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            return Err(StorageError::io(&validators_path, "remove", e));
        }
        _ => {}
    }
    temp.persist(&dest)
        .map_err(|e| StorageError::io(&dest, "rename the temp file onto", e.error))?;
    stats::record_download(done.bytes, started.elapsed());
    if etag.is_some() || last_modified.is_some() {
        let validators = Validators {
            etag,
            last_modified,
            size: done.bytes,
            sha256: done.sha256,
        };
        let json = serde_json::to_vec(&validators).expect("validators serialize");
        fs::write(&validators_path, json)
            .map_err(|e| StorageError::io(&validators_path, "write", e))?;
    }
    Ok(dest)
}

/// One attempt: the whole body into a fresh temp file, hashed as it streams, or 304 when
/// `cached` validators are sent and the server confirms them.
fn try_download(
    agent: &ureq::Agent,
    url: &str,
    folder: &Path,
    max_bytes: u64,
    cached: Option<&Validators>,
) -> Result<Fetched, Failure<StorageError>> {
    let permanent = |message: String| {
        Failure::Permanent(StorageError::Rejected {
            uri: url.to_string(),
            message,
        })
    };
    let mut request = agent.get(url);
    if let Some(etag) = cached.and_then(|v| v.etag.as_deref()) {
        request = request.set("If-None-Match", etag);
    }
    if let Some(date) = cached.and_then(|v| v.last_modified.as_deref()) {
        request = request.set("If-Modified-Since", date);
    }
    let response = match request.call() {
        Ok(response) if response.status() == 304 && cached.is_some() => {
            return Ok(Fetched::NotModified);
        }
        // Redirects left unfollowed, or a 304 to a request that asked for none.
        Ok(response) if !(200..300).contains(&response.status()) => {
            return Err(permanent(format!(
                "HTTP {} {}",
                response.status(),
                response.status_text()
            )));
        }
        Ok(response) => response,
        Err(ureq::Error::Status(status, response)) => {
            let detail = format!("HTTP {status} {}", response.status_text());
            return Err(match status {
                404 | 410 => Failure::Permanent(StorageError::NotFound {
                    location: url.to_string(),
                }),
                401 | 403 => Failure::Permanent(StorageError::AccessDenied {
                    uri: url.to_string(),
                    message: detail,
                }),
                429 => Failure::Transient {
                    kind: "throttled",
                    message: detail,
                },
                500.. => Failure::Transient {
                    kind: "server_error",
                    message: detail,
                },
                _ => permanent(detail),
            });
        }
        Err(ureq::Error::Transport(transport)) => return Err(transport_failure(&transport)),
    };
    let declared = response
        .header("Content-Length")
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|length| length > max_bytes) {
        return Err(Failure::Permanent(StorageError::TooLarge {
            uri: url.to_string(),
            limit: max_bytes,
        }));
    }
    let etag = response.header("ETag").map(str::to_owned);
    let last_modified = response.header("Last-Modified").map(str::to_owned);
    let mut temp = tempfile::Builder::new()
        .prefix(".download.")
        .suffix(".partial")
        .tempfile_in(folder)
        .map_err(|e| Failure::Permanent(StorageError::io(folder, "create a temp file in", e)))?;
    let mut reader = response.into_reader();
    let mut hash = StreamHash::default();
    let mut buffer = vec![0u8; 1 << 20];
    loop {
        let n = match reader.read(&mut buffer) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => {
                let kind = if matches!(
                    e.kind(),
                    std::io::ErrorKind::TimedOut | std::io::ErrorKind::WouldBlock
                ) {
                    "timeout"
                } else {
                    "connection"
                };
                return Err(Failure::Transient {
                    kind,
                    message: format!("reading the body: {e}"),
                });
            }
        };
        hash.update(&buffer[..n]);
        if hash.bytes() > max_bytes {
            return Err(Failure::Permanent(StorageError::TooLarge {
                uri: url.to_string(),
                limit: max_bytes,
            }));
        }
        temp.write_all(&buffer[..n])
            .map_err(|e| Failure::Permanent(StorageError::io(temp.path(), "write", e)))?;
    }
    temp.as_file()
        .sync_all()
        .map_err(|e| Failure::Permanent(StorageError::io(temp.path(), "fsync", e)))?;
    Ok(Fetched::Body {
        temp,
        done: hash.finish(),
        etag,
        last_modified,
    })
}

fn transport_failure(transport: &ureq::Transport) -> Failure<StorageError> {
    let message = transport.to_string();
    let timed_out = std::error::Error::source(transport)
        .and_then(|s| s.downcast_ref::<std::io::Error>())
        .is_some_and(|e| {
            matches!(
                e.kind(),
                std::io::ErrorKind::TimedOut | std::io::ErrorKind::WouldBlock
            )
        });
    match transport.kind() {
        ureq::ErrorKind::InvalidUrl | ureq::ErrorKind::UnknownScheme => {
            Failure::Permanent(StorageError::InvalidUri {
                uri: transport
                    .url()
                    .map(|u| u.to_string())
                    .unwrap_or_else(|| message.clone()),
                reason: message,
            })
        }
        ureq::ErrorKind::TooManyRedirects => Failure::Permanent(StorageError::Rejected {
            uri: transport.url().map(|u| u.to_string()).unwrap_or_default(),
            message,
        }),
        _ if timed_out => Failure::Transient {
            kind: "timeout",
            message,
        },
        _ => Failure::Transient {
            kind: "connection",
            message,
        },
    }
}

/// The URL's last path segment, which names the cached file (and tells the loader
/// whether it is `.safetensors` or `.ckpt`).
fn file_name(url: &str) -> Result<String, StorageError> {
    let path = url
        .split_once("://")
        .map(|(_, rest)| rest)
        .unwrap_or(url)
        .split(['?', '#'])
        .next()
        .unwrap_or("");
    let name = path
        .split_once('/')
        .map(|(_, p)| p)
        .unwrap_or("")
        .rsplit('/')
        .next()
        .unwrap_or("");
    if name.is_empty() || name == "." || name == ".." {
        return Err(StorageError::InvalidUri {
            uri: url.to_string(),
            reason: "the URL must end in a file name (`…/model.safetensors`)".into(),
        });
    }
    Ok(name.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cached_file_is_named_after_the_last_path_segment() {
        assert_eq!(
            file_name("https://host/a/b/model.safetensors?download=true").unwrap(),
            "model.safetensors"
        );
        assert_eq!(file_name("http://127.0.0.1:8/m.ckpt").unwrap(), "m.ckpt");
        for bad in ["https://host", "https://host/", "https://host/a/"] {
            assert!(file_name(bad).unwrap_err().to_string().contains(bad));
        }
    }
}
