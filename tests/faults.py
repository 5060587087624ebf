"""NumPy adapters for the suite's own tests: four correct, the rest with real defects.

`Float32Kernel` computes InstanceNorm the way a careful float32 kernel does: every
array and intermediate is float32, the variance is two-pass, and the input gradient
uses the compact formula. `SerialSumKernel` is the same with every sum accumulated
one element at a time, `Float16Kernel` takes and returns float16 while computing
in float32, and `Float64Kernel` runs the same steps in float64. Each faulty kernel
changes one step of one of them to a defect that has shipped in real kernels, and is
judged in the one dtype it accepts (its `dtype`).
The suite must pass the correct kernels on every case and give each faulty one
`fail` on the cases that expose its defect.

These are ordinary adapters: `--adapter tests.faults:OnePassVariance` runs one through
the conformance suite.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Sequence

import numpy as np

from adapters.contract import (
    CONTRACT_VERSION,
    LAYOUTS,
    Adapter,
    Device,
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

F32 = np.float32
F16 = np.float16


# Slices whose largest finite |x| is above 2^SCALE_LIMIT are scaled down by a power
# of two before their statistics, so that their sums and squares stay finite in
# float32 (whose largest value is near 2^128). A power of two scales exactly.
SCALE_LIMIT = 60


def scale_exponents(x: np.ndarray, axes: tuple[int, ...]) -> np.ndarray:
    """Return k per slice (dimensions kept) such that x * 2^-k stays below
    2^(SCALE_LIMIT + 1) in magnitude; 0 where x already does."""
    if x.size == 0:
        return np.zeros([1 if a in axes else n for a, n in enumerate(x.shape)], int)
    magnitudes = np.where(np.isfinite(x), np.abs(x), 0.0)
    largest = np.max(magnitudes, axis=axes, keepdims=True)
    _, exponent = np.frexp(largest)
    return np.where(largest > 2.0**SCALE_LIMIT, exponent - SCALE_LIMIT, 0)


@dataclasses.dataclass(frozen=True)
class CarefulStatistics:
    """A careful float32 kernel's statistics of x. xhat is exact to rounding.
    x was scaled by 2^-k per slice, and `rstd` is that of the scaled x, so the
    input gradient computed with it must be scaled by 2^-k at the end. `mean`
    and `var` are in x's own units (`var` is infinite beyond float32)."""

    xhat: np.ndarray
    rstd: np.ndarray
    k: np.ndarray
    mean: np.ndarray
    var: np.ndarray

    def unscale(self, gradient: np.ndarray) -> np.ndarray:
        """Return an input gradient computed with `rstd` in x's own units."""
        if not np.any(self.k):
            return gradient
        return np.ldexp(gradient, -self.k).astype(gradient.dtype)


def _normalize(x: np.ndarray, mean: np.ndarray, rstd: np.ndarray) -> np.ndarray:
    return (x - mean) * rstd


def careful_statistics(kernel, x, axes, eps) -> CarefulStatistics:
    """Return x's statistics over `axes` as a careful float32 kernel computes
    them, with the kernel's own mean(), variance() and rstd() steps:

    - a slice beyond 2^SCALE_LIMIT is scaled down by 2^k first, and eps by
      4^k; where that scaled eps underflows on a constant slice, rstd is
      2^k / sqrt(eps) instead;
    - the mean gets one correction pass, mean + mean(x - mean) (the corrected
      two-pass algorithm), so that a slice of equal values has exactly that
      value as its mean and x - mean = 0, as its exact answer needs. An
      infinite mean stays infinite.
    """
    k = scale_exponents(x, axes)
    if not getattr(kernel, "scales_large_slices", True):
        k = np.zeros_like(k)
    scaled = bool(np.any(k))
    xs = np.ldexp(x, -k).astype(x.dtype) if scaled else x
    mean = kernel.mean(xs, axes)
    if getattr(kernel, "corrects_mean", True):
        correction = kernel.mean(xs - mean, axes)
        mean = np.where(np.isfinite(mean), mean + correction, mean)
    var = kernel.variance(xs, mean, axes)
    normalize = getattr(kernel, "normalize", None) or _normalize
    if not scaled:
        rstd = kernel.rstd(var, eps)
        return CarefulStatistics(normalize(xs, mean, rstd), rstd, k, mean, var)
    eps_scaled = np.ldexp(np.float64(eps), -2 * k).astype(x.dtype)
    rstd = kernel.rstd(var, eps_scaled)
    constant = np.ldexp(np.float64(kernel.rstd(np.zeros_like(var), eps)), k)
    rstd = np.where((k > 0) & (var == 0), constant.astype(x.dtype), rstd)
    xhat = normalize(xs, mean, rstd)
    mean = np.ldexp(mean, k).astype(x.dtype)
    var = np.ldexp(var, 2 * k).astype(x.dtype)
    return CarefulStatistics(xhat, rstd, k, mean, var)


