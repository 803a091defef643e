"""Test configuration: hypothesis profiles and shared fixtures.

Profiles (select with HYPOTHESIS_PROFILE): ``ci`` (default; derandomised, no deadline, so the noisy
machine never flakes a run) and ``thorough`` (10x the examples, random seeds, and the tests marked
``@pytest.mark.thorough``: the heavy zoo models, which the ``ci`` profile skips with that reason). The benchmarks live in
``benchmarks/`` (outside ``testpaths``): ``python -m benchmarks.<name>``, ``pytest benchmarks/latency.py``.
"""

from __future__ import annotations

import os

# Inductor compiles in this process: its pool of compile-worker subprocesses buys nothing on two cores, and a
# stuck worker would hang the run instead of failing a test
os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")

import pytest  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402

settings.register_profile(
    "ci", max_examples=60, deadline=None, derandomize=True, print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile(
    "thorough", max_examples=600, deadline=None, print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
PROFILE = os.environ.get("HYPOTHESIS_PROFILE", "ci")
settings.load_profile(PROFILE)


def pytest_configure(config) -> None:
    config.addinivalue_line("markers", "thorough: runs in the thorough profile only (HYPOTHESIS_PROFILE=thorough)")


def pytest_collection_modifyitems(config, items) -> None:
    if PROFILE == "thorough":
        return
    skip = pytest.mark.skip(reason="heavy: thorough profile only (HYPOTHESIS_PROFILE=thorough)")
    for item in items:
        if item.get_closest_marker("thorough"):
            item.add_marker(skip)


@pytest.fixture
def reset_dynamo():
    """A fresh Dynamo cache before and after a test (compiled code of one test must not serve another)."""
    import torch

    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.fixture
def one_and_two_processes():
    """``run(script, *args) -> (state dict alone, state dict as two gloo ranks under torchrun)``: the
    data-parallel check both retraining jobs share; ``script`` saves to the path given last."""
    import os
    import subprocess
    import sys

    import torch

    def run(script, *args: str) -> tuple[dict, dict]:
        single, double = script.with_name("single.pt"), script.with_name("ddp.pt")
        env = dict(os.environ, OMP_NUM_THREADS="1")
        subprocess.run([sys.executable, str(script), *args, str(single)], check=True, timeout=300, env=env)
        subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                        str(script), *args, str(double)], check=True, timeout=300, env=env)
        return torch.load(single, weights_only=True), torch.load(double, weights_only=True)

    return run
