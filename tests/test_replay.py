"""Replay bundles: written by --replay-dir, rerun by `python -m suites.replay`.

The suite runs in a subprocess with the NumPy kernels from tests/faults.py, so these
tests need no framework installed.
"""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from adapters.contract import Implementation
from suites import cases, replay
from suites.verdicts import Item, build_request
from tests.subprocess_runs import run_suite

ROOT = Path(__file__).resolve().parents[1]
USAGE_ERROR = 4
FAULT = "tests.faults:OnePassVariance"
CORRECT = "tests.faults:Float32Kernel"
BUNDLE_ID = "fault-one-pass-variance-kernel-cpu-float32-large-mean-1e4"


def run_replay(*arguments: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "suites.replay", *arguments],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )


def replayed_lines(stdout: str) -> dict[str, tuple[str, str]]:
    """Parse replay output into quantity -> (verdict, message)."""
    lines = {}
    for line in stdout.splitlines():
        quantity, verdict, message = line.split(": ", 2)
        lines[quantity] = (verdict, message)
    return lines


def worst_element(message: str) -> str:
    match = re.search(r"worst element \[([^\]]*)\]", message)
    assert match, message
    return match.group(1)


@pytest.fixture(scope="module")
def fault_bundle(tmp_path_factory) -> Path:
    """Run the one-pass variance fault on large-mean-1e4 with --replay-dir and
    return the item's bundle folder."""
    directory = tmp_path_factory.mktemp("replay")
    completed = run_suite(
        f"--adapter={FAULT}",
        "--cases=large-mean-1e4,random-2d",
        "--dtypes=float32",
        f"--replay-dir={directory / 'bundles'}",
        f"--report={directory / 'report.json'}",
    )
    assert completed.returncode == 1, completed.stdout[-3000:]
    return directory / "bundles" / BUNDLE_ID


def report_records(fault_bundle: Path) -> list[dict]:
    """The records of the report written beside the bundle folder."""
    path = fault_bundle.parent.parent / "report.json"
    return json.loads(path.read_text(encoding="utf-8"))["results"]


def test_bundle_written_for_failure(fault_bundle):
    assert (fault_bundle / "inputs.npz").is_file()
    assert (fault_bundle / "item.json").is_file()

    with np.load(fault_bundle / "inputs.npz", allow_pickle=False) as archive:
        assert sorted(archive.files) == ["beta", "gamma", "grad_output", "x"]
        arrays = {name: archive[name] for name in archive.files}
    inputs = cases.materialize(cases.by_name("large-mean-1e4"), "float32", 0)
    for name in ("x", "gamma", "beta", "grad_output"):
        assert arrays[name].dtype == np.float32
        assert np.array_equal(arrays[name], getattr(inputs, name))


def test_bundle_metadata(fault_bundle):
    metadata = json.loads((fault_bundle / "item.json").read_text(encoding="utf-8"))
    assert metadata["framework"] == "fault-one-pass-variance"
    assert metadata["adapter_spec"] == FAULT
    assert metadata["builtin"] is None
    assert metadata["framework_version"] == np.__version__
    assert metadata["implementation"] == "kernel"
    assert metadata["device"] == "cpu"
    assert metadata["dtype"] == "float32"
    assert metadata["layout"] == "channels_first"
    assert metadata["eps"] == 1e-5
    assert metadata["affine"] is True
    assert metadata["case"] == "large-mean-1e4"
    assert metadata["seed"] == 0
    assert "--cases=large-mean-1e4" in metadata["command"]
    assert metadata["command"].startswith("python -m pytest ")
    assert metadata["replay_command"] == (
        f"python -m suites.replay {fault_bundle} --adapter {FAULT}"
    )
    verdicts = {record["quantity"]: record["verdict"] for record in metadata["records"]}
    assert verdicts["output"] == "fail"


def test_replay_fails_same_way(fault_bundle):
    metadata = json.loads((fault_bundle / "item.json").read_text(encoding="utf-8"))
    completed = run_replay(str(fault_bundle))
    assert completed.returncode == 1, completed.stdout + completed.stderr

    replayed = replayed_lines(completed.stdout)
    recorded = {record["quantity"]: record for record in metadata["records"]}
    assert set(replayed) == set(recorded)
    for quantity, record in recorded.items():
        verdict, message = replayed[quantity]
        assert verdict == record["verdict"], quantity
        assert worst_element(message) == worst_element(record["message"]), quantity


