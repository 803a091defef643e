"""What only fxrebirth's own tests and benchmarks use: the adversarial catalogue (:mod:`tests.support.adversarial`),
the random-program generator (:mod:`tests.support.programs`) and the model zoo (:mod:`tests.support.zoo`, its sweep
:mod:`tests.support.zoo_sweep` and structural checks :mod:`tests.support.zoo_checks`).

The public proving kit for users' own rules stays in the library: :mod:`fxrebirth.testing` (``assert_equivalent``,
``randomize_batchnorm``, ``TOLERANCES``), :mod:`fxrebirth.testing.kit` (``check_rule``),
:mod:`fxrebirth.testing.strategies` and :mod:`fxrebirth.testing.graphs`.
"""
