// gather_channels_ on CPU: compact a tensor along dim 0 or 1 to the kept channels, in
// place. Blocks move to lower or equal offsets in ascending order, so a forward memmove
// never overwrites a block that is still to be read; no second copy is allocated.
#include <torch/library.h>

#include <cstring>
#include <vector>

#include "common/checks.h"

namespace chase_ext::cpu {
namespace {

void gather_channels(const at::Tensor& tensor, const at::Tensor& keep, int64_t dim) {
  const char* op = "chase_ext.gather_channels_";
  check_gather_args(op, tensor, keep, dim);
  // A copy: keep may live in the storage the moves below overwrite (a view of tensor).
  const at::Tensor k = keep.to(at::kCPU).contiguous();
  const std::vector<int64_t> kv(k.data_ptr<int64_t>(), k.data_ptr<int64_t>() + k.numel());
  const int64_t* kp = kv.data();
  const int64_t C = tensor.size(dim), K = static_cast<int64_t>(kv.size());
  for (int64_t j = 0; j < K; ++j) {
    TORCH_CHECK(kp[j] >= 0 && kp[j] < C, op, ": keep[", j, "]=", kp[j], " is out of range [0, ", C, ")");
    TORCH_CHECK(j == 0 || kp[j] > kp[j - 1], op, ": keep must be strictly increasing (keep[", j, "]=",
                kp[j], " after ", kp[j - 1], ")");
  }
  if (tensor.numel() == 0 || K == C) return;
  const int64_t es = tensor.element_size();
  const int64_t outer = dim == 0 ? 1 : tensor.size(0);
  const int64_t inner = tensor.numel() / (outer * C) * es;  // bytes per channel block
  char* p = static_cast<char*>(tensor.data_ptr());
  for (int64_t o = 0; o < outer; ++o)
    for (int64_t j = 0; j < K; ++j) {
      char* dst = p + (o * K + j) * inner;
      const char* src = p + (o * C + kp[j]) * inner;
      if (dst != src) std::memmove(dst, src, inner);
    }
}

}  // namespace

TORCH_LIBRARY_IMPL(chase_ext, CPU, m) { m.impl("gather_channels_", &gather_channels); }

}  // namespace chase_ext::cpu
