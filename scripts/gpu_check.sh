#!/usr/bin/env bash
# On a machine with an NVIDIA GPU: build the CUDA kernels, run the test suite (the
# device-parametrized tests then also run on the GPU, including CPU == CUDA bit for bit)
# and the GPU benchmarks, and write results to benchmarks/results/ (logs also to $OUT).
#
#   bash scripts/gpu_check.sh [all|build|test|bench]    (default: all)
#
# Stages exist so each fits a 10-minute remote call; `all` runs them in order.
# Uses the python3 that holds a CUDA torch; pytest, hypothesis and pytest-benchmark must
# be importable (carry wheels where the machine has no registry).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
STAGE=${1:-all}
export CHASE_EXT_CUDA=1 PYTHONUNBUFFERED=1
export CUDA_HOME=${CUDA_HOME:-$(dirname "$(dirname "$(readlink -f "$(command -v nvcc)")")")}
LOG=${OUT:-benchmarks/results}
mkdir -p "$LOG" benchmarks/results
rc=0

if [[ $STAGE == all || $STAGE == build ]]; then
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv | tee "$LOG/gpu_env.txt"
  "$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())" | tee -a "$LOG/gpu_env.txt"
  # Only the GPU that is here: one arch keeps nvcc time down.
  cap=$("$PY" -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())")
  export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-$cap}
  t0=$(date +%s)
  "$PY" setup.py build_ext --inplace > "$LOG/gpu_build.log" 2>&1 || { tail -40 "$LOG/gpu_build.log"; exit 1; }
  echo "build: $(( $(date +%s) - t0 )) s" | tee -a "$LOG/gpu_env.txt"
  "$PY" -c "import chase_ext._ops as o; print(o.build_info())" | tee -a "$LOG/gpu_env.txt"
fi

if [[ $STAGE == all || $STAGE == test ]]; then
  PYTHONPATH=$PWD "$PY" -m pytest -q -p no:cacheprovider -x tests -rs 2>&1 | tee "$LOG/gpu_tests.log" | tail -40
  [[ ${PIPESTATUS[0]} == 0 ]] || rc=1
fi

if [[ $STAGE == all || $STAGE == bench ]]; then
  # GPU cases only: the CPU figures come from the CPU machine (its results file).
  (cd benchmarks && PYTHONPATH=$PWD/.. "$PY" -m pytest -q -p no:cacheprovider . -s -k cuda \
     --benchmark-json="$LOG/gpu_benchmark_raw.json" 2>&1 | tee "$LOG/gpu_bench.log" | tail -60
   exit "${PIPESTATUS[0]}") || rc=1
  for f in benchmarks/results/gpu-*.json; do [[ -e $f ]] && cp "$f" "$LOG"/; done
fi
exit $rc
