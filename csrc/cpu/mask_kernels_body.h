// The per-slot loops of the CPU mask update, masked apply and channel stats, written on
// raw float bits so they vectorise: the bracket scan (read only), the writing pass, the
// zeroing by mask and the active count / sum |w| of a row. No include guard and no
// includes on purpose: mask_kernels.cpp includes this file once per instruction set,
// each time inside a namespace of its own compiled for that instruction set, so no
// inline function here is shared with (or ODR-merged into) another translation unit.
// Needs <algorithm>, <cmath>, <cstdint>, <cstring> and BlockScan / MaskKernels / SgdArgs / AdamArgs
// (mask_kernels.h) declared before.

// Storage format of a weight / score tensor: bits per element and their float32 bits.
struct F32 {
  using U = uint32_t;
  static inline uint32_t f32(U u) { return u; }
};
struct BF16 {
  using U = uint16_t;
  static inline uint32_t f32(U u) { return uint32_t(u) << 16; }
};
struct F16 {
  using U = uint16_t;
  // IEEE half -> float bits, branch-free (selects), exact for every input
  static inline uint32_t f32(U u) {
    const uint32_t sign = (uint32_t(u) & 0x8000u) << 16;
    const uint32_t em = uint32_t(u) & 0x7FFFu;
    const uint32_t normal = (em << 13) + ((127u - 15u) << 23);
    const uint32_t infnan = (em << 13) | 0x7F800000u;
    // subnormal: value = mantissa * 2^-24, exact in float
    union {
      float f;
      uint32_t b;
    } sub;
    sub.f = float(em) * 5.9604644775390625e-8f;
    // the case split as bit masks, not selects, so every loop that converts halves
    // vectorises (a select chain here kept one of them scalar)
    const uint32_t is_inf = 0u - uint32_t(em >= 0x7C00u), is_sub = 0u - uint32_t(em < 0x0400u);
    const uint32_t r = (infnan & is_inf) | (sub.b & is_sub) | (normal & ~(is_inf | is_sub));
    return r | sign;
  }
};

// sortable key of |v| (see common/keys.h): |v| clears the sign, the top bit orders it
inline uint32_t abs_key(uint32_t f32) { return (f32 & 0x7FFFFFFFu) | 0x80000000u; }
inline uint32_t nonfinite_bits(uint32_t f32) { return (f32 & 0x7F800000u) == 0x7F800000u; }
inline float abs_value(uint32_t f32) {
  union {
    uint32_t b;
    float f;
  } a;
  a.b = f32 & 0x7FFFFFFFu;
  return a.f;
}

// Counts of one block of slots against the prune bracket [plo, phi] (keys of |w| of
// active slots) and the grow bracket [glo, ghi] (flipped keys of |score| of the
// candidates: inactive slots and active slots certainly pruned). flag[j] gets bit 0
// when slot j is inside the prune bracket, bit 1 when inside the grow bracket.
// Liveness: `live` for the whole block, or with PerSlot one byte per slot in lv (rows of
// a layer whose input channels were removed: runs as short as one slot).
template <class W, class S, bool PerSlot>
BlockScan scan_block(const typename W::U* __restrict wb, const typename S::U* __restrict sb,
                     const uint8_t* __restrict mb, const uint8_t* __restrict lv, int64_t n, bool live,
                     uint32_t plo, uint32_t phi, uint32_t glo, uint32_t ghi, uint8_t* __restrict flag) {
  uint32_t bw = 0, bs = 0, pt = 0, pb = 0, gt = 0, gb = 0, any = 0;
  if (!PerSlot && !live) {
#pragma omp simd reduction(| : bw, bs)
    for (int64_t j = 0; j < n; ++j) {
      bw |= nonfinite_bits(W::f32(wb[j]));
      bs |= nonfinite_bits(S::f32(sb[j]));
    }
    return {bw, bs, 0, 0, 0, 0, 0};
  }
#pragma omp simd reduction(| : bw, bs, any) reduction(+ : pt, pb, gt, gb)
  for (int64_t j = 0; j < n; ++j) {
    const uint32_t fw = W::f32(wb[j]), fg = S::f32(sb[j]);
    bw |= nonfinite_bits(fw);
    bs |= nonfinite_bits(fg);
    const uint32_t lj = PerSlot ? uint32_t(lv[j] != 0) : 1u;
    const uint32_t old = mb[j] & 1u;
    const uint32_t act = old & lj;
    const uint32_t kw = abs_key(fw), fkg = ~abs_key(fg);
    const uint32_t below = act & (kw < plo);
    const uint32_t pin = act & (kw >= plo) & (kw <= phi);
    const uint32_t cand = ((old ^ 1u) | below) & lj;  // live and inactive, or certainly pruned
    const uint32_t gbl = cand & (fkg < glo);
    const uint32_t gin = cand & (fkg >= glo) & (fkg <= ghi);
    pt += act;
    pb += below;
    gt += cand;
    gb += gbl;
    flag[j] = (uint8_t)(pin | (gin << 1));
    any |= pin | gin;
  }
  return {bw, bs, pt, pb, gt, gb, any};
}

