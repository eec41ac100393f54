"""chase_ext._loader: a library built for another torch never reaches the dynamic loader.

Each case lays out a package folder (the library, its build record, the sources) in a
temporary directory and asks ``locate`` which library to load. The compile step is
injected where a case needs it; the real on-import build runs in CI (.ci/run, in a torch
that differs from the one the wheel was built for).
"""
import json
import os
import shutil

import pytest
import torch

from chase_ext import _build, _loader

_ops = pytest.importorskip("chase_ext._ops", reason="chase_ext._C is not built")
LIB = _ops._C.__file__


def _package(tmp_path, record: dict | None, sources: bool = True):
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    shutil.copy(LIB, pkg / os.path.basename(LIB))
    if record is not None:
        (pkg / _build.RECORD_NAME).write_text(json.dumps(record))
    if sources:
        src = _build.source_root(os.path.dirname(_loader.__file__))
        shutil.copytree(src, pkg / "_csrc")
    return pkg


def _record(**over):
    return dict(_build.torch_identity(), chase_ext=_build.VERSION, with_cuda=False, cuda_archs=None, **over)


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("CHASE_EXT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("CHASE_EXT_CUDA", "0")


def test_matching_record_is_used(tmp_path):
    pkg = _package(tmp_path, _record())
    assert _loader.locate(str(pkg), policy="0") == str(pkg / os.path.basename(LIB))


@pytest.mark.parametrize("field,value", [("torch", "1.0.0+cu999"), ("torch_cuda", "99.9"), ("python", "cpython-39")])
def test_other_torch_is_refused_with_the_cause_and_the_fix(tmp_path, field, value):
    pkg = _package(tmp_path, _record(**{field: value}))
    with pytest.raises(ImportError) as e:
        _loader.locate(str(pkg), policy="0")
    msg = str(e.value)
    assert "compiled for another torch" in msg
    assert value in msg and torch.__version__ in msg  # built for / running
    assert "python -m chase_ext._loader" in msg and "--no-build-isolation" in msg
    assert "backend='reference'" in msg


def test_other_torch_is_compiled_once_into_the_cache(tmp_path, capfd):
    pkg = _package(tmp_path, _record(torch="1.0.0"))
    calls = []

    def fake_build(package_dir):  # what build_for_running_torch leaves behind
        calls.append(package_dir)
        _, _, folder, _ = _loader._plan(package_dir)
        os.makedirs(folder, exist_ok=True)
        lib = os.path.join(folder, "_C.so")
        shutil.copy(LIB, lib)
        _build.write_record(lib, False, None)
        return lib

    first = _loader.locate(str(pkg), policy="auto", build=fake_build)
    assert calls == [str(pkg)] and first.startswith(str(tmp_path / "cache"))
    err = capfd.readouterr().err
    assert "compiling them for torch" in err and torch.__version__ in err and "compiled in" in err
    # the second import finds it in the cache: no compile, no message
    assert _loader.locate(str(pkg), policy="auto", build=fake_build) == first
    assert len(calls) == 1 and capfd.readouterr().err == ""


def test_changed_sources_get_their_own_cache_entry(tmp_path):
    pkg = _package(tmp_path, _record(torch="1.0.0"))
    _, _, before, _ = _loader._plan(str(pkg))
    with open(pkg / "_csrc" / "ops.cpp", "a") as f:
        f.write("\n// edited\n")
    _, _, after, _ = _loader._plan(str(pkg))
    assert before != after


def test_a_failed_compile_says_why_and_how_to_fix(tmp_path):
    pkg = _package(tmp_path, _record(torch="1.0.0"))

    def broken(package_dir):
        raise RuntimeError("no compiler")

    with pytest.raises(ImportError, match="compiling it failed: no compiler.*python -m chase_ext._loader"):
        _loader.locate(str(pkg), policy="auto", build=broken)


def test_build_on_import_off_or_no_sources_refuses(tmp_path):
    pkg = _package(tmp_path, _record(torch="1.0.0"), sources=False)
    with pytest.raises(ImportError, match="compiled for another torch"):
        _loader.locate(str(pkg), policy="auto", build=lambda d: pytest.fail("must not compile"))


def test_nothing_built_is_not_compiled_unless_asked(tmp_path):
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    with pytest.raises(ImportError, match="it was not built"):
        _loader.locate(str(pkg), policy="auto", build=lambda d: pytest.fail("must not compile"))


def test_installed_package_records_its_torch():
    rec = _loader._read_record(os.path.dirname(LIB))
    if rec is None:
        pytest.skip("this _C was built without a record (an older in-place build)")
    assert _loader._matches(rec, _build.torch_identity())
    assert rec["with_cuda"] == _ops.build_info()["has_cuda"]
