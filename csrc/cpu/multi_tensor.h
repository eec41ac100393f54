// CPU helpers for multi-tensor ops: a list of tensors seen as one global order, split
// into row-aligned chunks for threads, and the radix select used by every selection.
#pragma once
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstring>
#include <utility>
#include <vector>

#include "common/checks.h"
#include "common/dispatch.h"
#include "common/keys.h"

namespace chase_ext::cpu {

// One tensor of the list: where it sits in the global order and how its slots map to
// (row = output channel, col = input channel) for the liveness vectors.
//
// Slots are addressed by their position in memory ("storage index"). Rows are blocks of
// memory (the ops take rows-dense tensors only), but within a row memory may hold the
// slots in another order than row-major (channels_last: (h, w, i) for the row-major
// (i, h, w)); then `perm` maps each storage slot of a row to its row-major place and `inv`
// back. Selections break ties by the row-major ("logical") global index, never by memory.
struct Layout {
  int64_t offset = 0, numel = 0, rows = 0, row_stride = 0, cols = 1, col_stride = 0;
  const bool* live_row = nullptr;  // nullptr: every row live
  const bool* live_col = nullptr;  // nullptr: every column live
  std::vector<uint8_t> slot_live;   // with live_col: the liveness of each storage slot of a row
  std::vector<int64_t> perm, inv;   // empty: memory is row-major (contiguous)

