"""Summary line of gpu_check.sh's error-path stage: passed / real failures / crashes.

    python scripts/error_path_summary.py LOG PYTEST_RC IMAGE_CRASHES(yes|no|unknown)

LOG is the `pytest -v -rfE` output of the tests marked `error_path`, with or without
pytest-xdist. A crashed test (an xdist worker that died while running it, or, without
xdist, the test the whole process died in) counts as an environment crash when the probe
found that a control extension crashes the same way, as a real failure otherwise. Exit
status 0 when nothing really failed.
"""
from __future__ import annotations

import re
import sys


def parse(text: str, rc: int) -> dict:
    passed = set(re.findall(r"PASSED (\S+::\S+)", text)) | set(re.findall(r"^(\S+::\S+) PASSED", text, re.M))
    skipped = set(re.findall(r"SKIPPED (\S+::\S+)", text)) | set(re.findall(r"^(\S+::\S+) SKIPPED", text, re.M))
    crashed = set(re.findall(r"crashed while running '([^']+)'", text))
    failed = set(re.findall(r"^(?:FAILED|ERROR) (\S+::\S+)", text, re.M)) - crashed
    if rc >= 128 or rc < 0:  # the pytest process itself died: the test it was running
        started = re.findall(r"^(\S+::\S+)", text, re.M)  # -v prints the id, then the result
        done = passed | skipped | failed
        crashed |= {t for t in started[-1:] if t not in done}
        if not crashed:
            crashed.add(f"(pytest died with status {rc}; test unknown)")
    return {"passed": passed, "skipped": skipped, "failed": failed, "crashed": crashed}


def main(argv: list[str]) -> int:
    path, rc, image = argv[1], int(argv[2]), argv[3]
    with open(path, errors="replace") as f:
        res = parse(f.read(), rc)
    n = {k: len(v) for k, v in res.items()}
    line = f"error-path tests: {n['passed']} passed, {n['skipped']} skipped, {n['failed']} failed, {n['crashed']} crashed"
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
    if rc not in (0, 1) and not res["crashed"] and rc < 128:
        line += f"\n  pytest exited with status {rc} (timeout or usage error): see the log"
        real.append("pytest")
    print(line)
    return 1 if real else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
