//! A real client reads our single file: diffusers builds a full-size SD 1.5 folder with
//! random weights and renders an image from it; `dreambooth-trainer convert` turns the
//! folder into one `.safetensors` in the original SD layout; diffusers loads that file with
//! `StableDiffusionPipeline.from_single_file(file, config=folder)` and must render the same
//! image (4 DDIM steps, 128×128, guidance 7.5, seed 0: mean abs pixel difference ≤ 1/255).
//!
//! The Python side is `tests/diffusers_client.py`, run with the project venv
//! (`.venv/bin/python`, made by `make bootstrap`); each step is its own process so only
//! one full-size model (~4.3 GB in fp32) is in memory at a time. About 2–3 minutes and
//! 9 GB of temporary disk on a 2-core machine.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use serde_json::Value;

const MAX_MEAN_ABS_DIFF: f64 = 1.0 / 255.0;

fn manifest_dir() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// The project venv's interpreter, or a panic that says how to get it.
fn venv_python() -> PathBuf {
    let python = manifest_dir().join("../.venv/bin/python");
    assert!(
        python.exists(),
        "{} is missing: this test needs the project venv with torch, diffusers==0.42.1 and \
         transformers==5.24.0; run `make bootstrap` (scripts/bootstrap-libtorch.sh)",
        python.display()
    );
    python
}

/// Runs `command`, panicking with its stderr when it fails; returns stdout and seconds taken.
fn run(what: &str, command: &mut Command) -> (String, f64) {
    let started = Instant::now();
    let output = command
        .output()
        .unwrap_or_else(|e| panic!("{what}: cannot start {command:?}: {e}"));
    let seconds = started.elapsed().as_secs_f64();
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "{what} failed ({}): {command:?}\n--- stdout\n{stdout}\n--- stderr\n{stderr}",
        output.status
    );
    println!("{what}: {seconds:.1} s");
    (stdout, seconds)
}

/// The JSON object the Python script prints as its last line.
fn last_json(what: &str, stdout: &str) -> Value {
    let line = stdout
        .lines()
        .rev()
        .find(|line| line.trim_start().starts_with('{'))
        .unwrap_or_else(|| panic!("{what} printed no JSON line:\n{stdout}"));
    serde_json::from_str(line).unwrap_or_else(|e| panic!("{what} printed bad JSON ({e}): {line}"))
}

fn number(json: &Value, key: &str) -> f64 {
    json[key]
        .as_f64()
        .unwrap_or_else(|| panic!("no number {key:?} in {json}"))
}

#[test]
fn diffusers_from_single_file_renders_the_folders_image() {
    let python = venv_python();
    let script = manifest_dir().join("tests/diffusers_client.py");
    let tmp = tempfile::tempdir().expect("temporary directory");
    let folder = tmp.path().join("sd15-random");
    let reference = tmp.path().join("reference.npy");
    let single_file = tmp.path().join("model.safetensors");

    let (made, t_make) = run(
        "diffusers: build + save the full-size folder, render the reference",
        Command::new(&python)
            .arg(&script)
            .arg("make")
            .arg("--out")
            .arg(&folder)
            .arg("--reference")
            .arg(&reference),
    );
    println!("reference image: {}", last_json("make", &made));

    let (_, t_convert) = run(
        "dreambooth-trainer convert (folder -> single file, fp32)",
        Command::new(env!("CARGO_BIN_EXE_dreambooth-trainer"))
            .arg("convert")
            .arg("--input")
            .arg(&folder)
            .arg("--output")
            .arg(&single_file)
            .args(["--precision", "fp32"]),
    );

    let (checked, t_check) = run(
        "diffusers: from_single_file(ours, config=folder), render, compare",
        Command::new(&python)
            .arg(&script)
            .arg("check")
            .arg("--file")
            .arg(&single_file)
            .arg("--config")
            .arg(&folder)
            .arg("--reference")
            .arg(&reference),
    );
    let result = last_json("check", &checked);
    println!("from_single_file: {result}");
    println!(
        "total {:.1} s (make {t_make:.1}, convert {t_convert:.1}, check {t_check:.1})",
        t_make + t_convert + t_check
    );

    let problems = result["weight_problems"].as_array().map_or(0, Vec::len);
    assert_eq!(
        problems, 0,
        "diffusers' model from our file does not have the folder's tensors: {result}"
    );
    assert_eq!(
        number(&result, "max_weight_diff"),
        0.0,
        "an fp32 round trip must keep every weight bit for bit: {result}"
    );
    let mean = number(&result, "mean_abs_diff");
    println!(
        "mean abs pixel difference {mean:.3e} (limit {MAX_MEAN_ABS_DIFF:.3e}), max {:.3e}",
        number(&result, "max_abs_diff")
    );
    assert!(
        mean <= MAX_MEAN_ABS_DIFF,
        "from_single_file on our file renders a different image: mean abs pixel difference \
         {mean} > 1/255 ({result})"
    );
}
