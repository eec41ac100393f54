import pytest
import torch

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def pytest_generate_tests(metafunc):
    if "device" in metafunc.fixturenames:
        metafunc.parametrize("device", DEVICES)


def pytest_configure(config):
    # scripts/gpu_check.sh runs these apart (-m error_path) in their own pytest process:
    # on an image whose extensions crash on any C++ exception they die with a signal
    config.addinivalue_line("markers", "error_path: expects a kernel to raise a C++ error (TORCH_CHECK)")
