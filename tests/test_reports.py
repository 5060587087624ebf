"""Tests of suites/reports.py: merging reports, the Markdown summary and the diff.

The input reports are real ones, written by the conformance suite in a subprocess
with the NumPy kernels from tests/faults.py, so these tests need no framework.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from suites import report, reports
from tests.subprocess_runs import run_suite

ROOT = Path(__file__).resolve().parents[1]


def write_suite_report(path: Path, *arguments: str) -> None:
    completed = run_suite(*arguments, f"--report={path}")
    assert path.exists(), completed.stdout[-3000:] + completed.stderr[-3000:]


@pytest.fixture(scope="module")
def suite_reports(tmp_path_factory) -> dict[str, Path]:
    """Write two single-run reports: a correct kernel that passes and a faulty one
    that fails on the large-mean case."""
    folder = tmp_path_factory.mktemp("suite-reports")
    passing = folder / "kernel.json"
    write_suite_report(
        passing, "--adapter=tests.faults:Float32Kernel", "--cases=M1,random-2d"
    )
    failing = folder / "fault.json"
    write_suite_report(
        failing,
        "--adapter=tests.faults:OnePassVariance",
        "--dtypes=float32",
        "--cases=large-mean-1e4,random-2d",
    )
    return {"kernel": passing, "fault": failing}


@pytest.fixture
def workdir(tmp_path, monkeypatch, suite_reports) -> Path:
    """A working directory with copies of the suite reports, so that sources are
    named by their relative paths."""
    for name, path in suite_reports.items():
        shutil.copy(path, tmp_path / f"{name}.json")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def read(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


def write(path: Path, document: object) -> Path:
    path.write_text(json.dumps(document), encoding="utf-8")
    return path


def run_merge(capsys, *arguments: str) -> tuple[int, str]:
    status = reports.main(["merge", *arguments])
    return status, capsys.readouterr().err


def record_keys(document: dict) -> list[tuple]:
    return [
        tuple(record[field] for field in reports.RECORD_KEY)
        for record in document["results"]
    ]


# Merging.


def test_merge_two_reports(workdir, capsys):
    status, stderr = run_merge(
        capsys, "kernel.json", "fault.json", "--output", "merged.json"
    )
    assert status == 0, stderr

    merged = read(workdir / "merged.json")
    kernel = read(workdir / "kernel.json")
    fault = read(workdir / "fault.json")
    assert merged["schema"] == "normconf-merged-report"
    assert merged["schema_version"] == 1
    assert set(merged["sources"]) == {"kernel.json", "fault.json"}

    environment = merged["sources"]["fault.json"]["environment"]
    assert environment == fault["environment"]
    assert "fault-one-pass-variance" in environment["frameworks"]
    assert (
        "numpy-float32"
        in (merged["sources"]["kernel.json"]["environment"]["frameworks"])
    )
    assert merged["sources"]["kernel.json"]["summary"] == kernel["summary"]
    assert "stale_deviations" in merged["sources"]["kernel.json"]

    assert len(merged["results"]) == len(kernel["results"]) + len(fault["results"])
    assert len(set(record_keys(merged))) == len(merged["results"])
    for verdict, count in merged["summary"].items():
        assert count == kernel["summary"][verdict] + fault["summary"][verdict]


def test_merge_records_keep_fields(workdir, capsys):
    status, stderr = run_merge(
        capsys, "kernel.json", "fault.json", "--output", "merged.json"
    )
    assert status == 0, stderr

    merged = read(workdir / "merged.json")
    fault = read(workdir / "fault.json")
    failing = [r for r in fault["results"] if r["verdict"] == "fail"]
    assert failing
    for record in failing:
        matches = [
            r
            for r in merged["results"]
            if r["case"] == record["case"]
            and r["quantity"] == record["quantity"]
            and r["framework"] == record["framework"]
        ]
        assert matches == [{**record, "source": "fault.json"}]


def test_merge_merged_reports(workdir, capsys):
    assert run_merge(capsys, "kernel.json", "--output", "first.json")[0] == 0
    assert run_merge(capsys, "fault.json", "--output", "second.json")[0] == 0
    status, stderr = run_merge(
        capsys, "first.json", "second.json", "--output", "both.json"
    )
    assert status == 0, stderr

    both = read(workdir / "both.json")
    direct_status, _ = run_merge(
        capsys, "kernel.json", "fault.json", "--output", "direct.json"
    )
    assert direct_status == 0
    direct = read(workdir / "direct.json")
    assert set(both["sources"]) == {"kernel.json", "fault.json"}
    assert both["results"] == direct["results"]
    assert both["summary"] == direct["summary"]


def test_merge_merged_with_single(workdir, capsys):
    assert run_merge(capsys, "kernel.json", "--output", "first.json")[0] == 0
    status, stderr = run_merge(
        capsys, "first.json", "fault.json", "--output", "both.json"
    )
    assert status == 0, stderr
    sources = {record["source"] for record in read(workdir / "both.json")["results"]}
    assert sources == {"kernel.json", "fault.json"}


def test_merge_folder_skips_merged(workdir, capsys):
    folder = workdir / "reports"
    folder.mkdir()
    shutil.move(workdir / "kernel.json", folder / "kernel.json")
    shutil.move(workdir / "fault.json", folder / "fault.json")
    output = "reports/merged.json"

    assert run_merge(capsys, "reports", "--output", output)[0] == 0
    # The second merge finds the first one's output in the folder and skips it.
    status, stderr = run_merge(capsys, "reports", "--output", output)
    assert status == 0, stderr
    assert "skipping the merged report reports/merged.json" in stderr
    merged = read(workdir / output)
    assert set(merged["sources"]) == {"reports/kernel.json", "reports/fault.json"}


def test_merge_empty_folder_rejected(workdir, capsys):
    (workdir / "empty").mkdir()
    status, stderr = run_merge(capsys, "empty", "--output", "merged.json")
    assert status == 2
    assert "empty: the folder contains no single-run report" in stderr


def test_merge_renames_clashing_source(workdir, capsys):
    """Two merged reports, from two machines, may each contain a source of the
    same name when their records differ."""
    kernel = read(workdir / "kernel.json")
    float32 = [r for r in kernel["results"] if r["dtype"] == "float32"]
    others = [r for r in kernel["results"] if r["dtype"] != "float32"]
    machine_a = workdir / "a"
    machine_b = workdir / "b"
    machine_a.mkdir()
    machine_b.mkdir()
    write(machine_a / "kernel.json", {**kernel, "results": float32})
    write(machine_b / "kernel.json", {**kernel, "results": others})

    # Each merge runs inside its machine's folder, so both name the source
    # kernel.json.
    for machine in (machine_a, machine_b):
        status, stderr = run_merge(
            capsys,
            str(machine / "kernel.json"),
            "--output",
            str(machine / "merged.json"),
        )
        assert status == 0, stderr
        document = read(machine / "merged.json")
        source = next(iter(document["sources"]))
        document["sources"] = {"kernel.json": document["sources"][source]}
        for record in document["results"]:
            record["source"] = "kernel.json"
        write(machine / "merged.json", document)

    status, stderr = run_merge(
        capsys, "a/merged.json", "b/merged.json", "--output", "all.json"
    )
    assert status == 0, stderr
    merged = read(workdir / "all.json")
    assert set(merged["sources"]) == {"kernel.json", "b/merged.json:kernel.json"}
    sources = {record["source"] for record in merged["results"]}
    assert sources == set(merged["sources"])
    assert len(merged["results"]) == len(kernel["results"])


# Rejected inputs: each exits with status 2 and names the file.


def test_reject_not_json(workdir, capsys):
    (workdir / "broken.json").write_text('{"schema": "normconf-report",', "utf-8")
    status, stderr = run_merge(
        capsys, "kernel.json", "broken.json", "--output", "merged.json"
    )
    assert status == 2
    assert "broken.json: not a JSON file" in stderr
    assert not (workdir / "merged.json").exists()


def test_reject_binary_file(workdir, capsys):
    (workdir / "binary.json").write_bytes(b"\xff\xfe\x00\x01")
    status, stderr = run_merge(capsys, "binary.json", "--output", "merged.json")
    assert status == 2
    assert "binary.json: not a JSON file" in stderr


def test_reject_nan_literal(workdir, capsys):
    kernel = (workdir / "kernel.json").read_text("utf-8")
    (workdir / "loose.json").write_text(
        kernel.replace('"error": null', '"error": NaN', 1), "utf-8"
    )
    status, stderr = run_merge(capsys, "loose.json", "--output", "merged.json")
    assert status == 2
    assert "loose.json: not a JSON file" in stderr
    assert "NaN is not strict JSON" in stderr


@pytest.mark.parametrize(
    "document, expected",
    [
        ([1, 2], "not a normconf report (schema None"),
        ({"schema": "junit", "results": []}, "not a normconf report (schema 'junit'"),
        ({"results": []}, "not a normconf report (schema None"),
    ],
)
def test_reject_not_normconf(workdir, capsys, document, expected):
    write(workdir / "other.json", document)
    status, stderr = run_merge(capsys, "other.json", "--output", "merged.json")
    assert status == 2
    assert f"other.json: {expected}" in stderr


@pytest.mark.parametrize("version", [2, 0, "1", None, True, 1.5])
def test_reject_unknown_version(workdir, capsys, version):
    document = read(workdir / "kernel.json")
    document["schema_version"] = version
    write(workdir / "future.json", document)
    status, stderr = run_merge(capsys, "future.json", "--output", "merged.json")
    assert status == 2
    assert f"future.json: unknown schema_version {version!r}" in stderr


def test_reject_unknown_merged_version(workdir, capsys):
    assert run_merge(capsys, "kernel.json", "--output", "merged.json")[0] == 0
    document = read(workdir / "merged.json")
    document["schema_version"] = 2
    write(workdir / "merged.json", document)
    status, stderr = run_merge(capsys, "merged.json", "--output", "again.json")
    assert status == 2
    assert "merged.json: unknown schema_version 2 of normconf-merged-report" in stderr


def test_reject_missing_file(workdir, capsys):
    status, stderr = run_merge(capsys, "absent.json", "--output", "merged.json")
    assert status == 2
    assert "absent.json: file not found" in stderr


@pytest.mark.parametrize(
    "change, expected",
    [
        ({"results": None}, "'results' is missing or not a list"),
        ({"environment": {}}, "'environment.frameworks' is missing"),
        ({"results": [7]}, "results[0] is not a JSON object"),
    ],
)
def test_reject_malformed_report(workdir, capsys, change, expected):
    document = {**read(workdir / "kernel.json"), **change}
    write(workdir / "malformed.json", document)
    status, stderr = run_merge(capsys, "malformed.json", "--output", "merged.json")
    assert status == 2
    assert f"malformed.json: {expected}" in stderr


def test_reject_malformed_record(workdir, capsys):
    document = read(workdir / "fault.json")
    del document["results"][3]["case"]
    write(workdir / "malformed.json", document)
    status, stderr = run_merge(capsys, "malformed.json", "--output", "merged.json")
    assert status == 2
    assert "malformed.json: results[3]: field 'case' is missing" in stderr


def test_reject_unknown_verdict(workdir, capsys):
    document = read(workdir / "fault.json")
    document["results"][5]["verdict"] = "maybe"
    write(workdir / "odd.json", document)
    status, stderr = run_merge(capsys, "odd.json", "--output", "merged.json")
    assert status == 2
    assert "odd.json: results[5]: unknown verdict 'maybe'" in stderr


def test_reject_same_file_twice(workdir, capsys):
    status, stderr = run_merge(
        capsys, "kernel.json", "fault.json", "./kernel.json", "--output", "m.json"
    )
    assert status == 2
    assert "kernel.json: given twice (also as kernel.json)" in stderr
    assert not (workdir / "m.json").exists()


def test_reject_identical_copy(workdir, capsys):
    shutil.copy(workdir / "kernel.json", workdir / "copy.json")
    status, stderr = run_merge(
        capsys, "kernel.json", "copy.json", "--output", "merged.json"
    )
    assert status == 2
    assert "is in both kernel.json and copy.json" in stderr
    assert "framework numpy-float32" in stderr


def test_reject_overlapping_record(workdir, capsys):
    """One shared record is enough, even where the rest of the files differ."""
    kernel = read(workdir / "kernel.json")
    write(workdir / "one.json", {**kernel, "results": kernel["results"][:1]})
    status, stderr = run_merge(
        capsys, "fault.json", "kernel.json", "one.json", "--output", "merged.json"
    )
    assert status == 2
    assert "is in both kernel.json and one.json" in stderr


def test_reject_merged_with_its_source(workdir, capsys):
    assert run_merge(capsys, "kernel.json", "--output", "merged.json")[0] == 0
    status, stderr = run_merge(
        capsys, "merged.json", "kernel.json", "--output", "again.json"
    )
    assert status == 2
    assert "is in both merged.json (source kernel.json) and kernel.json" in stderr


def test_reject_record_twice_in_file(workdir, capsys):
    document = read(workdir / "kernel.json")
    document["results"].append(document["results"][0])
    write(workdir / "doubled.json", document)
    status, stderr = run_merge(capsys, "doubled.json", "--output", "merged.json")
    assert status == 2
    assert "doubled.json: contains the record (framework numpy-float32" in stderr


def test_reject_unknown_source(workdir, capsys):
    assert run_merge(capsys, "kernel.json", "--output", "merged.json")[0] == 0
    document = read(workdir / "merged.json")
    document["results"][0]["source"] = "elsewhere.json"
    write(workdir / "merged.json", document)
    status, stderr = run_merge(capsys, "merged.json", "--output", "again.json")
    assert status == 2
    assert "names the source 'elsewhere.json', which is not in 'sources'" in stderr


def test_command_line_exit_status(workdir):
    """The module runs as `python -m suites.reports` and exits with status 2."""
    (workdir / "broken.json").write_text("not json", "utf-8")
    completed = subprocess.run(
        [
            sys.executable,
            "-m",
            "suites.reports",
            "merge",
            "broken.json",
            "--output",
            "merged.json",
        ],
        cwd=workdir,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert completed.returncode == 2
    assert "error: broken.json: not a JSON file" in completed.stderr


# Markdown.


def render(capsys, report: str, output: str = "summary.md") -> str:
    status = reports.main(["markdown", report, "--output", output])
    assert status == 0, capsys.readouterr().err
    return Path(output).read_text(encoding="utf-8")


def table_row(text: str, label: str) -> list[str]:
    for line in text.splitlines():
        if line.startswith(f"| {label} |"):
            return [cell.strip() for cell in line.strip("|").split(" | ")]
    raise AssertionError(f"no table row for {label!r} in:\n{text}")


def rows_after(text: str, label: str) -> list[str]:
    """Return the table's body row that follows the header starting with label."""
    lines = text.splitlines()
    for index, line in enumerate(lines):
        if line.startswith(f"| {label} |"):
            return [cell.strip() for cell in lines[index + 2].strip("|").split(" | ")]
    raise AssertionError(f"no table with header {label!r} in:\n{text}")


