"""Physical channel removal (chase_ext.slim)."""
from __future__ import annotations

import copy
import functools
import io
import warnings

import pytest
import torch
from torch import nn

from chase_ext.graph import explicit_groups, find_channel_groups, group_to_dict
from chase_ext.slim import export_dense, replay_, slim_

from models import JOINS, MODELS, example_input, keep_per_block, mask_channels_, mlp, perturb_bn, resnet_bottleneck, vgg_small


def _native_gather():
    try:
        from chase_ext import _ops

        t = torch.arange(6.0).view(3, 2)
        _ops.gather_channels_(t, torch.tensor([0, 2]), 0)
        return _ops.gather_channels_
    except Exception:  # noqa: BLE001 - extension not built here
        return None


GATHERS = [pytest.param(None, id="reference")]
if _native_gather() is not None:
    GATHERS.append(pytest.param(_native_gather(), id="native"))


def _random_keep(groups, gen, frac=0.5):
    keep = []
    for g in groups:
        C = g.channels
        if g.blocks > 1:  # a grouped conv: as many of each block
            keep.append(keep_per_block(C, g.blocks, max(1, int(C // g.blocks * frac)), gen))
            continue
        k = max(1, int(C * frac))
        keep.append(torch.randperm(C, generator=gen)[:k].sort().values)
    return keep


@pytest.mark.parametrize("gather", GATHERS)
@pytest.mark.parametrize("joins", ["plain", "coupled", "coupled+gated", "all"])
@pytest.mark.parametrize("name", sorted(MODELS))
def test_slim_equals_masked(device, name, joins, gather):
    torch.manual_seed(0)
    model = MODELS[name]()
    perturb_bn(model)
    model.to(device)
    x = example_input(name).to(device)
    groups = find_channel_groups(model, x, **JOINS[joins])
    keep = _random_keep(groups, torch.Generator().manual_seed(3))
    mask_channels_(model, groups, keep)
    slim = copy.deepcopy(model)
    params_before = [(n, id(p)) for n, p in slim.named_parameters()]
    rec = slim_(slim, groups, keep, gather=gather)
    assert [(n, id(p)) for n, p in slim.named_parameters()] == params_before
    model.eval()
    slim.eval()
    # full float32 on CUDA too (TF32 convs of two widths would differ by ~1e-3)
    with torch.no_grad(), torch.backends.cudnn.flags(enabled=True, allow_tf32=False):
        torch.testing.assert_close(slim(x), model(x), rtol=1e-5, atol=1e-5)
    assert all(p.device.type == torch.device(device).type for p in slim.parameters())
    mods = dict(slim.named_modules())
    full = dict(model.named_modules())
    # inside a concatenation a reader loses what every group it reads there lost
    lost = {}
    for g, k in zip(groups, keep):
        for n in g.offsets:
            rep = next((c.repeat for c in g.consumers if c.module == n), 1)
            lost[n] = lost.get(n, 0) + (g.channels - len(k)) * rep
    for g, k in zip(groups, keep):
        K = len(k)
        for p in g.producers:
            m = mods[p]
            assert m.weight.shape[0] == K
            assert (m.out_features if isinstance(m, nn.Linear) else m.out_channels) == K
        for f in g.followers:
            m = mods[f]
            W = K if f not in g.offsets else full[f].weight.shape[0] - lost[f]
            if isinstance(m, nn.Conv2d):
                assert m.in_channels == m.out_channels == m.groups == W == m.weight.shape[0]
            else:
                assert m.num_features == W == m.running_mean.shape[0] == m.weight.shape[0]
        for c in g.consumers:
            m = mods[c.module]
            W = K * c.repeat if c.module not in g.offsets else full[c.module].weight.shape[1] - lost[c.module]
            assert m.weight.shape[1] == W // c.groups
            assert (m.in_features if isinstance(m, nn.Linear) else m.in_channels) == W
    assert len(rec["groups"]) == len(groups)
    # train mode: forward/backward at the new width
    slim.train()
    slim(torch.cat([x, x])).sum().backward()
    for p in slim.parameters():
        assert p.grad.shape == p.shape


def _sgd_adam(model, kind):
    if kind == "sgd":
        return torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    return torch.optim.Adam(model.parameters(), lr=1e-3)


@pytest.mark.parametrize("kind", ["sgd", "adam"])
def test_optimizer_state_masks_and_grads_follow(kind):
    torch.manual_seed(0)
    model = vgg_small()
    x = example_input("vgg_small")
    groups = find_channel_groups(model, x)
    opt = _sgd_adam(model, kind)
    model(x).sum().backward()
    opt.step()
    model(x).sum().backward()  # leave .grad populated
    masks = {n: torch.rand(p.shape) > 0.5 for n, p in model.named_parameters() if p.dim() > 1}
    keep = _random_keep(groups, torch.Generator().manual_seed(5))
    # expected values: index_select of the old tensors along the slimmed dims
    mods = dict(model.named_modules())
    expect = {}
    for n, p in model.named_parameters():
        expect[n] = {
            "p": p.detach().clone(),
            "g": p.grad.clone(),
            "s": {k: v.clone() for k, v in opt.state[p].items() if torch.is_tensor(v)},
            "m": masks.get(n, None),
        }
    for g, k in zip(groups, keep):
        for pr in g.producers:
            for t in ("weight", "bias"):
                e = expect[f"{pr}.{t}"]
                sel = lambda v: v.index_select(0, k)  # noqa: E731
                e["p"], e["g"] = sel(e["p"]), sel(e["g"])
                e["s"] = {kk: sel(v) if v.dim() else v for kk, v in e["s"].items()}
                if e["m"] is not None:
                    e["m"] = sel(e["m"])
        for f in g.followers:
            for t in ("weight", "bias"):
                e = expect[f"{f}.{t}"]
                e["p"], e["g"] = e["p"][k], e["g"][k]
                e["s"] = {kk: v[k] if v.dim() else v for kk, v in e["s"].items()}
        for c in g.consumers:
            cols = (k.view(-1, 1) * c.repeat + torch.arange(c.repeat)).reshape(-1)
            e = expect[f"{c.module}.weight"]
            e["p"], e["g"] = e["p"][:, cols], e["g"][:, cols]
            e["s"] = {kk: v[:, cols] if v.dim() else v for kk, v in e["s"].items()}
            e["m"] = e["m"][:, cols]
    ids = [id(p) for p in model.parameters()]
    slim_(model, groups, keep, optimizer=opt, masks=masks)
    assert [id(p) for p in model.parameters()] == ids
    assert [id(p) for p in opt.param_groups[0]["params"]] == ids
    for n, p in model.named_parameters():
        e = expect[n]
        assert torch.equal(p.detach(), e["p"]), n
        assert torch.equal(p.grad, e["g"]), n
        for kk, v in opt.state[p].items():
            if torch.is_tensor(v) and v.dim():
                assert v.shape == p.shape and torch.equal(v, e["s"][kk]), (n, kk)
        if n in masks:
            assert masks[n].dtype == torch.bool and torch.equal(masks[n], e["m"]), n
    running = mods["features.1"].running_var
    assert running.shape == (len(keep[0]),)
    # training continues with the same optimizer
    opt.zero_grad()
    loss = nn.functional.cross_entropy(model(x), torch.tensor([1, 2]))
    loss.backward()
    opt.step()
    assert torch.isfinite(loss)


@pytest.mark.skipif(not hasattr(torch.optim, "Adafactor"), reason="torch.optim.Adafactor needs torch >= 2.5")
def test_factored_optimizer_state_follows():
    # Adafactor keeps row_var / col_var that broadcast to the weight: each is gathered on
    # the dims it spans and left alone on the dims it averages over (size 1)
    torch.manual_seed(0)
    model = vgg_small()
    x = example_input("vgg_small")
    groups = find_channel_groups(model, x)
    opt = torch.optim.Adafactor(model.parameters(), lr=1e-2)
    model(x).sum().backward()
    opt.step()
    keep = _random_keep(groups, torch.Generator().manual_seed(3))
    expect = {n: {k: v.clone() for k, v in opt.state[p].items() if torch.is_tensor(v) and v.dim()}
              for n, p in model.named_parameters()}
    for g, k in zip(groups, keep):
        cuts = [(f"{m}.{t}", 0, k) for m in g.producers + g.followers for t in ("weight", "bias")
                if f"{m}.{t}" in expect]
        cuts += [(f"{c.module}.weight", 1, (k.view(-1, 1) * c.repeat + torch.arange(c.repeat)).reshape(-1))
                 for c in g.consumers]
        for n, dim, idx in cuts:
            expect[n] = {kk: v.index_select(dim, idx) if v.shape[dim] > 1 else v for kk, v in expect[n].items()}
    slim_(model, groups, keep, optimizer=opt)
    factored = 0
    for n, p in model.named_parameters():
        for kk, v in opt.state[p].items():
            if torch.is_tensor(v) and v.dim():
                assert torch.equal(v, expect[n][kk]), (n, kk)
                factored += v.shape != p.shape
    assert factored >= 2 * len(groups)
    model(x).sum().backward()
    opt.step()  # the next step sees consistent shapes
    assert all(bool(torch.isfinite(p).all()) for p in model.parameters())


def test_accumulate_grad_trap():
    """An autograd graph alive across slim_ must not break the next backward."""
    # the trap exists in this PyTorch: a plain .data swap breaks the next backward
    p = nn.Parameter(torch.randn(4, 3))
    alive = (p * 2).sum()
    p.data = torch.randn(2, 3)
    with pytest.raises(RuntimeError, match="invalid gradient"):
        (p * 3).sum().backward()
    del alive

    torch.manual_seed(0)
    model = resnet_bottleneck()
    x = example_input("resnet_bottleneck")
    groups = find_channel_groups(model, x)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    loss = model(x).sum()
    loss.backward(retain_graph=True)
    opt.step()
    loss_unused = model(x).sum()  # a second live graph that never ran backward
    slim_(model, groups, _random_keep(groups, torch.Generator().manual_seed(0)), optimizer=opt)
    opt.zero_grad()
    model(x).sum().backward()
    opt.step()
    for p in model.parameters():
        assert p.grad is not None and p.grad.shape == p.shape
    del loss, loss_unused


def test_replay_and_load_state_dict(tmp_path):
    torch.manual_seed(0)
    model = vgg_small()
    x = example_input("vgg_small")
    groups = find_channel_groups(model, x)
    gen = torch.Generator().manual_seed(7)
    rec1 = slim_(model, groups, _random_keep(groups, gen, 0.75))
    # second step: some groups unchanged (None), others slimmed again (current indices)
    keep2 = [None if i % 2 else torch.arange(0, model.get_submodule(g.producers[0]).weight.shape[0], 2)
             for i, g in enumerate(groups)]
    rec2 = slim_(model, groups, keep2)
    assert len(rec2["groups"]) == (len(groups) + 1) // 2
    path = tmp_path / "ckpt.pt"
    torch.save({"model": model.state_dict(), "records": [rec1, rec2]}, path)
    ck = torch.load(path, weights_only=True)
    fresh = vgg_small()
    replay_(fresh, ck["records"])
    fresh.load_state_dict(ck["model"])
    model.eval()
    fresh.eval()
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), model(x))
    assert fresh.classifier[0].in_features == model.classifier[0].in_features
    with pytest.raises(ValueError, match="replay_"):
        replay_(vgg_small(size=16), ck["records"])


def test_export_dense():
    torch.manual_seed(0)
    model = mlp()
    x = example_input("mlp")
    groups = find_channel_groups(model, x)
    slim_(model, groups, _random_keep(groups, torch.Generator().manual_seed(1)))

    def boom(module, args):  # stands in for a hook registered by chase_ext
        raise AssertionError("chase hook called")

    boom.__module__ = "chase_ext.optimizer"

    class Owner:  # stands in for a chase_ext object referenced by the model
        pass

    Owner.__module__ = "chase_ext.optimizer"
    model[0].register_forward_pre_hook(boom)
    model[3].register_forward_pre_hook(functools.partial(boom))
    model._chase = Owner()
    model.eval()
    out = export_dense(model)
    assert not hasattr(out, "_chase") and hasattr(model, "_chase")
    assert len(model[0]._forward_pre_hooks) == 1  # original untouched
    assert len(out[0]._forward_pre_hooks) == 0 and len(out[3]._forward_pre_hooks) == 0
    assert all(type(p) is nn.Parameter for p in out.parameters())
    assert all(p.data_ptr() != q.data_ptr() for p, q in zip(out.parameters(), model.parameters()))
    with torch.no_grad():
        ref = _no_hooks_forward(model, x)
        torch.testing.assert_close(out(x), ref)
    ep = torch.export.export(out, (x,))
    torch.testing.assert_close(ep.module()(x), ref)
    buf = io.BytesIO()
    torch.save(out, buf)  # picklable without chase_ext objects


def _no_hooks_forward(model, x):
    h = [dict(m._forward_pre_hooks) for m in model]
    for m in model:
        m._forward_pre_hooks.clear()
    try:
        return model(x)
    finally:
        for m, d in zip(model, h):
            m._forward_pre_hooks.update(d)


def test_export_dense_conv_model(device):
    model = vgg_small().eval().to(device)
    x = example_input("vgg_small").to(device)
    groups = find_channel_groups(model, x)
    slim_(model, groups, _random_keep(groups, torch.Generator().manual_seed(2)))
    out = export_dense(model)
    ep = torch.export.export(out, (x,))
    with torch.no_grad(), torch.backends.cudnn.flags(enabled=True, allow_tf32=False):
        torch.testing.assert_close(ep.module()(x), model(x))


@pytest.mark.parametrize(
    "keep, match",
    [
        ([torch.tensor([2, 1])], "strictly increasing"),
        ([torch.tensor([0, 8])], r"\[0, 8\)"),
        ([torch.tensor([], dtype=torch.int64)], "at least one"),
        ([torch.tensor([0.0, 1.0])], "int64"),
        ([None, None], "2 keep entries"),
    ],
)
def test_validation_before_writing(keep, match):
    model = vgg_small()
    groups = find_channel_groups(model, example_input("vgg_small"))[:1]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=match):
        slim_(model, groups, keep)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])


