"""Second derivatives of the normalization family: one item per (implementation
that declares second derivatives, device, dtype, case), with the ids of the
first-order items.

Each item hands the adapter the case's inputs and a direction v shaped like x, and
records a verdict for the gradients of L = sum(v * grad_input) with respect to x
(grad2_input), gamma (grad2_gamma) and grad_output (grad2_grad_output).
"""

from __future__ import annotations

import pytest

from suites import second_order
from suites.plugin import Target, record_verdicts
from suites.test_normalization import rerun_command
from suites.verdicts import AdapterMethodError, item_inputs


def test_second_order(second_order_target: Target, request: pytest.FixtureRequest):
    target = second_order_target
    item = target.item

    command = rerun_command(request, target)
    try:
        reason = second_order.unsupported_reason(
            target.adapter, target.implementation, target.device, item
        )
    except AdapterMethodError as error:
        records = second_order.error_records(item, str(error))
        record_verdicts(request.node, target, records, command, None, False)
        pytest.fail(str(error))
    if reason:
        records = second_order.unsupported_records(item, reason)
        record_verdicts(request.node, target, records, command, None, False)
        pytest.skip(reason)

    records = second_order.run_item(target.adapter, item)
    inputs = item_inputs(item)
    # NOTE: no replay bundle, even with --replay-dir: a bundle contains the
    # first-order request only, and replaying it would not pose v.
    rows = record_verdicts(request.node, target, records, command, inputs, False)

    overview = "; ".join(f"{r['quantity']} {r['verdict']}" for r in rows)
    for row in rows:
        assert row["conforming"], (
            f"{row['message']}\n  all quantities: {overview}\n  rerun: {command}"
        )
