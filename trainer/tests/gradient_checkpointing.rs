//! Gradient checkpointing changes memory, not maths: the gradients of every parameter and
//! input of the UNet and the text encoder, and a whole training session's losses, are
//! those of the plain forward pass, while the peak memory of a forward+backward drops.

use std::process::Command;

use dreambooth_api::Session;
use dreambooth_trainer::models::checkpointing;
use dreambooth_trainer::models::clip::{ClipTextConfig, clip_text_model};
use dreambooth_trainer::models::config::{DownBlockType, PerBlock, UNetConfig, UpBlockType};
use dreambooth_trainer::models::unet;
use dreambooth_trainer::train::preemption::StopSignal;
use dreambooth_trainer::train::session::{SessionOptions, run_session};
use tch::nn::VarStore;
use tch::{Device, Kind, Tensor};

fn tiny_unet_config(channels: Vec<i64>) -> UNetConfig {
    let n = channels.len();
    let mut down = vec![DownBlockType::CrossAttnDownBlock2D; n - 1];
    down.push(DownBlockType::DownBlock2D);
    let mut up = vec![UpBlockType::UpBlock2D];
    up.extend(vec![UpBlockType::CrossAttnUpBlock2D; n - 1]);
    UNetConfig {
        attention_head_dim: PerBlock::One(channels[0] / 4),
        block_out_channels: channels,
        down_block_types: down,
        up_block_types: up,
        layers_per_block: PerBlock::One(2),
        norm_num_groups: 4,
        cross_attention_dim: PerBlock::One(12),
        ..Default::default()
    }
}

/// Relative difference between two gradients (0 when both are zero).
fn relative_diff(a: &Tensor, b: &Tensor) -> f64 {
    let scale = b.abs().max().double_value(&[]).max(1e-30);
    (a - b).abs().max().double_value(&[]) / scale
}

/// Every trainable variable's gradient, by name, then zeroed.
fn take_grads(vs: &VarStore) -> Vec<(String, Tensor)> {
    let mut grads: Vec<(String, Tensor)> = vs
        .variables()
        .into_iter()
        .map(|(name, var)| {
            let mut grad = var.grad();
            assert!(grad.defined(), "{name} got no gradient");
            let copy = grad.copy();
            let _ = grad.zero_();
            (name, copy)
        })
        .collect();
    grads.sort_by(|a, b| a.0.cmp(&b.0));
    grads
}

fn assert_same_grads(plain: &[(String, Tensor)], checkpointed: &[(String, Tensor)]) {
    assert_eq!(plain.len(), checkpointed.len());
    for ((name, a), (_, b)) in plain.iter().zip(checkpointed) {
        let diff = relative_diff(b, a);
        assert!(
            diff < 1e-10,
            "{name}: checkpointed gradient differs by {diff:e}"
        );
    }
}

#[test]
fn unet_gradients_with_checkpointing_equal_those_without() {
    if !checkpointing::available() {
        eprintln!("skipped: this build has no checkpoint shim");
        return;
    }
    tch::manual_seed(3);
    let mut vs = VarStore::new(Device::Cpu);
    let mut model = unet(vs.root(), &tiny_unet_config(vec![8, 16, 16]));
    vs.double();
    let opts = (Kind::Double, Device::Cpu);
    let sample = Tensor::randn([2, 4, 16, 16], opts).set_requires_grad(true);
    let context = Tensor::randn([2, 5, 12], opts).set_requires_grad(true);
    let timesteps = Tensor::from_slice(&[10i64, 700]);
    let target = Tensor::randn([2, 4, 16, 16], opts);
    let mut run = |on: bool| {
        model.set_gradient_checkpointing(on);
        let out = model.forward(&sample, &timesteps, &context);
        (out - &target).square().mean(Kind::Double).backward();
        let mut grads = take_grads(&vs);
        for (name, input) in [("sample", &sample), ("context", &context)] {
            grads.push((name.into(), input.grad().copy()));
            let _ = input.grad().zero_();
        }
        grads
    };
    let plain = run(false);
    let checkpointed = run(true);
    assert!(plain.len() > 100, "{} gradients", plain.len());
    assert_same_grads(&plain, &checkpointed);
}

#[test]
fn text_encoder_gradients_with_checkpointing_equal_those_without() {
    if !checkpointing::available() {
        return;
    }
    tch::manual_seed(4);
    let mut vs = VarStore::new(Device::Cpu);
    let cfg = ClipTextConfig {
        vocab_size: 60,
        hidden_size: 32,
        intermediate_size: 48,
        num_hidden_layers: 3,
        num_attention_heads: 4,
        max_position_embeddings: 12,
        eos_token_id: 59,
        ..ClipTextConfig::default()
    };
    let mut model = clip_text_model(vs.root(), &cfg);
    vs.double();
    let ids = Tensor::from_slice(&[3i64, 9, 22, 59, 0, 0, 4, 17, 8, 1, 59, 0]).view([2, 6]);
    let mut run = |on: bool| {
        model.set_gradient_checkpointing(on);
        let out = model.forward(&ids);
        let loss = out.last_hidden_state.square().mean(Kind::Double)
            + out.pooled_output.sin().sum(Kind::Double);
        loss.backward();
        take_grads(&vs)
    };
    let plain = run(false);
    let checkpointed = run(true);
    assert_same_grads(&plain, &checkpointed);
}

