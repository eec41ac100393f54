// Both selections of a global-scope mask update from one pass over the data: the CUDA
// form of the CPU's bracketed select (cpu/bracket_select.h, common/bracket.h).
//  1. A deterministic sample of up to kSample slots goes to the host, which brackets the
//     prune threshold (keys of |w| of active slots) and the grow threshold (flipped keys
//     of |score| of inactive slots and of slots the prune will certainly take).
//  2. One pass counts, per bracket, the candidates below it and appends those inside it
//     to a buffer as (key << 32 | global index), so that sorting the buffer orders it as
//     the selection does: by key, ties by the lower index. It also gathers what pass 0 of
//     the radix select gathers (candidate counts, non-finite flags) for the same checks.
//  3. The prune buffer is sorted (CUB radix sort, ~2% of the slots); its first `need`
//     entries are the pruned ones inside the bracket, and they join the grow candidates.
//  4. The grow buffer is sorted the same way. Both selections are written on the device.
// Three host round trips in all (sample, counts, grow counts). When a bracket misses the
// k-th key, or a buffer overflows, the caller runs the exact multi-pass radix select, so
// results never depend on the sample, only speed does.
#pragma once
#include <cub/device/device_radix_sort.cuh>

#include <optional>
#include <utility>

#include "common/bracket.h"
#include "cuda/radix_select.cuh"

