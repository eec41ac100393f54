// masked_apply_ on CPU: tensors[j] <- where(masks[owner[j]], tensors[j], 0), one call for
// the weights and every same-shape optimizer state of the model.
#include <torch/library.h>

#include <cstring>

#include "cpu/multi_tensor.h"

namespace chase_ext::cpu {
namespace {

void masked_apply(at::TensorList tensors, at::TensorList masks, c10::IntArrayRef owner) {
  const char* op = "chase_ext.masked_apply_";
  check_masked_apply_args(op, tensors, masks, owner);
  for (size_t j = 0; j < tensors.size(); ++j) {
    char* x = static_cast<char*>(tensors[j].data_ptr());
    const bool* m = masks[owner[j]].data_ptr<bool>();
    const int64_t es = tensors[j].element_size();
    at::parallel_for(0, tensors[j].numel(), 32768, [&](int64_t b, int64_t e) {
      // zero is all-zero bits in every float format; byte loops vectorise per dtype size
      switch (es) {
        case 4: {
          auto* p = reinterpret_cast<uint32_t*>(x);
          for (int64_t i = b; i < e; ++i) p[i] = m[i] ? p[i] : 0u;
          break;
        }
        case 2: {
          auto* p = reinterpret_cast<uint16_t*>(x);
          for (int64_t i = b; i < e; ++i) p[i] = m[i] ? p[i] : (uint16_t)0;
          break;
        }
        default:
          for (int64_t i = b; i < e; ++i)
            if (!m[i]) std::memset(x + i * es, 0, es);
      }
    });
  }
}

}  // namespace

TORCH_LIBRARY_IMPL(chase_ext, CPU, m) { m.impl("masked_apply_", &masked_apply); }

}  // namespace chase_ext::cpu
