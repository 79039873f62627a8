//! `dreambooth-trainer`: the command-line edge of the trainer.

use anyhow::Result;
use clap::{Parser, Subcommand};
use dreambooth_api::spec::Precision;
use dreambooth_api::{ExitKind, Outcome, Progress, Session, Stage, validate};
use dreambooth_trainer::bench;
use dreambooth_trainer::checkpoint::{self, LoadOptions};
use dreambooth_trainer::models::versions::KnownVersion;
use dreambooth_trainer::runtime::RuntimeInfo;
use dreambooth_trainer::tiny_model::{self, TinyVariant};
use dreambooth_trainer::train::preemption::StopSignal;
use dreambooth_trainer::train::session::{SessionError, SessionOptions, run_session};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

#[derive(Parser)]
#[command(
    name = "dreambooth-trainer",
    version,
    about = "DreamBooth fine-tuning of Stable Diffusion"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run a whole session: prepare the photos, train both phases, write checkpoints,
    /// samples, the model and the manifest. Reruns resume from the latest state.
    Train {
        /// The session file (YAML or JSON, manifest or bare spec).
        file: PathBuf,
        /// Overrides `spec.output.uri`.
        #[arg(long)]
        output: Option<String>,
        /// `cuda` when available, else `cpu`.
        #[arg(long)]
        device: Option<String>,
        /// Where the outcome summary goes for Kubernetes.
        #[arg(long, default_value = "/dev/termination-log")]
        termination_log: PathBuf,
    },
    /// Print the libtorch runtime: CUDA availability and a matmul check, as JSON.
    Info,
    /// Write a complete diffusers folder with tiny random weights (tests and the demo).
    TinyModel {
        #[arg(long)]
        out: PathBuf,
        #[arg(long, value_parser = ["sd1", "sd2"], default_value = "sd1")]
        variant: String,
        #[arg(long, default_value_t = 0)]
        seed: i64,
    },
    /// Write the demo's photos: a toy on varied backgrounds, named like a DreamBooth dataset.
    DemoPhotos {
        #[arg(long)]
        out: PathBuf,
        #[arg(long, default_value_t = 12)]
        count: usize,
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// Side of the square photos in pixels.
        #[arg(long, default_value_t = 96)]
        size: u32,
    },
    /// Convert between a diffusers folder and a single `.safetensors` (`.ckpt` in too);
    /// the direction follows the paths.
    Convert {
        #[arg(long)]
        input: PathBuf,
        #[arg(long)]
        output: PathBuf,
        #[arg(long, value_parser = ["fp16", "fp32", "bf16"], default_value = "fp16")]
        precision: String,
    },
    /// Time training steps of the full-size architecture with random weights.
    Bench(BenchArgs),
    /// Check a session file (YAML or JSON, manifest or bare spec) and print every problem.
    Validate {
        /// The session file.
        file: PathBuf,
    },
    /// Generate one image from a model with a prompt, as diffusers would with the same seed.
    Sample(dreambooth_trainer::pipeline::SampleArgs),
}

