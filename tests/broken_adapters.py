"""Adapters that break in ways other than wrong numbers, for the suite's own tests.

`tests.faults` contains kernels that compute a wrong answer. The adapters here reject
inputs or raise, so that reports and pages show every verdict a real run can give.
"""

from __future__ import annotations

from adapters.contract import Rejected, Request, Result
from tests.faults import Float32Kernel


class Erratic(Float32Kernel):
    """The correct float32 kernel, except that it rejects an empty batch (verdict
    `rejected`) and raises on a one-element slice (verdict `error`)."""

    framework = "erratic"

    def run(self, request: Request) -> Result:
        if request.x.shape[0] == 0:
            raise Rejected("erratic rejects an empty batch")
        spatial = (
            request.x.shape[2:]
            if request.layout == "channels_first"
            else request.x.shape[1:-1]
        )
        if all(size == 1 for size in spatial):
            raise RuntimeError("erratic cannot normalize a one-element slice")
        return super().run(request)
