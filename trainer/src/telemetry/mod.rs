//! What a running trainer tells the outside: Prometheus metrics, the `Progress` JSON the
//! operator polls, and a health check, all on one HTTP port (`--listen`).
//!
//! The training loop only hands progress snapshots to [`Telemetry::record`]; the server
//! thread reads the latest one, and the storage and GPU counters, when asked.

pub mod metrics;
pub mod server;

use std::sync::Mutex;
use std::time::{Instant, SystemTime};

use dreambooth_api::{ExitKind, Progress, Stage};

use crate::export::manifest::rfc3339_utc;

pub use metrics::TrainerMetrics;
pub use server::{TelemetryServer, serve};

/// The state shared by the training thread (writer) and the HTTP thread (reader).
pub struct Telemetry {
    pub metrics: TrainerMetrics,
    progress: Mutex<Progress>,
    /// The CUDA device whose allocator is reported, when training on one.
    gpu: Option<usize>,
    preparing_since: Mutex<Option<Instant>>,
}

impl Telemetry {
    pub fn new(session: &str, device: tch::Device) -> Self {
        let metrics = TrainerMetrics::new(session);
        let gpu = match device {
            tch::Device::Cuda(index) => Some(index),
            _ => None,
        };
        if gpu.is_some() {
            metrics.track_gpu_memory();
        }
        Self {
            metrics,
            progress: Mutex::new(Progress {
                session: session.to_owned(),
                ..Progress::default()
            }),
            gpu,
            preparing_since: Mutex::new(None),
        }
    }

    /// Takes the training loop's latest snapshot. Data preparation is timed from the
    /// first `preparing` snapshot to the first one of a later stage.
    pub fn record(&self, progress: &Progress) {
        self.metrics.observe_progress(progress);
        {
            let mut since = lock(&self.preparing_since);
            match progress.stage {
                Stage::Downloading => {}
                Stage::Preparing => {
                    since.get_or_insert_with(Instant::now);
                }
                _ => {
                    if let Some(started) = since.take() {
                        self.metrics
                            .set_data_preparation_seconds(started.elapsed().as_secs_f64());
                    }
                }
            }
        }
        let mut latest = progress.clone();
        // The operator tells a stalled trainer from a slow step by this time.
        latest
            .updated_at
            .get_or_insert_with(|| rfc3339_utc(SystemTime::now()));
        *lock(&self.progress) = latest;
    }

    /// The latest snapshot.
    pub fn progress(&self) -> Progress {
        lock(&self.progress).clone()
    }

    /// Counts a session that ended in failure, by its exit kind.
    pub fn record_failure(&self, kind: ExitKind) {
        let label = match kind {
            ExitKind::Succeeded | ExitKind::Preempted => return,
            ExitKind::Internal => "internal",
            ExitKind::BadConfig => "bad_config",
            ExitKind::BadData => "bad_data",
            ExitKind::Retriable => "retriable",
        };
        self.metrics.record_error(label);
    }

    /// The metrics text, with the storage and GPU counters read now.
    pub fn render_metrics(&self) -> String {
        self.metrics
            .sync_transfers(&crate::storage::stats::snapshot());
        if let Some(device) = self.gpu
            && let Ok(Some(stats)) = crate::cuda::memory_stats(device)
        {
            self.metrics.observe_gpu_memory(stats);
        }
        self.metrics.encode()
    }
}

/// A panic elsewhere must not take the endpoints down with it.
fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn data_preparation_is_timed_until_training_starts() {
        let telemetry = Telemetry::new("s", tch::Device::Cpu);
        let at = |stage| Progress {
            session: "s".into(),
            stage,
            total_steps: 4,
            ..Progress::default()
        };
        telemetry.record(&at(Stage::Preparing));
        std::thread::sleep(std::time::Duration::from_millis(30));
        telemetry.record(&at(Stage::Preparing));
        telemetry.record(&at(Stage::TextEncoder));
        let text = telemetry.render_metrics();
        let seconds: f64 = text
            .lines()
            .find(|l| l.starts_with("dreambooth_trainer_data_preparation_seconds{"))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
            .unwrap();
        assert!((0.03..5.0).contains(&seconds), "{seconds}");
        let latest = telemetry.progress();
        assert_eq!(latest.stage, Stage::TextEncoder);
        let stamped = latest.updated_at.expect("a snapshot time");
        assert!(stamped.ends_with('Z') && stamped.len() >= 20, "{stamped}");
    }

    #[test]
    fn failures_are_counted_by_kind_and_success_is_not() {
        let telemetry = Telemetry::new("s", tch::Device::Cpu);
        telemetry.record_failure(ExitKind::BadData);
        telemetry.record_failure(ExitKind::Succeeded);
        telemetry.record_failure(ExitKind::Preempted);
        let text = telemetry.render_metrics();
        assert!(
            text.contains("dreambooth_trainer_errors_total{kind=\"bad_data\",session=\"s\"} 1"),
            "{text}"
        );
        assert!(!text.contains("kind=\"succeeded\"") && !text.contains("kind=\"preempted\""));
    }
}
