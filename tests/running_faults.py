"""NumPy adapters with running statistics: one correct, the rest with real defects,
for the tests of the running-statistics suite.

`RunningKernel` computes BatchNorm and InstanceNorm in float32 as a careful kernel
does, and keeps running statistics under the convention in its `convention`
attribute. A training step takes two-pass statistics and folds them into the
running values. Inference normalizes with the running values and holds them
constant in the gradients. Each faulty kernel changes one step to a defect that has
shipped in a real framework or training loop. The suite must pass the correct
kernel under every convention and fail each faulty one where its defect shows.

They are ordinary adapters: `--adapter tests.running_faults:RunningKernel` runs one
through the suite.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np

from adapters.contract import (
    LAYOUTS,
    Implementation,
    Request,
    Result,
)
from references.running_stats import CONVENTIONS
from suites import running_statistics
from suites.verdicts import Record
from tests.family_faults import operator_item
from tests.faults import NumpyKernel, careful_statistics

F32 = np.float32

OPERATORS = ("batch_norm", "instance_norm")


class RunningKernel(NumpyKernel):
    """A correct float32 BatchNorm and InstanceNorm with running statistics."""

    framework = "numpy-running"
    # The update rule the kernel declares, a key of CONVENTIONS.
    convention = "torch"

    def __init__(self, convention: str | None = None) -> None:
        if convention is not None:
            self.convention = convention

    def implementations(self) -> Sequence[Implementation]:
        description = (type(self).__doc__ or self.framework).splitlines()[0]
        return [
            Implementation(
                f"{operator}.kernel",
                description,
                layouts=LAYOUTS,
                operator=operator,
                running_stats=self.convention,
            )
            for operator in OPERATORS
        ]

    # The steps below are what the faulty kernels override.

    def mean(self, x: np.ndarray, axes) -> np.ndarray:
        return np.mean(x, axis=axes, keepdims=True, dtype=F32)

    def rstd(self, var: np.ndarray, eps) -> np.ndarray:
        return F32(1.0) / np.sqrt(var + F32(eps))

    def variance(self, x: np.ndarray, mean: np.ndarray, axes) -> np.ndarray:
        centered = x - mean
        return np.mean(centered * centered, axis=axes, keepdims=True, dtype=F32)

    def stored_variance(self, variance: np.ndarray, count: int, slices: int):
        """Return the variance that goes into the running value: unbiased over
        `count` elements per slice when the convention says so. `slices` is the
        number of slices per channel, N for InstanceNorm and 1 for BatchNorm."""
        if CONVENTIONS[self.convention].unbiased_variance:
            # One element per slice: M / (M - 1) is inf, and 0 * inf is NaN.
            return variance * F32(np.float64(count) / (count - 1))
        return variance

    def new_weight(self, momentum: float) -> float:
        """Return the weight of the batch's value in the update."""
        if CONVENTIONS[self.convention].momentum_weights_new:
            return momentum
        return 1.0 - momentum

    def update(self, running: np.ndarray, batch_value: np.ndarray, momentum: float):
        weight = F32(self.new_weight(momentum))
        return (F32(1.0) - weight) * running + weight * batch_value

    def inference_statistics(self, request: Request, x: np.ndarray, axes):
        """Return the mean and variance inference normalizes with, shaped to
        broadcast against x."""
        shape = [1] * x.ndim
        shape[1] = x.shape[1]
        mean = np.asarray(request.running_mean, F32).reshape(shape)
        var = np.asarray(request.running_var, F32).reshape(shape)
        return mean, var

    def inference_grad_input(self, dy, gamma, xhat, rstd, axes) -> np.ndarray:
        return gamma * rstd * dy

    def run(self, request: Request) -> Result:
        channels_last = request.layout == "channels_last"
        x = np.asarray(request.x, dtype=F32)
        dy = np.asarray(request.grad_output, dtype=F32)
        if channels_last:
            x, dy = np.moveaxis(x, -1, 1), np.moveaxis(dy, -1, 1)
        channels = x.shape[1]
        shape = [1] * x.ndim
        shape[1] = channels
        if request.affine:
            gamma = np.asarray(request.gamma, F32).reshape(shape)
            beta = np.asarray(request.beta, F32).reshape(shape)
        else:
            gamma, beta = np.ones(shape, F32), np.zeros(shape, F32)
        # The axes of one normalized slice, and the axes a parameter is shared over.
        slice_axes = tuple(range(2, x.ndim))
        if request.op == "batch_norm":
            slice_axes = (0, *slice_axes)
        shared = (0, *range(2, x.ndim))

        with (
            np.errstate(invalid="ignore", over="ignore", divide="ignore"),
            # The mean of an empty batch is NaN, which NumPy warns about.
            warnings.catch_warnings(),
        ):
            warnings.simplefilter("ignore", RuntimeWarning)
            inference = request.mode == "inference"
            statistics = None
            if inference:
                mean, var = self.inference_statistics(request, x, slice_axes)
                rstd = self.rstd(var, request.eps)
                # Folded into x * rstd - mean * rstd, as inference kernels do:
                # x - mean could overflow where the two are far apart.
                xhat = x * rstd - mean * rstd
            else:
                statistics = careful_statistics(self, x, slice_axes, request.eps)
                xhat, rstd = statistics.xhat, statistics.rstd
                mean, var = statistics.mean, statistics.var
            output = gamma * xhat + beta
            result = Result(
                output=self._restore(output, channels_last), dtype="float32"
            )
            if not inference and request.running_mean is not None:
                self._step(request, x, mean, var, slice_axes, result)
            if not request.gradients:
                return result
            if inference:
                grad_input = self.inference_grad_input(
                    dy, gamma, xhat, rstd, slice_axes
                )
            else:
                m = int(np.prod([x.shape[axis] for axis in slice_axes]))
                g = gamma * dy
                sum_g = np.sum(g, axis=slice_axes, keepdims=True, dtype=F32)
                sum_gx = np.sum(g * xhat, axis=slice_axes, keepdims=True, dtype=F32)
                grad_input = statistics.unscale(
                    rstd / F32(m) * (F32(m) * g - sum_g - xhat * sum_gx)
                )
            result.grad_input = self._restore(grad_input, channels_last)
            if request.affine:
                result.grad_gamma = np.sum(dy * xhat, axis=shared, dtype=F32)
                result.grad_beta = np.sum(dy, axis=shared, dtype=F32)
        return result

    def _step(self, request, x, mean, var, slice_axes, result) -> None:
        """Fold the batch's statistics into the running values of `result`; an
        empty batch leaves them as they were."""
        running_mean = np.asarray(request.running_mean, F32)
        running_var = np.asarray(request.running_var, F32)
        if x.size == 0:
            result.running_mean, result.running_var = running_mean, running_var
            return
        count = int(np.prod([x.shape[axis] for axis in slice_axes]))
        # var has one row per sample for InstanceNorm, one for the batch for BatchNorm.
        stored = self.stored_variance(var, count, var.shape[0])
        # Per slice for InstanceNorm: the batch's average per channel.
        batch_mean = np.mean(mean, axis=0, dtype=F32).reshape(-1)
        batch_var = np.mean(stored, axis=0, dtype=F32).reshape(-1)
        result.running_mean = self.update(running_mean, batch_mean, request.momentum)
        result.running_var = self.update(running_var, batch_var, request.momentum)

    @staticmethod
    def _restore(array: np.ndarray, channels_last: bool) -> np.ndarray:
        return np.moveaxis(array, 1, -1) if channels_last else array


