"""Test-session setup: offline, Triton in interpreter mode without a GPU; skip `gpu`/`java` tests without them.

The environment variables are set here, before any test module imports triton kernels, because
`TRITON_INTERPRET` is read when `@triton.jit` decorates a function.
"""

import os
import shutil

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

if not torch.cuda.is_available():
    # No GPU: run Triton kernels in the interpreter on CPU tensors. On a GPU box they run compiled.
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    has_cuda = torch.cuda.is_available()
    has_java = shutil.which("java") is not None
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    skip_java = pytest.mark.skip(reason="needs a Java runtime")
    for item in items:
        if "gpu" in item.keywords and not has_cuda:
            item.add_marker(skip_gpu)
        if "java" in item.keywords and not has_java:
            item.add_marker(skip_java)


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a test module of tiny models: their ops take microseconds, and on a shared 2-core
    machine a second OpenMP thread that loses its core turns each op into a scheduler wait (measured: a tiny PPO
    iteration 0.25 s with 1 thread, 16 s with 2 while other processes ran). Use with
    `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
