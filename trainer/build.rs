//! Link-time wiring for libtorch that torch-sys leaves to the final binary:
//! an rpath to the libtorch lib folder, so binaries and tests run without
//! `LD_LIBRARY_PATH`, and `torch_cuda` forced in with `--no-as-needed`.
//! Nothing in our code references a `torch_cuda` symbol directly (kernels register
//! themselves from static initialisers), so a plain `-ltorch_cuda` would be dropped
//! by the linker and CUDA would report unavailable on a GPU machine.

use std::env;
use std::path::PathBuf;

fn main() {
    println!("cargo:rerun-if-env-changed=LIBTORCH");
    println!("cargo:rerun-if-env-changed=LIBTORCH_LIB");
    let Some(lib_dir) = libtorch_lib_dir() else {
        println!("cargo:warning=LIBTORCH is not set; run scripts/bootstrap-libtorch.sh");
        return;
    };
    // Canonical, so the rpath does not depend on the .venv-torch link being relative.
    let lib_dir = lib_dir.canonicalize().unwrap_or(lib_dir);
    println!("cargo:rustc-link-arg=-Wl,-rpath,{}", lib_dir.display());
    if lib_dir.join("libtorch_cuda.so").exists() {
        println!("cargo:rustc-link-search=native={}", lib_dir.display());
        println!("cargo:rustc-link-arg=-Wl,--no-as-needed,-ltorch_cuda,-lc10_cuda,--as-needed");
    }
}

fn libtorch_lib_dir() -> Option<PathBuf> {
    if let Ok(lib) = env::var("LIBTORCH_LIB") {
        return Some(PathBuf::from(lib).join("lib"));
    }
    env::var("LIBTORCH").ok().map(|root| PathBuf::from(root).join("lib"))
}
