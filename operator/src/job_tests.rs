use std::path::Path;

use dreambooth_api::session_file::Session;
use serde_json::Value;

use super::*;
use crate::render::load_session;

fn fixture(name: &str) -> DreamBoothSession {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name);
    load_session(&path).unwrap()
}

fn settings() -> JobSettings {
    JobSettings {
        default_image: "ghcr.io/dreambooth-operator/trainer:test".into(),
        ..Default::default()
    }
}

fn job_json(session: &DreamBoothSession, attempt: u32) -> Value {
    serde_json::to_value(build_job(session, attempt, &settings())).unwrap()
}

/// A bare session: only the training part, no cluster fields.
fn minimal() -> DreamBoothSession {
    let spec = dreambooth_api::crd::DreamBoothSessionSpec {
        session: Default::default(),
        cluster: Default::default(),
    };
    let mut session = DreamBoothSession::new("bob", spec);
    session.metadata.namespace = Some("default".into());
    session.metadata.uid = Some("uid-bob".into());
    session.spec.session.dataset.uri = "s3://data/bob".into();
    session.spec.session.output.uri = "s3://out/bob".into();
    session
}

#[test]
fn full_job_matches_the_golden_file() {
    let job = serde_json::to_string_pretty(&job_json(&fixture("session-full.yaml"), 2)).unwrap();
    let golden = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden/job-full-2.json");
    if std::env::var_os("UPDATE_GOLDEN").is_some() {
        std::fs::write(&golden, format!("{job}\n")).unwrap();
    }
    let expected = std::fs::read_to_string(&golden)
        .unwrap_or_else(|e| panic!("{}: {e} (UPDATE_GOLDEN=1 writes it)", golden.display()));
    assert_eq!(
        job.trim_end(),
        expected.trim_end(),
        "run with UPDATE_GOLDEN=1 after a deliberate change"
    );
}

#[test]
fn job_is_named_per_attempt_and_owned_by_the_session() {
    let job = job_json(&fixture("session-full.yaml"), 3);
    assert_eq!(job["metadata"]["name"], "anna-3");
    assert_eq!(job["metadata"]["namespace"], "studio");
    let owner = &job["metadata"]["ownerReferences"][0];
    assert_eq!(owner["kind"], "DreamBoothSession");
    assert_eq!(owner["name"], "anna");
    assert_eq!(owner["uid"], "0b6f3c2e-6f47-4c37-9a39-2a1d6e1f0c11");
    assert_eq!(owner["controller"], true);
    let labels = &job["spec"]["template"]["metadata"]["labels"];
    assert_eq!(labels[ATTEMPT_LABEL], "3");
    assert_eq!(labels[SESSION_LABEL], "anna");
    assert_eq!(labels[NAME_LABEL], "dreambooth-trainer");
    assert_eq!(labels[MANAGED_BY_LABEL], "dreambooth-operator");
    let annotations = &job["spec"]["template"]["metadata"]["annotations"];
    assert_eq!(annotations["prometheus.io/scrape"], "true");
    assert_eq!(annotations["prometheus.io/port"], "9090");
    assert_eq!(annotations["prometheus.io/path"], "/metrics");
}

