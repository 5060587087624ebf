"""Measure normconf's own cost: the same items through the suite and as a bare loop.

    python benchmarks/speed.py [--frameworks LIST] [--repeat N] [--isolation MODE]
        [--cases LIST] [--dtypes LIST] [--json PATH]

For each installed built-in framework, in one process, one after the other and
repeated, it runs every CPU item the adapter supports two ways:

- through normconf: `pytest suites --framework NAME --devices cpu` in this process,
  with the report written, so each item pays for the pytest item, the adapter
  call (in a worker process unless --isolation none), the reference, the error
  model and the report record;
- as a bare loop: the run() of a newly loaded adapter on requests built
  beforehand. That is the framework's own work and nothing else: inputs converted
  to its tensors, forward and backward, results converted back, and set-up such as
  ONNX Runtime sessions.

It prints, per framework, the items that ran, items per second both ways and the
ratio of normconf's time to the bare loop's. The ratio compares the item loops
without their first item: in normconf that item also starts the worker process and
imports the framework there, and in both it pays for the framework's first calls.
`with startup` compares the whole pytest run, collection, adapter loading and the
first item included, with the whole bare loop. It also prints the peak resident
memory of this process and of the largest worker process. Before the measured
repeats, one round of both ways warms the framework and is discarded; the figures
are medians over the repeats.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import pytest  # noqa: E402

from adapters import registry  # noqa: E402
from adapters.contract import Rejected  # noqa: E402
from suites import cases, dtypes, isolation, report, verdicts  # noqa: E402
from suites.verdicts import Item, build_request, unsupported_reason  # noqa: E402

TARGET_RATIO = 1.3


@dataclass
class Figures:
    """One framework's measurements, in seconds and items per second."""

    framework: str
    version: str
    items: int
    # The item loops without their first item, and the whole bare loop.
    bare_s: float
    whole_bare_s: float
    loop_s: float
    # The whole pytest run.
    session_s: float
    # Milliseconds per item of each part of normconf's item time (PARTS), from
    # one more run with those parts timed.
    parts_ms: dict[str, float]

    @property
    def bare_rate(self) -> float:
        return (self.items - 1) / self.bare_s

    @property
    def loop_rate(self) -> float:
        return (self.items - 1) / self.loop_s

    @property
    def loop_ratio(self) -> float:
        return self.loop_s / self.bare_s

    @property
    def session_ratio(self) -> float:
        return self.session_s / self.whole_bare_s


class Stopwatch:
    """Accumulates the time spent inside chosen functions while installed.

    `wrap(owner, name, part)` replaces owner.name with a timed copy; `remove()`
    puts every original back. Nested parts (the reference inside the judging)
    are subtracted from the part that encloses them, so the parts add up.
    """

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self._patched: list[tuple[object, str, object]] = []
        self._stack: list[float] = []

    def wrap(self, owner: object, name: str, part: str) -> None:
        original = getattr(owner, name)
        stack = self._stack
        seconds = self.seconds

        def timed(*args, **kwargs):
            stack.append(0.0)
            start = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                spent = time.perf_counter() - start
                inner = stack.pop()
                seconds[part] = seconds.get(part, 0.0) + spent - inner
                if stack:
                    stack[-1] += spent

        for attribute in ("cache_clear", "cache_info"):
            if hasattr(original, attribute):
                setattr(timed, attribute, getattr(original, attribute))
        self._patched.append((owner, name, original))
        setattr(owner, name, timed)

    def remove(self) -> None:
        for owner, name, original in reversed(self._patched):
            setattr(owner, name, original)
        self._patched.clear()


# The parts of an item's time, in the order the table prints them. `adapter` is
# the call to the adapter's run(), with the crossing to its worker.
PARTS = ("adapter", "inputs", "reference", "judging", "records", "pytest")


