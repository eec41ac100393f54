"""Build chase_ext._C against the torch the package will run with.

The recipe (sources, flags, when CUDA kernels are built) is ``chase_ext/_build.py``,
shared with the on-import build of ``chase_ext/_loader.py``. CPU kernels are always built;
CUDA kernels when torch has CUDA and a toolkit of its CUDA major version is found (a GPU is
not needed); otherwise why not is printed and kept in the build record. Overrides:
CHASE_EXT_CUDA=0 forces a CPU-only build, CHASE_EXT_CUDA=1 makes a missing or mismatched
toolkit an error.

Which torch: the backend in ``build_backend/`` makes the target environment's torch the one
compiled against, also in pip's isolated builds. Next to the library goes a record of that
torch (``_C.build.json``), and the C++ sources go into the wheel (``chase_ext/_csrc``) so
the library can be recompiled when the running torch differs. Metadata and sdists need no
torch.
"""
import importlib.util
import os
import shutil
import sys

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = os.path.dirname(os.path.abspath(__file__))
_spec = importlib.util.spec_from_file_location("_chase_ext_build", os.path.join(ROOT, "chase_ext", "_build.py"))
_build = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_build)

_COMPILING = {"bdist_wheel", "build_ext", "editable_wheel", "build", "install", "develop"}


class BuildPyWithSources(build_py):
    """Ships csrc/ inside the package (chase_ext/_csrc), for the on-import build."""

    def run(self):
        super().run()
        dst = os.path.join(self.build_lib, "chase_ext", "_csrc")
        shutil.rmtree(dst, ignore_errors=True)
        shutil.copytree(os.path.join(ROOT, "csrc"), dst,
                        ignore=shutil.ignore_patterns("*.o", "*.so", "__pycache__"))


def _extension_setup():
    """(ext_modules, cmdclass) for a build that compiles, with the record writer."""
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

    with_cuda, cuda_home, why_not = _build.want_cuda()
    fl = _build.flags(cuda_home)
    csrc = os.path.join(ROOT, "csrc")
    sources = [os.path.relpath(p, ROOT) for p in _build.sources(csrc, with_cuda)]
    ext_cls = CUDAExtension if with_cuda else CppExtension
    compile_args = {"cxx": fl["cxx"], "nvcc": fl["nvcc"]} if with_cuda else {"cxx": fl["cxx"]}
    ext = ext_cls(name="chase_ext._C", sources=sources, include_dirs=[csrc],
                  extra_compile_args=compile_args, extra_link_args=fl["ldflags"])

    class BuildExtWithRecord(BuildExtension.with_options(use_ninja=True)):
        def run(self):
            super().run()
            for e in self.extensions:
                _build.write_record(self.get_ext_fullpath(e.name), with_cuda, fl["archs"], why_not)

    print(f"chase_ext: building {'CPU+CUDA kernels' if with_cuda else f'CPU-only kernels (no CUDA: {why_not})'}",
          file=sys.stderr)
    return [ext], {"build_ext": BuildExtWithRecord}


cmdclass = {"build_py": BuildPyWithSources}
ext_modules = []
if importlib.util.find_spec("torch") is not None:
    ext_modules, ext_cmd = _extension_setup()
    cmdclass.update(ext_cmd)
elif _COMPILING & set(sys.argv[1:]):
    raise SystemExit(
        "chase_ext: compiling the kernels needs torch importable at build time; install torch first "
        "(e.g. `pip install torch`), then `pip install .` (or `pip install --no-build-isolation .`)"
    )

setup(version=_build.VERSION, ext_modules=ext_modules, cmdclass=cmdclass)