// The writing pass over slots [j0, j1) of one block, where "index < cutoff" is the
// constant ptie / gtie: new mask = (old and not pruned) or grown; weights zeroed unless
// kept (old and new); keep[j] for the state zeroing; adds the new active count and the
// sum of kept |w| to *count / *sum. Liveness as in scan_block.
template <class W, class S, bool PerSlot>
void apply_piece(typename W::U* __restrict wb, const typename S::U* __restrict sb, uint8_t* __restrict mb,
                 const uint8_t* __restrict lv, uint8_t* __restrict kb, int64_t j0, int64_t j1, uint32_t live,
                 uint32_t ptie, uint32_t gtie, uint32_t pk, uint32_t gk, uint32_t* count, float* sum) {
  using WU = typename W::U;
  uint32_t c = 0;
  float fsum = 0.f;
#pragma omp simd reduction(+ : c, fsum)
  for (int64_t j = j0; j < j1; ++j) {
    const uint32_t fw = W::f32(wb[j]);
    const uint32_t kw = abs_key(fw), kg = abs_key(S::f32(sb[j]));
    const uint32_t lj = PerSlot ? uint32_t(lv[j] != 0) : live;
    const uint32_t old = mb[j] & 1u;
    const uint32_t pr = old & lj & ((kw < pk) | ((kw == pk) & ptie));
    const uint32_t nw = (old & (pr ^ 1u)) | (lj & ((kg > gk) | ((kg == gk) & gtie)));
    const uint32_t k = old & nw;
    kb[j] = (uint8_t)k;
    wb[j] = k ? wb[j] : WU(0);
    fsum += k ? abs_value(fw) : 0.f;
    mb[j] = (uint8_t)nw;
    c += nw;
  }
  *count += c;
  *sum += fsum;
}

// p[j] <- 0 where m[j] == 0, on U-sized words (zero is all-zero bits in every float
// format). An AND with an all-ones / all-zeros word, not a select: GCC turns
// "m ? p : 0" into a branch around a store, mispredicted at every density strictly
// between 0 and 1 (3-4x slower, benchmarks/NOTES.md), and it does not vectorise.
template <class U>
void zero_where_clear(void* p, const uint8_t* __restrict m, int64_t n) {
  U* __restrict q = static_cast<U*>(p);
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) q[j] &= U(0) - U(m[j] != 0);
}

