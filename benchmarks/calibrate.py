"""Measure how close correct implementations come to their error budgets.

For each (adapter, implementation, dtype, case) the script runs the item over many
seeds, applies the known deviations from suites/deviations.toml with the adapter's
version, and prints one line per quantity: the largest normalized error over the
seeds whose verdict is `pass`, the budget, the headroom used (error / budget), and
how many seeds gave a non-conforming verdict and how many a known deviation.
Deviations and failures never feed the error figures. A summary per (quantity,
dtype) over every adapter follows.

This is a benchmark that prints figures, not a test. `--json PATH` writes the raw
figures, and `--merge FILE...` combines such files from separate environments (one
per framework, because their pins conflict) and prints the combined summary. Run
from the repository root:

    python benchmarks/calibrate.py --seeds 50 --framework torch --json torch.json
    python benchmarks/calibrate.py --merge torch.json mxnet.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import platform
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from adapters import registry  # noqa: E402
from adapters.contract import Device  # noqa: E402
from suites import cases, deviations, dtypes, error_model, files  # noqa: E402
from suites.verdicts import Item, json_number, run_item, unsupported_reason  # noqa: E402

CPU = Device("cpu")
SCHEMA = "normconf-calibration"
SCHEMA_VERSION = 1
# A budget more than this many times the largest error of a correct implementation
# needs a documented reason (docs/error-model.md).
LOOSENESS_LIMIT = 100.0


@dataclass
class Figures:
    """Measurements over the seeds of one (framework, implementation, dtype, case,
    quantity).

    `max_error` is the largest error over seeds whose verdict is `pass` (None when no
    seed passed); `worst_seed` and `worst_index` locate it. `nonconforming` and
    `deviations` list (seed, verdict, error, message) for each such seed.
    """

    framework: str
    version: str
    implementation: str
    dtype: str
    case: str
    quantity: str
    budget: float | None = None
    base: float | None = None
    growth: float | None = None
    reduction_length: int | None = None
    seeds: int = 0
    max_error: float | None = None
    worst_seed: int | None = None
    worst_index: list[int] | None = None
    verdicts: dict[str, int] = field(default_factory=dict)
    nonconforming: list[dict] = field(default_factory=list)
    deviations: list[dict] = field(default_factory=list)

    @property
    def key(self) -> tuple[str, str, str, str, str]:
        return (
            self.framework,
            self.implementation,
            self.dtype,
            self.case,
            self.quantity,
        )

    @property
    def headroom(self) -> float | None:
        """The budget fraction the worst passing seed used (error / budget)."""
        if self.max_error is None or not self.budget:
            return None
        return self.max_error / self.budget

    def add(self, seed: int, record: dict) -> None:
        """Count one seed's record of this quantity."""
        verdict = record["verdict"]
        self.seeds += 1
        self.verdicts[verdict] = self.verdicts.get(verdict, 0) + 1
        if record["budget"] is not None:
            self.budget = record["budget"]
        summary = {
            "seed": seed,
            "verdict": verdict,
            "error": record["error"],
            "message": record["message"],
        }
        if verdict == "deviation":
            summary["entry"] = record["deviation"]
            self.deviations.append(summary)
        elif not record["conforming"]:
            self.nonconforming.append(summary)
        elif verdict == "pass":
            if self.max_error is None or record["error"] > self.max_error:
                self.max_error = record["error"]
                self.worst_seed = seed
                self.worst_index = record["worst_index"]


def parse_arguments(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--seeds", type=int, default=50, help="seeds per case, 0 to N-1 (default 50)"
    )
    parser.add_argument(
        "--framework",
        action="append",
        default=[],
        help="built-in adapter to run (torch, mxnet, ...); repeatable",
    )
    parser.add_argument(
        "--adapter",
        action="append",
        default=[],
        help="adapter as module:object, e.g. tests.faults:Float32Kernel; repeatable",
    )
    parser.add_argument(
        "--dtypes",
        default="float32,float64",
        help="comma-separated dtypes (default float32,float64)",
    )
    parser.add_argument("--cases", default=None, help="comma-separated case names")
    parser.add_argument(
        "--deviations",
        type=Path,
        default=deviations.DEFAULT_PATH,
        help="TOML file of known deviations (default suites/deviations.toml)",
    )
    parser.add_argument(
        "--json", type=Path, default=None, help="write the raw figures to this file"
    )
    parser.add_argument(
        "--merge",
        nargs="+",
        type=Path,
        default=None,
        metavar="FILE",
        help="merge --json files and print their combined summary; runs nothing",
    )
    parser.add_argument(
        "--top",
        type=int,
        default=15,
        help="how many items with the largest headroom to list (default 15)",
    )
    return parser.parse_args(argv)