def test_markdown_header_and_totals(workdir, capsys):
    assert run_merge(capsys, "kernel.json", "fault.json", "--output", "m.json")[0] == 0
    text = render(capsys, "m.json")
    merged = read(workdir / "m.json")

    numpy_version = merged["sources"]["kernel.json"]["environment"]["numpy"]
    assert table_row(text, "numpy-float32")[:2] == ["numpy-float32", numpy_version]
    assert table_row(text, "fault-one-pass-variance")[4] == "fault.json"
    assert table_row(text, "kernel.json")[2] == sys.version.split()[0]

    header = table_row(text, "pass")
    counts = [int(cell) for cell in rows_after(text, "pass")]
    assert header == ["pass", "fail", "rejected", "unsupported", "deviation", "error"]
    assert counts == [merged["summary"][verdict] for verdict in header]


def test_markdown_matrix_cells(workdir, capsys):
    text = render(capsys, "fault.json")
    fault = read(workdir / "fault.json")

    header = table_row(text, "framework/implementation")
    row = table_row(text, "fault-one-pass-variance/kernel")
    cells = dict(zip(header, row, strict=True))
    # random-2d is in the shape group, large-mean-1e4 in conditioning.
    assert set(header) == {"framework/implementation", "shape", "conditioning"}

    shape = [r for r in fault["results"] if r["case"] == "random-2d"]
    worst_shape = max(reports.headroom(r) for r in shape)
    assert cells["shape"] == f"{len(shape)} pass<br>worst {worst_shape:.3g}"

    failures = sum(
        r["verdict"] == "fail" for r in fault["results"] if r["case"] != "random-2d"
    )
    assert failures > 0
    assert f"{failures} fail" in cells["conditioning"]
    assert cells["conditioning"].endswith("<br>worst inf")


