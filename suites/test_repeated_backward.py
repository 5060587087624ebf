"""Repeated backward: one item per (implementation that declares backward
schemes, device, dtype, case, scheme), in the default execution mode, with the
ids of the first-order items and the scheme appended.

A "repeat" item runs one forward pass and REPEATS backward passes through it,
each with its own grad_output and into fresh gradients. An "accumulate" item runs
REPEATS forward and backward steps whose gradients the framework adds up. Each
records a verdict per gradient for its worst call.
"""

from __future__ import annotations

import pytest

from suites import repeated_backward
from suites.plugin import judge_item
from suites.repeated_backward import BackwardTarget
from suites.test_normalization import rerun_command


def test_repeated_backward(
    backward_target: BackwardTarget, request: pytest.FixtureRequest
):
    target = backward_target
    item, scheme = target.item, target.scheme
    # No replay bundle, even with --replay-dir: a bundle cannot carry the
    # grad_output stack and the scheme.
    judge_item(
        request,
        target,
        rerun_command(request, target),
        reason=lambda: repeated_backward.unsupported_reason(
            target.adapter, target.implementation, target.device, item, scheme
        ),
        error_records=lambda message: repeated_backward.error_records(
            item, scheme, message
        ),
        unsupported_records=lambda reason: repeated_backward.unsupported_records(
            item, scheme, reason
        ),
        run=lambda: repeated_backward.run_item(target.adapter, item, scheme),
    )
