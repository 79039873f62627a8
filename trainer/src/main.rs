//! `dreambooth-trainer`: the command-line edge of the trainer.

use anyhow::Result;
use clap::{Parser, Subcommand};
use dreambooth_api::{ExitKind, Session, validate};
use dreambooth_trainer::runtime::RuntimeInfo;
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
    /// Print the libtorch runtime: CUDA availability and a matmul check, as JSON.
    Info,
    /// Check a session file (YAML or JSON, manifest or bare spec) and print every problem.
    Validate {
        /// The session file.
        file: PathBuf,
    },
}

fn main() -> Result<ExitCode> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    match Cli::parse().command {
        Command::Info => {
            println!("{}", serde_json::to_string_pretty(&RuntimeInfo::probe())?);
            Ok(ExitCode::SUCCESS)
        }
        Command::Validate { file } => Ok(validate_file(&file)),
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

fn exit(kind: ExitKind) -> ExitCode {
    ExitCode::from(kind.code() as u8)
}