def test_markdown_operators_by_framework(workdir, capsys):
    family = workdir / "family.json"
    write_suite_report(
        family,
        "--adapter=tests.family_faults:FamilyKernel",
        "--dtypes=float32",
        "--cases=random-2d,channels-last-2d",
    )
    assert run_merge(capsys, "kernel.json", "family.json", "--output", "m.json")[0] == 0
    text = render(capsys, "m.json").split("## Operators")[1].split("## Verdicts")[0]
    merged = read(workdir / "m.json")

    header = table_row(text, "framework / operator")
    operators = ["instance_norm", "group_norm", "layer_norm", "batch_norm"]
    assert header == ["framework / operator", *map(reports.escape, operators)]
    header = ["framework", *operators]
    instance = dict(zip(header, table_row(text, "numpy-float32"), strict=True))
    assert instance["group_norm"] == "none"
    kernel = [r for r in merged["results"] if r["framework"] == "numpy-float32"]
    passed = sum(r["verdict"] == "pass" for r in kernel)
    unsupported = len(kernel) - passed
    assert instance["instance_norm"] == (
        f"1 implementation: {passed} pass · {unsupported} unsup"
    )
    cells = dict(zip(header, table_row(text, "numpy-family"), strict=True))
    assert cells["instance_norm"] == "none"
    # LayerNorm is posed in channels_first only: channels-last-2d is unsupported.
    assert cells["layer_norm"] == "1 implementation: 4 pass · 4 unsup"
    assert cells["batch_norm"] == "1 implementation: 8 pass"
    ops = {r["op"] for r in merged["results"] if r["framework"] == "numpy-family"}
    assert ops == {"group_norm", "layer_norm", "batch_norm"}


