"""When the build compiles CUDA kernels (``chase_ext._build.want_cuda``).

torch compiles an extension only with a CUDA toolkit of its own CUDA major version; a
CUDA 12 torch beside a CUDA 13 toolkit used to end ``pip install .`` in torch's
"detected CUDA version mismatches" error. Now the build picks an installed toolkit of the
right major version, builds CPU-only kernels when there is none (saying why, and keeping
the reason in the build record), and ``CHASE_EXT_CUDA=1`` turns the reason into an error.
Toolkits are laid out here as folders with a ``bin/nvcc`` that prints its release.
"""
import json
import os
import stat

import pytest
import torch

from chase_ext import _build


def _toolkit(root, version: str, version_json: bool = True):
    """A folder that looks like a CUDA toolkit of ``version`` ("12.8")."""
    (root / "bin").mkdir(parents=True)
    (root / "include").mkdir()
    (root / "include" / "cuda_runtime.h").write_text("")
    nvcc = root / "bin" / "nvcc"
    nvcc.write_text(f"#!/bin/sh\necho 'Cuda compilation tools, release {version}, V{version}.1'\n")
    nvcc.chmod(nvcc.stat().st_mode | stat.S_IEXEC)
    if version_json:
        (root / "version.json").write_text(json.dumps({"cuda": {"name": "CUDA SDK", "version": f"{version}.1"}}))
    return str(root)