# Running


def load_adapters(arguments: argparse.Namespace) -> list[object]:
    adapters = [registry.load_builtin(name) for name in arguments.framework]
    adapters += [registry.load(spec) for spec in arguments.adapter]
    return adapters


def select_cases(names: str | None) -> list[cases.Case]:
    if not names:
        return list(cases.CATALOGUE)
    return [cases.by_name(name) for name in names.split(",")]


def runnable_implementations(adapter, dtype: str, case: cases.Case) -> list:
    """Return the adapter's implementations that run this (dtype, case) on the CPU."""
    if not case.fits(dtype):
        return []
    runnable = []
    for implementation in adapter.implementations():
        probe = Item(adapter.framework, implementation.name, "cpu", dtype, case, 0)
        if unsupported_reason(adapter, implementation, CPU, probe) is None:
            runnable.append(implementation)
    return runnable


def measure_adapter(
    adapter,
    dtype_names: list[str],
    selected: list[cases.Case],
    seeds: int,
    known: list[deviations.Deviation],
) -> list[Figures]:
    """Run every runnable item of one adapter over the seeds.

    The seed loop is outside the implementation loop so that the implementations of
    one (dtype, case, seed) share the cached reference.
    """
    version = adapter.version()
    figures: dict[tuple, Figures] = {}
    for dtype in dtype_names:
        for case in selected:
            implementations = runnable_implementations(adapter, dtype, case)
            started = time.perf_counter()
            for seed in range(seeds):
                for implementation in implementations:
                    item = Item(
                        adapter.framework, implementation.name, "cpu", dtype, case, seed
                    )
                    rows = [
                        dataclasses.asdict(record)
                        for record in run_item(adapter, item, implementation)
                    ]
                    deviations.apply(rows, known, version)
                    for row in rows:
                        if row["verdict"] == "unsupported":
                            continue
                        add_record(figures, version, seed, row)
            if implementations:
                print(
                    f"calibrate: {adapter.framework} {dtype} {case.name}: "
                    f"{time.perf_counter() - started:.1f} s",
                    file=sys.stderr,
                    flush=True,
                )
    return list(figures.values())


def add_record(figures: dict, version: str, seed: int, row: dict) -> None:
    key = (
        row["framework"],
        row["implementation"],
        row["dtype"],
        row["case"],
        row["quantity"],
    )
    if key not in figures:
        base, growth = error_model.BUDGET[row["quantity"]][row["dtype"]]
        shape = cases.by_name(row["case"]).shape
        figures[key] = Figures(
            framework=row["framework"],
            version=version,
            implementation=row["implementation"],
            dtype=row["dtype"],
            case=row["case"],
            quantity=row["quantity"],
            base=base,
            growth=growth,
            reduction_length=error_model.budget_reduction_length(
                row["quantity"], shape
            ),
        )
    figures[key].add(seed, row)


# Raw figures as JSON


def environment(adapters: list[object], seeds: int) -> dict:
    return {
        "python": platform.python_version(),
        "numpy": np.__version__,
        "machine": platform.machine(),
        "frameworks": {adapter.framework: adapter.version() for adapter in adapters},
        "seeds": seeds,
        "command": " ".join(sys.argv),
    }


def to_json_value(value):
    """Return value with non-finite floats as strict JSON strings, recursively."""
    if isinstance(value, float):
        return json_number(value)
    if isinstance(value, dict):
        return {key: to_json_value(item) for key, item in value.items()}
    if isinstance(value, list):
        return [to_json_value(item) for item in value]
    return value


def from_json_value(value):
    """Undo to_json_value: "NaN", "Infinity" and "-Infinity" become floats."""
    if value in ("NaN", "Infinity", "-Infinity"):
        return float(value.replace("Infinity", "inf"))
    if isinstance(value, dict):
        return {key: from_json_value(item) for key, item in value.items()}
    if isinstance(value, list):
        return [from_json_value(item) for item in value]
    return value


def write_json(path: Path, env: dict, figures: list[Figures], wall_s: float) -> None:
    document = {
        "schema": SCHEMA,
        "version": SCHEMA_VERSION,
        "environment": {**env, "wall_s": round(wall_s, 1)},
        "figures": [to_json_value(dataclasses.asdict(entry)) for entry in figures],
    }
    files.write_text_atomic(
        path, json.dumps(document, indent=1, allow_nan=False) + "\n"
    )


