// Gradient checkpointing, which tch does not bind: a custom autograd function that runs a
// Rust callback without recording a graph, keeps only its inputs, and in the backward
// pass runs the callback again with grad enabled and back-propagates through that
// recomputation (torch.utils.checkpoint's reentrant variant). Called from
// trainer/src/models/checkpointing.rs.

#include <ATen/autocast_mode.h>
#include <c10/cuda/CUDAFunctions.h>
#include <cuda_runtime_api.h>
#include <torch/csrc/autograd/autograd.h>
#include <torch/csrc/autograd/custom_function.h>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <exception>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

// Declared here rather than through ATen/cuda/CUDAContextLight.h, whose cuSPARSE
// include needs CCCL headers the pip CUDA toolkit does not ship; defined in libtorch_cuda.
namespace at::cuda {
cudaDeviceProp* getDeviceProperties(c10::DeviceIndex device);
}

extern "C" {
// Runs the Rust function on `n_inputs` tensors it takes ownership of; pushes each
// output through dbt_checkpoint_push_output(sink, …). Non-zero means it failed (a Rust
// panic, whose payload the Rust side keeps).
typedef int (*dbt_checkpoint_call)(void* context, at::Tensor** inputs, size_t n_inputs,
                                   void* sink);
typedef void (*dbt_checkpoint_drop)(void* context);
}

namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// The autocast state of the devices we train on, as it was in the forward pass, so the
// recomputation produces the same dtypes (and the same numbers) as the forward did.
struct AutocastState {
  static constexpr at::DeviceType kDevices[2] = {at::kCUDA, at::kCPU};
  bool enabled[2];
  at::ScalarType dtype[2];

  static AutocastState current() {
    AutocastState state;
    for (int i = 0; i < 2; ++i) {
      state.enabled[i] = at::autocast::is_autocast_enabled(kDevices[i]);
      state.dtype[i] = at::autocast::get_autocast_dtype(kDevices[i]);
    }
    return state;
  }

  void apply() const {
    for (int i = 0; i < 2; ++i) {
      at::autocast::set_autocast_enabled(kDevices[i], enabled[i]);
      at::autocast::set_autocast_dtype(kDevices[i], dtype[i]);
    }
  }
};

// Enters the forward pass's autocast state on this thread (the backward may run on an
// autograd device thread) and restores the thread's own state on exit.
class AutocastScope {
 public:
  explicit AutocastScope(const AutocastState& wanted) : previous_(AutocastState::current()) {
    wanted.apply();
    at::autocast::increment_nesting();
  }
  ~AutocastScope() {
    if (at::autocast::decrement_nesting() == 0) at::autocast::clear_cache();
    previous_.apply();
  }
  AutocastScope(const AutocastScope&) = delete;
  AutocastScope& operator=(const AutocastScope&) = delete;

 private:
  AutocastState previous_;
};

// The Rust closure, owned by the autograd node: dropped (through the Rust drop function)
// when the graph that holds the node is freed.
class RustFunction : public torch::CustomClassHolder {
 public:
  RustFunction(dbt_checkpoint_call call, dbt_checkpoint_drop drop, void* context)
      : call_(call), drop_(drop), context_(context) {}
  ~RustFunction() override {
    if (drop_ != nullptr) drop_(context_);
  }
  RustFunction(const RustFunction&) = delete;
  RustFunction& operator=(const RustFunction&) = delete;

  variable_list operator()(const variable_list& inputs) const {
    std::vector<at::Tensor*> owned;
    owned.reserve(inputs.size());
    for (const auto& input : inputs) owned.push_back(new at::Tensor(input));
    variable_list outputs;
    // The callback owns the input handles from here on, also when it fails.
    if (call_(context_, owned.data(), owned.size(), &outputs) != 0) {
      throw std::runtime_error("the checkpointed function panicked");
    }
    return outputs;
  }

  std::vector<bool> requires_grad;
  AutocastState autocast{};

 private:
  dbt_checkpoint_call call_;
  dbt_checkpoint_drop drop_;
  void* context_;
};

