"""How far the default teacher is from convergence: the same recipe trained for several epoch counts.

Not collected by the plain test command. Run::

    python -m benchmarks.teacher_curve [--epochs 4 8 16 32]

Each teacher is the cached one of :func:`fxrebirth.paper.teacher.default_teacher` (``$FXREBIRTH_CACHE``),
trained on first use and resumable after every epoch, so an interrupted curve continues where it stopped
(about a minute an epoch on 2 cores). Prints the Markdown table of docs/results.md; the issue's criterion
for "near convergence" is a doubling that gains < 0.3 pt.
"""

from __future__ import annotations

import argparse

from fxrebirth.paper.teacher import teacher_curve, teacher_curve_table


def main(epochs: list[int]) -> str:
    return teacher_curve_table(teacher_curve(epochs))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, nargs="+", default=[4, 8, 16, 32])
    print(main(parser.parse_args().epochs))
