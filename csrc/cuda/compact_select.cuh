// The radix select with its candidates compacted after the first pass
// (CHASE_EXT_CUDA_SELECT=compact): the same selection as radix_select.cuh (the k-th
// smallest key per scope, ties to the lower global index), with two full passes over the
// tensors per selection instead of five and one host wait instead of six.
//
//  1. pass 0 over the tiles: a 4,096-bin histogram of the key's top 12 bits (sign,
//     exponent and 3 mantissa bits: an eighth of an octave per bin) and, for the prune,
//     the validation data; the host reads it (the one wait: the caller's checks raise
//     here, before anything is written), walks the bins and learns, per scope, the bin
//     that holds the k-th key, its rank `need` in that bin and the bin's size.
//  2. one pass over the tiles writes every candidate of that bin to a list as one 64-bit
//     entry, (low 20 key bits << 32) | global index: entries order as the selection does
//     (key, then index), so the k-th entry *is* the selection, ties included. The same
//     pass histograms the entries' next 8 bits.
//  3. on the device, a 256-thread kernel per scope walks those bins; then each step reads
//     the list, keeps the entries that match the bits fixed so far (writing them to the
//     other of two lists, which shrink ~256x a step unless keys tie) and histograms their
//     next 8 bits; six steps fix the remaining 44 bits (12 of key, 32 of index).
//  4. the entry left is the k-th: its key and index + 1 are the Selection the row pass reads.
// Needs global indices below 2^32 (the caller checks) and lists within the caller's
// byte limit (one bin may hold most candidates: long runs of equal scores); the caller
// falls back to radix_select otherwise.
#pragma once
#include <cub/block/block_scan.cuh>

#include <functional>
#include <optional>

#include "cuda/radix_select.cuh"

namespace chase_ext::cuda {

constexpr int kTopBits = 12;  // pass 0 bins by the key's top 12 bits
constexpr int kTopBins = 1 << kTopBits;
constexpr int kLowBits = 32 - kTopBits;            // key bits an entry carries
constexpr int kEntryBits = kLowBits + 32;          // 52: low key bits, then the global index

// Per scope, fixed after pass 0: where its entries go and how many there are.
struct ListScope {
  int64_t base = 0;  // first slot of this scope in either list (a multiple of kTile)
  int64_t cap = 0;   // candidates in its top bin (0: no selection, k = 0)
  uint32_t top = 0;  // the k-th key's top 12 bits
};

// Device state per scope, one int64 tensor: [need | prefix | count of list 0 | count of list 1].
struct ListState {
  int64_t* need;
  unsigned long long* prefix;  // the entry bits fixed so far
  unsigned long long* count[2];
};

// A block's kept entries, gathered in shared memory in rounds of kThreads slots and
// written out with one atomic per block (a global scope's list has one counter, which
// per-warp atomics from every block would serialize on). Every thread of the block calls
// add() and flush() the same number of times.
struct BlockAppend {
  uint64_t* buf;     // shared, kTile entries: one tile's or list chunk's worth
  int* warp_counts;  // shared, kWarps
  int used = 0;      // the same in every thread

  __device__ void add(bool keep, uint64_t e) {
    const unsigned lanes = __ballot_sync(0xFFFFFFFFu, keep);
    const int lane = threadIdx.x & 31, warp = threadIdx.x / 32;
    if (lane == 0) warp_counts[warp] = __popc(lanes);
    __syncthreads();
    int before = used, total = 0;
    for (int w = 0; w < kWarps; ++w) {
      before += w < warp ? warp_counts[w] : 0;
      total += warp_counts[w];
    }
    if (keep) buf[before + __popc(lanes & ((1u << lane) - 1u))] = e;
    used += total;
    __syncthreads();  // warp_counts is reused by the next round
  }

