//! Loading and saving weights: safetensors errors that name what went wrong, diffusers
//! folders with their name variants, and the diffusers → single file → diffusers round
//! trip on the tiny reference models.

use std::path::Path;

mod common;

use common::{assert_mentions, assert_same, fixture};
use dreambooth_api::spec::Precision;
use dreambooth_trainer::checkpoint::{
    CheckpointError, LoadOptions, SdVersion, SourceKind, Tensors, fill_var_store,
    load_pipeline_weights, load_pipeline_weights_with, read_diffusers_folder, read_safetensors,
    save_diffusers_folder, save_single_file, write_safetensors,
};
use dreambooth_trainer::models::clip::{ClipTextConfig, clip_text_model};
use dreambooth_trainer::models::{UNetConfig, VaeConfig, autoencoder_kl, unet};
use dreambooth_trainer::schedulers::PredictionType;
use tch::{Device, Kind, Tensor, nn};

fn small() -> Tensors {
    Tensors::from([
        (
            "layer.weight".to_string(),
            Tensor::from_slice(&[0.1f32, 0.2, 0.3, 0.4, 0.5, 0.6]).reshape([2, 3]),
        ),
        (
            "layer.bias".to_string(),
            Tensor::from_slice(&[1.5f32, -1.5]),
        ),
    ])
}

#[test]
fn missing_file_error_names_the_path() {
    let path = Path::new("/nonexistent/model.safetensors");
    let err = load_pipeline_weights(path).unwrap_err();
    assert!(matches!(err, CheckpointError::NotFound { .. }), "{err:?}");
    assert!(
        err.to_string().contains("/nonexistent/model.safetensors"),
        "{err}"
    );
    let err = read_safetensors(path).unwrap_err();
    assert!(
        err.to_string().contains("/nonexistent/model.safetensors"),
        "{err}"
    );
}

#[test]
fn truncated_safetensors_error_names_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("cut.safetensors");
    write_safetensors(&path, &small(), Precision::Fp32).unwrap();
    let bytes = std::fs::read(&path).unwrap();
    std::fs::write(&path, &bytes[..bytes.len() - 5]).unwrap();
    let err = read_safetensors(&path).unwrap_err();
    assert!(matches!(err, CheckpointError::Corrupt { .. }), "{err:?}");
    let message = err.to_string();
    assert_mentions(&message, &["cut.safetensors", "truncated"]);

    std::fs::write(&path, b"\x05").unwrap();
    let message = read_safetensors(&path).unwrap_err().to_string();
    assert!(message.contains("cut.safetensors"), "{message}");
}

#[test]
fn half_precision_files_load_as_fp32() {
    let dir = tempfile::tempdir().unwrap();
    for precision in [Precision::Fp16, Precision::Bf16] {
        let path = dir.path().join("half.safetensors");
        write_safetensors(&path, &small(), precision).unwrap();
        let back = read_safetensors(&path).unwrap();
        assert_eq!(back["layer.weight"].kind(), Kind::Float);
        let tolerance = if precision == Precision::Fp16 {
            1e-3
        } else {
            1e-2
        };
        let diff = (&back["layer.weight"] - &small()["layer.weight"])
            .abs()
            .max()
            .double_value(&[]);
        assert!(diff < tolerance && diff > 0.0, "{precision:?}: {diff}");
    }
}

#[test]
fn var_store_errors_name_tensor_shapes_file_and_component() {
    let source = Path::new("/models/x.safetensors");
    let mut vs = nn::VarStore::new(Device::Cpu);
    let _w = vs.root().sub("layer").zeros("weight", &[2, 3]);
    let _b = vs.root().sub("layer").zeros("bias", &[2]);

    let mut missing = small();
    missing.remove("layer.bias");
    let message = fill_var_store(&mut vs, &missing, source, "unet")
        .unwrap_err()
        .to_string();
    for part in ["/models/x.safetensors", "`layer.bias`", "unet", "[2]"] {
        assert!(message.contains(part), "missing: {message}");
    }

    let mut extra = small();
    extra.insert(
        "layer.scale".into(),
        Tensor::ones([4], (Kind::Float, Device::Cpu)),
    );
    let message = fill_var_store(&mut vs, &extra, source, "vae")
        .unwrap_err()
        .to_string();
    for part in ["/models/x.safetensors", "`layer.scale`", "vae", "[4]"] {
        assert!(message.contains(part), "extra: {message}");
    }

    let mut wrong = small();
    wrong.insert(
        "layer.weight".into(),
        Tensor::ones([3, 2], (Kind::Float, Device::Cpu)),
    );
    let err = fill_var_store(&mut vs, &wrong, source, "text encoder").unwrap_err();
    assert!(
        matches!(&err, CheckpointError::ShapeMismatch { expected, found, .. }
        if expected == &[2, 3] && found == &[3, 2]),
        "{err:?}"
    );
    let message = err.to_string();
    for part in [
        "/models/x.safetensors",
        "`layer.weight`",
        "text encoder",
        "[3, 2]",
        "[2, 3]",
    ] {
        assert!(message.contains(part), "shape: {message}");
    }
    // A refused load leaves the VarStore untouched.
    assert_eq!(
        vs.variables()["layer.weight"]
            .abs()
            .sum(Kind::Float)
            .double_value(&[]),
        0.0
    );
}

