//! The committed CRD is the generated one, and it carries what kubectl and the API
//! server need: printer columns, the status subresource, CEL rules, map-typed conditions.

use std::path::Path;

use dreambooth_api::crd::DreamBoothSession;
use dreambooth_api::session_file::CLUSTER_ONLY_FIELDS;
use kube::CustomResourceExt;
use serde_json::Value;

fn committed_crd_text() -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../crds/dreamboothsession.yaml");
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn generated_crd() -> Value {
    serde_json::to_value(DreamBoothSession::crd()).unwrap()
}

fn version(crd: &Value) -> &Value {
    &crd["spec"]["versions"][0]
}

fn spec_schema(crd: &Value) -> &Value {
    &version(crd)["schema"]["openAPIV3Schema"]["properties"]["spec"]
}

/// Every CEL rule anywhere below `schema`.
fn cel_rules(schema: &Value, out: &mut Vec<String>) {
    match schema {
        Value::Object(map) => {
            if let Some(Value::Array(rules)) = map.get("x-kubernetes-validations") {
                out.extend(
                    rules
                        .iter()
                        .filter_map(|r| r["rule"].as_str().map(str::to_owned)),
                );
            }
            map.values().for_each(|v| cel_rules(v, out));
        }
        Value::Array(items) => items.iter().for_each(|v| cel_rules(v, out)),
        _ => {}
    }
}

#[test]
fn committed_crd_is_up_to_date() {
    let generated = serde_norway::to_string(&DreamBoothSession::crd()).unwrap();
    assert!(
        committed_crd_text() == generated,
        "crds/dreamboothsession.yaml is stale: run `cargo run -p dreambooth-operator --bin crdgen > crds/dreamboothsession.yaml`"
    );
}

#[test]
fn crd_identity_and_printer_columns() {
    let crd = generated_crd();
    assert_eq!(crd["metadata"]["name"], "dreamboothsessions.dreambooth.dev");
    assert_eq!(crd["spec"]["scope"], "Namespaced");
    assert_eq!(crd["spec"]["names"]["shortNames"][0], "dbs");
    assert_eq!(version(&crd)["name"], "v1alpha1");
    assert!(
        version(&crd)["subresources"]["status"].is_object(),
        "no status subresource"
    );
    let columns: Vec<&str> = version(&crd)["additionalPrinterColumns"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap())
        .collect();
    assert_eq!(columns, ["Phase", "Stage", "Step", "Total", "Age"]);
}

#[test]
fn crd_has_cel_rules_for_the_ranges() {
    let crd = generated_crd();
    let mut rules = Vec::new();
    cel_rules(spec_schema(&crd), &mut rules);
    for needle in [
        "% 64 == 0",
        "self <= 0.001",
        "size(self) <= 16",
        "^[a-z0-9]{3,24}$",
        "'auto'",
    ] {
        assert!(
            rules.iter().any(|r| r.contains(needle)),
            "no CEL rule with `{needle}` in {rules:?}"
        );
    }
}

#[test]
fn conditions_are_a_map_keyed_by_type() {
    let crd = generated_crd();
    let conditions = &version(&crd)["schema"]["openAPIV3Schema"]["properties"]["status"]["properties"]
        ["conditions"];
    assert_eq!(conditions["x-kubernetes-list-type"], "map");
    assert_eq!(conditions["x-kubernetes-list-map-keys"][0], "type");
}

#[test]
fn cluster_only_fields_are_exactly_the_cluster_spec() {
    let crd = generated_crd();
    let properties = spec_schema(&crd)["properties"].as_object().unwrap();
    for field in [
        "baseModel",
        "dataset",
        "training",
        "checkpoints",
        "samples",
        "output",
        "storage",
    ] {
        assert!(
            properties.contains_key(field),
            "spec.{field} missing from the CRD"
        );
        assert!(!CLUSTER_ONLY_FIELDS.contains(&field));
    }
    // Every field set, so serialisation names them all.
    let cluster_fields = serde_json::to_value(dreambooth_api::crd::ClusterSpec {
        resources: Some(Default::default()),
        node_selector: Some(Default::default()),
        tolerations: Some(Vec::new()),
        affinity: Some(Default::default()),
        priority_class_name: Some(String::new()),
        queue_name: Some(String::new()),
        image: Some(String::new()),
        image_pull_secrets: Some(Vec::new()),
        service_account_name: Some(String::new()),
        suspend: Some(false),
        backoff_limit: Some(0),
        active_deadline_seconds: Some(0),
        ttl_seconds_after_finished: Some(0),
    })
    .unwrap();
    assert_eq!(
        cluster_fields.as_object().unwrap().len(),
        CLUSTER_ONLY_FIELDS.len(),
        "CLUSTER_ONLY_FIELDS names a field ClusterSpec does not have"
    );
    for field in cluster_fields.as_object().unwrap().keys() {
        assert!(
            CLUSTER_ONLY_FIELDS.contains(&field.as_str()),
            "{field} is not in CLUSTER_ONLY_FIELDS"
        );
        assert!(
            properties.contains_key(field),
            "spec.{field} missing from the CRD"
        );
    }
}

#[test]
fn training_fields_are_immutable_but_lifecycle_fields_are_not() {
    let crd = generated_crd();
    let rules = spec_schema(&crd)["x-kubernetes-validations"]
        .as_array()
        .expect("spec has CEL rules");
    let immutability = rules
        .iter()
        .filter_map(|r| r["rule"].as_str())
        .find(|r| r.contains("oldSelf"))
        .expect("a transition rule on spec");
    for field in [
        "baseModel",
        "dataset",
        "training",
        "checkpoints",
        "samples",
        "output",
        "storage",
    ] {
        assert!(
            immutability.contains(&format!("self.{field} == oldSelf.{field}")),
            "{field} is not held immutable: {immutability}"
        );
    }
    for field in CLUSTER_ONLY_FIELDS {
        assert!(
            !immutability.contains(&format!("self.{field} ")),
            "{field} must stay editable"
        );
    }
}

#[test]
fn resources_default_to_one_nvidia_gpu() {
    let crd = generated_crd();
    let resources = &spec_schema(&crd)["properties"]["resources"]["properties"];
    assert_eq!(resources["gpus"]["default"], 1);
    assert_eq!(resources["gpuResourceName"]["default"], "nvidia.com/gpu");
    let parsed: dreambooth_api::crd::Resources = serde_json::from_str("{}").unwrap();
    assert_eq!(parsed.gpus, 1);
    assert_eq!(parsed.gpu_resource_name, "nvidia.com/gpu");
}
