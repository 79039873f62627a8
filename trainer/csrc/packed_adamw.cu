// AdamW over packed fp32 master weights: each weight is kept as its bf16 rounding (the
// tensor the forward pass computes with, so autocast has nothing to cast) plus a 16-bit
// remainder that restores the exact fp32 value. The kernel reconstructs the fp32 master,
// applies the clipped bf16 gradient with fp32 moments, and writes both halves back: fp32
// masters kept exactly and fp32 AdamW arithmetic, in 14 bytes a parameter (gradient
// included) instead of 16.
//
// Plain CUDA (no libtorch headers): the shim in fused_optimizer.cpp hands over raw
// pointers and the current stream, so launches are captured by a CUDA graph like any
// other kernel on that stream.

#include <cuda_runtime.h>

#include <cstdint>

namespace {

// Tensors described by one launch; their pointers travel in the kernel's parameters, so
// a captured graph needs no device-side table.
constexpr int kTensorsPerLaunch = 64;
constexpr int kThreads = 256;
// Elements one block updates; tiles never straddle two tensors.
constexpr int64_t kTile = 16384;

struct TensorBatch {
  const uint16_t* grads[kTensorsPerLaunch];  // bf16 bit patterns
  int64_t offsets[kTensorsPerLaunch];  // into the flat packed buffers
  int64_t numels[kTensorsPerLaunch];
  int32_t first_tile[kTensorsPerLaunch + 1];  // prefix sums of tiles per tensor
  int32_t count;
};

struct Hyper {
  float beta1, beta2, weight_decay, eps;
};

__device__ __forceinline__ float unpack(uint16_t hi, int16_t lo) {
  return __uint_as_float((static_cast<uint32_t>(hi) << 16) +
                         static_cast<uint32_t>(static_cast<int32_t>(lo)));
}

// Rounds to the nearest bf16 (exact ties away from zero, so the remainder always fits
// in int16) and keeps the remainder of the bit pattern.
__device__ __forceinline__ void pack(float value, uint16_t* hi, int16_t* lo) {
  const uint32_t bits = __float_as_uint(value);
  const uint32_t high = (bits + 0x8000u) >> 16;
  *hi = static_cast<uint16_t>(high);
  *lo = static_cast<int16_t>(static_cast<int32_t>(bits - (high << 16)));
}

// Four 16-bit lanes loaded or stored as one 8-byte access.
template <typename T>
union Quad {
  uint2 vector;
  T lanes[4];
};

// One step's scalars, and the update of one element in place.
struct Update {
  Hyper hyper;
  float grad_scale, step_size, bias2_sqrt, decay;

