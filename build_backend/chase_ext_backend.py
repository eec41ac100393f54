"""The build backend of chase_ext: setuptools, compiling against the user's torch.

``chase_ext._C`` works only with the exact torch build it was compiled against. pip builds
a package in an isolated environment holding only the build requirements, so a plain
``pip install .`` with ``torch`` among them compiled against a freshly downloaded torch
(measured: a 2.5 GB CUDA build, 332 s) and then failed to load beside the torch the user
had (``libc10_cuda.so: cannot open shared object file``).

So torch is not a static build requirement. pip runs this backend with the interpreter of
the environment being installed into, hiding that environment's site-packages; when torch
is installed there, its folder is put back at the end of ``sys.path`` for the build (the
build requirements still come first), and the kernels are compiled against the torch the
user will run. Only when that environment has no torch does the build ask for one
(``torch``, whatever the registry serves); ``chase_ext._loader`` then still refuses, with a
clear message, or recompiles a library whose torch differs from the running one.

Everything else is ``setuptools.build_meta``.
"""
from __future__ import annotations

import importlib.util
import os
import re
import site
import sys
import sysconfig

from setuptools import build_meta as _setuptools
from setuptools.build_meta import *  # noqa: F401,F403  (sdist, metadata hooks unchanged)


def _target_site_dirs() -> list[str]:
    """Site-packages folders of the environment this interpreter belongs to."""
    dirs = [sysconfig.get_paths().get(k) for k in ("purelib", "platlib")]
    try:
        dirs += site.getsitepackages()
    except AttributeError:  # some embedded interpreters
        pass
    if site.ENABLE_USER_SITE is not False:
        dirs.append(site.getusersitepackages())
    seen, out = set(), []
    for d in dirs:
        if d and d not in seen and os.path.isdir(d):
            seen.add(d)
            out.append(d)
    return out


def _torch_version_in(folder: str) -> str | None:
    try:
        with open(os.path.join(folder, "torch", "version.py")) as f:
            m = re.search(r"^__version__\s*=\s*['\"]([^'\"]+)['\"]", f.read(), re.M)
        return m.group(1) if m else None
    except OSError:
        return None


def _target_torch() -> tuple[str, str] | None:
    """(folder, version) of the torch in the environment being installed into, when the
    build itself cannot import one (an isolated build)."""
    if importlib.util.find_spec("torch") is not None:
        return None  # --no-build-isolation, or torch among the build requirements
    for d in _target_site_dirs():
        v = _torch_version_in(d)
        if v:
            return d, v
    return None


def _torch_requirement() -> list[str]:
    if importlib.util.find_spec("torch") is not None or _target_torch() is not None:
        return []
    print("chase_ext: no torch in the target environment; building against the registry's torch "
          "(install torch first to build against yours)", file=sys.stderr)
    return ["torch"]


def _expose_target_torch() -> None:
    found = _target_torch()
    if found is None:
        return
    folder, version = found
    if folder not in sys.path:
        sys.path.append(folder)  # after the build requirements: they win for everything else
    print(f"chase_ext: compiling against torch {version} from {folder}", file=sys.stderr)


def get_requires_for_build_wheel(config_settings=None):
    return _setuptools.get_requires_for_build_wheel(config_settings) + _torch_requirement()


def get_requires_for_build_editable(config_settings=None):
    return _setuptools.get_requires_for_build_editable(config_settings) + _torch_requirement()


def build_wheel(wheel_directory, config_settings=None, metadata_directory=None):
    _expose_target_torch()
    return _setuptools.build_wheel(wheel_directory, config_settings, metadata_directory)


def build_editable(wheel_directory, config_settings=None, metadata_directory=None):
    _expose_target_torch()
    return _setuptools.build_editable(wheel_directory, config_settings, metadata_directory)