  // Row-major index (within the tensor) of storage index i.
  int64_t logical(int64_t i) const {
    if (perm.empty()) return i;
    return (i / row_stride) * row_stride + perm[i % row_stride];
  }
};

// perm / inv of a rows-dense tensor: walk the row-major positions of one row, keeping
// the memory offset (strides of the dims after the first) alongside.
inline void fill_row_order(const at::Tensor& x, Layout& l) {
  if (x.is_contiguous() || l.row_stride <= 1) return;
  const int64_t d = x.dim();
  l.perm.resize(l.row_stride);
  l.inv.resize(l.row_stride);
  std::vector<int64_t> idx(d, 0);
  int64_t mem = 0;
  for (int64_t j = 0; j < l.row_stride; ++j) {
    l.perm[mem] = j;
    l.inv[j] = mem;
    for (int64_t k = d - 1; k >= 1; --k) {  // next row-major position, odometer style
      mem += x.stride(k);
      if (++idx[k] < x.size(k)) break;
      mem -= x.stride(k) * x.size(k);
      idx[k] = 0;
    }
  }
}

inline std::vector<Layout> make_layouts(TensorList ts, TensorList live_rows, TensorList live_cols) {
  std::vector<Layout> out(ts.size());
  int64_t off = 0;
  for (size_t t = 0; t < ts.size(); ++t) {
    Layout& l = out[t];
    const auto& x = ts[t];
    l.offset = off;
    l.numel = x.numel();
    l.rows = x.dim() == 0 ? 1 : x.size(0);
    l.row_stride = l.rows ? l.numel / l.rows : 0;
    l.cols = x.dim() >= 2 ? x.size(1) : 1;
    l.col_stride = l.cols ? l.row_stride / l.cols : 0;
    fill_row_order(x, l);
    if (!live_rows.empty()) l.live_row = live_rows[t].data_ptr<bool>();
    if (!live_cols.empty()) {
      l.live_col = live_cols[t].data_ptr<bool>();
      l.slot_live.resize(l.row_stride);
      for (int64_t s = 0; s < l.row_stride; ++s) {
        const int64_t j = l.perm.empty() ? s : l.perm[s];
        l.slot_live[s] = uint8_t(l.live_col[j / l.col_stride]);
      }
    }
    off += l.numel;
  }
  return out;
}

// Calls f(i, live) for every slot of rows [r0, r1) with its storage index i, in row-major
// order (the order ties are broken in).
template <class F>
inline void for_slots(const Layout& l, int64_t r0, int64_t r1, F&& f) {
  for (int64_t r = r0; r < r1; ++r) {
    const bool rl = !l.live_row || l.live_row[r];
    const int64_t base = r * l.row_stride;
    const uint8_t* lv = l.live_col && rl ? l.slot_live.data() : nullptr;
    if (l.perm.empty()) {
      if (!lv) {
        for (int64_t i = base, e = base + l.row_stride; i < e; ++i) f(i, rl);
      } else {
        for (int64_t j = 0; j < l.row_stride; ++j) f(base + j, lv[j] != 0);
      }
      continue;
    }
    for (int64_t j = 0; j < l.row_stride; ++j) {
      const int64_t s = l.inv[j];
      f(base + s, lv ? lv[s] != 0 : rl);
    }
  }
}

// Calls f(begin, end, live, lv) for the storage slots of rows [r0, r1) in memory order, in a few long runs, so hot
// loops run over plain index ranges with pointers in registers: lv == nullptr means every
// slot of the run has liveness `live`; otherwise lv[j] is the liveness of slot begin + j
// (a live row of a layer with dead input channels, one byte per slot of the row).
template <class F>
inline void for_runs(const Layout& l, int64_t r0, int64_t r1, F&& f) {
  if (!l.live_row && !l.live_col) {
    f(r0 * l.row_stride, r1 * l.row_stride, true, nullptr);
    return;
  }
  for (int64_t r = r0; r < r1; ++r) {
    const bool rl = !l.live_row || l.live_row[r];
    const int64_t base = r * l.row_stride;
    f(base, base + l.row_stride, rl, rl && l.live_col ? l.slot_live.data() : nullptr);
  }
}
struct Unit {
  int t;
  int64_t r0, r1;  // rows [r0, r1) of tensor t
};
using Chunk = std::vector<Unit>;

// Splits the rows of the given tensors (in global order) into at most `n` contiguous
// chunks of about equal element count. Chunk order == global order.
inline std::vector<Chunk> make_chunks(const std::vector<Layout>& L, const std::vector<int>& tensors, int n) {
  int64_t total = 0;
  for (int t : tensors) total += L[t].numel;
  n = std::max<int64_t>(1, std::min<int64_t>(n, total / 32768 + 1));
  const int64_t target = (total + n - 1) / n;
  std::vector<Chunk> chunks(1);
  int64_t filled = 0;
  for (int t : tensors) {
    const Layout& l = L[t];
    int64_t r = 0;
    while (r < l.rows) {
      if (filled >= target && (int)chunks.size() < n) {
        chunks.emplace_back();
        filled = 0;
      }
      // rows that still fit into this chunk (at least one)
      int64_t take = l.row_stride ? std::max<int64_t>(1, (target - filled + l.row_stride - 1) / l.row_stride) : l.rows;
      take = std::min(take, l.rows - r);
      chunks.back().push_back({t, r, r + take});
      filled += take * l.row_stride;
      r += take;
    }
  }
  return chunks;
}

template <class F>
inline void parallel_chunks(const std::vector<Chunk>& chunks, F&& f) {
  at::parallel_for(0, (int64_t)chunks.size(), 1, [&](int64_t b, int64_t e) {
    for (int64_t c = b; c < e; ++c) f(c, chunks[c]);
  });
}

inline int num_chunks() { return std::max(1, at::get_num_threads()) * 2; }

// Result of a selection, in the original key space: selected slots are the candidates
// with a better key, or an equal key and (logical) global index < cutoff.
struct Selection {
  uint32_t key;
  int64_t cutoff;
};

// Radix select of the k smallest `key(t, i)` among slots where `cand(t, i, live)` holds.
// Two passes over the data (high 16 bits, then low 16 bits within the chosen bin) plus
// a scan of one chunk to place the index cutoff among equal keys. `largest` is handled
// by the caller flipping keys (~key), so ties still go to the lower index. `bad(t, i)`
// flags non-finite inputs; any makes the op fail before anything is written.
template <class Cand, class Key, class Bad>
Selection radix_select(const std::vector<Layout>& L, const std::vector<Chunk>& chunks, int64_t k, bool largest,
                       const char* op, const std::string& kname, Cand cand, Key key, Bad bad,
                       const char* bad_name) {
  constexpr int B = 1 << 16;
  const size_t nc = chunks.size();
  std::vector<int64_t> hist(nc * B, 0);
  std::vector<char> any_bad(nc, 0);
  auto flip = [largest](uint32_t k) { return largest ? ~k : k; };
  // pass 1: histogram of the high 16 bits of candidate keys
  parallel_chunks(chunks, [&](int64_t c, const Chunk& ch) {
    int64_t* h = hist.data() + c * B;
    char nb = 0;
    for (const Unit& u : ch)
      for_slots(L[u.t], u.r0, u.r1, [&](int64_t i, bool live) {
        nb |= bad(u.t, i);
        if (cand(u.t, i, live)) ++h[flip(key(u.t, i)) >> 16];
      });
    any_bad[c] = nb;
  });
  for (size_t c = 0; c < nc; ++c) TORCH_CHECK(!any_bad[c], op, ": ", bad_name, " has non-finite values");
  std::vector<int64_t> total(B, 0);
  for (size_t c = 0; c < nc; ++c)
    for (int b = 0; b < B; ++b) total[b] += hist[c * B + b];
  int64_t count = 0;
  for (int b = 0; b < B; ++b) count += total[b];
  TORCH_CHECK(k >= 0 && k <= count, op, ": ", kname, "=", k, " is out of range: only ", count,
              " candidate slots");
  if (k == 0) return {largest ? kKeyMax : 0u, 0};
  int64_t need = k;
  uint32_t hi = 0;
  for (; hi < (uint32_t)B; ++hi) {
    if (need <= total[hi]) break;
    need -= total[hi];
  }
  // pass 2: histogram of the low 16 bits inside bin `hi`
  std::fill(hist.begin(), hist.end(), 0);
  parallel_chunks(chunks, [&](int64_t c, const Chunk& ch) {
    int64_t* h = hist.data() + c * B;
    for (const Unit& u : ch)
      for_slots(L[u.t], u.r0, u.r1, [&](int64_t i, bool live) {
        if (!cand(u.t, i, live)) return;
        const uint32_t fk = flip(key(u.t, i));
        if ((fk >> 16) == hi) ++h[fk & 0xFFFF];
      });
  });
  std::fill(total.begin(), total.end(), 0);
  for (size_t c = 0; c < nc; ++c)
    for (int b = 0; b < B; ++b) total[b] += hist[c * B + b];
  uint32_t lo = 0;
  for (; lo < (uint32_t)B; ++lo) {
    if (need <= total[lo]) break;
    need -= total[lo];
  }
  const uint32_t fkey = (hi << 16) | lo;
  // `need` ties at fkey are taken, in global order: find the chunk holding the last one
  size_t c = 0;
  for (; c < nc; ++c) {
    if (need <= hist[c * B + lo]) break;
    need -= hist[c * B + lo];
  }
  int64_t cutoff = -1;
  for (const Unit& u : chunks[c]) {
    for_slots(L[u.t], u.r0, u.r1, [&](int64_t i, bool live) {
      if (cutoff >= 0 || !cand(u.t, i, live) || flip(key(u.t, i)) != fkey) return;
      if (--need == 0) cutoff = L[u.t].offset + L[u.t].logical(i) + 1;
    });
    if (cutoff >= 0) break;
  }
  return {flip(fkey), cutoff};
}

}  // namespace chase_ext::cpu
