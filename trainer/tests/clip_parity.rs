//! The CLIP text encoder matches transformers' `CLIPTextModel` on the tiny SD1-style
//! (quick_gelu, no `text_model.` prefix in the file) and SD2-style (gelu, prefixed names
//! with a `position_ids` buffer) fixtures: hidden states, pooled output and gradients.

use std::collections::HashMap;

mod common;

use common::{fixtures, max_abs_diff, read_tensors};
use dreambooth_trainer::models::clip::{ClipTextConfig, ClipTextModel, clip_text_model};
use tch::{Device, Kind, Tensor, nn};

/// Builds the tiny text encoder and copies the checkpoint in, accepting both key layouts.
fn load(model: &str) -> (nn::VarStore, ClipTextModel) {
    let dir = fixtures().join(model).join("text_encoder");
    let cfg = ClipTextConfig::from_file(dir.join("config.json")).unwrap();
    let mut vs = nn::VarStore::new(Device::Cpu);
    let text = clip_text_model(vs.root(), &cfg);
    let mut file = read_tensors(&dir.join("model.safetensors"));
    file.retain(|k, _| !k.ends_with("position_ids"));
    let file: HashMap<String, Tensor> = file
        .into_iter()
        .map(|(k, v)| {
            (
                if k.starts_with("text_model.") {
                    k
                } else {
                    format!("text_model.{k}")
                },
                v,
            )
        })
        .collect();
    let mut vars = vs.variables();
    assert_eq!(
        {
            let mut k: Vec<_> = vars.keys().cloned().collect();
            k.sort();
            k
        },
        {
            let mut k: Vec<_> = file.keys().cloned().collect();
            k.sort();
            k
        },
        "{model}: parameter names differ from the checkpoint"
    );
    tch::no_grad(|| {
        for (name, var) in vars.iter_mut() {
            var.copy_(&file[name]);
        }
    });
    vs.set_kind(Kind::Float);
    (vs, text)
}

fn forward_matches(model: &str) {
    let (_vs, text) = load(model);
    let reference = read_tensors(
        &fixtures()
            .join("parity")
            .join(model)
            .join("text_encoder.safetensors"),
    );
    let out = tch::no_grad(|| text.forward(&reference["input_ids"]));
    let hidden = max_abs_diff(&out.last_hidden_state, &reference["last_hidden_state"]);
    let pooled = max_abs_diff(&out.pooled_output, &reference["pooled_output"]);
    eprintln!(
        "{model}: text encoder max abs error: last_hidden_state {hidden:.3e}, pooled {pooled:.3e}"
    );
    assert!(hidden <= 1e-4 && pooled <= 1e-4);
}

fn gradients_match(model: &str) {
    let (vs, text) = load(model);
    let reference = read_tensors(
        &fixtures()
            .join("parity")
            .join(model)
            .join("grads.safetensors"),
    );
    let out = text.forward(&reference["input_ids"]);
    let loss = out
        .last_hidden_state
        .mse_loss(&reference["text_target"], tch::Reduction::Mean);
    let loss_err = max_abs_diff(&loss.reshape([1]), &reference["text_loss"]);
    loss.backward();
    let vars = vs.variables();
    let mut checked = 0;
    for (key, expected) in &reference {
        let Some(name) = key.strip_prefix("text_encoder.") else {
            continue;
        };
        let name = if name.starts_with("text_model.") {
            name.to_owned()
        } else {
            format!("text_model.{name}")
        };
        let err = max_abs_diff(&vars[&name].grad(), expected);
        eprintln!("{model}: grad {name}: max abs error {err:.3e}");
        assert!(err <= 1e-4, "{name}: {err}");
        checked += 1;
    }
    eprintln!("{model}: text loss error {loss_err:.3e}");
    assert!(loss_err <= 1e-6);
    assert!(checked >= 5, "only {checked} gradients in the fixture");
}

#[test]
fn sd1_text_encoder_matches_transformers() {
    forward_matches("tiny-sd1");
}

#[test]
fn sd2_text_encoder_matches_transformers() {
    forward_matches("tiny-sd2");
}

#[test]
fn sd1_text_encoder_gradients_match_transformers() {
    gradients_match("tiny-sd1");
}

#[test]
fn sd2_text_encoder_gradients_match_transformers() {
    gradients_match("tiny-sd2");
}
