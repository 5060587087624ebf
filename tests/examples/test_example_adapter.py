"""The example vendor adapter in examples/normconf-example-adapter, run by its entry
point alone, and entry-point adapters that break the contract.

The example's tests need the package installed in the running interpreter
(`pip install ./examples/normconf-example-adapter`). Without it they skip, unless
NORMCONF_REQUIRE_EXAMPLE=1 makes them fail. The contract tests need nothing
installed: they register a throwaway adapter through a *.dist-info folder on
PYTHONPATH, which importlib.metadata reads as an installed distribution.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import itertools
import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest

from adapters.registry import ENTRY_POINT_GROUP
from suites import cases, dtypes
from tests.subprocess_runs import run_suite

USAGE_ERROR = 4
DISTRIBUTION = "normconf-example-adapter"
ENTRY_POINT = "example-backend"
FRAMEWORK = "example-backend"

# The modules the built-in adapters import. A module of the same name that raises
# ImportError hides a framework that is installed, so that only entry-point
# adapters run wherever these tests run.
FRAMEWORK_MODULES = ("torch", "onnxruntime", "onnx", "tensorflow", "keras", "mxnet")


def hide_builtin_frameworks(folder: Path) -> Path:
    """Write a module into `folder` for each framework the built-in adapters import,
    each raising ImportError. Returns `folder`, for PYTHONPATH."""
    for name in FRAMEWORK_MODULES:
        (folder / f"{name}.py").write_text(
            f"raise ImportError('{name} hidden by test_example_adapter')\n",
            encoding="utf-8",
        )
    return folder


@pytest.fixture(scope="module")
def example_installed() -> None:
    """Skip the test, or fail it under NORMCONF_REQUIRE_EXAMPLE=1, when the example
    package is not installed."""
    try:
        importlib.metadata.distribution(DISTRIBUTION)
        return
    except importlib.metadata.PackageNotFoundError:
        pass
    # Outside the except block, so that the message comes without a traceback.
    message = (
        f"{DISTRIBUTION} is not installed in {sys.prefix}; install it with "
        "`pip install ./examples/normconf-example-adapter` from the repository root"
    )
    if os.environ.get("NORMCONF_REQUIRE_EXAMPLE") == "1":
        pytest.fail(f"NORMCONF_REQUIRE_EXAMPLE=1, but {message}", pytrace=False)
    pytest.skip(message)


def expected_verdict(record: dict) -> str:
    """Return the verdict the example adapter should get for a report record."""
    if record["dtype"] == "float64":
        return "unsupported"
    if record["device"] == "npu":
        return "unsupported"
    # A case the dtype cannot hold (large-mean-1e6 in float16), or one posed in
    # other dtypes only.
    if cases.by_name(record["case"]).unfit_reason(record["dtype"]) is not None:
        return "unsupported"
    if record["implementation"] == "inference":
        if record["quantity"] != "output":
            return "unsupported"
        if cases.by_name(record["case"]).layout == "channels_last":
            return "unsupported"
    if record["case"] == "N0":
        return "rejected"
    return "pass"


@pytest.fixture(scope="module")
def entry_point_run(example_installed, tmp_path_factory):
    """Run the whole catalogue with no --framework and no --adapter. Returns the
    completed process and the JSON report."""
    folder = tmp_path_factory.mktemp("example-run")
    report = folder / "report.json"
    completed = run_suite(
        f"--report={report}", python_path=hide_builtin_frameworks(folder)
    )
    document = None
    if report.exists():
        document = json.loads(report.read_text(encoding="utf-8"))
    return completed, document


@pytest.mark.usefixtures("example_installed")
def test_example_registers_entry_point():
    points = importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)
    assert ENTRY_POINT in points.names


def test_example_run_exits_zero(entry_point_run):
    completed, document = entry_point_run
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr
    assert document is not None


def test_example_is_only_framework_run(entry_point_run):
    _, document = entry_point_run
    frameworks = {record["framework"] for record in document["results"]}
    assert frameworks == {FRAMEWORK}
    environment = document["environment"]["frameworks"]
    loaded = [name for name, entry in environment.items() if "missing" not in entry]
    assert loaded == [FRAMEWORK]


def catalogue_records(document: dict) -> list[dict]:
    """Return the records of catalogue items, without the metamorphic suite's."""
    return [r for r in document["results"] if r["case"] != "metamorphic"]


def test_example_runs_whole_catalogue(entry_point_run):
    _, document = entry_point_run
    items = {
        (r["implementation"], r["device"], r["dtype"], r["case"])
        for r in catalogue_records(document)
    }
    expected = set(
        itertools.product(
            ("fused", "inference"),
            ("cpu", "npu"),
            dtypes.DTYPES,
            [case.name for case in cases.CATALOGUE],
        )
    )
    assert items == expected


