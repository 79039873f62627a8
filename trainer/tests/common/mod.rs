//! Helpers shared by the parity and checkpoint tests: where the fixtures are, reading
//! them, loading a tiny model's weights into a VarStore by diffusers name, and comparing
//! tensors and error messages.

#![allow(dead_code)] // each test binary uses a different subset

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use tch::{Tensor, nn};

/// `trainer/tests/fixtures`.
pub fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests")
        .join("fixtures")
}

/// `trainer/tests/fixtures/<name>`.
pub fn fixture(name: &str) -> PathBuf {
    fixtures().join(name)
}

/// Every tensor of a safetensors file, by name.
pub fn read_tensors(path: &Path) -> BTreeMap<String, Tensor> {
    Tensor::read_safetensors(path)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()))
        .into_iter()
        .collect()
}

/// One tensor of a fixture map, with a useful message when it is absent.
pub fn take<'a>(tensors: &'a BTreeMap<String, Tensor>, name: &str) -> &'a Tensor {
    tensors
        .get(name)
        .unwrap_or_else(|| panic!("fixture tensor {name} is missing"))
}

/// Copies a safetensors file into `vs`, requiring the same names and shapes on both
/// sides; the panic lists every missing, extra and mismatched tensor.
pub fn load_exact(vs: &nn::VarStore, path: &Path) {
    let file = read_tensors(path);
    let vars = vs.variables();
    let ours: BTreeSet<&String> = vars.keys().collect();
    let theirs: BTreeSet<&String> = file.keys().collect();
    let missing: Vec<_> = theirs.difference(&ours).collect();
    let extra: Vec<_> = ours.difference(&theirs).collect();
    let mismatched: Vec<String> = ours
        .intersection(&theirs)
        .filter(|name| vars[**name].size() != file[**name].size())
        .map(|name| {
            format!(
                "{name}: ours {:?}, file {:?}",
                vars[*name].size(),
                file[*name].size()
            )
        })
        .collect();
    assert!(
        missing.is_empty() && extra.is_empty() && mismatched.is_empty(),
        "{}: in the file only {missing:?}; in the model only {extra:?}; shapes differ {mismatched:?}",
        path.display()
    );
    tch::no_grad(|| {
        for (name, var) in &vars {
            let mut var = var.shallow_clone();
            var.copy_(&file[name].to_kind(var.kind()));
        }
    });
}

/// Largest absolute element difference, after checking the shapes agree.
pub fn max_abs_diff(ours: &Tensor, reference: &Tensor) -> f64 {
    assert_eq!(
        ours.size(),
        reference.size(),
        "shape of ours vs the reference"
    );
    (ours - reference).abs().max().double_value(&[])
}

/// Asserts two tensor maps hold the same names, kinds and values, bit for bit.
pub fn assert_same(a: &BTreeMap<String, Tensor>, b: &BTreeMap<String, Tensor>, what: &str) {
    assert_eq!(
        a.keys().collect::<Vec<_>>(),
        b.keys().collect::<Vec<_>>(),
        "{what}: names differ"
    );
    for (name, tensor) in a {
        assert_eq!(tensor.kind(), b[name].kind(), "{what}: {name} kind");
        assert!(tensor.equal(&b[name]), "{what}: {name} differs");
    }
}

/// Asserts an error message names everything the user needs to act on (the file, the
/// tensor, the offending value...).
pub fn assert_mentions(message: &str, parts: &[&str]) {
    let missing: Vec<&&str> = parts.iter().filter(|p| !message.contains(**p)).collect();
    assert!(
        missing.is_empty(),
        "{message}\n(does not mention {missing:?})"
    );
}