class ItemClock:
    """A pytest plugin that times the item loop after its first item: from the
    first item's end to the last item's end. With a stopwatch, it also keeps the
    stopwatch's parts and the items' own time as they were when the first item
    ended, so that the breakdown can leave the first item out as the ratio does."""

    def __init__(self, stopwatch: Stopwatch | None = None) -> None:
        self.first_end: float | None = None
        self.last_end: float | None = None
        self.stopwatch = stopwatch
        self.first_parts: dict[str, float] = {}
        # The items' own time, logstart to logfinish, over all and the first.
        self.item_seconds = 0.0
        self.first_item_seconds = 0.0
        self.items = 0
        self._start = 0.0

    def pytest_runtest_logstart(self, nodeid, location) -> None:
        self._start = time.perf_counter()
        self.items += 1

    def pytest_runtest_logfinish(self, nodeid, location) -> None:
        now = time.perf_counter()
        self.item_seconds += now - self._start
        if self.first_end is None:
            self.first_end = now
            self.first_item_seconds = self.item_seconds
            if self.stopwatch is not None:
                self.first_parts = dict(self.stopwatch.seconds)
        self.last_end = now


def install_stopwatch(stopwatch: Stopwatch) -> None:
    """Time normconf's parts of each item: the suite's functions are looked up
    through their modules at call time, so wrapping the module attributes
    reaches every call."""
    from suites import test_normalization

    stopwatch.wrap(verdicts, "materialize", "inputs")
    stopwatch.wrap(verdicts, "catalogue_reference", "reference")
    # The pieces of a case larger than CHUNK_ELEMENTS, computed for each item.
    stopwatch.wrap(verdicts, "reference_from_inputs", "reference")
    stopwatch.wrap(verdicts, "judge_result", "judging")
    stopwatch.wrap(verdicts.isolation, "input_snapshot", "judging")
    stopwatch.wrap(test_normalization, "record_verdicts", "records")
    stopwatch.wrap(test_normalization, "rerun_command", "records")
    stopwatch.wrap(verdicts, "build_request", "adapter")
    stopwatch.wrap(verdicts, "_run", "adapter")


def breakdown(framework: str, arguments: argparse.Namespace) -> dict[str, float]:
    """Run the suite once more with normconf's parts timed, and return each part's
    seconds per pytest item after the first, as the ratio counts them.

    `pytest` is the rest of the items' time. It covers pytest's protocol (setup,
    call and teardown with their reports and hooks), the fixtures and the test
    function's own lines.
    """
    stopwatch = Stopwatch()
    install_stopwatch(stopwatch)
    try:
        clock = through_normconf(framework, arguments, stopwatch=stopwatch)
    finally:
        stopwatch.remove()
    items = clock.items - 1
    parts = {
        part: stopwatch.seconds.get(part, 0.0) - clock.first_parts.get(part, 0.0)
        for part in PARTS[:-1]
    }
    rest = clock.item_seconds - clock.first_item_seconds
    parts["pytest"] = rest - sum(parts.values())
    return {part: parts[part] / items for part in PARTS}


def cpu_items(adapter: object, selected_cases, selected_dtypes) -> list[tuple]:
    """Return (item, implementation) for every CPU item the adapter runs."""
    devices = {device.name: device for device in adapter.devices()}
    cpu = devices["cpu"]
    chosen = []
    for implementation in adapter.implementations():
        for dtype in selected_dtypes:
            for case in selected_cases:
                item = Item(
                    adapter.framework, implementation.name, "cpu", dtype, case, 0
                )
                if unsupported_reason(adapter, implementation, cpu, item) is None:
                    chosen.append((item, implementation))
    return chosen


def bare_loop(adapter: object, items: list[tuple]) -> tuple[float, float]:
    """Return the seconds the adapter's run() takes over the items after the
    first, and over all of them, with every request built beforehand."""
    requests = [
        build_request(
            item,
            cases.materialize(item.case, item.dtype, item.seed),
            implementation.gradients,
        )
        for item, implementation in items
    ]
    start = time.perf_counter()
    first_end = None
    for request in requests:
        try:
            adapter.run(request)
        except Rejected:
            pass
        if first_end is None:
            first_end = time.perf_counter()
    end = time.perf_counter()
    return end - first_end, end - start


def clear_caches() -> None:
    """Forget the inputs and references, so that each normconf run computes them
    as a fresh run does."""
    cases.materialize.cache_clear()
    cases._cached_float64.cache_clear()
    verdicts.catalogue_reference.cache_clear()
    report.cached_inputs_summary.cache_clear()
    report.cached_worst_slice.cache_clear()