def test_markdown_unsupported_only_cell(workdir, capsys):
    document = read(workdir / "kernel.json")
    document["results"] = [
        r for r in document["results"] if r["verdict"] == "unsupported"
    ]
    write(workdir / "unsupported.json", document)
    text = render(capsys, "unsupported.json")
    row = table_row(text, "numpy-float32/kernel")
    assert row[1:] == ["12 unsup", "12 unsup"]


def test_markdown_lists_failures(workdir, capsys):
    text = render(capsys, "fault.json")
    fault = read(workdir / "fault.json")
    failing = [r for r in fault["results"] if r["verdict"] == "fail"]

    assert f"## Failures ({len(failing)})" in text
    lines = [line for line in text.splitlines() if ": fail: " in line]
    assert len(lines) == len(failing)
    item = (
        "- `fault-one-pass-variance/kernel cpu float32 large-mean-1e4 output`: fail: "
    )
    assert any(line.startswith(item) for line in lines)
    assert "## Deviations (0)\n\nNone." in text
    # Without --replay-dir the run wrote no bundle: each failure names the
    # command that reruns its item.
    reruns = [line for line in text.splitlines() if line.startswith("  - rerun: `")]
    assert len(reruns) == len(failing)
    assert all("--cases=large-mean-1e4" in line for line in reruns)


def test_markdown_failure_names_its_bundle(workdir, capsys):
    document = read(workdir / "fault.json")
    for record in document["results"]:
        record["replay_command"] = f"python -m suites.replay bundles/{record['case']}"
    write(workdir / "bundled.json", document)
    text = render(capsys, "bundled.json")
    lines = text.splitlines()
    for index, line in enumerate(lines):
        if ": fail: " in line:
            assert lines[index + 1] == (
                "  - replay: `python -m suites.replay bundles/large-mean-1e4`"
            )


def test_markdown_report_without_commands(workdir, capsys):
    # Reports written before records carried commands still render.
    document = read(workdir / "fault.json")
    for record in document["results"]:
        del record["command"], record["replay_command"]
    write(workdir / "older.json", document)
    text = render(capsys, "older.json")
    assert "rerun:" not in text
    assert "replay:" not in text


@pytest.mark.parametrize(
    "values, expected",
    [
        ([1.0, 2.0, 3.0], {"count": 3, "nan": 0, "inf": 0, "min": 1.0, "max": 3.0}),
        ([np.nan, np.inf, 1.0], {"count": 3, "nan": 1, "inf": 1, "min": 1.0}),
        ([np.nan, -np.inf], {"count": 2, "nan": 1, "inf": 1, "min": None}),
        ([], {"count": 0, "nan": 0, "inf": 0, "mean": None}),
        ([1e308, 1e308], {"max": 1e308, "mean": 1e308, "std": 0.0}),
        ([-1.7e308, 1.7e308], {"mean": 0.0, "std": 1.7e308}),
    ],
)
def test_array_summary(values, expected):
    summary = report.array_summary(np.array(values, dtype=np.float64))
    assert {key: summary[key] for key in expected} == expected


def test_markdown_deviation_one_line(workdir, capsys):
    document = read(workdir / "kernel.json")
    record = next(r for r in document["results"] if r["verdict"] == "pass")
    message = "known deviation: " + "a long reason | with a pipe, " * 20
    record.update(
        verdict="deviation",
        deviation=3,
        message=message + "\nmeasured: output: X*X <b>bold</b>",
    )
    document["stale_deviations"] = ["deviation #4 (numpy-float32 >=1, M1)"]
    write(workdir / "deviating.json", document)
    text = render(capsys, "deviating.json")

    assert "## Deviations (1)" in text
    lines = [line for line in text.splitlines() if ": deviation: " in line]
    assert len(lines) == 1
    line = lines[0]
    assert "a long reason \\| with a pipe" in line
    assert line.endswith("measured: output: X\\*X \\<b\\>bold\\</b\\>")
    assert line.count("a long reason") == 20
    assert "## Failures (0)" in text
    assert "- deviating.json: stale: deviation \\#4 (numpy-float32 \\>=1, M1)" in text


