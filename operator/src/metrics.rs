//! The operator's Prometheus metrics (`dreambooth_operator_*`), served on `/metrics`.

use prometheus::{
    Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGaugeVec, Opts, Registry,
    TextEncoder,
};

use dreambooth_api::Phase;

/// Phases as label values, in the order the CRD lists them.
pub const PHASES: [Phase; 5] = [
    Phase::Pending,
    Phase::Running,
    Phase::Suspended,
    Phase::Succeeded,
    Phase::Failed,
];

pub fn phase_label(phase: Phase) -> &'static str {
    match phase {
        Phase::Pending => "Pending",
        Phase::Running => "Running",
        Phase::Suspended => "Suspended",
        Phase::Succeeded => "Succeeded",
        Phase::Failed => "Failed",
    }
}

#[derive(Clone)]
pub struct OperatorMetrics {
    registry: Registry,
    pub reconciliations: IntCounterVec,
    pub reconcile_errors: IntCounterVec,
    pub reconcile_duration: Histogram,
    pub sessions: IntGaugeVec,
    pub session_attempts: IntGaugeVec,
    pub queue_wait: Histogram,
    pub session_duration: HistogramVec,
    pub progress_polls: IntCounterVec,
    pub jobs_created: IntCounter,
}

impl Default for OperatorMetrics {
    fn default() -> Self {
        Self::new()
    }
}

impl OperatorMetrics {
    pub fn new() -> Self {
        let registry = Registry::new();
        let counter_vec = |name: &str, help: &str, labels: &[&str]| {
            let metric = IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric");
            registry
                .register(Box::new(metric.clone()))
                .expect("registered once");
            metric
        };
        let gauge_vec = |name: &str, help: &str, labels: &[&str]| {
            let metric = IntGaugeVec::new(Opts::new(name, help), labels).expect("valid metric");
            registry
                .register(Box::new(metric.clone()))
                .expect("registered once");
            metric
        };
        let histogram = |name: &str, help: &str, buckets: Vec<f64>| {
            let metric = Histogram::with_opts(HistogramOpts::new(name, help).buckets(buckets))
                .expect("valid metric");
            registry
                .register(Box::new(metric.clone()))
                .expect("registered once");
            metric
        };
        let reconciliations = counter_vec(
            "dreambooth_operator_reconciliations_total",
            "Reconciles of a session, by result (ok, error).",
            &["result"],
        );
        let reconcile_errors = counter_vec(
            "dreambooth_operator_reconcile_errors_total",
            "Failed reconciles, by kind of error.",
            &["kind"],
        );
        let reconcile_duration = histogram(
            "dreambooth_operator_reconcile_duration_seconds",
            "Time one reconcile took.",
            vec![
                0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
            ],
        );
        let sessions = gauge_vec(
            "dreambooth_operator_sessions",
            "Sessions by phase.",
            &["phase"],
        );
        let session_attempts = gauge_vec(
            "dreambooth_operator_session_attempts",
            "Jobs started for a session, the first included.",
            &["namespace", "session"],
        );
        let queue_wait = histogram(
            "dreambooth_operator_queue_wait_seconds",
            "From a session's first Job to its trainer running (scheduling, Kueue, image pull).",
            vec![
                1.0, 5.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0, 14400.0,
            ],
        );
        let session_duration = HistogramVec::new(
            HistogramOpts::new(
                "dreambooth_operator_session_duration_seconds",
                "From a session's start to its end, by final phase.",
            )
            .buckets(vec![
                60.0, 300.0, 600.0, 1200.0, 1800.0, 3600.0, 7200.0, 14400.0, 43200.0, 86400.0,
            ]),
            &["phase"],
        )
        .expect("valid metric");
        registry
            .register(Box::new(session_duration.clone()))
            .expect("registered once");
        let progress_polls = counter_vec(
            "dreambooth_operator_progress_polls_total",
            "Polls of a trainer's /progress, by result (ok, error).",
            &["result"],
        );
        let jobs_created = IntCounter::new(
            "dreambooth_operator_jobs_created_total",
            "Training Jobs created, retries included.",
        )
        .expect("valid metric");
        registry
            .register(Box::new(jobs_created.clone()))
            .expect("registered once");
        for phase in PHASES {
            sessions.with_label_values(&[phase_label(phase)]).set(0);
        }
        for result in ["ok", "error"] {
            reconciliations.with_label_values(&[result]);
            progress_polls.with_label_values(&[result]);
        }
        OperatorMetrics {
            registry,
            reconciliations,
            reconcile_errors,
            reconcile_duration,
            sessions,
            session_attempts,
            queue_wait,
            session_duration,
            progress_polls,
            jobs_created,
        }
    }

    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        TextEncoder::new()
            .encode_to_string(&self.registry.gather())
            .expect("metrics encode as text")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_contract_metric_is_exposed() {
        let metrics = OperatorMetrics::new();
        metrics.reconcile_errors.with_label_values(&["kube"]).inc();
        metrics
            .session_attempts
            .with_label_values(&["ns", "anna"])
            .set(2);
        metrics.reconcile_duration.observe(0.01);
        metrics.queue_wait.observe(3.0);
        metrics
            .session_duration
            .with_label_values(&["Succeeded"])
            .observe(100.0);
        metrics.jobs_created.inc();
        let text = metrics.render();
        for name in [
            "dreambooth_operator_reconciliations_total{result=\"ok\"} 0",
            "dreambooth_operator_reconcile_errors_total{kind=\"kube\"} 1",
            "dreambooth_operator_reconcile_duration_seconds_bucket",
            "dreambooth_operator_sessions{phase=\"Running\"} 0",
            "dreambooth_operator_session_attempts{namespace=\"ns\",session=\"anna\"} 2",
            "dreambooth_operator_queue_wait_seconds_count 1",
            "dreambooth_operator_session_duration_seconds_count{phase=\"Succeeded\"} 1",
            "dreambooth_operator_progress_polls_total{result=\"error\"} 0",
            "dreambooth_operator_jobs_created_total 1",
        ] {
            assert!(text.contains(name), "missing `{name}` in\n{text}");
        }
    }
}
