// The optimizer half of a sync-free training step: libtorch's fused AdamW kernel with
// the step count and learning rate in device tensors (so a CUDA graph can replay it with
// a new LR), and a global grad-norm clip from foreach norms that never reads a value back
// to the CPU. Tensors arrive as tch handles (`torch::Tensor*`). Compiled by build.rs
// only when the CUDA headers are present; the kernels run on CPU tensors too.

#include <ATen/ATen.h>
#include <c10/core/GradMode.h>

#include <cstdint>
#include <cstdio>
#include <exception>
#include <vector>

namespace {

std::vector<at::Tensor> gather(at::Tensor* const* tensors, int64_t count) {
  std::vector<at::Tensor> out;
  out.reserve(static_cast<size_t>(count));
  for (int64_t i = 0; i < count; ++i) out.push_back(*tensors[i]);
  return out;
}

void report(const std::exception& e, char* error, size_t error_len) {
  if (error != nullptr && error_len > 0) std::snprintf(error, error_len, "%s", e.what());
}

// libtorch's fused AdamW over `count` parameters; every one shares the step tensor
// (already counted), which the kernel only reads.
void fused_adamw_update(at::Tensor* const* params, std::vector<at::Tensor> grads,
                        at::Tensor* const* exp_avgs, at::Tensor* const* exp_avg_sqs,
                        int64_t count, const at::Tensor& step, const at::Tensor& lr,
                        double beta1, double beta2, double weight_decay, double eps) {
  std::vector<at::Tensor> steps(static_cast<size_t>(count), step);
  at::_fused_adamw_(gather(params, count), grads, gather(exp_avgs, count),
                    gather(exp_avg_sqs, count), {}, steps, lr, beta1, beta2, weight_decay,
                    eps, /*amsgrad=*/false, /*maximize=*/false);
}

// What torch.nn.utils.clip_grad_norm_ multiplies the gradients by for a global norm of
// `total`.
at::Tensor clip_coefficient(const at::Tensor& total, double max_norm) {
  return (max_norm / (total + 1e-6)).clamp_max(1.0);
}

}  // namespace

extern "C" {

// One AdamW update of `count` parameters: `step += 1`, then the fused kernel, which
// reads the step (for bias correction) and the LR from device memory. Returns 0 on
// success, else 1 with the message in `error`.
int dbt_fused_adamw(at::Tensor* const* params, at::Tensor* const* grads,
                    at::Tensor* const* exp_avgs, at::Tensor* const* exp_avg_sqs,
                    int64_t count, at::Tensor* step, at::Tensor* lr, double beta1,
                    double beta2, double weight_decay, double eps, char* error,
                    size_t error_len) {
  try {
    c10::NoGradGuard no_grad;
    step->add_(1);
    fused_adamw_update(params, gather(grads, count), exp_avgs, exp_avg_sqs, count, *step,
                       *lr, beta1, beta2, weight_decay, eps);
    return 0;
  } catch (const std::exception& e) {
    report(e, error, error_len);
    return 1;
  }
}

// Scales the gradients so their global L2 norm is at most `max_norm` (as
// torch.nn.utils.clip_grad_norm_ with foreach) and returns the norm before clipping as
// a new 0-d tensor on the gradients' device, or null with the message in `error`.
at::Tensor* dbt_clip_grad_norm(at::Tensor* const* grads, int64_t count, double max_norm,
                               char* error, size_t error_len) {
  try {
    c10::NoGradGuard no_grad;
    auto list = gather(grads, count);
    auto norms = at::_foreach_norm(list, 2);
    auto total = at::linalg_vector_norm(at::stack(norms), 2);
    at::_foreach_mul_(list, clip_coefficient(total, max_norm));
    return new at::Tensor(total);
  } catch (const std::exception& e) {
    report(e, error, error_len);
    return nullptr;
  }
}

// Drops the gradients of `count` parameters (PyTorch's zero_grad(set_to_none=True)): the
// next backward allocates them, so they do not sit beside the forward's activations.
// Host-only: inside a CUDA-graph capture it makes backward allocate them in the pool.
int dbt_clear_grads(at::Tensor* const* params, int64_t count, char* error,
                    size_t error_len) {
  try {
    for (int64_t i = 0; i < count; ++i) params[i]->mutable_grad().reset();
    return 0;
  } catch (const std::exception& e) {
    report(e, error, error_len);
    return 1;
  }
}

}  // extern "C"

