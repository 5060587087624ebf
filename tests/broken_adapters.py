"""Adapters that break in ways other than slightly wrong numbers, for the suite's
own tests.

`tests.faults` contains kernels that compute slightly wrong results. The adapters
here reject inputs, raise, crash, hang, leak memory or return malformed results, so
that reports, pages and worker isolation meet every failure a real backend shows.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np

from adapters.contract import (
    CONTRACT_VERSION,
    Device,
    Implementation,
    Rejected,
    Request,
    Result,
)
from tests.faults import Float32Kernel


class Declares:
    """An adapter that declares one implementation and runs nothing, for tests of
    what the suite decides from declarations alone."""

    contract_version = CONTRACT_VERSION
    framework = "declares"

    def __init__(self, implementation: Implementation) -> None:
        self.implementation = implementation

    def version(self) -> str:
        return "1.0"

    def implementations(self) -> list[Implementation]:
        return [self.implementation]

    def devices(self) -> list[Device]:
        return [Device("cpu")]

    def run(self, request: Request) -> Result:
        raise NotImplementedError


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
    """Never returns. When NORMCONF_TEST_HANG_MARKER is set, creates the file it
    names as it starts to hang, so that a test can wait for that moment."""

    framework = "broken-hang"

    def broken_run(self, request):
        marker = os.environ.get("NORMCONF_TEST_HANG_MARKER")
        if marker:
            Path(marker).touch()
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


class ChangesInput(BreaksOnOneCase):
    """Writes zeros into x before computing, as an in-place kernel does."""

    framework = "broken-in-place"

    def broken_run(self, request):
        request.x.flags.writeable = True
        request.x[...] = 0
        return Float32Kernel.run(self, request)


class ForeignOutput(BreaksOnOneCase):
    """Returns its output as a memoryview, an object that cannot be pickled, as a
    framework tensor left unconverted can be."""

    framework = "broken-foreign"

    def broken_run(self, request):
        result = Float32Kernel.run(self, request)
        result.output = memoryview(result.output)
        return result


class DtypeObject(Float32Kernel):
    """Declares its result's dtype as a NumPy dtype instead of its name."""

    framework = "dtype-object"

    def run(self, request):
        result = super().run(request)
        result.dtype = np.dtype(result.dtype)
        return result


class UnsupportedReasonRaises(BreaksOnOneCase):
    """unsupported_reason() raises for float16 and returns a number for float64."""

    framework = "broken-reason"

    def unsupported_reason(self, implementation, device, dtype):
        if dtype == "float16":
            raise LookupError("no table entry")
        if dtype == "float64":
            return 42
        return super().unsupported_reason(implementation, device, dtype)


class ReplacesFolder(Float32Kernel):
    """Replaces the folder NORMCONF_TEST_FOLDER names with a plain file on its
    first item, so that a report due there cannot be written at the end."""

    framework = "replaces-folder"

    def run(self, request):
        folder = Path(os.environ["NORMCONF_TEST_FOLDER"])
        if folder.is_dir():
            shutil.rmtree(folder)
            folder.write_text("not a folder\n", encoding="utf-8")
        return super().run(request)
