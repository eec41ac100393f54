"""How ``chase_ext._C`` is compiled: one recipe for ``setup.py`` and the on-import build.

Both compile the same sources with the same flags against the torch that is importable
at that moment, and both write a record of that torch next to the library
(``_C.build.json``), which ``chase_ext._loader`` compares with the running torch before it
loads anything: a library built for another torch fails in the dynamic loader
(``libc10_cuda.so: cannot open shared object file``) or, worse, loads and misbehaves.

This file imports nothing from the package (``setup.py`` loads it by path, before the
package is importable) and imports torch only inside functions.
"""
from __future__ import annotations

import glob
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys

VERSION = "0.1.0"
RECORD_NAME = "_C.build.json"
# CUDA archs when no GPU is visible: sm_80 and sm_90 machine code, plus PTX that newer
# GPUs (sm_100, sm_120) JIT-compile.
DEFAULT_ARCHS = "8.0;9.0+PTX"
# where toolkits are installed side by side (cuda-12.8, cuda-13.0, ...)
TOOLKIT_GLOB = "/usr/local/cuda-*"


def _env_flag(name: str) -> str:
    return os.environ.get(name, "auto").strip().lower()


def toolkit_version(cuda_home: str) -> str | None:
    """The toolkit's ``"major.minor"``: from its ``version.json`` (CUDA 11.1 and later),
    else from ``nvcc --version``; None when neither tells."""
    try:
        with open(os.path.join(cuda_home, "version.json")) as f:
            return ".".join(json.load(f)["cuda"]["version"].split(".")[:2])
    except (OSError, KeyError, TypeError, ValueError, AttributeError):
        pass
    try:
        run = subprocess.run([os.path.join(cuda_home, "bin", "nvcc"), "--version"],
                             capture_output=True, text=True, errors="replace", timeout=60)
    except (OSError, subprocess.SubprocessError):
        return None
    m = re.search(r"release (\d+\.\d+)", run.stdout) if run.returncode == 0 else None
    return m.group(1) if m else None


def _major(version: str | None) -> str | None:
    return version.split(".")[0] if version else None


def _is_toolkit(root: str) -> bool:
    return os.path.exists(os.path.join(root, "bin", "nvcc")) and os.path.exists(
        os.path.join(root, "include", "cuda_runtime.h"))


def find_cuda_home(torch_cuda: str | None = None) -> str | None:
    """The CUDA toolkit root: ``CUDA_HOME`` / ``CUDA_PATH`` when set, else among the
    installed toolkits (``/usr/local/cuda-*`` newest first, ``/usr/local/cuda``, the one of
    the ``nvcc`` on PATH) the first of ``torch_cuda``'s major version, else the first.
    The ``nvcc`` first on PATH may be a wrapper script (it is on the project's CPU
    machines), so a candidate must have a toolkit's layout (``bin/nvcc`` and
    ``include/cuda_runtime.h``)."""
    for cand in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")):
        if cand and os.path.exists(os.path.join(cand, "bin", "nvcc")):
            return cand
    nvcc = shutil.which("nvcc")
    on_path = os.path.dirname(os.path.dirname(os.path.realpath(nvcc))) if nvcc else None
    roots = sorted(glob.glob(TOOLKIT_GLOB), key=_version_key, reverse=True)
    roots += [os.path.join(os.path.dirname(TOOLKIT_GLOB), "cuda")] + ([on_path] if on_path else [])
    found = []
    for cand in roots:
        real = os.path.realpath(cand)
        if _is_toolkit(cand) and real not in found:
            found.append(real)
    matching = [c for c in found if torch_cuda and _major(toolkit_version(c)) == _major(torch_cuda)]
    if matching or found:
        return (matching or found)[0]
    return on_path


def _version_key(path: str) -> tuple:
    """The version numbers of a ``cuda-12.10`` folder name ((12, 10): after 12.9); names
    without one sort first."""
    m = re.match(r"cuda-(\d+(?:\.\d+)*)", os.path.basename(path))
    return tuple(int(x) for x in m.group(1).split(".")) if m else (-1,)


def want_cuda() -> tuple[bool, str | None, str | None]:
    """(build CUDA kernels?, toolkit root, why not). Yes when the torch compiled against
    has CUDA and a toolkit of the same major version is found -- a GPU is not needed
    (torch refuses to compile against a toolkit of another major version, and fails on
    one whose version it cannot read).
    ``CHASE_EXT_CUDA=0`` forces a CPU-only build, ``CHASE_EXT_CUDA=1`` makes any reason
    not to build them an error."""
    import torch

    flag = _env_flag("CHASE_EXT_CUDA")
    if flag in ("0", "off", "false", "no"):
        return False, None, "CHASE_EXT_CUDA=0"
    torch_cuda = torch.version.cuda
    cuda_home = find_cuda_home(torch_cuda)
    why = None
    if torch_cuda is None:
        why = f"this torch ({torch.__version__}) has no CUDA"
    elif cuda_home is None:
        why = "no CUDA toolkit (nvcc) was found: set CUDA_HOME to one"
    else:
        tv = toolkit_version(cuda_home)
        if tv is None:
            why = (f"the CUDA version of the toolkit at {cuda_home} cannot be read (no version.json, "
                   f"and `nvcc --version` failed): set CUDA_HOME to a CUDA {_major(torch_cuda)}.x toolkit")
        elif _major(tv) != _major(torch_cuda):
            why = (f"the CUDA toolkit at {cuda_home} is {tv} and this torch was built with CUDA "
                   f"{torch_cuda}; torch compiles extensions only with a toolkit of the same major "
                   f"version: set CUDA_HOME to a CUDA {_major(torch_cuda)}.x toolkit")
    if flag in ("1", "on", "true", "yes") and why:
        raise RuntimeError(f"CHASE_EXT_CUDA=1 but CUDA kernels cannot be built: {why}")
    return why is None, (cuda_home if why is None else None), why