class NumpyKernel(Adapter):
    """The declarations the NumPy kernels of the suite's tests share: NumPy's
    version, one CPU device, and the one dtype they accept."""

    contract_version = CONTRACT_VERSION
    # The only dtype the kernel accepts, and the dtype the tests judge it in.
    dtype = "float32"

    def version(self) -> str:
        return np.__version__

    def devices(self) -> Sequence[Device]:
        return [Device("cpu")]

    def unsupported_reason(self, implementation: str, device: str, dtype: str):
        if dtype != self.dtype:
            return f"{type(self).__name__} takes {self.dtype} input only"
        return None


class Float32Kernel(NumpyKernel):
    """A correct float32 InstanceNorm in NumPy (two-pass variance, compact dx)."""

    framework = "numpy-float32"
    # The dtype of every array and intermediate.
    working = F32

    def implementations(self) -> Sequence[Implementation]:
        description = (type(self).__doc__ or self.framework).splitlines()[0]
        return [Implementation("kernel", description, layouts=LAYOUTS)]

    # The steps below are what the faulty kernels override.

    def statistics_axes(self, axes: tuple[int, ...], channel_axis: int):
        """Return the axes that the mean, the variance and the sums in dx reduce
        over: the spatial axes `axes` of one (n, c) slice."""
        return axes

    def mean(self, x: np.ndarray, axes: tuple[int, ...]) -> np.ndarray:
        return np.mean(x, axis=axes, keepdims=True, dtype=self.working)

    def variance(self, x: np.ndarray, mean: np.ndarray, axes) -> np.ndarray:
        centered = x - mean
        return np.mean(
            centered * centered, axis=axes, keepdims=True, dtype=self.working
        )

    def rstd(self, var: np.ndarray, eps: float) -> np.ndarray:
        with np.errstate(divide="ignore"):
            return self.working(1.0) / np.sqrt(var + self.working(eps))

    def grad_input(self, dy, gamma, xhat, rstd, m, axes) -> np.ndarray:
        g = gamma * dy
        sum_g = np.sum(g, axis=axes, keepdims=True, dtype=self.working)
        sum_g_xhat = np.sum(g * xhat, axis=axes, keepdims=True, dtype=self.working)
        m = self.working(m)
        return rstd / m * (m * g - sum_g - xhat * sum_g_xhat)

    def parameter_gradients(self, dy, xhat, shared) -> tuple[np.ndarray, np.ndarray]:
        grad_gamma = np.sum(dy * xhat, axis=shared, dtype=self.working)
        grad_beta = np.sum(dy, axis=shared, dtype=self.working)
        return grad_gamma, grad_beta

    def run(self, request: Request) -> Result:
        working = self.working
        x = np.asarray(request.x, dtype=working)
        # Channels-last input is reduced over its middle axes, with no transposes.
        channel_axis = 1 if request.layout == "channels_first" else x.ndim - 1
        channels = x.shape[channel_axis]
        shape = [1] * x.ndim
        shape[channel_axis] = channels
        gamma = (
            np.asarray(request.gamma, dtype=working)
            if request.affine
            else np.ones(channels, working)
        )
        beta = (
            np.asarray(request.beta, dtype=working)
            if request.affine
            else np.zeros(channels, working)
        )
        gamma_b, beta_b = gamma.reshape(shape), beta.reshape(shape)
        axes = tuple(axis for axis in range(1, x.ndim) if axis != channel_axis)
        statistics_axes = self.statistics_axes(axes, channel_axis)
        m = int(np.prod([x.shape[axis] for axis in statistics_axes]))

        with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
            statistics = careful_statistics(self, x, statistics_axes, request.eps)
            xhat, rstd = statistics.xhat, statistics.rstd
            output = gamma_b * xhat + beta_b

            result = Result(output=output, dtype=np.dtype(working).name)
            if not request.gradients:
                return result

            dy = np.asarray(request.grad_output, dtype=working)
            result.grad_input = statistics.unscale(
                self.grad_input(dy, gamma_b, xhat, rstd, m, statistics_axes)
            )
            if request.affine:
                shared = (0, *axes)
                result.grad_gamma, result.grad_beta = self.parameter_gradients(
                    dy, xhat, shared
                )
        return result


