// Brackets for the one-pass selections of mask_update_ (host code, shared by the CPU and
// CUDA kernels): from a deterministic sample of the slots, a key interval that very
// likely holds the prune threshold and one that holds the grow threshold. A bracket only
// decides how fast the exact answer is found (a miss falls back to the multi-pass radix
// select), never what it is.
#pragma once
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <utility>
#include <vector>

#include "common/keys.h"

namespace chase_ext {

struct Bracket {
  uint32_t lo = 0, hi = kKeyMax;
};

// A bracket around the q-quantile of the sampled keys, wide enough for sampling error.
// `sample` is reordered.
inline Bracket bracket_from_sample(std::vector<uint32_t>& sample, double q) {
  Bracket b;
  const int64_t n = (int64_t)sample.size();
  if (n == 0) return b;
  q = std::min(1.0, std::max(0.0, q));
  const double m = 5.0 * std::sqrt(q * (1 - q) / n) + 4.0 / n + 1e-3;
  const int64_t lo_rank = (int64_t)std::floor((q - m) * n), hi_rank = (int64_t)std::ceil((q + m) * n);
  if (lo_rank > 0) {
    std::nth_element(sample.begin(), sample.begin() + lo_rank, sample.end());
    b.lo = sample[lo_rank];
  }
  if (hi_rank < n - 1) {
    std::nth_element(sample.begin(), sample.begin() + hi_rank, sample.end());
    b.hi = sample[hi_rank];
  }
  return b;
}

// Prune bracket (keys of |w|, smaller first) and grow bracket (flipped keys of |score|)
// for selections of kp and kg slots, from the sampled live slots: `active` holds (prune
// key, flipped grow key) of active ones, `inactive` the flipped grow keys of the others;
// `f` is the sampled share of all slots. Active samples the prune is likely to take join
// the grow sample (pruned slots can be grown back). Both vectors are reordered.
inline std::pair<Bracket, Bracket> sample_brackets(std::vector<std::pair<uint32_t, uint32_t>>& active,
                                                   std::vector<uint32_t>& inactive, int64_t kp, int64_t kg,
                                                   double f) {
  Bracket bp, bg;
  std::vector<uint32_t>& sg = inactive;
  if (kp == 0) {
    bp = {0, 0};  // abs keys are >= 2^31: nothing below or inside
  } else {
    std::vector<uint32_t> spk;
    spk.reserve(active.size());
    for (const auto& a : active) spk.push_back(a.first);
    const double qp = spk.empty() ? 0.5 : kp * f / spk.size();
    std::vector<uint32_t> tmp = spk;
    bp = bracket_from_sample(tmp, qp);
    const int64_t r = std::min<int64_t>((int64_t)spk.size() - 1, (int64_t)std::llround(qp * spk.size()));
    if (r >= 0) {
      std::nth_element(spk.begin(), spk.begin() + r, spk.end());
      for (const auto& a : active)
        if (a.first <= spk[r]) sg.push_back(a.second);
    }
  }
  if (kg == 0) {
    bg = {0, 0};  // flipped keys: "below 0" is empty; key 0 (= +NaN) is rejected anyway
  } else {
    bg = bracket_from_sample(sg, sg.empty() ? 0.5 : kg * f / sg.size());
  }
  return {bp, bg};
}

}  // namespace chase_ext
