//! `TrainerMetrics`: the Prometheus series a trainer pod exposes, every one labelled
//! with the session name. Names are part of the contract with the Helm chart's
//! dashboard and alerts, so they are spelled out here once.

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;

use dreambooth_api::{Progress, Stage};
use prometheus::{
    Counter, Gauge, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry,
};

use crate::cuda::MemoryStats;
use crate::storage::stats::TransferStats;

/// Every stage, in run order, with its `phase` label value.
pub const PHASES: [(Stage, &str); 6] = [
    (Stage::Downloading, "downloading"),
    (Stage::Preparing, "preparing"),
    (Stage::TextEncoder, "text_encoder"),
    (Stage::Unet, "unet"),
    (Stage::Exporting, "exporting"),
    (Stage::Done, "done"),
];

/// The trainer's series, registered in its own registry with `session` as a constant label.
pub struct TrainerMetrics {
    registry: Registry,
    step: IntGauge,
    total_steps: IntGauge,
    phase: IntGaugeVec,
    loss: Gauge,
    learning_rate: Gauge,
    steps_per_second: Gauge,
    images_per_second: Gauge,
    eta_seconds: Gauge,
    gpu_memory_allocated_bytes: IntGauge,
    gpu_memory_peak_bytes: IntGauge,
    upload_bytes: IntCounter,
    upload_seconds: Counter,
    download_bytes: IntCounter,
    download_seconds: Counter,
    data_preparation_seconds: Gauge,
    retries: IntCounterVec,
    errors: IntCounterVec,
    /// What the storage layer had counted at the last sync, so counters that this
    /// process also bumps itself (session errors) grow only by the storage's growth.
    synced: Mutex<TransferStats>,
}

impl TrainerMetrics {
    pub fn new(session: &str) -> Self {
        let labels = HashMap::from([("session".to_owned(), session.to_owned())]);
        let registry = Registry::new_custom(None, Some(labels)).expect("a valid label set");
        let opts = |name: &str, help: &str| Opts::new(format!("dreambooth_trainer_{name}"), help);
        let metrics = Self {
            step: IntGauge::with_opts(opts("step", "Optimizer steps done, over both phases"))
                .expect("valid metric"),
            total_steps: IntGauge::with_opts(opts(
                "total_steps",
                "Optimizer steps in the whole session",
            ))
            .expect("valid metric"),
            phase: IntGaugeVec::new(
                opts(
                    "phase",
                    "1 for the stage the session is in, 0 for the others",
                ),
                &["phase"],
            )
            .expect("valid metric"),
            loss: Gauge::with_opts(opts("loss", "Loss of the latest step")).expect("valid metric"),
            learning_rate: Gauge::with_opts(opts(
                "learning_rate",
                "Learning rate of the latest step",
            ))
            .expect("valid metric"),
            steps_per_second: Gauge::with_opts(opts(
                "steps_per_second",
                "Training speed since this run started",
            ))
            .expect("valid metric"),
            images_per_second: Gauge::with_opts(opts(
                "images_per_second",
                "Training images per second since this run started",
            ))
            .expect("valid metric"),
            eta_seconds: Gauge::with_opts(opts("eta_seconds", "Seconds left at the current speed"))
                .expect("valid metric"),
            gpu_memory_allocated_bytes: IntGauge::with_opts(opts(
                "gpu_memory_allocated_bytes",
                "Bytes held by tensors on the GPU (CUDA caching allocator)",
            ))
            .expect("valid metric"),
            gpu_memory_peak_bytes: IntGauge::with_opts(opts(
                "gpu_memory_peak_bytes",
                "Most bytes held by tensors on the GPU at once",
            ))
            .expect("valid metric"),
            upload_bytes: IntCounter::with_opts(opts(
                "upload_bytes_total",
                "Bytes written to storage",
            ))
            .expect("valid metric"),
            upload_seconds: Counter::with_opts(opts(
                "upload_seconds_total",
                "Seconds spent writing to storage",
            ))
            .expect("valid metric"),
            download_bytes: IntCounter::with_opts(opts(
                "download_bytes_total",
                "Bytes read from storage",
            ))
            .expect("valid metric"),
            download_seconds: Counter::with_opts(opts(
                "download_seconds_total",
                "Seconds spent reading from storage",
            ))
            .expect("valid metric"),
            data_preparation_seconds: Gauge::with_opts(opts(
                "data_preparation_seconds",
                "Seconds from the start of data preparation to the first training step",
            ))
            .expect("valid metric"),
            retries: IntCounterVec::new(
                opts("retries_total", "Storage attempts retried, by kind"),
                &["kind"],
            )
            .expect("valid metric"),
            errors: IntCounterVec::new(opts("errors_total", "Failures, by kind"), &["kind"])
                .expect("valid metric"),
            synced: Mutex::new(TransferStats::default()),
            registry,
        };
        metrics.register_all();
        metrics.set_stage(Stage::Downloading);
        metrics
    }

