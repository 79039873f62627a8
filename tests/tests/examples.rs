//! Every session in `examples/` is one a user can run: it parses, passes validation, and (for
//! manifests) fits the CRD schema with no field the API server would drop. Those in
//! `examples/invalid/` must be rejected.

#[allow(dead_code)]
mod chart_support;

use std::path::{Path, PathBuf};

use dreambooth_api::crd::DreamBoothSession;
use dreambooth_api::spec::{Preset, Steps};
use dreambooth_api::{Session, validate};
use kube::CustomResourceExt;
use serde_json::Value;

fn yaml_files(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|entry| entry.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml" || e == "yml"))
        .collect();
    files.sort();
    files
}

fn examples() -> Vec<PathBuf> {
    yaml_files(&chart_support::repo_root().join("examples"))
}

fn load(path: &Path) -> Session {
    Session::load(path).unwrap_or_else(|e| panic!("{e}"))
}

fn crd_schema() -> Value {
    let crd = serde_json::to_value(DreamBoothSession::crd()).unwrap();
    crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"].clone()
}

/// Fields of `value` that `schema` does not declare: the API server would drop them (or
/// reject them under strict field validation), so the example would not mean what it says.
fn undeclared_fields(value: &Value, schema: &Value, path: &str, out: &mut Vec<String>) {
    match value {
        Value::Object(map) => {
            let Some(properties) = schema["properties"].as_object() else {
                return; // a map or a preserved Kubernetes object: any key goes
            };
            for (key, child) in map {
                let child_path = format!("{path}.{key}");
                match properties.get(key) {
                    Some(child_schema) => undeclared_fields(child, child_schema, &child_path, out),
                    None => out.push(child_path),
                }
            }
        }
        Value::Array(items) => {
            for (i, item) in items.iter().enumerate() {
                undeclared_fields(item, &schema["items"], &format!("{path}[{i}]"), out);
            }
        }
        _ => {}
    }
}

#[test]
fn every_example_parses_and_validates() {
    let files = examples();
    assert!(files.len() >= 9, "too few examples: {files:?}");
    for path in files {
        let session = load(&path);
        let report = validate(&session.name, &session.spec);
        let errors: Vec<String> = report.errors().map(ToString::to_string).collect();
        assert!(errors.is_empty(), "{}: {errors:#?}", path.display());
    }
}

#[test]
fn every_manifest_example_fits_the_crd_schema() {
    let schema = crd_schema();
    let validator = jsonschema::draft7::new(&schema).expect("the CRD schema compiles");
    let mut manifests = 0;
    for path in examples() {
        let text = chart_support::read(&path);
        let manifest: Value = serde_norway::from_str(&text).unwrap();
        if manifest.get("kind").is_none() {
            continue; // a bare spec for local runs
        }
        manifests += 1;
        assert_eq!(
            manifest["apiVersion"],
            "dreambooth.dev/v1alpha1",
            "{}",
            path.display()
        );
        let spec_only = serde_json::json!({"spec": manifest["spec"]});
        let errors: Vec<String> = validator
            .iter_errors(&spec_only)
            .map(|e| format!("{}: {e}", e.instance_path()))
            .collect();
        assert!(errors.is_empty(), "{}: {errors:#?}", path.display());
        let mut undeclared = Vec::new();
        undeclared_fields(
            &manifest["spec"],
            &schema["properties"]["spec"],
            "spec",
            &mut undeclared,
        );
        assert!(
            undeclared.is_empty(),
            "{}: fields the CRD does not have: {undeclared:?}",
            path.display()
        );
    }
    assert!(manifests >= 8);
}

#[test]
fn every_invalid_example_is_rejected_with_its_field_named() {
    let files = yaml_files(&chart_support::repo_root().join("examples/invalid"));
    assert!(!files.is_empty());
    for path in files {
        match Session::load(&path) {
            Err(error) => {
                let message = error.to_string();
                assert!(
                    message.contains("spec."),
                    "{}: the parse error names no field: {message}",
                    path.display()
                );
            }
            Ok(session) => {
                let report = validate(&session.name, &session.spec);
                assert!(
                    report.errors().count() >= 2,
                    "{}: expected several problems, got {:?}",
                    path.display(),
                    report.problems
                );
            }
        }
    }
}

#[test]
fn the_examples_cover_each_use_the_guide_promises() {
    let sessions: Vec<(String, Session, Value)> = examples()
        .into_iter()
        .map(|p| {
            let name = p.file_stem().unwrap().to_string_lossy().into_owned();
            let raw = serde_norway::from_str(&chart_support::read(&p)).unwrap();
            (name, load(&p), raw)
        })
        .collect();
    let any = |what: &str, f: &dyn Fn(&Session, &Value) -> bool| {
        assert!(
            sessions.iter().any(|(_, s, raw)| f(s, raw)),
            "no example shows {what}"
        );
    };
    for preset in [Preset::Face, Preset::Style, Preset::Object, Preset::Custom] {
        any(&format!("the {preset:?} preset"), &|s, raw| {
            s.spec.training.preset == preset && raw["spec"]["training"]["preset"].is_string()
        });
    }
    any("prior preservation", &|s, _| {
        s.spec.dataset.prior_preservation.is_some()
    });
    any("a base model by URL", &|s, _| {
        s.spec
            .base_model
            .uri
            .as_deref()
            .is_some_and(|u| u.starts_with("https://"))
            && s.spec.base_model.sha256.is_some()
    });
    any("continue training", &|s, _| {
        s.spec.training.text_encoder.steps == Some(Steps::Count(0))
            && s.spec
                .base_model
                .uri
                .as_deref()
                .is_some_and(|u| u.ends_with(".safetensors"))
    });
    any("a Kueue queue", &|_, raw| {
        raw["spec"]["queueName"].is_string()
    });
    any("the S3 Secret", &|s, _| {
        s.spec.storage.credentials_secret.is_some()
    });
    let names: Vec<&str> = sessions.iter().map(|(n, _, _)| n.as_str()).collect();
    let guide = chart_support::read(&chart_support::repo_root().join("docs/README.md"));
    for name in names {
        assert!(
            guide.contains(&format!("`{name}.yaml`")),
            "docs/README.md does not list examples/{name}.yaml"
        );
    }
}
