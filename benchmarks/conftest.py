import os
import platform

import pytest
import torch

QUICK = os.environ.get("CHASE_BENCH_QUICK", "0") == "1"
RESULTS = os.path.join(os.path.dirname(__file__), "results")


def machine_name() -> str:
    """One results file per machine: device kind + CPU model + thread count."""
    cpu = platform.processor() or "cpu"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    slug = "".join(ch if ch.isalnum() else "-" for ch in cpu).strip("-").lower()
    while "--" in slug:
        slug = slug.replace("--", "-")
    name = f"cpu-{torch.get_num_threads()}t-{slug}"
    if torch.cuda.is_available():
        gpu = torch.cuda.get_device_name().lower().replace(" ", "-")
        name = f"gpu-{gpu}__{name}"
    return name


@pytest.fixture
def quick():
    return QUICK
