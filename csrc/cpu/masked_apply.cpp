// masked_apply_ on CPU: tensors[j] <- where(masks[owner[j]], tensors[j], 0), one call for
// the weights and every same-shape optimizer state of the model. Runs over flat storage:
// each tensor is laid out like its mask (common/masked_apply_checks.h), in any dense layout.
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "common/masked_apply_checks.h"
#include "cpu/mask_kernels.h"
#include "cpu/multi_tensor.h"

namespace chase_ext::cpu {
namespace {

// Elements per piece: the tensors sharing a mask are zeroed piece by piece, so each
// piece of the mask (4 KiB) is read from memory once and then hit in L1.
constexpr int64_t kPiece = 4096;

void masked_apply(at::TensorList tensors, at::TensorList masks, c10::IntArrayRef owner) {
  const char* op = "chase_ext.masked_apply_";
  check_masked_apply_args(op, tensors, masks, owner);
  const MaskKernels& kernels = mask_kernels();
  struct Target {
    char* data;
    int64_t elem;
    ZeroFn zero;
  };
  std::vector<std::vector<Target>> by_mask(masks.size());
  for (size_t j = 0; j < tensors.size(); ++j) {
    const int64_t elem = tensors[j].element_size();
    const ZeroFn zero = kernels.zero_fn(elem);
    TORCH_CHECK(zero != nullptr, op, ": tensors[", j, "] has ", elem, "-byte elements, not 1, 2, 4 or 8");
    by_mask[owner[j]].push_back({static_cast<char*>(tensors[j].data_ptr()), elem, zero});
  }
  for (size_t i = 0; i < masks.size(); ++i) {
    const auto& targets = by_mask[i];
    if (targets.empty()) continue;
    const uint8_t* m = reinterpret_cast<const uint8_t*>(masks[i].data_ptr<bool>());
    at::parallel_for(0, masks[i].numel(), 8 * kPiece, [&](int64_t b, int64_t e) {
      for (int64_t p = b; p < e; p += kPiece) {
        const int64_t n = std::min(kPiece, e - p);
        for (const Target& t : targets) t.zero(t.data + p * t.elem, m + p, n);
      }
    });
  }
}

}  // namespace

TORCH_LIBRARY_IMPL(chase_ext, CPU, m) { m.impl("masked_apply_", &masked_apply); }

}  // namespace chase_ext::cpu