#[test]
fn tiny_sd1_folder_loads_into_our_models() {
    let model = load_pipeline_weights(&fixture("tiny-sd1")).unwrap();
    assert_eq!(
        (model.kind, model.version, model.prediction_type),
        (
            SourceKind::DiffusersFolder,
            SdVersion::Sd1,
            PredictionType::Epsilon
        )
    );
    assert!(
        model
            .tokenizer
            .as_ref()
            .unwrap()
            .join("vocab.json")
            .is_file()
    );
    // transformers 5 wrote the text encoder without the prefix; we always carry it.
    assert!(
        model
            .text_encoder
            .tensors
            .keys()
            .all(|k| k.starts_with("text_model."))
    );
    fill_models(&model);
}

#[test]
fn tiny_sd2_folder_is_sd2_v_prediction_without_position_ids() {
    let model = load_pipeline_weights(&fixture("tiny-sd2")).unwrap();
    assert_eq!(
        (model.version, model.prediction_type),
        (SdVersion::Sd2, PredictionType::VPrediction)
    );
    assert!(
        !model
            .text_encoder
            .tensors
            .keys()
            .any(|k| k.contains("position_ids"))
    );
    fill_models(&model);
}

/// Builds our UNet, VAE and text encoder from the model's configs and fills them exactly.
fn fill_models(model: &dreambooth_trainer::checkpoint::LoadedModel) {
    let mut vs = nn::VarStore::new(Device::Cpu);
    let cfg = UNetConfig::from_json(&model.unet.config.to_string()).unwrap();
    let _unet = unet(vs.root(), &cfg);
    model.unet.fill(&mut vs, "unet").unwrap();

    let mut vs = nn::VarStore::new(Device::Cpu);
    let cfg = VaeConfig::from_json(&model.vae.config.to_string()).unwrap();
    let _vae = autoencoder_kl(vs.root(), &cfg);
    model.vae.fill(&mut vs, "vae").unwrap();

    let mut vs = nn::VarStore::new(Device::Cpu);
    let cfg: ClipTextConfig = serde_json::from_value(model.text_encoder.config.clone()).unwrap();
    let _text = clip_text_model(vs.root(), &cfg);
    model.text_encoder.fill(&mut vs, "text encoder").unwrap();
    let name = "text_model.final_layer_norm.weight";
    assert!(vs.variables()[name].equal(&model.text_encoder.tensors[name]));
}

#[test]
fn fp16_variant_is_used_when_the_plain_file_is_missing() {
    let dir = tempfile::tempdir().unwrap();
    let original = load_pipeline_weights(&fixture("tiny-sd1")).unwrap();
    save_diffusers_folder(&original, dir.path(), Precision::Fp32).unwrap();
    let unet_dir = dir.path().join("unet");
    std::fs::remove_file(unet_dir.join("diffusion_pytorch_model.safetensors")).unwrap();
    write_safetensors(
        &unet_dir.join("diffusion_pytorch_model.fp16.safetensors"),
        &original.unet.tensors,
        Precision::Fp16,
    )
    .unwrap();
    let model = read_diffusers_folder(dir.path()).unwrap();
    assert!(
        model
            .unet
            .weights
            .ends_with("diffusion_pytorch_model.fp16.safetensors")
    );
    let name = "conv_in.weight";
    let expected = original.unet.tensors[name]
        .to_kind(Kind::Half)
        .to_kind(Kind::Float);
    assert_eq!(model.unet.tensors[name].kind(), Kind::Float);
    assert!(model.unet.tensors[name].equal(&expected));

    std::fs::remove_file(unet_dir.join("diffusion_pytorch_model.fp16.safetensors")).unwrap();
    let message = read_diffusers_folder(dir.path()).unwrap_err().to_string();
    assert_mentions(
        &message,
        &["unet", "diffusion_pytorch_model.fp16.safetensors"],
    );
}

