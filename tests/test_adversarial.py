"""The adversarial catalog (tests.support.adversarial): every case either matches the original at
every size it accepts (shape guards allowed) or is refused with a clear error; the user's model and
example inputs are never modified, and nothing crashes."""

from __future__ import annotations

import pytest
import torch

from tests.support.adversarial import CASES, run_case


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """The cases are tiny: one intra-op thread is several times faster than oversubscribed cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("case", CASES, ids=[f"{c.klass}-{c.name}" for c in CASES])
def test_adversarial_case(case):
    outcome = run_case(case)
    assert outcome.status in {"ok", "refused"}, (
        f"{case.klass}/{case.name} ({case.description or 'no description'}): {outcome.status}: {outcome.detail}"
    )
