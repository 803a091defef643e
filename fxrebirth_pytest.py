"""pytest plugin for fxrebirth (entry point ``pytest11``): the testing kit as fixtures and a marker.

It lives outside the ``fxrebirth`` package so that loading it imports neither fxrebirth nor torch.

Fixtures: ``assert_equivalent`` and ``check_rule`` (the functions of :mod:`fxrebirth.testing`), and
``equivalence_tolerance`` (the per-dtype table). Marker: ``@pytest.mark.fxrebirth_rule``, to select
rule proofs (``pytest -m fxrebirth_rule``). torch and hypothesis are imported only when a fixture is
used, so the plugin costs nothing in test runs that do not use it.
"""

from __future__ import annotations

import pytest


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "fxrebirth_rule: a property proof of an fxrebirth rule")


@pytest.fixture
def assert_equivalent():
    from fxrebirth.testing import assert_equivalent as check

    return check


@pytest.fixture
def check_rule():
    from fxrebirth.testing.kit import check_rule as check

    return check


@pytest.fixture
def equivalence_tolerance():
    from fxrebirth.testing import TOLERANCES

    return dict(TOLERANCES)
