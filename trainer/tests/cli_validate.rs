//! `dreambooth-trainer validate FILE`: the example sessions pass, a bad file fails with
//! every problem and its field path.

use std::path::{Path, PathBuf};
use std::process::Command;

use dreambooth_api::ExitKind;

fn examples_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples")
}

fn validate(file: &Path) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_dreambooth-trainer"))
        .arg("validate")
        .arg(file)
        .output()
        .expect("the trainer binary runs");
    let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
    (
        out.status.code().unwrap_or(-1),
        text(&out.stdout),
        text(&out.stderr),
    )
}

#[test]
fn every_example_session_validates() {
    let mut checked = 0;
    for entry in std::fs::read_dir(examples_dir()).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "yaml") {
            let (code, stdout, stderr) = validate(&path);
            assert_eq!(code, 0, "{}: {stderr}", path.display());
            assert!(stdout.contains("is valid"), "{stdout}");
            checked += 1;
        }
    }
    assert!(checked >= 6);
}

#[test]
fn a_bad_session_lists_every_problem_and_exits_with_bad_config() {
    let (code, _, stderr) = validate(&examples_dir().join("invalid/bad-session.yaml"));
    assert_eq!(code, ExitKind::BadConfig.code());
    for expected in [
        "spec.dataset.uri: scheme `ftp` is not supported",
        "spec.dataset.token: `Dog` must be 3 to 24 characters",
        "spec.dataset.resolution: 700 is not a multiple of 64",
        "spec.training.unet.learningRate",
        "spec.output.uri: required",
    ] {
        assert!(
            stderr.contains(expected),
            "`{expected}` missing from:\n{stderr}"
        );
    }
}

#[test]
fn an_unparseable_file_names_the_file_and_field() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("typo.yaml");
    std::fs::write(&file, "dataset:\n  uri: file:///d\n  resolutoin: 512\n").unwrap();
    let (code, _, stderr) = validate(&file);
    assert_eq!(code, ExitKind::BadConfig.code());
    assert!(
        stderr.contains("typo.yaml") && stderr.contains("spec.dataset"),
        "{stderr}"
    );
    assert!(stderr.contains("resolutoin"), "{stderr}");
}
