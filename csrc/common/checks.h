// Argument validation shared by the CPU and CUDA implementations. Every check runs
// before any tensor is written, and every message names the offending argument.
#pragma once
#include <ATen/ATen.h>

#include <algorithm>
#include <cstdint>
#include <vector>

namespace chase_ext {

using TensorList = c10::ArrayRef<at::Tensor>;

// float32, float16 or bfloat16, one dtype for the whole list, tensor by tensor (the order
// of the reference's checks, so both name the same tensor). contiguous: each tensor must
// be contiguous (else any layout passes here; mask_update_ and channel_stats check their
// layouts with check_rows_dense / check_laid_out_like).
inline void check_float_list(const char* op, const char* name, TensorList ts, bool contiguous = true) {
  for (size_t i = 0; i < ts.size(); ++i) {
    auto dt = ts[i].scalar_type();
    TORCH_CHECK(dt == at::kFloat || dt == at::kHalf || dt == at::kBFloat16, op, ": ", name, "[", i,
                "] must be float32, float16 or bfloat16, got ", dt);
    TORCH_CHECK(!contiguous || ts[i].is_contiguous(), op, ": ", name, "[", i, "] must be contiguous");
    TORCH_CHECK(dt == ts[0].scalar_type(), op, ": ", name, "[", i, "] has dtype ", dt, " but ", name, "[0] has ",
                ts[0].scalar_type(), " (one dtype per list)");
  }
}

// Same strides on every dim of more than one entry (the stride of a size-1 dim is never
// used): element (i, j, ...) sits at the same offset in both. Empty tensors address
// nothing, so any two of them agree (torch calls every empty tensor contiguous).
inline bool same_flat_layout(const at::Tensor& a, const at::Tensor& b) {
  if (a.numel() == 0 && b.numel() == 0) return true;
  if (a.dim() != b.dim()) return false;
  for (int64_t d = 0; d < a.dim(); ++d)
    if (a.size(d) > 1 && a.stride(d) != b.stride(d)) return false;
  return true;
}

// Covers its memory densely with dim 0 outermost, so each row (output channel) is one
// block of memory, its slots in any order: contiguous, channels_last, or any other order
// of the dims after the first.
inline bool rows_dense(const at::Tensor& t) {
  if (t.numel() == 0 || t.dim() == 0) return true;
  return t.is_non_overlapping_and_dense() && (t.size(0) == 1 || t.stride(0) * t.size(0) == t.numel());
}

inline void check_rows_dense(const char* op, const char* name, TensorList ts) {
  for (size_t i = 0; i < ts.size(); ++i)
    TORCH_CHECK(rows_dense(ts[i]), op, ": ", name, "[", i, "] must cover its memory densely with dim 0 outermost "
                "(contiguous, channels_last or another order of the other dims), got strides ", ts[i].strides(),
                " for shape ", ts[i].sizes());
}

// The layout rules the messages name (chase_ext/reference.py words them alike).
constexpr const char* kLikeWeight = "each score, mask and state must be laid out in memory like its weight";
constexpr const char* kLikeMask = "a tensor must be laid out in memory like its mask";
constexpr const char* kMaskLikeWeight = "each mask must be laid out in memory like its weight";

// name[i] laid out in memory like ref_name[r] (shapes were checked equal before).
inline void check_laid_out_like(const char* op, const char* name, const at::Tensor& t, size_t i,
                                const char* ref_name, const at::Tensor& ref, int64_t r,
                                const char* rule = kLikeWeight) {
  TORCH_CHECK(same_flat_layout(t, ref), op, ": ", name, "[", i, "] has strides ", t.strides(), " but ", ref_name,
              "[", r, "] has strides ", ref.strides(), "; ", rule);
}

inline void check_like(const char* op, const char* name, TensorList ts, const char* ref_name,
                       TensorList ref) {
  TORCH_CHECK(ts.size() == ref.size(), op, ": ", name, " has ", ts.size(), " tensors but ", ref_name,
              " has ", ref.size());
  for (size_t i = 0; i < ts.size(); ++i) {
    TORCH_CHECK(ts[i].sizes() == ref[i].sizes(), op, ": ", name, "[", i, "] has shape ", ts[i].sizes(),
                " but ", ref_name, "[", i, "] has shape ", ref[i].sizes());
    TORCH_CHECK(ts[i].device() == ref[i].device(), op, ": ", name, "[", i, "] is on ", ts[i].device(),
                " but ", ref_name, "[", i, "] is on ", ref[i].device());
  }
}

// like_ref: each mask laid out like its ref tensor (else contiguous), `rule` naming why
inline void check_masks(const char* op, TensorList masks, TensorList ref, const char* ref_name,
                        bool like_ref = false, const char* rule = kLikeWeight) {
  check_like(op, "masks", masks, ref_name, ref);
  for (size_t i = 0; i < masks.size(); ++i) {
    TORCH_CHECK(masks[i].scalar_type() == at::kBool, op, ": masks[", i, "] must be bool, got ",
                masks[i].scalar_type());
    if (like_ref) {
      check_laid_out_like(op, "masks", masks[i], i, ref_name, ref[i], i, rule);
    } else {
      TORCH_CHECK(masks[i].is_contiguous(), op, ": masks[", i, "] must be contiguous");
    }
  }
}

inline void check_devices(const char* op, const char* name, TensorList ts, const at::Device& dev) {
  for (size_t i = 0; i < ts.size(); ++i)
    TORCH_CHECK(ts[i].device() == dev, op, ": ", name, "[", i, "] is on ", ts[i].device(), " but ",
                "the other tensors are on ", dev);
}

// live_rows / live_cols: empty (all live) or one bool vector per weight of shape[0] / shape[1].
inline void check_live(const char* op, const char* name, TensorList live, TensorList ref, int dim) {
  if (live.empty()) return;
  TORCH_CHECK(live.size() == ref.size(), op, ": ", name, " has ", live.size(),
              " tensors; expected 0 (all live) or ", ref.size());
  for (size_t i = 0; i < live.size(); ++i) {
    TORCH_CHECK(ref[i].dim() > dim, op, ": ", name, "[", i, "] given for a tensor of ", ref[i].dim(),
                " dims");
    TORCH_CHECK(live[i].scalar_type() == at::kBool && live[i].dim() == 1 &&
                    live[i].numel() == ref[i].size(dim) && live[i].is_contiguous(),
                op, ": ", name, "[", i, "] must be a contiguous 1-D bool tensor of ", ref[i].size(dim),
                " entries, got ", live[i].scalar_type(), " of shape ", live[i].sizes());
    TORCH_CHECK(live[i].device() == ref[i].device(), op, ": ", name, "[", i, "] is on ",
                live[i].device(), " but its tensor is on ", ref[i].device());
  }
}

inline void check_counts(const char* op, const char* name, c10::IntArrayRef counts, size_t n) {
  TORCH_CHECK(counts.size() == 1 || counts.size() == n, op, ": ", name, " must hold 1 count (global)",
              " or ", n, " (one per tensor), got ", counts.size());
  for (size_t i = 0; i < counts.size(); ++i)
    TORCH_CHECK(counts[i] >= 0, op, ": ", name, "[", i, "]=", counts[i], " is negative");
}

inline void check_owner(const char* op, TensorList states, c10::IntArrayRef owner, TensorList weights,
                        const char* owner_name) {
  TORCH_CHECK(owner.size() == states.size(), op, ": ", owner_name, " has ", owner.size(),
              " entries but there are ", states.size(), " state tensors");
  for (size_t i = 0; i < states.size(); ++i) {
    TORCH_CHECK(owner[i] >= 0 && owner[i] < (int64_t)weights.size(), op, ": ", owner_name, "[", i,
                "]=", owner[i], " is out of range [0, ", weights.size(), ")");
    const auto& w = weights[owner[i]];
    TORCH_CHECK(states[i].sizes() == w.sizes(), op, ": states[", i, "] has shape ", states[i].sizes(),
                " but its owner has shape ", w.sizes());
    TORCH_CHECK(states[i].device() == w.device(), op, ": states[", i, "] is on ", states[i].device(),
                " but its owner is on ", w.device());
    check_laid_out_like(op, "states", states[i], i, "weights", w, owner[i]);
    TORCH_CHECK(states[i].is_floating_point(), op, ": states[", i, "] must be floating point, got ",
                states[i].scalar_type());
  }
}

// The bytes of one dense tensor argument, for the aliasing check.
struct Span {
  uintptr_t lo, hi;
  const char* name;
  size_t index;
  bool written;
};

inline void add_spans(std::vector<Span>& spans, const char* name, TensorList ts, bool written) {
  for (size_t i = 0; i < ts.size(); ++i) {
    if (ts[i].numel() == 0) continue;
    const auto lo = reinterpret_cast<uintptr_t>(ts[i].data_ptr());
    spans.push_back({lo, lo + static_cast<uintptr_t>(ts[i].numel() * ts[i].element_size()), name, i, written});
  }
}

// A written argument may share no byte with any other argument: the kernels write tensor
// by tensor, so an alias would let one tensor's writes change what the next one reads
// (and make the result depend on the order). Read-only arguments may overlap each other.
// Called after the layout checks: each tensor is dense, so its bytes are one range from
// data_ptr (strides are >= 0).
inline void check_no_alias(const char* op, std::vector<Span> spans) {
  std::sort(spans.begin(), spans.end(), [](const Span& a, const Span& b) { return a.lo < b.lo; });
  for (size_t a = 0; a < spans.size(); ++a)
    for (size_t b = a + 1; b < spans.size() && spans[b].lo < spans[a].hi; ++b)
      TORCH_CHECK(!spans[a].written && !spans[b].written, op, ": ", spans[b].name, "[", spans[b].index,
                  "] shares memory with ", spans[a].name, "[", spans[a].index,
                  "] and one of them is written; pass separate tensors");
}

// Every argument check of channel_stats (CPU and CUDA): each weight rows-dense, its mask
// laid out like it (the order of the reference's checks).
inline void check_channel_stats_args(const char* op, TensorList weights, TensorList masks) {
  check_float_list(op, "weights", weights, false);
  check_rows_dense(op, "weights", weights);
  check_masks(op, masks, weights, "weights", true, kMaskLikeWeight);
}

// Every argument check of mask_update_ (CPU and CUDA), before anything is read or written.
// Layouts: each weight rows-dense, its score, mask and states laid out like it.
inline void check_mask_update_args(const char* op, TensorList weights, TensorList masks, TensorList scores,
                                   TensorList live_rows, TensorList live_cols, TensorList states,
                                   c10::IntArrayRef state_owner, c10::IntArrayRef prune_counts,
                                   c10::IntArrayRef grow_counts) {
  check_float_list(op, "weights", weights, false);
  check_rows_dense(op, "weights", weights);
  check_float_list(op, "scores", scores, false);
  check_like(op, "scores", scores, "weights", weights);
  for (size_t i = 0; i < scores.size(); ++i) check_laid_out_like(op, "scores", scores[i], i, "weights", weights[i], i);
  check_masks(op, masks, weights, "weights", true);
  check_live(op, "live_rows", live_rows, weights, 0);
  check_live(op, "live_cols", live_cols, weights, 1);
  check_owner(op, states, state_owner, weights, "state_owner");
  check_counts(op, "prune_counts", prune_counts, weights.size());
  check_counts(op, "grow_counts", grow_counts, weights.size());
  TORCH_CHECK(grow_counts.size() == prune_counts.size(), op, ": prune_counts has ", prune_counts.size(),
              " entries but grow_counts has ", grow_counts.size());
  std::vector<Span> spans;
  add_spans(spans, "weights", weights, true);
  add_spans(spans, "masks", masks, true);
  add_spans(spans, "states", states, true);
  add_spans(spans, "scores", scores, false);
  add_spans(spans, "live_rows", live_rows, false);
  add_spans(spans, "live_cols", live_cols, false);
  check_no_alias(op, std::move(spans));
}

// The device-independent argument checks of gather_channels_ (CPU and CUDA).
inline void check_gather_args(const char* op, const at::Tensor& tensor, const at::Tensor& keep, int64_t dim) {
  TORCH_CHECK(dim == 0 || dim == 1, op, ": dim must be 0 or 1, got ", dim);
  TORCH_CHECK(tensor.dim() > dim, op, ": tensor has ", tensor.dim(), " dims, cannot gather along dim ", dim);
  TORCH_CHECK(tensor.is_contiguous(), op, ": tensor must be contiguous");
  TORCH_CHECK(keep.scalar_type() == at::kLong && keep.dim() == 1, op,
              ": keep must be a 1-D int64 tensor, got ", keep.scalar_type(), " of shape ", keep.sizes());
}

}  // namespace chase_ext
