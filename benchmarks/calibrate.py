"""Print how close correct implementations come to their error budgets.

For each adapter, implementation, dtype and case, runs the item over many seeds and
prints the largest error / budget ratio (the headroom used) among passing quantities,
and how many seeds gave a non-conforming verdict. A ratio near 1 means the budget is
tight. A correct implementation shows 0 failing seeds unless a known deviation in
suites/deviations.toml covers it (this script does not apply deviations). Run from
the repository root:

    python benchmarks/calibrate.py --seeds 30 --framework torch
    python benchmarks/calibrate.py --seeds 30 --adapter tests.faults:OnePassVariance
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from adapters import registry  # noqa: E402
from adapters.contract import Device  # noqa: E402
from suites import cases  # noqa: E402
from suites.verdicts import Item, run_item, unsupported_reason  # noqa: E402

CPU = Device("cpu")


def parse_arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=30, help="seeds per case")
    parser.add_argument("--framework", action="append", default=[])
    parser.add_argument("--adapter", action="append", default=[])
    parser.add_argument("--dtypes", default="float32,float64")
    parser.add_argument("--cases", default=None, help="comma-separated case names")
    return parser.parse_args()


def main() -> int:
    arguments = parse_arguments()
    adapters = [registry.load_builtin(name) for name in arguments.framework]
    adapters += [registry.load(spec) for spec in arguments.adapter]
    if not adapters:
        print("name at least one --framework or --adapter", file=sys.stderr)
        return 2
    selected = (
        [cases.by_name(name) for name in arguments.cases.split(",")]
        if arguments.cases
        else list(cases.CATALOGUE)
    )

    print("adapter/implementation dtype case: failing seeds, max error/budget")
    for adapter in adapters:
        for implementation in adapter.implementations():
            for dtype in arguments.dtypes.split(","):
                for case in selected:
                    if not case.fits(dtype):
                        continue
                    probe = Item(
                        adapter.framework, implementation.name, "cpu", dtype, case, 0
                    )
                    if unsupported_reason(adapter, implementation, CPU, probe):
                        continue
                    failing, ratio = 0, 0.0
                    for seed in range(arguments.seeds):
                        item = dataclasses.replace(probe, seed=seed)
                        records = run_item(adapter, item, implementation)
                        failing += any(not r.conforming for r in records)
                        ratios = [
                            r.error / r.budget
                            for r in records
                            if r.verdict == "pass" and r.budget
                        ]
                        ratio = max([ratio, *ratios])
                    print(
                        f"{adapter.framework}/{implementation.name} {dtype} "
                        f"{case.name}: {failing}/{arguments.seeds}, {ratio:.2f}"
                    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
