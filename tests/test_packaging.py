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
               "tests/conftest.py", "tests/models.py"}
    assert wanted - names == set()
