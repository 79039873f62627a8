//! Rpaths to libtorch and the CUDA runtime for the test binaries: `chart_contract` links the trainer crate
//! (for its metrics registry), and link arguments from the trainer's own build script do not
//! reach a dependent crate's binaries.

use std::env;
use std::path::PathBuf;

fn main() {
    println!("cargo:rerun-if-env-changed=LIBTORCH");
    println!("cargo:rerun-if-env-changed=LIBTORCH_LIB");
    let Some(torch_dir) = env::var("LIBTORCH").ok().map(PathBuf::from) else {
        return;
    };
    let torch_dir = torch_dir.canonicalize().unwrap_or(torch_dir);
    let lib_dir = env::var("LIBTORCH_LIB")
        .map(|l| PathBuf::from(l).join("lib"))
        .unwrap_or_else(|_| torch_dir.join("lib"));
    println!(
        "cargo:rustc-link-arg-tests=-Wl,-rpath,{}",
        lib_dir.display()
    );
    // The trainer's CUDA kernels link the pip toolkit's runtime, beside the torch folder.
    if let Some(cuda_lib) = torch_dir.parent().map(|site| site.join("nvidia/cu13/lib")) {
        println!(
            "cargo:rustc-link-arg-tests=-Wl,-rpath,{}",
            cuda_lib.display()
        );
    }
}
