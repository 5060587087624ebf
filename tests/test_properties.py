"""The property-based suite: what it draws, the catalogue entry it prints, and a run
that finds a defect in a faulty adapter and passes a correct one."""

from __future__ import annotations

import json
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from suites import cases, properties
from tests.subprocess_runs import run_suite

OPERATORS = ("instance_norm", "group_norm", "layer_norm", "batch_norm")
LAYOUTS = ("channels_first", "channels_last")


@settings(max_examples=200, deadline=None, database=None)
@given(data=st.data(), operator=st.sampled_from(OPERATORS), deep=st.booleans())
def test_drawn_examples_are_valid_cases(data, operator, deep):
    example = data.draw(
        properties.examples(operator, LAYOUTS, ("float32", "float16"), deep)
    )
    case = example.case
    configured = case.operator(operator)
    view = configured.view_shape(case.shape)
    slice_length = 1
    for axis in configured.axes(case.shape):
        slice_length *= view[axis]
    assert case.elements <= properties.MAX_ELEMENTS
    assert case.eps > 0
    assert case.rejection_allowed == (slice_length == 1)
    if operator == "layer_norm":
        assert case.layout == "channels_first"
    if not deep:
        assert abs(case.x.loc) <= case.x.scale
        assert slice_length <= properties.CI_MAX_SLICE


def test_catalogue_entry_rebuilds_the_case():
    case = cases.Case(
        "property-17",
        "property",
        "found",
        (1, 4, 3),
        eps=1e-3,
        affine=False,
        x=cases.Normal(10.0, 0.5),
        gamma=cases.Uniform(-1.5, 1.5),
        layout="channels_last",
        groups=2,
        rejection_allowed=True,
        rejection_reason=cases.M1_REASON,
    )
    text = properties.catalogue_entry(case, 3, "found")
    assert text.startswith("# found with --seed=3")
    namespace = {name: getattr(cases, name) for name in dir(cases)}
    rebuilt = eval(text.split("\n", 1)[1].rstrip(","), namespace)  # noqa: S307
    assert rebuilt == case


def test_fault_found_and_shrunk(tmp_path):
    completed = run_suite(
        "--adapter=tests.family_faults:GroupsIgnored",
        "--dtypes=float32",
        f"--replay-dir={tmp_path}",
        "-k",
        "test_properties and group_norm",
    )
    assert completed.returncode == 1, completed.stdout[-3000:]
    output = completed.stdout
    assert "smallest failing example: numpy-family-group_norm.kernel" in output
    assert "catalogue entry to add to suites/cases.py:" in output

    match = re.search(r"replay the bundle: python -m suites.replay (\S+)", output)
    assert match, output[-3000:]
    metadata = json.loads(
        (
            tmp_path / "properties" / match.group(1).rsplit("/", 1)[1] / "item.json"
        ).read_text(encoding="utf-8")
    )
    assert metadata["op"] == "group_norm"
    # Ignoring the groups matters only with two or more channels per group.
    assert metadata["groups"] < metadata["shape"][1]


@pytest.mark.parametrize("kernel", ["FamilyKernel"])
def test_correct_kernel_passes_properties(kernel):
    completed = run_suite(
        f"--adapter=tests.family_faults:{kernel}",
        "--dtypes=float32",
        "-k",
        "test_properties",
    )
    assert completed.returncode == 0, completed.stdout[-3000:]
    assert "3 passed" in completed.stdout


def test_cases_option_runs_no_properties():
    completed = run_suite(
        "--adapter=tests.family_faults:FamilyKernel",
        "--cases=random-2d",
        "-k",
        "test_properties",
        "-rs",
    )
    assert completed.returncode == 0, completed.stdout[-3000:]
    assert "1 skipped" in completed.stdout
    assert "property tests draw theirs" in completed.stdout


def test_failure_reaches_the_report(tmp_path):
    report = tmp_path / "report.json"
    completed = run_suite(
        "--adapter=tests.family_faults:LastAxisOnly",
        "--dtypes=float32",
        f"--report={report}",
        "-k",
        "test_properties and layer_norm",
    )
    assert completed.returncode == 1, completed.stdout[-3000:]
    document = json.loads(report.read_text(encoding="utf-8"))
    failing = [r for r in document["results"] if not r["conforming"]]
    assert failing
    assert {r["case"].split("-")[0] for r in failing} == {"property"}
    command = failing[0]["command"]
    assert "--adapter=tests.family_faults:LastAxisOnly" in command
    assert "--properties=ci" in command
    # Property tests stay out of the item count, so the run is complete.
    assert document["run"]["complete"] is True


def test_zero_examples_is_a_usage_error():
    completed = run_suite(
        "--adapter=tests.family_faults:FamilyKernel", "--property-examples=0"
    )
    assert completed.returncode == 4
    assert "--property-examples must be a positive number" in completed.stderr
