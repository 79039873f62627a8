//! The `dreambooth-operator render` command, run as users run it.

use std::path::Path;
use std::process::Command;

fn operator() -> Command {
    Command::new(env!("CARGO_BIN_EXE_dreambooth-operator"))
}

#[test]
fn render_prints_the_config_map_and_job() {
    let session = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/session-full.yaml");
    let output = operator()
        .args([
            "render",
            session.to_str().unwrap(),
            "--attempt",
            "2",
            "--image",
            "x:1",
        ])
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let text = String::from_utf8(output.stdout).unwrap();
    let kinds: Vec<String> = text
        .split("---\n")
        .filter(|d| !d.trim().is_empty())
        .map(|d| {
            serde_norway::from_str::<serde_json::Value>(d).unwrap()["kind"]
                .as_str()
                .unwrap()
                .to_owned()
        })
        .collect();
    assert_eq!(kinds, ["ConfigMap", "Job"]);
    assert!(text.contains("name: anna-2"));
    // The session names its own image, so --image is not used.
    assert!(text.contains("image: registry.example/dreambooth-trainer:1.2.3"));
}

#[test]
fn render_of_a_missing_file_fails_naming_it() {
    let output = operator()
        .args(["render", "/nonexistent/session.yaml"])
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("/nonexistent/session.yaml"), "{stderr}");
}
