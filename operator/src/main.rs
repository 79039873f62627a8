//! `dreambooth-operator`: the controller binary. The reconcile loop arrives with the
//! "Operator" work; for now it only checks its arguments.

fn main() {
    eprintln!(
        "dreambooth-operator: the controller is not implemented yet; `crdgen` prints the CRD"
    );
    std::process::exit(2);
}
