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
from suites.plugin import Target, judge_item
from suites.test_normalization import rerun_command


def test_second_order(second_order_target: Target, request: pytest.FixtureRequest):
    target = second_order_target
    item = target.item
    # No replay bundle, even with --replay-dir: a bundle contains the first-order
    # request only, and replaying it would not pose v.
    judge_item(
        request,
        target,
        rerun_command(request, target),
        reason=lambda: second_order.unsupported_reason(
            target.adapter, target.implementation, target.device, item
        ),
        error_records=lambda message: second_order.error_records(item, message),
        unsupported_records=lambda reason: second_order.unsupported_records(
            item, reason
        ),
        run=lambda: second_order.run_item(target.adapter, item),
    )