#[test]
fn trainer_runs_unprivileged_with_a_read_only_root() {
    let job = job_json(&minimal(), 1);
    let pod = &job["spec"]["template"]["spec"];
    assert_eq!(pod["restartPolicy"], "Never");
    assert_eq!(pod["securityContext"]["runAsNonRoot"], true);
    assert_eq!(
        pod["securityContext"]["seccompProfile"]["type"],
        "RuntimeDefault"
    );
    let container = &pod["containers"][0]["securityContext"];
    assert_eq!(container["allowPrivilegeEscalation"], false);
    assert_eq!(container["readOnlyRootFilesystem"], true);
    assert_eq!(
        container["capabilities"]["drop"],
        serde_json::json!(["ALL"])
    );
    let mounts: Vec<&str> = pod["containers"][0]["volumeMounts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["mountPath"].as_str().unwrap())
        .collect();
    assert_eq!(mounts, ["/etc/dreambooth", "/var/cache/dreambooth", "/tmp"]);
}

#[test]
fn trainer_command_follows_the_contract() {
    let job = job_json(&minimal(), 1);
    let container = &job["spec"]["template"]["spec"]["containers"][0];
    assert_eq!(
        container["image"],
        "ghcr.io/dreambooth-operator/trainer:test"
    );
    assert_eq!(
        container["command"],
        serde_json::json!(["dreambooth-trainer"])
    );
    assert_eq!(
        container["args"],
        serde_json::json!([
            "train",
            "/etc/dreambooth/session.json",
            "--listen",
            "0.0.0.0:9090",
            "--termination-log",
            "/dev/termination-log",
            "--cache-dir",
            "/var/cache/dreambooth"
        ])
    );
    assert_eq!(container["ports"][0]["name"], "metrics");
    assert_eq!(container["ports"][0]["containerPort"], 9090);
    assert_eq!(
        container["terminationMessagePolicy"],
        "FallbackToLogsOnError"
    );
    assert_eq!(container["terminationMessagePath"], "/dev/termination-log");
}

#[test]
fn default_resources_are_one_nvidia_gpu_as_a_limit() {
    let job = job_json(&minimal(), 1);
    let resources = &job["spec"]["template"]["spec"]["containers"][0]["resources"];
    assert_eq!(resources["limits"]["nvidia.com/gpu"], "1");
    assert!(resources.get("requests").is_none());

    let job = job_json(&fixture("session-full.yaml"), 1);
    let resources = &job["spec"]["template"]["spec"]["containers"][0]["resources"];
    assert_eq!(resources["limits"]["amd.com/gpu"], "2");
    assert!(resources["limits"].get("nvidia.com/gpu").is_none());
    assert_eq!(resources["requests"]["memory"], "48Gi");
    assert_eq!(resources["limits"]["ephemeral-storage"], "20Gi");
    let cache = &job["spec"]["template"]["spec"]["volumes"][1];
    assert_eq!(cache["emptyDir"]["sizeLimit"], "20Gi");

    let mut cpu_only = minimal();
    cpu_only.spec.cluster.resources = Some(dreambooth_api::crd::Resources {
        gpus: 0,
        ..Default::default()
    });
    let job = job_json(&cpu_only, 1);
    assert_eq!(
        job["spec"]["template"]["spec"]["containers"][0]["resources"],
        serde_json::json!({})
    );
}

#[test]
fn credentials_come_by_secret_key_ref() {
    let job = job_json(&fixture("session-full.yaml"), 1);
    let env = job["spec"]["template"]["spec"]["containers"][0]["env"]
        .as_array()
        .unwrap()
        .clone();
    let var = |name: &str| env.iter().find(|e| e["name"] == name).cloned().unwrap();
    let access = var("AWS_ACCESS_KEY_ID");
    assert_eq!(
        access["valueFrom"]["secretKeyRef"]["name"],
        "s3-credentials"
    );
    assert_eq!(access["valueFrom"]["secretKeyRef"]["key"], "access");
    assert_eq!(
        var("AWS_SECRET_ACCESS_KEY")["valueFrom"]["secretKeyRef"]["key"],
        "secret"
    );
    assert!(
        env.iter()
            .all(|e| e.get("value").is_none() || e["name"] == "HOME"),
        "no literal secrets"
    );

    let job = job_json(&minimal(), 1);
    let env = job["spec"]["template"]["spec"]["containers"][0]["env"]
        .as_array()
        .unwrap()
        .clone();
    assert!(!env.iter().any(|e| e["name"] == "AWS_ACCESS_KEY_ID"));
}

#[test]
fn job_never_retries_itself_and_ignores_disruptions() {
    let job = job_json(&minimal(), 1);
    assert_eq!(job["spec"]["backoffLimit"], 0);
    let rules = job["spec"]["podFailurePolicy"]["rules"].as_array().unwrap();
    assert_eq!(rules[0]["action"], "Ignore");
    assert_eq!(rules[0]["onPodConditions"][0]["type"], "DisruptionTarget");
    assert_eq!(rules[1]["action"], "FailJob");
    assert_eq!(
        rules[1]["onExitCodes"]["values"],
        serde_json::json!([64, 65])
    );
    // The operator owns the deadline and the TTL, not the Job.
    assert!(job["spec"].get("activeDeadlineSeconds").is_none());
    assert!(job["spec"].get("ttlSecondsAfterFinished").is_none());
}

#[test]
fn kueue_jobs_carry_the_queue_label_and_start_suspended() {
    let job = job_json(&fixture("session-full.yaml"), 1);
    assert_eq!(job["metadata"]["labels"][KUEUE_QUEUE_LABEL], "gpu-a100");
    assert_eq!(job["spec"]["suspend"], true);

    let job = job_json(&minimal(), 1);
    assert!(job["metadata"]["labels"].get(KUEUE_QUEUE_LABEL).is_none());
    assert_eq!(job["spec"]["suspend"], false);

    let mut suspended = minimal();
    suspended.spec.cluster.suspend = Some(true);
    assert_eq!(job_json(&suspended, 1)["spec"]["suspend"], true);
}

#[test]
fn placement_fields_pass_through_to_the_pod() {
    let job = job_json(&fixture("session-full.yaml"), 1);
    let pod = &job["spec"]["template"]["spec"];
    assert_eq!(pod["nodeSelector"]["gpu.product"], "A100");
    assert_eq!(pod["tolerations"][0]["key"], "nvidia.com/gpu");
    assert_eq!(
        pod["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"]
            [0]["matchExpressions"][0]["key"],
        "zone"
    );
    assert_eq!(pod["priorityClassName"], "batch-low");
    assert_eq!(pod["serviceAccountName"], "trainer");
    assert_eq!(pod["imagePullSecrets"][0]["name"], "registry-credentials");
    assert_eq!(
        pod["containers"][0]["image"],
        "registry.example/dreambooth-trainer:1.2.3"
    );

    let pod = job_json(&minimal(), 1)["spec"]["template"]["spec"].clone();
    for absent in [
        "nodeSelector",
        "tolerations",
        "affinity",
        "priorityClassName",
        "serviceAccountName",
    ] {
        assert!(
            pod.get(absent).is_none(),
            "{absent} set without being asked for"
        );
    }
}

#[test]
fn config_map_holds_a_session_the_trainer_parser_accepts() {
    let session = fixture("session-full.yaml");
    let config_map = build_config_map(&session, &settings());
    assert_eq!(config_map.metadata.name.as_deref(), Some("anna-session"));
    assert_eq!(
        config_map.metadata.owner_references.as_ref().unwrap()[0].name,
        "anna"
    );
    let text = &config_map.data.as_ref().unwrap()[CONFIG_KEY];
    let parsed = Session::parse(text, true, "session.json", "x").unwrap();
    assert_eq!(parsed.name, "anna");
    assert_eq!(parsed.spec, session.spec.session);
    let value: Value = serde_json::from_str(text).unwrap();
    assert_eq!(value["kind"], "DreamBoothSession");
    assert!(
        value["spec"].get("queueName").is_none(),
        "cluster fields stay out of the trainer's file"
    );
    // Defaults are written out, so the trainer and the operator agree on them.
    assert_eq!(value["spec"]["dataset"]["resolution"], 512);
}

#[test]
fn built_objects_have_no_owner_without_a_uid() {
    let mut session = minimal();
    session.metadata.uid = None;
    assert!(
        build_job(&session, 1, &settings())
            .metadata
            .owner_references
            .is_none()
    );
    assert!(
        build_config_map(&session, &settings())
            .metadata
            .owner_references
            .is_none()
    );
}

#[test]
fn cluster_object_store_fills_what_the_session_leaves_unset() {
    let settings = JobSettings {
        default_storage: StorageDefaults {
            endpoint: Some("http://minio.storage:9000".into()),
            region: Some("eu-1".into()),
            force_path_style: true,
        },
        ..settings()
    };
    let read = |session: &DreamBoothSession| {
        let text = session_json(session, &settings);
        Session::parse(&text, true, "session.json", "x")
            .unwrap()
            .spec
            .storage
    };
    let storage = read(&minimal());
    assert_eq!(
        storage.endpoint.as_deref(),
        Some("http://minio.storage:9000")
    );
    assert_eq!(storage.region.as_deref(), Some("eu-1"));
    assert!(storage.force_path_style);
    // The session's own endpoint wins, path style included.
    let mut own = minimal();
    own.spec.session.storage.endpoint = Some("https://s3.example".into());
    let storage = read(&own);
    assert_eq!(storage.endpoint.as_deref(), Some("https://s3.example"));
    assert!(!storage.force_path_style);
}
