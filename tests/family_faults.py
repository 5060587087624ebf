"""NumPy adapters for GroupNorm, LayerNorm and BatchNorm: one correct, the rest with
real defects, for the suite's own tests.

`FamilyKernel` computes each operator the way a careful float32 kernel does. It views
x so that every normalized slice is a set of axes (GroupNorm's (N, G, C / G, ...)),
and takes a two-pass variance and the compact input gradient, all in float32. Each
faulty kernel changes one step to a defect that has shipped in a real kernel, for
one operator. The suite must pass the correct kernel on every case and give each
faulty one `fail` on the cases that expose its defect.

Like tests/faults.py these are ordinary adapters:
`--adapter tests.family_faults:GroupsIgnored` runs one through the conformance suite.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Sequence

import numpy as np

from adapters.contract import (
    LAYOUTS,
    Adapter,
    Implementation,
    Request,
    Result,
)
from suites import cases
from suites.verdicts import (
    Item,
    Record,
    run_item,
    unsupported_reason,
    unsupported_records,
)
from tests.faults import NumpyKernel, careful_statistics

F32 = np.float32

OPERATORS = ("group_norm", "layer_norm", "batch_norm")


class FamilyKernel(NumpyKernel):
    """A correct float32 GroupNorm, LayerNorm and BatchNorm in NumPy."""

    framework = "numpy-family"

    def implementations(self) -> Sequence[Implementation]:
        description = (type(self).__doc__ or self.framework).splitlines()[0]
        return [
            Implementation(
                f"{operator}.kernel",
                description,
                # Channels-last input is moved to (N, C, ...) first: layouts are
                # not what these kernels test.
                layouts=("channels_first",) if operator == "layer_norm" else LAYOUTS,
                operator=operator,
            )
            for operator in OPERATORS
        ]

    # The steps below are what the faulty kernels override.

    def view(self, request: Request, shape: tuple[int, ...]):
        """Return (view shape, reduction axes, axes gamma runs along) of x."""
        ndim = len(shape)
        if request.op == "group_norm":
            samples, channels = shape[:2]
            groups = request.groups
            view = (samples, groups, channels // groups, *shape[2:])
            return view, tuple(range(2, ndim + 1)), (1, 2)
        if request.op == "layer_norm":
            axes = tuple(range(ndim - request.normalized_ndim, ndim))
            return shape, axes, axes
        return shape, (0, *range(2, ndim)), (1,)

    def mean(self, x, axes) -> np.ndarray:
        return np.mean(x, axis=axes, keepdims=True, dtype=F32)

    def variance(self, x, mean, axes) -> np.ndarray:
        centered = x - mean
        return np.mean(centered * centered, axis=axes, keepdims=True, dtype=F32)

    def rstd(self, var, eps) -> np.ndarray:
        return F32(1.0) / np.sqrt(var + F32(eps))

    def gamma_view(self, gamma: np.ndarray, view, spans, request) -> np.ndarray:
        shape = [1] * len(view)
        for axis in spans:
            shape[axis] = view[axis]
        return gamma.reshape(shape)

    def parameter_gradients(self, dy, xhat, shared):
        grad_gamma = np.sum(dy * xhat, axis=shared, dtype=F32)
        grad_beta = np.sum(dy, axis=shared, dtype=F32)
        return grad_gamma, grad_beta

    def run(self, request: Request) -> Result:
        channels_last = request.layout == "channels_last"
        x = np.asarray(request.x, dtype=F32)
        dy = np.asarray(request.grad_output, dtype=F32)
        if channels_last:
            x, dy = np.moveaxis(x, -1, 1), np.moveaxis(dy, -1, 1)
        shape = x.shape
        view, axes, spans = self.view(request, shape)
        parameter_shape = tuple(view[axis] for axis in spans)
        if request.affine:
            gamma = np.asarray(request.gamma, dtype=F32).reshape(parameter_shape)
            beta = np.asarray(request.beta, dtype=F32).reshape(parameter_shape)
        else:
            gamma, beta = np.ones(parameter_shape, F32), np.zeros(parameter_shape, F32)
        gamma_b = self.gamma_view(gamma, view, spans, request)
        beta_b = self.gamma_view(beta, view, spans, request)
        x, dy = x.reshape(view), dy.reshape(view)
        m = int(np.prod([view[axis] for axis in axes]))

        with (
            np.errstate(invalid="ignore", over="ignore", divide="ignore"),
            # The mean of an empty batch is NaN, which NumPy warns about.
            warnings.catch_warnings(),
        ):
            warnings.simplefilter("ignore", RuntimeWarning)
            statistics = careful_statistics(self, x, axes, request.eps)
            xhat, rstd = statistics.xhat, statistics.rstd
            output = gamma_b * xhat + beta_b
            result = Result(output=self._restore(output, shape, channels_last))
            if not request.gradients:
                return result

            g = gamma_b * dy
            sum_g = np.sum(g, axis=axes, keepdims=True, dtype=F32)
            sum_g_xhat = np.sum(g * xhat, axis=axes, keepdims=True, dtype=F32)
            grad_input = statistics.unscale(
                rstd / F32(m) * (F32(m) * g - sum_g - xhat * sum_g_xhat)
            )
            result.grad_input = self._restore(grad_input, shape, channels_last)
            if request.affine:
                shared = tuple(axis for axis in range(len(view)) if axis not in spans)
                grad_gamma, grad_beta = self.parameter_gradients(dy, xhat, shared)
                result.grad_gamma = grad_gamma.reshape(np.shape(request.gamma))
                result.grad_beta = grad_beta.reshape(np.shape(request.beta))
        return result

    @staticmethod
    def _restore(array: np.ndarray, shape, channels_last: bool) -> np.ndarray:
        array = array.reshape(shape)
        return np.moveaxis(array, 1, -1) if channels_last else array


class GroupsIgnored(FamilyKernel):
    """GroupNorm that normalizes each channel on its own, whatever the group count
    (GroupNorm computed as InstanceNorm)."""

    def view(self, request, shape):
        if request.op == "group_norm":
            request = _with_groups(request, shape[1])
        return super().view(request, shape)


class GammaPerGroup(FamilyKernel):
    """GroupNorm that scales and shifts every channel of a group by the group's
    first gamma and beta, as if the parameters were per group."""

    def gamma_view(self, gamma, view, spans, request):
        if request.op == "group_norm":
            gamma = np.repeat(gamma[:, :1], view[2], axis=1)
        return super().gamma_view(gamma, view, spans, request)


class LastAxisOnly(FamilyKernel):
    """LayerNorm that normalizes over the last axis alone, whatever the number of
    normalized axes in the request."""

    def view(self, request, shape):
        view, axes, spans = super().view(request, shape)
        if request.op == "layer_norm":
            # The statistics use the last axis only; gamma keeps its shape.
            return view, axes[-1:], spans
        return view, axes, spans


class UnbiasedBatchVariance(FamilyKernel):
    """BatchNorm that normalizes with the unbiased variance (divided by M - 1),
    the one it stores as running variance, instead of the biased one."""

    def variance(self, x, mean, axes):
        var = super().variance(x, mean, axes)
        m = int(np.prod([x.shape[axis] for axis in axes]))
        if 0 in axes and m > 1:
            return var * F32(m / (m - 1))
        return var


class StatisticsPerSample(FamilyKernel):
    """BatchNorm that takes each sample's own statistics (InstanceNorm) instead of
    the batch's."""

    def view(self, request, shape):
        view, axes, spans = super().view(request, shape)
        if request.op == "batch_norm":
            return view, axes[1:], spans
        return view, axes, spans