def _slices_as_rows(values: np.ndarray, axes: tuple[int, ...]) -> np.ndarray:
    """Return `values` as a 2-D array with one row per slice, the slice being the
    elements that share their indices outside `axes`."""
    kept = [axis for axis in range(values.ndim) if axis not in axes]
    length = int(np.prod([values.shape[axis] for axis in axes]))
    slices = int(np.prod([values.shape[axis] for axis in kept]))
    return np.transpose(values, kept + list(axes)).reshape(slices, length)


def _kept_shape(values: np.ndarray, axes: tuple[int, ...]) -> list[int]:
    return [1 if axis in axes else n for axis, n in enumerate(values.shape)]


def _serial_sum(values: np.ndarray, axes: tuple[int, ...], dtype=F32) -> np.ndarray:
    """Sum over `axes` one element at a time, rounding every partial sum to `dtype`,
    keeping dimensions."""
    rows = _slices_as_rows(values, axes)
    if rows.shape[-1]:
        total = np.cumsum(rows, axis=-1, dtype=dtype)[..., -1]
    else:
        total = np.zeros(rows.shape[:-1], dtype)
    return total.reshape(_kept_shape(values, axes))


def _sum_through_all_slices(values: np.ndarray, axes: tuple[int, ...]) -> np.ndarray:
    """Sum over `axes` in float32 as a product with a 0/1 slice-indicator matrix,
    keeping dimensions.

    Each slice's sum multiplies every element of every slice, by 1 or by 0, as a
    segmented sum written as one matrix product does. 0 * NaN and 0 * inf are NaN, so
    a NaN or an infinity in one slice makes every slice's sum NaN.
    """
    rows = _slices_as_rows(values, axes)
    indicator = np.eye(rows.shape[0], dtype=F32)
    products = indicator[:, :, None] * rows[None, :, :]
    total = np.sum(products, axis=(1, 2), dtype=F32)
    return total.reshape(_kept_shape(values, axes))


class SerialSumKernel(Float32Kernel):
    """A correct float32 kernel that accumulates every sum one element at a time,
    as simple CPU loops do: its rounding error grows faster with M than that of a
    pairwise or blocked sum, and the budget must still admit it."""

    framework = "numpy-serial-sum"

    def mean(self, x, axes):
        m = int(np.prod([x.shape[a] for a in axes]))
        return _serial_sum(x, axes) / F32(max(m, 1))

    def variance(self, x, mean, axes):
        m = int(np.prod([x.shape[a] for a in axes]))
        centered = x - mean
        return _serial_sum(centered * centered, axes) / F32(max(m, 1))

    def grad_input(self, dy, gamma, xhat, rstd, m, axes):
        g = gamma * dy
        sum_g = _serial_sum(g, axes)
        sum_g_xhat = _serial_sum(g * xhat, axes)
        return rstd / F32(m) * (F32(m) * g - sum_g - xhat * sum_g_xhat)

    def parameter_gradients(self, dy, xhat, shared):
        grad_gamma = _serial_sum(dy * xhat, shared).reshape(-1)
        grad_beta = _serial_sum(dy, shared).reshape(-1)
        return grad_gamma, grad_beta


