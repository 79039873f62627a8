//! Scale benchmark (not a test): N sessions in the in-memory API, every one reconciled
//! twice (the first pass creates its ConfigMap, Job and status; the second finds
//! nothing to change). Prints reconciles per second, p50/p99 reconcile time and peak RSS.
//!
//! `cargo run --release -p dreambooth-operator --example scale -- [SESSIONS]`

use std::sync::Arc;
use std::time::{Duration, Instant};

use dreambooth_api::SessionSpec;
use dreambooth_api::crd::{ClusterSpec, DreamBoothSession, DreamBoothSessionSpec};
use dreambooth_operator::controller::{Context, Settings, reconcile};
use dreambooth_operator::job::JobSettings;
use dreambooth_operator::metrics::OperatorMetrics;
use dreambooth_operator::progress::ProgressClient;
use kube::Api;
use kube::api::{ListParams, PostParams};
use kube_fake_client::ClientBuilder;

const NAMESPACE: &str = "scale";

#[tokio::main]
async fn main() {
    let count: usize = std::env::args()
        .nth(1)
        .map(|n| n.parse().expect("SESSIONS is a number"))
        .unwrap_or(10_000);
    let client = ClientBuilder::new()
        .with_resource::<DreamBoothSession>()
        .with_status_subresource::<DreamBoothSession>()
        .build()
        .await
        .expect("the fake API server starts");
    let sessions: Api<DreamBoothSession> = Api::namespaced(client.clone(), NAMESPACE);
    let mut spec = SessionSpec::default();
    spec.dataset.uri = "s3://data/subject".into();
    spec.output.uri = "s3://out/subject".into();
    let started = Instant::now();
    for i in 0..count {
        let mut session = DreamBoothSession::new(
            &format!("session-{i:05}"),
            DreamBoothSessionSpec {
                session: spec.clone(),
                cluster: ClusterSpec::default(),
            },
        );
        session.metadata.namespace = Some(NAMESPACE.into());
        sessions
            .create(&PostParams::default(), &session)
            .await
            .unwrap();
    }
    println!(
        "created {count} sessions in {:.1}s",
        started.elapsed().as_secs_f64()
    );

    let settings = Settings {
        job: JobSettings {
            default_image: "trainer:bench".into(),
            ..Default::default()
        },
        poll_interval: Duration::from_secs(15),
        max_running_sessions: None,
        namespaces: Vec::new(),
    };
    let ctx = Arc::new(Context::new(
        client.clone(),
        OperatorMetrics::new(),
        settings,
        ProgressClient::new(9090, Duration::from_secs(1)),
    ));
    for pass in ["first (creates Jobs)", "second (no change)"] {
        let all = sessions.list(&ListParams::default()).await.unwrap().items;
        let mut times = Vec::with_capacity(all.len());
        let started = Instant::now();
        for session in all {
            let one = Instant::now();
            reconcile(Arc::new(session), ctx.clone())
                .await
                .expect("reconcile succeeds");
            times.push(one.elapsed());
        }
        let total = started.elapsed();
        times.sort();
        let at = |q: f64| times[((times.len() as f64 - 1.0) * q) as usize];
        println!(
            "{pass}: {} reconciles in {:.1}s = {:.0}/s; p50 {:.2} ms, p99 {:.2} ms",
            times.len(),
            total.as_secs_f64(),
            times.len() as f64 / total.as_secs_f64(),
            at(0.50).as_secs_f64() * 1e3,
            at(0.99).as_secs_f64() * 1e3,
        );
    }
    let jobs: Api<k8s_openapi::api::batch::v1::Job> = Api::namespaced(client, NAMESPACE);
    let made = jobs.list(&ListParams::default()).await.unwrap().items.len();
    assert_eq!(made, count, "one Job per session");
    println!("{made} Jobs; peak RSS {}", peak_rss());
}

/// `VmHWM` from /proc (Linux): the process's peak resident memory.
fn peak_rss() -> String {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .map(|l| l[6..].trim().to_owned())
        })
        .unwrap_or_else(|| "unknown".into())
}