def test_markdown_unknown_case_group(workdir, capsys):
    document = read(workdir / "kernel.json")
    for record in document["results"]:
        if record["case"] == "M1":
            record["case"] = "from-a-newer-catalogue"
    write(workdir / "newer.json", document)
    text = render(capsys, "newer.json")
    header = table_row(text, "framework/implementation")
    assert header[-1] == "other"


def test_markdown_missing_framework(workdir, capsys):
    document = read(workdir / "kernel.json")
    document["environment"]["frameworks"]["mxnet"] = {"missing": "no module mxnet"}
    write(workdir / "missing.json", document)
    text = render(capsys, "missing.json")
    assert table_row(text, "mxnet")[1:3] == ["not installed", "no module mxnet"]


def test_markdown_hides_missing_framework_that_ran_elsewhere(workdir, capsys):
    # Each tox environment lists the frameworks it lacks. The report that ran
    # numpy-float32 gives its version, so the other's "not installed" row is noise.
    document = read(workdir / "fault.json")
    document["environment"]["frameworks"]["numpy-float32"] = {"missing": "absent"}
    write(workdir / "fault-env.json", document)
    status = reports.main(
        ["merge", "kernel.json", "fault-env.json", "--output", "m.json"]
    )
    assert status == 0
    text = render(capsys, "m.json")
    # The frameworks table's rows; the operators table has a row per framework too.
    rows = [
        line
        for line in text.split("## Operators")[0].splitlines()
        if line.startswith("| numpy-float32 |")
    ]
    assert len(rows) == 1
    assert "not installed" not in rows[0]


def test_markdown_rejects_bad_input(workdir, capsys):
    write(workdir / "other.json", {"schema": "something-else"})
    status = reports.main(["markdown", "other.json", "--output", "summary.md"])
    assert status == 2
    assert "other.json: not a normconf report" in capsys.readouterr().err
    assert not (workdir / "summary.md").exists()


# Headroom.


@pytest.mark.parametrize(
    "error, budget, expected",
    [
        (2.0, 8.0, 0.25),
        ("Infinity", 8.0, math.inf),
        ("NaN", 8.0, None),
        (None, 8.0, None),
        (2.0, None, None),
        (2.0, 0.0, None),
        (2.0, "Infinity", None),
    ],
)
def test_headroom(error, budget, expected):
    assert reports.headroom({"error": error, "budget": budget}) == expected


def test_markdown_worst_is_maximum(workdir, capsys):
    """The cell shows the largest ratio wherever its record sorts in the cell."""
    document = read(workdir / "kernel.json")
    passing = [r for r in document["results"] if r["case"] == "random-2d"]
    passing = [r for r in passing if r["verdict"] == "pass"]
    assert len(passing) >= 2
    for record in passing:
        record.update(error=1.0, budget=10.0)
    passing[0].update(error=7.0)
    write(workdir / "ratios.json", document)
    text = render(capsys, "ratios.json")
    header = table_row(text, "framework/implementation")
    row = table_row(text, "numpy-float32/kernel")
    cells = dict(zip(header, row, strict=True))
    assert cells["shape"].endswith("<br>worst 0.7")


# Diff.

RELEASED_FRAMEWORK = "numpy-float32"
LARGE_MEAN_FAILURES = {"grad_gamma", "grad_input", "output"}


@pytest.fixture(scope="module")
def release_reports(tmp_path_factory, suite_reports) -> dict[str, Path]:
    """Write two releases of one framework: 1.0.0 is the correct kernel, 1.1.0 the
    one-pass variance kernel renamed to the same framework, run on the same cases
    in float32."""
    folder = tmp_path_factory.mktemp("release-reports")
    good = folder / "good.json"
    write_suite_report(
        good,
        "--adapter=tests.faults:Float32Kernel",
        "--dtypes=float32",
        "--cases=large-mean-1e4,random-2d",
    )
    release_1 = read(good)
    release_1["environment"]["frameworks"][RELEASED_FRAMEWORK]["version"] = "1.0.0"

    release_2 = read(suite_reports["fault"])
    frameworks = release_2["environment"]["frameworks"]
    frameworks[RELEASED_FRAMEWORK] = frameworks.pop("fault-one-pass-variance")
    frameworks[RELEASED_FRAMEWORK]["version"] = "1.1.0"
    for record in release_2["results"]:
        record["framework"] = RELEASED_FRAMEWORK
    return {
        "release-1": write(folder / "release-1.json", release_1),
        "release-2": write(folder / "release-2.json", release_2),
    }


@pytest.fixture
def diffdir(tmp_path, monkeypatch, release_reports) -> Path:
    for name, path in release_reports.items():
        shutil.copy(path, tmp_path / f"{name}.json")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def run_diff(capsys, *arguments: str) -> tuple[int, str, str]:
    status = reports.main(["diff", *arguments])
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def section_lines(text: str, title: str) -> list[str]:
    """Return the list items under the heading `## title (N)`."""
    lines = text.splitlines()
    for index, line in enumerate(lines):
        if line.startswith(f"## {title} ("):
            items = []
            for item in lines[index + 2 :]:
                if not item.startswith("- "):
                    break
                items.append(item)
            return items
    raise AssertionError(f"no section {title!r} in:\n{text}")


def quantities(lines: list[str]) -> set[str]:
    """Return the quantity named in each change line's item."""
    return {line.split("`")[1].split()[-1] for line in lines}


