"""scripts/gpu_check.sh's bookkeeping, which only a GPU session runs for real: the
error-path summary on logs as pytest and pytest-xdist write them (complete, cut off,
with crashed workers), and the stage budget (a stage that cannot finish is skipped and
named, not started)."""
from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, os.path.join(ROOT, "scripts"))
import error_path_summary as S  # noqa: E402

T = "tests/test_x.py::test_{}"

XDIST_CRASHES = f"""============================= test session starts ==============================
8 workers [5 items]

[gw0] [ 20%] PASSED {T.format('a')} 
[gw1] [ 40%] SKIPPED {T.format('b')} 
[gw2] node down: Not properly terminated
[gw2] [ 60%] FAILED {T.format('c')} 

replacing crashed worker gw2
[gw3] [ 80%] FAILED {T.format('d')} 
=================================== FAILURES ===================================
FAILED {T.format('c')}
FAILED {T.format('d')} - AssertionError
"""


def _run(tmp_path, text, rc, image):
    log = tmp_path / "log.txt"
    log.write_text(text)
    p = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "error_path_summary.py"), str(log), str(rc),
                        image], capture_output=True, text=True)
    return p.returncode, p.stdout


def test_xdist_crash_is_told_apart_from_a_failure_and_missing_tests_are_counted(tmp_path):
    r = S.parse(XDIST_CRASHES, 1)
    assert r["passed"] == {T.format("a")} and r["skipped"] == {T.format("b")}
    assert r["crashed"] == {T.format("c")} and r["failed"] == {T.format("d")}
    assert r["collected"] == 5 and r["not_run"] == 1 and not r["stopped"]
    rc, out = _run(tmp_path, XDIST_CRASHES, 1, "yes")
    assert rc == 1 and "1 crashed, 1 not run (of 5 collected)" in out
    assert "environment crash" in out and "REAL failures: " + T.format("d") in out


def test_a_crash_report_interleaved_with_the_dying_workers_output():
    # the dying worker's fault handler writes its module list while xdist reports it
    text = (f"8 workers [2 items]\n\n[gw0] [ 50%] PASSED {T.format('a')} Fatal Python error: Segmentation fault\n"
            f", scipy.integrate._vode[gw3] node down: Not properly terminated\n"
            f", PIL._imaging[gw3], kiwisolver._cext [100%] FAILED {T.format('b')} \n\nreplacing crashed worker gw3\n")
    r = S.parse(text, 1)
    assert r["crashed"] == {T.format("b")} and not r["failed"] and r["passed"] == {T.format("a")}
    assert r["not_run"] == 0


def test_crashes_on_a_crashing_image_alone_pass(tmp_path):
    text = XDIST_CRASHES.replace(f"[gw3] [ 80%] FAILED {T.format('d')}", f"[gw3] [ 80%] PASSED {T.format('d')}")
    text = text.replace(f"FAILED {T.format('d')} - AssertionError\n", "")
    text += f"[gw4] [100%] PASSED {T.format('e')} \n"
    assert _run(tmp_path, text, 1, "yes")[0] == 0
    rc, out = _run(tmp_path, text, 1, "no")  # the control raised cleanly: a crash is ours
    assert rc == 1 and "counted as real failures" in out


def test_xdist_giving_up_on_crashed_workers_is_incomplete(tmp_path):
    text = XDIST_CRASHES + "maximum crashed workers reached: 32\n"
    rc, out = _run(tmp_path, text, 1, "yes")
    assert rc == 1 and "INCOMPLETE: pytest-xdist stopped" in out


def test_a_run_cut_off_by_the_time_cap(tmp_path):
    # -v without xdist, killed by timeout(1) before its report
    text = (f"collected 4 items\n\n{T.format('a')} PASSED\n{T.format('b')} FAILED\n"
            f"{T.format('c')} ")
    r = S.parse(text, 124)
    assert r["passed"] == {T.format("a")} and r["failed"] == {T.format("b")} and r["not_run"] == 2
    rc, out = _run(tmp_path, text, 124, "no")
    assert rc == 1 and "INCOMPLETE: the stage's time cap" in out and "2 not run (of 4 collected)" in out


