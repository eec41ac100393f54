// gather_channels_ on CUDA: compact a tensor along dim 0 or 1 to the kept channels, in
// place. Parallel in-place compaction would race (blocks move onto blocks not yet read),
// so the kept channels are gathered into a temporary of the result's size (at most one
// tensor's size, never a copy of the model) and copied back into the prefix of the
// tensor's memory. Any dtype: blocks are moved as bytes.
#include <torch/library.h>

#include "cuda/multi_tensor.cuh"

namespace chase_ext::cuda {
namespace {

// dst[o][j][u] = src[o][keep[j]][u] in units U; `inner` units per channel block.
template <class U>
__global__ void __launch_bounds__(kThreads)
gather_kernel(const U* __restrict__ src, U* __restrict__ dst, const int64_t* __restrict__ keep, int64_t K,
              int64_t C, int64_t inner, int64_t total) {
  for (int64_t x = (int64_t)blockIdx.x * kThreads + threadIdx.x; x < total; x += (int64_t)gridDim.x * kThreads) {
    const int64_t oj = x / inner, u = x - oj * inner;
    const int64_t o = oj / K, j = oj - o * K;
    dst[x] = src[(o * C + keep[j]) * inner + u];
  }
}

template <class U>
void launch_gather(const void* src, void* dst, const int64_t* keep, int64_t K, int64_t C, int64_t inner_bytes,
                   int64_t total_bytes) {
  const int64_t inner = inner_bytes / (int64_t)sizeof(U), total = total_bytes / (int64_t)sizeof(U);
  const unsigned grid = (unsigned)std::min<int64_t>((total + kThreads - 1) / kThreads, 1 << 20);
  gather_kernel<U><<<grid, kThreads, 0, stream()>>>(static_cast<const U*>(src), static_cast<U*>(dst), keep, K, C,
                                                    inner, total);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void gather_channels(const at::Tensor& tensor, const at::Tensor& keep, int64_t dim) {
  const char* op = "chase_ext.gather_channels_";
  check_gather_args(op, tensor, keep, dim);
  TORCH_CHECK(tensor.is_cuda(), op, ": tensor is on ", tensor.device(), ", expected a CUDA device");
  TORCH_CHECK(keep.is_cpu() || keep.device() == tensor.device(), op, ": keep is on ", keep.device(),
              " but tensor is on ", tensor.device(), " (keep may be on the CPU or the tensor's device)");
  const c10::cuda::CUDAGuard guard(tensor.device());
  // Validate on the host (keep is small; a device keep costs one sync).
  const at::Tensor kc = keep.to(at::kCPU).contiguous();
  const int64_t* kp = kc.data_ptr<int64_t>();
  const int64_t C = tensor.size(dim), K = kc.numel();
  for (int64_t j = 0; j < K; ++j) {
    TORCH_CHECK(kp[j] >= 0 && kp[j] < C, op, ": keep[", j, "]=", kp[j], " is out of range [0, ", C, ")");
    TORCH_CHECK(j == 0 || kp[j] > kp[j - 1], op, ": keep must be strictly increasing (keep[", j, "]=", kp[j],
                " after ", kp[j - 1], ")");
  }
  if (tensor.numel() == 0 || K == C || K == 0) return;  // K == 0: the result is empty
  const at::Tensor kd = keep.is_cuda() ? keep.contiguous() : kc.to(tensor.device());

  const int64_t es = tensor.element_size();
  const int64_t outer = dim == 0 ? 1 : tensor.size(0);
  const int64_t inner_bytes = tensor.numel() / (outer * C) * es;  // bytes per channel block
  const int64_t total_bytes = outer * K * inner_bytes;
  auto tmp = at::empty({total_bytes}, at::TensorOptions().dtype(at::kByte).device(tensor.device()));
  void* data = tensor.data_ptr();
  // widest unit that divides a channel block and fits the alignment of both buffers
  const uintptr_t align = reinterpret_cast<uintptr_t>(data) | reinterpret_cast<uintptr_t>(tmp.data_ptr());
  auto fits = [&](int64_t u) { return inner_bytes % u == 0 && align % u == 0; };
  const int64_t* kdp = kd.data_ptr<int64_t>();
  if (fits(16)) launch_gather<uint4>(data, tmp.data_ptr(), kdp, K, C, inner_bytes, total_bytes);
  else if (fits(8)) launch_gather<uint2>(data, tmp.data_ptr(), kdp, K, C, inner_bytes, total_bytes);
  else if (fits(4)) launch_gather<uint32_t>(data, tmp.data_ptr(), kdp, K, C, inner_bytes, total_bytes);
  else if (fits(2)) launch_gather<uint16_t>(data, tmp.data_ptr(), kdp, K, C, inner_bytes, total_bytes);
  else launch_gather<uint8_t>(data, tmp.data_ptr(), kdp, K, C, inner_bytes, total_bytes);
  // Stream-ordered: tmp's memory is only reused by later work on this stream.
  C10_CUDA_CHECK(cudaMemcpyAsync(data, tmp.data_ptr(), total_bytes, cudaMemcpyDeviceToDevice, stream()));
}

}  // namespace

TORCH_LIBRARY_IMPL(chase_ext, CUDA, m) { m.impl("gather_channels_", &gather_channels); }

}  // namespace chase_ext::cuda
