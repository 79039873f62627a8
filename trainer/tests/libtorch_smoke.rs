//! libtorch is linked, loads without LD_LIBRARY_PATH and computes.

use dreambooth_trainer::runtime::RuntimeInfo;

#[test]
fn libtorch_multiplies_matrices_on_the_cpu() {
    let info = RuntimeInfo::probe();
    eprintln!("libtorch runtime: {info:?}");
    assert!(info.cpu_matmul_ok);
    if let Some(cuda_ok) = info.cuda_matmul_ok {
        assert!(
            cuda_ok,
            "CUDA is available but a matmul on it gave a wrong result"
        );
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
    let out = std::process::Command::new("ldd")
        .arg(&exe)
        .output()
        .expect("ldd runs");
    let ldd = String::from_utf8_lossy(&out.stdout);
    assert!(
        ldd.contains("libtorch_cuda.so"),
        "torch_cuda is not linked:\n{ldd}"
    );
}

#[test]
fn the_cuda_shim_sets_autocast_dtype_and_tf32() {
    use dreambooth_trainer::cuda;
    if !cuda::shim_available() {
        eprintln!("built without CUDA headers: no shim to check");
        return;
    }
    cuda::set_autocast_bf16(true).unwrap();
    assert!(cuda::autocast_is_bf16().unwrap());
    cuda::set_autocast_bf16(false).unwrap();
    assert!(!cuda::autocast_is_bf16().unwrap());
    cuda::set_tf32(true).unwrap();
    assert!(cuda::tf32_enabled().unwrap());
    cuda::set_tf32(false).unwrap();
    assert!(!cuda::tf32_enabled().unwrap());
    let devices = tch::Cuda::device_count() as usize;
    assert_eq!(
        cuda::memory_stats(devices).unwrap(),
        None,
        "no device past the last one"
    );
    if devices > 0 {
        let before = cuda::memory_stats(0).unwrap().unwrap();
        let _block = tch::Tensor::zeros([1 << 20], (tch::Kind::Float, tch::Device::Cuda(0)));
        let after = cuda::memory_stats(0).unwrap().unwrap();
        assert!(
            after.allocated >= before.allocated + (4 << 20),
            "{before:?} -> {after:?}"
        );
    }
}

#[test]
fn autocast_regions_nest_and_restore() {
    use dreambooth_trainer::cuda;
    let a = tch::Tensor::ones([4, 4], (tch::Kind::Float, tch::Device::cuda_if_available()));
    let outer = cuda::autocast(true, || {
        let inner = cuda::autocast(false, || a.matmul(&a));
        (a.matmul(&a), inner)
    });
    let after = a.matmul(&a);
    if a.device().is_cuda() {
        cuda::set_autocast_bf16(true).unwrap();
        let in_region = cuda::autocast(true, || a.matmul(&a));
        assert_eq!(in_region.kind(), tch::Kind::BFloat16);
        assert_eq!(
            outer.1.kind(),
            tch::Kind::Float,
            "a disabled inner region computes in fp32"
        );
    }
    assert_eq!(
        after.kind(),
        tch::Kind::Float,
        "autocast is off again after the region"
    );
    assert_eq!(outer.0.size(), [4, 4]);
}