def read_json(path: Path) -> tuple[dict, list[Figures]]:
    """Read one --json file; raise ValueError naming the file when it is not one."""
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as error:
        raise ValueError(f"cannot read calibration file {path}: {error}") from error
    if document.get("schema") != SCHEMA or document.get("version") != SCHEMA_VERSION:
        raise ValueError(
            f"{path} is not a {SCHEMA} version {SCHEMA_VERSION} file; "
            "write one with --json"
        )
    figures = [Figures(**from_json_value(entry)) for entry in document["figures"]]
    return document["environment"], figures


def merge(paths: list[Path]) -> tuple[list[dict], list[Figures]]:
    """Combine --json files; raise ValueError if two files contain the same item."""
    environments, combined, origin = [], [], {}
    for path in paths:
        env, figures = read_json(path)
        environments.append(env)
        for entry in figures:
            if entry.key in origin:
                raise ValueError(
                    f"{path} and {origin[entry.key]} both contain "
                    f"{'/'.join(entry.key)}; merge each item once"
                )
            origin[entry.key] = path
            combined.append(entry)
    return environments, combined


# Printing


def format_number(value: float | None, digits: int = 3) -> str:
    if value is None:
        return "-"
    if math.isinf(value):
        return "inf"
    return f"{value:.{digits}g}"


def where(entry: Figures) -> str:
    """Locate an item's worst passing seed.

    A `*` marks an item that also had seeds matching a known deviation. Its passing
    seeds ran the same known defect.
    """
    mark = "*" if entry.deviations else ""
    return (
        f"{entry.framework}/{entry.implementation}{mark} {entry.case} "
        f"seed {entry.worst_seed}"
    )


def print_items(figures: list[Figures]) -> None:
    print(
        "framework/implementation dtype case quantity: max error (u), budget (u), "
        "headroom, non-conforming seeds, deviation seeds"
    )
    for entry in figures:
        print(
            f"{entry.framework}/{entry.implementation} {entry.dtype} {entry.case} "
            f"{entry.quantity}: {format_number(entry.max_error)}, "
            f"{format_number(entry.budget)}, {format_number(entry.headroom, 2)}, "
            f"{len(entry.nonconforming)}/{entry.seeds}, "
            f"{len(entry.deviations)}/{entry.seeds}"
        )


def summarize(figures: list[Figures]) -> list[dict]:
    """Return one row per (quantity, dtype) over the passing seeds of all items.

    `tightest` is the item with the largest headroom. Its budget / error is the
    smallest of any item, so it is the factor by which the budget formula exceeds
    what correct implementations need where they need the most.
    """
    rows = []
    for quantity in error_model.QUANTITIES:
        for dtype in dtypes.DTYPES:
            group = [
                entry
                for entry in figures
                if entry.quantity == quantity and entry.dtype == dtype
            ]
            if not group:
                continue
            measured = [entry for entry in group if entry.max_error is not None]
            largest = max(measured, key=lambda entry: entry.max_error, default=None)
            tightest = max(
                measured, key=lambda entry: entry.headroom or 0.0, default=None
            )
            formulas = sorted({(entry.base, entry.growth) for entry in group})
            rows.append(
                {
                    "quantity": quantity,
                    "dtype": dtype,
                    "formulas": formulas,
                    "passing_seeds": sum(
                        entry.verdicts.get("pass", 0) for entry in group
                    ),
                    "nonconforming_seeds": sum(
                        len(entry.nonconforming) for entry in group
                    ),
                    "deviation_seeds": sum(len(entry.deviations) for entry in group),
                    "largest": largest,
                    "tightest": tightest,
                }
            )
    return rows


def looseness(entry: Figures | None) -> float | None:
    if entry is None or not entry.max_error:
        return None
    return entry.budget / entry.max_error


