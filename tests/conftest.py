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


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module of tiny models (on shared 2-core machines more
    threads only add contention; an old checkpoint fixture was also written with one)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