  __device__ __forceinline__ void apply(uint16_t& hi, int16_t& lo, uint16_t grad, float& m,
                                        float& v) const {
    const float g = __uint_as_float(static_cast<uint32_t>(grad) << 16) * grad_scale;
    float param = unpack(hi, lo) * decay;
    m = hyper.beta1 * m + (1.0f - hyper.beta1) * g;
    v = hyper.beta2 * v + (1.0f - hyper.beta2) * g * g;
    param -= step_size * m / (sqrtf(v) / bias2_sqrt + hyper.eps);
    pack(param, &hi, &lo);
  }
};

__global__ void __launch_bounds__(kThreads)
    packed_adamw_kernel(TensorBatch batch, uint16_t* __restrict__ hi,
                        int16_t* __restrict__ lo, float* __restrict__ exp_avg,
                        float* __restrict__ exp_avg_sq, const float* __restrict__ step,
                        const float* __restrict__ lr, const float* __restrict__ grad_scale,
                        Hyper hyper) {
  const int32_t tile = static_cast<int32_t>(blockIdx.x);
  int first = 0;
  int last = batch.count - 1;
  while (first < last) {  // the tensor whose tiles contain this block
    const int mid = (first + last + 1) / 2;
    if (batch.first_tile[mid] <= tile) {
      first = mid;
    } else {
      last = mid - 1;
    }
  }
  const int t = first;
  const int64_t begin = static_cast<int64_t>(tile - batch.first_tile[t]) * kTile;
  const int64_t end = min(begin + kTile, batch.numels[t]);
  const uint16_t* grad = batch.grads[t];
  const int64_t offset = batch.offsets[t];

  // PyTorch's AdamW: decoupled decay, moments, bias-corrected step (corrections in
  // double, as its fused kernel computes them).
  const double steps = static_cast<double>(*step);
  const float rate = *lr;
  Update update;
  update.hyper = hyper;
  update.grad_scale = *grad_scale;
  update.step_size =
      rate / static_cast<float>(1.0 - pow(static_cast<double>(hyper.beta1), steps));
  update.bias2_sqrt =
      static_cast<float>(sqrt(1.0 - pow(static_cast<double>(hyper.beta2), steps)));
  update.decay = 1.0f - rate * hyper.weight_decay;

  // Four elements a thread per pass with 8- and 16-byte accesses: tensors start on
  // 256-element boundaries of the flat buffers and gradients on allocator boundaries.
  for (int64_t i = begin + 4 * threadIdx.x; i < end; i += 4 * kThreads) {
    const int64_t k = offset + i;
    if (i + 4 <= end) {
      Quad<uint16_t> h{*reinterpret_cast<const uint2*>(hi + k)};
      Quad<int16_t> l{*reinterpret_cast<const uint2*>(lo + k)};
      const Quad<uint16_t> g{*reinterpret_cast<const uint2*>(grad + i)};
      float4 m = *reinterpret_cast<const float4*>(exp_avg + k);
      float4 v = *reinterpret_cast<const float4*>(exp_avg_sq + k);
      update.apply(h.lanes[0], l.lanes[0], g.lanes[0], m.x, v.x);
      update.apply(h.lanes[1], l.lanes[1], g.lanes[1], m.y, v.y);
      update.apply(h.lanes[2], l.lanes[2], g.lanes[2], m.z, v.z);
      update.apply(h.lanes[3], l.lanes[3], g.lanes[3], m.w, v.w);
      *reinterpret_cast<uint2*>(hi + k) = h.vector;
      *reinterpret_cast<uint2*>(lo + k) = l.vector;
      *reinterpret_cast<float4*>(exp_avg + k) = m;
      *reinterpret_cast<float4*>(exp_avg_sq + k) = v;
    } else {
      for (int64_t j = i; j < end; ++j) {
        update.apply(hi[offset + j], lo[offset + j], grad[j], exp_avg[offset + j],
                     exp_avg_sq[offset + j]);
      }
    }
  }
}

}  // namespace

extern "C" {

// One AdamW step of `count` packed tensors on `stream`. `grads[i]` is a contiguous bf16
// gradient of `numels[i]` elements whose weight sits at `offsets[i]` of the flat `hi`,
// `lo`, `exp_avg` and `exp_avg_sq` buffers; `step` (already counted), `lr` and
// `grad_scale` (the clip coefficient) are device scalars. Returns a cudaError_t.
int dbt_packed_adamw_launch(const void* const* grads, const int64_t* offsets,
                            const int64_t* numels, int64_t count, void* hi, void* lo,
                            float* exp_avg, float* exp_avg_sq, const float* step,
                            const float* lr, const float* grad_scale, float beta1,
                            float beta2, float weight_decay, float eps, void* stream) {
  const Hyper hyper{beta1, beta2, weight_decay, eps};
  int64_t next = 0;
  while (next < count) {
    TensorBatch batch{};
    int32_t tiles = 0;
    for (; next < count && batch.count < kTensorsPerLaunch; ++next) {
      if (numels[next] == 0) continue;
      const int j = batch.count++;
      batch.grads[j] = static_cast<const uint16_t*>(grads[next]);
      batch.offsets[j] = offsets[next];
      batch.numels[j] = numels[next];
      batch.first_tile[j] = tiles;
      tiles += static_cast<int32_t>((numels[next] + kTile - 1) / kTile);
    }
    batch.first_tile[batch.count] = tiles;
    if (tiles == 0) continue;
    packed_adamw_kernel<<<tiles, kThreads, 0, static_cast<cudaStream_t>(stream)>>>(
        batch, static_cast<uint16_t*>(hi), static_cast<int16_t*>(lo), exp_avg, exp_avg_sq,
        step, lr, grad_scale, hyper);
    const cudaError_t status = cudaGetLastError();
    if (status != cudaSuccess) return static_cast<int>(status);
  }
  return 0;
}

// The message for an error code returned above.
const char* dbt_cuda_error_string(int status) {
  return cudaGetErrorString(static_cast<cudaError_t>(status));
}

}  // extern "C"
