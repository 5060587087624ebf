"""The execution-mode axis: implementations that declare further modes run every
catalogue case in each, with the mode in the test id, the records and replay
bundles, and a mode that computes differently is judged on its own."""

from __future__ import annotations

import dataclasses
import datetime
import json

import pytest
from packaging.specifiers import SpecifierSet

from adapters.contract import (
    DEFAULT_MODE,
    ContractError,
    Implementation,
    Request,
    validate,
)
from suites import cases, deviations
from suites.verdicts import Item, build_request, item_inputs, run_item
from tests import faults
from tests.broken_adapters import Declares
from tests.subprocess_runs import run_suite


class TwoModeKernel(faults.Float32Kernel):
    """A correct float32 kernel with a second mode, "serial", that sums one
    element at a time."""

    framework = "numpy-modes"
    serial = faults.SerialSumKernel()

    def implementations(self):
        (implementation,) = super().implementations()
        return [
            Implementation(
                implementation.name,
                implementation.description,
                layouts=implementation.layouts,
                execution_modes=("serial",),
            )
        ]

    def run(self, request: Request):
        if request.execution_mode == "serial":
            return self.serial.run(request)
        return super().run(request)


class BrokenCompiledMode(TwoModeKernel):
    """Its "serial" mode drops eps, as a miscompiled graph might."""

    framework = "numpy-broken-mode"

    def run(self, request: Request):
        if request.execution_mode == "serial":
            return faults.EpsOutsideSqrt().run(request)
        return super().run(request)


@pytest.mark.parametrize(
    "modes", [("default",), ("Compile",), ("compile", "compile"), "compile"]
)
def test_invalid_modes_rejected(modes):
    implementation = Implementation("kernel", "", execution_modes=modes)
    with pytest.raises(ContractError):
        validate(Declares(implementation), "test")


def test_request_defaults_to_default_mode():
    assert Implementation("kernel", "").execution_modes == ()
    item = Item("f", "kernel", "cpu", "float32", cases.by_name("random-2d"), 0)
    assert item.execution_mode == DEFAULT_MODE
    assert build_request(item, item_inputs(item), False).execution_mode == "default"


def test_label_names_the_mode():
    case = cases.by_name("random-2d")
    item = Item("f", "kernel", "cpu", "float32", case, 0, execution_mode="serial")
    assert item.item_id == "f-kernel@serial-cpu-float32-random-2d"
    record = item.record("output", "pass", True, "")
    assert record.implementation == "kernel@serial"
    request = build_request(item, item_inputs(item), False)
    assert request.implementation == "kernel"
    assert request.execution_mode == "serial"


def test_each_mode_judged_on_its_own():
    kernel = BrokenCompiledMode()
    implementation = kernel.implementations()[0]
    case = cases.by_name("eps1e-3")
    for mode, verdict in (("default", "pass"), ("serial", "fail")):
        item = Item(
            kernel.framework, "kernel", "cpu", "float32", case, 0, execution_mode=mode
        )
        records = {r.quantity: r for r in run_item(kernel, item, implementation)}
        assert records["output"].verdict == verdict


def read(path):
    return json.loads(path.read_text(encoding="utf-8"))


def test_run_expands_modes(tmp_path):
    report = tmp_path / "report.json"
    completed = run_suite(
        "--adapter=tests.test_execution_modes:TwoModeKernel",
        "--dtypes=float32",
        "--cases=random-2d,eps1e-3",
        f"--report={report}",
        "-k",
        "test_normalization",
    )
    assert completed.returncode == 0, completed.stdout[-3000:]
    assert "4 passed" in completed.stdout
    labels = {r["implementation"] for r in read(report)["results"]}
    assert labels == {"kernel", "kernel@serial"}
    assert "test_normalization[numpy-modes-kernel@serial-cpu-float32-random-2d]" in (
        " ".join(r["command"] for r in read(report)["results"])
    )


def test_run_selects_modes(tmp_path):
    report = tmp_path / "report.json"
    completed = run_suite(
        "--adapter=tests.test_execution_modes:BrokenCompiledMode",
        "--dtypes=float32",
        "--cases=eps1e-3",
        "--execution-modes=default",
        f"--report={report}",
        "-k",
        "test_normalization",
    )
    assert completed.returncode == 0, completed.stdout[-3000:]
    assert {r["implementation"] for r in read(report)["results"]} == {"kernel"}


def test_run_fails_broken_mode_with_bundle(tmp_path):
    bundles = tmp_path / "bundles"
    completed = run_suite(
        "--adapter=tests.test_execution_modes:BrokenCompiledMode",
        "--dtypes=float32",
        "--cases=eps1e-3",
        f"--replay-dir={bundles}",
        "-k",
        "test_normalization",
    )
    assert completed.returncode == 1
    assert "1 failed, 1 passed" in completed.stdout
    (bundle,) = list(bundles.iterdir())
    metadata = read(bundle / "item.json")
    assert metadata["implementation"] == "kernel"
    assert metadata["execution_mode"] == "serial"


def test_unknown_mode_is_usage_error():
    completed = run_suite(
        "--adapter=tests.test_execution_modes:TwoModeKernel",
        "--execution-modes=compile",
    )
    assert completed.returncode == 4
    assert "--execution-modes: unknown mode compile" in completed.stderr + (
        completed.stdout
    )


def test_modes_leave_other_suites_in_default_mode(tmp_path):
    report = tmp_path / "report.json"
    completed = run_suite(
        "--adapter=tests.test_execution_modes:TwoModeKernel",
        "--dtypes=float32",
        f"--report={report}",
        "-k",
        "test_metamorphic",
    )
    assert completed.returncode == 0, completed.stdout[-3000:]
    metamorphic = [r for r in read(report)["results"] if r["case"] == "metamorphic"]
    assert metamorphic
    assert all("@" not in r["implementation"] for r in metamorphic)


def test_deviation_covers_modes_of_its_implementation():
    record = {
        "framework": "numpy-modes",
        "implementation": "kernel@serial",
        "device": "cpu",
        "dtype": "float32",
        "case": "random-2d",
        "quantity": "output",
    }
    every_mode = deviations.Deviation(
        framework="numpy-modes",
        versions=SpecifierSet(">=0"),
        reason="a test entry",
        link="docs/deviations.md",
        date=datetime.date(2026, 12, 5),
        implementations=("kernel",),
        cases=("random-2d",),
    )
    one_mode = dataclasses.replace(every_mode, implementations=("kernel@other",))
    pattern = dataclasses.replace(
        every_mode, implementations=None, cases=None, items=("numpy-modes-kernel-*",)
    )
    assert every_mode.covers(record, "1.0")
    assert pattern.covers(record, "1.0")
    assert not one_mode.covers(record, "1.0")
    assert dataclasses.replace(one_mode, implementations=("kernel@serial",)).covers(
        record, "1.0"
    )
