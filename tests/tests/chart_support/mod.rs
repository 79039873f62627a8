//! Reading the chart, the docs and the dashboard for the tests in `tests/tests/`: where the
//! files are, the CRD template's fixed header, RBAC rule files expanded to triples, and the
//! metric names a dashboard's PromQL uses.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use serde_json::Value;

/// What `templates/crd.yaml` wraps around the generated CRD's body (everything from `spec:`
/// on): the install switch, and labels and the keep annotation in `metadata`.
pub const CHART_CRD_HEADER: &str = r#"{{- if .Values.crds.install }}
# The body below `spec:` is crds/dreamboothsession.yaml byte for byte (tests/tests/chart.rs);
# refresh it with `BLESS_CHART_CRD=1 cargo test -p dreambooth-tests --test chart`.
apiVersion: apiextensions.k8s.io/v1
kind: CustomResourceDefinition
metadata:
  name: dreamboothsessions.dreambooth.dev
  labels:
    {{- include "dreambooth-operator.labels" . | nindent 4 }}
  {{- if .Values.crds.keep }}
  annotations:
    helm.sh/resource-policy: keep
  {{- end }}
spec:
"#;
pub const CHART_CRD_FOOTER: &str = "{{- end }}\n";

pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

pub fn chart_dir() -> PathBuf {
    repo_root().join("charts/dreambooth-operator")
}

pub fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Splits CRD YAML into its head (apiVersion, kind, metadata) and the text after `spec:`.
pub fn split_at_spec(crd_yaml: &str) -> Option<(&str, &str)> {
    crd_yaml.split_once("\nspec:\n")
}

/// The chart's CRD template for a generated CRD.
pub fn chart_crd_template(generated: &str) -> String {
    let (_, body) = split_at_spec(generated).expect("the generated CRD has a top-level `spec:`");
    format!("{CHART_CRD_HEADER}{body}{CHART_CRD_FOOTER}")
}

/// One (API group, resource, verb) permission.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Triple {
    pub api_group: String,
    pub resource: String,
    pub verb: String,
}

/// A chart RBAC rule file (a YAML list of PolicyRules), expanded to triples.
pub fn read_rules(path: &Path) -> Vec<Triple> {
    let rules: Value = serde_norway::from_str(&read(path))
        .unwrap_or_else(|e| panic!("{}: not YAML: {e}", path.display()));
    let strings = |rule: &Value, key: &str| -> Vec<String> {
        rule[key]
            .as_array()
            .unwrap_or_else(|| panic!("{}: a rule without `{key}`: {rule}", path.display()))
            .iter()
            .map(|v| v.as_str().expect("strings").to_owned())
            .collect()
    };
    let mut triples = Vec::new();
    for rule in rules.as_array().expect("a list of rules") {
        for api_group in strings(rule, "apiGroups") {
            for resource in strings(rule, "resources") {
                for verb in strings(rule, "verbs") {
                    triples.push(Triple {
                        api_group: api_group.clone(),
                        resource: resource.clone(),
                        verb,
                    });
                }
            }
        }
    }
    triples
}

pub fn dashboard() -> Value {
    let path = chart_dir().join("dashboards/dreambooth.json");
    serde_json::from_str(&read(&path)).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Every PromQL string of a dashboard: panel targets and query variables.
pub fn dashboard_queries(dashboard: &Value) -> Vec<String> {
    let mut queries = Vec::new();
    let mut panels: Vec<&Value> = dashboard["panels"]
        .as_array()
        .into_iter()
        .flatten()
        .collect();
    while let Some(panel) = panels.pop() {
        panels.extend(panel["panels"].as_array().into_iter().flatten());
        for target in panel["targets"].as_array().into_iter().flatten() {
            if let Some(expr) = target["expr"].as_str() {
                queries.push(expr.to_owned());
            }
        }
    }
    for variable in dashboard["templating"]["list"]
        .as_array()
        .into_iter()
        .flatten()
    {
        if variable["type"] == "query" {
            let query = &variable["query"];
            let text = query["query"].as_str().or(query.as_str());
            queries.extend(text.map(str::to_owned));
        }
    }
    queries
}

/// Metric names in PromQL: identifiers with our prefix (labels, functions and `$variables`
/// never carry it).
pub fn metric_names(promql: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let bytes = promql.as_bytes();
    let is_ident = |b: u8| b.is_ascii_alphanumeric() || b == b'_' || b == b':';
    let mut start = 0;
    while start < bytes.len() {
        if is_ident(bytes[start]) && (start == 0 || !is_ident(bytes[start - 1])) {
            let end = (start..bytes.len())
                .find(|&i| !is_ident(bytes[i]))
                .unwrap_or(bytes.len());
            let word = &promql[start..end];
            if word.starts_with("dreambooth_") {
                names.insert(word.to_owned());
            }
            start = end;
        } else {
            start += 1;
        }
    }
    names
}

pub fn dashboard_metric_names(dashboard: &Value) -> BTreeSet<String> {
    dashboard_queries(dashboard)
        .iter()
        .flat_map(|q| metric_names(q))
        .collect()
}