def through_normconf(
    framework: str,
    arguments: argparse.Namespace,
    stopwatch: Stopwatch | None = None,
):
    """Run the suite for the framework in this process; return the seconds of the
    item loop and of the whole pytest run, or with a stopwatch, the ItemClock."""
    clear_caches()
    clock = ItemClock(stopwatch)
    with tempfile.TemporaryDirectory() as folder:
        options = [
            str(ROOT / "suites"),
            f"--framework={framework}",
            "--devices=cpu",
            f"--isolation={arguments.isolation}",
            f"--report={Path(folder) / 'report.json'}",
            "-q",
            "-p",
            "no:cacheprovider",
        ]
        if arguments.cases:
            options.append(f"--cases={arguments.cases}")
        options.append(f"--dtypes={','.join(arguments.dtype_list)}")
        start = time.perf_counter()
        status = pytest.main(options, plugins=[clock])
        session = time.perf_counter() - start
    if status not in (pytest.ExitCode.OK, pytest.ExitCode.TESTS_FAILED):
        raise SystemExit(f"the {framework} run stopped with exit status {status}")
    if stopwatch is not None:
        return clock
    return clock.last_end - clock.first_end, session


def measure(framework: str, arguments: argparse.Namespace) -> Figures | None:
    try:
        adapter = registry.load_builtin(framework)
    except registry.AdapterLoadError as error:
        print(f"{framework}: skipped ({error})", file=sys.stderr)
        return None
    selected_cases = (
        [cases.by_name(name) for name in arguments.cases.split(",")]
        if arguments.cases
        else list(cases.CATALOGUE)
    )
    items = cpu_items(adapter, selected_cases, arguments.dtype_list)
    if len(items) < 2:
        print(
            f"{framework}: skipped (it runs {len(items)} of the selected items; the "
            "ratio needs at least 2)",
            file=sys.stderr,
        )
        return None
    bare, whole_bare, loops, sessions = [], [], [], []
    # The first round warms the framework and is not counted.
    for round_number in range(arguments.repeat + 1):
        # A new adapter each time, as each normconf run loads one: set-up that
        # an adapter caches (ONNX Runtime sessions) is paid by both ways alike.
        loop_bare, all_bare = bare_loop(registry.load_builtin(framework), items)
        loop, session = through_normconf(framework, arguments)
        if round_number == 0:
            continue
        bare.append(loop_bare)
        whole_bare.append(all_bare)
        loops.append(loop)
        sessions.append(session)
    parts = breakdown(framework, arguments)
    return Figures(
        framework=framework,
        version=adapter.version(),
        items=len(items),
        bare_s=statistics.median(bare),
        whole_bare_s=statistics.median(whole_bare),
        loop_s=statistics.median(loops),
        session_s=statistics.median(sessions),
        parts_ms={part: seconds * 1000 for part, seconds in parts.items()},
    )


