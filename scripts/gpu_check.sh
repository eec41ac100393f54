#!/usr/bin/env bash
# On a machine with an NVIDIA GPU: build the CUDA kernels, run the test suite (the
# device-parametrized tests then also run on the GPU, including CPU == CUDA bit for bit)
# and the benchmarks, and write results to benchmarks/results/ (and to $OUT if set).
# Uses the python3 that holds a CUDA torch; pytest, hypothesis and pytest-benchmark must
# be importable (carry wheels where the machine has no registry).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
export CHASE_EXT_CUDA=1
export CUDA_HOME=${CUDA_HOME:-$(dirname "$(dirname "$(readlink -f "$(command -v nvcc)")")")}
OUT=${OUT:-benchmarks/results}
mkdir -p "$OUT"
"$PY" -c "import torch; print(torch.__version__, torch.version.cuda, torch.cuda.get_device_name())" | tee "$OUT/gpu_env.txt"
"$PY" setup.py build_ext --inplace 2>&1 | tail -20 | tee "$OUT/gpu_build.log"
"$PY" -c "import chase_ext._ops as o; print(o.build_info())" | tee -a "$OUT/gpu_env.txt"
rc=0
PYTHONPATH=$PWD "$PY" -m pytest -q -p no:cacheprovider tests 2>&1 | tee "$OUT/gpu_tests.log" || rc=1
(cd benchmarks && PYTHONPATH=$PWD/.. "$PY" -m pytest -q -p no:cacheprovider . -s \
   --benchmark-json="$OUT/gpu_benchmark_raw.json" 2>&1 | tee "$OUT/gpu_bench.log") || rc=1
cp benchmarks/results/*.json "$OUT"/ 2>/dev/null || true
exit $rc
