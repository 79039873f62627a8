//! Process-wide transfer counters, recorded by every storage backend and read by the
//! metrics endpoint at scrape time. Counters only grow, as Prometheus counters must.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// What every backend has moved since the process started.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct TransferStats {
    pub upload_bytes: u64,
    pub upload_seconds: f64,
    pub download_bytes: u64,
    pub download_seconds: f64,
    /// Retried attempts by kind: `throttled`, `server_error`, `timeout`, `connection`,
    /// `checksum`.
    pub retries: BTreeMap<String, u64>,
    /// Failed transfers (after any retries) by kind: `not_found`, `access_denied`,
    /// `no_such_bucket`, `unreachable`, `checksum`, `too_large`, `io`, `other`.
    pub errors: BTreeMap<String, u64>,
}

static UPLOAD_BYTES: AtomicU64 = AtomicU64::new(0);
static UPLOAD_NANOS: AtomicU64 = AtomicU64::new(0);
static DOWNLOAD_BYTES: AtomicU64 = AtomicU64::new(0);
static DOWNLOAD_NANOS: AtomicU64 = AtomicU64::new(0);
// Kinds are few and bumped rarely (once per retry or failure), so a lock is cheap here.
static RETRIES: Mutex<BTreeMap<&'static str, u64>> = Mutex::new(BTreeMap::new());
static ERRORS: Mutex<BTreeMap<&'static str, u64>> = Mutex::new(BTreeMap::new());

/// The counters as they are now.
pub fn snapshot() -> TransferStats {
    let by_kind = |map: &Mutex<BTreeMap<&'static str, u64>>| {
        map.lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .iter()
            .map(|(kind, n)| (kind.to_string(), *n))
            .collect()
    };
    TransferStats {
        upload_bytes: UPLOAD_BYTES.load(Ordering::Relaxed),
        upload_seconds: nanos_to_seconds(UPLOAD_NANOS.load(Ordering::Relaxed)),
        download_bytes: DOWNLOAD_BYTES.load(Ordering::Relaxed),
        download_seconds: nanos_to_seconds(DOWNLOAD_NANOS.load(Ordering::Relaxed)),
        retries: by_kind(&RETRIES),
        errors: by_kind(&ERRORS),
    }
}

/// A finished upload of `bytes` that took `elapsed`.
pub fn record_upload(bytes: u64, elapsed: Duration) {
    UPLOAD_BYTES.fetch_add(bytes, Ordering::Relaxed);
    UPLOAD_NANOS.fetch_add(duration_nanos(elapsed), Ordering::Relaxed);
}

/// A finished download of `bytes` that took `elapsed`.
pub fn record_download(bytes: u64, elapsed: Duration) {
    DOWNLOAD_BYTES.fetch_add(bytes, Ordering::Relaxed);
    DOWNLOAD_NANOS.fetch_add(duration_nanos(elapsed), Ordering::Relaxed);
}

/// One attempt that failed and will be retried.
pub fn record_retry(kind: &'static str) {
    bump(&RETRIES, kind);
}

/// One operation that failed for good.
pub fn record_error(kind: &'static str) {
    bump(&ERRORS, kind);
}

fn bump(map: &Mutex<BTreeMap<&'static str, u64>>, kind: &'static str) {
    *map.lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
        .entry(kind)
        .or_default() += 1;
}

fn duration_nanos(elapsed: Duration) -> u64 {
    u64::try_from(elapsed.as_nanos()).unwrap_or(u64::MAX)
}

fn nanos_to_seconds(nanos: u64) -> f64 {
    nanos as f64 / 1e9
}

#[cfg(test)]
mod tests {
    use super::*;

    // Other tests in this process transfer too, so these compare growth, not values.
    #[test]
    fn counters_only_grow_by_what_is_recorded() {
        let before = snapshot();
        record_upload(1000, Duration::from_millis(250));
        record_download(10, Duration::from_millis(500));
        record_retry("throttled");
        record_retry("throttled");
        record_error("not_found");
        let after = snapshot();
        assert!(after.upload_bytes >= before.upload_bytes + 1000);
        assert!(after.upload_seconds >= before.upload_seconds + 0.25 - 1e-9);
        assert!(after.download_bytes >= before.download_bytes + 10);
        assert!(after.download_seconds >= before.download_seconds + 0.5 - 1e-9);
        let count = |m: &BTreeMap<String, u64>, k: &str| m.get(k).copied().unwrap_or(0);
        assert!(count(&after.retries, "throttled") >= count(&before.retries, "throttled") + 2);
        assert!(count(&after.errors, "not_found") > count(&before.errors, "not_found"));
    }
}
