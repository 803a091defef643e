"""Run the adversarial catalog (tests.support.adversarial) and count outcomes per class.

    python -m benchmarks.adversarial_sweep [--json] [--class inplace] [--case NAME ...]

Prints, per class, the number of cases that were ok / refused / wrong / crash / mutated, then every
case that was not ok with its detail.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

def load_catalog():
    """The adversarial catalog, :mod:`tests.support.adversarial`."""
    import tests.support.adversarial as catalog

    return catalog


def table(outcomes, classes, statuses) -> str:
    width = max(len(k) for k in classes + ("class", "total"))
    lines = [f"{'class':<{width}}  " + "  ".join(f"{s:>7}" for s in statuses) + "  " + f"{'cases':>5}"]
    totals = dict.fromkeys(statuses, 0)
    for klass in classes:
        rows = [o for o in outcomes if o.klass == klass]
        if not rows:
            continue
        counts = {s: sum(o.status == s for o in rows) for s in statuses}
        for s in statuses:
            totals[s] += counts[s]
        lines.append(f"{klass:<{width}}  " + "  ".join(f"{counts[s]:>7}" for s in statuses) + f"  {len(rows):>5}")
    lines.append(f"{'total':<{width}}  " + "  ".join(f"{totals[s]:>7}" for s in statuses) + f"  {len(outcomes):>5}")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print the outcomes as JSON")
    parser.add_argument("--class", dest="klass", action="append", help="only this class (repeatable)")
    parser.add_argument("--case", action="append", help="only this case (repeatable)")
    args = parser.parse_args(argv)

    import fxrebirth
    import torch

    torch.set_num_threads(1)
    catalog = load_catalog()
    selected = [c for c in catalog.CASES
                if (not args.klass or c.klass in args.klass) and (not args.case or c.name in args.case)]
    outcomes, harness = [], []
    for case in selected:
        try:
            outcome = catalog.run_case(case)
        except Exception as exc:  # noqa: BLE001 - a bug of the catalog, not of fxrebirth: reported apart
            harness.append(f"{case.klass}/{case.name}: {type(exc).__name__}: {exc}")
            print(f"  HARNESS  {case.klass:<12} {case.name}: {exc}", file=sys.stderr, flush=True)
            continue
        outcomes.append(outcome)
        if not args.json:
            print(f"  {outcome.status:<8} {case.klass:<12} {case.name}", file=sys.stderr, flush=True)

    if args.json:
        print(json.dumps({"fxrebirth": fxrebirth.__file__, "catalog": catalog.__file__,
                          "outcomes": [o.to_dict() for o in outcomes],
                          "harness_errors": harness}, indent=2))
        return 0
    print(f"fxrebirth: {fxrebirth.__file__}")
    print(f"catalog:   {catalog.__file__}")
    print()
    print(table(outcomes, catalog.CLASSES, catalog.STATUSES))
    bad = [o for o in outcomes if o.status != "ok"]
    if bad:
        print()
        print("not ok:")
        for o in bad:
            print(f"  [{o.status}] {o.klass}/{o.name}: {o.detail}")
    guarded = [o for o in outcomes if o.status == "ok" and o.guarded]
    if guarded:
        print()
        print("ok with shape guards:")
        for o in guarded:
            print(f"  {o.klass}/{o.name}: {o.detail}")
    if harness:
        print()
        print("catalog errors (not counted):")
        for line in harness:
            print("  " + line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
