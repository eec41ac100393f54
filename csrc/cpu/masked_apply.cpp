// masked_apply_ on CPU: tensors[j] <- where(masks[owner[j]], tensors[j], 0), one call for
// the weights and every same-shape optimizer state of the model.
#include <torch/library.h>

#include <cstring>

#include "cpu/multi_tensor.h"

namespace chase_ext::cpu {
namespace {

void masked_apply(at::TensorList tensors, at::TensorList masks, c10::IntArrayRef owner) {
  const char* op = "chase_ext.masked_apply_";
  for (size_t i = 0; i < masks.size(); ++i) {
    TORCH_CHECK(masks[i].scalar_type() == at::kBool, op, ": masks[", i, "] must be bool, got ",
                masks[i].scalar_type());
    TORCH_CHECK(masks[i].is_contiguous(), op, ": masks[", i, "] must be contiguous");
  }
  TORCH_CHECK(owner.size() == tensors.size(), op, ": owner has ", owner.size(), " entries but there are ",
              tensors.size(), " tensors");
  for (size_t j = 0; j < tensors.size(); ++j) {
    TORCH_CHECK(owner[j] >= 0 && owner[j] < (int64_t)masks.size(), op, ": owner[", j, "]=", owner[j],
                " is out of range [0, ", masks.size(), ")");
    const auto& m = masks[owner[j]];
    TORCH_CHECK(tensors[j].sizes() == m.sizes(), op, ": tensors[", j, "] has shape ", tensors[j].sizes(),
                " but masks[", owner[j], "] has shape ", m.sizes());
    TORCH_CHECK(tensors[j].device() == m.device(), op, ": tensors[", j, "] is on ", tensors[j].device(),
                " but masks[", owner[j], "] is on ", m.device());
    TORCH_CHECK(tensors[j].is_contiguous(), op, ": tensors[", j, "] must be contiguous");
    TORCH_CHECK(tensors[j].is_floating_point(), op, ": tensors[", j, "] must be floating point, got ",
                tensors[j].scalar_type());
  }
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