  // Copies the entries to dst[base + position], the positions taken from *count.
  __device__ void flush(uint64_t* dst, int64_t base, int64_t cap, unsigned long long* count,
                        unsigned long long* first) {
    if (threadIdx.x == 0) *first = used ? atomicAdd(count, (unsigned long long)used) : 0;
    __syncthreads();
    const int64_t at = (int64_t)*first;
    for (int j = threadIdx.x; j < used; j += kThreads)
      if (at + j < cap) dst[base + at + j] = buf[j];  // always true when the counts are right
  }
};

// Adds bits [shift, shift + 8) of `e` (when `keep`) to the block's 256-bin histogram, one
// shared atomic per distinct bin in the warp. Every lane of the warp must call it.
__device__ __forceinline__ void hist_add(bool keep, uint64_t e, int shift, unsigned* hist) {
  const int bin = keep ? (int)((e >> shift) & 255u) : -1;
  const unsigned peers = __match_any_sync(0xFFFFFFFFu, bin);
  if (bin >= 0 && (threadIdx.x & 31) == __ffs(peers) - 1) atomicAdd(&hist[bin], (unsigned)__popc(peers));
}

__device__ __forceinline__ void flush_hist(const unsigned* hist, unsigned long long* stats_row) {
  __syncthreads();
  for (int b = threadIdx.x; b < 256; b += kThreads)
    if (hist[b]) atomicAdd(&stats_row[b], (unsigned long long)hist[b]);
}

// Step 2: every candidate whose key's top 12 bits are its scope's `top`, to list 0.
template <class Src>
__global__ void __launch_bounds__(kThreads)
compact_kernel(const Desc* ds, int n, Src src, const ListScope* ls, ListState st, uint64_t* list,
               unsigned long long* stats) {
  __shared__ unsigned hist[256];
  __shared__ uint64_t buf[kTile];
  __shared__ int warp_counts[kWarps];
  __shared__ unsigned long long first;
  for (int b = threadIdx.x; b < 256; b += kThreads) hist[b] = 0;
  const TileRef tl = locate_tile(ds, n, blockIdx.x);
  const Desc d = ds[tl.t];
  const ListScope L = ls[d.scope];
  if (L.cap == 0) return;  // block-uniform: no selection in this scope
  __syncthreads();
  BlockAppend out{buf, warp_counts};
  for (int64_t base = tl.start; base < tl.end; base += kThreads) {  // block-uniform: whole warps
    const int64_t i = base + threadIdx.x;
    uint32_t key = 0;
    const bool keep = i < tl.end && src.cand(d, i, live_at(d, i), key) && (key >> kLowBits) == L.top;
    const uint64_t e = ((uint64_t)(key & ((1u << kLowBits) - 1u)) << 32) | (uint32_t)(d.offset + i);
    hist_add(keep, e, kEntryBits - 8, hist);
    out.add(keep, e);
  }
  out.flush(list, L.base, L.cap, &st.count[0][d.scope], &first);
  flush_hist(hist, stats + (int64_t)d.scope * 256);
}

// Per scope: the bin of bits [shift, shift + 8) where the cumulative count reaches `need`
// (walk_bins' rule) joins the prefix, `need` becomes the rank in it; the histogram and
// the count of the list the next step writes (`next`) are zeroed.
static __global__ void __launch_bounds__(256)
list_walk_kernel(unsigned long long* stats, ListState st, int shift, int next) {
  const int s = blockIdx.x;
  const int b = threadIdx.x;
  const int64_t want = st.need[s];
  unsigned long long* hs = stats + (int64_t)s * 256;
  const int64_t h = (int64_t)hs[b];
  using Scan = cub::BlockScan<int64_t, 256>;
  __shared__ typename Scan::TempStorage tmp;
  int64_t incl;
  Scan(tmp).InclusiveSum(h, incl);
  const int64_t excl = incl - h;
  __syncthreads();  // every thread has read need[s] before one thread changes it
  hs[b] = 0;
  if (b == 0) st.count[next][s] = 0;
  if (want > 0 && excl < want && (want <= incl || b == 255)) {
    st.prefix[s] |= (unsigned long long)b << shift;
    st.need[s] = want - excl;
  }
}

// The scope of list slot x: the last scope whose base is <= x (scopes without entries
// share their base with the next one and are skipped that way).
__device__ __forceinline__ int find_scope(const ListScope* ls, int scopes, int64_t x) {
  int lo = 0, hi = scopes - 1;
  while (lo < hi) {
    const int mid = (lo + hi + 1) / 2;
    if (ls[mid].base <= x) lo = mid; else hi = mid - 1;
  }
  return lo;
}

// Step 3: the entries of list `from` that match the prefix on bits >= fixed, to list
// 1 - from, histogramming bits [hist_shift, hist_shift + 8) (the 8 below `fixed`; at the
// end the lowest 8, whose upper bits are then fixed already). One block per kTile list
// slots.
static __global__ void __launch_bounds__(kThreads)
list_step_kernel(const ListScope* ls, int scopes, ListState st, const uint64_t* src, uint64_t* dst, int from,
                 int fixed, int hist_shift, unsigned long long* stats) {
  __shared__ unsigned hist[256];
  __shared__ uint64_t buf[kTile];
  __shared__ int warp_counts[kWarps];
  __shared__ unsigned long long first;
  for (int b = threadIdx.x; b < 256; b += kThreads) hist[b] = 0;
  const int64_t start = (int64_t)blockIdx.x * kTile;
  const int s = find_scope(ls, scopes, start);
  const ListScope L = ls[s];
  // never past the scope's region, whatever the count says (it equals cap today: same source, same stream)
  const int64_t counted = (int64_t)st.count[from][s];
  const int64_t used = counted < L.cap ? counted : L.cap;
  const int64_t end = start + kTile < L.base + used ? start + kTile : L.base + used;
  if (L.cap == 0 || st.need[s] <= 0 || start >= end) return;  // block-uniform
  const unsigned long long want = st.prefix[s] >> fixed;
  __syncthreads();
  BlockAppend out{buf, warp_counts};
  for (int64_t base = start; base < end; base += kThreads) {  // block-uniform: whole warps
    const int64_t x = base + threadIdx.x;
    const uint64_t e = x < end ? src[x] : 0;
    const bool keep = x < end && (e >> fixed) == want;
    hist_add(keep, e, hist_shift, hist);
    out.add(keep, e);
  }
  out.flush(dst, L.base, L.cap, &st.count[1 - from][s], &first);
  flush_hist(hist, stats + (int64_t)s * 256);
}

// Step 4: the Selection of every scope (in the original key order: flipped back when
// `largest`; none when k = 0).
static __global__ void list_finish_kernel(const ListScope* ls, int scopes, ListState st, bool largest, Selection* out) {
  const int s = blockIdx.x * blockDim.x + threadIdx.x;
  if (s >= scopes) return;
  if (ls[s].cap == 0) {
    out[s] = {largest ? kKeyMax : 0u, 0};
    return;
  }
  const unsigned long long e = st.prefix[s];
  const uint32_t key = (ls[s].top << kLowBits) | (uint32_t)(e >> 32);
  out[s] = {largest ? ~key : key, (int64_t)(uint32_t)e + 1};
}

// The Selections of ks[s] slots for every scope, as a byte tensor on the device
// (dev_ptr<Selection>), or nothing when the two lists would outgrow `max_list_bytes` or
// cannot be allocated (the caller then takes radix_select, which reads pass 0 again). `check`, when given,
// runs on what pass 0 learned and may throw.
template <class Src>
std::optional<at::Tensor> compact_select(const MultiTensor& mt, const Desc* ds, const at::Device& dev, int scopes,
                                         const Src& src, const std::vector<int64_t>& ks, bool largest,
                                         const std::function<void(const FirstPass&)>* check,
                                         int64_t max_list_bytes) {
  const StatsLayout sl{scopes, kTopBins};
  const auto opts = at::TensorOptions().device(dev);
  auto top = at::zeros({sl.size()}, opts.dtype(at::kLong));
  auto* tp = reinterpret_cast<unsigned long long*>(top.data_ptr<int64_t>());
  const unsigned grid = grid_for(mt.tiles, 1);
  if (grid) {  // step 1: radix_hist_kernel's pass 0 on the top 12 bits
    if (check)
      radix_hist_kernel<Src, true, kTopBits><<<grid, kThreads, 0, stream()>>>(ds, mt.n(), src, nullptr, 0, sl, tp);
    else
      radix_hist_kernel<Src, false, kTopBits><<<grid, kThreads, 0, stream()>>>(ds, mt.n(), src, nullptr, 0, sl, tp);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  // the one wait; into pinned memory (a layer scope reads 32 KB per layer, 1.8 MB for ResNet-50)
  auto h = at::empty({sl.size()}, at::TensorOptions().dtype(at::kLong).pinned_memory(true));
  h.copy_(top, /*non_blocking=*/true);
  C10_CUDA_CHECK(cudaStreamSynchronize(stream()));
  const int64_t* hp = h.data_ptr<int64_t>();
  const FirstPass fp = first_pass_of(hp, sl);
  if (check) (*check)(fp);
  std::vector<ListScope> ls(scopes);
  std::vector<int64_t> need(scopes, 0);
  int64_t slots = 0;  // entries, each scope padded to whole tiles
  for (int s = 0; s < scopes; ++s) {
    TORCH_CHECK(ks[s] >= 0 && ks[s] <= fp.cand[s], "chase_ext: internal: unchecked k");
    ls[s].base = slots;
    if (ks[s] == 0) continue;
    need[s] = ks[s];
    ls[s].top = (uint32_t)walk_bins(hp + (int64_t)s * kTopBins, need[s], kTopBins);
    ls[s].cap = hp[(int64_t)s * kTopBins + ls[s].top];
    slots += (ls[s].cap + kTile - 1) / kTile * kTile;
  }
  // the limit counts what is allocated: each selecting scope padded to whole tiles (up to
  // 64 KB per scope beyond its entries; many tiny per-layer scopes add up). Where it does
  // not fit, or the allocation fails, the caller falls back to the radix select.
  if (2 * slots * (int64_t)sizeof(uint64_t) > max_list_bytes) return std::nullopt;

  // device state: need, prefix, the two list counts (zero)
  std::vector<int64_t> init(4 * (size_t)scopes, 0);
  std::copy(need.begin(), need.end(), init.begin());
  auto state = upload(init, dev);
  auto* sv = dev_ptr<int64_t>(state);
  ListState st{sv, reinterpret_cast<unsigned long long*>(sv + scopes),
               {reinterpret_cast<unsigned long long*>(sv + 2 * scopes),
                reinterpret_cast<unsigned long long*>(sv + 3 * scopes)}};
  auto lsd = upload(ls, dev);
  const ListScope* lp = dev_ptr<ListScope>(lsd);
  auto stats = at::zeros({(int64_t)scopes * 256}, opts.dtype(at::kLong));  // the steps' 256 bins per scope
  auto* sp = reinterpret_cast<unsigned long long*>(stats.data_ptr<int64_t>());
  at::Tensor lists;
  try {
    lists = at::empty({std::max<int64_t>(2 * slots, 1)}, opts.dtype(at::kLong));
  } catch (const c10::OutOfMemoryError&) {
    return std::nullopt;
  }
  uint64_t* list[2] = {reinterpret_cast<uint64_t*>(lists.data_ptr<int64_t>()),
                       reinterpret_cast<uint64_t*>(lists.data_ptr<int64_t>()) + slots};
  if (grid && slots) {
    compact_kernel<Src><<<grid, kThreads, 0, stream()>>>(ds, mt.n(), src, lp, st, list[0], sp);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    const unsigned lgrid = grid_for(slots, kTile);
    int from = 0;
    // fix bits [fixed, fixed + 8): 44, 36, ..., 4; each step then keeps the matching entries
    // and histograms the 8 bits below (the lowest 8 at the end: bits 4-7 are fixed by then,
    // and the last walk ORs them in again unchanged)
    for (int fixed = kEntryBits - 8; fixed > 0; fixed -= 8) {
      list_walk_kernel<<<scopes, 256, 0, stream()>>>(sp, st, fixed, 1 - from);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      list_step_kernel<<<lgrid, kThreads, 0, stream()>>>(lp, scopes, st, list[from], list[1 - from], from, fixed,
                                                         std::max(fixed - 8, 0), sp);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      from = 1 - from;
    }
    list_walk_kernel<<<scopes, 256, 0, stream()>>>(sp, st, 0, 1 - from);  // the index's lowest bits
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  auto sel = at::empty({(int64_t)(scopes * sizeof(Selection))}, opts.dtype(at::kByte));
  list_finish_kernel<<<(scopes + 127) / 128, 128, 0, stream()>>>(lp, scopes, st, largest, dev_ptr<Selection>(sel));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return sel;
}

}  // namespace chase_ext::cuda
