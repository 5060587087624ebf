"""Running statistics of BatchNorm and InstanceNorm: one item per (implementation
that keeps running statistics, device, dtype, case, mode), with the ids of the
first-order items and the mode appended.

A "training" item runs one training step from the running statistics posed with
the case and records a verdict for the running mean and variance after it, under
the update convention the implementation names. An "inference" item normalizes
with those statistics and records verdicts for the output and the gradients.
"""

from __future__ import annotations

import pytest

from suites import running_statistics
from suites.plugin import record_verdicts
from suites.running_statistics import RunningTarget
from suites.test_normalization import rerun_command
from suites.verdicts import AdapterMethodError, item_inputs


def test_running_statistics(
    running_target: RunningTarget, request: pytest.FixtureRequest
):
    target = running_target
    item, mode = target.item, target.mode

    command = rerun_command(request, target)
    try:
        reason = running_statistics.unsupported_reason(
            target.adapter, target.implementation, target.device, item, mode
        )
    except AdapterMethodError as error:
        records = running_statistics.error_records(item, mode, str(error))
        record_verdicts(request.node, target, records, command, None, False)
        pytest.fail(str(error))
    if reason:
        records = running_statistics.unsupported_records(item, mode, reason)
        record_verdicts(request.node, target, records, command, None, False)
        pytest.skip(reason)

    records = running_statistics.run_item(
        target.adapter, item, target.implementation, mode
    )
    # NOTE: no replay bundle, even with --replay-dir: a bundle holds a
    # first-order request, without the running statistics and the mode.
    rows = record_verdicts(
        request.node, target, records, command, item_inputs(item), False
    )

    overview = "; ".join(f"{r['quantity']} {r['verdict']}" for r in rows)
    for row in rows:
        assert row["conforming"], (
            f"{row['message']}\n  all quantities: {overview}\n  rerun: {command}"
        )
