"""chase_ext.cpu_memory: freed blocks stay in the process (glibc). The setting is process-wide
and not undone, so whatever calls it successfully runs in a child process."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from chase_ext import cpu_memory

needs_glibc = pytest.mark.skipif(cpu_memory._glibc() is None, reason="the C library here is not glibc")

# Minor page faults of a forward pass whose activations (64 MiB each) are above glibc's largest
# dynamic mmap threshold (32 MiB): by default each one is a fresh mapping, 16,384 4 KiB pages
# faulted in per activation on every call. Printed before and after retain_cpu_memory().
_FAULTS = textwrap.dedent("""
    import json, resource, torch
    from chase_ext import cpu_memory

    torch.set_num_threads(1)
    net = torch.nn.Sequential(*[m for _ in range(4) for m in (torch.nn.Conv2d(64, 64, 1), torch.nn.ReLU())]).eval()
    x = torch.randn(4, 64, 256, 256)

    def faults():
        n = []
        with torch.inference_mode():
            for _ in range(4):
                before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
                net(x)
                n.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
        return min(n[2:])  # after warm-up

    out = {"before": faults(), "state_before": cpu_memory.cpu_memory_retained()}
    out["set"] = cpu_memory.retain_cpu_memory()
    out["after"] = faults()
    out["state_after"] = cpu_memory.cpu_memory_retained()
    print(json.dumps(out))
""")


def _child(code: str) -> str:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    return r.stdout.strip().splitlines()[-1]


@needs_glibc
def test_freed_activations_are_reused_not_faulted_again():
    import json

    out = json.loads(_child(_FAULTS))
    assert out["state_before"] is None
    assert out["set"] == out["state_after"]
    assert out["set"]["mmap_threshold"] == 2**31 - 1 and out["set"]["trim_threshold"] == 2**31 - 1
    assert out["set"]["glibc"]
    pages = 8 * 64 * 2**20 // 4096  # 8 activations per forward
    if out["before"] < pages // 2:
        pytest.skip(f"transparent huge pages back fresh mappings here ({out['before']} faults per forward)")
    # retained: the activations come back from the heap, already mapped
    assert out["after"] <= out["before"] // 100, out

@pytest.mark.parametrize("bad", [0, -1, 128 * 1024 - 1, 2**31, 1.5e6, "64M", True, None])
def test_bad_bound_is_refused_before_anything_is_set(bad):
    with pytest.raises(ValueError, match="max_block_bytes"):
        cpu_memory.retain_cpu_memory(bad)
    assert cpu_memory.cpu_memory_retained() is None


def test_without_glibc_the_error_says_so(monkeypatch):
    monkeypatch.setattr(cpu_memory, "_glibc", lambda: None)
    with pytest.raises(RuntimeError, match="needs glibc's mallopt.*jemalloc or tcmalloc"):
        cpu_memory.retain_cpu_memory()
    assert cpu_memory.cpu_memory_retained() is None


@needs_glibc
def test_a_refused_setting_is_reported(monkeypatch):
    class Refusing:
        glibc_version = "2.x"

        @staticmethod
        def mallopt(param, value):
            return 0

    monkeypatch.setattr(cpu_memory, "_glibc", lambda: Refusing)
    with pytest.raises(RuntimeError, match=r"glibc 2.x refused mallopt\(M_TRIM_THRESHOLD"):
        cpu_memory.retain_cpu_memory()
    assert cpu_memory.cpu_memory_retained() is None


def test_numpy_integers_are_taken(monkeypatch):
    np = pytest.importorskip("numpy")
    calls = []

    class Recording:
        glibc_version = "2.x"

        @staticmethod
        def mallopt(param, value):
            calls.append((param, value))
            return 1

    monkeypatch.setattr(cpu_memory, "_glibc", lambda: Recording)
    monkeypatch.setattr(cpu_memory, "_retained", None)
    got = cpu_memory.retain_cpu_memory(np.int64(1 << 20))
    assert got["mmap_threshold"] == 1 << 20 and type(got["mmap_threshold"]) is int
    assert all(type(v) is int for _, v in calls)
