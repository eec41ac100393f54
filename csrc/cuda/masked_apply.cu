// masked_apply_ on CUDA: tensors[j] <- where(masks[owner[j]], tensors[j], 0) for the
// weights and every same-shape optimizer state, one launch (tiles over all tensors).
// Runs over flat storage: each tensor is laid out like its mask, in any dense layout
// (common/masked_apply_checks.h), so channels_last costs what contiguous does.
#include <torch/library.h>

#include <algorithm>
#include <numeric>
#include <vector>

#include "common/masked_apply_checks.h"
#include "cuda/multi_tensor.cuh"

namespace chase_ext::cuda {
namespace {

// Bytes of a 32-bit word, each 0x00 or 0xFF, picked by __byte_perm from a keep word
// whose byte k is 0xFF when slot k is kept.
__device__ __forceinline__ uint32_t pick(uint32_t keep, uint32_t selector) { return __byte_perm(keep, 0u, selector); }

// Four slots q*4 .. q*4+3 of one tensor: one 4-byte mask load and one vector
// read-modify-write of the values, stored only when a value changes (a masked slot that
// is already 0 costs no write). keep: byte k = 0xFF if slot k is kept.
__device__ __forceinline__ void apply_quad(void* w, int elem, int64_t q, uint32_t keep) {
  switch (elem) {
    case 4: {
      uint4* p = static_cast<uint4*>(w) + q;
      const uint4 v = *p;
      const uint4 r = {v.x & pick(keep, 0x0000), v.y & pick(keep, 0x1111), v.z & pick(keep, 0x2222),
                       v.w & pick(keep, 0x3333)};
      if ((r.x ^ v.x) | (r.y ^ v.y) | (r.z ^ v.z) | (r.w ^ v.w)) *p = r;
      break;
    }
    case 2: {
      uint2* p = static_cast<uint2*>(w) + q;
      const uint2 v = *p;
      const uint2 r = {v.x & pick(keep, 0x1100), v.y & pick(keep, 0x3322)};
      if ((r.x ^ v.x) | (r.y ^ v.y)) *p = r;
      break;
    }
    case 8: {
      uint4* p = static_cast<uint4*>(w) + 2 * q;  // two 16-byte halves, two slots each
      const uint4 a = p[0], b = p[1];
      const uint32_t k0 = pick(keep, 0x0000), k1 = pick(keep, 0x1111), k2 = pick(keep, 0x2222),
                     k3 = pick(keep, 0x3333);
      const uint4 ra = {a.x & k0, a.y & k0, a.z & k1, a.w & k1}, rb = {b.x & k2, b.y & k2, b.z & k3, b.w & k3};
      if ((ra.x ^ a.x) | (ra.y ^ a.y) | (ra.z ^ a.z) | (ra.w ^ a.w)) p[0] = ra;
      if ((rb.x ^ b.x) | (rb.y ^ b.y) | (rb.z ^ b.z) | (rb.w ^ b.w)) p[1] = rb;
      break;
    }
    default: {  // 1-byte floats
      uint32_t* p = static_cast<uint32_t*>(w) + q;
      const uint32_t v = *p, r = v & keep;
      if (r != v) *p = r;
    }
  }
}

__global__ void __launch_bounds__(kThreads) masked_apply_kernel(const Desc* ds, int n) {
  const TileRef tl = locate_tile(ds, n, blockIdx.x);
  const Desc d = ds[tl.t];
  // Vector path when the values are aligned to 4 slots (at most 16 bytes) and the mask to 4
  // bytes; tiles start at multiples of kTile, so every quad of the tile is aligned too.
  const uintptr_t align = d.elem >= 4 ? 16 : 4 * d.elem;
  if (reinterpret_cast<uintptr_t>(d.w) % align == 0 && reinterpret_cast<uintptr_t>(d.mask) % 4 == 0) {
    const uint32_t* mq = reinterpret_cast<const uint32_t*>(d.mask);
    const int64_t q1 = tl.end / 4;
    for (int64_t q = tl.start / 4 + threadIdx.x; q < q1; q += kThreads)
      apply_quad(d.w, d.elem, q, mq[q] * 0xFFu);  // bool bytes are 0 or 1: 0x00 / 0xFF per byte
    for (int64_t i = q1 * 4 + threadIdx.x; i < tl.end; i += kThreads)  // the tensor's last 1-3 slots
      if (!d.mask[i]) zero_elem(d.w, d.elem, i);
    return;
  }
  for (int64_t i = tl.start + threadIdx.x; i < tl.end; i += kThreads)
    if (!d.mask[i]) zero_elem(d.w, d.elem, i);  // zero bits are 0.0 in every float format
}

void masked_apply(at::TensorList tensors, at::TensorList masks, c10::IntArrayRef owner) {
  const char* op = "chase_ext.masked_apply_";
  check_masked_apply_args(op, tensors, masks, owner);
  if (tensors.empty()) return;
  const at::Device dev = tensors[0].device();
  check_devices(op, "tensors", tensors, dev);  // one launch needs one device
  TORCH_CHECK(dev.is_cuda(), op, ": tensors[0] is on ", dev, ", expected a CUDA device");
  const c10::cuda::CUDAGuard guard(dev);

  // Tiles mask by mask (a weight, then its states), so the second read of a piece of a
  // mask finds it in L2; the result does not depend on the order.
  std::vector<size_t> order(tensors.size());
  std::iota(order.begin(), order.end(), size_t(0));
  std::stable_sort(order.begin(), order.end(), [&](size_t a, size_t b) { return owner[a] < owner[b]; });
  std::vector<at::Tensor> ordered;
  ordered.reserve(order.size());
  for (size_t j : order) ordered.push_back(tensors[j]);
  MultiTensor mt = make_multi(ordered, {}, {}, false);
  if (mt.tiles == 0) return;
  for (int j = 0; j < mt.n(); ++j) mt.d[j].mask = masks[owner[order[j]]].data_ptr<bool>();
  const auto dd = upload(mt.d, dev, /*capturable=*/true);  // plain steps may be captured
  masked_apply_kernel<<<grid_for(mt.tiles, 1), kThreads, 0, stream()>>>(dev_ptr<Desc>(dd), mt.n());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

TORCH_LIBRARY_IMPL(chase_ext, CUDA, m) { m.impl("masked_apply_", &masked_apply); }

}  // namespace chase_ext::cuda
