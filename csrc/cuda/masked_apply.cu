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
  for (size_t i = 0; i < masks.size(); ++i) {
    TORCH_CHECK(masks[i].scalar_type() == at::kBool, op, ": masks[", i, "] must be bool, got ",
                masks[i].scalar_type());
    TORCH_CHECK(masks[i].is_contiguous(), op, ": masks[", i, "] must be contiguous");
  }
  TORCH_CHECK(owner.size() == tensors.size(), op, ": owner has ", owner.size(), " entries but there are ",
              tensors.size(), " tensors");
  for (size_t j = 0; j < tensors.size(); ++j) {
    TORCH_CHECK(owner[j] >= 0 && owner[j] < (int64_t)masks.size(), op, ": owner[", j, "]=", owner[j],
                " is out of range [0, ", masks.size(), ")");
    const auto& m = masks[owner[j]];
    TORCH_CHECK(tensors[j].sizes() == m.sizes(), op, ": tensors[", j, "] has shape ", tensors[j].sizes(),
                " but masks[", owner[j], "] has shape ", m.sizes());
    TORCH_CHECK(tensors[j].device() == m.device(), op, ": tensors[", j, "] is on ", tensors[j].device(),
                " but masks[", owner[j], "] is on ", m.device());
    TORCH_CHECK(tensors[j].is_contiguous(), op, ": tensors[", j, "] must be contiguous");
    TORCH_CHECK(tensors[j].is_floating_point(), op, ": tensors[", j, "] must be floating point, got ",
                tensors[j].scalar_type());
  }
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
