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

fn config(tiny: bool, phase: Phase, resolution: i64, eager: bool) -> BenchConfig {
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
