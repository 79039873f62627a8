//! Whole sessions of `dreambooth-trainer train` on the tiny model, as separate processes:
//! the outputs and manifest, prior preservation, reproducibility, preemption and resume.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use dreambooth_api::{ExitKind, Manifest};
use dreambooth_trainer::checkpoint::load_pipeline_weights;
use sha2::{Digest, Sha256};

const TRAINER: &str = env!("CARGO_BIN_EXE_dreambooth-trainer");

struct Workspace {
    dir: tempfile::TempDir,
}

impl Workspace {
    /// A tiny model and six demo photos.
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        run_ok(&[
            "tiny-model",
            "--out",
            &p(&dir.path().join("model")),
            "--seed",
            "1",
        ]);
        run_ok(&[
            "demo-photos",
            "--out",
            &p(&dir.path().join("photos")),
            "--count",
            "6",
            "--size",
            "48",
        ]);
        Self { dir }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Writes a session file with `extra` YAML appended and returns its path.
    fn session(&self, name: &str, output: &str, extra: &str) -> PathBuf {
        let yaml = format!(
            "name: {name}\nbaseModel:\n  uri: file://{}\ndataset:\n  uri: file://{}\n  token: zwxtoy\n  resolution: 64\n\
             output:\n  uri: file://{}\n{extra}",
            p(&self.path("model")),
            p(&self.path("photos")),
            p(&self.path(output)),
        );
        let file = self.path(&format!("{name}-{output}.yaml"));
        std::fs::write(&file, yaml).unwrap();
        file
    }
}

fn p(path: &Path) -> String {
    path.to_str().unwrap().to_owned()
}

