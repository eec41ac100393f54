"""Loads ``chase_ext._C`` only if it was built for the torch that is running.

A compiled extension is tied to the exact torch build it was compiled against. Loaded
under another torch it fails in the dynamic loader with a message that names a library
(``libc10_cuda.so: cannot open shared object file``), not the cause, or loads and
misbehaves. So before anything is loaded, the record written at build time
(``_C.build.json``, see ``chase_ext._build``) is compared with the running torch:

1. the library installed with the package, if its record matches (or it has no record
   and loads);
2. else a library compiled earlier for this torch in the cache
   (``$CHASE_EXT_CACHE``, default ``~/.cache/chase_ext``), keyed by torch build, Python
   ABI, sources and flags;
3. else, when the installed one was built for another torch (or does not load) and the
   sources are here, it is compiled now for the running torch into that cache, once,
   with one line on stderr saying why and how long it takes; ``CHASE_EXT_BUILD_ON_IMPORT=0``
   turns this off (and ``=1`` also builds when no library was installed at all);
4. else ``ImportError`` naming the torch the library was built for, the running torch
   and the commands that fix it. ``backend="reference"`` works meanwhile.

``python -m chase_ext._loader`` (also the ``chase-ext-build`` command) compiles for the
running torch into the cache ahead of time and prints what it did.
"""
from __future__ import annotations

import glob
import importlib.util
import json
import os
import shlex
import sys
import sysconfig
import time

from . import _build

PKG_DIR = os.path.dirname(os.path.abspath(__file__))
_MODULE = "chase_ext._C"
# measured on the project's 2-core CPU machines: CPU-only build 2-4 min, CPU+CUDA ~6 min
_BUILD_TIME_HINT = {False: "2-4 minutes on 2 cores", True: "about 6 minutes on 2 cores with CUDA"}


def _read_record(folder: str) -> dict | None:
    try:
        with open(os.path.join(folder, _build.RECORD_NAME)) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _library_in(folder: str) -> str | None:
    suffix = sysconfig.get_config_var("EXT_SUFFIX") or ".so"
    exact = os.path.join(folder, "_C" + suffix)
    if os.path.exists(exact):
        return exact
    found = sorted(glob.glob(os.path.join(folder, "_C.so")) + glob.glob(os.path.join(folder, "_C.*.so")))
    return found[0] if found else None


def _matches(rec: dict | None, ident: dict) -> bool:
    return rec is not None and all(rec.get(k) == ident[k] for k in ("torch", "torch_cuda", "python"))


