//! Link-time wiring for libtorch that torch-sys leaves to the final binary:
//! - an rpath to the libtorch lib folder, so binaries and tests run without
//!   `LD_LIBRARY_PATH`;
//! - `torch_cuda` forced in with `--no-as-needed`: nothing references its symbols
//!   directly (kernels register from static initialisers), so a plain `-ltorch_cuda`
//!   would be dropped and CUDA would report unavailable on a GPU machine;
//! - the C++ shim in `csrc/` (every `.cpp` there: what tch does not bind), compiled
//!   against the libtorch and CUDA headers when both are present.

use std::env;
use std::path::{Path, PathBuf};

fn main() {
    println!("cargo:rerun-if-env-changed=LIBTORCH");
    println!("cargo:rerun-if-env-changed=LIBTORCH_LIB");
    println!("cargo:rerun-if-changed=csrc");
    println!("cargo::rustc-check-cfg=cfg(dbt_cuda_shim)");
    let Some(torch_dir) = env::var("LIBTORCH").ok().map(PathBuf::from) else {
        println!("cargo:warning=LIBTORCH is not set; run scripts/bootstrap-libtorch.sh");
        return;
    };
    // Canonical, so the rpath does not depend on the .venv-torch link being relative.
    let torch_dir = torch_dir.canonicalize().unwrap_or(torch_dir);
    let lib_dir = env::var("LIBTORCH_LIB")
        .map(|l| PathBuf::from(l).join("lib"))
        .unwrap_or_else(|_| torch_dir.join("lib"));
    println!("cargo:rustc-link-arg=-Wl,-rpath,{}", lib_dir.display());
    if !lib_dir.join("libtorch_cuda.so").exists() {
        return;
    }
    println!("cargo:rustc-link-search=native={}", lib_dir.display());
    println!("cargo:rustc-link-arg=-Wl,--no-as-needed,-ltorch_cuda,-lc10_cuda,--as-needed");
    if let Some(cuda_include) = cuda_headers(&torch_dir) {
        compile_shim(&torch_dir, &cuda_include);
        println!("cargo:rustc-cfg=dbt_cuda_shim");
    } else {
        println!(
            "cargo:warning=CUDA headers not found beside libtorch; building without the CUDA shim"
        );
    }
}

/// The pip CUDA toolkit puts its headers in `site-packages/nvidia/cu13/include`, a
/// sibling of the `torch` folder.
fn cuda_headers(torch_dir: &Path) -> Option<PathBuf> {
    let include = torch_dir.parent()?.join("nvidia/cu13/include");
    include
        .join("cuda_runtime_api.h")
        .exists()
        .then_some(include)
}

fn compile_shim(torch_dir: &Path, cuda_include: &Path) {
    let mut sources: Vec<PathBuf> = std::fs::read_dir("csrc")
        .expect("trainer/csrc exists")
        .filter_map(|entry| entry.ok().map(|e| e.path()))
        .filter(|path| path.extension().is_some_and(|ext| ext == "cpp"))
        .collect();
    sources.sort();
    for source in &sources {
        println!("cargo:rerun-if-changed={}", source.display());
    }
    cc::Build::new()
        .cpp(true)
        .files(&sources)
        .include(torch_dir.join("include"))
        .include(torch_dir.join("include/torch/csrc/api/include"))
        .include(cuda_include)
        .flag("-std=c++17")
        .flag("-D_GLIBCXX_USE_CXX11_ABI=1")
        .flag_if_supported("-Wno-unused-parameter")
        .flag_if_supported("-Wno-deprecated-declarations")
        .warnings(false)
        .compile("dbt_shim");
}