def test_diff_regressed_release(diffdir, capsys):
    status, out, err = run_diff(
        capsys, "release-1.json", "release-2.json", "--output", "diff.md"
    )
    assert status == 1, err
    assert out == (diffdir / "diff.md").read_text(encoding="utf-8")
    assert "- numpy-float32 1.0.0 -> 1.1.0" in out

    regressed = section_lines(out, "Regressed")
    assert quantities(regressed) == LARGE_MEAN_FAILURES
    item = "- `numpy-float32/kernel cpu float32 large-mean-1e4 output`: pass -> fail"
    line = next(line for line in regressed if line.startswith(item))
    assert line.endswith(" u -> inf (×inf)")
    assert section_lines(out, "Improved") == []
    assert section_lines(out, "Newly passing") == []
    assert section_lines(out, "Appeared") == []
    assert section_lines(out, "Disappeared") == []
    assert "## Improved (0)\n\nNone." in out


def test_diff_improved_release(diffdir, capsys):
    status, out, err = run_diff(capsys, "release-2.json", "release-1.json")
    assert status == 0, err
    assert "- numpy-float32 1.1.0 -> 1.0.0" in out
    assert section_lines(out, "Regressed") == []
    improved = section_lines(out, "Improved")
    passing = section_lines(out, "Newly passing")
    assert quantities(improved) == LARGE_MEAN_FAILURES
    assert quantities(passing) == LARGE_MEAN_FAILURES
    assert all(": fail -> pass, error inf -> " in line for line in improved)


def test_diff_same_report(diffdir, capsys):
    status, out, err = run_diff(capsys, "release-1.json", "release-1.json")
    assert status == 0, err
    assert "- numpy-float32 1.0.0 (same version)" in out
    assert "8 records are in both." in out
    assert not [line for line in out.splitlines() if line.startswith("- `")]


def test_diff_newly_passing_deviation(diffdir, capsys):
    """deviation -> pass is newly passing but not improved: both conform."""
    document = read(diffdir / "release-1.json")
    record = document["results"][0]
    record.update(verdict="deviation", deviation=1)
    write(diffdir / "deviating.json", document)
    status, out, err = run_diff(capsys, "deviating.json", "release-1.json")
    assert status == 0, err
    assert section_lines(out, "Improved") == []
    passing = section_lines(out, "Newly passing")
    assert len(passing) == 1
    assert f" {record['quantity']}`: deviation -> pass, " in passing[0]
    assert passing[0].endswith("(×1)")


@pytest.mark.parametrize("allowed, status", [(False, 1), (True, 0)])
def test_diff_newly_rejected(diffdir, capsys, allowed, status):
    """A rejection regresses only where the case does not allow it."""
    document = read(diffdir / "release-1.json")
    document["results"][2].update(
        verdict="rejected", conforming=allowed, error=None, budget=None
    )
    write(diffdir / "rejecting.json", document)
    result, out, err = run_diff(capsys, "release-1.json", "rejecting.json")
    assert result == status, err
    rejected = section_lines(out, "Newly rejected")
    assert len(rejected) == 1
    assert ": pass -> rejected, error " in rejected[0]
    assert rejected[0].endswith(" u -> none (n/a)")
    assert len(section_lines(out, "Regressed")) == (0 if allowed else 1)


@pytest.mark.parametrize("factor, listed", [(3.0, True), (1 / 3, True), (1.5, False)])
def test_diff_error_change(diffdir, capsys, factor, listed):
    document = read(diffdir / "release-1.json")
    record = document["results"][0]
    assert record["verdict"] == "pass"
    record["error"] *= factor
    write(diffdir / "changed.json", document)
    status, out, err = run_diff(capsys, "release-1.json", "changed.json")
    assert status == 0, err
    changed = section_lines(out, "Error changed")
    assert len(changed) == (1 if listed else 0)
    if listed:
        assert changed[0].endswith(f"(×{factor:.3g})")


def test_diff_budget_change_shown(diffdir, capsys):
    """A changed budget counts in error / budget, and the line shows both budgets."""
    document = read(diffdir / "release-1.json")
    record = document["results"][0]
    record["budget"] /= 4
    write(diffdir / "tighter.json", document)
    status, out, err = run_diff(capsys, "release-1.json", "tighter.json")
    assert status == 0, err
    changed = section_lines(out, "Error changed")
    assert len(changed) == 1
    assert "(×1), budget 60.6 u -> 15.1 u" in changed[0]


def test_diff_appeared_disappeared(diffdir, capsys):
    document = read(diffdir / "release-1.json")
    first, second = document["results"][:2]
    document["results"] = document["results"][1:]
    document["results"].append({**second, "case": "from-a-newer-catalogue"})
    write(diffdir / "moved.json", document)
    status, out, err = run_diff(capsys, "release-1.json", "moved.json")
    assert status == 0, err
    appeared = section_lines(out, "Appeared")
    disappeared = section_lines(out, "Disappeared")
    assert len(appeared) == 1
    assert " from-a-newer-catalogue " in appeared[0]
    assert ": absent -> pass, error absent -> " in appeared[0]
    assert appeared[0].endswith("(n/a)")
    assert len(disappeared) == 1
    assert f" {first['case']} {first['quantity']}`: pass -> absent" in disappeared[0]


def test_diff_merged_reports(diffdir, capsys):
    assert run_merge(capsys, "release-1.json", "--output", "merged-1.json")[0] == 0
    status, out, err = run_diff(capsys, "merged-1.json", "release-2.json")
    assert status == 1, err
    assert "OLD: `merged-1.json` (8 records)." in out
    assert quantities(section_lines(out, "Regressed")) == LARGE_MEAN_FAILURES


