// Exact selection in (about) one pass: a deterministic sample brackets the k-th
// key in [lo, hi] (common/bracket.h); one pass counts the candidates below lo and
// collects those inside the bracket; the k-th is then found by radix select over the small buffer. When the
// sample misses (the k-th lies outside the bracket) the caller falls back to the
// multi-pass radix select, so results never depend on the sample, only speed does.
#pragma once
#include <algorithm>
#include <cmath>
#include <functional>
#include <optional>
#include <vector>

#include "common/bracket.h"
#include "cpu/multi_tensor.h"

namespace chase_ext::cpu {

struct Cand {
  uint32_t key;  // in "smaller is better" order
  int64_t gidx;
};

// The need-th smallest (1-based) of the buffer by key, ties by global index, by radix
// select over the keys (16 + 16 bits). Returns (key, cutoff) in the buffer's key order.
inline Selection select_in_buffer(const std::vector<Cand>& buf, int64_t need) {
  constexpr int B = 1 << 16;
  std::vector<int64_t> h(B, 0);
  for (const Cand& c : buf) ++h[c.key >> 16];
  uint32_t hi = 0;
  for (; hi < (uint32_t)B; ++hi) {
    if (need <= h[hi]) break;
    need -= h[hi];
  }
  std::fill(h.begin(), h.end(), 0);
  for (const Cand& c : buf)
    if ((c.key >> 16) == hi) ++h[c.key & 0xFFFF];
  uint32_t lo = 0;
  for (; lo < (uint32_t)B; ++lo) {
    if (need <= h[lo]) break;
    need -= h[lo];
  }
  const uint32_t key = (hi << 16) | lo;
  std::vector<int64_t> ties;
  for (const Cand& c : buf)
    if (c.key == key) ties.push_back(c.gidx);
  std::nth_element(ties.begin(), ties.begin() + (need - 1), ties.end());
  return {key, ties[need - 1] + 1};
}

// Resolves a selection of k from (count below the bracket, buffer inside it); nullopt
// when the bracket missed the k-th.
inline std::optional<Selection> resolve(int64_t k, int64_t below, const std::vector<Cand>& buf, bool largest) {
  if (k == 0) return Selection{largest ? kKeyMax : 0u, 0};
  const int64_t need = k - below;
  if (need <= 0 || need > (int64_t)buf.size()) return std::nullopt;
  Selection s = select_in_buffer(buf, need);
  if (largest) s.key = ~s.key;
  return s;
}

// The deterministic sample: runs of kSampleRun consecutive slots (whole cache lines,
// so few cache misses), one run every `stride * kSampleRun` slots of memory, tensor after
// tensor (memory order, which only decides the brackets, never the result).
// Calls f(tensor, storage index, live) for each sampled slot.
constexpr int64_t kSampleRun = 16;

inline void sample_slots(const std::vector<Layout>& L, const std::vector<int>& tensors, int64_t stride,
                         const std::function<void(int, int64_t, bool)>& f) {
  const int64_t step = stride * kSampleRun;
  int64_t next = 0, base = 0;
  for (int t : tensors) {
    const Layout& l = L[t];
    for (int64_t s = next - base; s < l.numel; s += step) {
      for (int64_t i = s, e = std::min(s + kSampleRun, l.numel); i < e; ++i) {
        bool live = !l.live_row || l.live_row[i / l.row_stride];
        if (l.live_col) live = live && l.slot_live[i % l.row_stride];
        f(t, i, live);
      }
      next = base + s + step;
    }
    base += l.numel;
    next = std::max(next, base);
  }
}

}  // namespace chase_ext::cpu
