//! The UNet matches diffusers in fp32 on CPU: outputs for a batch with two different
//! timesteps, and gradients of an MSE loss, on the tiny SD1-style and SD2-style
//! models the fixture script made.

mod common;

use common::{fixtures, load_exact, max_abs_diff, read_tensors, take};
use dreambooth_trainer::models::{UNet2DConditionModel, UNetConfig, unet};
use tch::{Device, Reduction, nn};

const TOLERANCE: f64 = 1e-4;

fn tiny_unet(model: &str) -> (nn::VarStore, UNet2DConditionModel) {
    let dir = fixtures().join(model).join("unet");
    let cfg = UNetConfig::from_file(dir.join("config.json")).unwrap();
    let vs = nn::VarStore::new(Device::Cpu);
    let unet = unet(vs.root(), &cfg);
    load_exact(&vs, &dir.join("diffusion_pytorch_model.safetensors"));
    (vs, unet)
}

fn forward_matches(model: &str) {
    let (_vs, unet) = tiny_unet(model);
    let parity = read_tensors(
        &fixtures()
            .join("parity")
            .join(model)
            .join("unet.safetensors"),
    );
    let timesteps = take(&parity, "timesteps");
    assert_ne!(
        timesteps.int64_value(&[0]),
        timesteps.int64_value(&[1]),
        "fixture must use two timesteps"
    );
    let out = tch::no_grad(|| {
        unet.forward(
            take(&parity, "sample"),
            timesteps,
            take(&parity, "encoder_hidden_states"),
        )
    });
    let err = max_abs_diff(&out, take(&parity, "out"));
    eprintln!("{model} unet output: max abs error {err:.3e}");
    assert!(
        err <= TOLERANCE,
        "{model}: UNet output differs from diffusers by {err}"
    );

    // The comparison can fail: swapping the two samples' timesteps moves the output.
    let swapped = tch::no_grad(|| {
        unet.forward(
            take(&parity, "sample"),
            &timesteps.flip([0]),
            take(&parity, "encoder_hidden_states"),
        )
    });
    let moved = max_abs_diff(&swapped, take(&parity, "out"));
    assert!(
        moved > 100.0 * TOLERANCE,
        "{model}: timesteps barely matter ({moved})"
    );
}

fn gradients_match(model: &str) {
    let (vs, unet) = tiny_unet(model);
    let parity = read_tensors(
        &fixtures()
            .join("parity")
            .join(model)
            .join("unet.safetensors"),
    );
    let grads = read_tensors(
        &fixtures()
            .join("parity")
            .join(model)
            .join("grads.safetensors"),
    );
    let out = unet.forward(
        take(&parity, "sample"),
        take(&parity, "timesteps"),
        take(&parity, "encoder_hidden_states"),
    );
    let loss = out.mse_loss(take(&grads, "target"), Reduction::Mean);
    let loss_err = (loss.double_value(&[]) - take(&grads, "loss").double_value(&[0])).abs();
    eprintln!("{model} unet loss: abs error {loss_err:.3e}");
    assert!(loss_err <= TOLERANCE, "{model}: loss differs by {loss_err}");
    loss.backward();

    let vars = vs.variables();
    let mut checked = 0;
    for (key, expected) in grads.iter().filter(|(k, _)| k.starts_with("unet.")) {
        let name = &key["unet.".len()..];
        let var = vars
            .get(name)
            .unwrap_or_else(|| panic!("{model}: no parameter {name}"));
        let err = max_abs_diff(&var.grad(), expected);
        let scale = expected.abs().max().double_value(&[]);
        eprintln!("{model} grad {name}: max abs error {err:.3e} (max |grad| {scale:.3e})");
        assert!(
            err <= TOLERANCE,
            "{model}: gradient of {name} differs by {err}"
        );
        checked += 1;
    }
    assert!(
        checked >= 5,
        "{model}: only {checked} gradients in the fixture"
    );
}

#[test]
fn sd1_unet_output_matches_diffusers() {
    forward_matches("tiny-sd1");
}

#[test]
fn sd2_unet_output_matches_diffusers() {
    forward_matches("tiny-sd2");
}

#[test]
fn sd1_unet_gradients_match_diffusers() {
    gradients_match("tiny-sd1");
}

#[test]
fn sd2_unet_gradients_match_diffusers() {
    gradients_match("tiny-sd2");
}