class OnePassVariance(FamilyKernel):
    """Every operator with the one-pass variance E[x^2] - E[x]^2 in float32."""

    def variance(self, x, mean, axes):
        square = np.mean(x * x, axis=axes, keepdims=True, dtype=F32)
        return square - mean * mean


FAULTS = (
    GroupsIgnored,
    GammaPerGroup,
    LastAxisOnly,
    UnbiasedBatchVariance,
    StatisticsPerSample,
    OnePassVariance,
)


def _with_groups(request: Request, groups: int) -> Request:
    return dataclasses.replace(request, groups=groups)


def operator_item(
    adapter: Adapter, operator: str, case_name: str, seed: int
) -> tuple[Implementation, Item]:
    """Return the adapter's implementation of `operator` and its item for one
    catalogue case, in the adapter's dtype on its first device."""
    case = cases.by_name(case_name)
    implementation = next(
        candidate
        for candidate in adapter.implementations()
        if candidate.operator == operator
    )
    item = Item(
        adapter.framework,
        implementation.name,
        adapter.devices()[0].name,
        adapter.dtype,
        case,
        seed,
        case.operator(operator),
    )
    return implementation, item


def run_case(
    adapter: FamilyKernel, operator: str, case_name: str, seed: int
) -> dict[str, Record]:
    """Judge one catalogue case computed by the kernel's `operator`, as the suite
    does, and return the records by quantity (unsupported where the case is not
    posed for the operator or the dtype)."""
    implementation, item = operator_item(adapter, operator, case_name, seed)
    reason = unsupported_reason(adapter, implementation, adapter.devices()[0], item)
    if reason is not None:
        records = unsupported_records(item, reason, implementation.gradients)
    else:
        records = run_item(adapter, item, implementation)
    return {record.quantity: record for record in records}
