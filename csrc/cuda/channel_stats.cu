// channel_stats on CUDA: per output channel (dim 0) active count and sum |w| of every
// tensor, one launch (the read-only variant of the mask_update_ row pass). Other
// rows-dense layouts than contiguous (channels_last) go through contiguous copies, as in
// mask_update_: the row pass addresses slots by their row-major index.
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "cuda/rows.cuh"

namespace chase_ext::cuda {
namespace {

std::tuple<at::Tensor, at::Tensor> channel_stats(at::TensorList weights, at::TensorList masks) {
  const char* op = "chase_ext.channel_stats";
  check_channel_stats_args(op, weights, masks);
  if (weights.empty()) return {at::zeros({0}, at::kLong), at::zeros({0}, at::kFloat)};
  const at::Device dev = weights[0].device();
  check_devices(op, "weights", weights, dev);
  TORCH_CHECK(dev.is_cuda(), op, ": weights[0] is on ", dev, ", expected a CUDA device");
  const c10::cuda::CUDAGuard guard(dev);
  auto contiguous = [](at::TensorList ts) {
    return std::all_of(ts.begin(), ts.end(), [](const at::Tensor& t) { return t.is_contiguous(); });
  };
  if (!contiguous(weights) || !contiguous(masks)) {
    std::vector<at::Tensor> w, m;
    for (const at::Tensor& t : weights) w.push_back(t.contiguous());
    for (const at::Tensor& t : masks) m.push_back(t.contiguous());
    return channel_stats(w, m);
  }

  MultiTensor mt = make_multi(weights, {}, {}, false);
  for (int t = 0; t < mt.n(); ++t) mt.d[t].mask = masks[t].data_ptr<bool>();
  auto opts = at::TensorOptions().device(dev);
  auto counts = at::zeros({mt.rows}, opts.dtype(at::kLong));
  auto sums = at::zeros({mt.rows}, opts.dtype(at::kFloat));
  if (mt.items == 0) return {counts, sums};
  const auto dd = upload(mt.d, dev);
  dispatch_float(weights[0].scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    launch_rows<T, T, false>(mt, dev_ptr<Desc>(dd), nullptr, nullptr, nullptr, counts, sums);
  });
  return {counts, sums};
}

}  // namespace

TORCH_LIBRARY_IMPL(chase_ext, CUDA, m) { m.impl("channel_stats", &channel_stats); }

}  // namespace chase_ext::cuda
