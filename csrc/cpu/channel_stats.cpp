// channel_stats on CPU: per output channel (dim 0) active count and sum |w|, all tensors
// in one call (a segmented reduction over rows). Takes rows-dense layouts (channels_last
// among them) in place: a row held in another order than row-major is first gathered
// into a per-thread row buffer in row-major order, so the sum adds the same values in the
// same order as for a contiguous tensor and both layouts give the same bits.
#include <torch/library.h>

#include <vector>

#include "cpu/float_bits.h"
#include "cpu/mask_kernels.h"
#include "cpu/multi_tensor.h"

namespace chase_ext::cpu {
namespace {

std::tuple<at::Tensor, at::Tensor> channel_stats(at::TensorList weights, at::TensorList masks) {
  const char* op = "chase_ext.channel_stats";
  check_channel_stats_args(op, weights, masks);
  const auto L = make_layouts(weights, {}, {});
  int64_t rows = 0;
  for (const auto& l : L) rows += l.rows;
  auto counts = at::zeros({rows}, at::kLong);
  auto sums = at::zeros({rows}, at::kFloat);
  int64_t* cp = counts.data_ptr<int64_t>();
  float* up = sums.data_ptr<float>();
  if (weights.empty()) return {counts, sums};
  dispatch_float(weights[0].scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    using U = typename Bits<T>::U;  // the storage type (uint16_t or uint32_t)
    const StatsFn stats = mask_kernels().stats[Bits<T>::format];
    int64_t base = 0;
    for (size_t t = 0; t < weights.size(); ++t) {
      const Layout& l = L[t];
      const void* w = weights[t].data_ptr();
      const uint8_t* m = reinterpret_cast<const uint8_t*>(masks[t].data_ptr<bool>());
      at::parallel_for(0, l.rows, std::max<int64_t>(1, 16384 / std::max<int64_t>(1, l.row_stride)),
                       [&](int64_t r0, int64_t r1) {
        std::vector<U> wrow(l.perm.empty() ? 0 : l.row_stride);  // one row in row-major order
        std::vector<uint8_t> mrow(wrow.size());
        for (int64_t r = r0; r < r1; ++r) {
          int64_t cnt = 0;
          double sum = 0;
          const int64_t i = r * l.row_stride;
          const U* wr = reinterpret_cast<const U*>(w) + i;
          const uint8_t* mr = m + i;
          if (!l.perm.empty()) {
            for (int64_t j = 0; j < l.row_stride; ++j) {
              wrow[j] = wr[l.inv[j]];
              mrow[j] = mr[l.inv[j]];
            }
            wr = wrow.data();
            mr = mrow.data();
          }
          stats(wr, mr, l.row_stride, &cnt, &sum);
          cp[base + r] = cnt;
          up[base + r] = (float)sum;
        }
      });
      base += l.rows;
    }
  });
  return {counts, sums};
}

}  // namespace

TORCH_LIBRARY_IMPL(chase_ext, CPU, m) { m.impl("channel_stats", &channel_stats); }

}  // namespace chase_ext::cpu