// Adds the active count and the sum of active |w| of n slots to *count / *sum. The sum is
// kept in double lanes: the vectoriser reorders it (so the last bits of the double depend
// on the vector width), but at double precision that does not reach the float result
// except in rare rounding ties.
template <class W>
void active_stats(const void* w, const uint8_t* __restrict m, int64_t n, int64_t* count, double* sum) {
  const typename W::U* __restrict wb = static_cast<const typename W::U*>(w);
  for (int64_t b = 0; b < n; b += 65536) {  // 32-bit counts vectorise better than 64-bit
    const int64_t e = std::min<int64_t>(n, b + 65536);
    uint32_t c = 0;
    double s = 0;
#pragma omp simd reduction(+ : c, s)
    for (int64_t j = b; j < e; ++j) {
      const uint32_t a = m[j] != 0;
      const uint32_t bits = W::f32(wb[j]) & (0u - a);  // inactive: +0 (a branch would not vectorise)
      const float v = abs_value(bits);
      c += a;
      s += double(v);
    }
    *count += c;
    *sum += s;
  }
}

// A plain SGD step with masked gradients (masked_sgd.cpp): g <- where(m, g, +0) in place,
// then torch.optim.SGD's single-tensor rule on (p, g, b). Each `add(x, alpha=a)` of that
// rule is one fused multiply-add, as ATen's float32 add kernel computes it (vector body and
// scalar tail alike on AVX2 / AVX-512 builds); `buf.mul_(momentum)` is a plain product.
// Written with std::fma so every instruction set rounds the same way (the baseline build
// calls the C library's exact fmaf); ChaseOptimizer checks against torch before use.
template <bool WD, bool Mom, bool Nest, bool Max>
void masked_sgd_piece(float* __restrict p, float* __restrict g, float* __restrict b, const uint8_t* __restrict m,
                      int64_t n, const SgdArgs& a) {
  const float wd = a.weight_decay, mom = a.momentum, damp1 = a.one_minus_dampening, neg_lr = a.neg_lr;
  uint32_t* gb = reinterpret_cast<uint32_t*>(g);
  for (int64_t j = 0; j < n; ++j) {
    const uint32_t bits = gb[j] & (0u - uint32_t(m[j] != 0));  // +0 where masked (as masked_apply_)
    gb[j] = bits;
    float x;
    std::memcpy(&x, &bits, sizeof x);
    if constexpr (Max) x = -x;
    const float pv = p[j];
    if constexpr (WD) x = std::fma(pv, wd, x);  // grad.add(param, alpha=weight_decay)
    if constexpr (Mom) {
      const float bv = std::fma(x, damp1, b[j] * mom);  // buf.mul_(momentum).add_(grad, alpha=1 - dampening)
      b[j] = bv;
      x = Nest ? std::fma(bv, mom, x) : bv;  // grad.add(buf, alpha=momentum) or buf
    }
    p[j] = std::fma(x, neg_lr, pv);  // param.add_(grad, alpha=-lr)
  }
}

inline void masked_sgd(float* p, float* g, float* b, const uint8_t* m, int64_t n, const SgdArgs& a) {
  // 16 instantiations, so the loop holds no branch on the settings
  const int k = (a.has_weight_decay ? 8 : 0) | (a.has_momentum ? 4 : 0) | (a.nesterov ? 2 : 0) | (a.maximize ? 1 : 0);
  switch (k) {
#define CHASE_EXT_SGD_CASE(K) \
  case K: return masked_sgd_piece<bool(K & 8), bool(K & 4), bool(K & 2), bool(K & 1)>(p, g, b, m, n, a);
    CHASE_EXT_SGD_CASE(0) CHASE_EXT_SGD_CASE(1) CHASE_EXT_SGD_CASE(2) CHASE_EXT_SGD_CASE(3)
    CHASE_EXT_SGD_CASE(4) CHASE_EXT_SGD_CASE(5) CHASE_EXT_SGD_CASE(6) CHASE_EXT_SGD_CASE(7)
    CHASE_EXT_SGD_CASE(8) CHASE_EXT_SGD_CASE(9) CHASE_EXT_SGD_CASE(10) CHASE_EXT_SGD_CASE(11)
    CHASE_EXT_SGD_CASE(12) CHASE_EXT_SGD_CASE(13) CHASE_EXT_SGD_CASE(14) CHASE_EXT_SGD_CASE(15)
#undef CHASE_EXT_SGD_CASE
  }
}

