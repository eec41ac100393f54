// CUDA helpers for multi-tensor ops: a list of tensors seen as one global order (tensor
// after tensor, each flattened row-major), described to the kernels by one device array
// of per-tensor descriptors, so that one launch covers the whole list.
//
// Two ways to split the work over blocks:
//  * tiles: block b handles kTile consecutive slots of one tensor. Tile order is global
//    order, which the selection kernels rely on to place ties.
//  * row segments: warp w handles up to kSeg slots of one row (output channel), so the
//    per-row statistics need no atomics unless a row is longer than kSeg.
#pragma once
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "common/checks.h"
#include "common/dispatch.h"
#include "common/keys.h"

namespace chase_ext::cuda {

constexpr int kThreads = 256;              // threads per block, every kernel
constexpr int kWarps = kThreads / 32;
constexpr int64_t kTile = 16 * kThreads;   // slots per block in tile kernels
constexpr int64_t kSeg = 2048;             // slots per warp in row kernels

// One tensor of the list. Plain data, copied to the device as bytes.
struct Desc {
  void* w = nullptr;              // values: keys / weights / tensor to mask
  const void* s = nullptr;        // scores (mask_update_ only)
  bool* mask = nullptr;
  const bool* live_row = nullptr; // nullptr: every row live
  const bool* live_col = nullptr; // nullptr: every column live
  int64_t numel = 0, offset = 0;  // offset: global index of slot 0
  int64_t rows = 0, row_stride = 0, cols = 1, col_stride = 0;
  int64_t tile_begin = 0;         // first tile of this tensor (tiles are numbered globally)
  int64_t item_begin = 0;         // first row segment of this tensor
  int64_t segs = 0;               // row segments per row
  int64_t row_base = 0;           // first output row (per-row outputs are concatenated)
  int32_t scope = 0;              // which selection this tensor takes part in
  int32_t elem = 0;               // bytes per element of w (masked_apply_)
  int32_t state_begin = 0, state_end = 0;  // owned states: [begin, end) of the state array
  bool small = true;              // numel < 2^32: index math in 32 bits (much cheaper)
};

// A selection (key, cutoff) as in common/keys.h::in_selection; same layout on both sides.
struct Selection {
  uint32_t key;
  int64_t cutoff;
};

// Host side: descriptors + totals, filled by make_multi and completed by the caller
// (data pointers), then uploaded.
struct MultiTensor {
  std::vector<Desc> d;
  int64_t tiles = 0, items = 0, rows = 0;
  int n() const { return (int)d.size(); }
  int64_t tiles_of(int t) const { return (t + 1 < n() ? d[t + 1].tile_begin : tiles) - d[t].tile_begin; }
};

// Shapes, offsets, tile/segment numbering and liveness pointers of `ts` (same conventions
// as the CPU layouts: a 0-dim tensor is one row of one slot). `per_tensor_scope` gives
// tensor t scope t, else every tensor is in scope 0.
inline MultiTensor make_multi(TensorList ts, TensorList live_rows, TensorList live_cols, bool per_tensor_scope) {
  MultiTensor mt;
  mt.d.resize(ts.size());
  for (size_t t = 0; t < ts.size(); ++t) {
    Desc& l = mt.d[t];
    const auto& x = ts[t];
    l.w = x.data_ptr();
    l.numel = x.numel();
    l.offset = t ? mt.d[t - 1].offset + mt.d[t - 1].numel : 0;
    l.rows = x.dim() == 0 ? 1 : x.size(0);
    l.row_stride = l.rows ? l.numel / l.rows : 0;
    l.cols = x.dim() >= 2 ? x.size(1) : 1;
    l.col_stride = l.cols ? l.row_stride / l.cols : 0;
    l.small = l.numel <= (int64_t)UINT32_MAX;
    l.elem = (int32_t)x.element_size();
    if (!live_rows.empty()) l.live_row = live_rows[t].data_ptr<bool>();
    if (!live_cols.empty()) l.live_col = live_cols[t].data_ptr<bool>();
    l.scope = per_tensor_scope ? (int32_t)t : 0;
    l.tile_begin = mt.tiles;
    mt.tiles += (l.numel + kTile - 1) / kTile;
    l.segs = (l.row_stride + kSeg - 1) / kSeg;  // 0 when rows are empty
    l.item_begin = mt.items;
    mt.items += l.rows * l.segs;
    l.row_base = mt.rows;
    mt.rows += l.rows;
  }
  return mt;
}

inline cudaStream_t stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

// Under CUDA graph capture the bytes travel as kernel parameters, which the graph keeps:
// each replay writes them again (into the graph's own memory) before the op's kernels
// read them. Blobs stay under the classic 4 KB parameter limit.
constexpr int kBlobBytes = 3840;
struct Blob {
  unsigned char b[kBlobBytes];
};

template <int Unused = 0>  // a template, so that every .cu file may instantiate it
__global__ void write_blob_kernel(unsigned char* dst, Blob blob, int n) {
  for (int i = threadIdx.x; i < n; i += blockDim.x) dst[i] = blob.b[i];
}

// Copies a vector of plain structs to the device without making the host wait for the
// GPU: the bytes go through a pinned staging buffer and an asynchronous copy on the
// current stream (the caching host allocator keeps the buffer until that copy is done).
// A copy from pageable memory would sync the stream, i.e. stall every training step in
// masked_apply_. Returns a byte tensor; use dev_ptr<T>() on it.
// A replay of a captured staging copy would read the staging buffer again after it was
// reused, so under capture a `capturable` op (masked_apply_: plain steps may be captured)
// writes the bytes with write_blob_kernel instead, and the others refuse with a clear
// error (they read results back on the host, which a capture cannot do either).
template <class T>
at::Tensor upload(const std::vector<T>& v, const at::Device& dev, bool capturable = false) {
  cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
  C10_CUDA_CHECK(cudaStreamIsCapturing(stream(), &capture));
  TORCH_CHECK(capture == cudaStreamCaptureStatusNone || capturable,
              "chase_ext: this CUDA op cannot be captured in a CUDA graph (it reads results back on "
              "the host); only masked_apply_ can, i.e. ChaseOptimizer's plain steps "
              "(ChaseOptimizer.plain_steps_ahead)");
  TORCH_CHECK(capture != cudaStreamCaptureStatusInvalidated,
              "chase_ext: the CUDA graph capture of the current stream was invalidated before this op");
  const int64_t bytes = (int64_t)(v.size() * sizeof(T));
  auto out = at::empty({bytes}, at::TensorOptions().dtype(at::kByte).device(dev));
  if (!bytes) return out;
  if (capture == cudaStreamCaptureStatusActive) {
    const auto* src = reinterpret_cast<const unsigned char*>(v.data());
    auto* dst = static_cast<unsigned char*>(out.data_ptr());
    for (int64_t off = 0; off < bytes; off += kBlobBytes) {
      Blob blob;
      const int n = (int)std::min<int64_t>(kBlobBytes, bytes - off);
      std::memcpy(blob.b, src + off, n);
      write_blob_kernel<<<1, kThreads, 0, stream()>>>(dst + off, blob, n);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    return out;
  }
  auto host = at::empty({bytes}, at::TensorOptions().dtype(at::kByte).pinned_memory(true));
  std::memcpy(host.data_ptr(), v.data(), bytes);
  out.copy_(host, /*non_blocking=*/true);
  return out;
}

template <class T>
T* dev_ptr(const at::Tensor& bytes) {
  return reinterpret_cast<T*>(bytes.data_ptr());
}

// Grid size for `units` work units of `per_block` each; fails loudly instead of
// silently truncating to the CUDA grid limit.
inline unsigned grid_for(int64_t units, int64_t per_block) {
  const int64_t g = (units + per_block - 1) / per_block;
  TORCH_CHECK(g <= 0x7FFFFFFF, "chase_ext: too much work for one launch (", units, " units)");
  return (unsigned)g;
}

// ------------------------------------------------------------------ device helpers

template <class T>
__device__ __forceinline__ float load(const void* p, int64_t i) {
  return static_cast<float>(static_cast<const T*>(p)[i]);
}

__device__ __forceinline__ bool finite(float v) {
  return (__float_as_uint(v) & 0x7F800000u) != 0x7F800000u;
}

// a / b for 0 <= a, 0 < b; 32-bit when the tensor is small (64-bit division is slow).
__device__ __forceinline__ int64_t div_idx(int64_t a, int64_t b, bool small) {
  return small ? (int64_t)((uint32_t)a / (uint32_t)b) : a / b;
}

// Is slot i of tensor d in a live row and a live column?
__device__ __forceinline__ bool live_at(const Desc& d, int64_t i) {
  if (!d.live_row && !d.live_col) return true;
  const int64_t r = div_idx(i, d.row_stride, d.small);
  if (d.live_row && !d.live_row[r]) return false;
  if (d.live_col) return d.live_col[div_idx(i - r * d.row_stride, d.col_stride, d.small)];
  return true;
}

// Index of the tensor whose numbered range [begin, next begin) holds x: the last t with
// begin(t) <= x. Tensors with an empty range share their begin with the next tensor and
// are skipped by taking the last one. Requires begin(0) == 0 <= x < total.
template <class Begin>
__device__ __forceinline__ int find_tensor(const Desc* ds, int n, int64_t x, Begin begin) {
  int lo = 0, hi = n - 1;
  while (lo < hi) {
    const int mid = (lo + hi + 1) / 2;
    if (begin(ds[mid]) <= x) lo = mid; else hi = mid - 1;
  }
  return lo;
}

struct TileRef {
  int t;
  int64_t start, end;  // local slots [start, end) of tensor t
};

__device__ __forceinline__ TileRef locate_tile(const Desc* ds, int n, int64_t tile) {
  const int t = find_tensor(ds, n, tile, [](const Desc& d) { return d.tile_begin; });
  const int64_t start = (tile - ds[t].tile_begin) * kTile;
  const int64_t end = start + kTile < ds[t].numel ? start + kTile : ds[t].numel;
  return {t, start, end};
}

// Zero bits are 0.0 in every float format, so states of any dtype are zeroed by size.
__device__ __forceinline__ void zero_elem(void* p, int elem, int64_t i) {
  switch (elem) {
    case 8: static_cast<uint64_t*>(p)[i] = 0; break;
    case 4: static_cast<uint32_t*>(p)[i] = 0; break;
    case 2: static_cast<uint16_t*>(p)[i] = 0; break;
    default:
      for (int b = 0; b < elem; ++b) static_cast<char*>(p)[i * elem + b] = 0;
  }
}

template <class T>
__device__ __forceinline__ T warp_sum(T v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xFFFFFFFFu, v, o);
  return v;  // valid in lane 0
}

}  // namespace chase_ext::cuda
