"""InstanceNorm conformance: one item per (implementation, device, dtype, case).

Each item records a verdict for the output and each gradient in the report, then
asserts each quantity on its own, so a failure message names the quantity, its worst
element, the value got, the value expected and the error against the budget.
"""

from __future__ import annotations

import shlex

import pytest

from suites import deviations
from suites.plugin import Target, record_verdicts, write_replay_bundle
from suites.verdicts import run_item, unsupported_reason, unsupported_records


def replay_command(request: pytest.FixtureRequest, target: Target) -> str:
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

    reason = unsupported_reason(
        target.adapter, implementation, target.device, target.item
    )
    if reason:
        records = unsupported_records(target.item, reason, implementation.gradients)
        record_verdicts(request.node, target, records)
        pytest.skip(reason)

    records = record_verdicts(
        request.node, target, run_item(target.adapter, target.item, implementation)
    )

    overview = "; ".join(f"{r['quantity']} {r['verdict']}" for r in records)
    replay = replay_command(request, target)
    write_replay_bundle(request.node, target, records, replay)
    for record in records:
        assert record["conforming"], (
            f"{record['message']}\n  all quantities: {overview}\n  replay: {replay}"
        )