@pytest.fixture
def env(tmp_path, monkeypatch):
    """No CUDA_HOME / CUDA_PATH, toolkits looked up under tmp_path, no nvcc on PATH."""
    for var in ("CUDA_HOME", "CUDA_PATH", "CHASE_EXT_CUDA"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(_build, "TOOLKIT_GLOB", str(tmp_path / "cuda-*"))
    monkeypatch.setattr(_build.shutil, "which", lambda name: None)
    return monkeypatch


def test_toolkit_version_from_version_json_or_nvcc(tmp_path):
    assert _build.toolkit_version(_toolkit(tmp_path / "a", "12.8")) == "12.8"
    assert _build.toolkit_version(_toolkit(tmp_path / "b", "13.0", version_json=False)) == "13.0"
    assert _build.toolkit_version(str(tmp_path / "nothing")) is None


def test_the_toolkit_of_torchs_major_version_is_preferred(tmp_path, env):
    old = _toolkit(tmp_path / "cuda-12.8", "12.8")
    new = _toolkit(tmp_path / "cuda-13.0", "13.0")
    _toolkit(tmp_path / "cuda-12.10", "12.10")
    assert _build.find_cuda_home("13.0") == new
    assert _build.find_cuda_home("12.1") == str(tmp_path / "cuda-12.10")  # newest 12.x (12.10 > 12.8)
    assert _build.find_cuda_home("11.8") == new  # none matches: the newest, refused below
    assert _build.find_cuda_home(None) == new
    env.setenv("CUDA_HOME", old)  # set by the user: taken as it is
    assert _build.find_cuda_home("13.0") == old


def test_mismatched_toolkit_builds_cpu_only_and_says_why(tmp_path, env):
    env.setattr(torch.version, "cuda", "12.1")
    _toolkit(tmp_path / "cuda-13.0", "13.0")
    ok, home, why = _build.want_cuda()
    assert not ok and home is None
    assert "13.0" in why and "12.1" in why and "CUDA_HOME" in why and "12.x" in why
    env.setenv("CHASE_EXT_CUDA", "1")
    with pytest.raises(RuntimeError, match=r"CHASE_EXT_CUDA=1 but CUDA kernels cannot be built: .*13\.0.*12\.1"):
        _build.want_cuda()


def test_matching_toolkit_builds_cuda(tmp_path, env):
    env.setattr(torch.version, "cuda", "12.1")
    _toolkit(tmp_path / "cuda-13.0", "13.0")
    home = _toolkit(tmp_path / "cuda-12.4", "12.4")  # minor versions may differ (torch warns)
    assert _build.want_cuda() == (True, home, None)


@pytest.mark.parametrize("case", ["cpu_torch", "no_toolkit", "off"])
def test_other_reasons_for_a_cpu_only_build(tmp_path, env, case):
    env.setattr(torch.version, "cuda", None if case == "cpu_torch" else "13.0")
    if case != "no_toolkit":
        _toolkit(tmp_path / "cuda-13.0", "13.0")
    if case == "off":
        env.setenv("CHASE_EXT_CUDA", "0")
    ok, home, why = _build.want_cuda()
    assert not ok and home is None
    assert {"cpu_torch": "has no CUDA", "no_toolkit": "no CUDA toolkit", "off": "CHASE_EXT_CUDA=0"}[case] in why
    if case != "off":
        env.setenv("CHASE_EXT_CUDA", "1")
        with pytest.raises(RuntimeError, match="CHASE_EXT_CUDA=1 but CUDA kernels cannot be built"):
            _build.want_cuda()


def test_the_reason_is_recorded_beside_the_library(tmp_path):
    lib = tmp_path / "_C.so"
    rec = json.loads(open(_build.write_record(str(lib), False, None, "no CUDA toolkit (nvcc) was found")).read())
    assert rec["cuda_skipped"] == "no CUDA toolkit (nvcc) was found" and rec["with_cuda"] is False
    rec = json.loads(open(_build.write_record(str(lib), True, "9.0", None)).read())
    assert "cuda_skipped" not in rec


def test_a_cuda_model_on_a_cpu_only_build_names_the_reason():
    from chase_ext.masking import MaskingMixin

    class FakeOps:
        @staticmethod
        def build_info():
            return {"has_cuda": False, "cuda_skipped": "the CUDA toolkit at /x is 13.0 and ..."}

    class Weight:
        device = torch.device("cuda")

    chase = MaskingMixin.__new__(MaskingMixin)
    chase.backend, chase.ops, chase._params = "native", FakeOps, [Weight()]
    with pytest.raises(RuntimeError, match=r"built without CUDA kernels; the build said why: the CUDA toolkit "
                                           r"at /x is 13\.0 and \.\.\.; fix that and reinstall"):
        chase._check_devices()


def test_a_toolkit_whose_version_cannot_be_read_is_not_used(tmp_path, env):
    """No version.json and an nvcc that fails: torch's own check would fail the build."""
    env.setattr(torch.version, "cuda", "12.4")
    root = tmp_path / "cuda-12.4"
    _toolkit(root, "12.4", version_json=False)
    (root / "bin" / "nvcc").write_text("#!/bin/sh\nexit 1\n")
    assert _build.toolkit_version(str(root)) is None
    ok, home, why = _build.want_cuda()
    assert not ok and home is None and "cannot be read" in why and "12.x" in why
    env.setenv("CHASE_EXT_CUDA", "1")
    with pytest.raises(RuntimeError, match="cannot be read"):
        _build.want_cuda()


def test_the_toolkit_of_the_nvcc_on_path_is_a_candidate(tmp_path, env):
    env.setattr(torch.version, "cuda", "12.4")
    _toolkit(tmp_path / "cuda-13.0", "13.0")
    conda = _toolkit(tmp_path / "conda" / "env", "12.4")  # not under the toolkit folder
    env.setattr(_build.shutil, "which", lambda name: os.path.join(conda, "bin", "nvcc"))
    assert _build.want_cuda() == (True, os.path.realpath(conda), None)
    wrapper = tmp_path / "wrapper" / "bin"  # an nvcc without a toolkit beside it is skipped
    wrapper.mkdir(parents=True)
    (wrapper / "nvcc").write_text("#!/bin/sh\n")
    env.setattr(_build.shutil, "which", lambda name: str(wrapper / "nvcc"))
    assert _build.find_cuda_home("12.4") == os.path.realpath(tmp_path / "cuda-13.0")


def test_folder_names_order_by_their_version_numbers():
    names = ["cuda-12.9", "cuda-rc", "cuda-12.10", "cuda-13.0-beta", "cuda-11", "cuda-12.4.1"]
    assert sorted(names, key=_build._version_key) == ["cuda-rc", "cuda-11", "cuda-12.4.1", "cuda-12.9",
                                                      "cuda-12.10", "cuda-13.0-beta"]
