// mask_update_ on CPU: prune by |w|, grow by |score|, rewrite masks, zero what changed,
// and emit per-row active counts and sum |w| -- selections first (read only), then one
// writing pass, so every error is raised before anything is written.
#include <torch/library.h>

#include "cpu/multi_tensor.h"

namespace chase_ext::cpu {
namespace {

struct StateRef {
  char* data;
  int64_t elem;  // bytes per element; zero is all-zero bits in every float format
};

template <class W, class S>
std::tuple<at::Tensor, at::Tensor> run(TensorList weights, TensorList masks, TensorList scores,
                                       const std::vector<Layout>& L, TensorList states,
                                       c10::IntArrayRef owner, c10::IntArrayRef prune_counts,
                                       c10::IntArrayRef grow_counts) {
  const char* op = "chase_ext.mask_update_";
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
  auto wkey = [&](int t, int64_t i) { return sortable_key(wval(t, i), true); };
  auto skey = [&](int t, int64_t i) { return sortable_key(sval(t, i), true); };

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
    const Selection p = radix_select(
        L, chunks, prune_counts[s], false, op, pname,
        [&](int t, int64_t i, bool live) { return live && mp[t][i]; }, wkey,
        [&](int t, int64_t i) { return !std::isfinite(wval(t, i)); }, "weights");
    auto pruned = [&](int t, int64_t i, bool live) {
      return live && mp[t][i] && in_selection(wkey(t, i), L[t].offset + i, p.key, p.cutoff, false);
    };
    const Selection g = radix_select(
        L, chunks, grow_counts[s], true, op, gname,
        [&](int t, int64_t i, bool live) { return live && (!mp[t][i] || pruned(t, i, live)); }, skey,
        [&](int t, int64_t i) { return !std::isfinite(sval(t, i)); }, "scores");
    for (int t : scopes[s]) {
      psel[t] = p;
      gsel[t] = g;
    }
  }

  // States grouped by owner so the writing pass touches each slot once.
  std::vector<std::vector<StateRef>> owned(n);
  for (size_t j = 0; j < states.size(); ++j)
    owned[owner[j]].push_back({static_cast<char*>(states[j].data_ptr()), (int64_t)states[j].element_size()});

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
    at::parallel_for(0, l.rows, std::max<int64_t>(1, 16384 / std::max<int64_t>(1, l.row_stride)),
                     [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        int64_t cnt = 0;
        double sum = 0;
        for_slots(l, r, r + 1, [&](int64_t i, bool live) {
          const int64_t gi = l.offset + i;
          const bool old = mp[t][i];
          const bool pr = live && old && in_selection(wkey(t, i), gi, p.key, p.cutoff, false);
          const bool after = old && !pr;
          const bool nw = after || (live && in_selection(skey(t, i), gi, g.key, g.cutoff, true));
          if (!(old && nw)) {
            wp[t][i] = W(0.f);
            for (const StateRef& s : st) std::memset(s.data + i * s.elem, 0, s.elem);
          } else {
            sum += std::abs(static_cast<double>(wval(t, i)));
          }
          mp[t][i] = nw;
          cnt += nw;
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
  check_float_list(op, "weights", weights);
  check_same_dtype(op, "weights", weights);
  check_float_list(op, "scores", scores);
  check_same_dtype(op, "scores", scores);
  check_like(op, "scores", scores, "weights", weights);
  check_masks(op, masks, weights, "weights");
  check_live(op, "live_rows", live_rows, weights, 0);
  check_live(op, "live_cols", live_cols, weights, 1);
  check_owner(op, states, state_owner, weights, "state_owner");
  check_counts(op, "prune_counts", prune_counts, weights.size());
  check_counts(op, "grow_counts", grow_counts, weights.size());
  TORCH_CHECK(grow_counts.size() == prune_counts.size(), op, ": prune_counts has ", prune_counts.size(),
              " entries but grow_counts has ", grow_counts.size());
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
