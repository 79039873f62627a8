//! The Helm chart without a helm binary: its values against its schema, its CRD against the
//! generated one, and the files its templates include.

#[allow(dead_code)]
mod chart_support;

use std::path::PathBuf;

use chart_support::{self as chart, CHART_CRD_FOOTER, CHART_CRD_HEADER, read};
use dreambooth_api::crd::DreamBoothSession;
use kube::CustomResourceExt;
use serde_json::{Value, json};

fn chart_file(relative: &str) -> PathBuf {
    chart::chart_dir().join(relative)
}

fn values_validator() -> jsonschema::Validator {
    let path = chart_file("values.schema.json");
    let schema: Value = serde_json::from_str(&read(&path))
        .unwrap_or_else(|e| panic!("{}: not JSON: {e}", path.display()));
    jsonschema::draft7::new(&schema)
        .unwrap_or_else(|e| panic!("{}: not a valid draft-07 schema: {e}", path.display()))
}

fn default_values() -> Value {
    let path = chart_file("values.yaml");
    serde_norway::from_str(&read(&path)).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Every schema error as `path: message`, for assertion messages.
fn schema_errors(validator: &jsonschema::Validator, values: &Value) -> Vec<String> {
    validator
        .iter_errors(values)
        .map(|e| format!("{}: {e}", e.instance_path()))
        .collect()
}

/// Deep-merges `overlay` into `base`, as `helm install -f` does with a values file.
fn merged(mut base: Value, overlay: &Value) -> Value {
    fn merge(base: &mut Value, overlay: &Value) {
        match (base, overlay) {
            (Value::Object(base), Value::Object(overlay)) => {
                for (key, value) in overlay {
                    merge(base.entry(key.clone()).or_insert(Value::Null), value);
                }
            }
            (base, overlay) => *base = overlay.clone(),
        }
    }
    merge(&mut base, overlay);
    base
}

#[test]
fn default_values_satisfy_the_schema() {
    let errors = schema_errors(&values_validator(), &default_values());
    assert!(
        errors.is_empty(),
        "values.yaml breaks values.schema.json: {errors:#?}"
    );
}

#[test]
fn values_with_a_wrong_type_are_rejected_at_that_path() {
    let validator = values_validator();
    let cases = [
        (json!({"replicas": "two"}), "/replicas"),
        (json!({"crds": {"install": "yes"}}), "/crds/install"),
        (json!({"watchNamespaces": "ml"}), "/watchNamespaces"),
        (json!({"metrics": {"port": 70000}}), "/metrics/port"),
        (
            json!({"operator": {"progressInterval": "often"}}),
            "/operator/progressInterval",
        ),
        (
            json!({"storage": {"endpoint": "minio:9000"}}),
            "/storage/endpoint",
        ),
        (json!({"trainer": {"imagee": {}}}), "/trainer"),
    ];
    for (overlay, path) in cases {
        let values = merged(default_values(), &overlay);
        let errors = schema_errors(&validator, &values);
        assert!(
            errors.iter().any(|e| e.starts_with(&format!("{path}:"))),
            "{overlay} should be rejected at {path}, got {errors:?}"
        );
    }
}

#[test]
fn a_realistic_override_file_is_accepted() {
    let overlay = json!({
        "watchNamespaces": ["ml-team", "art"],
        "replicas": 1,
        "trainer": {"image": {"repository": "registry.local/dreambooth-trainer", "tag": "0.2.0"}},
        "storage": {"endpoint": "http://minio.storage.svc:9000", "forcePathStyle": true},
        "metrics": {"serviceMonitor": {"labels": {"release": "kube-prometheus-stack"}}},
        "networkPolicy": {"apiServer": {"cidrs": ["10.0.0.1/32"], "port": 443}},
    });
    let errors = schema_errors(&values_validator(), &merged(default_values(), &overlay));
    assert!(errors.is_empty(), "{errors:#?}");
}

#[test]
fn chart_crd_body_equals_the_generated_crd() {
    let generated = serde_norway::to_string(&DreamBoothSession::crd()).unwrap();
    let path = chart_file("templates/crd.yaml");
    if std::env::var_os("BLESS_CHART_CRD").is_some() {
        std::fs::write(&path, chart::chart_crd_template(&generated)).unwrap();
    }
    let (generated_head, generated_body) =
        chart::split_at_spec(&generated).expect("the generated CRD has a top-level `spec:`");
    let template = read(&path);
    let inner = template
        .strip_prefix(CHART_CRD_HEADER)
        .and_then(|t| t.strip_suffix(CHART_CRD_FOOTER))
        .unwrap_or_else(|| {
            panic!(
                "{}: must start with the header and end with the footer in tests/src/chart.rs",
                path.display()
            )
        });
    assert!(
        inner == generated_body,
        "{}: the CRD body differs from crds/dreamboothsession.yaml; run \
         `BLESS_CHART_CRD=1 cargo test -p dreambooth-tests --test chart`",
        path.display()
    );
    // The header must describe the same object as the generated CRD's head.
    for line in generated_head.lines() {
        assert!(
            CHART_CRD_HEADER.lines().any(|l| l == line),
            "chart CRD header lacks `{line}`"
        );
    }
    assert!(CHART_CRD_HEADER.contains("{{- if .Values.crds.install }}"));
}

#[test]
fn templates_include_the_files_the_tests_check() {
    let rbac = read(&chart_file("templates/rbac.yaml"));
    for file in [
        "files/rbac/operator.yaml",
        "files/rbac/leader-election.yaml",
    ] {
        assert!(
            rbac.contains(&format!(".Files.Get \"{file}\"")),
            "templates/rbac.yaml does not use {file}"
        );
        assert!(chart_file(file).is_file(), "{file} missing");
    }
    let dashboard = read(&chart_file("templates/dashboard-configmap.yaml"));
    assert!(dashboard.contains(".Files.Get \"dashboards/dreambooth.json\""));
    let values = default_values();
    assert_eq!(values["dashboard"]["labels"]["grafana_dashboard"], "1");
}

#[test]
fn monitors_render_only_with_the_prometheus_operator_api() {
    for file in ["templates/servicemonitor.yaml", "templates/podmonitor.yaml"] {
        let text = read(&chart_file(file));
        let first = text.lines().next().unwrap_or_default();
        assert!(
            first.contains(".Capabilities.APIVersions.Has \"monitoring.coreos.com/v1\""),
            "{file}: the first line must guard on the monitoring API, got `{first}`"
        );
    }
    let pod_monitor = read(&chart_file("templates/podmonitor.yaml"));
    assert!(pod_monitor.contains("port: metrics"));
    let helpers = read(&chart_file("templates/_helpers.tpl"));
    assert!(helpers.contains("app.kubernetes.io/name: dreambooth-trainer"));
}

#[test]
fn the_chart_never_grants_secrets() {
    for entry in std::fs::read_dir(chart_file("files/rbac")).unwrap() {
        let path = entry.unwrap().path();
        let rules = chart::read_rules(&path);
        assert!(!rules.is_empty(), "{}: no rules", path.display());
        for rule in rules {
            assert_ne!(
                rule.resource,
                "secrets",
                "{}: grants Secrets",
                path.display()
            );
            assert_ne!(rule.resource, "*", "{}: wildcard resource", path.display());
            assert_ne!(rule.verb, "*", "{}: wildcard verb", path.display());
        }
    }
}

#[test]
fn the_dashboard_is_valid_json_with_the_panels_the_issue_asks_for() {
    let dashboard = chart::dashboard();
    let titles: Vec<&str> = dashboard["panels"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|p| p["title"].as_str())
        .collect();
    for wanted in [
        "Sessions by phase",
        "Running sessions",
        "Loss",
        "Learning rate",
        "GPU memory",
        "Storage throughput",
        "Reconcile rate",
        "Reconcile errors",
        "Reconcile latency",
        "Queue wait (Job created → pod running)",
    ] {
        assert!(
            titles.contains(&wanted),
            "no panel `{wanted}` in {titles:?}"
        );
    }
    assert!(chart::dashboard_metric_names(&dashboard).len() >= 20);
}
