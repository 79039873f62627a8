//! Real Stable Diffusion checkpoints load: our full-size SD 1.5 and SD 2.1 UNet and VAE,
//! built from the reference configs, have exactly diffusers' parameter names and shapes
//! (`fixtures/keys/*.json`, written by the fixture script from the reference models).

mod common;

use std::collections::BTreeMap;

use common::fixtures;
use dreambooth_trainer::models::{UNetConfig, VaeConfig, autoencoder_kl, unet};
use tch::{Device, Kind, Tensor, nn};

/// The key list of one full-size model: configs, and name → shape per component.
struct KeyList {
    configs: serde_json::Value,
    shapes: BTreeMap<String, BTreeMap<String, Vec<i64>>>,
}

fn key_list(file: &str) -> KeyList {
    let path = fixtures().join("keys").join(file);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let mut json: serde_json::Value = serde_json::from_str(&text).unwrap();
    let configs = json["configs"].take();
    let mut shapes = BTreeMap::new();
    for component in ["unet", "vae"] {
        let list = serde_json::from_value(json[component].take())
            .unwrap_or_else(|e| panic!("{}: `{component}`: {e}", path.display()));
        shapes.insert(component.to_string(), list);
    }
    KeyList { configs, shapes }
}

/// Every missing, extra and mismatched parameter, so one failure shows them all.
fn differences(vs: &nn::VarStore, expected: &BTreeMap<String, Vec<i64>>) -> Vec<String> {
    let ours: BTreeMap<String, Vec<i64>> = vs
        .variables()
        .into_iter()
        .map(|(k, v)| (k, v.size()))
        .collect();
    let mut problems = Vec::new();
    for (name, shape) in expected {
        match ours.get(name) {
            None => problems.push(format!("missing {name} {shape:?}")),
            Some(ours) if ours != shape => {
                problems.push(format!("{name}: ours {ours:?}, diffusers {shape:?}"))
            }
            Some(_) => {}
        }
    }
    problems.extend(
        ours.keys()
            .filter(|k| !expected.contains_key(*k))
            .map(|k| format!("extra {k}")),
    );
    problems
}

/// Half precision: only names and shapes matter here, and it halves the ~3.4 GB an
/// fp32 SD UNet needs.
fn half_store() -> nn::VarStore {
    let mut vs = nn::VarStore::new(Device::Cpu);
    vs.set_kind(Kind::Half);
    vs
}

fn full_size_models_match(file: &str, expected_params: i64) {
    let keys = key_list(file);
    let started = std::time::Instant::now();
    tch::no_grad(|| {
        let cfg = UNetConfig::from_json(&keys.configs["unet"].to_string()).unwrap();
        let vs = half_store();
        unet(vs.root(), &cfg);
        let problems = differences(&vs, &keys.shapes["unet"]);
        assert!(
            problems.is_empty(),
            "{file} UNet: {} differences:\n{}",
            problems.len(),
            problems.join("\n")
        );
        let params: i64 = vs.variables().values().map(|t| t.numel() as i64).sum();
        assert_eq!(params, expected_params, "{file} UNet parameter count");
        eprintln!(
            "{file}: UNet {} tensors, {params} parameters",
            keys.shapes["unet"].len()
        );
    });
    tch::no_grad(|| {
        let cfg = VaeConfig::from_json(&keys.configs["vae"].to_string()).unwrap();
        let vs = half_store();
        let vae = autoencoder_kl(vs.root(), &cfg);
        assert_eq!(vae.downscale_factor(), 8);
        let problems = differences(&vs, &keys.shapes["vae"]);
        assert!(
            problems.is_empty(),
            "{file} VAE: {} differences:\n{}",
            problems.len(),
            problems.join("\n")
        );
        eprintln!("{file}: VAE {} tensors", keys.shapes["vae"].len());
    });
    eprintln!("{file}: built and compared in {:.1?}", started.elapsed());
}

#[test]
fn sd15_unet_and_vae_have_diffusers_names_and_shapes() {
    full_size_models_match("sd15.json", 859_520_964);
}

#[test]
fn sd21_unet_and_vae_have_diffusers_names_and_shapes() {
    full_size_models_match("sd21.json", 865_910_724);
}

/// On a CUDA machine, the full-size SD 1.5 UNet trains in bf16: forward and backward
/// run, the output stays within bf16 rounding of fp32, and one step's time is
/// printed. SD 2.1 runs its upcast attention in fp16. Without CUDA this checks nothing.
#[test]
fn full_size_unets_run_in_half_precision_on_cuda() {
    if !tch::Cuda::is_available() {
        eprintln!("no CUDA device: half-precision check skipped");
        return;
    }
    let device = Device::Cuda(0);
    for (file, kind, side) in [
        ("sd15.json", Kind::BFloat16, 64),
        ("sd21.json", Kind::Half, 96),
    ] {
        let keys = key_list(file);
        let cfg = UNetConfig::from_json(&keys.configs["unet"].to_string()).unwrap();
        let context_dim = keys.configs["unet"]["cross_attention_dim"]
            .as_i64()
            .unwrap();
        let vs = nn::VarStore::new(device);
        let reference_model = unet(vs.root(), &cfg);
        let mut low = nn::VarStore::new(device);
        let model = unet(low.root(), &cfg);
        low.copy(&vs).unwrap();
        low.set_kind(kind);

        tch::manual_seed(0);
        let sample = Tensor::randn([2, 4, side, side], (Kind::Float, device));
        let timesteps = Tensor::from_slice(&[10i64, 900]).to_device(device);
        let context = Tensor::randn([2, 77, context_dim], (Kind::Float, device));
        let reference = tch::no_grad(|| reference_model.forward(&sample, &timesteps, &context));
        let (sample, context) = (sample.to_kind(kind), context.to_kind(kind));
        let out = tch::no_grad(|| model.forward(&sample, &timesteps, &context));
        assert_eq!(out.kind(), kind);
        let relative = (out.to_kind(Kind::Float) - &reference)
            .abs()
            .max()
            .double_value(&[])
            / reference.abs().max().double_value(&[]);
        eprintln!("{file} {kind:?}: max abs error / max |fp32 output| = {relative:.3e}");
        assert!(
            relative < 0.05,
            "{file}: {kind:?} output is {relative} away from fp32"
        );

        let step = || {
            let out = model.forward(&sample, &timesteps, &context);
            out.to_kind(Kind::Float)
                .square()
                .mean(Kind::Float)
                .backward();
        };
        for _ in 0..3 {
            step();
        }
        tch::Cuda::synchronize(0);
        let started = std::time::Instant::now();
        let steps = 10;
        for _ in 0..steps {
            step();
        }
        tch::Cuda::synchronize(0);
        let ms = started.elapsed().as_secs_f64() * 1000.0 / steps as f64;
        eprintln!("{file} {kind:?} batch 2 at {side}x{side} latents: forward+backward {ms:.1} ms");
        let grad = low.variables()["conv_in.weight"].grad();
        assert!(
            grad.isfinite().all().int64_value(&[]) == 1,
            "{file}: non-finite gradient"
        );
    }
}