class MomentumWeightsOld(RunningKernel):
    """Declares torch's convention, but its momentum weights the old running value,
    as Keras's and MXNet's do: a port that carried momentum = 0.1 across keeps 90 %
    of each batch instead of 10 %."""

    def new_weight(self, momentum):
        return 1.0 - momentum


class BiasedRunningVariance(RunningKernel):
    """Declares torch's convention, but stores the biased variance."""

    def stored_variance(self, variance, count, slices):
        return variance


class UnbiasedOverBatch(RunningKernel):
    """InstanceNorm that makes the variance unbiased with the element count of the
    whole channel, N * M, instead of the M of its slice."""

    def stored_variance(self, variance, count, slices):
        if CONVENTIONS[self.convention].unbiased_variance:
            total = count * slices
            return variance * F32(np.float64(total) / (total - 1))
        return variance


class OnePassRunningVariance(RunningKernel):
    """Takes the variance as E[x^2] - E[x]^2 in float32 (for the output too)."""

    def variance(self, x, mean, axes):
        square = np.mean(x * x, axis=axes, keepdims=True, dtype=F32)
        return square - mean * mean


class RunningStatsNotUpdated(RunningKernel):
    """Returns the running values unchanged after a training step, as a layer does
    whose update writes to a copy of its buffers."""

    def update(self, running, batch_value, momentum):
        return running


class InferenceWithBatchStatistics(RunningKernel):
    """Normalizes with the batch's own statistics in inference, ignoring the
    running ones (a layer left in training mode)."""

    def inference_statistics(self, request, x, axes):
        statistics = careful_statistics(self, x, axes, request.eps)
        return statistics.mean, statistics.var


class InferenceGradientThroughStatistics(RunningKernel):
    """Inference with the right output, but the input gradient of training mode,
    as if the running statistics depended on x."""

    def inference_grad_input(self, dy, gamma, xhat, rstd, axes):
        m = int(np.prod([xhat.shape[axis] for axis in axes]))
        g = gamma * dy
        sum_g = np.sum(g, axis=axes, keepdims=True, dtype=F32)
        sum_gx = np.sum(g * xhat, axis=axes, keepdims=True, dtype=F32)
        return rstd / F32(m) * (F32(m) * g - sum_g - xhat * sum_gx)


FAULTS = (
    MomentumWeightsOld,
    BiasedRunningVariance,
    UnbiasedOverBatch,
    OnePassRunningVariance,
    RunningStatsNotUpdated,
    InferenceWithBatchStatistics,
    InferenceGradientThroughStatistics,
)


def run_case(
    adapter: RunningKernel, operator: str, case_name: str, mode: str, seed: int
) -> dict[str, Record]:
    """Judge one catalogue case in `mode` computed by the kernel's `operator`, as
    the running-statistics suite does, and return the records by quantity
    (unsupported where the case or dtype is not posed)."""
    implementation, item = operator_item(adapter, operator, case_name, seed)
    device = adapter.devices()[0]
    reason = running_statistics.unsupported_reason(
        adapter, implementation, device, item, mode
    )
    if reason is not None:
        records = running_statistics.unsupported_records(item, mode, reason)
    else:
        records = running_statistics.run_item(adapter, item, implementation, mode)
    return {record.quantity: record for record in records}
