//! libtorch is linked, loads without LD_LIBRARY_PATH and computes.

use dreambooth_trainer::runtime::RuntimeInfo;

#[test]
fn libtorch_multiplies_matrices_on_the_cpu() {
    let info = RuntimeInfo::probe();
    eprintln!("libtorch runtime: {info:?}");
    assert!(info.cpu_matmul_ok);
    if let Some(cuda_ok) = info.cuda_matmul_ok {
        assert!(cuda_ok, "CUDA is available but a matmul on it gave a wrong result");
    }
}

#[test]
fn cuda_is_linked_when_libtorch_has_it() {
    // torch_cuda must be a direct dependency of the test binary even on a machine
    // without a GPU; otherwise a GPU machine would report CUDA unavailable.
    let torch_lib = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../.venv-torch/lib");
    if !torch_lib.join("libtorch_cuda.so").exists() {
        eprintln!("libtorch has no CUDA build here; nothing to check");
        return;
    }
    let exe = std::env::current_exe().unwrap();
    let out = std::process::Command::new("ldd").arg(&exe).output().expect("ldd runs");
    let ldd = String::from_utf8_lossy(&out.stdout);
    assert!(ldd.contains("libtorch_cuda.so"), "torch_cuda is not linked:\n{ldd}");
}
