//! Multi-tensor kernels for the optimizer half of a step (backed by
//! `csrc/fused_optimizer.cpp`): libtorch's fused AdamW with device-side step and LR, a
//! grad-norm clip that never reads a value back to the CPU, dropping gradients, and our
//! own AdamW over packed weights (`csrc/packed_adamw.cu`). A few kernel launches for the
//! whole model instead of several per tensor, and nothing that syncs, so a CUDA graph can
//! capture them. libtorch's kernels also exist for CPU tensors, which is where their
//! numerics are tested; the packed one runs on CUDA only.

use tch::Tensor;

use super::ShimError;

/// β, weight decay and ε of one fused AdamW update.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamWHyper {
    pub beta1: f64,
    pub beta2: f64,
    pub weight_decay: f64,
    pub eps: f64,
}

/// The moments and parameters one fused update touches, index-aligned.
pub struct AdamWTensors<'a> {
    pub params: &'a [Tensor],
    pub grads: &'a [Tensor],
    pub exp_avgs: &'a [Tensor],
    pub exp_avg_sqs: &'a [Tensor],
}

#[cfg(dbt_cuda_shim)]
mod ffi {
    use std::ffi::{c_char, c_void};
    unsafe extern "C" {
        pub fn dbt_fused_adamw(
            params: *const *const c_void,
            grads: *const *const c_void,
            exp_avgs: *const *const c_void,
            exp_avg_sqs: *const *const c_void,
            count: i64,
            step: *const c_void,
            lr: *const c_void,
            beta1: f64,
            beta2: f64,
            weight_decay: f64,
            eps: f64,
            error: *mut c_char,
            error_len: usize,
        ) -> i32;
        pub fn dbt_clip_grad_norm(
            grads: *const *const c_void,
            count: i64,
            max_norm: f64,
            error: *mut c_char,
            error_len: usize,
        ) -> *mut c_void;
        #[cfg(dbt_cuda_kernels)]
        pub fn dbt_packed_adamw(
            packed_grads: *const *const c_void,
            offsets: *const i64,
            packed_count: i64,
            hi: *const c_void,
            lo: *const c_void,
            exp_avg: *const c_void,
            exp_avg_sq: *const c_void,
            params: *const *const c_void,
            grads: *const *const c_void,
            exp_avgs: *const *const c_void,
            exp_avg_sqs: *const *const c_void,
            count: i64,
            step: *const c_void,
            lr: *const c_void,
            max_norm: f64,
            beta1: f64,
            beta2: f64,
            weight_decay: f64,
            eps: f64,
            error: *mut c_char,
            error_len: usize,
        ) -> *mut c_void;
        pub fn dbt_clear_grads(
            params: *const *const c_void,
            count: i64,
            error: *mut c_char,
            error_len: usize,
        ) -> i32;
    }

    /// tch's handles are `torch::Tensor*`, which the shim takes as they are.
    pub fn handles(tensors: &[tch::Tensor]) -> Vec<*const c_void> {
        tensors.iter().map(|t| t.as_ptr().cast()).collect()
    }
}

/// `step += 1`, then one AdamW update of every parameter reading the step and `lr`
/// (0-d fp32 tensors on the parameters' device) from memory.
pub fn fused_adamw(
    tensors: &AdamWTensors<'_>,
    step: &Tensor,
    lr: &Tensor,
    hyper: AdamWHyper,
) -> Result<(), ShimError> {
    let count = tensors.params.len();
    assert!(
        [tensors.grads, tensors.exp_avgs, tensors.exp_avg_sqs]
            .iter()
            .all(|list| list.len() == count),
        "fused AdamW needs one gradient and two moments per parameter"
    );
    #[cfg(dbt_cuda_shim)]
    {
        let (p, g) = (ffi::handles(tensors.params), ffi::handles(tensors.grads));
        let (m, v) = (
            ffi::handles(tensors.exp_avgs),
            ffi::handles(tensors.exp_avg_sqs),
        );
        return super::with_error_buffer("fused AdamW", |error, len| {
            // SAFETY: four arrays of `count` live tensor handles, two live 0-d tensors,
            // and an error buffer of `len` bytes.
            let status = unsafe {
                ffi::dbt_fused_adamw(
                    p.as_ptr(),
                    g.as_ptr(),
                    m.as_ptr(),
                    v.as_ptr(),
                    count as i64,
                    step.as_ptr().cast(),
                    lr.as_ptr().cast(),
                    hyper.beta1,
                    hyper.beta2,
                    hyper.weight_decay,
                    hyper.eps,
                    error,
                    len,
                )
            };
            (status == 0).then_some(())
        });
    }
    #[allow(unreachable_code)]
    {
        let _ = (step, lr, hyper);
        Err(ShimError::Unavailable("fused AdamW"))
    }
}

