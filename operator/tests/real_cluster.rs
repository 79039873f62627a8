//! Against a real API server (kind, k3d, a dev cluster): run by hand with
//! `KUBECONFIG=... cargo test -p dreambooth-operator --test real_cluster -- --ignored`.
//! They install the CRD, use the namespace in `DREAMBOOTH_E2E_NAMESPACE` (default
//! `default`) and delete what they create. No GPU or trainer image is needed: they
//! check what the API server itself accepts and rejects.

use std::sync::Arc;
use std::time::Duration;

use dreambooth_api::Phase;
use dreambooth_api::crd::{DreamBoothSession, DreamBoothSessionSpec};
use dreambooth_operator::controller::{Context, Settings, reconcile};
use dreambooth_operator::job::JobSettings;
use dreambooth_operator::metrics::OperatorMetrics;
use dreambooth_operator::progress::ProgressClient;
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use kube::runtime::wait::{await_condition, conditions};
use kube::{Client, CustomResourceExt};
use serde_json::json;

fn namespace() -> String {
    std::env::var("DREAMBOOTH_E2E_NAMESPACE").unwrap_or_else(|_| "default".into())
}

async fn setup() -> (Client, Api<DreamBoothSession>, Arc<Context>) {
    let client = Client::try_default()
        .await
        .expect("KUBECONFIG points at a cluster");
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    let crd = DreamBoothSession::crd();
    let name = crd.metadata.name.clone().unwrap();
    crds.patch(
        &name,
        &PatchParams::apply("dreambooth-e2e").force(),
        &Patch::Apply(&crd),
    )
    .await
    .expect("the CRD installs");
    tokio::time::timeout(
        Duration::from_secs(30),
        await_condition(crds, &name, conditions::is_crd_established()),
    )
    .await
    .expect("the CRD is established in 30 s")
    .unwrap();
    let settings = Settings {
        job: JobSettings {
            default_image: "busybox:1.36".into(),
            ..Default::default()
        },
        poll_interval: Duration::from_secs(15),
        max_running_sessions: None,
        namespaces: Vec::new(),
    };
    let ctx = Context::new(
        client.clone(),
        OperatorMetrics::new(),
        settings,
        ProgressClient::new(9090, Duration::from_secs(2)),
    );
    (
        client.clone(),
        Api::namespaced(client, &namespace()),
        Arc::new(ctx),
    )
}

fn session(name: &str) -> DreamBoothSession {
    let mut spec = DreamBoothSessionSpec::default();
    spec.session.dataset.uri = "s3://e2e/data".into();
    spec.session.dataset.token = Some("zwxe2e".into());
    spec.session.output.uri = "s3://e2e/out".into();
    spec.cluster.resources = Some(dreambooth_api::crd::Resources {
        gpus: 0,
        ..Default::default()
    });
    spec.cluster.suspend = Some(true); // nothing runs: the Job is created suspended
    DreamBoothSession::new(name, spec)
}

#[tokio::test]
#[ignore = "needs a cluster (KUBECONFIG)"]
async fn api_server_accepts_the_job_and_enforces_immutability() {
    let (client, sessions, ctx) = setup().await;
    let _ = sessions
        .delete("e2e-accept", &DeleteParams::foreground())
        .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let created = sessions
        .create(&PostParams::default(), &session("e2e-accept"))
        .await
        .unwrap();
    reconcile(Arc::new(created), ctx)
        .await
        .expect("reconcile against the real API");
    let jobs: Api<Job> = Api::namespaced(client, &namespace());
    let job = jobs
        .get("e2e-accept-1")
        .await
        .expect("the API server accepted the Job");
    assert_eq!(job.spec.unwrap().suspend, Some(true));
    let status = sessions.get("e2e-accept").await.unwrap().status.unwrap();
    assert_eq!(status.phase, Phase::Suspended);

    // The CEL transition rule: the training part cannot change.
    let change = json!({"spec": {"dataset": {"uri": "s3://e2e/other"}}});
    let error = sessions
        .patch(
            "e2e-accept",
            &PatchParams::default(),
            &Patch::Merge(&change),
        )
        .await
        .expect_err("the dataset is immutable");
    assert!(error.to_string().contains("cannot change"), "{error}");
    // Lifecycle fields can.
    let change = json!({"spec": {"suspend": false, "backoffLimit": 1}});
    sessions
        .patch(
            "e2e-accept",
            &PatchParams::default(),
            &Patch::Merge(&change),
        )
        .await
        .expect("suspend is editable");
    sessions
        .delete("e2e-accept", &DeleteParams::foreground())
        .await
        .unwrap();
}

#[tokio::test]
#[ignore = "needs a cluster (KUBECONFIG)"]
async fn invalid_session_fails_without_a_job() {
    let (client, sessions, ctx) = setup().await;
    let _ = sessions
        .delete("e2e-invalid", &DeleteParams::foreground())
        .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let mut bad = session("e2e-invalid");
    bad.spec.session.dataset.uri = "ftp://nowhere".into();
    let created = sessions.create(&PostParams::default(), &bad).await.unwrap();
    reconcile(Arc::new(created), ctx).await.unwrap();
    let status = sessions.get("e2e-invalid").await.unwrap().status.unwrap();
    assert_eq!(status.phase, Phase::Failed);
    assert!(status.message.unwrap().contains("spec.dataset.uri"));
    let jobs: Api<Job> = Api::namespaced(client, &namespace());
    assert!(jobs.get_opt("e2e-invalid-1").await.unwrap().is_none());
    sessions
        .delete("e2e-invalid", &DeleteParams::foreground())
        .await
        .unwrap();
}
