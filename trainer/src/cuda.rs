//! What tch does not expose, backed by the C++ shim in `csrc/`: the autocast dtype
//! (bf16), TF32, the caching allocator's memory statistics, the multi-tensor optimizer
//! kernels ([`foreach`]) and CUDA-graph capture ([`graph`]). Without the shim (no CUDA
//! headers at build time) each call reports that it is unavailable.

pub mod foreach;
pub mod graph;

use std::ffi::c_char;
use std::fmt;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShimUnavailable(&'static str);

impl fmt::Display for ShimUnavailable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} needs the CUDA shim, which this build does not have",
            self.0
        )
    }
}

impl std::error::Error for ShimUnavailable {}

/// A shim call that is unavailable in this build or that libtorch refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ShimError {
    #[error("{0} needs the CUDA shim, which this build does not have")]
    Unavailable(&'static str),
    #[error("{what} failed: {message}")]
    Failed { what: &'static str, message: String },
}

/// Calls `f` with a buffer for libtorch's error message; `None` from `f` means failure.
#[cfg_attr(not(dbt_cuda_shim), allow(dead_code))]
fn with_error_buffer<T>(
    what: &'static str,
    f: impl FnOnce(*mut c_char, usize) -> Option<T>,
) -> Result<T, ShimError> {
    let mut buffer = vec![0u8; 2048];
    f(buffer.as_mut_ptr().cast(), buffer.len()).ok_or_else(|| {
        let end = buffer.iter().position(|&b| b == 0).unwrap_or(buffer.len());
        ShimError::Failed {
            what,
            message: String::from_utf8_lossy(&buffer[..end]).into_owned(),
        }
    })
}

/// Memory held by tensors on one CUDA device, in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemoryStats {
    pub allocated: i64,
    /// The most allocated at once since the last [`reset_peak_memory`].
    pub peak: i64,
}

#[cfg(dbt_cuda_shim)]
mod ffi {
    unsafe extern "C" {
        pub fn dbt_set_cuda_autocast_dtype(bf16: i32) -> i32;
        pub fn dbt_cuda_autocast_is_bf16() -> i32;
        pub fn dbt_cuda_autocast_enter(enabled: i32) -> i32;
        pub fn dbt_cuda_autocast_exit(previous: i32);
        pub fn dbt_set_tf32(enabled: i32);
        pub fn dbt_tf32_enabled() -> i32;
        pub fn dbt_cuda_memory(
            device: i32,
            allocated: *mut i64,
            peak: *mut i64,
            peak_reserved: *mut i64,
        ) -> i32;
        pub fn dbt_cuda_reset_peak_memory(device: i32) -> i32;
    }
}

/// Whether this build carries the shim.
pub fn shim_available() -> bool {
    cfg!(dbt_cuda_shim)
}

/// Makes CUDA autocast compute in bf16 (true) or fp16 (false, libtorch's default).
pub fn set_autocast_bf16(bf16: bool) -> Result<(), ShimUnavailable> {
    #[cfg(dbt_cuda_shim)]
    {
        // SAFETY: plain setter on libtorch's global autocast state.
        let status = unsafe { ffi::dbt_set_cuda_autocast_dtype(i32::from(bf16)) };
        if status == 0 {
            return Ok(());
        }
    }
    let _ = bf16;
    Err(ShimUnavailable("the bf16 autocast dtype"))
}

pub fn autocast_is_bf16() -> Result<bool, ShimUnavailable> {
    #[cfg(dbt_cuda_shim)]
    {
        // SAFETY: plain getter.
        return Ok(unsafe { ffi::dbt_cuda_autocast_is_bf16() } != 0);
    }
    #[allow(unreachable_code)]
    Err(ShimUnavailable("reading the autocast dtype"))
}

/// Runs `f` with CUDA autocast on (in the dtype of [`set_autocast_bf16`]) when `enabled`.
/// Without the shim, falls back to tch's own wrapper.
pub fn autocast<T>(enabled: bool, f: impl FnOnce() -> T) -> T {
    #[cfg(dbt_cuda_shim)]
    {
        struct Restore(i32);
        impl Drop for Restore {
            fn drop(&mut self) {
                // SAFETY: pairs with the enter below, also on unwinding.
                unsafe { ffi::dbt_cuda_autocast_exit(self.0) };
            }
        }
        // SAFETY: plain calls on libtorch's thread-local autocast state.
        let _restore = Restore(unsafe { ffi::dbt_cuda_autocast_enter(i32::from(enabled)) });
        return f();
    }
    #[allow(unreachable_code)]
    tch::autocast(enabled, f)
}

/// TF32 tensor cores for fp32 matmuls and convolutions (Ampere and newer).
pub fn set_tf32(enabled: bool) -> Result<(), ShimUnavailable> {
    #[cfg(dbt_cuda_shim)]
    {
        // SAFETY: plain setter on libtorch's global context.
        unsafe { ffi::dbt_set_tf32(i32::from(enabled)) };
        return Ok(());
    }
    #[allow(unreachable_code)]
    {
        let _ = enabled;
        Err(ShimUnavailable("TF32"))
    }
}

pub fn tf32_enabled() -> Result<bool, ShimUnavailable> {
    #[cfg(dbt_cuda_shim)]
    {
        // SAFETY: plain getter.
        return Ok(unsafe { ffi::dbt_tf32_enabled() } != 0);
    }
    #[allow(unreachable_code)]
    Err(ShimUnavailable("TF32"))
}

/// The caching allocator's statistics for `device`; `None` when there is no such device.
pub fn memory_stats(device: usize) -> Result<Option<MemoryStats>, ShimUnavailable> {
    #[cfg(dbt_cuda_shim)]
    {
        let (mut allocated, mut peak, mut peak_reserved) = (0i64, 0i64, 0i64);
        // SAFETY: the shim writes three i64s through valid pointers and checks the index.
        let status = unsafe {
            ffi::dbt_cuda_memory(device as i32, &mut allocated, &mut peak, &mut peak_reserved)
        };
        return Ok((status == 0).then_some(MemoryStats { allocated, peak }));
    }
    #[allow(unreachable_code)]
    {
        let _ = device;
        Err(ShimUnavailable("CUDA memory statistics"))
    }
}

/// The most bytes the caching allocator held from `device` (CUDA graph pools included)
/// since the last [`reset_peak_memory`]; `None` when there is no such device.
pub fn peak_reserved_memory(device: usize) -> Result<Option<i64>, ShimUnavailable> {
    #[cfg(dbt_cuda_shim)]
    {
        let (mut allocated, mut peak, mut peak_reserved) = (0i64, 0i64, 0i64);
        // SAFETY: as in `memory_stats`.
        let status = unsafe {
            ffi::dbt_cuda_memory(device as i32, &mut allocated, &mut peak, &mut peak_reserved)
        };
        return Ok((status == 0).then_some(peak_reserved));
    }
    #[allow(unreachable_code)]
    {
        let _ = device;
        Err(ShimUnavailable("CUDA memory statistics"))
    }
}

pub fn reset_peak_memory(device: usize) -> Result<bool, ShimUnavailable> {
    #[cfg(dbt_cuda_shim)]
    {
        // SAFETY: index-checked in the shim.
        return Ok(unsafe { ffi::dbt_cuda_reset_peak_memory(device as i32) } == 0);
    }
    #[allow(unreachable_code)]
    {
        let _ = device;
        Err(ShimUnavailable("CUDA memory statistics"))
    }
}