#ifdef DBT_CUDA_KERNELS
#include <c10/cuda/CUDAStream.h>

#include <stdexcept>
#include <string>

extern "C" int dbt_packed_adamw_launch(const void* const* grads, const int64_t* offsets,
                                       const int64_t* numels, int64_t count, void* hi,
                                       void* lo, float* exp_avg, float* exp_avg_sq,
                                       const float* step, const float* lr,
                                       const float* grad_scale, float beta1, float beta2,
                                       float weight_decay, float eps, void* stream);
extern "C" const char* dbt_cuda_error_string(int status);

extern "C" {

// One clipped AdamW step of a phase whose matrices are packed (csrc/packed_adamw.cu: bf16
// weights with 16-bit remainders, flat fp32 moments) and whose other parameters are
// plain fp32 tensors: the global norm over both gradient sets, the clip coefficient read
// by the packed kernel from device memory, libtorch's fused kernel for the rest.
// `packed_grads[i]` belongs to the weight at `offsets[i]` of the flat buffers. Returns
// the norm before clipping as a new 0-d tensor, or null with the message in `error`.
at::Tensor* dbt_packed_adamw(at::Tensor* const* packed_grads, const int64_t* offsets,
                             int64_t packed_count, at::Tensor* hi, at::Tensor* lo,
                             at::Tensor* exp_avg, at::Tensor* exp_avg_sq,
                             at::Tensor* const* params, at::Tensor* const* grads,
                             at::Tensor* const* exp_avgs, at::Tensor* const* exp_avg_sqs,
                             int64_t count, at::Tensor* step, at::Tensor* lr, double max_norm,
                             double beta1, double beta2, double weight_decay, double eps,
                             char* error, size_t error_len) {
  try {
    c10::NoGradGuard no_grad;
    auto packed = gather(packed_grads, packed_count);
    auto rest = gather(grads, count);
    std::vector<at::Tensor> norms;
    for (auto* list : {&packed, &rest}) {
      if (list->empty()) continue;
      // fp32 norms of the bf16 gradients, so the clip is as precise as on fp32 ones.
      auto part = at::_foreach_norm(*list, 2, at::kFloat);
      norms.insert(norms.end(), part.begin(), part.end());
    }
    auto total = norms.empty() ? at::zeros({}, step->options())
                               : at::linalg_vector_norm(at::stack(norms), 2);
    auto coefficient = clip_coefficient(total, max_norm);
    step->add_(1);
    if (!rest.empty()) {
      at::_foreach_mul_(rest, coefficient);
      fused_adamw_update(params, rest, exp_avgs, exp_avg_sqs, count, *step, *lr, beta1,
                         beta2, weight_decay, eps);
    }
    std::vector<const void*> pointers;
    std::vector<int64_t> numels;
    for (auto& grad : packed) {
      if (grad.scalar_type() != at::kBFloat16 || !grad.is_cuda()) {
        throw std::invalid_argument("packed AdamW needs bf16 CUDA gradients");
      }
      // The kernel reads four elements at a time: contiguous, 8-byte aligned.
      if (!grad.is_contiguous() || reinterpret_cast<uintptr_t>(grad.data_ptr()) % 8 != 0) {
        grad = grad.clone(at::MemoryFormat::Contiguous);
      }
      pointers.push_back(grad.data_ptr());
      numels.push_back(grad.numel());
    }
    auto scale = coefficient.to(at::kFloat);
    const int status = dbt_packed_adamw_launch(
        pointers.data(), offsets, numels.data(), packed_count, hi->data_ptr(),
        lo->data_ptr(), exp_avg->data_ptr<float>(), exp_avg_sq->data_ptr<float>(),
        step->data_ptr<float>(), lr->data_ptr<float>(), scale.data_ptr<float>(),
        static_cast<float>(beta1), static_cast<float>(beta2),
        static_cast<float>(weight_decay), static_cast<float>(eps),
        c10::cuda::getCurrentCUDAStream().stream());
    if (status != 0) throw std::runtime_error(dbt_cuda_error_string(status));
    return new at::Tensor(total);
  } catch (const std::exception& e) {
    report(e, error, error_len);
    return nullptr;
  }
}

}  // extern "C"
#endif  // DBT_CUDA_KERNELS