#[derive(clap::Args)]
struct BenchArgs {
    #[arg(long, value_enum, default_value = "sd15")]
    arch: Arch,
    #[arg(long, default_value_t = 512)]
    resolution: i64,
    #[arg(long, default_value_t = 1)]
    batch: i64,
    #[arg(long, default_value_t = 50)]
    steps: usize,
    /// Untimed steps first (allocator and cuDNN warm-up).
    #[arg(long, default_value_t = 5)]
    warmup: usize,
    /// Only the eager path exists so far; accepted for the fast path's command line.
    #[arg(long)]
    eager: bool,
    /// A tiny UNet, for smoke tests on the CPU.
    #[arg(long)]
    tiny: bool,
    /// fp32 instead of bf16 autocast.
    #[arg(long)]
    fp32: bool,
    /// `cuda` when available, else `cpu`.
    #[arg(long)]
    device: Option<String>,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum Arch {
    Sd15,
    Sd21,
}

fn main() -> Result<ExitCode> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        // Colour codes would garble pod logs and anything parsing them.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    match Cli::parse().command {
        Command::Info => {
            println!("{}", serde_json::to_string_pretty(&RuntimeInfo::probe())?);
            Ok(ExitCode::SUCCESS)
        }
        Command::Validate { file } => Ok(validate_file(&file)),
        Command::Train {
            file,
            output,
            device,
            termination_log,
        } => Ok(train(&file, output, device.as_deref(), &termination_log)),
        Command::TinyModel { out, variant, seed } => {
            let variant = if variant == "sd2" {
                TinyVariant::Sd2
            } else {
                TinyVariant::Sd1
            };
            tiny_model::write_tiny_model(&out, variant, seed)?;
            println!("{}", out.display());
            Ok(ExitCode::SUCCESS)
        }
        Command::DemoPhotos {
            out,
            count,
            seed,
            size,
        } => {
            let files =
                dreambooth_trainer::demo_photos::write_demo_photos(&out, count, seed, size)?;
            println!("{} photos in {}", files.len(), out.display());
            Ok(ExitCode::SUCCESS)
        }
        Command::Convert {
            input,
            output,
            precision,
        } => {
            let precision = match precision.as_str() {
                "fp32" => Precision::Fp32,
                "bf16" => Precision::Bf16,
                _ => Precision::Fp16,
            };
            let model = checkpoint::convert(&input, &output, precision, &LoadOptions::default())?;
            eprintln!(
                "{:?} {:?} model from {}",
                model.version,
                model.kind,
                input.display()
            );
            println!("{}", output.display());
            Ok(ExitCode::SUCCESS)
        }
        Command::Bench(args) => {
            let report = bench::bench_unet_phase(&bench_config(&args)?);
            eprintln!(
                "{} {}x{} batch {}: {:.2} steps/s, {:.2} images/s, {:.1} ms/step, peak {} GiB, floor fraction {}",
                report.arch,
                report.resolution,
                report.resolution,
                report.batch,
                report.steps_per_second,
                report.images_per_second,
                report.ms_per_step,
                report.peak_gib.map_or("-".into(), |g| format!("{g:.2}")),
                report
                    .fraction_of_floor
                    .map_or("-".into(), |f| format!("{f:.3}")),
            );
            println!("{}", serde_json::to_string(&report)?);
            Ok(ExitCode::SUCCESS)
        }
        Command::Sample(args) => {
            dreambooth_trainer::pipeline::run_sample(&args)?;
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// Prints warnings and errors one per line; exits with the bad-config code on any error.
fn validate_file(file: &Path) -> ExitCode {
    let session = match Session::load(file) {
        Ok(session) => session,
        Err(error) => {
            eprintln!("error: {error}");
            return exit(ExitKind::BadConfig);
        }
    };
    let report = validate(&session.name, &session.spec);
    for warning in report.warnings() {
        eprintln!("warning: {}: {warning}", file.display());
    }
    for error in report.errors() {
        eprintln!("error: {}: {error}", file.display());
    }
    if !report.is_valid() {
        return exit(ExitKind::BadConfig);
    }
    println!("{}: session `{}` is valid", file.display(), session.name);
    exit(ExitKind::Succeeded)
}

fn parse_device(device: Option<&str>) -> Result<tch::Device> {
    Ok(match device {
        None => tch::Device::cuda_if_available(),
        Some("cpu") => tch::Device::Cpu,
        Some("cuda") => tch::Device::Cuda(0),
        Some(other) => anyhow::bail!("--device {other}: expected cpu or cuda"),
    })
}

/// Runs a session and reports how it ended: exit code, termination message, last line.
fn train(
    file: &Path,
    output: Option<String>,
    device: Option<&str>,
    termination_log: &Path,
) -> ExitCode {
    let started = (|| -> Result<(Session, tch::Device, StopSignal), (ExitKind, String)> {
        let mut session = Session::load(file).map_err(|e| (ExitKind::BadConfig, e.to_string()))?;
        if let Some(output) = output {
            session.spec.output.uri = output;
        }
        let device = parse_device(device).map_err(|e| (ExitKind::BadConfig, e.to_string()))?;
        let stop = StopSignal::install().map_err(|e| (ExitKind::Internal, e.to_string()))?;
        Ok((session, device, stop))
    })();
    let result = match started {
        Ok((session, device, stop)) => {
            let mut bar = ProgressLine::new();
            run_session(&session, &SessionOptions { device, stop }, &mut |p| {
                bar.show(p)
            })
            .map_err(|e| (e.exit_kind(), e.to_string(), preempted_step(&e)))
        }
        Err((kind, message)) => Err((kind, message, None)),
    };
    let outcome = match &result {
        Ok(done) => {
            eprintln!("model: {}\nmanifest: {}", done.model_uri, done.manifest_uri);
            Outcome {
                outcome: ExitKind::Succeeded,
                step: done.step,
                manifest_uri: Some(done.manifest_uri.clone()),
                message: None,
            }
        }
        Err((kind, message, step)) => {
            eprintln!("error: {message}");
            Outcome {
                outcome: *kind,
                step: step.unwrap_or(0),
                manifest_uri: None,
                message: Some(message.clone()),
            }
        }
    };
    // Outside Kubernetes the default path is usually not writable; that is fine.
    let _ = std::fs::write(termination_log, outcome.to_termination_message());
    exit(outcome.outcome)
}

fn preempted_step(error: &SessionError) -> Option<u32> {
    match error {
        SessionError::Preempted { step } => Some(*step),
        _ => None,
    }
}

/// One status line: redrawn in place on a terminal, a log line every 1 % otherwise.
struct ProgressLine {
    terminal: bool,
    last_logged: Option<(Stage, u32)>,
}

impl ProgressLine {
    fn new() -> Self {
        Self {
            terminal: std::io::IsTerminal::is_terminal(&std::io::stderr()),
            last_logged: None,
        }
    }

    fn show(&mut self, p: &Progress) {
        let line = format!(
            "{:?} {}/{} loss {} {} steps/s ETA {}",
            p.stage,
            p.step,
            p.total_steps,
            p.loss.map_or("-".into(), |l| format!("{l:.4}")),
            p.steps_per_second.map_or("-".into(), |s| format!("{s:.2}")),
            p.eta_seconds
                .map_or("-".into(), |s| format!("{}s", s.round())),
        );
        if self.terminal {
            eprint!("\r\x1b[2K{line}");
            if p.stage == Stage::Done {
                eprintln!();
            }
            return;
        }
        // About a hundred lines over a run, and every change of stage.
        let every = (p.total_steps / 100).max(1);
        if p.step.is_multiple_of(every)
            && (self.last_logged != Some((p.stage, p.step)) || p.stage == Stage::Done)
        {
            self.last_logged = Some((p.stage, p.step));
            tracing::info!(stage = ?p.stage, step = p.step, total = p.total_steps, loss = p.loss, "{line}");
        }
    }
}

fn bench_config(args: &BenchArgs) -> Result<bench::BenchConfig> {
    let device = parse_device(args.device.as_deref())?;
    Ok(bench::BenchConfig {
        version: match args.arch {
            Arch::Sd15 => KnownVersion::Sd15,
            Arch::Sd21 => KnownVersion::Sd21,
        },
        tiny: args.tiny,
        resolution: args.resolution,
        batch: args.batch,
        steps: args.steps,
        warmup: args.warmup,
        device,
        bf16: !args.fp32,
    })
}

fn exit(kind: ExitKind) -> ExitCode {
    ExitCode::from(kind.code() as u8)
}
