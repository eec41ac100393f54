// The row pass shared by mask_update_ (write pass) and channel_stats (read only): one
// warp per row segment (up to kSeg slots of one output channel), emitting the per-row
// active count and sum |w|. Rows of one segment store their result; longer rows add
// their segment counts atomically (integers: exact) and store each segment's partial sum,
// which a second kernel adds up in segment order, so sums are the same run to run
// (channel scores rank by them; a float atomicAdd would make the order, and the last
// bits, depend on scheduling).
#pragma once
#include "cuda/multi_tensor.cuh"

namespace chase_ext::cuda {

struct StateRef {
  void* data;
  int64_t elem;  // bytes per element
};

// kUpdate: apply the prune selection psel and the grow selection gsel (per scope) to the
// masks, zero weights and owned states that are not kept, count the new masks.
// Otherwise count the masks as they are.
template <class W, class S, bool kUpdate>
__global__ void __launch_bounds__(kThreads)
rows_kernel(const Desc* ds, int n, int64_t items, const Selection* psel, const Selection* gsel,
            const StateRef* states, int64_t* counts, float* sums, double* partials) {
  const int64_t item = (int64_t)blockIdx.x * kWarps + threadIdx.x / 32;
  if (item >= items) return;  // whole warps leave together
  const int lane = threadIdx.x & 31;
  const Desc d = ds[find_tensor(ds, n, item, [](const Desc& x) { return x.item_begin; })];
  const int64_t local = item - d.item_begin;
  const int64_t r = local / d.segs;
  const int64_t j0 = (local - r * d.segs) * kSeg;
  const int64_t j1 = j0 + kSeg < d.row_stride ? j0 + kSeg : d.row_stride;
  const bool row_live = !d.live_row || d.live_row[r];
  Selection p{}, g{};
  if constexpr (kUpdate) {
    p = psel[d.scope];
    g = gsel[d.scope];
  }
  W* w = static_cast<W*>(d.w);
  int cnt = 0;
  double sum = 0;  // double per lane: rows can be long, float sums drift
  for (int64_t j = j0 + lane; j < j1; j += 32) {
    const int64_t i = r * d.row_stride + j;
    const bool old = d.mask[i];
    const float wv = static_cast<float>(w[i]);
    bool keep = old, now = old;
    if constexpr (kUpdate) {
      const bool live = row_live && (!d.live_col || d.live_col[div_idx(j, d.col_stride, d.small)]);
      const int64_t gi = d.offset + i;
      const bool pruned = live && old && in_selection(sortable_key(wv, true), gi, p.key, p.cutoff, false);
      const bool after = old && !pruned;
      // a slot already active after the prune is not a grow candidate, but then now == true anyway
      now = after || (live && in_selection(sortable_key(load<S>(d.s, i), true), gi, g.key, g.cutoff, true));
      keep = old && now;  // stays active: keeps value and state; everything else becomes +0
      if (!keep) {
        if (__float_as_uint(wv) != 0u) w[i] = W(0.f);  // already +0: skip the write (most slots)
        for (int q = d.state_begin; q < d.state_end; ++q) zero_elem(states[q].data, (int)states[q].elem, i);
      }
      if (now != old) d.mask[i] = now;
    }
    cnt += now;
    if (keep) sum += fabs((double)wv);
  }
  cnt = warp_sum(cnt);
  sum = warp_sum(sum);
  if (lane == 0) {
    const int64_t row = d.row_base + r;
    if (d.segs == 1) {
      counts[row] = cnt;
      sums[row] = (float)sum;
    } else {
      atomicAdd(reinterpret_cast<unsigned long long*>(counts + row), (unsigned long long)cnt);
      partials[item] = sum;
    }
  }
}

// Rows of several segments: sums[row] = their partial sums added in segment order.
// (static: this header is included by several .cu files)
static __global__ void __launch_bounds__(kThreads)
row_sums_kernel(const Desc* ds, int n, int64_t rows, const double* partials, float* sums) {
  const int64_t row = (int64_t)blockIdx.x * kThreads + threadIdx.x;
  if (row >= rows) return;
  const Desc d = ds[find_tensor(ds, n, row, [](const Desc& x) { return x.row_base; })];
  if (d.segs <= 1) return;
  const double* p = partials + d.item_begin + (row - d.row_base) * d.segs;
  double s = 0;
  for (int64_t q = 0; q < d.segs; ++q) s += p[q];
  sums[row] = (float)s;
}

// Launches rows_kernel over every row of mt; counts/sums must be zeroed, mt.rows long.
template <class W, class S, bool kUpdate>
void launch_rows(const MultiTensor& mt, const Desc* ds, const Selection* psel, const Selection* gsel,
                 const StateRef* states, at::Tensor& counts, at::Tensor& sums) {
  if (mt.items == 0) return;
  bool multi = false;
  for (const Desc& d : mt.d) multi = multi || (d.rows > 0 && d.segs > 1);
  at::Tensor partials;
  if (multi) partials = at::empty({mt.items}, counts.options().dtype(at::kDouble));
  double* pp = multi ? partials.data_ptr<double>() : nullptr;
  rows_kernel<W, S, kUpdate><<<grid_for(mt.items, kWarps), kThreads, 0, stream()>>>(
      ds, mt.n(), mt.items, psel, gsel, states, counts.data_ptr<int64_t>(), sums.data_ptr<float>(), pp);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if (!multi) return;
  row_sums_kernel<<<grid_for(mt.rows, kThreads), kThreads, 0, stream()>>>(ds, mt.n(), mt.rows, pp,
                                                                          sums.data_ptr<float>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace chase_ext::cuda
