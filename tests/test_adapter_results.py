"""What the suite makes of an adapter that bends the contract per item: inputs
changed in place, results holding foreign objects, dtype objects for names, and an
unsupported_reason() that raises or returns a number. Each runs with and without
worker isolation, which must agree."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.subprocess_runs import run_suite

ISOLATION = ["--isolation=process", "--isolation=none"]


def run_report(tmp_path: Path, adapter: str, *options: str) -> tuple[list, object]:
    report = tmp_path / "report.json"
    completed = run_suite(
        f"--adapter=tests.broken_adapters:{adapter}", f"--report={report}", *options
    )
    results = json.loads(report.read_text(encoding="utf-8"))["results"]
    return results, completed


def verdicts_by_case(results: list[dict]) -> dict[str, set[str]]:
    by_case: dict[str, set[str]] = {}
    for record in results:
        by_case.setdefault(record["case"], set()).add(record["verdict"])
    return by_case


@pytest.mark.parametrize("isolation", ISOLATION)
def test_input_changed_in_place_is_error(tmp_path, isolation):
    results, completed = run_report(
        tmp_path,
        "ChangesInput",
        "--dtypes=float32",
        "--cases=random-2d,random-1d,M1",
        isolation,
    )
    assert completed.returncode == 1
    assert verdicts_by_case(results) == {
        "random-2d": {"error"},
        "random-1d": {"pass"},
        "M1": {"pass"},
    }
    message = next(r["message"] for r in results if r["case"] == "random-2d")
    assert message == (
        "the adapter changed its input x in place; a kernel must leave its inputs "
        "unchanged"
    )
    # The inputs summary describes the catalogue's inputs, not the zeros.
    summary = next(r["inputs"] for r in results if r["case"] == "random-2d")
    assert summary["x"]["std"] > 0.5


@pytest.mark.parametrize("isolation", ISOLATION)
def test_foreign_output_names_its_type(tmp_path, isolation):
    results, completed = run_report(
        tmp_path, "ForeignOutput", "--dtypes=float32", "--cases=random-2d", isolation
    )
    assert completed.returncode == 1
    output = next(r for r in results if r["quantity"] == "output")
    assert output["verdict"] == "error"
    assert output["message"] == "output is a memoryview, not a NumPy array"


def test_dtype_object_read_as_its_name(tmp_path):
    results, completed = run_report(
        tmp_path, "DtypeObject", "--dtypes=float32", "--cases=random-2d"
    )
    assert completed.returncode == 0, completed.stdout[-2000:]
    assert {r["verdict"] for r in results} == {"pass"}
    assert {r["result_dtype"] for r in results} == {"float32"}


@pytest.mark.parametrize("isolation", ISOLATION)
def test_unsupported_reason_misbehaving_is_error(tmp_path, isolation):
    results, completed = run_report(
        tmp_path,
        "UnsupportedReasonRaises",
        "--dtypes=float32,float16,float64",
        "--cases=random-1d",
        isolation,
    )
    assert completed.returncode == 1
    by_dtype = {}
    for record in results:
        by_dtype.setdefault(record["dtype"], set()).add(
            (record["verdict"], record["message"])
        )
    assert by_dtype["float16"] == {
        (
            "error",
            "the adapter's unsupported_reason() raised LookupError: no table entry",
        )
    }
    assert by_dtype["float64"] == {
        (
            "error",
            "the adapter's unsupported_reason() returned 42, not a string or None",
        )
    }
    assert {verdict for verdict, _ in by_dtype["float32"]} == {"pass"}