/// A short two-phase session on the tiny model; returns the loss of every step.
fn session_losses(dir: &std::path::Path, checkpointing: bool) -> Vec<f64> {
    let yaml = format!(
        "name: ckpt\nbaseModel:\n  uri: file://{model}\ndataset:\n  uri: file://{photos}\n  \
         token: zwxtoy\n  resolution: 64\noutput:\n  uri: file://{out}\ntraining:\n  \
         seed: 5\n  gradientCheckpointing: {checkpointing}\n  unet:\n    steps: 4\n  \
         textEncoder:\n    steps: 3\nsamples:\n  steps: 1\n",
        model = dir.join("model").display(),
        photos = dir.join("photos").display(),
        out = dir.join(format!("out-{checkpointing}")).display(),
    );
    let session = Session::parse(&yaml, false, "ckpt.yaml", "ckpt").unwrap();
    let options = SessionOptions {
        device: Device::Cpu,
        stop: StopSignal::never(),
        cache_dir: None,
    };
    let mut losses = Vec::new();
    let mut sink = |p: &dreambooth_api::Progress| {
        if let Some(loss) = p.loss
            && losses.len() < p.step as usize
        {
            losses.push(loss);
        }
    };
    run_session(&session, &options, &mut sink).unwrap();
    losses
}

#[test]
fn a_session_with_checkpointing_has_the_same_losses() {
    if !checkpointing::available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    dreambooth_trainer::tiny_model::write_tiny_model(
        &dir.path().join("model"),
        dreambooth_trainer::tiny_model::TinyVariant::Sd1,
        1,
    )
    .unwrap();
    dreambooth_trainer::demo_photos::write_demo_photos(&dir.path().join("photos"), 4, 1, 64)
        .unwrap();
    let plain = session_losses(dir.path(), false);
    let checkpointed = session_losses(dir.path(), true);
    assert_eq!(plain.len(), 7, "{plain:?}");
    eprintln!("losses without: {plain:?}\nlosses with:    {checkpointed:?}");
    for (step, (a, b)) in plain.iter().zip(&checkpointed).enumerate() {
        assert!(
            (a - b).abs() <= 1e-5 * a.abs().max(1e-3),
            "step {step}: {a} without checkpointing, {b} with"
        );
    }
}

/// The measurement `checkpointing_lowers_peak_memory` makes in a child process (a fresh
/// heap per mode): one forward+backward of a moderate UNet on the CPU, printing how far
/// the peak RSS rose above where it was before.
fn memory_probe(mode: &str) {
    tch::manual_seed(0);
    let vs = VarStore::new(Device::Cpu);
    let mut model = unet(vs.root(), &tiny_unet_config(vec![32, 64, 64]));
    model.set_gradient_checkpointing(mode == "on");
    let opts = (Kind::Float, Device::Cpu);
    let sample = Tensor::randn([2, 4, 32, 32], opts);
    let context = Tensor::randn([2, 16, 12], opts);
    let timesteps = Tensor::from_slice(&[10i64, 700]);
    let before = peak_rss_kib();
    let started = std::time::Instant::now();
    let out = model.forward(&sample, &timesteps, &context);
    out.square().mean(Kind::Float).backward();
    let seconds = started.elapsed().as_secs_f64();
    let rise = peak_rss_kib() - before;
    println!("PROBE rise_kib={rise} seconds={seconds:.3}");
}

fn peak_rss_kib() -> i64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmHWM in /proc/self/status")
}

fn probe(mode: &str) -> (i64, f64) {
    let out = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "checkpointing_lowers_peak_memory", "--nocapture"])
        .env("DBT_CHECKPOINT_PROBE", mode)
        // A fixed mmap threshold, so freed activations leave the heap and RSS is honest.
        .env("MALLOC_MMAP_THRESHOLD_", "65536")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line = stdout
        .lines()
        .find(|l| l.starts_with("PROBE"))
        .unwrap_or_else(|| {
            panic!(
                "no probe line: {stdout}{}",
                String::from_utf8_lossy(&out.stderr)
            )
        });
    let field = |key: &str| {
        line.split_whitespace()
            .find_map(|f| f.strip_prefix(key))
            .unwrap()
            .to_owned()
    };
    (
        field("rise_kib=").parse().unwrap(),
        field("seconds=").parse().unwrap(),
    )
}

#[test]
fn checkpointing_lowers_peak_memory() {
    if let Ok(mode) = std::env::var("DBT_CHECKPOINT_PROBE") {
        return memory_probe(&mode);
    }
    if !checkpointing::available() {
        return;
    }
    let (off_kib, off_s) = probe("off");
    let (on_kib, on_s) = probe("on");
    eprintln!(
        "UNet [32,64,64], batch 2, 32x32 latents, CPU forward+backward: peak RSS rise \
         {:.1} MiB without checkpointing, {:.1} MiB with ({:.0}%); {off_s:.2}s vs {on_s:.2}s",
        off_kib as f64 / 1024.0,
        on_kib as f64 / 1024.0,
        100.0 * on_kib as f64 / off_kib as f64,
    );
    assert!(
        off_kib > 30 * 1024,
        "the probe is too small to measure: {off_kib} KiB"
    );
    assert!(
        (on_kib as f64) < 0.6 * off_kib as f64,
        "checkpointing saved too little: {on_kib} KiB vs {off_kib} KiB"
    );
}
