//! Link-time wiring for libtorch that torch-sys leaves to the final binary:
//! - an rpath to the libtorch lib folder, so binaries and tests run without
//!   `LD_LIBRARY_PATH`;
//! - `torch_cuda` forced in with `--no-as-needed`: nothing references its symbols
//!   directly (kernels register from static initialisers), so a plain `-ltorch_cuda`
//!   would be dropped and CUDA would report unavailable on a GPU machine;
//! - the C++ shim in `csrc/` (every `.cpp` there: what tch does not bind), compiled
//!   against the libtorch and CUDA headers when both are present;
//! - our own CUDA kernels (every `.cu` there), compiled by the pip toolkit's nvcc when it
//!   is there, with the CUDA runtime linked (and an rpath to it) for their launches.

use std::env;
use std::path::{Path, PathBuf};

fn main() {
    println!("cargo:rerun-if-env-changed=LIBTORCH");
    println!("cargo:rerun-if-env-changed=LIBTORCH_LIB");
    println!("cargo:rerun-if-changed=csrc");
    println!("cargo::rustc-check-cfg=cfg(dbt_cuda_shim)");
    println!("cargo::rustc-check-cfg=cfg(dbt_cuda_kernels)");
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
        let kernels = compile_kernels(&torch_dir);
        if kernels {
            println!("cargo:rustc-cfg=dbt_cuda_kernels");
        }
        compile_shim(&torch_dir, &cuda_include, kernels);
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

/// The `csrc` files with extension `ext`, sorted, each watched for changes.
fn sources(ext: &str) -> Vec<PathBuf> {
    let mut sources: Vec<PathBuf> = std::fs::read_dir("csrc")
        .expect("trainer/csrc exists")
        .filter_map(|entry| entry.ok().map(|e| e.path()))
        .filter(|path| path.extension().is_some_and(|e| e == ext))
        .collect();
    sources.sort();
    for source in &sources {
        println!("cargo:rerun-if-changed={}", source.display());
    }
    sources
}

/// Compiles `csrc/*.cu` for Hopper (sm_90 code) and later GPUs (compute_80 PTX the
/// driver compiles), and links the CUDA runtime next to libtorch's copy. Returns whether
/// the kernels were built.
fn compile_kernels(torch_dir: &Path) -> bool {
    let Some(cuda_root) = torch_dir.parent().map(|site| site.join("nvidia/cu13")) else {
        return false;
    };
    let nvcc = cuda_root.join("bin/nvcc");
    let cudart = cuda_root.join("lib/libcudart.so.13");
    if !nvcc.exists() || !cudart.exists() {
        println!("cargo:warning=nvcc or libcudart not found beside libtorch; no CUDA kernels");
        return false;
    }
    // nvcc directly: cc's CUDA mode hands nvcc host flags it rejects.
    let out_dir = PathBuf::from(env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    let mut archive = cc::Build::new();
    for source in sources("cu") {
        let object = out_dir.join(source.with_extension("o").file_name().expect("a file"));
        let status = std::process::Command::new(&nvcc)
            .args(["-c", "-O3", "-std=c++17", "-Xcompiler", "-fPIC"])
            .arg("-gencode=arch=compute_90,code=sm_90")
            .arg("-gencode=arch=compute_80,code=compute_80")
            .arg(&source)
            .arg("-o")
            .arg(&object)
            .status()
            .expect("running nvcc");
        assert!(status.success(), "nvcc failed on {}", source.display());
        archive.object(object);
    }
    archive.compile("dbt_kernels");
    // Link search and lib reach dependent crates' binaries too; each adds its own rpath.
    let lib = cuda_root.join("lib");
    println!("cargo:rustc-link-search=native={}", lib.display());
    println!("cargo:rustc-link-lib=dylib:+verbatim=libcudart.so.13");
    println!("cargo:rustc-link-arg=-Wl,-rpath,{}", lib.display());
    true
}

fn compile_shim(torch_dir: &Path, cuda_include: &Path, kernels: bool) {
    let mut build = cc::Build::new();
    if kernels {
        build.define("DBT_CUDA_KERNELS", None);
    }
    build
        .cpp(true)
        .files(sources("cpp"))
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
