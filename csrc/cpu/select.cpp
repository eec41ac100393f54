// select_threshold on CPU: the k-th best key among the slots a mask selects.
#include <torch/library.h>

#include "cpu/multi_tensor.h"

namespace chase_ext::cpu {
namespace {

at::Tensor select_threshold(TensorList keys, TensorList masks, TensorList live_rows, TensorList live_cols,
                            bool mask_value, int64_t k, bool largest, bool absolute) {
  const char* op = "chase_ext.select_threshold";
  check_float_list(op, "keys", keys);
  check_masks(op, masks, keys, "keys");
  check_live(op, "live_rows", live_rows, keys, 0);
  check_live(op, "live_cols", live_cols, keys, 1);
  TORCH_CHECK(k >= 0, op, ": k=", k, " is negative");
  auto out = at::empty({2}, at::kLong);
  if (keys.empty()) {
    TORCH_CHECK(k == 0, op, ": k=", k, " is out of range: only 0 candidate slots");
    out.data_ptr<int64_t>()[0] = (int64_t)(largest ? kKeyMax : 0u);
    out.data_ptr<int64_t>()[1] = 0;
    return out;
  }
  const auto L = make_layouts(keys, live_rows, live_cols);
  std::vector<int> all(keys.size());
  for (size_t t = 0; t < all.size(); ++t) all[t] = (int)t;
  const auto chunks = make_chunks(L, all, num_chunks());
  std::vector<const void*> kp(keys.size());
  std::vector<const bool*> mp(keys.size());
  for (size_t t = 0; t < keys.size(); ++t) {
    kp[t] = keys[t].data_ptr();
    mp[t] = masks[t].data_ptr<bool>();
  }
  Selection sel{};
  dispatch_float(keys[0].scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    auto val = [&](int t, int64_t i) { return static_cast<float>(static_cast<const T*>(kp[t])[i]); };
    sel = radix_select(
        L, chunks, k, largest, op, "k",
        [&](int t, int64_t i, bool live) { return live && mp[t][i] == mask_value; },
        [&](int t, int64_t i) { return sortable_key(val(t, i), absolute); },
        [&](int t, int64_t i) { return !std::isfinite(val(t, i)); }, "keys");
  });
  out.data_ptr<int64_t>()[0] = (int64_t)sel.key;
  out.data_ptr<int64_t>()[1] = sel.cutoff;
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(chase_ext, CPU, m) { m.impl("select_threshold", &select_threshold); }

}  // namespace chase_ext::cpu
