//! The VAE matches diffusers in fp32 on CPU: the encoder's mean and (clamped)
//! log-variance, and the decoder's image, on the tiny models the fixture script made.

mod common;

use common::{fixtures, load_exact, max_abs_diff, read_tensors, take};
use dreambooth_trainer::models::{VaeConfig, autoencoder_kl};
use tch::{Device, nn};

const TOLERANCE: f64 = 1e-4;

fn vae_matches(model: &str) {
    let dir = fixtures().join(model).join("vae");
    let cfg = VaeConfig::from_file(dir.join("config.json")).unwrap();
    let vs = nn::VarStore::new(Device::Cpu);
    let vae = autoencoder_kl(vs.root(), &cfg);
    load_exact(&vs, &dir.join("diffusion_pytorch_model.safetensors"));
    assert_eq!(vae.downscale_factor(), 2);
    assert_eq!(vae.scaling_factor, 0.18215);

    let parity = read_tensors(
        &fixtures()
            .join("parity")
            .join(model)
            .join("vae.safetensors"),
    );
    tch::no_grad(|| {
        let dist = vae.encode(take(&parity, "image"));
        for (name, ours) in [
            ("mean", &dist.mean),
            ("logvar", &dist.logvar),
            ("std", &dist.std()),
        ] {
            let err = max_abs_diff(ours, take(&parity, name));
            eprintln!("{model} vae {name}: max abs error {err:.3e}");
            assert!(
                err <= TOLERANCE,
                "{model}: VAE {name} differs from diffusers by {err}"
            );
        }
        let decoded = vae.decode(take(&parity, "latents"));
        let err = max_abs_diff(&decoded, take(&parity, "decoded"));
        eprintln!("{model} vae decoded: max abs error {err:.3e}");
        assert!(
            err <= TOLERANCE,
            "{model}: VAE decode differs from diffusers by {err}"
        );
    });
}

#[test]
fn sd1_vae_matches_diffusers() {
    vae_matches("tiny-sd1");
}

#[test]
fn sd2_vae_matches_diffusers() {
    vae_matches("tiny-sd2");
}