def test_diff_framework_only_in_one(diffdir, capsys, suite_reports):
    shutil.copy(suite_reports["fault"], diffdir / "fault.json")
    status, out, err = run_diff(capsys, "release-1.json", "fault.json")
    assert status == 0, err
    assert "- numpy-float32 1.0.0: in OLD only" in out
    assert "- fault-one-pass-variance " in out
    assert len(section_lines(out, "Appeared")) == 8
    assert len(section_lines(out, "Disappeared")) == 8


@pytest.mark.parametrize(
    "content, expected",
    [
        ("not json", "broken.json: not a JSON file"),
        ('{"schema": "junit"}', "broken.json: not a normconf report"),
    ],
)
def test_diff_rejects_bad_input(diffdir, capsys, content, expected):
    (diffdir / "broken.json").write_text(content, "utf-8")
    status, out, err = run_diff(
        capsys, "release-1.json", "broken.json", "--output", "diff.md"
    )
    assert status == 2
    assert expected in err
    assert out == ""
    assert not (diffdir / "diff.md").exists()


def test_diff_rejects_record_twice(diffdir, capsys):
    document = read(diffdir / "release-2.json")
    document["results"].append(document["results"][0])
    write(diffdir / "doubled.json", document)
    status, _, err = run_diff(capsys, "doubled.json", "release-1.json")
    assert status == 2
    assert "doubled.json: contains the record (framework numpy-float32" in err


