//! A replayed CUDA graph trains exactly like the eager step: same random draws, same
//! kernels, so the same loss sequence within bf16 tolerance.
//!
//! Needs a CUDA GPU, so it is ignored in CI (which has none); `bench/gpu-check.sh` runs
//! it on the GPU machine with `--ignored`.

use dreambooth_trainer::bench::{BenchConfig, MemoryMode, random_trainer};
use dreambooth_trainer::cuda;
use dreambooth_trainer::models::versions::KnownVersion;
use dreambooth_trainer::train::trainer::Phase;
use tch::Device;

const STEPS: u32 = 20;
/// The UNet learning rate of `random_trainer`.
const LR: f64 = 2e-6;

fn config(tiny: bool, phase: Phase, resolution: i64, eager: bool) -> BenchConfig {
    with_weights(tiny, phase, resolution, eager, true)
}

fn with_weights(
    tiny: bool,
    phase: Phase,
    resolution: i64,
    eager: bool,
    packed: bool,
) -> BenchConfig {
    BenchConfig {
        version: KnownVersion::Sd15,
        tiny,
        phase,
        memory: MemoryMode::Default,
        resolution,
        batch: 2,
        steps: STEPS as usize,
        warmup: 0,
        device: Device::Cuda(0),
        bf16: true,
        eager,
        packed,
    }
}

/// The losses of `STEPS` steps, and whether the run ended replaying a graph.
fn losses(config: &BenchConfig) -> (Vec<f64>, bool) {
    let mut trainer = random_trainer(config, 7);
    let losses = (0..STEPS).map(|step| trainer.step(step).loss).collect();
    (losses, trainer.replays_cuda_graph())
}

fn assert_same_losses(tiny: bool, phase: Phase, resolution: i64) {
    assert!(tch::Cuda::is_available(), "this test needs a CUDA GPU");
    cuda::set_autocast_bf16(true).expect("the CUDA shim is built");
    let (eager, eager_replayed) = losses(&config(tiny, phase, resolution, true));
    let (graph, graph_replayed) = losses(&config(tiny, phase, resolution, false));
    assert!(
        !eager_replayed && graph_replayed,
        "one eager run, one graph run"
    );
    eprintln!("{phase:?} tiny={tiny} eager {eager:?}\n{phase:?} tiny={tiny} graph {graph:?}");
    for (step, (e, g)) in eager.iter().zip(&graph).enumerate() {
        // bf16 keeps 8 bits of mantissa; kernels may pick other algorithms per stream.
        let tolerance = 2e-2 * e.abs().max(1e-3);
        assert!(
            (e - g).abs() <= tolerance,
            "step {step}: eager loss {e}, graph loss {g}"
        );
    }
    // Losses move from step to step: the draws differ, so this is not one value twice.
    assert!(eager.windows(2).any(|w| w[0] != w[1]), "{eager:?}");
}

#[test]
#[ignore = "needs a CUDA GPU; bench/gpu-check.sh runs it"]
fn graph_replay_matches_eager_losses_tiny_unet_phase() {
    assert_same_losses(true, Phase::Unet, 64);
}

#[test]
#[ignore = "needs a CUDA GPU; bench/gpu-check.sh runs it"]
fn graph_replay_matches_eager_losses_tiny_text_encoder_phase() {
    assert_same_losses(true, Phase::TextEncoder, 64);
}

#[test]
#[ignore = "needs a CUDA GPU; bench/gpu-check.sh runs it"]
fn graph_replay_matches_eager_losses_sd15_unet_phase() {
    assert_same_losses(false, Phase::Unet, 256);
}

/// Packed UNet weights (bf16 halves + remainders, our AdamW kernel, the clip folded in)
/// train like plain fp32 weights under autocast: the same losses and, after 20 updates,
/// the same fp32 masters up to what last-bit gradient differences can move.
#[test]
#[ignore = "needs a CUDA GPU; bench/gpu-check.sh runs it"]
fn packed_weights_train_like_fp32_weights() {
    assert!(tch::Cuda::is_available(), "this test needs a CUDA GPU");
    cuda::set_autocast_bf16(true).expect("the CUDA shim is built");
    // The losses, the final weights, and how far training moved them (sum of |Δw|).
    let run = |packed: bool, eager: bool| {
        let mut trainer = random_trainer(&with_weights(true, Phase::Unet, 64, eager, packed), 7);
        // Detached: a copy in the autograd graph would keep the weights' gradient
        // accumulators alive from the default stream into the capture.
        let initial: Vec<(String, tch::Tensor)> = trainer
            .weights()
            .unet
            .iter()
            .map(|(n, t)| (n.clone(), t.detach().copy()))
            .collect();
        let losses: Vec<f64> = (0..STEPS).map(|step| trainer.step(step).loss).collect();
        assert_eq!(trainer.trains_packed_weights(), packed);
        let weights = trainer.weights().unet;
        let moved: f64 = initial
            .iter()
            .map(|(n, t)| {
                let now = weights[n].to_device(t.device());
                (now - t).abs().sum(tch::Kind::Double).double_value(&[])
            })
            .sum();
        (losses, weights, moved)
    };
    let (plain_losses, plain, plain_moved) = run(false, true);
    for eager in [true, false] {
        let (losses, packed, moved) = run(true, eager);
        // Updates applied once a step, to every weight: the same total movement.
        let ratio = moved / plain_moved;
        assert!(
            (0.9..1.1).contains(&ratio),
            "packed weights moved {ratio}× as far"
        );
        eprintln!("fp32 {plain_losses:?}\npacked (eager {eager}) {losses:?}");
        for (step, (a, b)) in plain_losses.iter().zip(&losses).enumerate() {
            assert!(
                (a - b).abs() <= 1e-2 * a.abs().max(1e-3),
                "step {step}: fp32 loss {a}, packed loss {b}"
            );
        }
        // AdamW moves a weight by at most about lr a step, so a packing or update bug
        // (weights off by their bf16 rounding or worse) shows far above this bound, while
        // grads that differ in their last bits (atomics) may flip a few steps' signs.
        let bound = 2.0 * f64::from(STEPS) * LR;
        let mut worst = (String::new(), 0f64);
        for (name, weight) in &plain {
            let other = packed[name].to_device(weight.device());
            assert_eq!(other.kind(), tch::Kind::Float, "{name} comes back as fp32");
            let diff = (weight - other).abs().max().double_value(&[]);
            if diff > worst.1 {
                worst = (name.clone(), diff);
            }
        }
        eprintln!(
            "largest difference {:e} in {} (eager {eager})",
            worst.1, worst.0
        );
        assert!(
            worst.1 <= bound,
            "{} differs by {:e} (eager {eager})",
            worst.0,
            worst.1
        );
    }
}