def test_example_verdicts(entry_point_run):
    _, document = entry_point_run
    unexpected = [
        f"{r['implementation']}-{r['device']}-{r['dtype']}-{r['case']} "
        f"{r['quantity']}: {r['verdict']}, expected {expected_verdict(r)}: "
        f"{r['message']}"
        for r in catalogue_records(document)
        if r["verdict"] != expected_verdict(r)
    ]
    assert unexpected == []
    verdicts = {record["verdict"] for record in document["results"]}
    assert verdicts == {"pass", "rejected", "unsupported"}


def test_example_satisfies_relations(entry_point_run):
    _, document = entry_point_run
    relations = [r for r in document["results"] if r["case"] == "metamorphic"]
    assert relations
    broken = [r["message"] for r in relations if not r["conforming"]]
    assert not broken


def test_example_declares_compute_dtype_and_eps(entry_point_run):
    _, document = entry_point_run
    ran = [r for r in catalogue_records(document) if r["verdict"] == "pass"]
    assert {r["compute_dtype"] for r in ran} == {"float32"}
    eps1e3 = [r for r in ran if r["case"] == "eps1e-3"]
    assert eps1e3
    assert {r["eps"] for r in eps1e3} == {float(np.float32(1e-3))}


def test_example_named_in_header(entry_point_run):
    completed, document = entry_point_run
    version = document["environment"]["frameworks"][FRAMEWORK]["version"]
    header = f"normconf: {FRAMEWORK} {version}: devices cpu; npu unavailable ("
    assert header in completed.stdout


@pytest.mark.usefixtures("example_installed")
def test_example_bfloat16_rounds_to_nearest_even():
    backend = importlib.import_module("normconf_example_adapter.backend")
    words = np.random.default_rng(0).integers(0, 2**32, 100_000, dtype=np.uint64)
    edges = [0.0, -0.0, 1 + 2**-8, 1 + 3 * 2**-8, 3.4028235e38, np.inf, np.nan]
    values = np.concatenate(
        [words.astype(np.uint32).view(np.float32), np.array(edges, np.float32)]
    )
    got = backend.to_float(backend._narrow(values, "bfloat16", "cpu"))
    with np.errstate(invalid="ignore"):
        expected = dtypes.round_to(values.astype(np.float64), "bfloat16")
    assert np.array_equal(np.isnan(got), np.isnan(expected))
    finite_or_infinite = ~np.isnan(expected)
    assert np.array_equal(
        got[finite_or_infinite].view(np.uint32),
        expected[finite_or_infinite].view(np.uint32),
    )


def install_trial_adapter(folder: Path, source: str) -> str:
    """Register `source`'s class Trial under the entry point group, through a
    module and a *.dist-info folder in `folder`. Returns the adapter's spec."""
    (folder / "trial_adapter.py").write_text(source, encoding="utf-8")
    metadata = folder / "trial_adapter-0.dist-info"
    metadata.mkdir()
    (metadata / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: trial-adapter\nVersion: 0\n", encoding="utf-8"
    )
    spec = "trial_adapter:Trial"
    (metadata / "entry_points.txt").write_text(
        f"[{ENTRY_POINT_GROUP}]\ntrial = {spec}\n", encoding="utf-8"
    )
    return spec


NEWER_CONTRACT = """\
from tests.faults import Float32Kernel

class Trial(Float32Kernel):
    framework = "trial"
    contract_version = 2
"""

NO_RUN_METHOD = """\
from adapters.contract import Device, Implementation

class Trial:
    contract_version = 1
    framework = "trial"

    def version(self):
        return "1.0"

    def implementations(self):
        return [Implementation("kernel", "a kernel without run()")]

    def devices(self):
        return [Device("cpu")]
"""


def test_trial_dist_info_is_found(tmp_path):
    spec = install_trial_adapter(tmp_path, NEWER_CONTRACT)
    distributions = importlib.metadata.distributions(path=[str(tmp_path)])
    points = [point for d in distributions for point in d.entry_points]
    assert [(point.group, point.value) for point in points] == [
        (ENTRY_POINT_GROUP, spec)
    ]


@pytest.mark.parametrize(
    "source, message",
    [
        (NEWER_CONTRACT, "declares contract_version 2"),
        (NO_RUN_METHOD, "lacks the required method run()"),
    ],
    ids=["contract-version", "missing-run"],
)
def test_broken_entry_point_usage_error(tmp_path, source, message):
    spec = install_trial_adapter(tmp_path, source)
    completed = run_suite(python_path=hide_builtin_frameworks(tmp_path))
    assert completed.returncode == USAGE_ERROR, completed.stdout[-2000:]
    lines = [line for line in completed.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, completed.stderr
    assert lines[0].startswith(
        f"ERROR: adapter {spec} (entry point 'trial' in group {ENTRY_POINT_GROUP}) "
    )
    assert message in lines[0]
    assert "collected" not in completed.stdout
    assert "Traceback" not in completed.stdout + completed.stderr
