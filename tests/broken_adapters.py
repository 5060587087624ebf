"""Adapters that break in ways other than slightly wrong numbers, for the suite's
own tests.

`tests.faults` contains kernels that compute slightly wrong results. The adapters
here reject inputs, raise, crash, hang, leak memory or return malformed results, so
that reports, pages and worker isolation meet every failure a real backend shows.
"""

from __future__ import annotations

import ctypes
import os
import sys
import time

import numpy as np

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


# Adapters that break on one case only, as a young backend does, and compute
# correctly on every other: the run must record the broken item as `error` with
# its cause and go on to the next item.
BROKEN_CASE = "random-2d"
BROKEN_SHAPE = (2, 3, 5, 7)


class BreaksOnOneCase(Float32Kernel):
    """The correct float32 kernel, except on the case BROKEN_CASE."""

    def run(self, request: Request) -> Result:
        if request.x.shape == BROKEN_SHAPE:
            return self.broken_run(request)
        return super().run(request)

    def broken_run(self, request: Request) -> Result:
        raise NotImplementedError


class Segfault(BreaksOnOneCase):
    """Reads address 0 through ctypes: the process dies from SIGSEGV."""

    framework = "broken-segfault"

    def broken_run(self, request):
        ctypes.string_at(0)


class Abort(BreaksOnOneCase):
    """Calls abort(): the process dies from SIGABRT, as after a failed C assert."""

    framework = "broken-abort"

    def broken_run(self, request):
        os.abort()


class InfiniteLoop(BreaksOnOneCase):
    """Never returns."""

    framework = "broken-hang"

    def broken_run(self, request):
        while True:
            time.sleep(0.01)


class MemoryLeak(BreaksOnOneCase):
    """Allocates 64 MiB after 64 MiB, touching every page, and never frees them."""

    framework = "broken-leak"

    def broken_run(self, request):
        leaked = []
        while True:
            leaked.append(np.ones(8 * 1024 * 1024))
            time.sleep(0.005)


class WrongShape(BreaksOnOneCase):
    """Returns the output without its last spatial element."""

    framework = "broken-shape"

    def broken_run(self, request):
        result = Float32Kernel.run(self, request)
        result.output = result.output[..., :-1]
        return result


class WrongDtype(BreaksOnOneCase):
    """Returns float64 arrays for a float32 request and declares no dtype."""

    framework = "broken-dtype"

    def broken_run(self, request):
        result = Float32Kernel.run(self, request)
        for name in ("output", "grad_input", "grad_gamma", "grad_beta"):
            value = getattr(result, name)
            if value is not None:
                setattr(result, name, value.astype(np.float64))
        result.dtype = None
        return result


class NanEverywhere(BreaksOnOneCase):
    """Returns arrays of the right shape and dtype that are NaN in every element."""

    framework = "broken-nan"

    def broken_run(self, request):
        result = Float32Kernel.run(self, request)
        for name in ("output", "grad_input", "grad_gamma", "grad_beta"):
            value = getattr(result, name)
            if value is not None:
                value[...] = np.nan
        return result


class ReturnsNone(BreaksOnOneCase):
    """Returns None instead of a Result."""

    framework = "broken-none"

    def broken_run(self, request):
        return None


class LoadCrash(Float32Kernel):
    """Loads in the pytest process but kills any worker process that loads it, as
    a backend whose device initialization crashes does."""

    framework = "broken-load"

    def __init__(self) -> None:
        main = sys.modules["__main__"]
        if getattr(main.__spec__, "name", None) == "suites.isolation":
            os.abort()
