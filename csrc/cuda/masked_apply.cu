// masked_apply_ on CUDA: tensors[j] <- where(masks[owner[j]], tensors[j], 0) for the
// weights and every same-shape optimizer state, one launch (tiles over all tensors).
#include <torch/library.h>

#include "cuda/multi_tensor.cuh"

namespace chase_ext::cuda {
namespace {

__global__ void __launch_bounds__(kThreads) masked_apply_kernel(const Desc* ds, int n) {
  const TileRef tl = locate_tile(ds, n, blockIdx.x);
  const Desc d = ds[tl.t];
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

  MultiTensor mt = make_multi(tensors, {}, {}, false);
  if (mt.tiles == 0) return;
  for (int j = 0; j < mt.n(); ++j) mt.d[j].mask = masks[owner[j]].data_ptr<bool>();
  const auto dd = upload(mt.d, dev);
  masked_apply_kernel<<<grid_for(mt.tiles, 1), kThreads, 0, stream()>>>(dev_ptr<Desc>(dd), mt.n());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

TORCH_LIBRARY_IMPL(chase_ext, CUDA, m) { m.impl("masked_apply_", &masked_apply); }

}  // namespace chase_ext::cuda
