//! `dreambooth-operator`: the controller (the default command), and `render`, which prints
//! the ConfigMap and Job the operator would create for a session file.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::Context as _;
use clap::{Args, Parser, Subcommand};
use dreambooth_operator::controller::{self, Context, Settings};
use dreambooth_operator::http::{operator_routes, serve};
use dreambooth_operator::job::{JobSettings, StorageDefaults};
use dreambooth_operator::leader::LeaseLock;
use dreambooth_operator::metrics::OperatorMetrics;
use dreambooth_operator::progress::ProgressClient;
use dreambooth_operator::{job, render};
use tracing::info;

const DEFAULT_TRAINER_IMAGE: &str = concat!(
    "ghcr.io/dreambooth-operator/dreambooth-trainer:",
    env!("CARGO_PKG_VERSION")
);
/// A standby takes over this long after the leader stops renewing.
const LEASE_DURATION: Duration = Duration::from_secs(15);
const LEASE_RENEW: Duration = Duration::from_secs(5);
const LEASE_RETRY: Duration = Duration::from_secs(2);

#[derive(Parser)]
#[command(version, about = "Turns DreamBoothSessions into training Jobs")]
#[command(args_conflicts_with_subcommands = true)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    run: RunArgs,
}

#[derive(Subcommand)]
enum Command {
    /// Run the controller (the default).
    Run(RunArgs),
    /// Print, as YAML, the ConfigMap and Job the operator would create for a session.
    Render(RenderArgs),
}

#[derive(Args)]
struct RunArgs {
    /// Namespaces to watch, comma-separated; empty: all.
    #[arg(
        long,
        env = "DREAMBOOTH_WATCH_NAMESPACES",
        value_delimiter = ',',
        default_value = ""
    )]
    namespaces: Vec<String>,
    /// Trainer image for sessions that name none.
    #[arg(long, env = "DREAMBOOTH_TRAINER_IMAGE", default_value = DEFAULT_TRAINER_IMAGE)]
    trainer_image: String,
    /// How often a running trainer's /progress is polled (`15s`, `1m`, `500ms`).
    #[arg(long, env = "DREAMBOOTH_PROGRESS_INTERVAL", default_value = "15s", value_parser = parse_duration)]
    progress_interval: Duration,
    /// How long one /progress poll may take.
    #[arg(long, env = "DREAMBOOTH_PROGRESS_TIMEOUT", default_value = "5s", value_parser = parse_duration)]
    progress_timeout: Duration,
    /// For clusters without Kueue: sessions allowed to hold a Job at once; 0: no limit.
    #[arg(long, env = "DREAMBOOTH_MAX_RUNNING_SESSIONS", default_value_t = 0)]
    max_running_sessions: u32,
    /// Address of /metrics, /healthz and /readyz.
    #[arg(long, env = "DREAMBOOTH_METRICS_ADDR", default_value = "0.0.0.0:8080")]
    metrics_addr: SocketAddr,
    /// Lease-based leader election, so several replicas are safe.
    #[arg(long, env = "DREAMBOOTH_LEADER_ELECTION", default_value_t = true, action = clap::ArgAction::Set)]
    leader_election: bool,
    #[arg(
        long,
        env = "DREAMBOOTH_LEASE_NAME",
        default_value = "dreambooth-operator"
    )]
    lease_name: String,
    /// The Lease's namespace: the operator's own.
    #[arg(long, env = "POD_NAMESPACE", default_value = "default")]
    lease_namespace: String,
    /// Default object store for sessions whose spec.storage names no endpoint.
    #[arg(long, env = "DREAMBOOTH_STORAGE_ENDPOINT")]
    storage_endpoint: Option<String>,
    #[arg(long, env = "DREAMBOOTH_STORAGE_REGION")]
    storage_region: Option<String>,
    #[arg(long, env = "DREAMBOOTH_STORAGE_FORCE_PATH_STYLE", default_value_t = false, action = clap::ArgAction::Set)]
    storage_force_path_style: bool,
    /// `json` or `text` logs.
    #[arg(long, env = "DREAMBOOTH_LOG_FORMAT", default_value = "text")]
    log_format: String,
}

#[derive(Args)]
struct RenderArgs {
    /// A DreamBoothSession manifest (YAML or JSON).
    session: PathBuf,
    /// The attempt whose Job to print.
    #[arg(long, default_value_t = 1)]
    attempt: u32,
    /// Trainer image for a session that names none.
    #[arg(long, default_value = DEFAULT_TRAINER_IMAGE)]
    image: String,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Some(Command::Render(args)) => {
            let settings = JobSettings {
                default_image: args.image,
                ..Default::default()
            };
            let yaml = render::render(&args.session, args.attempt, &settings)?;
            print!("{yaml}");
            Ok(())
        }
        Some(Command::Run(args)) => run(args),
        None => run(cli.run),
    }
}

fn run(args: RunArgs) -> anyhow::Result<()> {
    init_logging(&args.log_format);
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?
        .block_on(operate(args))
}

