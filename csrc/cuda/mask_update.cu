// mask_update_ on CUDA: prune by |w|, grow by |score|, rewrite masks, zero what changed,
// and emit per-row active counts and sum |w|. Selections first (read only; the first
// pass of either select also validates everything), then one writing pass (rows.cuh),
// so every error is raised before anything is written. Selections by the multi-pass
// radix select (radix_select.cuh, default); with CHASE_EXT_CUDA_SELECT=compact by the radix
// select with its candidates compacted after the first pass (compact_select.cuh: two
// full passes and one host wait per selection instead of five and six); with
// CHASE_EXT_CUDA_SELECT=bracket by the one-pass bracketed select (bracket_select.cuh).
// The radix select is the others' fallback.
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <string>
#include <vector>

#include "common/select_stats.h"
#include "cuda/bracket_select.cuh"
#include "cuda/compact_select.cuh"
#include "cuda/radix_select.cuh"
#include "cuda/rows.cuh"

namespace chase_ext::cuda {
namespace {

constexpr const char* kOp = "chase_ext.mask_update_";

// CHASE_EXT_CUDA_SELECT: "radix" (default) selects by the multi-pass radix select;
// "compact" by the compacting select (compact_select.cuh; the radix select where the lists
// would be too large); "bracket" tries the one-pass bracketed select first (global
// scope), with the radix select as its exact fallback. All give the same result.
enum class SelectMode { kRadix, kCompact, kBracket };

SelectMode select_mode() {
  const char* e = std::getenv("CHASE_EXT_CUDA_SELECT");
  const std::string mode = e && *e ? e : "radix";
  TORCH_CHECK(mode == "radix" || mode == "compact" || mode == "bracket", kOp, ": CHASE_EXT_CUDA_SELECT=", mode,
              " is not known (radix, compact or bracket)");
  return mode == "compact" ? SelectMode::kCompact : mode == "bracket" ? SelectMode::kBracket : SelectMode::kRadix;
}

std::atomic<int64_t> bracket_fast{0}, bracket_fallback{0}, compact_made{0}, compact_fallback{0};  // select_stats.h

// Prune candidates: active live slots, key |w|. Pass 0 also flags non-finite weights
// (bit 0) and scores (bit 1) anywhere, and counts inactive live slots (grow candidates
// before the prune adds its own).
template <class W, class S>
struct PruneSrc {
  __device__ bool cand(const Desc& d, int64_t i, bool live, uint32_t& key) const {
    if (!live || !d.mask[i]) return false;
    key = sortable_key(load<W>(d.w, i), true);
    return true;
  }
  __device__ unsigned bad(const Desc& d, int64_t i) const {
    return (finite(load<W>(d.w, i)) ? 0u : 1u) | (finite(load<S>(d.s, i)) ? 0u : 2u);
  }
  __device__ bool other(const Desc& d, int64_t i, bool live) const { return live && !d.mask[i]; }
};

// Grow candidates: live slots inactive after the prune (inactive, or just pruned); key
// ~|score| (largest first).
template <class W, class S>
struct GrowSrc {
  const Selection* psel;  // per scope
  __device__ bool cand(const Desc& d, int64_t i, bool live, uint32_t& key) const {
    if (!live) return false;
    if (d.mask[i]) {
      const Selection p = psel[d.scope];
      if (!in_selection(sortable_key(load<W>(d.w, i), true), d.offset + i, p.key, p.cutoff, false)) return false;
    }
    key = ~sortable_key(load<S>(d.s, i), true);
    return true;
  }
  __device__ unsigned bad(const Desc&, int64_t) const { return 0; }
  __device__ bool other(const Desc&, int64_t, bool) const { return false; }
};

template <class W, class S>
std::tuple<at::Tensor, at::Tensor> run(MultiTensor& mt, const at::Device& dev, at::TensorList states,
                                       c10::IntArrayRef owner, c10::IntArrayRef prune_counts,
                                       c10::IntArrayRef grow_counts) {
  const int n = mt.n();
  const bool global = prune_counts.size() == 1;
  const int scopes = global ? 1 : n;
  auto name = [&](const char* list, int s) {
    return global ? std::string(list) : std::string(list) + "[" + std::to_string(s) + "]";
  };

  // States grouped by owner: weight t zeroes states [state_begin, state_end).
  std::vector<StateRef> st;
  for (int t = 0; t < n; ++t) {
    mt.d[t].state_begin = (int32_t)st.size();
    for (size_t j = 0; j < states.size(); ++j)
      if (owner[j] == t) st.push_back({states[j].data_ptr(), (int64_t)states[j].element_size()});
    mt.d[t].state_end = (int32_t)st.size();
  }
  const auto dd = upload(mt.d, dev);
  const Desc* ds = dev_ptr<Desc>(dd);

  const std::vector<int64_t> kp(prune_counts.begin(), prune_counts.end());
  const std::vector<int64_t> kg(grow_counts.begin(), grow_counts.end());
  // every check on what the first read-only pass learned: raised before anything is written
  auto check = [&](const FirstPass& fp) {
    TORCH_CHECK(!(fp.bad & 1u), kOp, ": weights has non-finite values");
    TORCH_CHECK(!(fp.bad & 2u), kOp, ": scores has non-finite values");
    for (int s = 0; s < scopes; ++s)
      TORCH_CHECK(kp[s] <= fp.cand[s], kOp, ": ", name("prune_counts", s), "=", kp[s], " is out of range: only ",
                  fp.cand[s], " candidate slots");
    // grow candidates: inactive live slots plus the kp[s] pruned ones
    for (int s = 0; s < scopes; ++s)
      TORCH_CHECK(kg[s] <= fp.other[s] + kp[s], kOp, ": ", name("grow_counts", s), "=", kg[s],
                  " is out of range: only ", fp.other[s] + kp[s], " candidate slots");
  };
  int64_t total = 0;
  for (const Desc& d : mt.d) total += d.numel;
  // device arrays: prune selection(s) of every scope, then grow selection(s)
  at::Tensor pd, gd;
  const Selection* pp = nullptr;
  const Selection* gp = nullptr;
  std::optional<at::Tensor> fast;
  const SelectMode mode = select_mode();
  if (global && total < ((int64_t)1 << 32) && mode == SelectMode::kBracket) {
    fast = bracketed_select<W, S>(mt, ds, dev, total, kp[0], kg[0], check);
    ++(fast ? bracket_fast : bracket_fallback);
  }
  if (fast) {
    pp = dev_ptr<Selection>(*fast);
    gp = pp + 1;
  } else {
    // compact mode: the compacting select where it fits (entries carry 32-bit global
    // indices), the radix select otherwise
    const bool compact = mode == SelectMode::kCompact && total <= (int64_t)UINT32_MAX;
    // the two lists may take up to twice the weights' float32 bytes (transient; 16 B per
    // entry): lists of up to half of all slots
    const int64_t list_bytes = 2 * total * (int64_t)sizeof(float);
    const std::function<void(const FirstPass&)> checks = check;
    std::optional<at::Tensor> sel;
    auto count = [&] { if (mode == SelectMode::kCompact) ++(sel ? compact_made : compact_fallback); };
    if (compact) sel = compact_select(mt, ds, dev, scopes, PruneSrc<W, S>{}, kp, false, &checks, list_bytes);
    count();
    pd = sel ? *sel : upload(radix_select(mt, ds, dev, scopes, PruneSrc<W, S>{}, kp, false, check), dev);
    const GrowSrc<W, S> gsrc{dev_ptr<Selection>(pd)};
    sel.reset();
    if (compact) sel = compact_select(mt, ds, dev, scopes, gsrc, kg, true, nullptr, list_bytes);
    count();
    gd = sel ? *sel : upload(radix_select(mt, ds, dev, scopes, gsrc, kg, true, [&](const FirstPass& fp) {
      for (int s = 0; s < scopes; ++s)  // checked above already; a mismatch is a bug here
        TORCH_CHECK(kg[s] <= fp.cand[s], kOp, ": internal: grow candidates miscounted");
    }), dev);
    pp = dev_ptr<Selection>(pd);
    gp = dev_ptr<Selection>(gd);
  }
  const auto sd = upload(st, dev);

  auto opts = at::TensorOptions().device(dev);
  auto counts = at::zeros({mt.rows}, opts.dtype(at::kLong));
  auto sums = at::zeros({mt.rows}, opts.dtype(at::kFloat));
  launch_rows<W, S, true>(mt, ds, pp, gp, dev_ptr<StateRef>(sd), counts, sums);
  return {counts, sums};
}

std::tuple<at::Tensor, at::Tensor> mask_update(at::TensorList weights, at::TensorList masks, at::TensorList scores,
                                               at::TensorList live_rows, at::TensorList live_cols,
                                               at::TensorList states, c10::IntArrayRef state_owner,
                                               c10::IntArrayRef prune_counts, c10::IntArrayRef grow_counts) {
  const char* op = kOp;
  check_mask_update_args(op, weights, masks, scores, live_rows, live_cols, states, state_owner, prune_counts,
                         grow_counts);
  if (weights.empty()) {  // not reachable through the dispatcher, kept for symmetry with CPU
    TORCH_CHECK(prune_counts.empty() || (prune_counts[0] == 0 && grow_counts[0] == 0), op, ": counts given for an empty list of weights");
    return {at::zeros({0}, at::kLong), at::zeros({0}, at::kFloat)};
  }
  const at::Device dev = weights[0].device();
  check_devices(op, "weights", weights, dev);
  TORCH_CHECK(dev.is_cuda(), op, ": weights[0] is on ", dev, ", expected a CUDA device");
  const c10::cuda::CUDAGuard guard(dev);
  // The kernels address slots by their row-major index, so other rows-dense layouts
  // (channels_last) go through contiguous copies, written back once the kernels returned
  // (a call that raises has written nothing, and nothing is copied back). On a GPU the
  // copies cost little beside the selection; the CPU kernel walks such layouts in place.
  auto all_contiguous = [](at::TensorList ts) {
    return std::all_of(ts.begin(), ts.end(), [](const at::Tensor& t) { return t.is_contiguous(); });
  };
  if (!all_contiguous(weights) || !all_contiguous(masks) || !all_contiguous(scores) || !all_contiguous(states)) {
    auto staged = [](at::TensorList ts) {
      std::vector<at::Tensor> v;
      for (const at::Tensor& t : ts) v.push_back(t.contiguous());
      return v;
    };
    auto w = staged(weights), m = staged(masks), sc = staged(scores), st = staged(states);
    auto out = mask_update(w, m, sc, live_rows, live_cols, st, state_owner, prune_counts, grow_counts);
    auto write_back = [](at::TensorList orig, const std::vector<at::Tensor>& copy) {
      for (size_t i = 0; i < copy.size(); ++i)
        if (!orig[i].is_contiguous()) orig[i].copy_(copy[i]);
    };
    write_back(weights, w);
    write_back(masks, m);
    write_back(states, st);
    return out;
  }

  MultiTensor mt = make_multi(weights, live_rows, live_cols, prune_counts.size() != 1);
  for (int t = 0; t < mt.n(); ++t) {
    mt.d[t].s = scores[t].data_ptr();
    mt.d[t].mask = masks[t].data_ptr<bool>();
  }
  std::tuple<at::Tensor, at::Tensor> out;
  dispatch_float(weights[0].scalar_type(), [&](auto wtag) {
    dispatch_float(scores[0].scalar_type(), [&](auto stag) {
      out = run<decltype(wtag), decltype(stag)>(mt, dev, states, state_owner, prune_counts, grow_counts);
    });
  });
  return out;
}

}  // namespace

SelectStats select_stats() {
  return {bracket_fast.load(), bracket_fallback.load(), compact_made.load(), compact_fallback.load()};
}

TORCH_LIBRARY_IMPL(chase_ext, CUDA, m) { m.impl("mask_update_", &mask_update); }

}  // namespace chase_ext::cuda
