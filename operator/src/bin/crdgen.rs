//! Prints the `DreamBoothSession` CRD as YAML: `crdgen > crds/dreamboothsession.yaml`.

fn main() {
    print!("{}", dreambooth_operator::crd_yaml());
}
