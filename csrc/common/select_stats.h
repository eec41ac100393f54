// How often the CUDA mask update's bracketed select (CHASE_EXT_CUDA_SELECT=bracket) found
// both selections itself, and how often it fell back to the radix select: results are
// the same either way, so tests and benchmarks read these to see which path ran.
#pragma once
#include <cstdint>

namespace chase_ext::cuda {

struct BracketStats {
  int64_t fast = 0, fallback = 0;
};

BracketStats bracket_stats();  // since the library was loaded

}  // namespace chase_ext::cuda