/// Weights packed as bf16 plus a 16-bit remainder in flat buffers
/// (`train::packed_master`), with the bf16 gradients of those present and where each
/// one's weight starts in the buffers.
pub struct PackedTensors<'a> {
    pub grads: &'a [Tensor],
    pub offsets: &'a [i64],
    pub hi: &'a Tensor,
    pub lo: &'a Tensor,
    pub exp_avg: &'a Tensor,
    pub exp_avg_sq: &'a Tensor,
}

/// Whether this build has our own CUDA kernels (`csrc/*.cu`, compiled by nvcc).
pub fn kernels_available() -> bool {
    cfg!(dbt_cuda_kernels)
}

/// `step += 1`, then one AdamW update of the packed weights and of the plain fp32 `rest`,
/// all gradients clipped together to a global norm of `max_norm` (the clip is folded
/// into the packed kernel). Returns the norm before clipping, left on the device.
pub fn packed_adamw(
    packed: &PackedTensors<'_>,
    rest: &AdamWTensors<'_>,
    step: &Tensor,
    lr: &Tensor,
    max_norm: f64,
    hyper: AdamWHyper,
) -> Result<Tensor, ShimError> {
    assert_eq!(
        packed.grads.len(),
        packed.offsets.len(),
        "one offset per gradient"
    );
    #[cfg(dbt_cuda_kernels)]
    {
        let packed_grads = ffi::handles(packed.grads);
        let (p, g) = (ffi::handles(rest.params), ffi::handles(rest.grads));
        let (m, v) = (ffi::handles(rest.exp_avgs), ffi::handles(rest.exp_avg_sqs));
        let handle = |t: &Tensor| t.as_ptr().cast::<std::ffi::c_void>();
        return super::with_error_buffer("packed AdamW", |error, len| {
            // SAFETY: every handle is a live tensor, the arrays have the lengths passed,
            // and the shim returns a new heap tensor (owned by the result) or null.
            let total = unsafe {
                ffi::dbt_packed_adamw(
                    packed_grads.as_ptr(),
                    packed.offsets.as_ptr(),
                    packed_grads.len() as i64,
                    handle(packed.hi),
                    handle(packed.lo),
                    handle(packed.exp_avg),
                    handle(packed.exp_avg_sq),
                    p.as_ptr(),
                    g.as_ptr(),
                    m.as_ptr(),
                    v.as_ptr(),
                    p.len() as i64,
                    handle(step),
                    handle(lr),
                    max_norm,
                    hyper.beta1,
                    hyper.beta2,
                    hyper.weight_decay,
                    hyper.eps,
                    error,
                    len,
                )
            };
            // SAFETY: a non-null result is a fresh `torch::Tensor*`, as tch's own are.
            (!total.is_null()).then(|| unsafe { Tensor::from_ptr(total.cast()) })
        });
    }
    #[allow(unreachable_code)]
    {
        let _ = (rest, step, lr, max_norm, hyper);
        Err(ShimError::Unavailable("packed AdamW (CUDA kernels)"))
    }
}

/// Scales `grads` so their global L2 norm is at most `max_norm`; returns the norm before
/// clipping as a 0-d tensor on their device, without waiting for it.
pub fn clip_grad_norm(grads: &[Tensor], max_norm: f64) -> Result<Tensor, ShimError> {
    #[cfg(dbt_cuda_shim)]
    {
        let handles = ffi::handles(grads);
        return super::with_error_buffer("the foreach grad-norm clip", |error, len| {
            // SAFETY: `handles` are live tensors; the shim returns a new heap tensor
            // (owned by the returned `Tensor`) or null.
            let total = unsafe {
                ffi::dbt_clip_grad_norm(
                    handles.as_ptr(),
                    handles.len() as i64,
                    max_norm,
                    error,
                    len,
                )
            };
            // SAFETY: a non-null result is a fresh `torch::Tensor*`, as tch's own are.
            (!total.is_null()).then(|| unsafe { Tensor::from_ptr(total.cast()) })
        });
    }
    #[allow(unreachable_code)]
    {
        let _ = (grads, max_norm);
        Err(ShimError::Unavailable("the foreach grad-norm clip"))
    }
}

/// Drops the gradients of `params` (`zero_grad(set_to_none=True)`): the next backward
/// allocates them, so they do not take memory during the forward pass.
pub fn clear_grads(params: &[Tensor]) -> Result<(), ShimError> {
    #[cfg(dbt_cuda_shim)]
    {
        let handles = ffi::handles(params);
        return super::with_error_buffer("dropping gradients", |error, len| {
            // SAFETY: `handles` are live tensors.
            let status =
                unsafe { ffi::dbt_clear_grads(handles.as_ptr(), handles.len() as i64, error, len) };
            (status == 0).then_some(())
        });
    }
    #[allow(unreachable_code)]
    {
        let _ = params;
        Err(ShimError::Unavailable("dropping gradients"))
    }
}
