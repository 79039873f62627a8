//! `tiny-model` writes a folder our loader (and diffusers) reads; `convert` goes to a
//! single file and back without changing a tensor.

use std::path::Path;
use std::process::Command;

use dreambooth_trainer::checkpoint::{SdVersion, load_pipeline_weights};
use dreambooth_trainer::models::{clip, config, unet, vae};
use dreambooth_trainer::schedulers::PredictionType;
use tch::{Device, nn};

fn trainer(args: &[&str]) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_dreambooth-trainer"))
        .args(args)
        .output()
        .expect("the trainer runs");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn path(p: &Path) -> &str {
    p.to_str().unwrap()
}

#[test]
fn tiny_models_load_into_our_networks() {
    let dir = tempfile::tempdir().unwrap();
    for (variant, version, prediction) in [
        ("sd1", SdVersion::Sd1, PredictionType::Epsilon),
        ("sd2", SdVersion::Sd2, PredictionType::VPrediction),
    ] {
        let folder = dir.path().join(variant);
        let (ok, stderr) = trainer(&[
            "tiny-model",
            "--out",
            path(&folder),
            "--variant",
            variant,
            "--seed",
            "3",
        ]);
        assert!(ok, "{stderr}");
        assert!(folder.join("tokenizer/vocab.json").exists());
        let model = load_pipeline_weights(&folder).unwrap();
        assert_eq!(
            (model.version, model.prediction_type),
            (version, prediction)
        );

        let mut unet_vs = nn::VarStore::new(Device::Cpu);
        let unet_config = config::UNetConfig::from_json(&model.unet.config.to_string()).unwrap();
        unet::unet(unet_vs.root(), &unet_config);
        model.unet.fill(&mut unet_vs, "unet").unwrap();
        let mut vae_vs = nn::VarStore::new(Device::Cpu);
        vae::autoencoder_kl(
            vae_vs.root(),
            &config::VaeConfig::from_json(&model.vae.config.to_string()).unwrap(),
        );
        model.vae.fill(&mut vae_vs, "vae").unwrap();
        let mut text_vs = nn::VarStore::new(Device::Cpu);
        let text_config: clip::ClipTextConfig =
            serde_json::from_value(model.text_encoder.config.clone()).unwrap();
        clip::clip_text_model(text_vs.root(), &text_config);
        model
            .text_encoder
            .fill(&mut text_vs, "text_encoder")
            .unwrap();
    }
}

#[test]
fn the_same_seed_writes_the_same_weights() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b, c) = (
        dir.path().join("a"),
        dir.path().join("b"),
        dir.path().join("c"),
    );
    for (folder, seed) in [(&a, "1"), (&b, "1"), (&c, "2")] {
        assert!(trainer(&["tiny-model", "--out", path(folder), "--seed", seed]).0);
    }
    let weights =
        |f: &Path| std::fs::read(f.join("unet/diffusion_pytorch_model.safetensors")).unwrap();
    assert_eq!(weights(&a), weights(&b));
    assert_ne!(weights(&a), weights(&c));
}

#[test]
fn convert_round_trips_bit_for_bit_in_fp32() {
    let dir = tempfile::tempdir().unwrap();
    for variant in ["sd1", "sd2"] {
        let folder = dir.path().join(variant);
        let single = dir.path().join(format!("{variant}.safetensors"));
        let back = dir.path().join(format!("{variant}-back"));
        assert!(trainer(&["tiny-model", "--out", path(&folder), "--variant", variant]).0);
        let (ok, stderr) = trainer(&[
            "convert",
            "--input",
            path(&folder),
            "--output",
            path(&single),
            "--precision",
            "fp32",
        ]);
        assert!(ok, "{stderr}");
        let (ok, stderr) = trainer(&[
            "convert",
            "--input",
            path(&single),
            "--output",
            path(&back),
            "--precision",
            "fp32",
        ]);
        assert!(ok, "{stderr}");
        let (original, converted) = (
            load_pipeline_weights(&folder).unwrap(),
            load_pipeline_weights(&back).unwrap(),
        );
        for (name, a, b) in [
            ("unet", &original.unet.tensors, &converted.unet.tensors),
            ("vae", &original.vae.tensors, &converted.vae.tensors),
            (
                "text_encoder",
                &original.text_encoder.tensors,
                &converted.text_encoder.tensors,
            ),
        ] {
            assert_eq!(
                a.keys().collect::<Vec<_>>(),
                b.keys().collect::<Vec<_>>(),
                "{variant} {name} names"
            );
            for (key, tensor) in a {
                assert!(tensor.equal(&b[key]), "{variant} {name} {key} changed");
            }
        }
    }
}

#[test]
fn convert_writes_a_ckpt_that_reads_back_unchanged() {
    let dir = tempfile::tempdir().unwrap();
    let folder = dir.path().join("sd1");
    let ckpt = dir.path().join("sd1.ckpt");
    assert!(trainer(&["tiny-model", "--out", path(&folder)]).0);
    let (ok, stderr) = trainer(&[
        "convert",
        "--input",
        path(&folder),
        "--output",
        path(&ckpt),
        "--precision",
        "fp32",
    ]);
    assert!(ok, "{stderr}");
    let (original, reread) = (
        load_pipeline_weights(&folder).unwrap(),
        load_pipeline_weights(&ckpt).unwrap(),
    );
    for (key, tensor) in &original.unet.tensors {
        assert!(
            tensor.equal(&reread.unet.tensors[key]),
            "unet {key} changed"
        );
    }
    assert_eq!(
        original.text_encoder.tensors.len(),
        reread.text_encoder.tensors.len()
    );
}

#[test]
fn convert_names_a_missing_input() {
    let (ok, stderr) = trainer(&[
        "convert",
        "--input",
        "/nonexistent/model.safetensors",
        "--output",
        "/tmp/x.safetensors",
    ]);
    assert!(!ok);
    assert!(
        stderr.contains("/nonexistent/model.safetensors"),
        "{stderr}"
    );
}
