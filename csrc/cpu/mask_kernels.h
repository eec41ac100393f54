// The per-slot loops of the CPU mask update, compiled for several instruction sets
// (baseline x86-64 / SSE2, AVX2, AVX-512) and picked at run time (mask_kernels.cpp).
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

using ScanFn = BlockScan (*)(const void* w, const void* s, const uint8_t* m, int64_t n, bool live, uint32_t plo,
                             uint32_t phi, uint32_t glo, uint32_t ghi, uint8_t* flag);
using ApplyFn = void (*)(void* w, const void* s, uint8_t* m, uint8_t* keep, int64_t j0, int64_t j1, uint32_t live,
                         uint32_t ptie, uint32_t gtie, uint32_t pk, uint32_t gk, uint32_t* count, float* sum);

// [weight format][score format]
struct MaskKernels {
  const char* isa = nullptr;
  ScanFn scan[3][3] = {};
  ApplyFn apply[3][3] = {};
};

// The widest instruction set this build and this CPU support, unless the environment
// variable CHASE_EXT_CPU_ISA names another ("baseline", "avx2", "avx512"; one this CPU
// cannot run is an error). Read on every call, so tests can switch it.
const MaskKernels& mask_kernels();

}  // namespace chase_ext::cpu