def test_the_process_dying_names_the_test_it_ran(tmp_path):
    text = f"collected 2 items\n\n{T.format('a')} PASSED\n{T.format('b')} "
    r = S.parse(text, 139)
    assert r["crashed"] == {T.format("b")} and r["not_run"] == 0
    assert _run(tmp_path, text, 139, "yes")[0] == 0


def test_a_complete_clean_run(tmp_path):
    text = f"collected 2 items\n\n{T.format('a')} PASSED\n{T.format('b')} SKIPPED (no CUDA)\n"
    rc, out = _run(tmp_path, text, 0, "unknown")
    assert rc == 0 and "1 passed, 1 skipped, 0 failed, 0 crashed, 0 not run" in out


def _gpu_check(tmp_path, budget: int, stages: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, GPU_CHECK_BUDGET_S=str(budget), OUT=str(tmp_path), PYTHON=sys.executable,
               CUDA_HOME=os.environ.get("CUDA_HOME", "/nonexistent"))
    return subprocess.run(["bash", os.path.join(ROOT, "scripts", "gpu_check.sh"), stages], env=env,
                          capture_output=True, text=True, timeout=120)


@pytest.mark.skipif(sys.platform != "linux", reason="bash script")
def test_stages_without_time_left_are_skipped_and_named(tmp_path):
    p = _gpu_check(tmp_path, 70, "errors,recipes,rest")
    assert p.returncode == 0, p.stdout + p.stderr
    # 50 s left after the 20 s kept back: too little for the probe + errors (90), recipes (90), rest (60)
    for stage, need in (("probe", 90), ("recipes", 90), ("rest", 60)):  # 50 s left, or a second less on a slow start
        assert re.search(rf"-- {stage} skipped for time: (50|49) s of the budget left, it needs {need} s", p.stdout)
    # without the probe a crash could not be told from a failure: errors waits for the next call
    assert "-- errors skipped for time: the probe did not run" in p.stdout
    assert "skipped for time: probe errors recipes rest" in p.stdout
    assert (tmp_path / "gpu_check.tgz").exists()


@pytest.mark.skipif(sys.platform != "linux", reason="bash script")
def test_no_time_for_the_build_stops_the_run(tmp_path):
    p = _gpu_check(tmp_path, 100, "build,rest")
    assert p.returncode == 1
    assert re.search(r"-- build skipped for time: (80|79) s of the budget left, it needs 90 s", p.stdout)
    assert "rest" not in p.stdout.replace("skipped for time: build", "")  # nothing ran against no build
    assert "done, rc=1; skipped for time: build" in p.stdout


def test_an_unknown_stage_is_refused():
    p = subprocess.run(["bash", os.path.join(ROOT, "scripts", "gpu_check.sh"), "bild"], capture_output=True,
                       text=True, timeout=60, env=dict(os.environ, CUDA_HOME="/nonexistent"))
    assert p.returncode == 2 and "unknown stage 'bild'" in p.stderr


_REAL_TESTS = '''
import pytest

@pytest.fixture
def bad_teardown():
    yield
    raise RuntimeError("teardown")

def test_a():
    pass

@pytest.mark.parametrize("x", ["a b", "c"])
def test_p(x):
    pass

def test_f():
    assert False

def test_td(bad_teardown):
    pass

@pytest.mark.slow
def test_deselected():
    pass
'''


def test_a_real_pytest_log_without_xdist(tmp_path):
    # what the stage's command writes without pytest-xdist, selection and all
    (tmp_path / "test_x.py").write_text(_REAL_TESTS)
    (tmp_path / "pytest.ini").write_text("[pytest]\nmarkers =\n    slow: a test left out by -m\n")
    p = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-p", "no:xdist", "-v", "-rfE",
                        "-m", "not slow", str(tmp_path / "test_x.py")], capture_output=True, text=True,
                       cwd=tmp_path, timeout=120)
    r = S.parse(p.stdout, p.returncode)
    ids = lambda *names: {f"test_x.py::{n}" for n in names}  # noqa: E731
    assert r["collected"] == 5 and r["not_run"] == 0, p.stdout
    assert r["passed"] == ids("test_a", "test_p[a b]", "test_p[c]") and r["failed"] == ids("test_f", "test_td")
    rc, out = _run(tmp_path, p.stdout, p.returncode, "no")
    assert rc == 1 and "3 passed, 0 skipped, 2 failed, 0 crashed, 0 not run (of 5 collected)" in out