def test_noop_keep():
    model = mlp()
    groups = find_channel_groups(model, example_input("mlp"))
    rec = slim_(model, groups, [None, torch.arange(32)])
    assert rec == {"groups": [], "keep": []}
    assert model[0].out_features == 32


def test_width_mismatch_rejected():
    model = mlp()
    groups = find_channel_groups(model, example_input("mlp"))
    slim_(model, groups[:1], [torch.arange(10)])
    # the stale group still claims 32 channels on the consumer side: nothing is written
    with pytest.raises(ValueError, match="in_features=10"):
        slim_(model, [groups[0].__class__(["3"], groups[0].consumers, [], 32)], [torch.arange(4)])


class SelfCoupled(nn.Module):
    """stem -> (x + project(depthwise(x))) -> head: with coupled=True, ``proj`` is both a
    producer and a consumer of the same coupled group."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.proj = nn.Conv2d(8, 8, 1)
        self.head = nn.Conv2d(8, 4, 1)
        self.fc = nn.Linear(4 * 4 * 4, 3)

    def forward(self, x):
        x = torch.relu(self.bn(self.stem(x)))
        x = x + self.proj(self.dw(x))
        x = nn.functional.adaptive_max_pool2d(self.head(x), 4)
        return self.fc(torch.flatten(x, 1))


def test_slim_self_coupled_group():
    torch.manual_seed(0)
    model = SelfCoupled()
    perturb_bn(model)
    x = torch.randn(2, 3, 8, 8)
    groups = find_channel_groups(model, x, coupled=True)
    g = next(g for g in groups if len(g.producers) > 1)
    assert g.producers == ["stem", "proj"] and [c.module for c in g.consumers] == ["proj", "head"]
    keep = _random_keep(groups, torch.Generator().manual_seed(4))
    mask_channels_(model, groups, keep)
    slim = copy.deepcopy(model)
    opt = torch.optim.Adam(slim.parameters(), lr=0.0)  # state only, weights unchanged
    slim.eval()  # keep the BatchNorm statistics equal to the masked model's
    slim(x).sum().backward()
    opt.step()
    slim_(slim, groups, keep, optimizer=opt)
    assert slim.proj.weight.shape[:2] == (len(keep[0]), len(keep[0]))
    assert opt.state[slim.proj.weight]["exp_avg"].shape == slim.proj.weight.shape
    model.eval()
    slim.eval()
    with torch.no_grad():
        torch.testing.assert_close(slim(x), model(x))


def _weight_norm_chain():
    from test_graph import chain_model

    m = chain_model()
    torch.nn.utils.parametrizations.weight_norm(m[0])
    return m


def _traced(model, x, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the weight-normed layer is named in a warning
        return find_channel_groups(model, x, **kw)


def _explicit_preact(model, x):
    return explicit_groups(model, [group_to_dict(g) for g in find_channel_groups(model, x, coupled=True)])


@pytest.mark.parametrize(
    "case",
    [
        "weight_norm",  # the other groups of a model with a computed weight
        "aux_head",  # traced in eval mode: the training-only head is a consumer
        "bare_norms",  # norms without tensors follow with their num_features
        "preact_explicit",  # coupled groups of tracing, given back explicitly
    ],
)
def test_slim_equals_masked_traced_cases(case):
    from test_graph import AuxHead, BareNorms, PreAct

    torch.manual_seed(0)
    x = torch.randn(2, 3, 8, 8)
    build, find = {
        "weight_norm": (_weight_norm_chain, _traced),
        "aux_head": (lambda: perturb_bn(AuxHead()).eval(), _traced),
        # the groups of c and d share a norm that cannot follow (PyTorch would warn)
        "bare_norms": (BareNorms, lambda m, x: _traced(m, x)[:2]),
        "preact_explicit": (lambda: perturb_bn(PreAct()), _explicit_preact),
    }[case]
    model = build()
    groups = find(model, x)
    assert groups
    keep = _random_keep(groups, torch.Generator().manual_seed(3))
    mask_channels_(model, groups, keep)
    state = copy.deepcopy(model.state_dict())
    slim = copy.deepcopy(model)
    rec = slim_(slim, groups, keep)
    for train in (False, True):  # the aux head runs in train mode only
        model.load_state_dict(state)
        slim.train(train)
        model.train(train)
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("error")  # e.g. an InstanceNorm whose num_features did not follow
            torch.testing.assert_close(slim(x), model(x))
    if case == "bare_norms":
        assert slim.inorm.num_features == len(keep[0]) and slim.bn.num_features == len(keep[1])
    fresh = replay_(build(), rec)
    fresh.load_state_dict(slim.state_dict())
    assert [(n, tuple(p.shape)) for n, p in fresh.named_parameters()] == [
        (n, tuple(p.shape)) for n, p in slim.named_parameters()
    ]
    assert [m.num_features for m in fresh.modules() if isinstance(m, nn.modules.batchnorm._NormBase)] == [
        m.num_features for m in slim.modules() if isinstance(m, nn.modules.batchnorm._NormBase)
    ]