@pytest.mark.parametrize(
    "old, new, status",
    [
        ("release-1.json", "release-2.json", 1),
        ("release-2.json", "release-1.json", 0),
        ("release-1.json", "absent.json", 2),
    ],
)
def test_diff_command_line_status(diffdir, old, new, status):
    """`python -m suites.reports diff` exits with 1 on a regression, for CI."""
    completed = subprocess.run(
        [sys.executable, "-m", "suites.reports", "diff", old, new],
        cwd=diffdir,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert completed.returncode == status, completed.stderr
    if status == 2:
        assert (
            "python -m suites.reports diff: error: absent.json: file not found"
            in completed.stderr
        )
    else:
        assert completed.stdout.startswith("# normconf report diff\n")


def test_merge_refuses_to_overwrite_an_input(tmp_path):
    source = tmp_path / "a.json"
    source.write_text("{}", encoding="utf-8")
    completed = subprocess.run(
        [
            sys.executable,
            "-m",
            "suites.reports",
            "merge",
            str(source),
            "--output",
            str(source),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert completed.returncode == 2
    assert "the output is also an input" in completed.stderr
    assert source.read_text(encoding="utf-8") == "{}"


# HTML.

DATA_ELEMENT = re.compile(
    r'<script type="application/json" id="normconf-data">(.*?)</script>', re.DOTALL
)


def render_html(capsys, report: str, output: str = "summary.html") -> str:
    status = reports.main(["html", report, "--output", output])
    assert status == 0, capsys.readouterr().err
    return Path(output).read_text(encoding="utf-8")


def embedded_data(text: str) -> dict:
    matches = DATA_ELEMENT.findall(text)
    assert len(matches) == 1
    return json.loads(matches[0])


def heatmap_rows(text: str) -> list[str]:
    body = text.split('<table class="heatmap">', 1)[1].split("</table>", 1)[0]
    body = body.split("<tbody>", 1)[1]
    return re.findall(r'<tr><th class="row">([^<]*)</th>', body)


def test_html_loads_nothing_external(workdir, capsys):
    assert run_merge(capsys, "kernel.json", "fault.json", "--output", "m.json")[0] == 0
    text = render_html(capsys, "m.json")
    assert text.startswith("<!DOCTYPE html>")
    assert "http://" not in text
    assert "https://" not in text
    assert "src=" not in text
    assert "href=" not in text
    assert "url(" not in text
    assert "@import" not in text


def test_html_embeds_every_record(workdir, capsys):
    assert run_merge(capsys, "kernel.json", "fault.json", "--output", "m.json")[0] == 0
    text = render_html(capsys, "m.json")
    merged = read(workdir / "m.json")
    data = embedded_data(text)
    assert data["records"] == merged["results"]
    assert len(data["headroom"]) == len(merged["results"])
    assert data["filters"] == ["framework", "device", "dtype", "quantity"]


def test_html_header_versions(workdir, capsys):
    assert run_merge(capsys, "kernel.json", "fault.json", "--output", "m.json")[0] == 0
    text = render_html(capsys, "m.json")
    merged = read(workdir / "m.json")
    for framework, versions in reports.framework_versions(merged).items():
        assert f"<li>{framework} {', '.join(versions)}</li>" in text


def test_html_one_row_per_implementation(workdir, capsys):
    assert run_merge(capsys, "kernel.json", "fault.json", "--output", "m.json")[0] == 0
    text = render_html(capsys, "m.json")
    rows = heatmap_rows(text)
    assert rows == ["fault-one-pass-variance/kernel", "numpy-float32/kernel"]
    assert embedded_data(text)["rows"] == rows


def test_html_cells_by_case_group(workdir, capsys):
    text = render_html(capsys, "fault.json")
    fault = read(workdir / "fault.json")
    data = embedded_data(text)
    assert data["columns"] == [
        {"case": "random-2d", "group": "shape"},
        {"case": "large-mean-1e4", "group": "conditioning"},
    ]
    assert '<th colspan="1">shape</th>' in text
    assert '<th colspan="1">conditioning</th>' in text

    row = text.split('<th class="row">fault-one-pass-variance/kernel</th>', 1)[1]
    cells = re.findall(r"<td[^>]*>[^<]*</td>", row)[:2]
    shape = [r for r in fault["results"] if r["case"] == "random-2d"]
    worst = max(reports.headroom(r) for r in shape)
    assert worst <= 1
    assert cells[0].endswith(f">{worst:.2g}</td>")
    assert reports.headroom_colour(worst) in cells[0]
    # large-mean-1e4 fails with a non-finite output: over budget, shown as inf.
    assert cells[1] == (
        f'<td class="over" style="background: {reports.OVER_BUDGET_COLOUR}">inf</td>'
    )


def test_html_marks_cells_without_ratio(workdir, capsys):
    document = read(workdir / "kernel.json")
    m1 = [r for r in document["results"] if r["case"] == "M1"]
    for record in m1:
        record.update(verdict="rejected", conforming=True, error=None, budget=None)
    write(workdir / "rejecting.json", document)
    text = render_html(capsys, "rejecting.json")
    assert '<td class="mark mark-rejected">R</td>' in text


def test_headroom_colour_scale():
    assert reports.headroom_colour(0.0) == "hsl(120, 70%, 62%)"
    assert reports.headroom_colour(1.0) == "hsl(0, 70%, 62%)"
    assert reports.headroom_colour(1.01) == reports.OVER_BUDGET_COLOUR
    assert reports.headroom_colour(math.inf) == reports.OVER_BUDGET_COLOUR


def test_html_message_cannot_end_script(workdir, capsys):
    document = read(workdir / "kernel.json")
    message = "bad </script><b>bold</b> <!-- & more"
    document["results"][0]["message"] = message
    document["results"][0]["case"] = "</script><b>case"
    write(workdir / "hostile.json", document)
    text = render_html(capsys, "hostile.json")

    assert "</script><b>" not in text
    assert "<b>" not in text
    assert "<!--" not in text
    assert text.count("</script>") == 2
    data = embedded_data(text)
    assert data["records"][0]["message"] == message
    assert "&lt;/script&gt;&lt;b&gt;case" in text


def test_html_rejects_bad_input(workdir, capsys):
    write(workdir / "other.json", {"schema": "something-else"})
    status = reports.main(["html", "other.json", "--output", "summary.html"])
    assert status == 2
    assert "other.json: not a normconf report" in capsys.readouterr().err
    assert not (workdir / "summary.html").exists()


def test_diff_lists_lost_coverage_and_new_deviations(diffdir, capsys):
    document = read(diffdir / "release-1.json")
    unsupported, deviating = document["results"][:2]
    unsupported.update(verdict="unsupported", error=None, budget=None)
    deviating.update(verdict="deviation", deviation=1)
    write(diffdir / "later.json", document)

    status, out, err = run_diff(capsys, "release-1.json", "later.json")
    assert status == 0, err
    lines = section_lines(out, "Newly unsupported")
    assert len(lines) == 1
    assert f" {unsupported['quantity']}`: pass -> unsupported" in lines[0]
    lines = section_lines(out, "Newly deviating")
    assert len(lines) == 1
    assert f" {deviating['quantity']}`: pass -> deviation" in lines[0]

    status, _, err = run_diff(
        capsys, "release-1.json", "later.json", "--fail-on=newly-unsupported"
    )
    assert status == 1
    assert "--fail-on sections with records: newly-unsupported" in err


def test_diff_lists_other_verdict_changes(diffdir, capsys):
    document = read(diffdir / "release-2.json")
    failing = next(r for r in document["results"] if r["verdict"] == "fail")
    failing.update(verdict="error", error=None, budget=None)
    write(diffdir / "erroring.json", document)
    status, out, err = run_diff(capsys, "release-2.json", "erroring.json")
    assert status == 0, err
    (line,) = section_lines(out, "Other verdict changes")
    assert f" {failing['quantity']}`: fail -> error" in line
    assert section_lines(out, "Regressed") == []


def test_diff_fail_on_disappeared(diffdir, capsys):
    document = read(diffdir / "release-1.json")
    del document["results"][0]
    write(diffdir / "fewer.json", document)
    assert run_diff(capsys, "release-1.json", "fewer.json")[0] == 0
    status, _, err = run_diff(
        capsys, "release-1.json", "fewer.json", "--fail-on", "regressed,disappeared"
    )
    assert status == 1
    assert "disappeared" in err


def test_diff_rejects_unknown_fail_on(diffdir, capsys):
    with pytest.raises(SystemExit) as stopped:
        reports.main(["diff", "release-1.json", "release-2.json", "--fail-on=worse"])
    assert stopped.value.code == 2
    assert "unknown section worse; known: regressed," in capsys.readouterr().err


def mark_incomplete(document: dict) -> dict:
    document["run"] = {
        "items": 27,
        "items_recorded": 7,
        "complete": False,
        "exit_status": 1,
    }
    return document


def test_diff_warns_of_incomplete_run(diffdir, capsys):
    write(diffdir / "partial.json", mark_incomplete(read(diffdir / "release-2.json")))
    _, out, _ = run_diff(capsys, "release-1.json", "partial.json")
    assert (
        "> **Warning:** NEW: partial.json is incomplete: 7 of 27 selected items "
        "recorded verdicts (pytest exit status 1)." in out
    )


def test_markdown_and_html_warn_of_incomplete_run(workdir, capsys):
    write(workdir / "partial.json", mark_incomplete(read(workdir / "fault.json")))
    text = render(capsys, "partial.json")
    assert "> **Warning:** partial.json is incomplete: 7 of 27" in text
    page = render_html(capsys, "partial.json")
    assert '<p class="warning">Warning: partial.json is incomplete: 7 of 27' in page


@pytest.mark.parametrize(
    "text, span",
    [
        ("plain", "`plain`"),
        ("a`b", "``a`b``"),
        ("a``b`c", "```a``b`c```"),
        ("`start", "`` `start ``"),
        ("end`", "`` end` ``"),
    ],
)
def test_code_span_keeps_backticks(text, span):
    assert reports._code(text) == span