class OnePassVariance(Float32Kernel):
    """var = E[x^2] - E[x]^2 in float32: cancels when the mean is large."""

    framework = "fault-one-pass-variance"

    def variance(self, x, mean, axes):
        mean_square = np.mean(x * x, axis=axes, keepdims=True, dtype=F32)
        return mean_square - mean * mean


class EpsOutsideSqrt(Float32Kernel):
    """rstd = 1 / (sqrt(var) + eps) instead of 1 / sqrt(var + eps)."""

    framework = "fault-eps-outside-sqrt"

    def rstd(self, var, eps):
        with np.errstate(divide="ignore"):
            return F32(1.0) / (np.sqrt(var) + F32(eps))


class DroppedDxTerm(Float32Kernel):
    """dx drops the -xhat * sum(g * xhat) term (the path through the variance)."""

    framework = "fault-dropped-dx-term"

    def grad_input(self, dy, gamma, xhat, rstd, m, axes):
        g = gamma * dy
        sum_g = np.sum(g, axis=axes, keepdims=True, dtype=F32)
        return rstd / F32(m) * (F32(m) * g - sum_g)


class UnbiasedVariance(Float32Kernel):
    """The variance divides by M - 1 instead of M."""

    framework = "fault-unbiased-variance"

    def variance(self, x, mean, axes):
        centered = x - mean
        m = int(np.prod([x.shape[axis] for axis in axes]))
        total = np.sum(centered * centered, axis=axes, keepdims=True, dtype=F32)
        with np.errstate(divide="ignore", invalid="ignore"):
            return total / F32(max(m - 1, 0))


class GammaMissingFromDx(Float32Kernel):
    """dx is computed from dy instead of g = gamma * dy."""

    framework = "fault-gamma-missing-from-dx"

    def grad_input(self, dy, gamma, xhat, rstd, m, axes):
        return super().grad_input(dy, np.ones_like(gamma), xhat, rstd, m, axes)


class SwappedParameterGradients(Float32Kernel):
    """grad_gamma and grad_beta are returned in each other's place."""

    framework = "fault-swapped-parameter-gradients"

    def parameter_gradients(self, dy, xhat, shared):
        grad_gamma, grad_beta = super().parameter_gradients(dy, xhat, shared)
        return grad_beta, grad_gamma


class ParameterGradientsTwice(Float32Kernel):
    """grad_gamma and grad_beta are added into buffers that already held them, as
    when a kernel accumulates into gradients that were not zeroed: twice the value."""

    framework = "fault-parameter-gradients-twice"

    def parameter_gradients(self, dy, xhat, shared):
        grad_gamma, grad_beta = super().parameter_gradients(dy, xhat, shared)
        return grad_gamma + grad_gamma, grad_beta + grad_beta


class EpsAddedTwice(Float32Kernel):
    """rstd = 1 / sqrt(var + 2 * eps), as when the variance kernel adds eps and the
    normalize kernel adds it again."""

    framework = "fault-eps-added-twice"

    def rstd(self, var, eps):
        return super().rstd(var + F32(eps), eps)


class StatisticsAcrossChannels(Float32Kernel):
    """The mean and variance (and dx's sums) of each sample are taken over the
    channels as well as the spatial axes: LayerNorm instead of InstanceNorm."""

    framework = "fault-statistics-across-channels"

    def statistics_axes(self, axes, channel_axis):
        return tuple(sorted((*axes, channel_axis)))


class StatisticsAcrossBatch(Float32Kernel):
    """The mean and variance (and dx's sums) of each channel are taken over the batch
    as well as the spatial axes: BatchNorm instead of InstanceNorm."""

    framework = "fault-statistics-across-batch"

    def statistics_axes(self, axes, channel_axis):
        return (0, *axes)

    def run(self, request):
        # On an empty batch NumPy warns that the mean has no elements. The NaN it
        # returns reaches no element of the empty output.
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", "Mean of empty slice", RuntimeWarning)
            return super().run(request)


