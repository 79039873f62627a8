//! libtorch's generator is global to the process, so tests that need it to themselves
//! live in this binary and take turns.

use std::sync::Mutex;

use dreambooth_trainer::schedulers::PredictionType;
use dreambooth_trainer::train::objective::{NoiseSettings, noise_batch};
use tch::{Device, Kind, Tensor};

static GENERATOR: Mutex<()> = Mutex::new(());

#[test]
fn the_same_seed_draws_the_same_noise_batch() {
    let _turn = GENERATOR.lock().unwrap();
    let latents = Tensor::ones([2, 4, 4, 4], (Kind::Float, Device::Cpu));
    let alphas_cumprod = Tensor::linspace(0.999, 0.01, 1000, (Kind::Float, Device::Cpu));
    let settings = NoiseSettings {
        prediction: PredictionType::Epsilon,
        offset_noise: 0.1,
        min_snr_gamma: Some(5.0),
    };
    tch::manual_seed(7);
    let first = noise_batch(&latents, &alphas_cumprod, &settings);
    tch::manual_seed(7);
    let second = noise_batch(&latents, &alphas_cumprod, &settings);
    assert!(first.noisy_latents.equal(&second.noisy_latents));
    assert!(first.timesteps.equal(&second.timesteps));
    assert!(first.weights.equal(&second.weights));
    tch::manual_seed(8);
    let third = noise_batch(&latents, &alphas_cumprod, &settings);
    assert!(!first.noisy_latents.equal(&third.noisy_latents));
}
