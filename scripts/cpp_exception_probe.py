"""Does this image survive a C++ exception thrown by an extension?

Builds a control extension (torch.utils.cpp_extension.load_inline, one function that fails
a TORCH_CHECK whose message formats an integer, as the project's checks do) and calls it
in a child process. Exit status: 0 = the call raised a clean RuntimeError; 3 = the child
died by a signal (the image crashes on C++ exceptions, whatever the extension); 2 = the
control could not be built or behaved otherwise (inconclusive). Used by gpu_check.sh.
"""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile

CHILD = r'''
import sys, torch
from torch.utils.cpp_extension import load_inline
src = """
#include <torch/extension.h>
void fail(int64_t k) { TORCH_CHECK(k < 0, "control: k=", k, " must be negative"); }
"""
mod = load_inline("chase_control_probe", cpp_sources=[src], functions=["fail"],
                  build_directory=sys.argv[1], extra_cflags=["-O0"], verbose=False)
print("built", flush=True)
try:
    mod.fail(5)
except RuntimeError as e:
    ok = "control: k=5 must be negative" in str(e)
    print("raised:", str(e).splitlines()[0], flush=True)
    sys.exit(0 if ok else 4)
sys.exit(5)
'''


def main() -> int:
    with tempfile.TemporaryDirectory(prefix="chase_probe_") as d:
        p = subprocess.run([sys.executable, "-c", CHILD, d], capture_output=True, text=True)
    out = (p.stdout + p.stderr).strip()
    print(out[-2000:])
    if p.returncode < 0 or p.returncode >= 128:
        sig = -p.returncode if p.returncode < 0 else p.returncode - 128
        built = "built" in p.stdout
        print(f"control extension: child killed by signal {sig}" + ("" if built else " before the build finished"))
        return 3 if built else 2
    if p.returncode == 0:
        print("control extension: TORCH_CHECK raised a clean RuntimeError")
        return 0
    print(f"control extension: inconclusive (child exit {p.returncode})")
    return 2


if __name__ == "__main__":
    os.environ.setdefault("MAX_JOBS", "4")
    sys.exit(main())
