//! `training.memory: lowMemory` through the real trainer on the CPU (the tiny networks
//! of `bench --tiny --memory low`, the same path a session takes): bf16 weights and
//! bf16 AdamW states, the loss falls, and a saved state resumes bit for bit.

use dreambooth_api::spec::MemoryMode as TrainingMemory;
use dreambooth_trainer::bench::{BenchConfig, MemoryMode, random_trainer};
use dreambooth_trainer::models::versions::KnownVersion;
use dreambooth_trainer::train::state::{WEIGHTS_FILE, load_state, save_state};
use dreambooth_trainer::train::trainer::{Phase, Trainer};
use std::sync::Mutex;

use tch::{Device, Kind, Tensor};

/// libtorch's default generator is process-wide and every step reseeds it: tests of
/// this binary run one at a time.
static SEEDED: Mutex<()> = Mutex::new(());

const TEXT_ENCODER_STEPS: u32 = 3;
/// Enough for the tiny UNet's loss to fall clearly below its start.
const UNET_STEPS: u32 = 24;

fn config(memory: MemoryMode, unet_steps: u32) -> BenchConfig {
    BenchConfig {
        version: KnownVersion::Sd15,
        tiny: true,
        phase: Phase::Unet,
        memory,
        resolution: 64,
        batch: 2,
        steps: unet_steps as usize,
        warmup: 0,
        device: Device::Cpu,
        bf16: false,
        eager: true,
        packed: true,
    }
}

/// Both phases (the text encoder first), at learning rates the tiny model learns at.
fn trainer(memory: MemoryMode, unet_steps: u32) -> Trainer {
    let mut trainer = random_trainer(&config(memory, unet_steps), 5);
    trainer.settings.text_encoder_steps = TEXT_ENCODER_STEPS;
    trainer.settings.text_encoder_lr = 1e-4;
    trainer.settings.unet_lr = 2e-3;
    trainer
}

fn kinds(trainer: &Trainer) -> Vec<Kind> {
    let mut kinds: Vec<Kind> = [&trainer.stores.unet, &trainer.stores.text_encoder]
        .into_iter()
        .flat_map(|store| store.variables().into_values().map(|t| t.kind()))
        .collect();
    kinds.dedup();
    kinds
}

/// All trainable weights of both networks, flattened in name order, as fp32.
fn weights(trainer: &Trainer) -> Tensor {
    let mut named: Vec<(String, Tensor)> = [
        ("te.", &trainer.stores.text_encoder),
        ("unet.", &trainer.stores.unet),
    ]
    .into_iter()
    .flat_map(|(prefix, store)| {
        store
            .variables()
            .into_iter()
            .map(move |(n, t)| (format!("{prefix}{n}"), t))
    })
    .collect();
    named.sort_by(|a, b| a.0.cmp(&b.0));
    Tensor::cat(
        &named
            .iter()
            .map(|(_, t)| t.to_kind(Kind::Float).flatten(0, -1))
            .collect::<Vec<_>>(),
        0,
    )
}

#[test]
fn low_memory_trains_bf16_weights_with_bf16_states_and_the_loss_falls() {
    let _seeded = SEEDED.lock().unwrap_or_else(|e| e.into_inner());
    let mut low = trainer(MemoryMode::Low, UNET_STEPS);
    assert_eq!(low.settings.memory, TrainingMemory::LowMemory);
    assert_eq!(kinds(&low), [Kind::BFloat16]);
    let start = weights(&low);
    let total = low.settings.total_steps();
    let losses: Vec<f64> = (0..total).map(|step| low.step(step).loss).collect();
    assert!(losses.iter().all(|l| l.is_finite()), "{losses:?}");
    let unet = &losses[TEXT_ENCODER_STEPS as usize..];
    let mean = |xs: &[f64]| xs.iter().sum::<f64>() / xs.len() as f64;
    let (head, tail) = (mean(&unet[..6]), mean(&unet[unet.len() - 6..]));
    eprintln!("lowMemory losses {losses:?}: first six {head:.4}, last six {tail:.4}");
    assert!(tail < 0.85 * head, "the loss did not fall: {losses:?}");
    // Still bf16 after the updates, and the updates landed despite bf16's 8 bits.
    assert_eq!(kinds(&low), [Kind::BFloat16]);
    let moved = (weights(&low) - start).abs().max().double_value(&[]);
    assert!(moved > 0.0);
    let (phase, optimizer) = low.optimizer().expect("in the UNet phase");
    assert_eq!(phase, Phase::Unet);
    assert_eq!(optimizer.steps_taken(), i64::from(UNET_STEPS));
    let states = optimizer.state_tensors();
    assert!(!states.is_empty());
    assert!(
        states.iter().all(|(_, t)| t.kind() == Kind::BFloat16),
        "optimizer states are not all bf16"
    );
    assert!(!low.replays_cuda_graph());

    // The default mode on the same networks keeps fp32 weights and states.
    let mut default = trainer(MemoryMode::Default, 1);
    assert_eq!(kinds(&default), [Kind::Float]);
    default.step(0);
    let (_, optimizer) = default.optimizer().unwrap();
    assert!(
        optimizer
            .state_tensors()
            .iter()
            .all(|(_, t)| t.kind() == Kind::Float)
    );
}

#[test]
fn a_low_memory_state_resumes_the_same_losses_bit_for_bit() {
    let _seeded = SEEDED.lock().unwrap_or_else(|e| e.into_inner());
    // Saved in the middle of the UNet phase, after the text encoder's.
    let unet_steps = 6;
    let split = TEXT_ENCODER_STEPS + 3;
    let mut straight = trainer(MemoryMode::Low, unet_steps);
    let total = straight.settings.total_steps();
    let losses: Vec<f64> = (0..total).map(|step| straight.step(step).loss).collect();

    let dir = tempfile::tempdir().unwrap();
    let mut first = trainer(MemoryMode::Low, unet_steps);
    for step in 0..split {
        assert_eq!(first.step(step).loss, losses[step as usize]);
    }
    let info = save_state(&first, &first.weights(), split, dir.path()).unwrap();
    assert_eq!(info.memory, TrainingMemory::LowMemory);
    drop(first);
    // What was written is bf16: the weights and the optimizer's moments.
    let saved = Tensor::read_safetensors(dir.path().join(WEIGHTS_FILE)).unwrap();
    let moments: Vec<&(String, Tensor)> = saved
        .iter()
        .filter(|(n, _)| n.starts_with("optimizer.exp_avg"))
        .collect();
    assert!(!moments.is_empty());
    assert!(saved.iter().all(|(_, t)| t.kind() == Kind::BFloat16));

    let mut resumed = trainer(MemoryMode::Low, unet_steps);
    let info = load_state(&mut resumed, dir.path()).unwrap();
    assert_eq!(info.step, split);
    let rest: Vec<f64> = (split..total).map(|step| resumed.step(step).loss).collect();
    assert_eq!(rest, losses[split as usize..], "the resumed losses differ");
    assert!(
        weights(&resumed).equal(&weights(&straight)),
        "resumed weights differ"
    );
}
