"""InstanceNorm conformance: one item per (implementation, device, dtype, case).

Each item records a verdict for the output and each gradient in the report, then
asserts each quantity on its own, so a failure message names the quantity, its worst
element, the value got, the value expected and the error against the budget.
"""

from __future__ import annotations

import shlex

import pytest

from suites import deviations
from suites.cases import materialize
from suites.plugin import Target, record_verdicts
from suites.verdicts import run_item, unsupported_reason, unsupported_records


def rerun_command(request: pytest.FixtureRequest, target: Target) -> str:
    """Return a command that reruns this item alone with the same inputs."""
    config = request.config
    options = [
        f"--seed={config.getoption('seed')}",
        f"--dtypes={target.item.dtype}",
        f"--devices={target.item.device}",
        f"--cases={target.item.case.name}",
    ]
    options += [f"--framework={name}" for name in config.getoption("framework")]
    options += [f"--adapter={spec}" for spec in config.getoption("adapter")]
    if config.getoption("deviations") != str(deviations.DEFAULT_PATH):
        options.append(f"--deviations={config.getoption('deviations')}")
    return shlex.join(["python", "-m", "pytest", request.node.nodeid, *options])


def test_instance_norm(conformance_target: Target, request: pytest.FixtureRequest):
    target = conformance_target
    implementation = target.implementation

    command = rerun_command(request, target)
    reason = unsupported_reason(
        target.adapter, implementation, target.device, target.item
    )
    if reason:
        records = unsupported_records(target.item, reason, implementation.gradients)
        record_verdicts(request.node, target, records, command, None)
        pytest.skip(reason)

    item = target.item
    records = run_item(target.adapter, item, implementation)
    # The arrays run_item used: materialize caches them.
    inputs = materialize(item.case, item.dtype, item.seed)
    rows = record_verdicts(request.node, target, records, command, inputs)

    overview = "; ".join(f"{r['quantity']} {r['verdict']}" for r in rows)
    commands = f"  rerun: {command}"
    if rows[0]["replay_command"]:
        commands += f"\n  replay the bundle: {rows[0]['replay_command']}"
    for row in rows:
        assert row["conforming"], (
            f"{row['message']}\n  all quantities: {overview}\n{commands}"
        )