class NanLeaksAcrossSlices(Float32Kernel):
    """dx's per-slice sums are computed as a product with a 0/1 slice-indicator
    matrix, so a NaN or infinity in one slice's g * xhat makes dx NaN in every slice.

    The exact dx is NaN only in a slice that is NaN itself: on constant-slice-eps0
    the constant slice's xhat is 0 / 0 and the other slices are finite.
    """

    framework = "fault-nan-leaks-across-slices"

    def grad_input(self, dy, gamma, xhat, rstd, m, axes):
        g = gamma * dy
        sum_g = _sum_through_all_slices(g, axes)
        sum_g_xhat = _sum_through_all_slices(g * xhat, axes)
        return rstd / F32(m) * (F32(m) * g - sum_g - xhat * sum_g_xhat)


class UnbiasedVarianceInBackward(Float32Kernel):
    """The forward divides the variance by M, but dx uses the variance divided by
    M - 1, as when the backward recomputes rstd from an unbiased variance."""

    framework = "fault-unbiased-variance-in-backward"

    def grad_input(self, dy, gamma, xhat, rstd, m, axes):
        # rstd * sqrt((M - 1) / M) = 1 / sqrt((var + eps) * M / (M - 1)).
        correction = F32(np.sqrt((m - 1) / m)) if m > 0 else F32(1.0)
        return super().grad_input(dy, gamma, xhat, rstd * correction, m, axes)


class LastSampleParameterGradients(Float32Kernel):
    """grad_gamma and grad_beta contain only the last sample's sums, as when the loop
    over the batch assigns the per-sample sum where it should add it."""

    framework = "fault-last-sample-parameter-gradients"

    def parameter_gradients(self, dy, xhat, shared):
        return super().parameter_gradients(dy[-1:], xhat[-1:], shared)


class ChannelsLastReadAsChannelsFirst(Float32Kernel):
    """Channels-last input is read with channels-first strides: the (N, *spatial, C)
    buffer is taken as (N, C, *spatial), and the results are written back the same
    way. Channels-first input is computed correctly."""

    framework = "fault-channels-last-read-as-channels-first"

    def run(self, request):
        if request.layout != "channels_last":
            return super().run(request)
        shape = request.x.shape
        misread_shape = (shape[0], shape[-1], *shape[1:-1])
        misread = dataclasses.replace(
            request,
            x=request.x.reshape(misread_shape),
            grad_output=request.grad_output.reshape(misread_shape),
            layout="channels_first",
        )
        result = super().run(misread)
        result.output = result.output.reshape(shape)
        if result.grad_input is not None:
            result.grad_input = result.grad_input.reshape(shape)
        return result


class Float16Kernel(Float32Kernel):
    """A correct float16 kernel: float16 input and results, every step in float32."""

    framework = "numpy-float16"
    dtype = "float16"

    def run(self, request):
        result = super().run(request)
        with np.errstate(over="ignore"):
            for name in ("output", "grad_input", "grad_gamma", "grad_beta"):
                value = getattr(result, name)
                if value is not None:
                    setattr(result, name, value.astype(F16))
        result.dtype = "float16"
        return result


class Float64Kernel(Float32Kernel):
    """A correct float64 kernel: Float32Kernel's steps in float64, slices beyond
    2^SCALE_LIMIT scaled by a power of two as there."""

    framework = "numpy-float64"
    dtype = "float64"
    working = np.float64


class UnscaledFloat64Kernel(Float64Kernel):
    """Float64Kernel without the scaling of large slices, as a plain float64 kernel
    computes: the sums and squares of values near float64's largest overflow."""

    framework = "fault-float64-unscaled"
    scales_large_slices = False


class Float16SumOfSquares(Float16Kernel):
    """The sum of squared deviations is accumulated one element at a time in float16,
    as a half-precision kernel that keeps its accumulator in the input dtype does.
    Every other step is in float32.

    The sum stops growing once float16's spacing at the partial sum is more than
    twice each term: on long-reduction (M = 2^18, variance 1) it stalls near 32768,
    an eighth of the exact sum.
    """

    framework = "fault-float16-sum-of-squares"

    def variance(self, x, mean, axes):
        m = int(np.prod([x.shape[axis] for axis in axes]))
        centered = x - mean
        squares = (centered * centered).astype(F16)
        return _serial_sum(squares, axes, F16).astype(F32) / F32(max(m, 1))