namespace chase_ext::cuda {

constexpr int64_t kSample = 65536;

struct SampleSlot {
  uint32_t pkey;   // sortable key of |w|
  uint32_t gkey;   // flipped sortable key of |score|
  uint32_t flags;  // bit 0: live, bit 1: active
};

// Sample j is the slot at global index floor(j * total / count).
template <class W, class S>
__global__ void __launch_bounds__(kThreads)
sample_kernel(const Desc* ds, int n, uint64_t total, int64_t count, SampleSlot* out) {
  const int64_t j = (int64_t)blockIdx.x * kThreads + threadIdx.x;
  if (j >= count) return;
  const int64_t g = (int64_t)((uint64_t)j * total / (uint64_t)count);
  const Desc& d = ds[find_tensor(ds, n, g, [](const Desc& x) { return x.offset; })];
  const int64_t i = g - d.offset;
  out[j] = {sortable_key(load<W>(d.w, i), true), ~sortable_key(load<S>(d.s, i), true),
            (live_at(d, i) ? 1u : 0u) | (d.mask[i] ? 2u : 0u)};
}

// Device counters of the scan (unsigned long long for atomics).
struct ScanCounts {
  unsigned long long p_total;  // active live slots (prune candidates)
  unsigned long long p_below;  // ... with a key below the prune bracket (certainly pruned)
  unsigned long long other;    // inactive live slots
  unsigned long long g_below;  // grow candidates known so far with a key below the grow bracket
  unsigned long long pn, gn;   // entries appended to the prune / grow buffer (may exceed cap)
  unsigned long long bad;      // bit 0: non-finite weight, bit 1: non-finite score
};

struct BracketKeys {
  uint32_t plo, phi, glo, ghi;
};

// Reserves consecutive places of a buffer for the lanes where `take` holds (one atomic
// per warp on its cursor). Every lane of the warp must call it. Returns the lane's place,
// or -1; a place at or past the buffer's capacity is not written (the caller sees the
// cursor past it and falls back).
__device__ __forceinline__ long long warp_append(bool take, unsigned long long* cursor) {
  const unsigned ballot = __ballot_sync(0xFFFFFFFFu, take);
  if (!ballot) return -1;
  const int lane = threadIdx.x & 31;
  const int leader = __ffs(ballot) - 1;
  unsigned long long base = 0;
  if (lane == leader) base = atomicAdd(cursor, (unsigned long long)__popc(ballot));
  base = __shfl_sync(0xFFFFFFFFu, base, leader);
  return take ? (long long)(base + __popc(ballot & ((1u << lane) - 1u))) : -1;
}

template <class W, class S>
__global__ void __launch_bounds__(kThreads)
bracket_scan_kernel(const Desc* ds, int n, BracketKeys b, unsigned long long pcap, unsigned long long gcap,
                    ScanCounts* out, uint64_t* pbuf, uint32_t* pbuf_g, uint64_t* gbuf) {
  const TileRef tl = locate_tile(ds, n, blockIdx.x);
  const Desc d = ds[tl.t];
  unsigned bad = 0;
  unsigned long long c[4] = {0, 0, 0, 0};  // p_total, p_below, other, g_below
  // Block-uniform loop: whole warps reach the ballots together.
  for (int64_t base = tl.start; base < tl.end; base += kThreads) {
    const int64_t i = base + threadIdx.x;
    bool pin = false, gin = false;
    uint32_t kw = 0, fkg = 0;
    if (i < tl.end) {
      const float fw = load<W>(d.w, i), fs = load<S>(d.s, i);
      bad |= (finite(fw) ? 0u : 1u) | (finite(fs) ? 0u : 2u);
      const bool live = live_at(d, i), old = d.mask[i];
      kw = sortable_key(fw, true);
      fkg = ~sortable_key(fs, true);
      const bool act = live && old;
      const bool below = act && kw < b.plo;
      pin = act && kw >= b.plo && kw <= b.phi;
      const bool cand = live && (!old || below);  // live and inactive, or certainly pruned
      c[0] += act;
      c[1] += below;
      c[2] += live && !old;
      c[3] += cand && fkg < b.glo;
      gin = cand && fkg >= b.glo && fkg <= b.ghi;
    }
    const uint64_t gi = (uint64_t)(d.offset + i);
    const long long pp = warp_append(pin, &out->pn);
    if (pp >= 0 && (unsigned long long)pp < pcap) {
      pbuf[pp] = (uint64_t)kw << 32 | gi;
      pbuf_g[pp] = fkg;
    }
    const long long gp = warp_append(gin, &out->gn);
    if (gp >= 0 && (unsigned long long)gp < gcap) gbuf[gp] = (uint64_t)fkg << 32 | gi;
  }
  // block totals: warp sums, then one atomic per counter per block
  __shared__ unsigned long long part[kWarps][4];
  const int warp = threadIdx.x / 32, lane = threadIdx.x & 31;
  for (int q = 0; q < 4; ++q) {
    const unsigned long long v = warp_sum(c[q]);
    if (lane == 0) part[warp][q] = v;
  }
  for (int o = 16; o > 0; o >>= 1) bad |= __shfl_down_sync(0xFFFFFFFFu, bad, o);
  if (lane == 0 && bad) atomicOr(&out->bad, (unsigned long long)bad);
  __syncthreads();
  if (threadIdx.x < 4) {
    unsigned long long v = 0;
    for (int w = 0; w < kWarps; ++w) v += part[w][threadIdx.x];
    if (v) atomicAdd(reinterpret_cast<unsigned long long*>(out) + threadIdx.x, v);
  }
}

// The first `need` entries of the sorted prune buffer are the pruned slots inside the
// bracket: they become grow candidates (below the grow bracket: counted; inside: appended).
// The thread of the need-th entry also writes the prune selection.
// (static, as the other non-template kernels: headers may be included by several .cu files)
static __global__ void __launch_bounds__(kThreads)
pruned_to_grow_kernel(const uint64_t* sorted, const uint32_t* sorted_g, int64_t need, BracketKeys b,
                      unsigned long long cap, ScanCounts* out, uint64_t* gbuf, Selection* psel) {
  const int64_t j = (int64_t)blockIdx.x * kThreads + threadIdx.x;
  bool gin = false, below = false;
  uint32_t fkg = 0;
  uint64_t gi = 0;
  if (j < need) {
    fkg = sorted_g[j];
    gi = sorted[j] & 0xFFFFFFFFull;
    below = fkg < b.glo;
    gin = fkg >= b.glo && fkg <= b.ghi;
  }
  const unsigned nb = __ballot_sync(0xFFFFFFFFu, below);  // one atomic per warp
  if ((threadIdx.x & 31) == 0 && nb) atomicAdd(&out->g_below, (unsigned long long)__popc(nb));
  const long long gp = warp_append(gin, &out->gn);
  if (gp >= 0 && (unsigned long long)gp < cap) gbuf[gp] = (uint64_t)fkg << 32 | gi;
  if (j == need - 1) *psel = {(uint32_t)(sorted[j] >> 32), (int64_t)(sorted[j] & 0xFFFFFFFFull) + 1};
}

// The grow selection from the need-th entry of the sorted grow buffer (flipped keys).
static __global__ void grow_selection_kernel(const uint64_t* sorted, int64_t need, Selection* gsel) {
  const uint64_t e = sorted[need - 1];
  *gsel = {~(uint32_t)(e >> 32), (int64_t)(e & 0xFFFFFFFFull) + 1};
}

// Sorts n keys (and values, if given) of a buffer into out / out_v by all 64 bits.
inline void sort_buffer(const uint64_t* in, uint64_t* out, const uint32_t* in_v, uint32_t* out_v, int64_t n,
                        const at::Device& dev) {
  if (n == 0) return;
  size_t bytes = 0;
  const int m = (int)n;
  if (in_v)
    C10_CUDA_CHECK(cub::DeviceRadixSort::SortPairs(nullptr, bytes, in, out, in_v, out_v, m, 0, 64, stream()));
  else
    C10_CUDA_CHECK(cub::DeviceRadixSort::SortKeys(nullptr, bytes, in, out, m, 0, 64, stream()));
  auto tmp = at::empty({(int64_t)bytes}, at::TensorOptions().dtype(at::kByte).device(dev));
  if (in_v)
    C10_CUDA_CHECK(cub::DeviceRadixSort::SortPairs(tmp.data_ptr(), bytes, in, out, in_v, out_v, m, 0, 64, stream()));
  else
    C10_CUDA_CHECK(cub::DeviceRadixSort::SortKeys(tmp.data_ptr(), bytes, in, out, m, 0, 64, stream()));
}

// Device selections {prune, grow} (a 2-entry Selection array, as bytes) of kp and kg
// slots for one global scope, or nullopt when a bracket missed or a buffer overflowed.
// `check` gets the same FirstPass as the radix select's and raises the same errors.
// `total`: slots in the list, fewer than 2^32 (global indices share the 64-bit sort key).
template <class W, class S, class Check>
std::optional<at::Tensor> bracketed_select(const MultiTensor& mt, const Desc* ds, const at::Device& dev,
                                           int64_t total, int64_t kp, int64_t kg, Check&& check) {
  TORCH_CHECK(total < ((int64_t)1 << 32), "chase_ext: internal: bracketed select needs < 2^32 slots");
  auto bytes = at::TensorOptions().dtype(at::kByte).device(dev);

  // 1. sample -> brackets (host)
  const int64_t count = std::min<int64_t>(total, kSample);
  std::vector<std::pair<uint32_t, uint32_t>> active;
  std::vector<uint32_t> inactive;
  if (count > 0) {
    auto sd = at::empty({count * (int64_t)sizeof(SampleSlot)}, bytes);
    sample_kernel<W, S><<<grid_for(count, kThreads), kThreads, 0, stream()>>>(
        ds, mt.n(), (uint64_t)total, count, reinterpret_cast<SampleSlot*>(sd.data_ptr()));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    const auto sh = sd.to(at::kCPU);  // syncs
    const auto* sp = reinterpret_cast<const SampleSlot*>(sh.data_ptr());
    for (int64_t j = 0; j < count; ++j) {
      if (!(sp[j].flags & 1u)) continue;
      if (sp[j].flags & 2u)
        active.push_back({sp[j].pkey, sp[j].gkey});
      else
        inactive.push_back(sp[j].gkey);
    }
  }
  const auto br = sample_brackets(active, inactive, kp, kg, (double)count / std::max<int64_t>(1, total));
  const BracketKeys b{br.first.lo, br.first.hi, br.second.lo, br.second.hi};

  // 2. one pass: counts + the slots inside the brackets. A buffer only for a selection
  // that is asked for, capacity N/32 (the brackets hold ~2% of the slots here); too
  // little memory for them means the radix select, which needs none.
  const int64_t cap = std::max<int64_t>(kSample, total / 32);
  const int64_t pcap = kp ? cap : 0, gcap = kg ? cap : 0;
  const auto i64 = at::TensorOptions().dtype(at::kLong).device(dev);
  const auto i32 = at::TensorOptions().dtype(at::kInt).device(dev);
  at::Tensor pbuf, pbuf_g, gbuf;
  try {
    pbuf = at::empty({pcap}, i64);
    pbuf_g = at::empty({pcap}, i32);
    gbuf = at::empty({gcap}, i64);
  } catch (const c10::OutOfMemoryError&) {
    return std::nullopt;
  }
  auto counts = at::zeros({(int64_t)sizeof(ScanCounts)}, bytes);
  auto* cp = reinterpret_cast<ScanCounts*>(counts.data_ptr());
  auto* pb = reinterpret_cast<uint64_t*>(pbuf.data_ptr());
  auto* pg = reinterpret_cast<uint32_t*>(pbuf_g.data_ptr());
  auto* gb = reinterpret_cast<uint64_t*>(gbuf.data_ptr());
  if (mt.tiles) {
    bracket_scan_kernel<W, S><<<grid_for(mt.tiles, 1), kThreads, 0, stream()>>>(
        ds, mt.n(), b, (unsigned long long)pcap, (unsigned long long)gcap, cp, pb, pg, gb);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  ScanCounts c;
  {
    const auto h = counts.to(at::kCPU);  // syncs
    std::memcpy(&c, h.data_ptr(), sizeof(c));
  }
  FirstPass fp;
  fp.cand = {(int64_t)c.p_total};
  fp.other = {(int64_t)c.other};
  fp.bad = (unsigned)c.bad;
  check(fp);  // raises; nothing written yet

  // k = 0: nothing pruned / grown (as the radix select returns); the kernels below
  // overwrite an entry whose k > 0, after this copy in stream order
  auto sel = upload(std::vector<Selection>{{0u, 0}, {kKeyMax, 0}}, dev);
  auto* psel = dev_ptr<Selection>(sel);

  // 3. prune selection; the pruned slots inside the bracket join the grow candidates
  if ((int64_t)c.pn > pcap || (int64_t)c.gn > gcap) return std::nullopt;
  if (kp > 0) {
    const int64_t need_p = kp - (int64_t)c.p_below;
    if (need_p <= 0 || need_p > (int64_t)c.pn) return std::nullopt;
    at::Tensor ps, pgs;
    try {
      ps = at::empty({(int64_t)c.pn}, i64);
      pgs = at::empty({(int64_t)c.pn}, i32);
    } catch (const c10::OutOfMemoryError&) {
      return std::nullopt;
    }
    auto* psorted = reinterpret_cast<uint64_t*>(ps.data_ptr());
    auto* pgsorted = reinterpret_cast<uint32_t*>(pgs.data_ptr());
    sort_buffer(pb, psorted, pg, pgsorted, (int64_t)c.pn, dev);
    pruned_to_grow_kernel<<<grid_for(need_p, kThreads), kThreads, 0, stream()>>>(
        psorted, pgsorted, need_p, b, (unsigned long long)gcap, cp, gb, psel);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    const auto h = counts.to(at::kCPU);  // syncs
    std::memcpy(&c, h.data_ptr(), sizeof(c));
    if ((int64_t)c.gn > gcap) return std::nullopt;
  }
  // 4. grow selection
  if (kg > 0) {
    const int64_t need_g = kg - (int64_t)c.g_below;
    if (need_g <= 0 || need_g > (int64_t)c.gn) return std::nullopt;
    at::Tensor gs;
    try {
      gs = at::empty({(int64_t)c.gn}, i64);
    } catch (const c10::OutOfMemoryError&) {
      return std::nullopt;
    }
    auto* gsorted = reinterpret_cast<uint64_t*>(gs.data_ptr());
    sort_buffer(gb, gsorted, nullptr, nullptr, (int64_t)c.gn, dev);
    grow_selection_kernel<<<1, 1, 0, stream()>>>(gsorted, need_g, psel + 1);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return sel;
}

}  // namespace chase_ext::cuda
