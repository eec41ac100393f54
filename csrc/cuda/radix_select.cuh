// Radix select on CUDA: the k-th smallest key among the candidate slots of a list of
// tensors, for several independent scopes at once (one global selection, or one per
// tensor), with exact index tie-breaking. No sort:
//  1. four histogram passes over 8 key bits each (256 bins per scope); after each pass
//     the host walks the bins to fix the next 8 bits of the k-th key. Pass 0 also
//     collects the validation data (candidate counts, non-finite flags), so that the
//     caller can raise every error before anything is written.
//  2. the k-th key is now known, and `need` of its ties are taken (in global order).
//     One pass counts ties per tile; the host finds the tile holding the need-th tie;
//     one block per scope scans that tile in order to find its global index.
// `Src` defines the candidates and their keys, always "smaller is better": a largest
// selection passes ~key, so that ties still go to the lower index.
//
// Src interface (device):
//   bool cand(const Desc&, int64_t i, bool live, uint32_t& key) const;  // candidate? + key
//   unsigned bad(const Desc&, int64_t i) const;     // pass 0: non-finite flags (bit per list)
//   bool other(const Desc&, int64_t i, bool live) const;  // pass 0: extra per-scope count
#pragma once
#include <cub/block/block_reduce.cuh>
#include <cub/block/block_scan.cuh>

#include <algorithm>

#include "cuda/multi_tensor.cuh"