async fn operate(args: RunArgs) -> anyhow::Result<()> {
    let client = kube::Client::try_default()
        .await
        .context("no Kubernetes configuration (in-cluster or KUBECONFIG)")?;
    let metrics = OperatorMetrics::new();
    let ready = Arc::new(AtomicBool::new(false));
    let listener = tokio::net::TcpListener::bind(args.metrics_addr)
        .await
        .with_context(|| format!("--metrics-addr {}", args.metrics_addr))?;
    tokio::spawn(serve(
        listener,
        operator_routes(metrics.clone(), ready.clone()),
    ));
    info!(addr = %args.metrics_addr, "serving /metrics, /healthz and /readyz");

    let namespaces: Vec<String> = args
        .namespaces
        .iter()
        .filter(|n| !n.is_empty())
        .cloned()
        .collect();
    let settings = Settings {
        job: JobSettings {
            default_image: args.trainer_image.clone(),
            default_storage: StorageDefaults {
                endpoint: args.storage_endpoint.clone().filter(|e| !e.is_empty()),
                region: args.storage_region.clone().filter(|r| !r.is_empty()),
                force_path_style: args.storage_force_path_style,
            },
        },
        poll_interval: args.progress_interval,
        max_running_sessions: Some(args.max_running_sessions).filter(|m| *m > 0),
        namespaces: namespaces.clone(),
    };
    let progress = ProgressClient::new(job::TRAINER_PORT, args.progress_timeout);
    let ctx = Arc::new(Context::new(client.clone(), metrics, settings, progress));
    // A standby is healthy and ready; it only waits for the Lease.
    ready.store(true, Ordering::Relaxed);

    if !args.leader_election {
        controller::run(ctx, &namespaces, shutdown_signal()).await;
        return Ok(());
    }
    let identity = std::env::var("POD_NAME")
        .or_else(|_| std::env::var("HOSTNAME"))
        .unwrap_or_else(|_| format!("dreambooth-operator-{}", std::process::id()));
    let lock = LeaseLock::new(
        client,
        &args.lease_namespace,
        &args.lease_name,
        &identity,
        LEASE_DURATION,
    );
    tokio::select! {
        _ = lock.acquire(LEASE_RETRY) => {}
        _ = shutdown_signal() => return Ok(()),
    }
    let (lost_tx, lost_rx) = tokio::sync::oneshot::channel::<()>();
    let keeper = lock.clone();
    tokio::spawn(async move {
        keeper.keep(LEASE_RENEW).await;
        let _ = lost_tx.send(());
    });
    let lost = Arc::new(AtomicBool::new(false));
    let flag = lost.clone();
    let stop = async move {
        tokio::select! {
            _ = shutdown_signal() => {}
            _ = lost_rx => flag.store(true, Ordering::Relaxed),
        }
    };
    controller::run(ctx, &namespaces, stop).await;
    if lost.load(Ordering::Relaxed) {
        // Exit so the pod restarts as a standby; another replica leads now.
        anyhow::bail!("lost the leader Lease {}", args.lease_name);
    }
    Ok(())
}

async fn shutdown_signal() {
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("a SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = terminate.recv() => {}
    }
}

fn init_logging(format: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter);
    if format == "json" {
        builder.json().init();
    } else {
        builder.init();
    }
}

/// `15s`, `2m`, `500ms`, `1h`, or a bare number of seconds.
fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let value: f64 = number
        .parse()
        .map_err(|_| format!("`{text}` is not a duration like 15s, 2m or 500ms"))?;
    let seconds = match unit {
        "" | "s" => value,
        "ms" => value / 1000.0,
        "m" => value * 60.0,
        "h" => value * 3600.0,
        _ => return Err(format!("`{text}`: unknown unit `{unit}` (ms, s, m or h)")),
    };
    if seconds <= 0.0 {
        return Err(format!("`{text}` must be positive"));
    }
    Ok(Duration::from_secs_f64(seconds))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse_with_units() {
        assert_eq!(parse_duration("15s"), Ok(Duration::from_secs(15)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("30"), Ok(Duration::from_secs(30)));
        assert!(parse_duration("soon").unwrap_err().contains("soon"));
        assert!(parse_duration("5d").unwrap_err().contains("unknown unit"));
        assert!(parse_duration("0s").is_err());
    }

    #[test]
    fn flags_have_the_documented_defaults() {
        let cli = Cli::try_parse_from(["dreambooth-operator"]).unwrap();
        assert!(cli.command.is_none());
        assert_eq!(cli.run.progress_interval, Duration::from_secs(15));
        assert!(cli.run.leader_election);
        assert_eq!(cli.run.metrics_addr.to_string(), "0.0.0.0:8080");
        let cli =
            Cli::try_parse_from(["dreambooth-operator", "render", "s.yaml", "--attempt", "3"])
                .unwrap();
        assert!(matches!(
            cli.command,
            Some(Command::Render(RenderArgs { attempt: 3, .. }))
        ));
    }
}
