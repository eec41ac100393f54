// The per-slot loops of the CPU mask update, masked apply, masked SGD and Adam steps and channel stats, compiled
// for several instruction sets (baseline x86-64 / SSE2, AVX2, AVX-512) and picked at run
// time (mask_kernels.cpp).
// The loops themselves are in mask_kernels_body.h.
#pragma once
#include <cstdint>

namespace chase_ext::cpu {

// Storage formats, indices into the tables below.
enum FloatFormat : int { kF32 = 0, kBF16 = 1, kF16 = 2 };

// Counts of one block of slots (see scan_block in mask_kernels_body.h).
struct BlockScan {
  uint32_t bad_w, bad_s, p_total, p_below, g_total, g_below, any;
};

// lv: one liveness byte per slot for the per-slot variants (else unused, `live` holds)
using ScanFn = BlockScan (*)(const void* w, const void* s, const uint8_t* m, const uint8_t* lv, int64_t n,
                             bool live, uint32_t plo, uint32_t phi, uint32_t glo, uint32_t ghi, uint8_t* flag);
using ApplyFn = void (*)(void* w, const void* s, uint8_t* m, const uint8_t* lv, uint8_t* keep, int64_t j0,
                         int64_t j1, uint32_t live, uint32_t ptie, uint32_t gtie, uint32_t pk, uint32_t gk,
                         uint32_t* count, float* sum);

// p[j] <- 0 where m[j] == 0, for n elements of one size
using ZeroFn = void (*)(void* p, const uint8_t* m, int64_t n);
// *count += active slots among n, *sum += their sum |w|
using StatsFn = void (*)(const void* w, const uint8_t* m, int64_t n, int64_t* count, double* sum);

// The scalars of one SGD step, as torch.optim.SGD's float32 kernels use them (masked_sgd.cpp).
struct SgdArgs {
  float weight_decay, momentum, one_minus_dampening, neg_lr;
  bool has_weight_decay, has_momentum, nesterov, maximize;
};
// One SGD step on n float32 slots whose gradients are masked first (b unused without momentum)
using SgdFn = void (*)(float* p, float* g, float* b, const uint8_t* m, int64_t n, const SgdArgs& a);

// The scalars of one Adam / AdamW step of one tensor, as torch's fused CPU kernel casts
// them to float (masked_adam.cpp).
struct AdamArgs {
  float decay, weight_decay, lerp_coeff, beta2, one_minus_beta2, bc2_sqrt, eps, neg_step_size;
  int wd_mode;  // 0: none, 1: Adam (added to the gradient), 2: AdamW (decoupled)
  bool lerp_small, amsgrad, maximize;  // lerp_small: lerp_coeff is w (else w - 1), see masked_adam.cpp
};
// One Adam step on n float32 slots whose gradients are masked first; the first `body`
// slots round as ATen's vector body, the rest as its scalar tail (mx unused without amsgrad)
using AdamFn = void (*)(float* p, float* g, float* m1, float* m2, float* mx, const uint8_t* m, int64_t n,
                        int64_t body, const AdamArgs& a);

// scan / apply: [liveness per block (0) or per slot (1)][weight format][score format];
// stats: [weight format];
// zero_where_clear: by element size 1, 2, 4, 8 bytes
struct MaskKernels {
  const char* isa = nullptr;
  ScanFn scan[2][3][3] = {};
  ApplyFn apply[2][3][3] = {};
  StatsFn stats[3] = {};
  ZeroFn zero_where_clear[4] = {};
  SgdFn masked_sgd = nullptr;
  AdamFn masked_adam = nullptr;

  ZeroFn zero_fn(int64_t element_size) const {
    switch (element_size) {
      case 1: return zero_where_clear[0];
      case 2: return zero_where_clear[1];
      case 4: return zero_where_clear[2];
      case 8: return zero_where_clear[3];
      default: return nullptr;
    }
  }
};

// The widest instruction set this build and this CPU support, unless the environment
// variable CHASE_EXT_CPU_ISA names another ("baseline", "avx2", "avx512"; one this CPU
// cannot run is an error). Read on every call, so tests can switch it.
const MaskKernels& mask_kernels();

}  // namespace chase_ext::cpu