namespace chase_ext::cuda {

// Layout of the per-pass statistics buffer (int64): [hist: scopes x bins | other: scopes | bad].
struct StatsLayout {
  int64_t scopes;
  int64_t bins = 256;
  __host__ __device__ int64_t other() const { return scopes * bins; }
  __host__ __device__ int64_t bad() const { return scopes * (bins + 1); }
  __host__ __device__ int64_t size() const { return scopes * (bins + 1) + 1; }
};

// Pass `pass` (0..3): histogram of key bits [24 - 8 pass, 32 - 8 pass) of the candidates
// whose higher bits equal prefix[scope] (pass 0: every candidate; `prefix` unused).
// kBits = 12 (pass 0 only): the top 12 bits, 4,096 bins (compact_select.cuh); sl.bins
// must be 1 << kBits.
template <class Src, bool kChecks, int kBits = 8>
__global__ void __launch_bounds__(kThreads)
radix_hist_kernel(const Desc* ds, int n, Src src, const uint32_t* prefix, int pass, StatsLayout sl,
                  unsigned long long* stats) {
  constexpr int kBins = 1 << kBits;
  __shared__ unsigned int hist[kBins];
  for (int b = threadIdx.x; b < kBins; b += kThreads) hist[b] = 0;
  __syncthreads();
  const TileRef tl = locate_tile(ds, n, blockIdx.x);
  const Desc d = ds[tl.t];
  const uint32_t want = pass == 0 ? 0u : prefix[d.scope];
  const int shift = 32 - kBits - 8 * pass;
  const uint32_t high = pass == 0 ? 0u : (0xFFFFFFFFu << (32 - 8 * pass));
  unsigned bad = 0;
  int n_other = 0;
  // Block-uniform loop so that whole warps reach __match_any_sync together.
  for (int64_t base = tl.start; base < tl.end; base += kThreads) {
    const int64_t i = base + threadIdx.x;
    int bin = -1;
    if (i < tl.end) {
      const bool live = live_at(d, i);
      if constexpr (kChecks) {
        bad |= src.bad(d, i);
        n_other += src.other(d, i, live);
      }
      uint32_t key;
      if (src.cand(d, i, live, key) && (key & high) == want) bin = (int)((key >> shift) & (kBins - 1));
    }
    // Keys cluster in few bins (one exponent range): one shared atomic per distinct bin
    // in the warp instead of one per lane.
    const unsigned peers = __match_any_sync(0xFFFFFFFFu, bin);
    if (bin >= 0 && (threadIdx.x & 31) == __ffs(peers) - 1) atomicAdd(&hist[bin], (unsigned)__popc(peers));
  }
  if constexpr (kChecks) {
    if (bad) atomicOr(&stats[sl.bad()], (unsigned long long)bad);
    using Reduce = cub::BlockReduce<int, kThreads>;
    __shared__ typename Reduce::TempStorage tmp;
    const int total = Reduce(tmp).Sum(n_other);
    if (threadIdx.x == 0 && total) atomicAdd(&stats[sl.other() + d.scope], (unsigned long long)total);
  }
  __syncthreads();
  for (int b = threadIdx.x; b < kBins; b += kThreads)
    if (hist[b]) atomicAdd(&stats[(int64_t)d.scope * kBins + b], (unsigned long long)hist[b]);
}

// Per tile: how many candidates have exactly the selected key of their scope.
template <class Src>
__global__ void __launch_bounds__(kThreads)
tie_count_kernel(const Desc* ds, int n, Src src, const uint32_t* key, int* ties) {
  const TileRef tl = locate_tile(ds, n, blockIdx.x);
  const Desc d = ds[tl.t];
  const uint32_t want = key[d.scope];
  int c = 0;
  for (int64_t i = tl.start + threadIdx.x; i < tl.end; i += kThreads) {
    uint32_t k;
    c += src.cand(d, i, live_at(d, i), k) && k == want;
  }
  using Reduce = cub::BlockReduce<int, kThreads>;
  __shared__ typename Reduce::TempStorage tmp;
  const int total = Reduce(tmp).Sum(c);
  if (threadIdx.x == 0) ties[blockIdx.x] = total;
}

struct TieJob {
  int64_t tile;
  int64_t rank;  // 1-based rank of the wanted tie inside the tile
  int64_t scope;
};

// One block per job: global index + 1 of the rank-th tie in the tile, in slot order.
template <class Src>
__global__ void __launch_bounds__(kThreads)
tie_find_kernel(const Desc* ds, int n, Src src, const uint32_t* key, const TieJob* jobs, int64_t* cutoff) {
  const TieJob job = jobs[blockIdx.x];
  const TileRef tl = locate_tile(ds, n, job.tile);
  const Desc d = ds[tl.t];
  const uint32_t want = key[job.scope];
  using Scan = cub::BlockScan<int, kThreads>;
  __shared__ typename Scan::TempStorage tmp;
  int64_t seen = 0;  // ties before this round
  for (int64_t base = tl.start; base < tl.end; base += kThreads) {
    const int64_t i = base + threadIdx.x;
    uint32_t k;
    const int tie = i < tl.end && src.cand(d, i, live_at(d, i), k) && k == want;
    int before, round;
    Scan(tmp).ExclusiveSum(tie, before, round);  // `round` reaches every thread
    if (tie && seen + before + 1 == job.rank) cutoff[job.scope] = d.offset + i + 1;
    seen += round;
    if (seen >= job.rank) break;  // uniform: every thread has the same `seen`
    __syncthreads();              // tmp is reused next round
  }
}

// What pass 0 learned, for the caller's checks (raise errors there; nothing is written yet).
struct FirstPass {
  std::vector<int64_t> cand;   // candidates per scope
  std::vector<int64_t> other;  // Src::other count per scope
  unsigned bad = 0;            // or of Src::bad
};

inline FirstPass first_pass_of(const int64_t* hp, const StatsLayout& sl) {
  FirstPass fp;
  fp.cand.assign(sl.scopes, 0);
  fp.other.assign(sl.scopes, 0);
  for (int64_t s = 0; s < sl.scopes; ++s) {
    for (int64_t b = 0; b < sl.bins; ++b) fp.cand[s] += hp[s * sl.bins + b];
    fp.other[s] = hp[sl.other() + s];
  }
  fp.bad = (unsigned)hp[sl.bad()];
  return fp;
}

// The bin of a histogram where the cumulative count reaches `need`; `need` becomes the
// rank inside that bin.
inline int walk_bins(const int64_t* hs, int64_t& need, int bins = 256) {
  int b = 0;
  for (; b < bins - 1 && need > hs[b]; ++b) need -= hs[b];
  return b;
}

// Selections (in the original key order: flipped back when `largest`) of ks[s] slots
// for every scope s. `check(const FirstPass&)` runs after pass 0 and may throw; pass-0
// checks (bad, other) are compiled in only there. Syncs with the device once per pass.
template <class Src, class Check>
std::vector<Selection> radix_select(const MultiTensor& mt, const Desc* ds, const at::Device& dev, int scopes,
                                    const Src& src, const std::vector<int64_t>& ks, bool largest, Check&& check) {
  const StatsLayout sl{scopes};
  auto stats = at::zeros({sl.size()}, at::TensorOptions().dtype(at::kLong).device(dev));
  auto* sp = reinterpret_cast<unsigned long long*>(stats.data_ptr<int64_t>());
  std::vector<uint32_t> prefix(scopes, 0);
  std::vector<int64_t> need(ks);
  std::vector<char> active(scopes, 0);  // k > 0: a real selection to find
  bool any = false;
  const unsigned grid = grid_for(mt.tiles, 1);
  for (int pass = 0; pass < 4; ++pass) {
    if (pass > 0 && !any) break;
    if (pass > 0) stats.zero_();
    const auto pre = upload(prefix, dev);
    if (grid) {
      if (pass == 0)
        radix_hist_kernel<Src, true><<<grid, kThreads, 0, stream()>>>(ds, mt.n(), src, dev_ptr<uint32_t>(pre),
                                                                     pass, sl, sp);
      else
        radix_hist_kernel<Src, false><<<grid, kThreads, 0, stream()>>>(ds, mt.n(), src, dev_ptr<uint32_t>(pre),
                                                                      pass, sl, sp);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    const auto h = stats.to(at::kCPU);  // syncs
    const int64_t* hp = h.data_ptr<int64_t>();
    if (pass == 0) {
      const FirstPass fp = first_pass_of(hp, sl);
      check(fp);
      for (int s = 0; s < scopes; ++s) {
        TORCH_CHECK(ks[s] >= 0 && ks[s] <= fp.cand[s], "chase_ext: internal: unchecked k");
        active[s] = ks[s] > 0;
        any = any || active[s];
      }
    }
    // Fix the next 8 bits: the bin where the cumulative count reaches `need`.
    const int shift = 24 - 8 * pass;
    for (int s = 0; s < scopes; ++s)
      if (active[s]) prefix[s] |= (uint32_t)walk_bins(hp + (int64_t)s * 256, need[s]) << shift;
  }
  std::vector<Selection> out(scopes);
  for (int s = 0; s < scopes; ++s) out[s] = {largest ? kKeyMax : 0u, 0};
  if (!any) return out;

  // Place the cutoff: the need-th tie of the k-th key, in global order.
  const auto keys = upload(prefix, dev);
  auto ties = at::empty({mt.tiles}, at::TensorOptions().dtype(at::kInt).device(dev));
  tie_count_kernel<Src><<<grid, kThreads, 0, stream()>>>(ds, mt.n(), src, dev_ptr<uint32_t>(keys),
                                                         ties.data_ptr<int>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  const auto th = ties.to(at::kCPU);
  const int* tp = th.data_ptr<int>();
  std::vector<TieJob> jobs;
  std::vector<char> found(scopes, 0);
  for (int t = 0; t < mt.n(); ++t) {
    const int s = mt.d[t].scope;
    if (!active[s] || found[s]) continue;
    for (int64_t j = mt.d[t].tile_begin, e = j + mt.tiles_of(t); j < e; ++j) {
      if (need[s] <= tp[j]) {
        jobs.push_back({j, need[s], s});
        found[s] = 1;
        break;
      }
      need[s] -= tp[j];
    }
  }
  TORCH_CHECK(jobs.size() == (size_t)std::count(active.begin(), active.end(), 1),
              "chase_ext: internal: radix select lost a tie");
  const auto jd = upload(jobs, dev);
  auto cut = at::full({scopes}, -1, at::TensorOptions().dtype(at::kLong).device(dev));
  tie_find_kernel<Src><<<(unsigned)jobs.size(), kThreads, 0, stream()>>>(
      ds, mt.n(), src, dev_ptr<uint32_t>(keys), dev_ptr<TieJob>(jd), cut.data_ptr<int64_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  const auto ch = cut.to(at::kCPU);
  for (int s = 0; s < scopes; ++s) {
    if (!active[s]) continue;
    const int64_t c = ch.data_ptr<int64_t>()[s];
    TORCH_CHECK(c > 0, "chase_ext: internal: radix select found no cutoff");
    out[s] = {largest ? ~prefix[s] : prefix[s], c};
  }
  return out;
}

}  // namespace chase_ext::cuda