def _import_from(path: str):
    spec = importlib.util.spec_from_file_location(_MODULE, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    sys.modules[_MODULE] = mod
    setattr(sys.modules[__package__], "_C", mod)  # as `from . import _C` would
    return mod


def _cache_root() -> str:
    root = os.environ.get("CHASE_EXT_CACHE")
    if not root:
        base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        root = os.path.join(base, "chase_ext")
    return root


def _plan(package_dir: str = PKG_DIR) -> tuple[str | None, str | None, str, str | None]:
    """(source folder, CUDA toolkit root or None for CPU-only, cache folder, why no CUDA)
    of an on-import build for the running torch."""
    csrc = _build.source_root(package_dir)
    with_cuda, cuda_home, why_not = _build.want_cuda()
    ident = _build.torch_identity()
    tag = f"{ident['torch']}-{'cu' + ident['torch_cuda'] if with_cuda else 'cpu'}-{ident['python']}"
    archs = os.environ.get("TORCH_CUDA_ARCH_LIST", "") if with_cuda else ""
    digest = _build.sources_digest(_build.sources(csrc, with_cuda), f"{tag}|{archs}") if csrc else "nosrc"
    return csrc, cuda_home, os.path.join(_cache_root(), f"{tag}-{digest}".replace("+", "_")), why_not


def build_for_running_torch(package_dir: str = PKG_DIR, verbose: bool = False) -> str:
    """Compiles ``_C`` for the running torch into the cache (a no-op if it is there) and
    returns the library's path. Safe to run from several processes at once (torch's build
    lock)."""
    from torch.utils import cpp_extension

    csrc, cuda_home, folder, why_not = _plan(package_dir)
    with_cuda = cuda_home is not None
    if csrc is None:
        raise ImportError(
            "chase_ext: cannot compile chase_ext._C here: its C++ sources are not installed "
            f"(looked in {package_dir}/_csrc and beside the package)"
        )
    lib = _library_in(folder)
    if lib and _matches(_read_record(folder), _build.torch_identity()):
        return lib
    os.makedirs(folder, exist_ok=True)
    fl = _build.flags(cuda_home)
    # load() writes flags into build.ninja as they are, for a shell to split: quote them
    # (setup.py's BuildExtension quotes by itself), or -DX="0.1.0" loses its quotes
    q = lambda xs: [shlex.quote(x) for x in xs]  # noqa: E731
    cpp_extension.load(
        name="_C",
        sources=_build.sources(csrc, with_cuda),
        extra_cflags=q(fl["cxx"]),
        extra_cuda_cflags=q(fl["nvcc"]) or None,
        extra_ldflags=q(fl["ldflags"]),
        extra_include_paths=[csrc],
        build_directory=folder,
        with_cuda=with_cuda,
        is_python_module=True,
        verbose=verbose,
    )
    lib = _library_in(folder)
    if lib is None:  # torch names it <name>.so in the build folder
        raise ImportError(f"chase_ext: the on-import build left no library in {folder}")
    _build.write_record(lib, with_cuda, fl["archs"], why_not)
    return lib


def _mismatch_message(rec: dict | None, ident: dict, why: str) -> str:
    built = "an unknown torch" if rec is None else f"torch {rec.get('torch')} (CUDA {rec.get('torch_cuda')}, {rec.get('python')})"
    return (
        f"chase_ext._C cannot be used: {why}. It was built for {built}; the running torch is "
        f"{ident['torch']} (CUDA {ident['torch_cuda']}, {ident['python']}). Fix: compile it for the "
        "running torch with `python -m chase_ext._loader` (cached, once), or reinstall against it "
        "with `pip install --no-build-isolation --force-reinstall --no-deps <chase_ext source>`. "
        "Meanwhile ChaseOptimizer(..., backend='reference') runs without it."
    )


def locate(package_dir: str = PKG_DIR, policy: str | None = None, build=None) -> str:
    """Path of the ``_C`` library to load for the running torch (steps 1-4 of the module
    docstring); compiles into the cache when that is the way (``build``: the compiler,
    injectable for tests). Loads nothing itself, except to try a record-less library."""
    ident = _build.torch_identity()
    if policy is None:
        policy = os.environ.get("CHASE_EXT_BUILD_ON_IMPORT", "auto")
    policy = policy.strip().lower()
    installed = _library_in(package_dir)
    rec = _read_record(package_dir) if installed else None
    if installed and _matches(rec, ident):
        return installed
    if installed and rec is None:
        return installed  # built before records existed (or by CMake): try it, see load_extension
    why = "it was compiled for another torch" if installed else "it was not built"
    try:
        csrc, cuda_home, folder, _ = _plan(package_dir)
        with_cuda = cuda_home is not None
    except Exception as e:  # e.g. CHASE_EXT_CUDA=1 without a toolkit
        raise ImportError(_mismatch_message(rec, ident, f"{why}, and no build is possible here: {e}")) from e
    cached = _library_in(folder)
    if cached and _matches(_read_record(folder), ident):
        return cached
    build_ok = policy in ("1", "on", "true", "yes") or (policy == "auto" and installed is not None)
    if csrc is None or not build_ok:
        raise ImportError(_mismatch_message(rec, ident, why))
    print(f"chase_ext: the compiled kernels cannot be used ({why}); compiling them for torch "
          f"{ident['torch']} into {folder} ({_BUILD_TIME_HINT[with_cuda]}, once; "
          "CHASE_EXT_BUILD_ON_IMPORT=0 turns this off)", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    try:
        lib = (build or build_for_running_torch)(package_dir)
    except Exception as e:  # a compiler log can run to pages: its end says what failed
        log = str(e) if len(str(e)) <= 2000 else "..." + str(e)[-2000:]
        raise ImportError(_mismatch_message(rec, ident, f"{why}, and compiling it failed: {log}")) from e
    print(f"chase_ext: compiled in {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
    return lib


def load_extension():
    """The ``chase_ext._C`` module for the running torch."""
    if _MODULE in sys.modules:
        return sys.modules[_MODULE]
    path = locate()
    try:
        return _import_from(path)
    except (ImportError, OSError) as e:  # a record-less library built for another torch
        if _read_record(os.path.dirname(path)) is not None:
            raise
        raise ImportError(_mismatch_message(None, _build.torch_identity(), f"it does not load ({e})")) from e


def main(argv: list[str] | None = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(
        prog="python -m chase_ext._loader",
        description="Compile chase_ext._C for the running torch into the cache "
                    "(the on-import build, ahead of time).")
    ap.add_argument("--verbose", action="store_true", help="show the compiler's output")
    args = ap.parse_args(argv)
    ident = _build.torch_identity()
    t0 = time.perf_counter()
    lib = build_for_running_torch(verbose=args.verbose)
    print(f"chase_ext._C for torch {ident['torch']} (CUDA {ident['torch_cuda']}): {lib} "
          f"({time.perf_counter() - t0:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
