"""Conformance of the normalization family: one item per (implementation, device,
dtype, case). Each implementation computes one operator (InstanceNorm, GroupNorm,
LayerNorm or BatchNorm in training mode), which the item id carries in the
implementation's name.

Each item records a verdict for the output and each gradient in the report, then
asserts each quantity on its own, so a failure message names the quantity, its worst
element, the value got, the value expected and the error against the budget.
"""

from __future__ import annotations

import pytest

from suites.plugin import Target, command_for_test, record_verdicts
from suites.verdicts import (
    AdapterMethodError,
    error_records,
    item_inputs,
    run_item,
    unsupported_reason,
    unsupported_records,
)


def rerun_command(request: pytest.FixtureRequest, target: Target) -> str:
    """Return a command that reruns this item alone with the same inputs, through
    the adapter that ran it, from the folder the run started in."""
    options = [
        f"--seed={request.config.getoption('seed')}",
        f"--dtypes={target.item.dtype}",
        f"--devices={target.item.device}",
        f"--cases={target.item.case.name}",
    ]
    return command_for_test(request, target.adapter.framework, options)


def test_normalization(conformance_target: Target, request: pytest.FixtureRequest):
    target = conformance_target
    implementation = target.implementation

    command = rerun_command(request, target)
    try:
        reason = unsupported_reason(
            target.adapter, implementation, target.device, target.item
        )
    except AdapterMethodError as error:
        records = error_records(target.item, str(error), implementation.gradients)
        record_verdicts(request.node, target, records, command, None)
        pytest.fail(str(error))
    if reason:
        records = unsupported_records(target.item, reason, implementation.gradients)
        record_verdicts(request.node, target, records, command, None)
        pytest.skip(reason)

    item = target.item
    records = run_item(target.adapter, item, implementation)
    # The arrays run_item used: suites.cases.materialize caches them.
    inputs = item_inputs(item)
    rows = record_verdicts(request.node, target, records, command, inputs)

    overview = "; ".join(f"{r['quantity']} {r['verdict']}" for r in rows)
    commands = f"  rerun: {command}"
    if rows[0]["replay_command"]:
        commands += f"\n  replay the bundle: {rows[0]['replay_command']}"
    for row in rows:
        assert row["conforming"], (
            f"{row['message']}\n  all quantities: {overview}\n{commands}"
        )
