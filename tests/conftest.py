"""Fixtures and summary output for normconf's own tests.

The repository's top-level conftest.py loads the suite plugin. This file adds the
kill matrix: every faulty kernel in tests/faults.py judged on every catalogue case at
seed 0, computed once per session when a test requests it, and printed at the end of
the run.
"""

from __future__ import annotations

from collections.abc import Iterable

import pytest

from suites.verdicts import Record
from tests import faults

KILL_MATRIX_SEED = 0

# (fault class name, case name) -> "killed", "survived", "error", "rejected" or
# "unsupported".
KillMatrix = dict[tuple[str, str], str]
kill_matrix_key = pytest.StashKey[KillMatrix]()

MARKS = {
    "killed": "K",
    "survived": ".",
    "unsupported": "u",
    "rejected": "r",
    "error": "E",
}


def cell_outcome(records: Iterable[Record]) -> str:
    """Return "killed" if some quantity fails, "survived" if every quantity passes,
    and otherwise the first of error, rejected, unsupported that occurs."""
    verdicts = [record.verdict for record in records]
    if "fail" in verdicts:
        return "killed"
    if all(verdict == "pass" for verdict in verdicts):
        return "survived"
    for verdict in ("error", "rejected", "unsupported"):
        if verdict in verdicts:
            return verdict
    return "error"


def compute_kill_matrix(seed: int) -> KillMatrix:
    """Judge every fault on every catalogue case at `seed`, the 2^26-element one
    excepted (tests/test_faults.py runs it on its own)."""
    kernels = [fault() for fault in faults.FAULTS]
    matrix: KillMatrix = {}
    # Cases in the outer loop, so that every fault of one dtype reuses the cached
    # reference of a case.
    for case in faults.SMALL_CASES:
        for kernel in kernels:
            records = faults.run_case(kernel, case.name, seed)
            matrix[type(kernel).__name__, case.name] = cell_outcome(records.values())
    return matrix


@pytest.fixture(scope="session")
def kill_matrix(pytestconfig: pytest.Config) -> KillMatrix:
    matrix = compute_kill_matrix(KILL_MATRIX_SEED)
    pytestconfig.stash[kill_matrix_key] = matrix
    return matrix


def format_kill_matrix(matrix: KillMatrix) -> list[str]:
    """Format the matrix as text lines: one row per case, one numbered column per
    fault, then the number of cases killing each fault and a legend."""
    fault_names = list(dict.fromkeys(fault for fault, _ in matrix))
    case_names = list(dict.fromkeys(case for _, case in matrix))
    label_width = max(len(name) for name in [*case_names, "cases killing it"])
    numbers = "".join(f"{index:>3}" for index in range(1, len(fault_names) + 1))
    legend = ", ".join(f"{mark} {outcome}" for outcome, mark in MARKS.items())

    lines = [
        f"fault (column) x case (row) at seed {KILL_MATRIX_SEED}: {legend}",
        f"{'case':<{label_width}}{numbers}",
    ]
    for case in case_names:
        marks = "".join(f"{MARKS[matrix[fault, case]]:>3}" for fault in fault_names)
        lines.append(f"{case:<{label_width}}{marks}")
    kills = {
        fault: sum(matrix[fault, case] == "killed" for case in case_names)
        for fault in fault_names
    }
    counts = "".join(f"{kills[fault]:>3}" for fault in fault_names)
    lines.append(f"{'cases killing it':<{label_width}}{counts}")

    dtypes = {fault.__name__: fault.dtype for fault in faults.FAULTS}
    for index, fault in enumerate(fault_names, start=1):
        lines.append(f"{index:>3} {fault} ({dtypes.get(fault, '?')})")
    survivors = [fault for fault in fault_names if kills[fault] == 0]
    if survivors:
        lines.append(
            "every fault killed by at least one case: no, no case kills "
            + ", ".join(survivors)
        )
    else:
        lines.append("every fault killed by at least one case: yes")
    return lines


def pytest_terminal_summary(terminalreporter, config: pytest.Config) -> None:
    matrix = config.stash.get(kill_matrix_key, None)
    if matrix is None:
        return
    terminalreporter.section("fault kill matrix")
    for line in format_kill_matrix(matrix):
        terminalreporter.write_line(line)