// A plain Adam / AdamW step with masked gradients (masked_adam.cpp): g <- where(m, g, +0)
// in place, then the rule of torch's fused CPU Adam kernel (torch.optim.Adam / AdamW with
// fused=True) on (p, g, exp_avg m1, exp_avg_sq m2, max_exp_avg_sq mx), with the roundings
// that kernel shows on AVX2 / AVX-512 builds: the lerp of exp_avg and Adam's weight decay as
// fused multiply-adds, and exp_avg_sq as fma(c2 * g, g, v * beta2) in its vector body but
// fma(v, beta2, c2 * g * g) in its scalar tail (the compiler contracts the two differently).
// `body` says where this piece's tail starts. Each operation is written out (std::fma, one
// product or quotient per line), so every instruction set rounds alike; ChaseOptimizer
// checks the result against torch before use.
template <bool Tail, int WdMode, bool Ams, bool Max>
void masked_adam_slots(float* __restrict p, float* __restrict g, float* __restrict m1, float* __restrict m2,
                       float* __restrict mx, const uint8_t* __restrict m, int64_t j0, int64_t j1, const AdamArgs& a) {
  const float decay = a.decay, wd = a.weight_decay, b2 = a.beta2, c2 = a.one_minus_beta2;
  const float bc2 = a.bc2_sqrt, eps = a.eps, neg_ss = a.neg_step_size;
  const float lw = a.lerp_coeff;  // exp_avg.lerp_(grad, w), see AdamArgs
  const bool small = a.lerp_small;
  uint32_t* gb = reinterpret_cast<uint32_t*>(g);
  for (int64_t j = j0; j < j1; ++j) {
    const uint32_t bits = gb[j] & (0u - uint32_t(m[j] != 0));  // +0 where masked (as masked_apply_)
    gb[j] = bits;
    float x;
    std::memcpy(&x, &bits, sizeof x);
    if constexpr (Max) x = -x;
    float pv = p[j];
    if constexpr (WdMode == 1) x = std::fma(pv, wd, x);  // grad += param * weight_decay
    if constexpr (WdMode == 2) pv = pv * decay;          // param *= 1 - lr * weight_decay
    const float e = m1[j];
    const float ev = std::fma(lw, x - e, small ? e : x);
    const float cx = c2 * x;
    float v;
    if constexpr (Tail) {
      const float cxx = cx * x;
      v = std::fma(m2[j], b2, cxx);
    } else {
      const float vb = m2[j] * b2;
      v = std::fma(cx, x, vb);
    }
    m1[j] = ev;
    m2[j] = v;
    float src = v;
    if constexpr (Ams) {
      const float old = mx[j];
      if constexpr (Tail) {
        src = std::max(old, v);
      } else {  // ATen's vector maximum: max_ps(old, v), all-ones bits (a NaN) where either is NaN
        const uint32_t nan_bits = 0xFFFFFFFFu;
        float nan;
        std::memcpy(&nan, &nan_bits, sizeof nan);
        src = (old != old || v != v) ? nan : (old > v ? old : v);
      }
      mx[j] = src;
    }
    const float root = std::sqrt(src);
    const float den = root / bc2 + eps;
    const float step = neg_ss * ev;
    const float q = step / den;
    p[j] = pv + q;
  }
}

template <int WdMode, bool Ams, bool Max>
void masked_adam_piece(float* p, float* g, float* m1, float* m2, float* mx, const uint8_t* m, int64_t n,
                       int64_t body, const AdamArgs& a) {
  masked_adam_slots<false, WdMode, Ams, Max>(p, g, m1, m2, mx, m, 0, body, a);
  masked_adam_slots<true, WdMode, Ams, Max>(p, g, m1, m2, mx, m, body, n, a);
}

