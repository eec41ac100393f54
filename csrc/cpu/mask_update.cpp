// mask_update_ on CPU: prune by |w|, grow by |score|, rewrite masks, zero what changed,
// and emit per-row active counts and sum |w| -- selections first (read only), then one
// writing pass, so every error is raised before anything is written.
#include <torch/library.h>

#include "cpu/bracket_select.h"
#include "cpu/float_bits.h"
#include "cpu/mask_kernels.h"
#include "cpu/multi_tensor.h"

namespace chase_ext::cpu {
namespace {

struct StateRef {
  char* data;
  int64_t elem;  // bytes per element
  ZeroFn zero;   // zeroes the elements whose keep byte is 0
};

constexpr const char* kOp = "chase_ext.mask_update_";
constexpr int64_t kBlock = 2048;  // slots per inner block (per-block scratch stays in L1)

// Calls f(j0, j1, ptie, gtie) for pieces [j0, j1) covering the n slots from storage
// offset `at` of a row (whose first slot has global index `row_gidx`), where ptie / gtie
// say whether the slots' global indices lie below the prune / grow cutoff. In row-major
// memory the cutoffs split the block into at most 3 pieces. Otherwise (channels_last) a
// row holding no cutoff is one piece, and the at most two rows that hold one are split
// slot by slot into runs (about 2 per spatial position for channels_last).
template <class F>
void for_tie_pieces(const Layout& l, int64_t at, int64_t n, int64_t row_gidx, int64_t pcut, int64_t gcut, F&& f) {
  if (l.perm.empty()) {
    const int64_t g0 = row_gidx + at;
    int64_t cuts[4] = {0, std::clamp<int64_t>(pcut - g0, 0, n), std::clamp<int64_t>(gcut - g0, 0, n), n};
    if (cuts[1] > cuts[2]) std::swap(cuts[1], cuts[2]);
    for (int piece = 0; piece < 3; ++piece) {
      const int64_t j0 = cuts[piece], j1 = cuts[piece + 1];
      if (j0 < j1) f(j0, j1, uint32_t(g0 + j0 < pcut), uint32_t(g0 + j0 < gcut));
    }
    return;
  }
  // cutoffs as row-major positions in this row: a slot is below when perm[slot] < cut
  const int64_t pin = std::clamp<int64_t>(pcut - row_gidx, 0, l.row_stride);
  const int64_t gin = std::clamp<int64_t>(gcut - row_gidx, 0, l.row_stride);
  const bool psplit = pin > 0 && pin < l.row_stride, gsplit = gin > 0 && gin < l.row_stride;
  if (!psplit && !gsplit) {
    f(0, n, uint32_t(pin == l.row_stride), uint32_t(gin == l.row_stride));
    return;
  }
  const int64_t* perm = l.perm.data() + at;
  auto flags = [&](int64_t j) { return std::make_pair(uint32_t(perm[j] < pin), uint32_t(perm[j] < gin)); };
  int64_t j0 = 0;
  auto cur = flags(0);
  for (int64_t j = 1; j <= n; ++j) {
    if (j < n && flags(j) == cur) continue;
    f(j0, j, cur.first, cur.second);
    if (j < n) {
      j0 = j;
      cur = flags(j);
    }
  }
}

// Exact prune and grow selections by two multi-pass radix selects (the general path).
template <class WV, class SV>
std::pair<Selection, Selection> radix_pass(const std::vector<Layout>& L, const std::vector<Chunk>& chunks,
                                           int64_t kp, int64_t kg, const std::string& pname,
                                           const std::string& gname, WV wval, SV sval,
                                           const std::vector<bool*>& mp) {
  auto wkey = [&](int t, int64_t i) { return sortable_key(wval(t, i), true); };
  auto skey = [&](int t, int64_t i) { return sortable_key(sval(t, i), true); };
  const Selection p = radix_select(
      L, chunks, kp, false, kOp, pname, [&](int t, int64_t i, bool live) { return live && mp[t][i]; }, wkey,
      [&](int t, int64_t i) { return !std::isfinite(wval(t, i)); }, "weights");
  auto pruned = [&](int t, int64_t i, bool live) {
    return live && mp[t][i] && in_selection(wkey(t, i), L[t].offset + L[t].logical(i), p.key, p.cutoff, false);
  };
  const Selection g = radix_select(
      L, chunks, kg, true, kOp, gname,
      [&](int t, int64_t i, bool live) { return live && (!mp[t][i] || pruned(t, i, live)); }, skey,
      [&](int t, int64_t i) { return !std::isfinite(sval(t, i)); }, "scores");
  return {p, g};
}

// Both selections from one pass over the data, bracketed by a strided sample (see
// bracket_select.h). nullopt when a bracket missed; errors are raised as in radix_pass.
template <class W, class S>
std::optional<std::pair<Selection, Selection>> bracketed(const std::vector<Layout>& L, const std::vector<int>& scope,
                                                         const std::vector<Chunk>& chunks, int64_t kp, int64_t kg,
                                                         const std::string& pname, const std::string& gname,
                                                         const std::vector<W*>& wp, const std::vector<const S*>& sp,
                                                         const std::vector<bool*>& mp) {
  auto wval = [&](int t, int64_t i) { return static_cast<float>(wp[t][i]); };
  auto sval = [&](int t, int64_t i) { return static_cast<float>(sp[t][i]); };
  int64_t total = 0;
  for (int t : scope) total += L[t].numel;
  const int64_t stride = std::max<int64_t>(1, total / 65536);
  // Sample: prune keys of active slots; grow keys of inactive slots and of the active
  // slots the prune is likely to take (below the sampled prune quantile).
  std::vector<uint32_t> sg;
  std::vector<std::pair<uint32_t, uint32_t>> sa;  // active: (prune key, flipped grow key)
  int64_t n_sampled = 0;
  sample_slots(L, scope, stride, [&](int t, int64_t i, bool live) {
    ++n_sampled;
    if (!live) return;
    const uint32_t fkg = ~sortable_key(sval(t, i), true);
    if (mp[t][i]) {
      sa.push_back({sortable_key(wval(t, i), true), fkg});
    } else {
      sg.push_back(fkg);
    }
  });
  const double f = (double)n_sampled / std::max<int64_t>(1, total);  // sampled share
  const std::pair<Bracket, Bracket> br = sample_brackets(sa, sg, kp, kg, f);
  const Bracket bp = br.first, bg = br.second;

  struct Part {
    int64_t p_total = 0, p_below = 0, g_total = 0, g_below = 0;
    std::vector<Cand> pbuf, gbuf;
    std::vector<uint32_t> pbuf_g;  // flipped grow key of each pbuf entry
    char bad_w = 0, bad_s = 0;
  };
  std::vector<Part> parts(chunks.size());
  using WU = typename Bits<W>::U;
  using SU = typename Bits<S>::U;
  const ScanFn scan_run = mask_kernels().scan[0][Bits<W>::format][Bits<S>::format];
  const ScanFn scan_slots = mask_kernels().scan[1][Bits<W>::format][Bits<S>::format];
  parallel_chunks(chunks, [&](int64_t c, const Chunk& ch) {
    Part& P = parts[c];
    int64_t p_total = 0, p_below = 0, g_total = 0, g_below = 0;
    uint32_t bad_w = 0, bad_s = 0;
    const uint32_t plo = bp.lo, phi = bp.hi, glo = bg.lo, ghi = bg.hi;
    // bit 0: inside the prune bracket, bit 1: inside the grow bracket; padded so the
    // rare-slot loop below can read whole 8-byte words
    alignas(8) uint8_t flag[kBlock + 8];
    for (const Unit& u : ch) {
      const WU* __restrict w = reinterpret_cast<const WU*>(wp[u.t]);
      const SU* __restrict s = reinterpret_cast<const SU*>(sp[u.t]);
      const uint8_t* __restrict m = reinterpret_cast<const uint8_t*>(mp[u.t]);
      const Layout& lt = L[u.t];
      const int64_t off = lt.offset;
      for_runs(lt, u.r0, u.r1, [&](int64_t b, int64_t e, bool live, const uint8_t* lv) {
        const ScanFn scan = lv ? scan_slots : scan_run;
        for (int64_t b0 = b; b0 < e; b0 += kBlock) {
          const int64_t n = std::min<int64_t>(kBlock, e - b0);
          const WU* wb = w + b0;
          const SU* sb = s + b0;
          const uint8_t* mb = m + b0;
          const BlockScan r = scan(wb, sb, mb, lv ? lv + (b0 - b) : nullptr, n, live, plo, phi, glo, ghi, flag);
          const uint32_t bw = r.bad_w, bs = r.bad_s, pt = r.p_total, pb = r.p_below, gt = r.g_total,
                         gb = r.g_below, any = r.any;
          bad_w |= bw;
          bad_s |= bs;
          p_total += pt;
          p_below += pb;
          g_total += gt;
          g_below += gb;
          if (!any) continue;
          // rare: slots inside a bracket; skip the zero flags 8 at a time
          std::memset(flag + n, 0, 8);
          for (int64_t j8 = 0; j8 < n; j8 += 8) {
            uint64_t word;
            std::memcpy(&word, flag + j8, 8);
            while (word) {
              const int byte = __builtin_ctzll(word) >> 3;
              word &= ~(uint64_t{0xFF} << (byte * 8));
              const int64_t j = j8 + byte;
              const int64_t gi = off + lt.logical(b0 + j);
              if (flag[j] & 1) {
                P.pbuf.push_back({abs_key(Bits<W>::f32(wb[j])), gi});
                P.pbuf_g.push_back(~abs_key(Bits<S>::f32(sb[j])));
              }
              if (flag[j] & 2) P.gbuf.push_back({~abs_key(Bits<S>::f32(sb[j])), gi});
            }
          }
        }
      });
    }
    P.p_total = p_total;
    P.p_below = p_below;
    P.g_total = g_total;
    P.g_below = g_below;
    P.bad_w = bad_w != 0;
    P.bad_s = bad_s != 0;
  });
  int64_t p_total = 0, p_below = 0, g_total = 0, g_below = 0;
  for (const Part& P : parts) {
    TORCH_CHECK(!P.bad_w, kOp, ": weights has non-finite values");
  }
  for (const Part& P : parts) {
    TORCH_CHECK(!P.bad_s, kOp, ": scores has non-finite values");
    p_total += P.p_total;
    p_below += P.p_below;
    g_total += P.g_total;
    g_below += P.g_below;
  }
  TORCH_CHECK(kp <= p_total, kOp, ": ", pname, "=", kp, " is out of range: only ", p_total, " candidate slots");
  std::vector<Cand> pbuf, gbuf;
  std::vector<uint32_t> pbuf_g;
  for (Part& P : parts) {
    pbuf.insert(pbuf.end(), P.pbuf.begin(), P.pbuf.end());
    pbuf_g.insert(pbuf_g.end(), P.pbuf_g.begin(), P.pbuf_g.end());
    gbuf.insert(gbuf.end(), P.gbuf.begin(), P.gbuf.end());
  }
  const auto p = resolve(kp, p_below, pbuf, false);
  if (!p) return std::nullopt;
  // bracketed prune candidates that were taken become grow candidates
  for (size_t j = 0; j < pbuf.size(); ++j) {
    if (!in_selection(pbuf[j].key, pbuf[j].gidx, p->key, p->cutoff, false)) continue;
    ++g_total;
    if (pbuf_g[j] < bg.lo) {
      ++g_below;
    } else if (pbuf_g[j] <= bg.hi) {
      gbuf.push_back({pbuf_g[j], pbuf[j].gidx});
    }
  }
  TORCH_CHECK(kg <= g_total, kOp, ": ", gname, "=", kg, " is out of range: only ", g_total, " candidate slots");
  const auto g = resolve(kg, g_below, gbuf, true);
  if (!g) return std::nullopt;
  return std::make_pair(*p, *g);
}

template <class W, class S>
std::tuple<at::Tensor, at::Tensor> run(TensorList weights, TensorList masks, TensorList scores,
                                       const std::vector<Layout>& L, TensorList states,
                                       c10::IntArrayRef owner, c10::IntArrayRef prune_counts,
                                       c10::IntArrayRef grow_counts) {
  const size_t n = weights.size();
  std::vector<W*> wp(n);
  std::vector<const S*> sp(n);
  std::vector<bool*> mp(n);
  for (size_t t = 0; t < n; ++t) {
    wp[t] = weights[t].data_ptr<W>();
    sp[t] = scores[t].data_ptr<S>();
    mp[t] = masks[t].data_ptr<bool>();
  }
  auto wval = [&](int t, int64_t i) { return static_cast<float>(wp[t][i]); };
  auto sval = [&](int t, int64_t i) { return static_cast<float>(sp[t][i]); };

  // Scopes: one global selection, or one per tensor.
  const bool global = prune_counts.size() == 1;
  std::vector<std::vector<int>> scopes;
  if (global) {
    scopes.emplace_back(n);
    for (size_t t = 0; t < n; ++t) scopes[0][t] = (int)t;
  } else {
    for (size_t t = 0; t < n; ++t) scopes.push_back({(int)t});
  }
  std::vector<Selection> psel(n), gsel(n);
  for (size_t s = 0; s < scopes.size(); ++s) {
    const auto chunks = make_chunks(L, scopes[s], num_chunks());
    const std::string pname = global ? "prune_counts" : "prune_counts[" + std::to_string(s) + "]";
    const std::string gname = global ? "grow_counts" : "grow_counts[" + std::to_string(s) + "]";
    std::pair<Selection, Selection> pg;
    if (auto fast = bracketed<W, S>(L, scopes[s], chunks, prune_counts[s], grow_counts[s], pname, gname, wp, sp,
                                    mp)) {
      pg = *fast;
    } else {
      pg = radix_pass(L, chunks, prune_counts[s], grow_counts[s], pname, gname, wval, sval, mp);
    }
    for (int t : scopes[s]) {
      psel[t] = pg.first;
      gsel[t] = pg.second;
    }
  }

  // States grouped by owner so the writing pass touches each slot once.
  std::vector<std::vector<StateRef>> owned(n);
  const MaskKernels& kernels = mask_kernels();
  for (size_t j = 0; j < states.size(); ++j) {
    const int64_t elem = states[j].element_size();
    const ZeroFn zero = kernels.zero_fn(elem);
    TORCH_CHECK(zero != nullptr, kOp, ": states[", j, "] has ", elem, "-byte elements, not 1, 2, 4 or 8");
    owned[owner[j]].push_back({static_cast<char*>(states[j].data_ptr()), elem, zero});
  }

  int64_t rows = 0;
  for (const auto& l : L) rows += l.rows;
  auto counts = at::zeros({rows}, at::kLong);
  auto sums = at::zeros({rows}, at::kFloat);
  int64_t* cp = counts.data_ptr<int64_t>();
  float* up = sums.data_ptr<float>();
  int64_t row_base = 0;
  for (size_t t = 0; t < n; ++t) {
    const Layout& l = L[t];
    const Selection p = psel[t], g = gsel[t];
    const auto& st = owned[t];
    using WU = typename Bits<W>::U;
    using SU = typename Bits<S>::U;
    WU* __restrict w = reinterpret_cast<WU*>(wp[t]);
    const SU* __restrict sc = reinterpret_cast<const SU*>(sp[t]);
    uint8_t* __restrict m = reinterpret_cast<uint8_t*>(mp[t]);
    const int64_t off = l.offset;
    const ApplyFn apply_run = kernels.apply[0][Bits<W>::format][Bits<S>::format];
    const ApplyFn apply_slots = kernels.apply[1][Bits<W>::format][Bits<S>::format];
    at::parallel_for(0, l.rows, std::max<int64_t>(1, 16384 / std::max<int64_t>(1, l.row_stride)),
                     [&](int64_t r0, int64_t r1) {
      uint8_t keep[kBlock];
      for (int64_t r = r0; r < r1; ++r) {
        int64_t cnt = 0;
        double sum = 0;
        for_runs(l, r, r + 1, [&](int64_t b, int64_t e, bool live, const uint8_t* lv) {
          const ApplyFn apply = lv ? apply_slots : apply_run;
          for (int64_t b0 = b; b0 < e; b0 += kBlock) {
            const int64_t n = std::min<int64_t>(kBlock, e - b0);
            uint32_t c = 0;
            float fsum = 0.f;
            // split the block where "global index < cutoff" changes, so inside each piece
            // it is a constant and the loop vectorises
            for_tie_pieces(l, b0 - r * l.row_stride, n, off + r * l.row_stride, p.cutoff, g.cutoff,
                           [&](int64_t j0, int64_t j1, uint32_t ptie, uint32_t gtie) {
              apply(w + b0, sc + b0, m + b0, lv ? lv + (b0 - b) : nullptr, keep, j0, j1, live, ptie, gtie, p.key,
                    g.key, &c, &fsum);
            });
            for (const StateRef& s : st) s.zero(s.data + b0 * s.elem, keep, n);
            cnt += c;
            sum += fsum;
          }
        });
        cp[row_base + r] = cnt;
        up[row_base + r] = (float)sum;
      }
    });
    row_base += l.rows;
  }
  return {counts, sums};
}

std::tuple<at::Tensor, at::Tensor> mask_update(at::TensorList weights, at::TensorList masks, at::TensorList scores,
                                               at::TensorList live_rows, at::TensorList live_cols,
                                               at::TensorList states, c10::IntArrayRef state_owner,
                                               c10::IntArrayRef prune_counts, c10::IntArrayRef grow_counts) {
  const char* op = "chase_ext.mask_update_";
  check_mask_update_args(op, weights, masks, scores, live_rows, live_cols, states, state_owner, prune_counts,
                         grow_counts);
  if (!weights.empty()) check_devices(op, "weights", weights, weights[0].device());
  const auto L = make_layouts(weights, live_rows, live_cols);
  std::tuple<at::Tensor, at::Tensor> out;
  dispatch_float(weights.empty() ? at::kFloat : weights[0].scalar_type(), [&](auto wtag) {
    dispatch_float(scores.empty() ? at::kFloat : scores[0].scalar_type(), [&](auto stag) {
      out = run<decltype(wtag), decltype(stag)>(weights, masks, scores, L, states, state_owner, prune_counts,
                                                grow_counts);
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(chase_ext, CPU, m) { m.impl("mask_update_", &mask_update); }

}  // namespace chase_ext::cpu
