"""Summary line of gpu_check.sh's error-path stage: passed / real failures / crashes / not run.

    python scripts/error_path_summary.py LOG PYTEST_RC IMAGE_CRASHES(yes|no|unknown)

LOG is the `pytest -v -rfE` output of the tests marked `error_path`, with or without
pytest-xdist, complete or cut off by a timeout. A crashed test (an xdist worker that died
while running it, or, without xdist, the test the whole process died in) counts as an
environment crash when the probe found that a control extension crashes the same way, as
a real failure otherwise. Tests collected but never reported (the run was cut off, or
xdist stopped replacing crashed workers) are counted as not run, and the run as
incomplete. Exit status 0 when nothing really failed and every test ran.
"""
from __future__ import annotations

import re
import sys

_ID = r"(\S+::\S+)"


def parse(text: str, rc: int) -> dict:
    # -v prints "id RESULT  [ 5%]" without xdist (an id may hold spaces: "test_p[a b]"),
    # "[gwN] [ 5%] RESULT id" with it (a dying worker's output may follow on the line, so
    # there the id ends at the first space)
    def results(word: str) -> set[str]:
        return (set(re.findall(rf"(?:^|\] ){word} {_ID}", text, re.M))
                | set(re.findall(rf"^(\S+::.+?) {word}(?: |$)", text, re.M)))

    failed = results("FAILED") | results("ERROR") | set(re.findall(rf"^(?:FAILED|ERROR) {_ID}", text, re.M))
    passed = results("PASSED") - failed  # a test that passed and then failed its teardown failed
    skipped = results("SKIPPED")
    crashed = set(re.findall(r"crashed while running '([^']+)'", text))
    # a worker's death: "[gwN] node down: ...", then that worker's test reported FAILED
    # (either may follow the dying worker's own output on the same line)
    for m in re.finditer(r"\[(gw\d+)\] node down:", text):
        after = re.search(rf"\[{m[1]}\][^\n]*?\[[ \d]+%\] FAILED {_ID}", text[m.end():])
        if after:
            crashed.add(after[1])
    failed -= crashed
    if rc >= 128 or rc < 0:  # the pytest process itself died: the test it was running
        started = re.findall(rf"^{_ID}", text, re.M)  # -v prints the id, then the result
        done = passed | skipped | failed
        crashed |= {t for t in started[-1:] if t not in done}
        if not crashed:
            crashed.add(f"(pytest died with status {rc}; test unknown)")
    # the tests that run: "8 workers [156 items]" (xdist counts the selected ones), or
    # "collecting ... collected 1084 items / 928 deselected / 156 selected"
    m = re.search(r"^\d+ workers \[(\d+) items?\]", text, re.M)
    collected = int(m.group(1)) if m else None
    m = re.search(r"^(?:collecting \.\.\. )?collected (\d+) items?(?: / (\d+) deselected)?(?: / (\d+) selected)?",
                  text, re.M)
    if collected is None and m:
        collected = int(m.group(3)) if m.group(3) else int(m.group(1)) - int(m.group(2) or 0)
    seen = len(passed | skipped | failed | crashed)
    not_run = max(collected - seen, 0) if collected is not None else 0
    stopped = "maximum crashed workers reached" in text
    return {"passed": passed, "skipped": skipped, "failed": failed, "crashed": crashed, "not_run": not_run,
            "collected": collected, "stopped": stopped}


def main(argv: list[str]) -> int:
    path, rc, image = argv[1], int(argv[2]), argv[3]
    with open(path, errors="replace") as f:
        res = parse(f.read(), rc)
    n = {k: len(res[k]) for k in ("passed", "skipped", "failed", "crashed")}
    line = (f"error-path tests: {n['passed']} passed, {n['skipped']} skipped, {n['failed']} failed, "
            f"{n['crashed']} crashed, {res['not_run']} not run (of {res['collected'] or '?'} collected)")
    real = sorted(res["failed"])
    if res["crashed"]:
        ids = ", ".join(sorted(res["crashed"]))
        if image == "yes":
            line += f"\n  environment crash (the control extension crashes the same way): {ids}"
        else:
            why = "the control extension raises cleanly" if image == "no" else "probe inconclusive"
            line += f"\n  crashed ({why}: counted as real failures): {ids}"
            real += sorted(res["crashed"])
    if res["failed"]:
        line += "\n  REAL failures: " + ", ".join(sorted(res["failed"]))
    incomplete = res["not_run"] > 0 or res["stopped"] or res["collected"] is None
    if res["stopped"]:
        line += "\n  INCOMPLETE: pytest-xdist stopped replacing crashed workers (--max-worker-restart)"
    elif rc == 124 and res["not_run"]:
        line += "\n  INCOMPLETE: the stage's time cap cut the run off"
    elif rc == 124:
        line += "\n  the time cap hit after every test had reported (a hang at the end?): see the log"
    elif rc not in (0, 1) and not res["crashed"] and rc < 128:
        line += f"\n  pytest exited with status {rc} (usage error?): see the log"
        real.append("pytest")
    if incomplete and res["collected"] is None:
        line += "\n  INCOMPLETE: no collection line in the log"
    print(line)
    return 1 if real or incomplete else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
