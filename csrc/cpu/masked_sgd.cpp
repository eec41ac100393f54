// masked_sgd_ on CPU: a plain step's gradient masking and torch.optim.SGD's update of the
// sparse weights in one pass: mask, weight, gradient and momentum read once, weight,
// momentum and gradient written once (25 bytes per float32 slot, where masking the
// gradients and then the SGD step's four elementwise passes move about 53). Runs over flat
// storage, like masked_apply_: every tensor is laid out like its mask.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "common/masked_apply_checks.h"
#include "cpu/mask_kernels.h"

namespace chase_ext::cpu {
namespace {

constexpr int64_t kPiece = 4096;  // slots per piece: its mask bytes stay in L1

void check_args(const char* op, TensorList params, TensorList grads, TensorList bufs, TensorList masks,
                double momentum) {
  TORCH_CHECK(grads.size() == params.size() && masks.size() == params.size(), op, ": params, grads and masks "
              "need one tensor each per weight, got ", params.size(), ", ", grads.size(), " and ", masks.size());
  if (momentum != 0) {
    TORCH_CHECK(bufs.size() == params.size(), op, ": momentum ", momentum, " needs one momentum buffer per weight, got ",
                bufs.size(), " for ", params.size(), " weights");
  } else {
    TORCH_CHECK(bufs.empty(), op, ": momentum 0 takes no momentum buffers, got ", bufs.size());
  }
  std::vector<int64_t> owner(params.size());
  for (size_t i = 0; i < owner.size(); ++i) owner[i] = int64_t(i);
  // shapes, devices, layouts like the mask, dense masks, no aliasing among the written lists
  std::vector<at::Tensor> all(params.begin(), params.end());
  all.insert(all.end(), grads.begin(), grads.end());
  all.insert(all.end(), bufs.begin(), bufs.end());
  std::vector<int64_t> all_owner(owner);
  all_owner.insert(all_owner.end(), owner.begin(), owner.end());
  if (!bufs.empty()) all_owner.insert(all_owner.end(), owner.begin(), owner.end());
  check_masked_apply_args(op, all, masks, all_owner);

  check_float32_cpu(op, "params", params);
  check_float32_cpu(op, "grads", grads);
  check_float32_cpu(op, "momentum_buffers", bufs);
}

void masked_sgd(at::TensorList params, at::TensorList grads, at::TensorList bufs, at::TensorList masks, double lr,
                double weight_decay, double momentum, double dampening, bool nesterov, bool maximize) {
  const char* op = "chase_ext.masked_sgd_";
  check_args(op, params, grads, bufs, masks, momentum);
  TORCH_CHECK(!nesterov || (momentum > 0 && dampening == 0), op,
              ": nesterov needs momentum > 0 and dampening 0 (as torch.optim.SGD), got momentum ", momentum,
              " and dampening ", dampening);
  // the scalars as ATen's float32 kernels take them: each cast to float once
  SgdArgs a;
  a.weight_decay = static_cast<float>(weight_decay);
  a.momentum = static_cast<float>(momentum);
  a.one_minus_dampening = static_cast<float>(1.0 - dampening);
  a.neg_lr = static_cast<float>(-lr);
  a.has_weight_decay = weight_decay != 0;
  a.has_momentum = momentum != 0;
  a.nesterov = nesterov;
  a.maximize = maximize;
  const SgdFn step = mask_kernels().masked_sgd;
  for (size_t i = 0; i < params.size(); ++i) {
    float* p = params[i].data_ptr<float>();
    float* g = grads[i].data_ptr<float>();
    float* b = a.has_momentum ? bufs[i].data_ptr<float>() : nullptr;
    const uint8_t* m = reinterpret_cast<const uint8_t*>(masks[i].data_ptr<bool>());
    at::parallel_for(0, params[i].numel(), 8 * kPiece, [&](int64_t lo, int64_t hi) {
      for (int64_t s = lo; s < hi; s += kPiece) {
        const int64_t n = std::min(kPiece, hi - s);
        step(p + s, g + s, b ? b + s : nullptr, m + s, n, a);
      }
    });
  }
}

}  // namespace

TORCH_LIBRARY_IMPL(chase_ext, CPU, m) { m.impl("masked_sgd_", &masked_sgd); }

}  // namespace chase_ext::cpu
