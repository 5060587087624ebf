"""Worker isolation: a backend that crashes, hangs, leaks or returns garbage on one
item costs that item only.

Each adapter from tests/broken_adapters.py breaks on the case random-2d and is
correct on random-1d and M1, which run before and after it. Each test therefore
shows that the broken item gets verdict `error` with its cause, and that the run
went on with a working worker.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.subprocess_runs import run_suite

ROOT = Path(__file__).resolve().parents[1]
USAGE_ERROR = 4
CASES = ("random-1d", "random-2d", "M1")
QUANTITY_NAMES = ("output", "grad_input", "grad_gamma", "grad_beta")
QUANTITIES = len(QUANTITY_NAMES)


def run_broken(tmp_path: Path, adapter: str, *options: str) -> tuple[list, str]:
    report = tmp_path / "report.json"
    completed = run_suite(
        f"--adapter=tests.broken_adapters:{adapter}",
        "--dtypes=float32",
        f"--cases={','.join(CASES)}",
        f"--report={report}",
        *options,
    )
    assert completed.returncode == 1, completed.stdout[-3000:] + completed.stderr
    return json.loads(report.read_text(encoding="utf-8"))["results"], completed.stdout


@pytest.mark.parametrize(
    "adapter, options, cause",
    [
        (
            "Segfault",
            (),
            "the worker process died from signal SIGSEGV (11) while running the "
            "item; faulthandler: Fatal Python error: Segmentation fault",
        ),
        (
            "Abort",
            (),
            "the worker process died from signal SIGABRT (6) while running the item",
        ),
        (
            "InfiniteLoop",
            ("--item-timeout=2",),
            "timed out: the worker process was running the item for more than 2 s "
            "(--item-timeout) and was killed",
        ),
        (
            "MemoryLeak",
            ("--worker-memory=400",),
            "out of memory: the worker process used ",
        ),
        ("WrongShape", (), "output has shape (2, 3, 5, 6), expected (2, 3, 5, 7)"),
        ("WrongDtype", (), "the framework returned float64 for a float32 input"),
        (
            "NanEverywhere",
            (),
            "every element of every returned quantity is NaN where every exact "
            "value is finite",
        ),
        ("ReturnsNone", (), "adapter returned NoneType, not a Result"),
    ],
)
def test_broken_item_error_run_continues(tmp_path, adapter, options, cause):
    results, _ = run_broken(tmp_path, adapter, *options)
    assert len(results) == len(CASES) * QUANTITIES

    # A wrong output shape spoils the output only: the gradients are judged.
    spoiled = {"output"} if adapter == "WrongShape" else set(QUANTITY_NAMES)
    broken = [
        r for r in results if r["case"] == "random-2d" and r["quantity"] in spoiled
    ]
    assert {r["quantity"] for r in broken} == spoiled
    assert {r["verdict"] for r in broken} == {"error"}
    assert all(r["message"].startswith(cause) for r in broken), broken[0]["message"]
    others = [r for r in results if r not in broken]
    assert {r["verdict"] for r in others} == {"pass"}


@pytest.mark.parametrize("adapter", ["LoadCrash", "Segfault", "InfiniteLoop"])
def test_worker_leaves_no_area_files(tmp_path, adapter):
    areas = tmp_path / "areas"
    areas.mkdir()
    completed = run_suite(
        f"--adapter=tests.broken_adapters:{adapter}",
        "--dtypes=float32",
        "--cases=random-1d,random-2d",
        "--item-timeout=2",
        env={"NORMCONF_AREA_DIR": str(areas)},
    )
    assert completed.returncode == 1, completed.stdout[-2000:]
    assert list(areas.iterdir()) == []


def test_memory_message_names_the_limit(tmp_path):
    results, _ = run_broken(tmp_path, "MemoryLeak", "--worker-memory=400")
    message = next(r["message"] for r in results if r["verdict"] == "error")
    assert "over the --worker-memory limit of 400 MiB, and was killed" in message


def test_load_crash_fails_each_item(tmp_path):
    results, stdout = run_broken(tmp_path, "LoadCrash")
    assert len(results) == len(CASES) * QUANTITIES
    assert {r["verdict"] for r in results} == {"error"}
    messages = {r["message"] for r in results}
    # The first item pays for the failed start; the others get its message.
    assert len(messages) == 1
    assert next(iter(messages)).startswith(
        "the worker process died from signal SIGABRT (6) while loading the adapter"
    )
    assert "3 failed" in stdout


def test_no_isolation_runs_in_pytest(tmp_path):
    report = tmp_path / "report.json"
    completed = run_suite(
        "--adapter=tests.broken_adapters:Erratic",
        "--dtypes=float32",
        "--cases=M1,random-2d",
        "--isolation=none",
        f"--report={report}",
    )
    assert completed.returncode == 1
    results = json.loads(report.read_text(encoding="utf-8"))["results"]
    m1 = [r for r in results if r["case"] == "M1"]
    # The location is the adapter's own line, as with isolation.
    assert all(
        r["message"].startswith("adapter raised RuntimeError: erratic cannot")
        and "broken_adapters.py" in r["message"]
        for r in m1
    )


@pytest.mark.parametrize(
    "option, message",
    [
        ("--item-timeout=0", "--item-timeout must be a positive number"),
        ("--item-timeout=-3", "--item-timeout must be a positive number"),
        ("--item-timeout=nan", "--item-timeout must be a positive number"),
        ("--item-timeout=inf", "--item-timeout must be a positive number"),
        ("--worker-memory=-1", "--worker-memory must be 0"),
        ("--isolation=thread", "invalid choice: 'thread'"),
    ],
)
def test_invalid_isolation_option(option, message):
    completed = run_suite("--adapter=tests.faults:Float32Kernel", "--cases=M1", option)
    assert completed.returncode == USAGE_ERROR
    assert message in completed.stderr


# A pytest stand-in that starts a worker on an item that never ends.
HANGING_PARENT = """
import sys
from adapters.contract import Request
from suites import cases, isolation
from suites.verdicts import Item, build_request

worker = isolation.Worker(
    ("adapter", "tests.broken_adapters:InfiniteLoop"), isolation.Limits(600, None)
)
worker.start()
print(worker.process.pid, flush=True)
item = Item("broken-hang", "kernel", "cpu", "float32", cases.by_name("random-2d"), 0)
inputs = cases.materialize(item.case, "float32", 0)
worker.run(build_request(item, inputs, True))
"""


def process_gone(pid: int) -> bool:
    """Return True once `pid` has exited (a zombie awaiting its reaper counts)."""
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as status:
            return any(line.split() == ["State:", "Z", "(zombie)"] for line in status)
    except FileNotFoundError:
        return True


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="uses prctl")
def test_worker_dies_with_killed_parent():
    parent = subprocess.Popen(
        [sys.executable, "-c", HANGING_PARENT],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        worker_pid = int(parent.stdout.readline())
        time.sleep(0.5)
        assert not process_gone(worker_pid)
        os.kill(parent.pid, signal.SIGKILL)
        parent.wait(timeout=30)
        deadline = time.monotonic() + 10
        while not process_gone(worker_pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert process_gone(worker_pid)
    finally:
        parent.kill()
        parent.stdout.close()
