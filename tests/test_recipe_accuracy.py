"""benchmarks/recipe_accuracy.py in quick mode: the report's structure, and its ``spec``
recipe is the demo's Chase run, checked against that run written out by hand."""
from __future__ import annotations

import importlib.util
import json
import math
import os

import pytest
import torch
import torch.nn.functional as F

from chase_ext import ChaseOptimizer, demo
from chase_ext import training as T

_SCRIPT = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "recipe_accuracy.py")


def _module():
    spec = importlib.util.spec_from_file_location("_recipe_accuracy", _SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _direct_chase(seed: int, train_size: int, epochs: int, threads: int):
    """The demo's Chase run as a user writes it: ChaseOptimizer around SGD, cosine per step."""
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        xtr, ytr, xte, yte = demo.load_digits(1000, seed, train_size)
        torch.manual_seed(seed)
        model = T.vgg(in_ch=1, size=28, num_classes=10)
        loader = T.TensorLoader(xtr, ytr, 64, shuffle=True, seed=seed)
        torch.manual_seed(seed)
        base = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
        total = len(loader) * epochs
        opt = ChaseOptimizer(base, model, density=0.1, channel_sparsity=0.5, seed=seed, total_steps=total,
                             example_inputs=xtr[:2], backend=T.pick_backend("cpu"))
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 0.5 * (1 + math.cos(math.pi * min(t, total) / total)))
        losses = []
        for _ in range(epochs):
            model.train()
            run_loss = torch.zeros(())
            for x, y in loader:
                loss = F.cross_entropy(model(x), y)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                run_loss += loss.detach()
            losses.append(float(run_loss) / len(loader))
        live = {r["group"]: [r["channels"], r["live"]] for r in opt.channel_report()}
        opt.slim_()
        acc = T.evaluate(model, T.TensorLoader(xte, yte, 500))
        return acc, losses, live
    finally:
        torch.set_num_threads(old)


def test_recipe_accuracy_quick_matches_direct_run():
    pytest.importorskip("mlxtend")
    ra = _module()
    res = ra.main(["--quick", "--no-save", "--threads", "1"])
    s = res["settings"]
    assert s["recipes"] == ["spec", "round8"] and s["seeds"] == [0] and s["epochs"] == 1
    assert set(res["summary"]) == {"spec", "round8"}
    assert [(r["recipe"], r["seed"]) for r in res["runs"]] == [("spec", 0), ("round8", 0)]
    assert res["torch"] == torch.__version__ and res["machine"]["threads"] == 1 and res["date"]
    for r in res["runs"]:
        # slimming changes no prediction; the channels S_c asks for are gone, so MACs drop
        assert r["test_acc"] == r["masked_test_acc"] and r["slim_same_predictions"]
        assert r["channels_after"] == sum(lv for _, lv in r["live_per_group"].values())
        assert r["channels_after"] <= math.ceil(0.5 * r["channels_before"]) + 8
        assert r["mac_ratio"] > 1.2 and r["train_seconds"] > 0
    # the quick run learns: a model at chance (10%) would make every comparison vacuous
    assert res["runs"][0]["test_acc"] > 0.5
    rnd = res["runs"][1]["live_per_group"]
    assert all(lv % 8 == 0 or lv == c for c, lv in rnd.values())
    spec = res["summary"]["spec"]
    assert spec["diff_vs_spec_points"] == {"0": 0.0} and spec["acc_std"] == 0.0
    r8 = res["summary"]["round8"]
    assert r8["diff_vs_spec_mean_points"] == pytest.approx(
        100 * (res["runs"][1]["test_acc"] - res["runs"][0]["test_acc"]))

    acc, losses, live = _direct_chase(0, s["train_size"], 1, threads=1)
    run = res["runs"][0]
    assert run["test_acc"] == acc
    assert run["loss_history"] == losses
    assert run["live_per_group"] == live


def test_recipe_accuracy_rejects_bad_input(capsys):
    ra = _module()
    for argv, msg in ([["--recipes", "nope"], "unknown recipe"], [["--seeds", "0", "0"], "distinct"],
                      [["--sc", "1.5"], "--sc"], [["--epochs", "0"], "--epochs"]):
        with pytest.raises(SystemExit):
            ra.main(["--quick", "--no-save", *argv])
        assert msg in capsys.readouterr().err


def test_recipe_accuracy_resnet_couples_block_outputs():
    """--model resnet: the coupled recipe shrinks the residual groups (block outputs and
    shortcuts together), which the uncoupled SPEC run keeps whole; slimming stays exact."""
    pytest.importorskip("mlxtend")
    ra = _module()
    res = ra.main(["--quick", "--no-save", "--threads", "1", "--model", "resnet",
                   "--recipes", "spec", "coupled", "--train-size", "500"])
    assert res["settings"]["model"] == "resnet" and "resnet" in res["settings"]["model_description"]
    spec, coupled = ({g: tuple(v) for g, v in r["live_per_group"].items()} for r in res["runs"])
    residual = [g for g in coupled if "downsample" in g]
    assert len(residual) == 2 and all(g.count("conv3") == 2 for g in residual)
    # SPEC: every conv its own group, the residual convs not prunable (absent from the report)
    assert not any("downsample" in g for g in spec)
    assert all(lv < c for c, lv in (coupled[g] for g in residual))
    for r in res["runs"]:
        assert r["test_acc"] == r["masked_test_acc"] and r["slim_same_predictions"]
    assert res["runs"][1]["mac_ratio"] > res["runs"][0]["mac_ratio"]


def test_recipe_accuracy_saves_after_each_run(tmp_path, monkeypatch):
    # a run cut off by a time limit (gpu_check.sh's cap) keeps the runs it has done
    ra = _module()
    calls = []

    def fake_run(rec, seed, s, data, latency_dir, progress=False):
        if calls:
            raise KeyboardInterrupt  # as a timeout's signal would stop it
        calls.append(rec)
        return {"recipe": rec, "seed": seed, "test_acc": 0.9, "masked_test_acc": 0.9, "mac_ratio": 1.5,
                "channels_after": 10, "channels_before": 20, "train_seconds": 1.0}

    monkeypatch.setattr(ra, "chase_run", fake_run)
    monkeypatch.setattr(ra.demo, "load_digits", lambda *a: None)
    out = tmp_path / "res.json"
    with pytest.raises(KeyboardInterrupt):
        ra.main(["--quick", "--threads", "1", "--out", str(out)])
    res = json.loads(out.read_text())
    assert res["complete"] is False and [r["recipe"] for r in res["runs"]] == ["spec"]
    assert res["seeds_summarized"] == [] and res["summary"] == {}
    assert not os.path.exists(str(out) + ".tmp")
