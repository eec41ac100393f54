// Bit-level views of float32 / bfloat16 / float16 data for the hot CPU loops: keys,
// finiteness and zeroing as integer operations, which the compiler vectorises.
#pragma once
#include <ATen/ATen.h>

#include <cstdint>
#include <cstring>

#include "cpu/mask_kernels.h"

namespace chase_ext::cpu {

template <class W>
struct Bits;

template <>
struct Bits<float> {
  using U = uint32_t;  // storage bits
  static constexpr int format = kF32;
  static uint32_t f32(U u) { return u; }
};

template <>
struct Bits<at::BFloat16> {
  using U = uint16_t;
  static constexpr int format = kBF16;
  static uint32_t f32(U u) { return uint32_t(u) << 16; }
};

template <>
struct Bits<at::Half> {
  using U = uint16_t;
  static constexpr int format = kF16;
  static uint32_t f32(U u) {
    const float f = static_cast<float>(c10::Half(u, c10::Half::from_bits()));
    uint32_t b;
    std::memcpy(&b, &f, 4);
    return b;
  }
};

// sortable_key(|v|) from the float32 bits of v (see common/keys.h): |v| clears the sign
// (so -0 == +0), and non-negative floats only need the top bit set.
inline uint32_t abs_key(uint32_t f32) { return (f32 & 0x7FFFFFFFu) | 0x80000000u; }

inline bool nonfinite_bits(uint32_t f32) { return (f32 & 0x7F800000u) == 0x7F800000u; }

inline float abs_value(uint32_t f32) {
  const uint32_t a = f32 & 0x7FFFFFFFu;
  float f;
  std::memcpy(&f, &a, 4);
  return f;
}

}  // namespace chase_ext::cpu
