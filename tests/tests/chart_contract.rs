//! The chart against the code it deploys: its RBAC grants exactly the permissions the
//! operator's code uses (`dreambooth_operator::rbac::RULES`), and every metric the Grafana
//! dashboard queries is one the operator or the trainer exports.

#[allow(dead_code)]
mod chart_support;

use std::collections::{BTreeMap, BTreeSet};

use chart_support::{Triple, dashboard, dashboard_metric_names, read_rules};
use dreambooth_api::{Progress, Stage};
use dreambooth_operator::metrics::OperatorMetrics;
use dreambooth_operator::rbac::{LEADER_ELECTION_RULES, PolicyRule, RULES};
use dreambooth_trainer::cuda::MemoryStats;
use dreambooth_trainer::storage::stats::TransferStats;
use dreambooth_trainer::telemetry::TrainerMetrics;
use prometheus::proto::MetricType;

fn chart_rules(file: &str) -> BTreeSet<Triple> {
    read_rules(&chart_support::chart_dir().join("files/rbac").join(file))
        .into_iter()
        .collect()
}

fn triples(rules: &[PolicyRule]) -> BTreeSet<Triple> {
    rules
        .iter()
        .flat_map(|rule| {
            rule.verbs.iter().map(|verb| Triple {
                api_group: rule.api_group.to_owned(),
                resource: rule.resource.to_owned(),
                verb: (*verb).to_owned(),
            })
        })
        .collect()
}

#[test]
fn chart_rbac_is_exactly_what_the_operator_uses() {
    for (file, rules) in [
        ("operator.yaml", RULES),
        ("leader-election.yaml", LEADER_ELECTION_RULES),
    ] {
        let chart = chart_rules(file);
        let code = triples(rules);
        let missing: Vec<&Triple> = code.difference(&chart).collect();
        let extra: Vec<&Triple> = chart.difference(&code).collect();
        assert!(
            missing.is_empty(),
            "the operator uses permissions files/rbac/{file} does not grant: {missing:#?}"
        );
        assert!(
            extra.is_empty(),
            "files/rbac/{file} grants permissions the operator never uses: {extra:#?}"
        );
        assert!(
            code.iter().all(|t| t.resource != "secrets"),
            "the operator must never touch Secrets"
        );
    }
}

/// Family name → type, from a registry's gather().
fn families(registry: &prometheus::Registry) -> BTreeMap<String, MetricType> {
    registry
        .gather()
        .iter()
        .map(|f| (f.name().to_owned(), f.get_field_type()))
        .collect()
}

/// A trainer registry with every series present: labelled families only appear in
/// gather() once a label value has been used.
fn trainer_families() -> BTreeMap<String, MetricType> {
    let metrics = TrainerMetrics::new("contract");
    metrics.track_gpu_memory();
    metrics.observe_gpu_memory(MemoryStats {
        allocated: 1 << 30,
        peak: 2 << 30,
    });
    metrics.observe_progress(&Progress {
        session: "contract".into(),
        stage: Stage::Unet,
        step: 10,
        total_steps: 100,
        loss: Some(0.1),
        learning_rate: Some(2e-6),
        steps_per_second: Some(5.0),
        images_per_second: Some(5.0),
        eta_seconds: Some(18.0),
        ..Progress::default()
    });
    metrics.set_data_preparation_seconds(3.0);
    metrics.record_error("bad_data");
    metrics.sync_transfers(&TransferStats {
        upload_bytes: 10,
        upload_seconds: 0.5,
        download_bytes: 20,
        download_seconds: 1.0,
        retries: BTreeMap::from([("throttled".to_owned(), 1)]),
        errors: BTreeMap::from([("not_found".to_owned(), 1)]),
    });
    families(metrics.registry())
}

/// Whether a PromQL series name belongs to an exported family: the family itself, a
/// histogram's `_bucket`/`_sum`/`_count` series, or a counter named without its `_total`.
fn is_exported(name: &str, families: &BTreeMap<String, MetricType>) -> bool {
    if families.contains_key(name) {
        return true;
    }
    for suffix in ["_bucket", "_sum", "_count"] {
        if let Some(base) = name.strip_suffix(suffix)
            && families.get(base) == Some(&MetricType::HISTOGRAM)
        {
            return true;
        }
    }
    families
        .get(&format!("{name}_total"))
        .is_some_and(|t| *t == MetricType::COUNTER)
}

#[test]
fn every_dashboard_metric_is_exported() {
    let mut exported = trainer_families();
    let operator = OperatorMetrics::new();
    // Open-ended label sets appear only once used.
    operator.reconcile_errors.with_label_values(&["kube"]).inc();
    operator
        .session_attempts
        .with_label_values(&["ml", "anna"])
        .set(1);
    operator
        .session_duration
        .with_label_values(&["Succeeded"])
        .observe(600.0);
    exported.extend(families(operator.registry()));
    let used = dashboard_metric_names(&dashboard());
    assert!(
        used.len() >= 20,
        "too few metrics found in the dashboard: {used:?}"
    );
    let unknown: Vec<&String> = used.iter().filter(|n| !is_exported(n, &exported)).collect();
    assert!(
        unknown.is_empty(),
        "the dashboard queries metrics nobody exports: {unknown:#?}\nexported: {:#?}",
        exported.keys().collect::<Vec<_>>()
    );
}

#[test]
fn histogram_series_map_back_to_their_family() {
    let families = BTreeMap::from([
        ("a_seconds".to_owned(), MetricType::HISTOGRAM),
        ("b_total".to_owned(), MetricType::COUNTER),
        ("c".to_owned(), MetricType::GAUGE),
    ]);
    assert!(is_exported("a_seconds_bucket", &families));
    assert!(is_exported("a_seconds_count", &families));
    assert!(is_exported("b_total", &families));
    assert!(is_exported("b", &families));
    assert!(!is_exported("c_bucket", &families));
    assert!(!is_exported("c_total", &families));
    assert!(!is_exported("d", &families));
}
