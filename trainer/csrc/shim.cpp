// What tch does not bind: the autocast dtype, TF32 switches and the CUDA caching
// allocator's statistics (the optimizer kernels and CUDA graphs have their own files). Plain C functions over libtorch's C++ API, called from
// trainer/src/cuda.rs. Compiled by build.rs only when the CUDA headers are present.

#include <ATen/Context.h>
#include <ATen/autocast_mode.h>
#include <c10/cuda/CUDACachingAllocator.h>
#include <c10/cuda/CUDAFunctions.h>

#include <cstdint>
#include <exception>

extern "C" {

// 0: float16, 1: bfloat16. Returns 0 on success.
int dbt_set_cuda_autocast_dtype(int bf16) {
  try {
    at::autocast::set_autocast_dtype(at::kCUDA, bf16 ? at::kBFloat16 : at::kHalf);
    return 0;
  } catch (const std::exception&) {
    return 1;
  }
}

int dbt_cuda_autocast_is_bf16() {
  return at::autocast::get_autocast_dtype(at::kCUDA) == at::kBFloat16 ? 1 : 0;
}

// Enters a CUDA autocast region; returns whether autocast was enabled before, which
// dbt_cuda_autocast_exit restores. tch's own wrapper uses the deprecated spelling,
// which makes libtorch print a warning on every call.
int dbt_cuda_autocast_enter(int enabled) {
  int previous = at::autocast::is_autocast_enabled(at::kCUDA) ? 1 : 0;
  at::autocast::set_autocast_enabled(at::kCUDA, enabled != 0);
  at::autocast::increment_nesting();
  return previous;
}

void dbt_cuda_autocast_exit(int previous) {
  // Cast weights are cached for the duration of the outermost region only.
  if (at::autocast::decrement_nesting() == 0) at::autocast::clear_cache();
  at::autocast::set_autocast_enabled(at::kCUDA, previous != 0);
}

// TF32 tensor cores for fp32 matmuls and convolutions.
void dbt_set_tf32(int enabled) {
  at::globalContext().setAllowTF32CuBLAS(enabled != 0);
  at::globalContext().setAllowTF32CuDNN(enabled != 0);
}

int dbt_tf32_enabled() {
  return at::globalContext().allowTF32CuBLAS() ? 1 : 0;
}

// Bytes currently allocated, the peak since the last reset, and the peak reserved from
// the device (graph pools included), for one device.
int dbt_cuda_memory(int device, int64_t* allocated, int64_t* peak, int64_t* peak_reserved) {
  try {
    if (device < 0 || device >= c10::cuda::device_count()) return 1;
    auto stats = c10::cuda::CUDACachingAllocator::getDeviceStats(device);
    auto aggregate = static_cast<size_t>(c10::CachingAllocator::StatType::AGGREGATE);
    *allocated = stats.allocated_bytes[aggregate].current;
    *peak = stats.allocated_bytes[aggregate].peak;
    *peak_reserved = stats.reserved_bytes[aggregate].peak;
    return 0;
  } catch (const std::exception&) {
    return 1;
  }
}

int dbt_cuda_reset_peak_memory(int device) {
  try {
    if (device < 0 || device >= c10::cuda::device_count()) return 1;
    c10::cuda::CUDACachingAllocator::resetPeakStats(device);
    return 0;
  } catch (const std::exception&) {
    return 1;
  }
}

}  // extern "C"