#[test]
fn saved_folder_has_configs_scheduler_tokenizer_and_requested_precision() {
    let dir = tempfile::tempdir().unwrap();
    let model = load_pipeline_weights(&fixture("tiny-sd2")).unwrap();
    save_diffusers_folder(&model, dir.path(), Precision::Bf16).unwrap();
    for file in [
        "model_index.json",
        "unet/config.json",
        "vae/config.json",
        "text_encoder/config.json",
        "scheduler/scheduler_config.json",
        "tokenizer/vocab.json",
        "tokenizer/merges.txt",
    ] {
        assert!(dir.path().join(file).is_file(), "{file} missing");
    }
    let bytes = std::fs::read(dir.path().join("text_encoder/model.safetensors")).unwrap();
    let file = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    assert!(
        file.iter()
            .all(|(_, view)| view.dtype() == safetensors::Dtype::BF16)
    );
    let back = read_diffusers_folder(dir.path()).unwrap();
    assert_eq!(back.unet.config, model.unet.config);
    assert_eq!(back.scheduler["prediction_type"], "v_prediction");
    assert_eq!(back.version, SdVersion::Sd2);
}

/// diffusers folder → single file → diffusers folder, twice: once with the reference
/// folder's configs and once with configs read off the tensors alone.
fn round_trip(name: &str) {
    let dir = tempfile::tempdir().unwrap();
    let source = fixture(name);
    let model = load_pipeline_weights(&source).unwrap();
    let single = dir.path().join("model.safetensors");
    save_single_file(&model, &single, Precision::Fp32).unwrap();

    let with_configs = LoadOptions {
        configs_from: Some(source.clone()),
        ..Default::default()
    };
    let reloaded = load_pipeline_weights_with(&single, &with_configs).unwrap();
    assert_eq!(reloaded.kind, SourceKind::SingleFile);
    assert_eq!(reloaded.version, model.version);
    let out = dir.path().join("folder");
    save_diffusers_folder(&reloaded, &out, Precision::Fp32).unwrap();
    let back = read_diffusers_folder(&out).unwrap();
    assert_same(
        &back.unet.tensors,
        &read_safetensors(&source.join("unet/diffusion_pytorch_model.safetensors")).unwrap(),
        "unet",
    );
    assert_same(
        &back.vae.tensors,
        &read_safetensors(&source.join("vae/diffusion_pytorch_model.safetensors")).unwrap(),
        "vae",
    );
    assert_same(
        &back.text_encoder.tensors,
        &model.text_encoder.tensors,
        "text encoder",
    );
    assert_eq!(back.unet.config, model.unet.config);

    let inferred = load_pipeline_weights(&single).unwrap();
    assert_eq!(inferred.version, model.version);
    assert_same(
        &inferred.unet.tensors,
        &model.unet.tensors,
        "unet, inferred layout",
    );
    assert_same(
        &inferred.text_encoder.tensors,
        &model.text_encoder.tensors,
        "text, inferred layout",
    );
    for key in [
        "block_out_channels",
        "layers_per_block",
        "down_block_types",
        "up_block_types",
        "cross_attention_dim",
        "use_linear_projection",
        "in_channels",
        "out_channels",
    ] {
        assert_eq!(
            inferred.unet.config[key], model.unet.config[key],
            "unet {key}"
        );
    }
    for key in ["block_out_channels", "layers_per_block", "latent_channels"] {
        assert_eq!(inferred.vae.config[key], model.vae.config[key], "vae {key}");
    }
    for key in [
        "hidden_size",
        "num_hidden_layers",
        "intermediate_size",
        "vocab_size",
        "hidden_act",
    ] {
        assert_eq!(
            inferred.text_encoder.config[key], model.text_encoder.config[key],
            "text {key}"
        );
    }
}

#[test]
fn tiny_sd1_round_trip_through_a_single_file_is_bit_identical() {
    round_trip("tiny-sd1");
}

#[test]
fn tiny_sd2_round_trip_through_a_single_file_is_bit_identical() {
    round_trip("tiny-sd2");
}

#[test]
fn sd1_single_files_use_the_text_model_prefix() {
    let dir = tempfile::tempdir().unwrap();
    let model = load_pipeline_weights(&fixture("tiny-sd1")).unwrap();
    let single = dir.path().join("sd1.safetensors");
    save_single_file(&model, &single, Precision::Fp16).unwrap();
    let tensors = read_safetensors(&single).unwrap();
    let text: Vec<&String> = tensors
        .keys()
        .filter(|k| k.starts_with("cond_stage_model."))
        .collect();
    assert!(!text.is_empty());
    assert!(
        text.iter()
            .all(|k| k.starts_with("cond_stage_model.transformer.text_model.")),
        "{text:?}"
    );
    assert!(tensors.contains_key("model.diffusion_model.input_blocks.0.0.weight"));
    assert!(tensors.contains_key("first_stage_model.encoder.mid.attn_1.q.weight"));
    assert_eq!(
        tensors["first_stage_model.encoder.mid.attn_1.q.weight"].dim(),
        4
    );
}