fn run(args: &[&str]) -> (i32, String) {
    let out = Command::new(TRAINER).args(args).output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn run_ok(args: &[&str]) -> String {
    let (code, stderr) = run(args);
    assert_eq!(code, 0, "{args:?}: {stderr}");
    stderr
}

fn train(session: &Path) -> String {
    run_ok(&["train", &p(session), "--termination-log", "/dev/null"])
}

fn manifest(dir: &Path) -> Manifest {
    serde_json::from_slice(&std::fs::read(dir.join("manifest.json")).unwrap()).unwrap()
}

/// Losses from the training steps' log lines (`stage=Unet … loss=…`), in step order.
fn losses(log: &str) -> Vec<f64> {
    log.lines()
        .filter(|l| l.contains("stage=TextEncoder") || l.contains("stage=Unet"))
        .filter_map(|l| l.split("loss=").nth(1))
        .filter_map(|v| v.trim().parse().ok())
        .collect()
}

const TRAINING: &str = "training:\n  unet:\n    steps: 8\n    learningRate: 2.0e-4\n  textEncoder:\n    steps: 4\n    learningRate: 1.0e-4\n  \
                        seed: 11\ncheckpoints:\n  precision: fp32\n";

#[test]
fn a_session_writes_every_artifact_in_its_manifest() {
    let ws = Workspace::new();
    // Class images for prior preservation: more demo photos stand in for "a toy".
    run_ok(&[
        "demo-photos",
        "--out",
        &p(&ws.path("class")),
        "--count",
        "4",
        "--size",
        "40",
        "--seed",
        "9",
    ]);
    let extra = "training:\n  unet:\n    steps: 10\n    learningRate: 5.0e-4\n  textEncoder:\n    steps: 4\n    learningRate: 1.0e-4\n  \
         offsetNoise: 0.1\n  seed: 3\ncheckpoints:\n  every: 7\nsamples:\n  prompts: [photo of zwxtoy, zwxtoy in snow]\n  \
         steps: 3\n  sampler: euler-a\n"
    .to_owned();
    let session = ws.session("toy", "out", &extra);
    let text = std::fs::read_to_string(&session).unwrap().replace(
        "  resolution: 64\n",
        &format!(
            "  resolution: 64\n  flip: true\n  priorPreservation:\n    classPrompt: photo of a toy\n    classImagesUri: file://{}\n    numClassImages: 4\n",
            p(&ws.path("class"))
        ),
    );
    std::fs::write(&session, text).unwrap();
    let log = train(&session);

    let out = ws.path("out");
    let manifest = manifest(&out);
    assert_eq!(
        (manifest.step, manifest.total_steps, manifest.seed),
        (14, 14, 3)
    );
    for artifact in &manifest.artifacts {
        let path = PathBuf::from(artifact.uri.strip_prefix("file://").unwrap());
        let bytes = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        assert_eq!(bytes.len() as u64, artifact.bytes, "{}", artifact.uri);
        assert_eq!(
            hex::encode(Sha256::digest(&bytes)),
            artifact.sha256,
            "{}",
            artifact.uri
        );
    }
    let keys: Vec<&str> = manifest
        .artifacts
        .iter()
        .map(|a| a.uri.rsplit("/out/").next().unwrap())
        .collect();
    for expected in [
        "toy.safetensors",
        "toy_step_7.safetensors",
        "samples/step_7/grid.png",
        "samples/step_14/1.png",
        "state/step_7/state.json",
    ] {
        assert!(keys.contains(&expected), "{expected} missing from {keys:?}");
    }
    assert_eq!(manifest.dataset.as_ref().unwrap().images.len(), 6);
    assert_eq!(manifest.config["spec"]["training"]["unet"]["steps"], 10);

    // The header says what the file is, for AUTOMATIC1111 and ComfyUI.
    let file = std::fs::read(out.join("toy.safetensors")).unwrap();
    let header_len = u64::from_le_bytes(file[..8].try_into().unwrap()) as usize;
    let header: serde_json::Value = serde_json::from_slice(&file[8..8 + header_len]).unwrap();
    let metadata = &header["__metadata__"];
    assert_eq!(metadata["modelspec.architecture"], "stable-diffusion-v1");
    assert_eq!(metadata["dreambooth.token"], "zwxtoy");
    assert_eq!(metadata["dreambooth.steps"], "14");
    assert_eq!(metadata["format"], "pt");

    // The exported file loads back through our loader and converts to a folder.
    let model = load_pipeline_weights(&out.join("toy.safetensors")).unwrap();
    assert!(
        model
            .text_encoder
            .tensors
            .keys()
            .any(|k| k.starts_with("text_model."))
    );
    run_ok(&[
        "convert",
        "--input",
        &p(&out.join("toy.safetensors")),
        "--output",
        &p(&ws.path("converted")),
    ]);

    let losses = losses(&log);
    assert_eq!(losses.len(), 14, "a line per step: {log}");
    let head: f64 = losses[..3].iter().sum::<f64>() / 3.0;
    let tail: f64 = losses[losses.len() - 3..].iter().sum::<f64>() / 3.0;
    assert!(tail < head, "the loss did not fall: {losses:?}");

    // A rerun of a finished session changes nothing.
    let before = std::fs::read(out.join("manifest.json")).unwrap();
    let rerun = train(&session);
    assert!(rerun.contains("already complete"), "{rerun}");
    assert_eq!(std::fs::read(out.join("manifest.json")).unwrap(), before);
}

#[test]
fn the_same_seed_trains_the_same_weights() {
    let ws = Workspace::new();
    let a = ws.session("same", "a", TRAINING);
    let b = ws.session("same", "b", TRAINING);
    let (log_a, log_b) = (train(&a), train(&b));
    assert_eq!(losses(&log_a), losses(&log_b));
    let weights = |dir: &str| std::fs::read(ws.path(dir).join("same.safetensors")).unwrap();
    assert_eq!(weights("a"), weights("b"), "same seed, different weights");
}

#[test]
fn a_preempted_session_resumes_to_the_same_weights() {
    let ws = Workspace::new();
    let straight = ws.session("resume", "straight", TRAINING);
    train(&straight);

    let interrupted = ws.session("resume", "interrupted", TRAINING);
    let mut child = Command::new(TRAINER)
        .args([
            "train",
            &p(&interrupted),
            "--termination-log",
            &p(&ws.path("termination.json")),
        ])
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // SIGTERM from outside once the UNet phase is under way.
    let stderr = child.stderr.take().unwrap();
    let mut log = String::new();
    let mut signalled = false;
    // Keep reading after the signal: a closed pipe would fail the child's next log line.
    for line in BufReader::new(stderr).lines() {
        let line = line.unwrap();
        log.push_str(&line);
        log.push('\n');
        if !signalled && line.contains("stage=Unet") {
            send_sigterm(child.id());
            signalled = true;
        }
    }
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(ExitKind::Preempted.code()), "{log}");
    let termination: dreambooth_api::Outcome =
        serde_json::from_slice(&std::fs::read(ws.path("termination.json")).unwrap()).unwrap();
    assert_eq!(termination.outcome, ExitKind::Preempted);
    assert!(
        termination.step > 4 && termination.step < 12,
        "{termination:?}"
    );
    assert!(
        !ws.path("interrupted/manifest.json").exists(),
        "no manifest before the end"
    );

    let resumed = train(&interrupted);
    assert!(resumed.contains("resuming from step"), "{resumed}");
    let weights = |dir: &str| std::fs::read(ws.path(dir).join("resume.safetensors")).unwrap();
    assert_eq!(
        weights("straight"),
        weights("interrupted"),
        "resumed weights differ"
    );
}

/// `kill -TERM pid` without a libc dependency.
fn send_sigterm(pid: u32) {
    Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .unwrap();
}

