"""The whole pipeline on random PyTorch programs from a second, independent generator.

:mod:`tests.support.programs` writes ordinary ``nn.Module`` programs as Python source (in-place ops
and aliases, ceil-mode pooling, broadcasts, literal reshapes, padding modes, transposed, 1-D and 3-D
convolutions...), each valid at its nominal size. For every seed, ``fxrebirth.optimize`` gets an example
at the nominal size (batch 1 or 2, the default cost model or ``cost_model=None``), and the contract is:

* optimize() raises ``fxrebirth.FxRebirthError`` (a clear refusal), or the result, at each of the 3
  sizes where the original runs and at batch 2 and 3, raises ``fxrebirth.FxRebirthError`` (a shape
  guard) or matches the original within ``fxrebirth.equivalence.tolerance`` of the program's dtype;
* any other exception, anywhere, is a failure;
* neither the user's module (state_dict, eval mode) nor the example inputs are modified.

1,000 programs per run (``HYPOTHESIS_PROFILE=thorough``: 5,000), in chunks so that a failure names its
seeds; ``FXREBIRTH_PROGRAMS`` sets another count and ``FXREBIRTH_PROGRAM_SEED`` the first seed.
Reproduce one with ``tests.support.programs.random_program(seed)`` (its ``description`` is the
program's source).
"""

from __future__ import annotations

import os
import warnings

import pytest
import torch

import fxrebirth
from fxrebirth.equivalence import relative_error, tolerance
from tests.support.programs import check_options, check_program, random_program

PROFILE = os.environ.get("HYPOTHESIS_PROFILE", "ci")
COUNT = int(os.environ.get("FXREBIRTH_PROGRAMS", 5000 if PROFILE == "thorough" else 1000))
FIRST = int(os.environ.get("FXREBIRTH_PROGRAM_SEED", 0))
CHUNKS = 8
SHOWN = 3  # failing programs printed in full per chunk


def _chunk(i: int) -> range:
    per = -(-COUNT // CHUNKS)
    return range(FIRST + i * per, FIRST + min(COUNT, (i + 1) * per))


@pytest.mark.parametrize("chunk", range(CHUNKS), ids=lambda i: f"seeds{_chunk(i).start}-{_chunk(i).stop - 1}")
def test_random_programs(chunk: int) -> None:
    seeds = _chunk(chunk)
    failures, compared = [], 0
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the tensors are tiny: intra-op threads only add overhead (restored below)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for seed in seeds:
                program = random_program(seed)
                outcome = check_program(program, fxrebirth.optimize, fxrebirth.FxRebirthError, relative_error,
                                        tolerance)
                compared += outcome.checked > 0
                if outcome.problems:
                    failures.append((program, outcome))
    finally:
        torch.set_num_threads(threads)
    if failures:
        parts = [f"{len(failures)} of {len(seeds)} programs fail: seeds {[p.seed for p, _ in failures]}"]
        for program, outcome in failures[:SHOWN]:
            problems = "\n".join(f"  {kind}: {text}" for kind, text in outcome.problems[:6])
            parts.append(f"--- seed {program.seed}, optimize options {check_options(program.seed)}:\n{problems}\n"
                         f"{program.description}")
        pytest.fail("\n".join(parts), pytrace=False)
    # a clear refusal is allowed, but a run where (almost) nothing is compared proves nothing
    assert compared >= len(seeds) // 2, (
        f"only {compared} of {len(seeds)} programs were compared at any size: optimize() refused or the result "
        f"raised a shape guard on all the others")
