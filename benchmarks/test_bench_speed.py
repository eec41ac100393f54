"""The speed harness (speed_resnet50.py) in quick mode on the CPU: every part runs and
reports what it should; a budget too small for a part skips it and says so. The full run
is the script itself (see its docstring); quick figures are not saved."""
from __future__ import annotations

import json

import speed_resnet50 as speed

from chase_ext import cpu_memory


def _check_regime(reg, variants):
    assert set(reg["variants"]) == set(variants)
    for r in reg["variants"].values():
        assert r["median_s"] > 0 and r["per_s"] > 0 and r["speedup_over_dense"] > 0
    assert reg["variants"]["dense"]["speedup_over_dense"] == 1.0


def test_speed_harness_quick(benchmark, tmp_path):
    out = tmp_path / "speed.json"
    argv = ["--device", "cpu", "--quick", "--threads", "1", "--budget-s", "1200", "--recipes", "round8", "coupled", "latency",
            "--sc", "0.4", "0.5", "--out", str(out)]
    res = benchmark.pedantic(speed.main, args=(argv,), rounds=1, iterations=1)
    assert res["skipped"] == []
    assert json.loads(out.read_text())["models"].keys() == res["models"].keys()
    slim = ["spec@0.4", "spec@0.5", "round8@0.4", "coupled@0.4", "latency@0.4"]
    assert set(res["models"]) == {"dense", *slim}
    for k in slim:
        m = res["models"][k]
        assert m["mac_ratio"] > 1 and m["activation_ratio"] >= 1 and m["channels_after"] < m["channels_before"]
    # round_to 8 widths are multiples of 8 (or the full width)
    assert all(live % 8 == 0 or live == c for c, live in res["models"]["round8@0.4"]["live_per_group"].values())
    # coupled groups shrink block outputs too: more activation saved than the default
    assert res["models"]["coupled@0.4"]["activation_ratio"] > res["models"]["spec@0.4"]["activation_ratio"]
    sweep = ["dense", "spec@0.4", "spec@0.5"]
    for key, variants in [("eager_fp32@2", sweep), ("deploy_fp32@2", sweep), ("eager_fp32_cl@2", sweep),
                          ("deploy_fp32_cl@2", ["dense", *slim]), ("deploy_fp32_cl_fused@2", ["dense", *slim]),
                          ("deploy_fp32_cl_fused@1", ["dense", *slim]), ("eager_fp32@1", sweep)]:
        _check_regime(res["regimes"][key], variants)
    assert res["regimes"]["deploy_fp32@2"]["regime"]["deploy"] is True
    assert res["regimes"]["deploy_fp32_cl_fused@2"]["regime"]["fuse_relu"] is True
    # the fused path again in a child process that keeps freed memory; this process is untouched
    _check_regime(res["regimes"]["deploy_fp32_cl_fused_retain@2"], ["dense", *slim])
    _check_regime(res["regimes"]["deploy_fp32_cl_fused_retain@1"], ["dense", *slim])
    assert res["regimes"]["deploy_fp32_cl_fused_retain@2"]["regime"]["retain_cpu_memory"] is True
    assert cpu_memory.cpu_memory_retained() is None
    # torch.compile (Inductor, freezing) of dense, SPEC and the fastest recipe of the fused path
    comp = res["regimes"]["deploy_fp32_cl_compile@2"]
    assert comp["regime"]["compile"] is True and comp["regime"]["freezing"] is True
    assert len(comp["variants"]) == 3 and {"dense", "spec@0.4"} < set(comp["variants"])
    # training: dense, SPEC and the recipe that ran fastest through the fused deploy path
    dep = res["regimes"]["deploy_fp32_cl_fused@2"]["variants"]
    best = max(["round8@0.4", "coupled@0.4", "latency@0.4"], key=lambda k: dep[k]["speedup_over_dense"])
    assert set(res["train_step"]["variants"]) == {"dense", "spec@0.4", best}
    assert set(res["train_step_retain_cpu_memory"]["variants"]) == {"dense", "spec@0.4", best}
    # the same three compiled (torch.compile of forward and backward)
    tc = res["train_step_compiled"]
    assert tc["compiled"] is True and res["train_step"]["compiled"] is False
    assert set(tc["variants"]) == {"dense", "spec@0.4", best}
    assert all(v["speedup_over_dense"] > 0 for v in tc["variants"].values())
    prof = res["layer_breakdown"]["models"]
    assert set(prof) == {"dense", "spec@0.4"}
    for p in prof.values():
        assert p["by_kind_s"]["Conv2d"] > 0 and p["by_kind_s"]["BatchNorm2d"] > 0 and p["profiler_top"]
        assert set(p["by_stage_s"]) == {"stem_head", "layer1", "layer2", "layer3", "layer4"}


def test_speed_harness_budget_skips(tmp_path):
    out = tmp_path / "speed.json"
    res = speed.main(["--device", "cpu", "--quick", "--threads", "1", "--budget-s", "0", "--recipes", "spec",
                      "--out", str(out)])
    # nothing fits in no time: every selection and every part is named as skipped
    assert set(res["models"]) == {"dense"} and res["regimes"] == {} and res["train_step"] is None
    assert res["train_step_compiled"] is None and res["train_step_retain_cpu_memory"] is None
    assert any(s.startswith("selection spec@0.4") for s in res["skipped"])
    assert any(s.startswith("deploy_fp32_cl_fused batch 2") for s in res["skipped"])
    assert json.loads(out.read_text())["skipped"] == res["skipped"]
