"""Side-by-side measurements: latency, runtimes, the speed table, the pipeline's and verification's cost,
retraining ablations, the zoo sweep, fxrebirth against timm's re-parameterisation.

Each module is a script run from the repository root as ``python -m benchmarks.<name> [options]``
(``--help`` lists them); the timing ones interleave the compared variants round by round in one process
(:mod:`fxrebirth.measure.timing`), which is what to quote on a noisy machine. ``latency`` and
``pipeline_scaling`` also hold pytest-benchmark tests: ``pytest benchmarks/latency.py``. The plain test
command never collects this folder (pytest's ``testpaths`` is ``tests``). Shared code: :mod:`benchmarks._common`.
"""
