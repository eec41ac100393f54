// Argument checks of masked_apply_ (CPU and CUDA), before anything is written; every
// message names the offending argument.
//
// masked_apply_ is elementwise, so it runs over flat storage: a mask that covers its
// memory densely (no gaps, no overlaps: contiguous, channels_last, any permutation) and a
// tensor laid out like it (same strides wherever a dim has more than one entry) hold
// element (i, j, ...) at the same offset, so slot s of the mask's storage masks slot s of
// the tensor's. A channels_last model is thus masked in place, as fast as a contiguous one.
#pragma once
#include <ATen/ATen.h>

#include <vector>

#include "common/checks.h"

namespace chase_ext {

inline void check_masked_apply_args(const char* op, TensorList tensors, TensorList masks, c10::IntArrayRef owner) {
  for (size_t i = 0; i < masks.size(); ++i) {
    TORCH_CHECK(masks[i].scalar_type() == at::kBool, op, ": masks[", i, "] must be bool, got ",
                masks[i].scalar_type());
    TORCH_CHECK(masks[i].is_non_overlapping_and_dense(), op, ": masks[", i, "] must cover its memory densely "
                "(contiguous, channels_last or another permutation; no gaps or overlaps), got strides ",
                masks[i].strides(), " for shape ", masks[i].sizes());
  }
  TORCH_CHECK(owner.size() == tensors.size(), op, ": owner has ", owner.size(), " entries but there are ",
              tensors.size(), " tensors");
  for (size_t j = 0; j < tensors.size(); ++j) {
    TORCH_CHECK(owner[j] >= 0 && owner[j] < (int64_t)masks.size(), op, ": owner[", j, "]=", owner[j],
                " is out of range [0, ", masks.size(), ")");
    const auto& m = masks[owner[j]];
    TORCH_CHECK(tensors[j].sizes() == m.sizes(), op, ": tensors[", j, "] has shape ", tensors[j].sizes(),
                " but masks[", owner[j], "] has shape ", m.sizes());
    TORCH_CHECK(tensors[j].device() == m.device(), op, ": tensors[", j, "] is on ", tensors[j].device(),
                " but masks[", owner[j], "] is on ", m.device());
    check_laid_out_like(op, "tensors", tensors[j], j, "masks", m, owner[j], kLikeMask);
    TORCH_CHECK(tensors[j].is_floating_point(), op, ": tensors[", j, "] must be floating point, got ",
                tensors[j].scalar_type());
  }
  // Dense tensors: each one's bytes are one range starting at data_ptr (strides are >= 0).
  std::vector<Span> spans;
  add_spans(spans, "tensors", tensors, true);
  add_spans(spans, "masks", masks, false);
  check_no_alias(op, std::move(spans));
}

// The fused optimizer steps (masked_sgd_, masked_adam_) take float32 CPU tensors only.
inline void check_float32_cpu(const char* op, const char* name, TensorList ts) {
  for (size_t i = 0; i < ts.size(); ++i) {
    TORCH_CHECK(ts[i].scalar_type() == at::kFloat, op, ": ", name, "[", i, "] must be float32, got ",
                ts[i].scalar_type());
    TORCH_CHECK(ts[i].device().is_cpu(), op, ": ", name, "[", i, "] must be on the CPU, got ", ts[i].device());
  }
}

}  // namespace chase_ext
