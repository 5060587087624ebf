"""NumPy adapters that run several backward calls for one input: one correct, the
rest with defects of the kind that leak state from one call to the next, for the
tests of the repeated-backward suite.

`RepeatedKernel` computes InstanceNorm in float32 as tests.faults.Float32Kernel
does, but keeps state as a framework with a graph does. Its forward pass saves
xhat and rstd, and each backward call reads them and its own grad_output. Its
gradient buffers are cleared before a call ("repeat") or added to by it
("accumulate"). Each faulty kernel changes one of those steps. The suite must pass
the correct kernel in both schemes and fail each faulty one where its defect
shows.

They are ordinary adapters: `--adapter tests.backward_faults:RepeatedKernel` runs
one through the suite.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from adapters.contract import BACKWARD_SCHEMES, LAYOUTS, Implementation, Request, Result
from suites import repeated_backward
from suites.verdicts import Record
from tests.family_faults import operator_item
from tests.faults import F32, CarefulStatistics, Float32Kernel, careful_statistics


class RepeatedKernel(Float32Kernel):
    """A correct float32 InstanceNorm with saved state and gradient buffers."""

    framework = "numpy-repeated"

    def implementations(self) -> Sequence[Implementation]:
        description = (type(self).__doc__ or self.framework).splitlines()[0]
        return [
            Implementation(
                "kernel",
                description,
                layouts=LAYOUTS,
                backward_schemes=BACKWARD_SCHEMES,
            )
        ]

    # The steps below are what the faulty kernels override.

    def clear(self, buffers: list[np.ndarray], scheme: str) -> None:
        """Prepare the gradient buffers for the next call: zero them in the
        scheme "repeat", keep them in "accumulate"."""
        if scheme == "repeat":
            for buffer in buffers:
                buffer[...] = 0

    def add(self, buffer: np.ndarray, gradient: np.ndarray) -> None:
        """Add one call's gradient into its buffer."""
        buffer += gradient

    def backward(self, saved: CarefulStatistics, dy, gamma_b, m, axes, shared):
        """Return one call's (grad_input, grad_gamma, grad_beta) from the saved
        state of the forward pass."""
        grad_input = saved.unscale(
            self.grad_input(dy, gamma_b, saved.xhat, saved.rstd, m, axes)
        )
        grad_gamma, grad_beta = self.parameter_gradients(dy, saved.xhat, shared)
        return grad_input, grad_gamma, grad_beta

    def run(self, request: Request) -> Result:
        if request.grad_outputs is None:
            return super().run(request)
        x = np.asarray(request.x, dtype=F32)
        channel_axis = 1 if request.layout == "channels_first" else x.ndim - 1
        channels = x.shape[channel_axis]
        shape = [1] * x.ndim
        shape[channel_axis] = channels
        gamma = (
            np.asarray(request.gamma, F32) if request.affine else np.ones(channels, F32)
        )
        gamma_b = gamma.reshape(shape)
        axes = tuple(axis for axis in range(1, x.ndim) if axis != channel_axis)
        shared = (0, *axes)
        m = int(np.prod([x.shape[axis] for axis in axes]))

        buffers = [
            np.zeros(x.shape, F32),
            np.zeros(channels, F32),
            np.zeros(channels, F32),
        ]
        steps: list[list[np.ndarray]] = [[], [], []]
        saved = None
        with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
            for dy in request.grad_outputs:
                # "repeat" keeps the forward pass's state for every call;
                # "accumulate" runs a forward pass per call.
                if saved is None or request.backward_scheme == "accumulate":
                    saved = careful_statistics(self, x, axes, request.eps)
                self.clear(buffers, request.backward_scheme)
                gradients = self.backward(
                    saved, np.asarray(dy, F32), gamma_b, m, axes, shared
                )
                for buffer, gradient, stack in zip(
                    buffers, gradients, steps, strict=True
                ):
                    self.add(buffer, gradient)
                    stack.append(buffer.copy())
        return Result(
            output=None,
            grad_input_steps=np.stack(steps[0]),
            grad_gamma_steps=np.stack(steps[1]) if request.affine else None,
            grad_beta_steps=np.stack(steps[2]) if request.affine else None,
            dtype="float32",
        )


class BuffersNotCleared(RepeatedKernel):
    """Repeated backward adds into the buffers of the call before (a retained
    graph run without zeroing its gradients)."""

    def clear(self, buffers, scheme):
        return None


class AccumulateOverwrites(RepeatedKernel):
    """The accumulate mode writes each call's gradient over the buffer (a backward
    that ignores an add request, kAddTo in MXNet's terms)."""

    def add(self, buffer, gradient):
        buffer[...] = gradient


class FirstGradOutputKept(RepeatedKernel):
    """Backward computes from the first call's grad_output ever after (a cached
    backward keyed on the input alone)."""

    def backward(self, saved, dy, gamma_b, m, axes, shared):
        if not hasattr(saved, "first_dy"):
            object.__setattr__(saved, "first_dy", dy)
        return super().backward(saved, saved.first_dy, gamma_b, m, axes, shared)


class SavedXhatScaledInPlace(RepeatedKernel):
    """Backward multiplies the saved xhat by gamma in place, so that a second call
    through the same graph reads gamma * xhat (an in-place op on a saved tensor)."""

    def backward(self, saved, dy, gamma_b, m, axes, shared):
        gradients = super().backward(saved, dy, gamma_b, m, axes, shared)
        saved.xhat[...] = saved.xhat * gamma_b
        return gradients


class GradOutputCachedAcrossRequests(RepeatedKernel):
    """Every backward call, single or repeated, computes from the first
    grad_output this adapter ever received for that shape (a process-wide cache
    keyed on the shape alone). A fresh single call of a later request reads the
    same cache, so the repeated calls match the fresh ones; the suite names it by
    two fresh calls that return the same gradient for different grad_outputs."""

    def __init__(self):
        super().__init__()
        self.first_dy: dict[tuple[int, ...], np.ndarray] = {}

    def cached(self, dy):
        return self.first_dy.setdefault(dy.shape, dy.copy())

    def grad_input(self, dy, *arguments):
        return super().grad_input(self.cached(dy), *arguments)

    def parameter_gradients(self, dy, xhat, shared):
        return super().parameter_gradients(self.cached(dy), xhat, shared)


class GradInputScaled(RepeatedKernel):
    """grad_input 1.5 times the right value in every call, single or repeated: a
    first-order defect that keeps no state between calls."""

    def grad_input(self, *arguments):
        return super().grad_input(*arguments) * F32(1.5)


class GradInputScaledBuffersNotCleared(GradInputScaled, BuffersNotCleared):
    """The first-order defect of GradInputScaled and the state leak of
    BuffersNotCleared together."""


FAULTS = (
    BuffersNotCleared,
    AccumulateOverwrites,
    FirstGradOutputKept,
    SavedXhatScaledInPlace,
)


def run_case(
    adapter: RepeatedKernel, case_name: str, scheme: str, seed: int
) -> dict[str, Record]:
    """Judge one catalogue case in `scheme` as the repeated-backward suite does,
    and return the records by quantity (unsupported where the case or dtype is
    not posed)."""
    operator = adapter.implementations()[0].operator
    implementation, item = operator_item(adapter, operator, case_name, seed)
    device = adapter.devices()[0]
    reason = repeated_backward.unsupported_reason(
        adapter, implementation, device, item, scheme
    )
    if reason is not None:
        records = repeated_backward.unsupported_records(item, scheme, reason)
    else:
        records = repeated_backward.run_item(adapter, item, scheme)
    return {record.quantity: record for record in records}
