// Every op schema, once, plus the pybind11 module carrying build information.
// Backends register implementations in csrc/cpu/*.cpp and csrc/cuda/*.cu.
// CMake builds this file with CHASE_EXT_NO_PYTHON (a plain op library, no pybind11).
#include <torch/library.h>
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
  m.def("gather_channels_(Tensor(a!) tensor, Tensor keep, int dim) -> ()");
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
  mod.def("cuda_bracket_stats", [] {
    const auto s = chase_ext::cuda::bracket_stats();
    return std::make_pair(s.fast, s.fallback);
  }, "(fast, fallback): CUDA mask updates the bracketed select finished itself / handed to the radix select.");
#endif
}
#endif
