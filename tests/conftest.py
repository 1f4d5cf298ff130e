"""Test session set-up.

Triton kernels run on CPU only under the interpreter, which must be chosen before triton is
first imported; DeepSpeed must be told it has no accelerator before it is imported.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("DS_ACCELERATOR", "cpu")

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True)
def _seed_and_threads():
    torch.manual_seed(0)
    yield


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: takes more than a few seconds (still run by make test)")
    config.addinivalue_line("markers", "demo: the demo's minutes-long recall promise (make demo-test, not make test)")
