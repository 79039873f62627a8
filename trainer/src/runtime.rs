//! What libtorch this process runs on: version, devices, CUDA.

use tch::{Cuda, Device, Kind, Tensor};

/// A short report of the libtorch runtime, printed by `dreambooth-trainer info`.
#[derive(Debug, Clone, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct RuntimeInfo {
    pub cuda_available: bool,
    pub cuda_devices: usize,
    pub cudnn_available: bool,
    /// Result of a 2×2 matmul on the CPU, proving libtorch's kernels run.
    pub cpu_matmul_ok: bool,
    /// The same check on the first CUDA device, when there is one.
    pub cuda_matmul_ok: Option<bool>,
}

impl RuntimeInfo {
    pub fn probe() -> Self {
        let cuda_available = Cuda::is_available();
        Self {
            cuda_available,
            cuda_devices: if cuda_available {
                Cuda::device_count() as usize
            } else {
                0
            },
            cudnn_available: Cuda::cudnn_is_available(),
            cpu_matmul_ok: matmul_ok(Device::Cpu),
            cuda_matmul_ok: cuda_available.then(|| matmul_ok(Device::Cuda(0))),
        }
    }
}

/// [[1,2],[3,4]] squared is [[7,10],[15,22]].
fn matmul_ok(device: Device) -> bool {
    let a = Tensor::from_slice(&[1f32, 2., 3., 4.])
        .reshape([2, 2])
        .to_device(device);
    let product = a.matmul(&a).to_device(Device::Cpu).to_kind(Kind::Float);
    let expected = Tensor::from_slice(&[7f32, 10., 15., 22.]).reshape([2, 2]);
    product.allclose(&expected, 0.0, 1e-6, false)
}
