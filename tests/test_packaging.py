"""The source distribution carries everything a build needs.

setuptools puts only the sources named in ``ext_modules`` into an sdist (and a CPU-only
build names no ``.cu`` file), so headers, CUDA files and CMakeLists.txt come from
MANIFEST.in; this checks that the sdist holds every file under ``csrc/``.
"""
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(not (ROOT / "setup.py").exists(), reason="needs the source tree")
def test_sdist_holds_every_source_file(tmp_path):
    env = dict(os.environ, CHASE_EXT_CUDA="0")  # the file list must not depend on the build
    subprocess.run(
        [sys.executable, "setup.py", "-q", "egg_info", "--egg-base", str(tmp_path),
         "sdist", "-d", str(tmp_path)],
        cwd=ROOT, env=env, check=True, capture_output=True,
    )
    (archive,) = tmp_path.glob("*.tar.gz")
    with tarfile.open(archive) as tar:
        names = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}
    wanted = {p.relative_to(ROOT).as_posix() for p in (ROOT / "csrc").rglob("*") if p.is_file()}
    wanted |= {"CMakeLists.txt", "setup.py", "pyproject.toml", "README.md",
               "build_backend/chase_ext_backend.py", "tests/conftest.py", "tests/models.py"}
    assert wanted - names == set()


def _setup_py_without_torch(tmp_path, *args):
    """Runs setup.py in a process where torch cannot be imported (as in an isolated build
    before the target environment's torch is put on the path)."""
    code = (
        "import sys, runpy; sys.modules['torch'] = None; "
        f"sys.argv = ['setup.py', *{list(args)!r}]; runpy.run_path('setup.py', run_name='__main__')"
    )
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                          env=dict(os.environ, CHASE_EXT_CUDA="0"))


@pytest.mark.skipif(not (ROOT / "setup.py").exists(), reason="needs the source tree")
def test_metadata_needs_no_torch_but_compiling_says_to_install_it(tmp_path):
    meta = _setup_py_without_torch(tmp_path, "-q", "egg_info", "--egg-base", str(tmp_path))
    assert meta.returncode == 0, meta.stderr
    build = _setup_py_without_torch(tmp_path, "build_ext", "--build-temp", str(tmp_path / "t"),
                                    "--build-lib", str(tmp_path / "l"))
    assert build.returncode != 0
    assert "needs torch importable at build time; install torch first" in build.stderr


def test_backend_finds_the_target_environments_torch():
    """The build backend's view from an isolated build: torch hidden from sys.path but
    present in the environment's site-packages is found there, with its version."""
    import importlib.util

    import torch

    if not (ROOT / "build_backend").exists():
        pytest.skip("needs the source tree")
    spec = importlib.util.spec_from_file_location("_backend", ROOT / "build_backend" / "chase_ext_backend.py")
    backend = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(backend)
    site_dir = os.path.dirname(os.path.dirname(torch.__file__))
    assert backend._torch_version_in(site_dir) == torch.__version__
    assert site_dir in backend._target_site_dirs() or not site_dir.startswith(sys.prefix)
    # torch importable in the build: nothing is added and nothing is asked for
    assert backend._target_torch() is None and backend._torch_requirement() == []
