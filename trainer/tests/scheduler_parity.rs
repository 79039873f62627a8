//! The schedulers match diffusers: the DDPM training schedule and noising, every sampler's
//! timesteps and σs, and whole 10-step trajectories driven by fixed fake model outputs
//! (ε-prediction with SD 1.5's config, v-prediction with SD 2.1's), Euler ancestral's
//! noise drawn from the seeded CPU generator as diffusers draws it.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use dreambooth_trainer::schedulers::{CpuGenerator, DdpmScheduler, Sampler, SchedulerConfig};
use tch::{Kind, Tensor};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/parity")
}

fn tensors() -> HashMap<String, Tensor> {
    let path = fixtures().join("schedulers.safetensors");
    Tensor::read_safetensors(&path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .into_iter()
        .collect()
}

/// The scheduler configs the fixtures were made from (SD 1.5's and SD 2.1's files).
fn source_config(key: &str) -> SchedulerConfig {
    let path = fixtures().join("schedulers.json");
    let text = std::fs::read_to_string(&path).unwrap();
    let json: serde_json::Value = serde_json::from_str(&text).unwrap();
    serde_json::from_value(json[key].clone()).unwrap()
}

const SAMPLERS: [(&str, Sampler); 4] = [
    ("ddim", Sampler::Ddim),
    ("euler", Sampler::Euler),
    ("euler_a", Sampler::EulerAncestral),
    ("dpmpp_2m_karras", Sampler::DpmPp2mKarras),
];

fn max_abs(a: &Tensor, b: &Tensor) -> f64 {
    assert_eq!(a.size(), b.size());
    (a.to_kind(Kind::Double) - b.to_kind(Kind::Double))
        .abs()
        .max()
        .double_value(&[])
}

#[test]
fn ddpm_schedule_noising_and_velocity_match_diffusers() {
    let t = tensors();
    let ddpm = DdpmScheduler::new(&source_config("source_config_eps"));
    let ac = Tensor::from_slice(ddpm.alphas_cumprod());
    let ac_err = max_abs(&ac, &t["ddpm_alphas_cumprod"]);
    let (x0, noise, steps) = (&t["ddpm_x0"], &t["ddpm_noise"], &t["ddpm_timesteps"]);
    let noisy_err = max_abs(&ddpm.add_noise(x0, noise, steps), &t["ddpm_noisy"]);
    let v_err = max_abs(&ddpm.get_velocity(x0, noise, steps), &t["ddpm_velocity"]);
    eprintln!("ddpm: alphas_cumprod {ac_err:.3e}, add_noise {noisy_err:.3e}, velocity {v_err:.3e}");
    assert!(ac_err <= 1e-7 && noisy_err <= 1e-5 && v_err <= 1e-5);
}

#[test]
fn timesteps_and_sigmas_match_diffusers() {
    let t = tensors();
    let cfg = source_config("source_config_eps");
    for (name, sampler) in SAMPLERS {
        for n in [10usize, 30] {
            let mut s = sampler.scheduler(&cfg);
            s.set_timesteps(n);
            let ours = Tensor::from_slice(s.timesteps());
            let err = max_abs(&ours, &t[&format!("{name}_{n}_timesteps")]);
            eprintln!("{name} {n} steps: timesteps max abs error {err:.3e}");
            assert!(
                err <= 1e-4,
                "{name} {n}: timesteps {ours} vs {}",
                t[&format!("{name}_{n}_timesteps")]
            );
            if let Some(expected) = t.get(&format!("{name}_{n}_sigmas")) {
                let err = max_abs(&Tensor::from_slice(s.sigmas()), expected);
                eprintln!("{name} {n} steps: sigmas max abs error {err:.3e}");
                assert!(
                    err <= 1e-4,
                    "{name} {n}: sigmas {:?} vs {expected}",
                    s.sigmas()
                );
            } else {
                assert!(s.sigmas().is_empty());
            }
        }
    }
}

#[test]
fn trajectories_match_diffusers() {
    let t = tensors();
    let model_out = &t["traj_model_out"];
    for (pred, config) in [("eps", "source_config_eps"), ("v", "source_config_v")] {
        let cfg = source_config(config);
        for (name, sampler) in SAMPLERS {
            let mut s = sampler.scheduler(&cfg);
            s.set_timesteps(10);
            let key = |what: &str| format!("traj_{pred}_{name}_{what}");
            let sigma_err =
                (s.init_noise_sigma() - t[&key("init_noise_sigma")].double_value(&[0])).abs();
            // diffusers draws Euler ancestral's noise from Generator().manual_seed(42).
            tch::manual_seed(42);
            let mut x = &t["traj_x"] * s.init_noise_sigma();
            let expected = &t[&key("steps")];
            let mut worst: f64 = 0.0;
            for (i, ts) in s.timesteps().to_vec().into_iter().enumerate() {
                let _ = s.scale_model_input(&x, ts);
                x = s.step(&model_out.get(i as i64), ts, &x, &mut CpuGenerator);
                let err = max_abs(&x, &expected.get(i as i64));
                assert!(err <= 1e-4, "{pred} {name}: step {i} off by {err}");
                worst = worst.max(err);
            }
            let final_err = max_abs(&x, &t[&key("final")]);
            eprintln!(
                "{pred} {name}: trajectory max abs error {worst:.3e} (final {final_err:.3e}), \
                 init_noise_sigma {sigma_err:.3e}"
            );
            assert!(final_err <= 1e-4 && sigma_err <= 1e-4);
        }
    }
}
