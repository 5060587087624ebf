"""Measure the peak resident memory of a pytest run of the long-reduction cases.

    python benchmarks/memory.py [--frameworks LIST] [--isolation MODES]
        [--cases LIST] [--limit-mib N] [--json PATH]

For each installed built-in framework and each isolation mode, it starts a new
Python process that runs `pytest suites --framework NAME --devices cpu --cases
LIST` and nothing else. A new process per run means that no earlier run's memory
counts. It then prints the peak resident memory of that pytest process and of its
largest adapter worker process (with --isolation process), their sum, and whether
the pytest process stayed within the limit (4096 MiB by default). It prints
figures and asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

DEFAULT_CASES = "long-reduction,long-reduction-dy-mean,long-reduction-2e26"
LIMIT_MIB = 4096


def child(options: list[str]) -> int:
    """Run pytest with the options in this process. Then print one JSON line: its
    exit status, and its own and its workers' peak resident memory in MiB."""
    import resource

    import pytest

    from suites import isolation

    status = pytest.main(options)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(
        json.dumps(
            {
                "status": int(status),
                "pytest_mib": round(peak),
                "worker_mib": max(isolation.WORKER_PEAKS_MIB, default=0),
            }
        )
    )
    return 0


def measure(framework: str, isolation: str, cases: str) -> dict:
    """Run the cases for the framework in a new process; return its figures."""
    options = [
        str(ROOT / "suites"),
        f"--framework={framework}",
        "--devices=cpu",
        f"--cases={cases}",
        f"--isolation={isolation}",
        "-q",
        "-p",
        "no:cacheprovider",
    ]

    start = time.perf_counter()
    done = subprocess.run(
        [sys.executable, __file__, "--child", json.dumps(options)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        check=False,
    )
    seconds = time.perf_counter() - start

    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    figures = json.loads(lines[-1]) if lines else {}
    # pytest's exit status 1 means some item failed, which is a verdict; any
    # other but 0 means the run did not happen as asked.
    if done.returncode != 0 or figures.get("status") not in (0, 1):
        raise SystemExit(
            f"the {framework} run with --isolation {isolation} failed (pytest exit "
            f"status {figures.get('status')}, process exit status "
            f"{done.returncode}):\n{done.stdout[-2000:]}{done.stderr[-2000:]}"
        )
    figures.update(framework=framework, isolation=isolation, seconds=seconds)
    return figures


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--child"]:
        return child(json.loads(argv[1]))

    from adapters import registry
    from benchmarks.speed import check_cases, check_frameworks, check_json, names

    parser = argparse.ArgumentParser(
        prog="python benchmarks/memory.py", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument(
        "--frameworks",
        default=",".join(sorted(registry.BUILTIN)),
        help="comma-separated built-in frameworks; those not installed are skipped",
    )
    parser.add_argument("--isolation", default="process,none")
    parser.add_argument("--cases", default=DEFAULT_CASES)
    parser.add_argument("--limit-mib", type=int, default=LIMIT_MIB)
    parser.add_argument("--json", type=Path, default=None, help="also write JSON")
    arguments = parser.parse_args(argv)
    modes = names(arguments.isolation)
    if not modes:
        parser.error("--isolation: the list is empty")
    for mode in modes:
        if mode not in ("process", "none"):
            parser.error(f"--isolation: {mode!r} is not process or none")
    frameworks = check_frameworks(parser, arguments.frameworks)
    arguments.cases = check_cases(parser, arguments.cases)
    if arguments.limit_mib < 1:
        parser.error("--limit-mib must be at least 1")
    check_json(parser, arguments.json)

    results = []
    for framework in frameworks:
        try:
            registry.load_builtin(framework)
        except registry.AdapterLoadError as error:
            print(f"{framework}: skipped ({error})", file=sys.stderr)
            continue
        for mode in modes:
            results.append(measure(framework, mode, arguments.cases))
    if not results:
        print("no framework to measure", file=sys.stderr)
        return 1

    print(f"peak resident memory of pytest runs of --cases {arguments.cases}, in MiB")
    header = (
        f"{'framework':<22}{'isolation':>10}{'pytest':>8}{'worker':>8}{'sum':>8}"
        f"{'pytest <= limit':>17}{'seconds':>9}"
    )
    print(header)
    print("-" * len(header))
    for entry in results:
        total = entry["pytest_mib"] + entry["worker_mib"]
        verdict = "yes" if entry["pytest_mib"] <= arguments.limit_mib else "NO"
        print(
            f"{entry['framework']:<22}{entry['isolation']:>10}{entry['pytest_mib']:>8}"
            f"{entry['worker_mib']:>8}{total:>8}{verdict:>17}{entry['seconds']:>9.1f}"
        )
    print(
        "pytest: the pytest process's peak; worker: its largest adapter worker's "
        "peak (0 without isolation); sum: both, which counts twice the memory-mapped "
        "files that carry arrays between them; pytest <= limit: whether the pytest "
        f"process stayed within {arguments.limit_mib} MiB"
    )
    if arguments.json is not None:
        arguments.json.write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
