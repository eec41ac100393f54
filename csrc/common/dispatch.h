// dtype dispatch shared by the CPU and CUDA kernels.
#pragma once
#include <ATen/ATen.h>

namespace chase_ext {

// Calls f(T{}) with T the C++ type of a float32/float16/bfloat16 dtype, so that loops
// over the data are compiled per type.
template <class F>
inline void dispatch_float(at::ScalarType dt, F&& f) {
  switch (dt) {
    case at::kFloat: f(float{}); break;
    case at::kHalf: f(at::Half{}); break;
    case at::kBFloat16: f(at::BFloat16{}); break;
    default: TORCH_CHECK(false, "chase_ext: unsupported dtype ", dt);
  }
}

}  // namespace chase_ext
