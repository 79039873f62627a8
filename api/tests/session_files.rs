//! Session files: the kubectl manifest and the bare spec, YAML and JSON, and the errors
//! a user sees for a broken one.

use std::path::{Path, PathBuf};

use dreambooth_api::spec::{Crop, MemoryMode, ModelVersion, Preset, Steps};
use dreambooth_api::{Session, SessionFileError, validate};

fn parse_yaml(text: &str) -> Result<Session, SessionFileError> {
    Session::parse(text, false, "session.yaml", "session")
}

fn examples() -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples");
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    files
}

#[test]
fn a_kubectl_manifest_takes_its_name_from_metadata() {
    let session = parse_yaml(
        "apiVersion: dreambooth.dev/v1alpha1\nkind: DreamBoothSession\nmetadata:\n  name: anna\nspec:\n  dataset:\n    uri: s3://b/anna\n    crop: smart\n  output:\n    uri: s3://b/out\n",
    )
    .unwrap();
    assert_eq!(session.name, "anna");
    assert_eq!(session.spec.dataset.crop, Crop::Smart);
    assert_eq!(session.spec.dataset.resolution, 512);
}

#[test]
fn a_bare_spec_takes_its_name_from_the_field_or_the_file_stem() {
    let named = parse_yaml("name: rex\ndataset:\n  uri: file:///d\n").unwrap();
    assert_eq!(named.name, "rex");
    let unnamed = Session::parse(
        "dataset:\n  uri: file:///d\n",
        false,
        "x/quick.yaml",
        "quick",
    )
    .unwrap();
    assert_eq!(unnamed.name, "quick");
}

#[test]
fn json_session_files_parse() {
    let session = Session::parse(
        r#"{"name": "j", "dataset": {"uri": "file:///d"}, "training": {"preset": "style", "unet": {"steps": "auto"}, "textEncoder": {"steps": 300}}}"#,
        true,
        "s.json",
        "s",
    )
    .unwrap();
    assert_eq!(session.spec.training.preset, Preset::Style);
    assert_eq!(session.spec.training.unet.steps, Some(Steps::AUTO));
    assert_eq!(
        session.spec.training.text_encoder.steps,
        Some(Steps::Count(300))
    );
}

#[test]
fn gradient_checkpointing_is_auto_or_a_boolean() {
    let parse = |value: &str| parse_yaml(&format!("training:\n  gradientCheckpointing: {value}\n"));
    assert!(parse("auto").is_ok());
    assert!(parse("true").is_ok());
    assert!(parse("false").is_ok());
    let error = parse("sometimes").unwrap_err().to_string();
    assert!(
        error.contains("spec.training.gradientCheckpointing"),
        "{error}"
    );
}

#[test]
fn memory_is_default_or_low_memory() {
    let parse = |value: &str| parse_yaml(&format!("training:\n  memory: {value}\n"));
    assert_eq!(
        parse("lowMemory").unwrap().spec.training.memory,
        MemoryMode::LowMemory
    );
    assert_eq!(
        parse_yaml("training: {}\n").unwrap().spec.training.memory,
        MemoryMode::Default
    );
    let error = parse("low").unwrap_err().to_string();
    assert!(
        error.contains("spec.training.memory") && error.contains("lowMemory"),
        "{error}"
    );
}

#[test]
fn cluster_only_fields_are_ignored_by_a_local_run() {
    let session = parse_yaml(
        "apiVersion: dreambooth.dev/v1alpha1\nkind: DreamBoothSession\nmetadata: {name: a}\nspec:\n  suspend: true\n  queueName: gpu\n  resources: {gpus: 1}\n  dataset: {uri: file:///d}\n",
    )
    .unwrap();
    assert_eq!(session.spec.dataset.uri, "file:///d");
}

#[test]
fn a_misspelt_field_is_named_with_its_path() {
    let error = parse_yaml("dataset:\n  uri: file:///d\n  resolutoin: 768\n")
        .unwrap_err()
        .to_string();
    assert!(error.starts_with("session.yaml: spec.dataset"), "{error}");
    assert!(error.contains("resolutoin"), "{error}");
}

#[test]
fn a_wrong_type_is_named_with_its_path() {
    let error = parse_yaml("training:\n  unet:\n    steps: many\n")
        .unwrap_err()
        .to_string();
    assert!(error.contains("spec.training.unet.steps"), "{error}");
}

#[test]
fn broken_yaml_names_the_file() {
    let error = parse_yaml("dataset:\n  uri: [unclosed\n").unwrap_err();
    assert!(matches!(error, SessionFileError::Syntax { .. }));
    assert!(
        error
            .to_string()
            .starts_with("session.yaml: not valid YAML"),
        "{error}"
    );
}

#[test]
fn another_kind_is_refused() {
    let error = parse_yaml("apiVersion: v1\nkind: ConfigMap\nmetadata: {name: x}\n").unwrap_err();
    assert!(error.to_string().contains("kind is `ConfigMap`"), "{error}");
}

#[test]
fn a_missing_file_names_the_path() {
    let error = Session::load(Path::new("/nonexistent/anna.yaml")).unwrap_err();
    assert!(
        error.to_string().starts_with("/nonexistent/anna.yaml:"),
        "{error}"
    );
}

#[test]
fn every_example_session_is_valid() {
    let files = examples();
    assert!(files.len() >= 6, "examples missing: {files:?}");
    for file in files {
        let session = Session::load(&file).unwrap_or_else(|e| panic!("{e}"));
        let report = validate(&session.name, &session.spec);
        let errors: Vec<String> = report.errors().map(|p| p.to_string()).collect();
        assert!(errors.is_empty(), "{}: {errors:?}", file.display());
    }
    let face = Session::load(&Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/face.yaml"))
        .unwrap();
    assert_eq!(face.spec.base_model.version, Some(ModelVersion::Sd15));
}

#[test]
fn the_invalid_example_fails_with_every_problem() {
    let file = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/invalid/bad-session.yaml");
    let session = Session::load(&file).unwrap();
    let report = validate(&session.name, &session.spec);
    let paths: Vec<&str> = report.errors().map(|p| p.path.as_str()).collect();
    for expected in [
        "spec.dataset.uri",
        "spec.dataset.token",
        "spec.dataset.resolution",
        "spec.training",
        "spec.training.unet.learningRate",
        "spec.samples.steps",
        "spec.output.uri",
    ] {
        assert!(
            paths.contains(&expected),
            "{expected} missing from {paths:?}"
        );
    }
}
