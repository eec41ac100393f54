"""Build chase_ext._C against the installed torch.

CPU kernels are always built. CUDA kernels are built when torch has CUDA and nvcc is
found (a GPU is not needed). Overrides: CHASE_EXT_CUDA=0 forces a CPU-only build,
CHASE_EXT_CUDA=1 makes a missing toolkit an error.
"""
import glob
import os
import shutil

from setuptools import setup

import torch
from torch.utils.cpp_extension import BuildExtension, CppExtension

VERSION = "0.1.0"
ROOT = os.path.dirname(os.path.abspath(__file__))


def _find_cuda_home():
    # The nvcc first on PATH may be a wrapper script; resolve to the real toolkit root.
    for cand in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")):
        if cand and os.path.exists(os.path.join(cand, "bin", "nvcc")):
            return cand
    roots = sorted(glob.glob("/usr/local/cuda-*"), reverse=True) + ["/usr/local/cuda"]
    for cand in roots:
        if os.path.exists(os.path.join(cand, "bin", "nvcc")) and os.path.exists(
            os.path.join(cand, "include", "cuda_runtime.h")
        ):
            return os.path.realpath(cand)
    nvcc = shutil.which("nvcc")
    return os.path.dirname(os.path.dirname(os.path.realpath(nvcc))) if nvcc else None


def _want_cuda():
    flag = os.environ.get("CHASE_EXT_CUDA", "auto").lower()
    if flag in ("0", "off", "false", "no"):
        return False, None
    cuda_home = _find_cuda_home()
    ok = torch.version.cuda is not None and cuda_home is not None
    if flag in ("1", "on", "true", "yes") and not ok:
        raise RuntimeError(
            "CHASE_EXT_CUDA=1 but CUDA kernels cannot be built: "
            f"torch.version.cuda={torch.version.cuda!r}, CUDA toolkit={cuda_home!r}"
        )
    return ok, cuda_home


def extensions():
    with_cuda, cuda_home = _want_cuda()
    sources = ["csrc/ops.cpp"] + sorted(glob.glob("csrc/cpu/*.cpp"))
    cxx = ["-O3", "-fopenmp", f'-DCHASE_EXT_VERSION="{VERSION}"']
    macros = []
    ext_cls = CppExtension
    extra_link = ["-fopenmp"]
    nvcc_flags = []
    if with_cuda:
        os.environ["CUDA_HOME"] = cuda_home
        import torch.utils.cpp_extension as cpp_ext

        cpp_ext.CUDA_HOME = cuda_home  # torch resolved it at import time, maybe wrongly
        if not torch.cuda.is_available() and not os.environ.get("TORCH_CUDA_ARCH_LIST"):
            # sm_80 and sm_90 machine code, plus PTX that newer GPUs (sm_100, sm_120) JIT-compile
            os.environ["TORCH_CUDA_ARCH_LIST"] = "8.0;9.0+PTX"
        archs = os.environ.get("TORCH_CUDA_ARCH_LIST", "native")
        sources += sorted(glob.glob("csrc/cuda/*.cu"))
        macros += [("WITH_CUDA", None)]
        cxx += [f'-DCUDA_VERSION_STR="{torch.version.cuda}"', f'-DCHASE_EXT_CUDA_ARCHS="{archs}"']
        nvcc_flags = ["-O3", "--expt-relaxed-constexpr", "--expt-extended-lambda",
                      f'-DCHASE_EXT_VERSION="{VERSION}"']
        ext_cls = cpp_ext.CUDAExtension
    kwargs = dict(
        name="chase_ext._C",
        sources=sources,
        include_dirs=[os.path.join(ROOT, "csrc")],
        define_macros=macros,
        extra_compile_args={"cxx": cxx, "nvcc": nvcc_flags} if with_cuda else {"cxx": cxx},
        extra_link_args=extra_link,
    )
    print(f"chase_ext: building {'CPU+CUDA' if with_cuda else 'CPU-only'} kernels")
    return [ext_cls(**kwargs)]


setup(
    version=VERSION,
    ext_modules=extensions(),
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