struct CheckpointFunction : public torch::autograd::Function<CheckpointFunction> {
  // Function::apply runs this with grad disabled, so the callback records no graph.
  // `inputs` is a TensorList because that is how Function::apply sees each tensor in a
  // list as an input to differentiate.
  static variable_list forward(AutogradContext* ctx, at::IValue function,
                               at::TensorList input_list) {
    variable_list inputs = input_list.vec();
    auto rust = c10::static_intrusive_pointer_cast<RustFunction>(function.toCapsule());
    rust->autocast = AutocastState::current();
    rust->requires_grad.clear();
    for (const auto& input : inputs) {
      rust->requires_grad.push_back(input.defined() && input.requires_grad());
    }
    ctx->saved_data["function"] = std::move(function);
    ctx->save_for_backward(inputs);
    variable_list outputs;
    {
      AutocastScope autocast(rust->autocast);
      outputs = (*rust)(inputs);
    }
    return outputs;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    auto rust = c10::static_intrusive_pointer_cast<RustFunction>(
        ctx->saved_data["function"].toCapsule());
    auto saved = ctx->get_saved_variables();
    variable_list inputs;
    inputs.reserve(saved.size());
    for (size_t i = 0; i < saved.size(); ++i) {
      if (!saved[i].defined()) {
        inputs.push_back(saved[i]);
        continue;
      }
      // Fresh leaves: the recomputed graph stops here, and their .grad is what this
      // node passes on to whatever produced the inputs.
      inputs.push_back(saved[i].detach().requires_grad_(rust->requires_grad[i]));
    }
    variable_list outputs;
    {
      at::AutoGradMode grad(true);
      AutocastScope autocast(rust->autocast);
      outputs = (*rust)(inputs);
    }
    if (outputs.size() != grad_outputs.size()) {
      throw std::runtime_error("the checkpointed function returned " +
                               std::to_string(outputs.size()) + " tensors on recompute, " +
                               std::to_string(grad_outputs.size()) + " in the forward pass");
    }
    variable_list roots;
    variable_list root_grads;
    for (size_t i = 0; i < outputs.size(); ++i) {
      if (outputs[i].defined() && outputs[i].requires_grad() && grad_outputs[i].defined()) {
        roots.push_back(outputs[i]);
        root_grads.push_back(grad_outputs[i]);
      }
    }
    // Reentrant backward: parameter gradients accumulate into their .grad, as they
    // would without checkpointing.
    if (!roots.empty()) torch::autograd::backward(roots, root_grads);
    // One gradient per forward argument: none for the function itself.
    variable_list grads;
    grads.reserve(inputs.size() + 1);
    grads.emplace_back();
    for (size_t i = 0; i < inputs.size(); ++i) {
      grads.push_back(rust->requires_grad[i] ? inputs[i].grad() : at::Tensor());
    }
    return grads;
  }
};

void write_error(const char* message, char* error, size_t error_len) {
  if (error == nullptr || error_len == 0) return;
  size_t n = std::min(std::strlen(message), error_len - 1);
  std::memcpy(error, message, n);
  error[n] = '\0';
}

}  // namespace

extern "C" {

// Called by the Rust callback for each tensor it returns; copies the handle.
void dbt_checkpoint_push_output(void* sink, const at::Tensor* output) {
  static_cast<variable_list*>(sink)->push_back(*output);
}

// Applies the checkpointed function to `inputs` (borrowed). On success writes up to
// `max_outputs` new tensor handles (owned by the caller) and their count, and returns 0.
// The node takes ownership of `context` in every case: `drop` runs exactly once.
int dbt_checkpoint_apply(dbt_checkpoint_call call, dbt_checkpoint_drop drop, void* context,
                         const at::Tensor* const* inputs, size_t n_inputs,
                         at::Tensor** outputs, size_t max_outputs, size_t* n_outputs,
                         char* error, size_t error_len) {
  try {
    auto function = c10::make_intrusive<RustFunction>(call, drop, context);
    variable_list input_list;
    input_list.reserve(n_inputs);
    for (size_t i = 0; i < n_inputs; ++i) input_list.push_back(*inputs[i]);
    auto results = CheckpointFunction::apply(at::IValue::make_capsule(std::move(function)),
                                             at::TensorList(input_list));
    if (results.size() > max_outputs) {
      write_error("the checkpointed function returned too many tensors", error, error_len);
      return 1;
    }
    for (size_t i = 0; i < results.size(); ++i) outputs[i] = new at::Tensor(results[i]);
    *n_outputs = results.size();
    return 0;
  } catch (const std::exception& e) {
    write_error(e.what(), error, error_len);
    return 1;
  }
}

// Total memory of one CUDA device in bytes, for the `auto` rule; 0 when there is none.
int64_t dbt_cuda_total_memory(int device) {
  try {
    if (device < 0 || device >= c10::cuda::device_count()) return 0;
    return static_cast<int64_t>(at::cuda::getDeviceProperties(static_cast<c10::DeviceIndex>(device))->totalGlobalMem);
  } catch (const std::exception&) {
    return 0;
  }
}

}  // extern "C"
