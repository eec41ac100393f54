// Which path the CUDA mask update's selections took: results are the same either way, so
// tests and benchmarks read these counts to see which path ran. Bracketed select
// (CHASE_EXT_CUDA_SELECT=bracket): calls it finished itself / handed to the radix select.
// Compacting select (CHASE_EXT_CUDA_SELECT=compact): selections it made / handed to the
// radix select (lists too large, or 2^32 slots and more).
#pragma once
#include <cstdint>

namespace chase_ext::cuda {

struct SelectStats {
  int64_t bracket_fast = 0, bracket_fallback = 0, compact = 0, compact_fallback = 0;
};

SelectStats select_stats();  // since the library was loaded

}  // namespace chase_ext::cuda
