// masked_adam_ on CPU: a plain step's gradient masking and the update of torch's fused CPU
// Adam / AdamW kernel (torch.optim.Adam / AdamW with fused=True) on the sparse weights in one
// pass: mask, weight, gradient, exp_avg and exp_avg_sq read once and written once (33 bytes
// per float32 slot, where masking the gradients and then the fused step move 37). Runs
// over flat storage, like masked_apply_: every tensor is laid out like its mask.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "common/masked_apply_checks.h"
#include "cpu/mask_kernels.h"

namespace chase_ext::cpu {
namespace {

constexpr int64_t kPiece = 4096;  // slots per piece: its mask bytes stay in L1

void check_args(const char* op, TensorList params, TensorList grads, TensorList exp_avgs, TensorList exp_avg_sqs,
                TensorList max_exp_avg_sqs, TensorList steps, TensorList masks, bool amsgrad, int64_t width) {
  const size_t n = params.size();
  TORCH_CHECK(grads.size() == n && exp_avgs.size() == n && exp_avg_sqs.size() == n && masks.size() == n &&
                  steps.size() == n,
              op, ": params, grads, exp_avgs, exp_avg_sqs, state_steps and masks need one tensor each per weight, "
              "got ", n, ", ", grads.size(), ", ", exp_avgs.size(), ", ", exp_avg_sqs.size(), ", ", steps.size(),
              " and ", masks.size());
  if (amsgrad) {
    TORCH_CHECK(max_exp_avg_sqs.size() == n, op, ": amsgrad needs one max_exp_avg_sq per weight, got ",
                max_exp_avg_sqs.size(), " for ", n, " weights");
  } else {
    TORCH_CHECK(max_exp_avg_sqs.empty(), op, ": max_exp_avg_sqs are taken only with amsgrad, got ",
                max_exp_avg_sqs.size());
  }
  TORCH_CHECK(width > 0, op, ": vector_width must be positive, got ", width);
  // shapes, devices, layouts like the mask, dense masks, no aliasing among the written lists
  std::vector<at::Tensor> all;
  std::vector<int64_t> owner;
  for (TensorList ts : {params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs})
    for (size_t i = 0; i < ts.size(); ++i) {
      all.push_back(ts[i]);
      owner.push_back(int64_t(i));
    }
  check_masked_apply_args(op, all, masks, owner);

  check_float32_cpu(op, "params", params);
  check_float32_cpu(op, "grads", grads);
  check_float32_cpu(op, "exp_avgs", exp_avgs);
  check_float32_cpu(op, "exp_avg_sqs", exp_avg_sqs);
  check_float32_cpu(op, "max_exp_avg_sqs", max_exp_avg_sqs);
  for (size_t i = 0; i < n; ++i) {
    const at::Tensor& s = steps[i];
    TORCH_CHECK(s.numel() == 1 && s.device().is_cpu() &&
                    (s.scalar_type() == at::kFloat || s.scalar_type() == at::kDouble),
                op, ": state_steps[", i, "] must be one float32 or float64 number on the CPU, got ", s.scalar_type(),
                " of shape ", s.sizes(), " on ", s.device());
  }
}

void masked_adam(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
                 at::TensorList max_exp_avg_sqs, at::TensorList steps, at::TensorList masks, double lr, double beta1,
                 double beta2, double weight_decay, double eps, bool amsgrad, bool maximize, bool decoupled,
                 int64_t width) {
  const char* op = "chase_ext.masked_adam_";
  check_args(op, params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, masks, amsgrad, width);
  // torch.optim.Adam counts every step first (torch._foreach_add_(state_steps, 1)), then
  // its kernel reads each count as a float
  for (const at::Tensor& s : steps) {
    if (s.scalar_type() == at::kFloat) {
      float* c = s.data_ptr<float>();
      *c = *c + 1.0f;
    } else {
      double* c = s.data_ptr<double>();
      *c = *c + 1.0;
    }
  }
  auto count = [](const at::Tensor& s) {
    return s.scalar_type() == at::kFloat ? *s.data_ptr<float>() : static_cast<float>(*s.data_ptr<double>());
  };
  const AdamFn step_fn = mask_kernels().masked_adam;
  for (size_t i = 0; i < params.size(); ++i) {
    // the scalars as torch's fused kernel computes them: in double, each cast to float once
    const double t = static_cast<double>(count(steps[i]));
    const double bc1 = 1 - std::pow(beta1, t), bc2 = 1 - std::pow(beta2, t);
    const double step_size = lr / bc1;
    AdamArgs a;
    a.decay = static_cast<float>(1 - lr * weight_decay);
    a.weight_decay = static_cast<float>(weight_decay);
    // exp_avg.lerp_(grad, w): fma(w, g - e, e) for |w| < 0.5, else fma(w - 1, g - e, g)
    const float w = static_cast<float>(1 - beta1);
    a.lerp_small = std::abs(w) < 0.5f;
    a.lerp_coeff = a.lerp_small ? w : w - 1.0f;
    a.beta2 = static_cast<float>(beta2);
    a.one_minus_beta2 = static_cast<float>(1 - beta2);
    a.bc2_sqrt = static_cast<float>(std::sqrt(bc2));
    a.eps = static_cast<float>(eps);
    a.neg_step_size = static_cast<float>(-step_size);
    a.wd_mode = weight_decay != 0.f ? (decoupled ? 2 : 1) : 0;
    a.amsgrad = amsgrad;
    a.maximize = maximize;
    float* p = params[i].data_ptr<float>();
    float* g = grads[i].data_ptr<float>();
    float* m1 = exp_avgs[i].data_ptr<float>();
    float* m2 = exp_avg_sqs[i].data_ptr<float>();
    float* mx = amsgrad ? max_exp_avg_sqs[i].data_ptr<float>() : nullptr;
    const uint8_t* m = reinterpret_cast<const uint8_t*>(masks[i].data_ptr<bool>());
    const int64_t numel = params[i].numel();
    const int64_t body_end = numel - numel % width;  // where ATen's scalar tail starts
    at::parallel_for(0, numel, 8 * kPiece, [&](int64_t lo, int64_t hi) {
      for (int64_t s = lo; s < hi; s += kPiece) {
        const int64_t len = std::min(kPiece, hi - s);
        const int64_t body = std::clamp(body_end - s, int64_t(0), len);
        step_fn(p + s, g + s, m1 + s, m2 + s, mx ? mx + s : nullptr, m + s, len, body, a);
      }
    });
  }
}

}  // namespace

TORCH_LIBRARY_IMPL(chase_ext, CPU, m) { m.impl("masked_adam_", &masked_adam); }

}  // namespace chase_ext::cpu