def print_summary(figures: list[Figures]) -> None:
    print()
    print(
        "quantity dtype [BASE + GROWTH*sqrt(L)]: passing seeds, non-conforming, "
        "deviations | largest error (u) at ..., budget there, budget/error | "
        "largest headroom at ..., budget/error there (* marks an item with "
        "known-deviation seeds)"
    )
    for row in summarize(figures):
        formulas = "; ".join(
            f"{base:g} + {growth:g}*sqrt(L)" for base, growth in row["formulas"]
        )
        largest, tightest = row["largest"], row["tightest"]
        text = (
            f"{row['quantity']} {row['dtype']} [{formulas}]: {row['passing_seeds']}, "
            f"{row['nonconforming_seeds']}, {row['deviation_seeds']}"
        )
        if largest is None:
            print(f"{text} | no passing seed")
            continue
        ratio = looseness(tightest)
        flag = " OVER 100x" if ratio is not None and ratio > LOOSENESS_LIMIT else ""
        print(
            f"{text} | {format_number(largest.max_error)} at {where(largest)} "
            f"(L = {largest.reduction_length}), {format_number(largest.budget)}, "
            f"{format_number(looseness(largest))} | "
            f"{format_number(tightest.headroom, 2)} at {where(tightest)}, "
            f"{format_number(ratio)}{flag}"
        )


def print_top_headroom(figures: list[Figures], count: int) -> None:
    measured = [entry for entry in figures if entry.headroom is not None]
    measured.sort(key=lambda entry: entry.headroom, reverse=True)
    print()
    print(
        f"largest headroom ({min(count, len(measured))} items; * marks an item "
        "with known-deviation seeds):"
    )
    for entry in measured[:count]:
        mark = "*" if entry.deviations else ""
        print(
            f"  {entry.headroom:.3f} {entry.framework}/{entry.implementation}{mark} "
            f"{entry.dtype} {entry.case} {entry.quantity}: "
            f"{format_number(entry.max_error)} u of {format_number(entry.budget)} u "
            f"(seed {entry.worst_seed}, element {entry.worst_index})"
        )


def print_nonconforming(figures: list[Figures]) -> None:
    """List every non-conforming item with its count and worst seed's message."""
    failing = [entry for entry in figures if entry.nonconforming]
    print()
    print(f"non-conforming items, no deviation covers them ({len(failing)}):")
    for entry in failing:
        worst = max(entry.nonconforming, key=lambda seed: seed["error"] or 0.0)
        seeds = ",".join(str(seed["seed"]) for seed in entry.nonconforming)
        print(
            f"  {entry.framework}/{entry.implementation} {entry.dtype} {entry.case} "
            f"{entry.quantity}: {len(entry.nonconforming)}/{entry.seeds} seeds "
            f"[{seeds}]; worst seed {worst['seed']}: {worst['message']}"
        )
    covered = [entry for entry in figures if entry.deviations]
    print()
    print(f"items with known deviations ({len(covered)}):")
    for entry in covered:
        entries = sorted({seed["entry"] for seed in entry.deviations})
        print(
            f"  {entry.framework}/{entry.implementation} {entry.dtype} {entry.case} "
            f"{entry.quantity}: {len(entry.deviations)}/{entry.seeds} seeds, "
            f"entry {', '.join(f'#{index}' for index in entries)}"
        )


def print_report(figures: list[Figures], top: int) -> None:
    print_summary(figures)
    print_top_headroom(figures, top)
    print_nonconforming(figures)


def main(argv: list[str] | None = None) -> int:
    arguments = parse_arguments(argv)
    if arguments.merge:
        try:
            environments, figures = merge(arguments.merge)
        except ValueError as error:
            print(f"calibrate: {error}", file=sys.stderr)
            return 2
        for env in environments:
            print(
                f"merged: {env['frameworks']} (Python {env['python']}, NumPy "
                f"{env['numpy']}, {env['seeds']} seeds, {env.get('wall_s')} s)"
            )
        print_report(figures, arguments.top)
        return 0

    adapters = load_adapters(arguments)
    if not adapters:
        print("calibrate: name at least one --framework or --adapter", file=sys.stderr)
        return 2
    try:
        known = deviations.load(arguments.deviations)
    except deviations.DeviationsError as error:
        print(f"calibrate: {error}", file=sys.stderr)
        return 2
    dtype_names = [dtypes.check_dtype(name) for name in arguments.dtypes.split(",")]
    selected = select_cases(arguments.cases)

    started = time.perf_counter()
    figures = []
    for adapter in adapters:
        figures += measure_adapter(
            adapter, dtype_names, selected, arguments.seeds, known
        )
    wall_s = time.perf_counter() - started

    env = environment(adapters, arguments.seeds)
    print(f"calibrate: {env['frameworks']}, {arguments.seeds} seeds, {wall_s:.1f} s")
    print_items(figures)
    print_report(figures, arguments.top)
    if arguments.json is not None:
        write_json(arguments.json, env, figures, wall_s)
    return 0


if __name__ == "__main__":
    sys.exit(main())
