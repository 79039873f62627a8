//! `dreambooth-trainer`: the command-line edge of the trainer.

use anyhow::Result;
use clap::{Parser, Subcommand};
use dreambooth_api::spec::Precision;
use dreambooth_api::{ExitKind, Outcome, Progress, Session, Stage, validate};
use dreambooth_trainer::bench;
use dreambooth_trainer::checkpoint::{self, LoadOptions};
use dreambooth_trainer::models::versions::KnownVersion;
use dreambooth_trainer::runtime::RuntimeInfo;
use dreambooth_trainer::telemetry::{self, Telemetry};
use dreambooth_trainer::tiny_model::{self, TinyVariant};
use dreambooth_trainer::train::preemption::StopSignal;
use dreambooth_trainer::train::session::{SessionError, SessionOptions, run_session};
use dreambooth_trainer::train::trainer::Phase;
use std::io::Read;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

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
        /// The session file (YAML or JSON, manifest or bare spec); `-` reads stdin.
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
        /// Serve `/metrics`, `/progress` and `/healthz` here (`0.0.0.0:9090`; port 0
        /// picks a free one). No listener without it.
        #[arg(long)]
        listen: Option<SocketAddr>,
        /// Cache for downloaded inputs, kept across attempts when it is a volume.
        #[arg(long)]
        cache_dir: Option<PathBuf>,
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
    /// Write a diffusers folder of the full-size SD 1.5 or 2.1 architecture with random
    /// weights (fp16): whole-session benchmarks where real weights cannot be downloaded.
    RandomModel {
        #[arg(long)]
        out: PathBuf,
        #[arg(long, value_enum, default_value = "sd15")]
        arch: Arch,
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
    /// Which phase's step: the UNet on cached embeddings, or the text encoder through
    /// the frozen UNet.
    #[arg(long, value_enum, default_value = "unet")]
    phase: BenchPhase,
    /// `low`: the session's `training.memory: lowMemory` (bf16 weights and AdamW states,
    /// gradient checkpointing; eager).
    #[arg(long, value_enum, default_value = "default")]
    memory: bench::MemoryMode,
    /// Eager steps only, no CUDA graph (fused AdamW still on CUDA).
    #[arg(long)]
    eager: bool,
    /// Plain fp32 UNet weights cast by autocast each step, instead of packed ones.
    #[arg(long)]
    unpacked: bool,
    /// Tiny networks, for smoke tests on the CPU.
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
enum BenchPhase {
    Unet,
    TextEncoder,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum Arch {
    Sd15,
    Sd21,
}

impl Arch {
    fn version(self) -> KnownVersion {
        match self {
            Arch::Sd15 => KnownVersion::Sd15,
            Arch::Sd21 => KnownVersion::Sd21,
        }
    }
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
            listen,
            cache_dir,
        } => Ok(train(TrainArgs {
            file,
            output,
            device,
            termination_log,
            listen,
            cache_dir,
        })),
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
        Command::RandomModel { out, arch, seed } => {
            tiny_model::write_full_size_model(&out, arch.version(), seed)?;
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
            let report = bench::bench(&bench_config(&args)?);
            eprintln!(
                "{} {} {:?} {}x{} batch {}: {:.2} steps/s, {:.2} images/s, {:.1} ms/step, peak {} GiB, floor fraction {}",
                report.implementation,
                report.arch,
                report.phase,
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

struct TrainArgs {
    file: PathBuf,
    output: Option<String>,
    device: Option<String>,
    termination_log: PathBuf,
    listen: Option<SocketAddr>,
    cache_dir: Option<PathBuf>,
}

/// What `train` has once its arguments check out.
struct Started {
    session: Session,
    device: tch::Device,
    stop: StopSignal,
    telemetry: Arc<Telemetry>,
}

/// Runs a session and reports how it ended: exit code, termination message, last line.
fn train(args: TrainArgs) -> ExitCode {
    let result = start_training(&args).and_then(|started| {
        let telemetry = Arc::clone(&started.telemetry);
        let mut bar = ProgressLine::new();
        let options = SessionOptions {
            device: started.device,
            stop: started.stop,
            cache_dir: args.cache_dir.clone(),
        };
        run_session(&started.session, &options, &mut |p| {
            bar.show(p);
            telemetry.record(p);
        })
        .map_err(|e| {
            telemetry.record_failure(e.exit_kind());
            (e.exit_kind(), e.to_string(), preempted_step(&e))
        })
    });
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
    let _ = std::fs::write(&args.termination_log, outcome.to_termination_message());
    exit(outcome.outcome)
}

type Failure = (ExitKind, String, Option<u32>);

/// Loads the session, picks the device, installs the signal handlers and starts the
/// telemetry server when asked; every failure here is the config's or the host's.
fn start_training(args: &TrainArgs) -> Result<Started, Failure> {
    let fail = |kind: ExitKind| move |message: String| (kind, message, None);
    let mut session = load_session(&args.file).map_err(fail(ExitKind::BadConfig))?;
    if let Some(output) = &args.output {
        session.spec.output.uri = output.clone();
    }
    let device = parse_device(args.device.as_deref())
        .map_err(|e| fail(ExitKind::BadConfig)(e.to_string()))?;
    let stop = StopSignal::install().map_err(|e| fail(ExitKind::Internal)(e.to_string()))?;
    let telemetry = Arc::new(Telemetry::new(&session.name, device));
    if let Some(listen) = args.listen {
        // A taken port is the host's problem, and may be gone on the next attempt.
        let server = telemetry::serve(listen, Arc::clone(&telemetry))
            .map_err(|e| fail(ExitKind::Retriable)(format!("--listen {listen}: {e}")))?;
        tracing::info!(
            "serving /metrics, /progress and /healthz on http://{}",
            server.local_addr()
        );
    }
    Ok(Started {
        session,
        device,
        stop,
        telemetry,
    })
}

/// A session from a file, or from stdin for `-` (JSON when it starts with `{`).
fn load_session(file: &Path) -> Result<Session, String> {
    if file != Path::new("-") {
        return Session::load(file).map_err(|e| e.to_string());
    }
    let mut text = String::new();
    std::io::stdin()
        .read_to_string(&mut text)
        .map_err(|e| format!("<stdin>: {e}"))?;
    let is_json = text.trim_start().starts_with('{');
    Session::parse(&text, is_json, "<stdin>", "session").map_err(|e| e.to_string())
}

fn preempted_step(error: &SessionError) -> Option<u32> {
    match error {
        SessionError::Preempted { step } => Some(*step),
        SessionError::StoppedBeforeTraining { .. } => Some(0),
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
        version: args.arch.version(),
        tiny: args.tiny,
        phase: match args.phase {
            BenchPhase::Unet => Phase::Unet,
            BenchPhase::TextEncoder => Phase::TextEncoder,
        },
        memory: args.memory,
        resolution: args.resolution,
        batch: args.batch,
        steps: args.steps,
        warmup: args.warmup,
        device,
        bf16: !args.fp32,
        eager: args.eager,
        packed: !args.unpacked,
    })
}

fn exit(kind: ExitKind) -> ExitCode {
    ExitCode::from(kind.code() as u8)
}
