"""End-to-end runs of the conformance suite as a user runs it, in a subprocess.

The adapters here are the NumPy kernels from tests/faults.py, so these tests need no
framework installed.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest

from suites import cases, deviations
from tests.subprocess_runs import SUITE, run_suite

ROOT = Path(__file__).resolve().parents[1]
USAGE_ERROR = 4


def read_report(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


def test_correct_kernel_report(tmp_path):
    report = tmp_path / "reports" / "kernel.json"
    completed = run_suite(
        "--adapter=tests.faults:Float32Kernel", "--dtypes=float32", f"--report={report}"
    )
    assert completed.returncode == 0, completed.stdout[-3000:]

    document = read_report(report)
    assert document["schema"] == "normconf-report"
    assert document["schema_version"] == 1
    assert document["environment"]["seed"] == 0
    assert "numpy-float32" in document["environment"]["frameworks"]

    results = document["results"]
    verdicts = {record["verdict"] for record in results}
    assert verdicts == {"pass", "unsupported"}
    # Unsupported only where a case is posed in another dtype alone.
    unsupported = {r["case"] for r in results if r["verdict"] == "unsupported"}
    assert all(not name.endswith("-float32") for name in unsupported)
    assert "range-max-float32" in {r["case"] for r in results if r["verdict"] == "pass"}
    catalogue = [record for record in results if record["case"] != "metamorphic"]
    quantities = {record["quantity"] for record in catalogue}
    assert quantities == {"output", "grad_input", "grad_gamma", "grad_beta"}
    cases = {record["case"] for record in results}
    assert {"M1", "M1x1", "constant-slice", "long-reduction", "N0"} <= cases
    # The metamorphic suite records one verdict per relation.
    relations = {r["quantity"] for r in results if r["case"] == "metamorphic"}
    assert relations == {"shift", "scale", "slice-independence", "gradient-sums"}

    fields = {"op", "framework", "implementation", "device", "dtype", "case"}
    fields |= {"quantity", "verdict", "error", "budget", "message"}
    assert fields <= set(results[0])


def test_terminal_summary_table(tmp_path):
    completed = run_suite(
        "--adapter=tests.faults:Float32Kernel", "--dtypes=float32", "--cases=random-2d"
    )
    assert "normconf verdicts" in completed.stdout
    assert "numpy-float32/kernel" in completed.stdout


def test_terminal_summary_ends_with_paths(tmp_path):
    paths = {
        "report": tmp_path / "report.json",
        "JUnit XML": tmp_path / "junit.xml",
        "replay bundles (1 written by this run)": tmp_path / "bundles",
    }
    completed = run_suite(
        "--adapter=tests.faults:OnePassVariance",
        "--dtypes=float32",
        "--cases=large-mean-1e4,random-2d",
        f"--report={paths['report']}",
        f"--junitxml={paths['JUnit XML']}",
        f"--replay-dir={paths['replay bundles (1 written by this run)']}",
    )
    assert completed.returncode == 1
    lines = completed.stdout.rstrip().splitlines()
    # pytest's short summary first, then the verdict table, the paths, and
    # pytest's final counts line.
    short = lines.index(next(line for line in lines if "short test summary" in line))
    verdicts = lines.index(next(line for line in lines if "normconf verdicts" in line))
    assert short < verdicts
    assert lines[-4:-1] == [f"{label}: {path}" for label, path in paths.items()]
    assert "1 failed, 1 passed" in lines[-1]
    assert all(path.exists() for path in paths.values())


def test_records_carry_inputs_summary(tmp_path):
    report = tmp_path / "report.json"
    completed = run_suite(
        "--adapter=tests.faults:OnePassVariance",
        "--dtypes=float32",
        "--cases=large-mean-1e4,nan-element",
        f"--report={report}",
    )
    assert completed.returncode == 1
    for record in read_report(report)["results"]:
        case = cases.by_name(record["case"])
        inputs = cases.materialize(case, "float32", 0)
        summary = record["inputs"]
        assert summary["shape"] == list(case.shape)
        assert (summary["eps"], summary["seed"]) == (case.eps, 0)
        x = inputs.x.astype(np.float64)
        finite = x[np.isfinite(x)]
        assert summary["x"]["count"] == x.size
        assert summary["x"]["nan"] == np.isnan(x).sum()
        assert summary["x"]["min"] == finite.min()
        assert summary["x"]["mean"] == pytest.approx(finite.mean(), rel=1e-12)
        assert summary["gamma"]["max"] == inputs.gamma.max()
        index = record["worst_index"]
        if record["quantity"] in ("output", "grad_input"):
            sample, channel = index[:2]
            assert record["worst_slice"]["x"]["max"] == np.nanmax(x[sample, channel])
        else:
            assert record["worst_slice"]["channel"] == index[0]
            assert record["worst_slice"]["x"]["count"] == x[:, index[0]].size


def test_header_names_adapter():
    completed = run_suite(
        "--adapter=tests.faults:Float32Kernel", "--cases=random-2d", "--dtypes=float32"
    )
    assert "normconf: numpy-float32" in completed.stdout
    assert "normconf: seed 0" in completed.stdout


def test_one_pass_fault_reported_fail(tmp_path):
    report = tmp_path / "fault.json"
    completed = run_suite(
        "--adapter=tests.faults:OnePassVariance",
        "--dtypes=float32",
        "--cases=large-mean-1e4,large-mean-1e6,random-2d",
        f"--report={report}",
    )
    assert completed.returncode == 1

    results = read_report(report)["results"]
    for case in ("large-mean-1e4", "large-mean-1e6"):
        output = [r for r in results if r["case"] == case and r["quantity"] == "output"]
        assert output[0]["verdict"] == "fail", output[0]["message"]
    random = [r for r in results if r["case"] == "random-2d"]
    assert {r["verdict"] for r in random} == {"pass"}
    assert "rerun: python -m pytest" in completed.stdout


@pytest.mark.parametrize(
    "fault, case",
    [("EpsOutsideSqrt", "eps1e-3"), ("DroppedDxTerm", "random-2d")],
)
def test_fault_item_fails(tmp_path, fault, case):
    report = tmp_path / "fault.json"
    completed = run_suite(
        f"--adapter=tests.faults:{fault}",
        "--dtypes=float32",
        f"--cases={case}",
        f"--report={report}",
    )
    assert completed.returncode == 1
    verdicts = {r["verdict"] for r in read_report(report)["results"]}
    assert "fail" in verdicts


def test_unsupported_dtype_recorded(tmp_path):
    report = tmp_path / "kernel.json"
    completed = run_suite(
        "--adapter=tests.faults:Float32Kernel",
        "--dtypes=float64",
        "--cases=random-2d",
        f"--report={report}",
        "-rs",
    )
    assert completed.returncode == 0
    results = read_report(report)["results"]
    assert {r["verdict"] for r in results} == {"unsupported"}
    assert "float32" in results[0]["message"]
    assert "float32" in completed.stdout.split("short test summary")[-1]


def test_deviation_replaces_fail(tmp_path):
    entries = tmp_path / "deviations.toml"
    entries.write_text(
        "[[deviation]]\n"
        'framework = "fault-one-pass-variance"\n'
        'versions = ">=1"\n'
        "date = 2026-12-04\n"
        'implementations = ["kernel"]\n'
        'cases = ["large-mean-1e4"]\n'
        'reason = "injected for a test"\n'
        'link = "tests/test_suite_run.py"\n'
        "\n"
        "[[deviation]]\n"
        'framework = "fault-one-pass-variance"\n'
        'versions = ">=1"\n'
        "date = 2026-12-04\n"
        'implementations = ["kernel"]\n'
        'cases = ["random-2d"]\n'
        'reason = "never fails, so stale"\n'
        'link = "tests/test_suite_run.py"\n',
        encoding="utf-8",
    )
    report = tmp_path / "fault.json"
    completed = run_suite(
        "--adapter=tests.faults:OnePassVariance",
        "--dtypes=float32",
        "--cases=large-mean-1e4,random-2d",
        f"--deviations={entries}",
        f"--report={report}",
    )
    assert completed.returncode == 0, completed.stdout[-3000:]

    document = read_report(report)
    verdicts = {
        r["verdict"] for r in document["results"] if r["case"] == "large-mean-1e4"
    }
    assert "deviation" in verdicts
    assert "fail" not in verdicts
    assert len(document["stale_deviations"]) == 1
    assert "random-2d" in document["stale_deviations"][0]
    assert "stale: deviation #2" in completed.stdout


@pytest.mark.parametrize(
    "arguments, message",
    [
        (["--dtypes=float8"], "unknown dtype 'float8'"),
        (["--cases=no-such-case"], "unknown case 'no-such-case'"),
        (["--framework=nosuchframework"], "unknown framework 'nosuchframework'"),
        (["--adapter=no_such_module:Adapter"], "failed to import"),
        (["--adapter=tests.faults"], "expected module:object"),
        (["--adapter=tests.faults:Missing"], "not found in module"),
        (
            ["--adapter=tests.faults:Float32Kernel", "--devices=tpu"],
            "unknown device tpu; the adapters declare: cpu (",
        ),
        (
            ["--adapter=tests.faults:Float32Kernel", "--deviations=/no/such/file.toml"],
            "cannot read deviations file",
        ),
        (["--seed=-1"], "--seed must be a non-negative integer"),
    ],
    ids=[
        "dtype",
        "case",
        "framework",
        "module",
        "spec",
        "object",
        "device",
        "deviations",
        "seed",
    ],
)
def test_bad_option_usage_error(arguments, message):
    completed = run_suite(*arguments)
    assert completed.returncode == USAGE_ERROR
    lines = [line for line in completed.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, completed.stderr
    assert message in lines[0]
    assert "Traceback" not in completed.stderr


def test_malformed_deviations_usage_error(tmp_path):
    entries = tmp_path / "deviations.toml"
    entries.write_text('[[deviation]]\nframework = "torch"\n', encoding="utf-8")
    completed = run_suite(
        "--adapter=tests.faults:Float32Kernel", f"--deviations={entries}"
    )
    assert completed.returncode == USAGE_ERROR
    assert "missing keys" in completed.stderr


def test_wrong_contract_version_rejected(tmp_path):
    module = tmp_path / "old_adapter.py"
    module.write_text(
        "from tests.faults import Float32Kernel\n"
        "class OldAdapter(Float32Kernel):\n"
        "    contract_version = 0\n",
        encoding="utf-8",
    )
    completed = run_suite("--adapter=old_adapter:OldAdapter", python_path=tmp_path)
    assert completed.returncode == USAGE_ERROR
    assert "contract_version 0" in completed.stderr


def run_with_module(tmp_path: Path, source: str, *arguments: str):
    (tmp_path / "trial_adapter.py").write_text(source, encoding="utf-8")
    return run_suite(*arguments, python_path=tmp_path)


BASE = "from tests.faults import Float32Kernel\n"


@pytest.mark.parametrize(
    "source, message",
    [
        ("def broken(:\n", "SyntaxError"),
        (
            BASE + "class A(Float32Kernel):\n"
            "    def __init__(self):\n        raise RuntimeError('no backend')\n",
            "cannot start: RuntimeError: no backend",
        ),
        (
            BASE + "class A(Float32Kernel):\n"
            "    def __init__(self, path):\n        pass\n",
            "cannot start: TypeError",
        ),
        (
            BASE + "class A(Float32Kernel):\n"
            "    def implementations(self):\n        raise KeyError('x')\n",
            "implementations() raised KeyError",
        ),
        (
            BASE + "class A(Float32Kernel):\n"
            "    def devices(self):\n        return []\n",
            "declares no devices",
        ),
        (
            BASE + "class A(Float32Kernel):\n    framework = 'Bad Name'\n",
            "framework name 'Bad Name'",
        ),
        (
            BASE + "class A(Float32Kernel):\n"
            "    def version(self):\n        return 3\n",
            "version() returned 3, not a non-empty string",
        ),
        (
            BASE + "from adapters.contract import Device\n"
            "class A(Float32Kernel):\n"
            "    def devices(self):\n        return [Device('cpu'), Device('cpu')]\n",
            "declares the device cpu twice",
        ),
        (
            BASE + "class A(Float32Kernel):\n"
            "    def devices(self):\n        return ['cpu']\n",
            "devices() returned 'cpu', not a Device",
        ),
        (
            BASE + "from adapters.contract import Device\n"
            "class A(Float32Kernel):\n"
            "    def devices(self):\n        return [Device('my gpu/0')]\n",
            "device name 'my gpu/0'",
        ),
        (
            BASE + "from adapters.contract import Implementation\n"
            "class A(Float32Kernel):\n"
            "    def implementations(self):\n"
            "        return [Implementation('k', 'd', layouts=('nhwc',))]\n",
            "declares layouts ('nhwc',)",
        ),
        (
            BASE + "import numpy as np\n"
            "class A(Float32Kernel):\n"
            "    def math_modes(self):\n        return {'tf32': np.bool_(True)}\n",
            "math_modes() maps 'tf32' to",
        ),
        (
            BASE + "class A(Float32Kernel):\n"
            "    def math_modes(self):\n        raise OSError('no device')\n",
            "math_modes() raised OSError: no device",
        ),
    ],
    ids=[
        "syntax",
        "init-raises",
        "init-arguments",
        "raises",
        "no-devices",
        "name",
        "version-type",
        "duplicate-device",
        "device-type",
        "device-name",
        "layouts",
        "math-modes-value",
        "math-modes-raises",
    ],
)
def test_broken_adapter_usage_error(tmp_path, source, message):
    completed = run_with_module(tmp_path, source, "--adapter=trial_adapter:A")
    assert completed.returncode == USAGE_ERROR, completed.stdout[-2000:]
    assert message in completed.stderr
    assert "Traceback" not in completed.stderr + completed.stdout


@pytest.mark.parametrize(
    "arguments, message",
    [
        (["--dtypes="], "--dtypes: the list is empty"),
        (["--cases=,"], "--cases: the list is empty"),
        (["--report=/proc/normconf/x.json"], "--report"),
        (["--report=/proc/x.json"], "--report: cannot write"),
    ],
    ids=["dtypes", "cases", "report-folder", "report-file"],
)
def test_unusable_values_usage_error(arguments, message):
    if "/proc" in arguments[0] and not Path("/proc/self").exists():
        pytest.skip("needs Linux's /proc")
    completed = run_suite("--adapter=tests.faults:Float32Kernel", *arguments)
    assert completed.returncode == USAGE_ERROR, completed.stdout[-2000:]
    assert message in completed.stderr


def test_undecodable_deviations_file(tmp_path):
    entries = tmp_path / "deviations.toml"
    entries.write_bytes(b"\xff\xfe[[deviation]]\n")
    completed = run_suite(
        "--adapter=tests.faults:Float32Kernel", f"--deviations={entries}"
    )
    assert completed.returncode == USAGE_ERROR
    assert "cannot read deviations file" in completed.stderr


def test_deviation_with_unknown_case(tmp_path):
    entries = tmp_path / "deviations.toml"
    entries.write_text(
        '[[deviation]]\nframework = "numpy-float32"\nversions = ">=0"\n'
        "date = 2026-12-04\n"
        'implementations = ["kernel"]\ncases = ["no-such-case"]\n'
        'reason = "r"\nlink = "l"\n',
        encoding="utf-8",
    )
    completed = run_suite(
        "--adapter=tests.faults:Float32Kernel", f"--deviations={entries}"
    )
    assert completed.returncode == USAGE_ERROR
    assert "unknown case 'no-such-case'" in completed.stderr


def test_deviation_naming_no_declared_implementation_is_unexercised(tmp_path):
    entries = tmp_path / "deviations.toml"
    entries.write_text(
        '[[deviation]]\nframework = "numpy-float32"\nversions = ">=0"\n'
        "date = 2026-12-04\n"
        'implementations = ["no-such-implementation"]\ncases = ["M1"]\n'
        'reason = "r"\nlink = "l"\n',
        encoding="utf-8",
    )
    report = tmp_path / "report.json"
    completed = run_suite(
        "--adapter=tests.faults:Float32Kernel",
        "--cases=M1",
        f"--deviations={entries}",
        f"--report={report}",
    )
    assert completed.returncode == 0, completed.stdout[-2000:]
    document = read_report(report)
    assert document["stale_deviations"] == []
    assert len(document["unexercised_deviations"]) == 1
    assert "unexercised: deviation #1" in completed.stdout


def test_repeated_values_select_once(tmp_path):
    report = tmp_path / "report.json"
    completed = run_suite(
        "--adapter=tests.faults:Float32Kernel",
        "--dtypes=float32,float32",
        "--cases=M1,M1",
        f"--report={report}",
    )
    assert completed.returncode == 0, completed.stdout[-2000:]
    results = read_report(report)["results"]
    assert len(results) == 4  # one item, four quantities
    assert "M1_0" not in completed.stdout


def test_case_beyond_dtype_range_is_recorded_unsupported(tmp_path):
    report = tmp_path / "report.json"
    completed = run_suite(
        "--adapter=tests.faults:Float32Kernel",
        "--dtypes=float32,float16",
        "--cases=large-mean-1e6",
        f"--report={report}",
        "-rs",
    )
    assert completed.returncode == 0, completed.stdout[-2000:]
    records = read_report(report)["results"]
    float16 = [r for r in records if r["dtype"] == "float16"]
    assert float16 and {r["verdict"] for r in float16} == {"unsupported"}
    assert "beyond float16's largest finite value" in float16[0]["message"]


def test_rerun_command_keeps_the_deviations_file(tmp_path):
    entries = tmp_path / "empty.toml"
    entries.write_text("", encoding="utf-8")
    completed = run_suite(
        "--adapter=tests.faults:OnePassVariance",
        "--cases=large-mean-1e4",
        f"--deviations={entries}",
    )
    assert completed.returncode == 1
    rerun = [line for line in completed.stdout.splitlines() if "rerun: python" in line]
    assert rerun
    assert f"--deviations={entries}" in rerun[0]
    assert "--cases=large-mean-1e4" in rerun[0]
    assert "--devices=cpu" in rerun[0]


def test_no_adapter_at_all_is_usage_error(tmp_path):
    # Shadow every framework the built-in adapters import with a module that fails
    # to import, as on a machine where none is installed.
    for name in ("torch", "onnxruntime", "onnx", "tensorflow", "keras", "mxnet"):
        (tmp_path / f"{name}.py").write_text(
            f"raise ImportError('{name} hidden by the test')\n", encoding="utf-8"
        )
    completed = run_suite(python_path=tmp_path)
    assert completed.returncode == USAGE_ERROR, completed.stdout[-2000:]
    assert "no adapter to run" in completed.stderr


def test_intermittent_entry_is_not_stale(tmp_path):
    entries = tmp_path / "deviations.toml"
    entries.write_text(
        "[[deviation]]\n"
        'framework = "fault-one-pass-variance"\n'
        'versions = ">=1"\n'
        "date = 2026-12-04\n"
        'implementations = ["kernel"]\n'
        'cases = ["random-2d"]\n'
        "intermittent = true\n"
        'reason = "shows in some seeds only"\n'
        'link = "tests/test_suite_run.py"\n',
        encoding="utf-8",
    )
    report = tmp_path / "fault.json"
    completed = run_suite(
        "--adapter=tests.faults:OnePassVariance",
        "--dtypes=float32",
        "--cases=random-2d",
        f"--deviations={entries}",
        f"--report={report}",
    )
    assert completed.returncode == 0, completed.stdout[-3000:]
    assert read_report(report)["stale_deviations"] == []


def test_gpu_selects_cuda_devices(tmp_path):
    (tmp_path / "trial_adapter.py").write_text(
        "from adapters.contract import Device\n"
        "from tests.faults import Float32Kernel\n"
        "class A(Float32Kernel):\n"
        "    def devices(self):\n"
        "        return [Device('cpu'), Device('cuda', False, 'no GPU here')]\n",
        encoding="utf-8",
    )
    report = tmp_path / "report.json"
    completed = run_suite(
        "--adapter=trial_adapter:A",
        "--devices=gpu",
        "--cases=M1",
        f"--report={report}",
        python_path=tmp_path,
    )
    assert completed.returncode == 0, completed.stderr[-2000:]
    devices = {record["device"] for record in read_report(report)["results"]}
    assert devices == {"cuda"}


def test_update_deviations_drafts_failing_items(tmp_path):
    entries = tmp_path / "empty.toml"
    entries.write_text("", encoding="utf-8")
    updated = tmp_path / "review" / "deviations.toml"
    completed = run_suite(
        "--adapter=tests.faults:OnePassVariance",
        "--dtypes=float32",
        "--cases=large-mean-1e4,random-2d",
        f"--deviations={entries}",
        f"--update-deviations={updated}",
    )
    assert completed.returncode == 1
    assert "deviations for review:" in completed.stdout
    text = updated.read_text(encoding="utf-8")
    assert "TODO" in text
    with pytest.raises(deviations.DeviationsError, match="draft"):
        deviations.load(updated)
    updated.write_text(text.replace("TODO", "written"), encoding="utf-8")
    drafts = deviations.load(updated)
    assert [entry.items for entry in drafts] == [
        ("fault-one-pass-variance-kernel-cpu-float32-large-mean-1e4",)
    ]


def test_entry_beyond_its_bound_is_outgrown_not_stale(tmp_path):
    entries = tmp_path / "deviations.toml"
    entries.write_text(
        "[[deviation]]\n"
        'framework = "fault-one-pass-variance"\n'
        'versions = ">=1"\n'
        "date = 2026-12-04\n"
        'implementations = ["kernel"]\n'
        'cases = ["large-mean-1e6"]\n'
        "max_error = 10\n"
        'reason = "bounded for a test"\n'
        'link = "tests/test_suite_run.py"\n',
        encoding="utf-8",
    )
    report = tmp_path / "report.json"
    completed = run_suite(
        "--adapter=tests.faults:OnePassVariance",
        "--dtypes=float32",
        "--cases=large-mean-1e6",
        f"--deviations={entries}",
        f"--report={report}",
    )
    assert completed.returncode == 1
    document = read_report(report)
    assert document["stale_deviations"] == []
    assert len(document["outgrown_deviations"]) == 1
    assert "outgrown: deviation #1" in completed.stdout


def test_stopped_run_marked_incomplete(tmp_path):
    report = tmp_path / "report.json"
    completed = run_suite(
        "--adapter=tests.faults:OnePassVariance",
        "--dtypes=float32",
        "--cases=random-2d,large-mean-1e4,random-1d",
        "-x",
        f"--report={report}",
    )
    assert completed.returncode == 1
    run = read_report(report)["run"]
    assert run == {"items": 3, "items_recorded": 2, "complete": False, "exit_status": 1}
    assert "incomplete run: 2 of 3 selected items recorded verdicts" in completed.stdout


def test_deselected_items_leave_run_complete(tmp_path):
    report = tmp_path / "report.json"
    completed = run_suite(
        "--adapter=tests.faults:Float32Kernel",
        "--dtypes=float32",
        "-k",
        "random",
        f"--report={report}",
    )
    assert completed.returncode == 0
    run = read_report(report)["run"]
    assert run == {"items": 3, "items_recorded": 3, "complete": True, "exit_status": 0}


def test_rerun_command_names_only_its_adapter(tmp_path):
    report = tmp_path / "report.json"
    run_suite(
        "--adapter=tests.faults:Float32Kernel",
        "--adapter=tests.faults:OnePassVariance",
        "--dtypes=float32",
        "--cases=M1",
        f"--report={report}",
    )
    document = read_report(report)
    for record in document["results"]:
        spec = (
            "tests.faults:Float32Kernel"
            if record["framework"] == "numpy-float32"
            else "tests.faults:OnePassVariance"
        )
        assert record["command"].endswith(f"--cases=M1 --adapter={spec}")
    assert document["environment"]["command"][:4] == [
        "python",
        "-m",
        "pytest",
        "suites",
    ]


def test_sigterm_writes_incomplete_report(tmp_path):
    report = tmp_path / "report.json"
    command = [*SUITE, "--adapter=tests.broken_adapters:InfiniteLoop"]
    command += ["--dtypes=float32", "--cases=random-1d,random-2d,M1"]
    command += [f"--report={report}"]
    marker = tmp_path / "hanging"
    process = subprocess.Popen(
        command,
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=dict(os.environ, NORMCONF_TEST_HANG_MARKER=str(marker)),
    )
    # random-1d passes, then random-2d never returns: wait for the hang.
    deadline = time.monotonic() + 120
    while not marker.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    process.send_signal(signal.SIGTERM)
    output, _ = process.communicate(timeout=60)
    assert process.returncode == 2, output[-2000:]
    run = read_report(report)["run"]
    assert run == {"items": 3, "items_recorded": 1, "complete": False, "exit_status": 2}


def test_version_outside_pep440_warns(tmp_path):
    entries = tmp_path / "deviations.toml"
    entries.write_text(
        "[[deviation]]\n"
        'framework = "nightly-kernel"\n'
        'versions = ">=1"\n'
        "date = 2026-12-04\n"
        'implementations = ["kernel"]\n'
        'cases = ["M1"]\n'
        'reason = "a test entry"\n'
        'link = "tests/test_suite_run.py"\n',
        encoding="utf-8",
    )
    source = (
        BASE + "class A(Float32Kernel):\n"
        "    framework = 'nightly-kernel'\n"
        "    def version(self):\n        return 'nightly build 42'\n"
    )
    completed = run_with_module(
        tmp_path,
        source,
        "--adapter=trial_adapter:A",
        "--cases=M1",
        f"--deviations={entries}",
    )
    assert completed.returncode == 0, completed.stdout[-2000:]
    assert (
        "normconf: WARNING: 1 deviation entries for nightly-kernel cannot apply: its "
        "version 'nightly build 42' is not a PEP 440 version" in completed.stdout
    )


def test_rerun_command_repeats_isolation_options(tmp_path):
    report = tmp_path / "report.json"
    run_suite(
        "--adapter=tests.faults:Float32Kernel",
        "--dtypes=float32",
        "--cases=M1",
        "--item-timeout=30",
        f"--report={report}",
    )
    commands = {record["command"] for record in read_report(report)["results"]}
    assert len(commands) == 1
    assert next(iter(commands)).endswith(
        "--adapter=tests.faults:Float32Kernel --item-timeout=30.0"
    )


def test_parallel_run_gives_serial_verdicts(tmp_path):
    pytest.importorskip("xdist")
    reports = {}
    for name, options in (("serial", []), ("parallel", ["-n", "2"])):
        reports[name] = tmp_path / f"{name}.json"
        completed = run_suite(
            "--adapter=tests.faults:OnePassVariance",
            "--adapter=tests.broken_adapters:Erratic",
            "--dtypes=float32,float16",
            f"--report={reports[name]}",
            *options,
        )
        assert completed.returncode == 1, completed.stdout[-2000:]

    def verdicts(path: Path) -> dict:
        return {
            (r["framework"], r["dtype"], r["case"], r["quantity"]): (
                r["verdict"],
                r["error"],
            )
            for r in read_report(path)["results"]
        }

    serial, parallel = verdicts(reports["serial"]), verdicts(reports["parallel"])
    assert parallel == serial
    assert {verdict for verdict, _ in serial.values()} >= {"pass", "fail", "error"}
    assert read_report(reports["parallel"])["run"]["complete"] is True


def test_run_without_records_names_its_report(tmp_path):
    report = tmp_path / "report.json"
    completed = run_suite(
        "--adapter=tests.faults:Float32Kernel",
        "--cases=random-2d",
        f"--report={report}",
        "-k",
        "no_test_has_this_name",
    )
    document = json.loads(report.read_text(encoding="utf-8"))
    assert document["results"] == []
    assert f"report: {report.resolve()}" in completed.stdout, completed.stdout[-2000:]