    fn register_all(&self) {
        let collectors: [Box<dyn prometheus::core::Collector>; 15] = [
            Box::new(self.step.clone()),
            Box::new(self.total_steps.clone()),
            Box::new(self.phase.clone()),
            Box::new(self.loss.clone()),
            Box::new(self.learning_rate.clone()),
            Box::new(self.steps_per_second.clone()),
            Box::new(self.images_per_second.clone()),
            Box::new(self.eta_seconds.clone()),
            Box::new(self.upload_bytes.clone()),
            Box::new(self.upload_seconds.clone()),
            Box::new(self.download_bytes.clone()),
            Box::new(self.download_seconds.clone()),
            Box::new(self.data_preparation_seconds.clone()),
            Box::new(self.retries.clone()),
            Box::new(self.errors.clone()),
        ];
        for collector in collectors {
            self.registry
                .register(collector)
                .expect("metric names are unique");
        }
    }

    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// Adds the GPU memory gauges; only a CUDA run has them, so a CPU run shows no
    /// misleading zeros.
    pub fn track_gpu_memory(&self) {
        for gauge in [
            &self.gpu_memory_allocated_bytes,
            &self.gpu_memory_peak_bytes,
        ] {
            // Registering twice is harmless: the second attempt is refused.
            let _ = self.registry.register(Box::new(gauge.clone()));
        }
    }

    /// Copies a progress snapshot into the gauges. Values a snapshot does not know yet
    /// (the loss before the first step) keep their previous value.
    pub fn observe_progress(&self, progress: &Progress) {
        self.step.set(i64::from(progress.step));
        self.total_steps.set(i64::from(progress.total_steps));
        self.set_stage(progress.stage);
        let optional = [
            (&self.loss, progress.loss),
            (&self.learning_rate, progress.learning_rate),
            (&self.steps_per_second, progress.steps_per_second),
            (&self.images_per_second, progress.images_per_second),
            (&self.eta_seconds, progress.eta_seconds),
        ];
        for (gauge, value) in optional {
            if let Some(value) = value {
                gauge.set(value);
            }
        }
    }

    fn set_stage(&self, stage: Stage) {
        for (each, label) in PHASES {
            self.phase
                .with_label_values(&[label])
                .set(i64::from(each == stage));
        }
    }

    pub fn set_data_preparation_seconds(&self, seconds: f64) {
        self.data_preparation_seconds.set(seconds);
    }

    pub fn observe_gpu_memory(&self, stats: MemoryStats) {
        self.gpu_memory_allocated_bytes.set(stats.allocated);
        self.gpu_memory_peak_bytes.set(stats.peak);
    }

    /// Counts one failure of `kind` that did not come from the storage layer (the
    /// session's own `bad_config`, `bad_data`...).
    pub fn record_error(&self, kind: &str) {
        self.errors.with_label_values(&[kind]).inc();
    }

    /// Brings the transfer counters up to the storage layer's process-wide totals.
    /// Counters only grow, so a total lower than the highest one seen is ignored.
    pub fn sync_transfers(&self, now: &TransferStats) {
        let mut seen = self.synced.lock().unwrap_or_else(|p| p.into_inner());
        let grow = |counter: &IntCounter, seen: &mut u64, now: u64| {
            counter.inc_by(now.saturating_sub(*seen));
            *seen = (*seen).max(now);
        };
        grow(&self.upload_bytes, &mut seen.upload_bytes, now.upload_bytes);
        grow(
            &self.download_bytes,
            &mut seen.download_bytes,
            now.download_bytes,
        );
        let grow_seconds = |counter: &Counter, seen: &mut f64, now: f64| {
            counter.inc_by((now - *seen).max(0.0));
            *seen = seen.max(now);
        };
        grow_seconds(
            &self.upload_seconds,
            &mut seen.upload_seconds,
            now.upload_seconds,
        );
        grow_seconds(
            &self.download_seconds,
            &mut seen.download_seconds,
            now.download_seconds,
        );
        grow_by_kind(&self.retries, &mut seen.retries, &now.retries);
        grow_by_kind(&self.errors, &mut seen.errors, &now.errors);
    }

    /// The registry in Prometheus' text format.
    pub fn encode(&self) -> String {
        prometheus::TextEncoder::new()
            .encode_to_string(&self.registry.gather())
            .expect("text encoding of gathered metrics")
    }
}