class Float16SumOfValues(Float16Kernel):
    """The sum behind the mean is accumulated one element at a time in float16, and
    every other step is in float32.

    The sum overflows float16 (largest finite value 65504) on large-mean-1e4, whose
    slices contain 256 values near 1e4, so the mean is infinite and the output NaN.
    """

    framework = "fault-float16-sum-of-values"

    def mean(self, x, axes):
        m = int(np.prod([x.shape[axis] for axis in axes]))
        return _serial_sum(x.astype(F16), axes, F16).astype(F32) / F32(max(m, 1))


class UncorrectedMean(Float32Kernel):
    """The mean is sum / M without the correction pass, as in a plain two-pass
    kernel: the mean of equal values can be off by an ulp, and a constant slice
    then gives y != beta (by about gamma * ulp(x) / sqrt(ulp(x)^2 + eps))."""

    framework = "fault-uncorrected-mean"
    corrects_mean = False


class UnscaledSums(Float32Kernel):
    """Sums and squares of slices near float32's largest value are taken as they
    are, so they overflow and the output is NaN or wrong."""

    framework = "fault-unscaled-sums"
    scales_large_slices = False


class FusedShift(Float32Kernel):
    """xhat = x * rstd + (-mean * rstd), with x * rstd exact and mean * rstd
    rounded, as a compiler that fuses the two into one multiply-add computes: on a
    constant slice the rounding of mean * rstd is left over."""

    framework = "fault-fused-shift"

    def normalize(self, x, mean, rstd):
        product = x.astype(np.float64) * rstd.astype(np.float64)
        return (product - (mean * rstd).astype(np.float64)).astype(F32)


class ClampedEps(Float32Kernel):
    """Raises eps to at least 1e-5, as a framework that clamps a small eps does."""

    framework = "fault-clamped-eps"

    def rstd(self, var, eps):
        return super().rstd(var, np.maximum(eps, 1e-5))


class EpsInFloat16(Float16Kernel):
    """Keeps eps in float16, where 1e-12 rounds to 0, though it computes in
    float32: a slice of zeros then gives 0 * inf = NaN."""

    framework = "fault-eps-in-float16"

    def rstd(self, var, eps):
        return super().rstd(var, np.float16(eps).astype(F32))


FAULTS = (
    OnePassVariance,
    EpsOutsideSqrt,
    DroppedDxTerm,
    UnbiasedVariance,
    GammaMissingFromDx,
    SwappedParameterGradients,
    ParameterGradientsTwice,
    EpsAddedTwice,
    StatisticsAcrossChannels,
    StatisticsAcrossBatch,
    NanLeaksAcrossSlices,
    UnbiasedVarianceInBackward,
    LastSampleParameterGradients,
    ChannelsLastReadAsChannelsFirst,
    Float16SumOfSquares,
    Float16SumOfValues,
    UncorrectedMean,
    UnscaledSums,
    FusedShift,
    ClampedEps,
    EpsInFloat16,
)


# The catalogue without the 2^26-element case, which takes tens of seconds per
# kernel: the matrices of kernels and seeds run on these, and tests/test_faults.py
# runs that case on its own.
SMALL_CASES = tuple(case for case in cases.CATALOGUE if not case.large)


def run_case(adapter: Float32Kernel, case_name: str, seed: int) -> dict[str, Record]:
    """Judge one catalogue case computed by a kernel in its own dtype, as the suite
    does, and return the records by quantity. A case the dtype cannot hold gets
    `unsupported` records without running."""
    case = cases.by_name(case_name)
    item = Item(adapter.framework, "kernel", "cpu", adapter.dtype, case, seed)
    implementation = adapter.implementations()[0]
    device = adapter.devices()[0]
    reason = unsupported_reason(adapter, implementation, device, item)
    if reason is not None:
        records = unsupported_records(item, reason, implementation.gradients)
    else:
        records = run_item(adapter, item, implementation)
    return {record.quantity: record for record in records}