inline void masked_adam(float* p, float* g, float* m1, float* m2, float* mx, const uint8_t* m, int64_t n,
                        int64_t body, const AdamArgs& a) {
  // 12 instantiations, so the loop holds no branch on the settings
  const int k = a.wd_mode * 4 + (a.amsgrad ? 2 : 0) + (a.maximize ? 1 : 0);
  switch (k) {
#define CHASE_EXT_ADAM_CASE(K) \
  case K: return masked_adam_piece<(K) / 4, bool((K) & 2), bool((K) & 1)>(p, g, m1, m2, mx, m, n, body, a);
    CHASE_EXT_ADAM_CASE(0) CHASE_EXT_ADAM_CASE(1) CHASE_EXT_ADAM_CASE(2) CHASE_EXT_ADAM_CASE(3)
    CHASE_EXT_ADAM_CASE(4) CHASE_EXT_ADAM_CASE(5) CHASE_EXT_ADAM_CASE(6) CHASE_EXT_ADAM_CASE(7)
    CHASE_EXT_ADAM_CASE(8) CHASE_EXT_ADAM_CASE(9) CHASE_EXT_ADAM_CASE(10) CHASE_EXT_ADAM_CASE(11)
#undef CHASE_EXT_ADAM_CASE
  }
}

// Type-erased entry points for the table of mask_kernels.h.
template <class W, class S, bool PerSlot>
BlockScan scan_erased(const void* w, const void* s, const uint8_t* m, const uint8_t* lv, int64_t n, bool live,
                      uint32_t plo, uint32_t phi, uint32_t glo, uint32_t ghi, uint8_t* flag) {
  return scan_block<W, S, PerSlot>(static_cast<const typename W::U*>(w), static_cast<const typename S::U*>(s), m,
                                   lv, n, live, plo, phi, glo, ghi, flag);
}

template <class W, class S, bool PerSlot>
void apply_erased(void* w, const void* s, uint8_t* m, const uint8_t* lv, uint8_t* keep, int64_t j0, int64_t j1,
                  uint32_t live, uint32_t ptie, uint32_t gtie, uint32_t pk, uint32_t gk, uint32_t* count,
                  float* sum) {
  apply_piece<W, S, PerSlot>(static_cast<typename W::U*>(w), static_cast<const typename S::U*>(s), m, lv, keep, j0,
                             j1, live, ptie, gtie, pk, gk, count, sum);
}

template <class W, class S>
void fill_pair(MaskKernels& t, int wi, int si) {
  t.scan[0][wi][si] = &scan_erased<W, S, false>;
  t.scan[1][wi][si] = &scan_erased<W, S, true>;
  t.apply[0][wi][si] = &apply_erased<W, S, false>;
  t.apply[1][wi][si] = &apply_erased<W, S, true>;
}

template <class W>
void fill_row(MaskKernels& t, int wi) {
  fill_pair<W, F32>(t, wi, kF32);
  fill_pair<W, BF16>(t, wi, kBF16);
  fill_pair<W, F16>(t, wi, kF16);
  t.stats[wi] = &active_stats<W>;
}

inline MaskKernels make_table(const char* isa) {
  MaskKernels t;
  t.isa = isa;
  fill_row<F32>(t, kF32);
  fill_row<BF16>(t, kBF16);
  fill_row<F16>(t, kF16);
  t.zero_where_clear[0] = &zero_where_clear<uint8_t>;
  t.zero_where_clear[1] = &zero_where_clear<uint16_t>;
  t.zero_where_clear[2] = &zero_where_clear<uint32_t>;
  t.zero_where_clear[3] = &zero_where_clear<uint64_t>;
  t.masked_sgd = &masked_sgd;
  t.masked_adam = &masked_adam;
  return t;
}
