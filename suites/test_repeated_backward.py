"""Repeated backward: one item per (implementation that declares backward
schemes, device, dtype, case, scheme), in the default execution mode, with the
ids of the first-order items and the scheme appended.

A "repeat" item runs one forward pass and REPEATS backward passes through it,
each with its own grad_output and into fresh gradients; an "accumulate" item runs
REPEATS forward and backward steps whose gradients the framework adds up. Each
records a verdict per gradient for its worst call.
"""

from __future__ import annotations

import pytest

from suites import repeated_backward
from suites.plugin import record_verdicts
from suites.repeated_backward import BackwardTarget
from suites.test_normalization import rerun_command
from suites.verdicts import AdapterMethodError, item_inputs


def test_repeated_backward(
    backward_target: BackwardTarget, request: pytest.FixtureRequest
):
    target = backward_target
    item, scheme = target.item, target.scheme

    command = rerun_command(request, target)
    try:
        reason = repeated_backward.unsupported_reason(
            target.adapter, target.implementation, target.device, item, scheme
        )
    except AdapterMethodError as error:
        records = repeated_backward.error_records(item, scheme, str(error))
        record_verdicts(request.node, target, records, command, None, False)
        pytest.fail(str(error))
    if reason:
        records = repeated_backward.unsupported_records(item, scheme, reason)
        record_verdicts(request.node, target, records, command, None, False)
        pytest.skip(reason)

    records = repeated_backward.run_item(target.adapter, item, scheme)
    # NOTE: no replay bundle, even with --replay-dir: a bundle holds a
    # first-order request, without the grad_output stack and the scheme.
    rows = record_verdicts(
        request.node, target, records, command, item_inputs(item), False
    )

    overview = "; ".join(f"{r['quantity']} {r['verdict']}" for r in rows)
    for row in rows:
        assert row["conforming"], (
            f"{row['message']}\n  all quantities: {overview}\n  rerun: {command}"
        )
