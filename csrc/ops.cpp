// Every op schema, once, plus the pybind11 module carrying build information.
// Backends register implementations in csrc/cpu/*.cpp and csrc/cuda/*.cu.
// CMake builds this file with CHASE_EXT_NO_PYTHON (a plain op library, no pybind11).
#include <ATen/core/LegacyTypeDispatch.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/core/grad_mode.h>
#include <torch/library.h>

#include <vector>
#ifndef CHASE_EXT_NO_PYTHON
#include <torch/extension.h>

#include "cpu/mask_kernels.h"
#ifdef WITH_CUDA
#include "common/select_stats.h"
#endif
#endif

#ifndef CHASE_EXT_VERSION
#define CHASE_EXT_VERSION "0.0.0"
#endif
#ifndef CHASE_EXT_CUDA_ARCHS
#define CHASE_EXT_CUDA_ARCHS ""
#endif

TORCH_LIBRARY(chase_ext, m) {
  m.def(
      "select_threshold(Tensor[] keys, Tensor[] masks, Tensor[] live_rows, Tensor[] live_cols, "
      "bool mask_value, int k, bool largest, bool absolute) -> Tensor");
  m.def(
      "mask_update_(Tensor(a!)[] weights, Tensor(b!)[] masks, Tensor[] scores, Tensor[] live_rows, "
      "Tensor[] live_cols, Tensor(c!)[] states, int[] state_owner, int[] prune_counts, "
      "int[] grow_counts) -> (Tensor, Tensor)");
  m.def("channel_stats(Tensor[] weights, Tensor[] masks) -> (Tensor, Tensor)");
  m.def("masked_apply_(Tensor(a!)[] tensors, Tensor[] masks, int[] owner) -> ()");
  m.def(
      "masked_sgd_(Tensor(a!)[] params, Tensor(b!)[] grads, Tensor(c!)[] momentum_buffers, Tensor[] masks, "
      "float lr, float weight_decay, float momentum, float dampening, bool nesterov, bool maximize) -> ()");
  m.def(
      "masked_adam_(Tensor(a!)[] params, Tensor(b!)[] grads, Tensor(c!)[] exp_avgs, Tensor(d!)[] exp_avg_sqs, "
      "Tensor(e!)[] max_exp_avg_sqs, Tensor(f!)[] state_steps, Tensor[] masks, float lr, float beta1, float beta2, "
      "float weight_decay, float eps, bool amsgrad, bool maximize, bool decoupled_weight_decay, int vector_width) "
      "-> ()");
  m.def("gather_channels_(Tensor(a!) tensor, Tensor keep, int dim) -> ()");
}

namespace {

// The Autograd kernel of every op. None is differentiable, and each writes its outputs in
// place, so: refuse tensors that require grad while grad mode is on (a leaf modified in
// place, or a result autograd could not differentiate), refuse writing an inference
// tensor outside inference mode, and after the kernel move the version counter of every
// tensor the schema marks as written, so that a backward through a graph that saved one
// of them raises instead of using the overwritten values. All checks come before the
// kernel runs: a refused call writes nothing.
void autograd_kernel(const c10::OperatorHandle& op, c10::DispatchKeySet keys, torch::jit::Stack* stack) {
  // Inference mode excludes the Autograd keys, so this never runs inside it.
  const auto& schema = op.schema();
  const auto& args = schema.arguments();
  const size_t start = stack->size() - args.size();
  const bool grad_mode = at::GradMode::is_enabled();
  std::vector<at::Tensor> written;
  for (size_t i = 0; i < args.size(); ++i) {
    const auto* alias = args[i].alias_info();
    const bool writes = alias != nullptr && alias->isWrite();
    auto visit = [&](const at::Tensor& t, int64_t j) {
      if (!t.defined()) return;
      // the argument's name, built only for a message (TORCH_CHECK formats on failure)
      auto where = [&] { return j < 0 ? args[i].name() : args[i].name() + "[" + std::to_string(j) + "]"; };
      TORCH_CHECK(!(grad_mode && t.requires_grad()), schema.name(), ": ", where(),
                  " requires grad; the op is not differentiable (call it under torch.no_grad() or on "
                  "detached tensors)");
      if (!writes) return;
      TORCH_CHECK(!t.is_inference(), schema.name(), ": ", where(),
                  " is an inference tensor, which can be written in place only under torch.inference_mode()");
      written.push_back(t);
    };
    const c10::IValue& v = (*stack)[start + i];
    if (v.isTensor()) {
      visit(v.toTensor(), -1);
    } else if (v.isTensorList()) {
      int64_t j = 0;
      for (const c10::IValue& e : v.toListRef()) visit(e.toTensor(), j++);
    }
  }
  {
    at::AutoDispatchBelowADInplaceOrView guard;
    op.redispatchBoxed(keys & c10::after_ADInplaceOrView_keyset, stack);
  }
  for (const at::Tensor& t : written) t.unsafeGetTensorImpl()->bump_version();
}

}  // namespace

TORCH_LIBRARY_IMPL(chase_ext, Autograd, m) {
  for (const char* name :
       {"select_threshold", "mask_update_", "channel_stats", "masked_apply_", "masked_sgd_", "masked_adam_",
        "gather_channels_"})
    m.impl(name, torch::CppFunction::makeFromBoxedFunction<&autograd_kernel>());
}

#ifndef CHASE_EXT_NO_PYTHON
PYBIND11_MODULE(_C, mod) {
  mod.attr("__version__") = CHASE_EXT_VERSION;
#ifdef WITH_CUDA
  mod.attr("has_cuda") = true;
#ifdef CUDA_VERSION_STR
  mod.attr("cuda_version") = CUDA_VERSION_STR;
#else
  mod.attr("cuda_version") = "unknown";
#endif
#else
  mod.attr("has_cuda") = false;
  mod.attr("cuda_version") = pybind11::none();
#endif
  mod.attr("cuda_archs") = CHASE_EXT_CUDA_ARCHS;
  mod.def("cpu_isa", [] { return std::string(chase_ext::cpu::mask_kernels().isa); },
          "Instruction set the CPU mask update runs with now (see CHASE_EXT_CPU_ISA).");
#ifdef WITH_CUDA
  mod.def("cuda_select_stats", [] {
    const auto s = chase_ext::cuda::select_stats();
    return std::make_tuple(s.bracket_fast, s.bracket_fallback, s.compact, s.compact_fallback);
  }, "(bracket_fast, bracket_fallback, compact, compact_fallback): which path the CUDA mask update's "
     "selections took (common/select_stats.h).");
#endif
}
#endif