fn grow_by_kind(
    counter: &IntCounterVec,
    seen: &mut BTreeMap<String, u64>,
    now: &BTreeMap<String, u64>,
) {
    for (kind, &total) in now {
        let before = seen.entry(kind.clone()).or_default();
        counter
            .with_label_values(&[kind.as_str()])
            .inc_by(total.saturating_sub(*before));
        *before = (*before).max(total);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The value of the sample `name{labels}` in text-format output.
    fn sample(text: &str, name: &str, labels: &str) -> Option<f64> {
        text.lines()
            .filter(|l| !l.starts_with('#'))
            .find(|l| {
                l.split_once(' ').is_some_and(|(series, _)| {
                    series.starts_with(name)
                        && series[name.len()..].starts_with('{')
                        && series.contains(labels)
                })
            })
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
    }

    #[test]
    fn every_series_carries_the_session_label_and_the_contract_name() {
        let metrics = TrainerMetrics::new("anna");
        metrics.sync_transfers(&TransferStats {
            retries: BTreeMap::from([("throttled".into(), 1)]),
            errors: BTreeMap::from([("not_found".into(), 1)]),
            ..TransferStats::default()
        });
        let text = metrics.encode();
        for name in [
            "step",
            "total_steps",
            "phase",
            "loss",
            "learning_rate",
            "steps_per_second",
            "images_per_second",
            "eta_seconds",
            "upload_bytes_total",
            "upload_seconds_total",
            "download_bytes_total",
            "download_seconds_total",
            "data_preparation_seconds",
            "retries_total",
            "errors_total",
        ] {
            let full = format!("dreambooth_trainer_{name}");
            assert!(
                sample(&text, &full, "session=\"anna\"").is_some(),
                "{full} missing:\n{text}"
            );
        }
        assert!(!text.contains("gpu_memory"), "a CPU run has no GPU gauges");
        metrics.track_gpu_memory();
        metrics.observe_gpu_memory(MemoryStats {
            allocated: 1 << 30,
            peak: 3 << 30,
        });
        let text = metrics.encode();
        assert_eq!(
            sample(&text, "dreambooth_trainer_gpu_memory_peak_bytes", "anna"),
            Some(f64::from(3u32 << 30))
        );
    }

    #[test]
    fn progress_sets_the_gauges_and_exactly_one_phase() {
        let metrics = TrainerMetrics::new("s");
        metrics.observe_progress(&Progress {
            session: "s".into(),
            stage: Stage::Unet,
            step: 7,
            total_steps: 12,
            loss: Some(0.25),
            learning_rate: Some(2e-4),
            steps_per_second: Some(4.0),
            images_per_second: Some(8.0),
            eta_seconds: Some(1.25),
            ..Progress::default()
        });
        // A later snapshot without a loss keeps the last one.
        metrics.observe_progress(&Progress {
            session: "s".into(),
            stage: Stage::Unet,
            step: 8,
            total_steps: 12,
            ..Progress::default()
        });
        let text = metrics.encode();
        assert_eq!(sample(&text, "dreambooth_trainer_step", ""), Some(8.0));
        assert_eq!(
            sample(&text, "dreambooth_trainer_total_steps", ""),
            Some(12.0)
        );
        assert_eq!(sample(&text, "dreambooth_trainer_loss", ""), Some(0.25));
        assert_eq!(
            sample(&text, "dreambooth_trainer_learning_rate", ""),
            Some(2e-4)
        );
        assert_eq!(
            sample(&text, "dreambooth_trainer_images_per_second", ""),
            Some(8.0)
        );
        assert_eq!(
            sample(&text, "dreambooth_trainer_eta_seconds", ""),
            Some(1.25)
        );
        for (_, label) in PHASES {
            let expected = if label == "unet" { 1.0 } else { 0.0 };
            assert_eq!(
                sample(
                    &text,
                    "dreambooth_trainer_phase",
                    &format!("phase=\"{label}\"")
                ),
                Some(expected),
                "{label}"
            );
        }
    }

    #[test]
    fn transfer_counters_follow_the_storage_totals_and_never_shrink() {
        let metrics = TrainerMetrics::new("s");
        metrics.record_error("bad_data");
        let mut stats = TransferStats {
            upload_bytes: 1000,
            upload_seconds: 0.5,
            download_bytes: 40,
            download_seconds: 0.25,
            retries: BTreeMap::from([("throttled".into(), 2)]),
            errors: BTreeMap::from([("bad_data".into(), 1)]),
        };
        metrics.sync_transfers(&stats);
        stats.upload_bytes = 1500;
        stats.retries.insert("throttled".into(), 5);
        stats.retries.insert("timeout".into(), 1);
        metrics.sync_transfers(&stats);
        // A stale, lower reading must not move anything backwards.
        metrics.sync_transfers(&TransferStats::default());
        metrics.sync_transfers(&stats);
        let text = metrics.encode();
        assert_eq!(
            sample(&text, "dreambooth_trainer_upload_bytes_total", ""),
            Some(1500.0)
        );
        assert_eq!(
            sample(&text, "dreambooth_trainer_upload_seconds_total", ""),
            Some(0.5)
        );
        assert_eq!(
            sample(&text, "dreambooth_trainer_download_bytes_total", ""),
            Some(40.0)
        );
        assert_eq!(
            sample(
                &text,
                "dreambooth_trainer_retries_total",
                "kind=\"throttled\""
            ),
            Some(5.0)
        );
        assert_eq!(
            sample(
                &text,
                "dreambooth_trainer_retries_total",
                "kind=\"timeout\""
            ),
            Some(1.0)
        );
        // The session's own count and the storage's add up.
        assert_eq!(
            sample(
                &text,
                "dreambooth_trainer_errors_total",
                "kind=\"bad_data\""
            ),
            Some(2.0)
        );
    }
}
