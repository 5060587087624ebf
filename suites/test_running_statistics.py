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
from suites.plugin import judge_item
from suites.running_statistics import RunningTarget
from suites.test_normalization import rerun_command


def test_running_statistics(
    running_target: RunningTarget, request: pytest.FixtureRequest
):
    target = running_target
    item, mode = target.item, target.mode
    # No replay bundle, even with --replay-dir: a bundle cannot carry the running
    # statistics and the mode.
    judge_item(
        request,
        target,
        rerun_command(request, target),
        reason=lambda: running_statistics.unsupported_reason(
            target.adapter, target.implementation, target.device, item, mode
        ),
        error_records=lambda message: running_statistics.error_records(
            item, mode, message
        ),
        unsupported_records=lambda reason: running_statistics.unsupported_records(
            item, mode, reason
        ),
        run=lambda: running_statistics.run_item(
            target.adapter, item, target.implementation, mode
        ),
    )