#[test]
fn missing_class_images_are_generated_once_and_listed() {
    let ws = Workspace::new();
    let extra = "training:\n  unet:\n    steps: 3\n  textEncoder:\n    steps: 0\n  seed: 5\nsamples:\n  steps: 2\n  sampler: ddim\n";
    let session = ws.session("prior", "out", extra);
    let text = std::fs::read_to_string(&session).unwrap().replace(
        "  resolution: 64\n",
        "  resolution: 64\n  priorPreservation:\n    classPrompt: photo of a toy\n    numClassImages: 2\n",
    );
    std::fs::write(&session, text).unwrap();
    let log = train(&session);
    assert_eq!(log.matches("generated class image").count(), 2, "{log}");
    let manifest = manifest(&ws.path("out"));
    let class_images: Vec<&str> = manifest
        .artifacts
        .iter()
        .filter(|a| a.kind == dreambooth_api::ArtifactKind::ClassImage)
        .map(|a| a.uri.rsplit('/').next().unwrap())
        .collect();
    assert_eq!(class_images, ["00000.png", "00001.png"]);
    let first = std::fs::read(ws.path("out/class_images/00000.png")).unwrap();
    assert!(image::load_from_memory(&first).unwrap().width() == 64);

    // A new session on the same prefix reuses them instead of generating again.
    std::fs::remove_file(ws.path("out/manifest.json")).unwrap();
    let rerun = train(&session);
    assert_eq!(rerun.matches("generated class image").count(), 0, "{rerun}");
    assert_eq!(
        std::fs::read(ws.path("out/class_images/00000.png")).unwrap(),
        first
    );
}

#[test]
fn continued_training_starts_from_an_earlier_model_without_retraining_the_text_encoder() {
    let ws = Workspace::new();
    let first = ws.session("first", "first", TRAINING);
    train(&first);
    // The new session's base model is the first one's single file.
    let second = ws.session(
        "second",
        "second",
        "training:\n  unet:\n    steps: 3\n  seed: 2\n",
    );
    let text = std::fs::read_to_string(&second).unwrap().replace(
        &format!("file://{}\n", p(&ws.path("model"))),
        &format!("file://{}\n", p(&ws.path("first/first.safetensors"))),
    );
    std::fs::write(&second, text).unwrap();
    let log = train(&second);
    assert!(log.contains("continuing session `first`"), "{log}");
    let manifest = manifest(&ws.path("second"));
    assert_eq!(manifest.total_steps, 3, "text encoder steps default to 0");
    assert_eq!(
        manifest.config["spec"]["training"]["textEncoder"]["steps"],
        0
    );
}

#[test]
fn a_low_memory_session_saves_bf16_states_exports_fp32_and_resumes_the_same_losses() {
    let ws = Workspace::new();
    let extra = "training:\n  memory: lowMemory\n  unet:\n    steps: 8\n    learningRate: 2.0e-4\n  textEncoder:\n    steps: 4\n    \
                 learningRate: 1.0e-4\n  seed: 11\ncheckpoints:\n  every: 6\n  precision: fp32\nsamples:\n  steps: 2\n";
    let session = ws.session("low", "out", extra);
    let log = train(&session);
    let out = ws.path("out");
    let losses_first = losses(&log);
    assert_eq!(losses_first.len(), 12, "{log}");
    assert!(
        losses_first.iter().all(|l| l.is_finite()),
        "{losses_first:?}"
    );

    // The manifest records the mode as run, with the checkpointing it implies.
    let training = &manifest(&out).config["spec"]["training"];
    assert_eq!(training["memory"], "lowMemory");
    assert_eq!(
        training["gradientCheckpointing"],
        dreambooth_trainer::models::checkpointing::available(),
        "lowMemory turns checkpointing on wherever the build can do it"
    );

    // The state at step 6 (UNet phase) holds bf16 weights and bf16 AdamW moments.
    let state = tch::Tensor::read_safetensors(out.join("state/step_6/state.safetensors")).unwrap();
    let moments = state
        .iter()
        .filter(|(n, _)| n.starts_with("optimizer.exp_avg"))
        .count();
    assert!(moments > 0, "no optimizer moments in the state");
    for (name, tensor) in &state {
        assert_eq!(tensor.kind(), tch::Kind::BFloat16, "{name}");
    }
    let info: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("state/step_6/state.json")).unwrap())
            .unwrap();
    assert_eq!(info["memory"], "lowMemory");

    // The export follows `checkpoints.precision`, not the training dtype.
    let exported = tch::Tensor::read_safetensors(out.join("low.safetensors")).unwrap();
    assert!(
        exported.iter().all(|(_, t)| t.kind() == tch::Kind::Float),
        "the fp32 export has other dtypes"
    );

    // Without its manifest the session resumes from the step-6 state and continues the
    // same losses to the same weights.
    let model = std::fs::read(out.join("low.safetensors")).unwrap();
    std::fs::remove_file(out.join("manifest.json")).unwrap();
    let rerun = train(&session);
    assert!(rerun.contains("resuming from step 6"), "{rerun}");
    assert_eq!(losses(&rerun), losses_first[6..], "resumed losses differ");
    assert_eq!(
        std::fs::read(out.join("low.safetensors")).unwrap(),
        model,
        "resumed weights differ"
    );
}
