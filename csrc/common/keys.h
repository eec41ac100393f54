// Float -> order-preserving unsigned key, shared by CPU and CUDA kernels.
#pragma once
#include <c10/macros/Macros.h>
#include <cstdint>
#include <cstring>

namespace chase_ext {

constexpr uint32_t kKeyMax = 0xFFFFFFFFu;

// Order of the result equals the float order of v (or |v|); -0.0 maps like +0.0.
// Pure bit operations, so flush-to-zero or fast-math builds cannot change a key.
C10_HOST_DEVICE inline uint32_t sortable_key(float v, bool absolute) {
  uint32_t bits;
#if defined(__CUDA_ARCH__)
  bits = __float_as_uint(v);
#else
  std::memcpy(&bits, &v, sizeof(bits));
#endif
  if (absolute) bits &= 0x7FFFFFFFu;
  if (bits == 0x80000000u) bits = 0u;  // -0.0 -> +0.0
  return (bits & 0x80000000u) ? ~bits : (bits | 0x80000000u);
}

// Membership in a selection (key, cutoff): strictly better key, or equal key and a
// global index below cutoff (ties go to the lower index).
C10_HOST_DEVICE inline bool in_selection(uint32_t key, int64_t gidx, uint32_t sel_key,
                                         int64_t cutoff, bool largest) {
  if (key == sel_key) return gidx < cutoff;
  return largest ? key > sel_key : key < sel_key;
}

}  // namespace chase_ext