def test_report_records_name_the_bundle(fault_bundle):
    metadata = json.loads((fault_bundle / "item.json").read_text(encoding="utf-8"))
    records = report_records(fault_bundle)
    failing = [r for r in records if r["case"] == "large-mean-1e4"]
    assert {r["replay_command"] for r in failing} == {metadata["replay_command"]}
    assert {r["command"] for r in failing} == {metadata["command"]}
    # A passing item gets no bundle, only the command that reruns it.
    passing = [r for r in records if r["case"] == "random-2d"]
    assert {r["replay_command"] for r in passing} == {None}
    assert all("--cases=random-2d" in r["command"] for r in passing)
    assert not (
        fault_bundle.parent / BUNDLE_ID.replace("large-mean-1e4", "random-2d")
    ).exists()


def test_rerun_command_runs_one_item(fault_bundle, tmp_path):
    (record,) = [
        r
        for r in report_records(fault_bundle)
        if r["case"] == "large-mean-1e4" and r["quantity"] == "output"
    ]
    arguments = shlex.split(record["command"])
    assert arguments[:3] == ["python", "-m", "pytest"]

    report = tmp_path / "rerun.json"
    completed = subprocess.run(
        [
            sys.executable,
            *arguments[1:],
            "-p",
            "no:cacheprovider",
            f"--report={report}",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert completed.returncode == 1, completed.stdout[-3000:]
    assert "1 failed" in completed.stdout

    rerun = json.loads(report.read_text(encoding="utf-8"))["results"]
    assert {r["case"] for r in rerun} == {"large-mean-1e4"}
    verdicts = {r["quantity"]: r["verdict"] for r in rerun}
    recorded = {
        r["quantity"]: r["verdict"]
        for r in report_records(fault_bundle)
        if r["case"] == "large-mean-1e4"
    }
    assert verdicts == recorded


def test_replay_correct_kernel_passes(fault_bundle):
    completed = run_replay(str(fault_bundle), f"--adapter={CORRECT}")
    assert completed.returncode == 0, completed.stdout + completed.stderr
    verdicts = {verdict for verdict, _ in replayed_lines(completed.stdout).values()}
    assert verdicts == {"pass"}


def test_replay_truncated_inputs(fault_bundle, tmp_path):
    bundle = tmp_path / "truncated"
    bundle.mkdir()
    (bundle / "item.json").write_bytes((fault_bundle / "item.json").read_bytes())
    (bundle / "inputs.npz").write_bytes(
        (fault_bundle / "inputs.npz").read_bytes()[:300]
    )
    completed = run_replay(str(bundle))
    assert completed.returncode == 2
    assert completed.stderr.startswith("python -m suites.replay: error: invalid bundle")


def test_replay_invalid_item_json(fault_bundle, tmp_path):
    bundle = tmp_path / "invalid-json"
    bundle.mkdir()
    (bundle / "item.json").write_text("{not json", encoding="utf-8")
    (bundle / "inputs.npz").write_bytes((fault_bundle / "inputs.npz").read_bytes())
    assert replay.main([str(bundle)]) == 2


def test_replay_wrong_array_dtype(fault_bundle, tmp_path):
    bundle = tmp_path / "float64-arrays"
    bundle.mkdir()
    (bundle / "item.json").write_bytes((fault_bundle / "item.json").read_bytes())
    with np.load(fault_bundle / "inputs.npz", allow_pickle=False) as archive:
        arrays = {name: archive[name].astype(np.float64) for name in archive.files}
    np.savez(bundle / "inputs.npz", **arrays)
    with pytest.raises(replay.BundleError, match="dtype float64"):
        replay.load_bundle(bundle)


def test_replay_missing_bundle(tmp_path):
    assert replay.main([str(tmp_path / "absent")]) == 2


def test_no_bundle_for_conforming_run(tmp_path):
    directory = tmp_path / "bundles"
    completed = run_suite(
        f"--adapter={CORRECT}",
        "--cases=large-mean-1e4,random-2d",
        "--dtypes=float32",
        f"--replay-dir={directory}",
    )
    assert completed.returncode == 0, completed.stdout[-3000:]
    assert directory.is_dir()
    assert list(directory.iterdir()) == []


def test_replay_dir_on_file_rejected(tmp_path):
    occupied = tmp_path / "file"
    occupied.write_text("", encoding="utf-8")
    completed = run_suite(
        f"--adapter={CORRECT}", "--cases=random-2d", f"--replay-dir={occupied}"
    )
    assert completed.returncode == USAGE_ERROR
    assert "--replay-dir" in completed.stderr


def write_fake_bundle(directory: Path, case_name: str, dtype: str) -> Path:
    """Write a bundle for the case with one made-up failing record, as the suite
    would for a failing item of a correct kernel."""
    case = cases.by_name(case_name)
    item = Item("numpy-float32", "kernel", "cpu", dtype, case, 0)
    implementation = Implementation("kernel", "", layouts=("channels_first",))
    rows = [
        {
            "quantity": "output",
            "verdict": "fail",
            "conforming": False,
            "message": "made up",
            "error": float("inf"),
            "budget": 44.0,
            "worst_index": [0, 0, 0, 0],
            "deviation": None,
        }
    ]

    class Version:
        def version(self) -> str:
            return "test"

    return replay.write_bundle(
        directory,
        Version(),
        ("adapter", CORRECT),
        implementation,
        item,
        rows,
        "python -m pytest made-up",
    )


def test_bundle_without_affine(tmp_path):
    bundle = write_fake_bundle(tmp_path, "no-affine", "float32")
    with np.load(bundle / "inputs.npz", allow_pickle=False) as archive:
        assert sorted(archive.files) == ["grad_output", "x"]
    metadata = json.loads((bundle / "item.json").read_text(encoding="utf-8"))
    assert metadata["affine"] is False
    assert metadata["records"][0]["error"] == "Infinity"
    assert replay.main([str(bundle)]) == 0


def test_bundle_bfloat16_in_float32(tmp_path):
    bundle = write_fake_bundle(tmp_path, "random-2d", "bfloat16")
    case = cases.by_name("random-2d")
    inputs = cases.materialize(case, "bfloat16", 0)
    item = Item("numpy-float32", "kernel", "cpu", "bfloat16", case, 0)
    request = build_request(item, inputs, True)
    with np.load(bundle / "inputs.npz", allow_pickle=False) as archive:
        x = archive["x"]
    assert x.dtype == np.float32
    assert np.array_equal(x, request.x)
    loaded = replay.load_bundle(bundle)
    assert loaded.case.shape == case.shape
    assert np.array_equal(loaded.inputs.grad_output, inputs.grad_output)


def test_bundle_channels_last_round_trip(tmp_path):
    bundle = write_fake_bundle(tmp_path, "channels-last-2d", "float32")
    case = cases.by_name("channels-last-2d")
    inputs = cases.materialize(case, "float32", 0)
    with np.load(bundle / "inputs.npz", allow_pickle=False) as archive:
        stored_shape = archive["x"].shape
    assert stored_shape == (2, 5, 7, 3)
    loaded = replay.load_bundle(bundle)
    assert np.array_equal(loaded.inputs.x, inputs.x)


def test_family_bundle_replays_its_operator(tmp_path):
    # LayerNorm's gamma has the shape of the normalized axes, and the bundle
    # names the operator and its configuration, so the replay judges the same
    # operator on the same arrays.
    completed = run_suite(
        "--adapter=tests.family_faults:LastAxisOnly",
        "--cases=random-2d",
        "--dtypes=float32",
        f"--replay-dir={tmp_path}",
    )
    assert completed.returncode == 1, completed.stdout[-3000:]
    bundle = tmp_path / "numpy-family-layer_norm.kernel-cpu-float32-random-2d"
    metadata = json.loads((bundle / "item.json").read_text(encoding="utf-8"))
    assert (metadata["op"], metadata["normalized_ndim"]) == ("layer_norm", 3)
    assert metadata["groups"] is None
    with np.load(bundle / "inputs.npz", allow_pickle=False) as archive:
        assert archive["gamma"].shape == (3, 5, 7)
    # The other operators of the faulty kernel are correct: no bundle.
    assert sorted(path.name for path in tmp_path.iterdir()) == [bundle.name]

    replayed = run_replay(str(bundle))
    assert replayed.returncode == 1, replayed.stdout + replayed.stderr
    verdicts = replayed_lines(replayed.stdout)
    recorded = {record["quantity"]: record["verdict"] for record in metadata["records"]}
    assert {quantity: verdict for quantity, (verdict, _) in verdicts.items()} == (
        recorded
    )

    fixed = run_replay(str(bundle), "--adapter=tests.family_faults:FamilyKernel")
    assert fixed.returncode == 0, fixed.stdout + fixed.stderr
