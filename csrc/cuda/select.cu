// select_threshold on CUDA: the k-th best key among the slots a mask selects, by the
// radix select of radix_select.cuh. The result (key, cutoff) is returned as an int64
// tensor of 2 on the CPU, like the CPU op (the caller needs it on the host anyway, and
// the selection has synced with the device already).
#include <torch/library.h>

#include "cuda/radix_select.cuh"

namespace chase_ext::cuda {
namespace {

// Candidates: live slots with mask == mask_value; key of the value (or |value|), flipped
// for a largest selection.
template <class T>
struct KeySrc {
  bool mask_value, absolute, largest;
  __device__ bool cand(const Desc& d, int64_t i, bool live, uint32_t& key) const {
    if (!live || d.mask[i] != mask_value) return false;
    const uint32_t k = sortable_key(load<T>(d.w, i), absolute);
    key = largest ? ~k : k;
    return true;
  }
  __device__ unsigned bad(const Desc& d, int64_t i) const { return finite(load<T>(d.w, i)) ? 0u : 1u; }
  __device__ bool other(const Desc&, int64_t, bool) const { return false; }
};

at::Tensor select_threshold(at::TensorList keys, at::TensorList masks, at::TensorList live_rows,
                            at::TensorList live_cols, bool mask_value, int64_t k, bool largest, bool absolute) {
  const char* op = "chase_ext.select_threshold";
  check_float_list(op, "keys", keys);
  check_masks(op, masks, keys, "keys");
  check_live(op, "live_rows", live_rows, keys, 0);
  check_live(op, "live_cols", live_cols, keys, 1);
  TORCH_CHECK(k >= 0, op, ": k=", k, " is negative");
  auto out = at::empty({2}, at::kLong);
  if (keys.empty()) {  // not reachable through the dispatcher, kept for symmetry with CPU
    TORCH_CHECK(k == 0, op, ": k=", k, " is out of range: only 0 candidate slots");
    out.data_ptr<int64_t>()[0] = (int64_t)(largest ? kKeyMax : 0u);
    out.data_ptr<int64_t>()[1] = 0;
    return out;
  }
  const at::Device dev = keys[0].device();
  check_devices(op, "keys", keys, dev);
  TORCH_CHECK(dev.is_cuda(), op, ": keys[0] is on ", dev, ", expected a CUDA device");
  const c10::cuda::CUDAGuard guard(dev);

  MultiTensor mt = make_multi(keys, live_rows, live_cols, false);
  for (int t = 0; t < mt.n(); ++t) mt.d[t].mask = masks[t].data_ptr<bool>();
  const auto dd = upload(mt.d, dev);
  Selection sel{};
  dispatch_float(keys[0].scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    const KeySrc<T> src{mask_value, absolute, largest};
    sel = radix_select(mt, dev_ptr<Desc>(dd), dev, 1, src, {k}, largest, [&](const FirstPass& fp) {
      TORCH_CHECK(!(fp.bad & 1u), op, ": keys has non-finite values");
      TORCH_CHECK(k <= fp.cand[0], op, ": k=", k, " is out of range: only ", fp.cand[0], " candidate slots");
    })[0];
  });
  out.data_ptr<int64_t>()[0] = (int64_t)sel.key;
  out.data_ptr<int64_t>()[1] = sel.cutoff;
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(chase_ext, CUDA, m) { m.impl("select_threshold", &select_threshold); }

}  // namespace chase_ext::cuda