def peak_mib() -> float:
    """Return the peak resident memory of this process in MiB (Linux reports
    ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def print_table(figures: list[Figures]) -> None:
    header = (
        f"{'framework':<22}{'items':>7}{'bare items/s':>14}{'normconf items/s':>18}"
        f"{'ratio':>7}{'with startup':>14}"
    )
    print(header)
    print("-" * len(header))
    for entry in figures:
        print(
            f"{entry.framework + ' ' + entry.version:<22}{entry.items:>7}"
            f"{entry.bare_rate:>14.1f}{entry.loop_rate:>18.1f}"
            f"{entry.loop_ratio:>7.2f}{entry.session_ratio:>14.2f}"
        )
    print(
        "ratio: normconf's item loop / the bare loop, both without their first item "
        f"(target {TARGET_RATIO}); with startup: the whole pytest run / the whole "
        "bare loop"
    )
    print()
    print(
        "where an item's time goes, in ms per pytest item after the first, skipped "
        "items included (one more run, parts timed):"
    )
    header = f"{'framework':<22}{'bare':>8}" + "".join(f"{p:>11}" for p in PARTS)
    print(header)
    print("-" * len(header))
    for entry in figures:
        bare_ms = entry.bare_s / (entry.items - 1) * 1000
        print(
            f"{entry.framework + ' ' + entry.version:<22}{bare_ms:>8.3f}"
            + "".join(f"{entry.parts_ms[part]:>11.3f}" for part in PARTS)
        )
    print(
        "bare: the bare loop's time per item; adapter: run() through normconf, "
        "with the crossing to the worker under --isolation process; inputs, "
        "reference: computing them (cached per case and dtype, but for the pieces "
        "of the 2^26-element case); judging: "
        "the error model; records: report rows, input summaries and rerun "
        "commands; pytest: the rest of the item"
    )
    print(f"peak resident memory: this process {peak_mib():.0f} MiB")
    workers = max(isolation.WORKER_PEAKS_MIB, default=None)
    if workers is not None:
        print(f"peak resident memory: largest worker process {workers} MiB")


def names(value: str) -> list[str]:
    """Split a comma-separated list, dropping empty names and repeats."""
    parts = (name.strip() for name in value.split(","))
    return list(dict.fromkeys(name for name in parts if name))


def check_frameworks(parser: argparse.ArgumentParser, value: str) -> list[str]:
    """Return the built-in frameworks named in `value`, or stop with a usage error
    on an unknown name or an empty list."""
    chosen = names(value)
    unknown = [name for name in chosen if name not in registry.BUILTIN]
    if unknown or not chosen:
        parser.error(
            f"--frameworks: unknown framework {', '.join(unknown) or '(none given)'}; "
            f"built-in frameworks: {', '.join(sorted(registry.BUILTIN))}"
        )
    return chosen


def check_cases(parser: argparse.ArgumentParser, value: str) -> str:
    """Return the catalogue cases named in `value`, comma-separated, or stop with a
    usage error on an unknown name or an empty list."""
    chosen = names(value)
    if not chosen:
        parser.error("--cases: the list is empty")
    for name in chosen:
        try:
            cases.by_name(name)
        except KeyError as error:
            parser.error(f"--cases: {error.args[0]}")
    return ",".join(chosen)


def check_json(parser: argparse.ArgumentParser, path: Path | None) -> None:
    """Stop with a usage error when --json names a folder or a file in a folder
    that does not exist."""
    if path is None:
        return
    if not path.parent.is_dir():
        parser.error(f"--json: the folder of {path} does not exist")
    if path.is_dir():
        parser.error(f"--json: {path} is a folder; give a file name")


def check_arguments(parser: argparse.ArgumentParser, arguments) -> None:
    """Stop with a usage error (exit status 2) on a value the run cannot use."""
    if arguments.repeat < 1:
        parser.error("--repeat must be at least 1")
    arguments.framework_list = check_frameworks(parser, arguments.frameworks)
    arguments.dtype_list = names(arguments.dtypes)
    if not arguments.dtype_list:
        parser.error("--dtypes: the list is empty")
    for name in arguments.dtype_list:
        try:
            dtypes.check_dtype(name)
        except ValueError as error:
            parser.error(f"--dtypes: {error}")
    if arguments.cases is not None:
        arguments.cases = check_cases(parser, arguments.cases)
    check_json(parser, arguments.json)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python benchmarks/speed.py", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument(
        "--frameworks",
        default=",".join(sorted(registry.BUILTIN)),
        help="comma-separated built-in frameworks; those not installed are skipped",
    )
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--isolation", choices=("process", "none"), default="process")
    parser.add_argument("--cases", default=None, help="comma-separated case names")
    parser.add_argument("--dtypes", default=",".join(dtypes.DTYPES))
    parser.add_argument("--json", type=Path, default=None, help="also write JSON")
    arguments = parser.parse_args(argv)
    check_arguments(parser, arguments)

    figures = []
    for framework in arguments.framework_list:
        entry = measure(framework, arguments)
        if entry is not None:
            figures.append(entry)
    if not figures:
        print("no framework to measure", file=sys.stderr)
        return 1
    print()
    print(
        f"normconf speed, --isolation {arguments.isolation}, "
        f"median of {arguments.repeat} runs"
    )
    print_table(figures)
    if arguments.json is not None:
        document = {
            "isolation": arguments.isolation,
            "repeat": arguments.repeat,
            "peak_rss_mib": peak_mib(),
            "peak_worker_rss_mib": max(isolation.WORKER_PEAKS_MIB, default=None),
            "figures": [asdict(entry) for entry in figures],
        }
        arguments.json.write_text(json.dumps(document, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