def source_root(package_dir: str) -> str | None:
    """Where the C++/CUDA sources are: ``csrc/`` beside the package in a source tree or an
    editable install, ``chase_ext/_csrc`` inside an installed wheel."""
    for cand in (os.path.join(package_dir, "_csrc"), os.path.join(os.path.dirname(package_dir), "csrc")):
        if os.path.exists(os.path.join(cand, "ops.cpp")):
            return cand
    return None


def sources(csrc: str, with_cuda: bool) -> list[str]:
    out = [os.path.join(csrc, "ops.cpp")] + sorted(glob.glob(os.path.join(csrc, "cpu", "*.cpp")))
    if with_cuda:
        out += sorted(glob.glob(os.path.join(csrc, "cuda", "*.cu")))
    return out


def flags(cuda_home: str | None) -> dict:
    """Compiler flags and macros; CUDA kernels with ``cuda_home`` (the toolkit root
    ``want_cuda`` chose), CPU-only without. With CUDA, also sets ``CUDA_HOME`` (for torch's
    build helpers, which resolved it at import, maybe wrongly) and a
    ``TORCH_CUDA_ARCH_LIST`` default when no GPU is visible (torch's default then breaks
    the build)."""
    import torch

    # -fno-math-errno (as torch's own build): std::sqrt then vectorises (masked_adam_);
    # -ffp-contract=off: each product rounds as written, fused multiply-adds only where the
    # code says std::fma (the fused optimizer steps reproduce torch's roundings bit for bit)
    cxx = ["-O3", "-fno-math-errno", "-ffp-contract=off", "-fopenmp", f'-DCHASE_EXT_VERSION="{VERSION}"']
    nvcc: list[str] = []
    archs = None
    if cuda_home is not None:
        os.environ["CUDA_HOME"] = cuda_home
        import torch.utils.cpp_extension as cpp_ext

        cpp_ext.CUDA_HOME = cuda_home
        if not torch.cuda.is_available() and not os.environ.get("TORCH_CUDA_ARCH_LIST"):
            os.environ["TORCH_CUDA_ARCH_LIST"] = DEFAULT_ARCHS
        archs = os.environ.get("TORCH_CUDA_ARCH_LIST", "native")
        cxx += ["-DWITH_CUDA", f'-DCUDA_VERSION_STR="{torch.version.cuda}"', f'-DCHASE_EXT_CUDA_ARCHS="{archs}"']
        nvcc = ["-O3", "--expt-relaxed-constexpr", "--expt-extended-lambda", "-DWITH_CUDA",
                f'-DCHASE_EXT_VERSION="{VERSION}"']
    return {"cxx": cxx, "nvcc": nvcc, "ldflags": ["-fopenmp"], "archs": archs}


def torch_identity() -> dict:
    """What a compiled ``_C`` depends on: the exact torch build and the Python ABI."""
    import torch

    return {
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "torch_git": getattr(torch.version, "git_version", None),
        "python": f"{sys.implementation.cache_tag}",
    }


def write_record(ext_path: str, with_cuda: bool, archs: str | None, cuda_skipped: str | None = None) -> str:
    """Writes ``_C.build.json`` beside the compiled library at ``ext_path``; without CUDA
    kernels it keeps why (``cuda_skipped``), for the error a CUDA model then meets."""
    rec = dict(torch_identity(), chase_ext=VERSION, with_cuda=with_cuda, cuda_archs=archs,
               library=os.path.basename(ext_path))
    if not with_cuda and cuda_skipped:
        rec["cuda_skipped"] = cuda_skipped
    path = os.path.join(os.path.dirname(ext_path), RECORD_NAME)
    with open(path, "w") as f:
        json.dump(rec, f, indent=1, sort_keys=True)
    return path


def sources_digest(paths: list[str], extra: str) -> str:
    """A short hash of the sources (headers included) and flags: the on-import build's
    cache key, so edited sources or flags never reuse an old library."""
    h = hashlib.sha256(extra.encode())
    root = os.path.commonpath(paths)
    for p in sorted(glob.glob(os.path.join(root, "**", "*"), recursive=True)):
        if os.path.isfile(p) and p.endswith((".cpp", ".cu", ".h", ".cuh")):
            h.update(os.path.relpath(p, root).encode())
            with open(p, "rb") as f:
                h.update(f.read())
    return h.hexdigest()[:12]
