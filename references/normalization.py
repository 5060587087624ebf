"""Float64 normalization over a chosen set of reduction axes, forward and backward.

Every member of the family (InstanceNorm, GroupNorm, LayerNorm, BatchNorm in training
mode) normalizes x over some axes and then applies a per-channel scale and shift. This
module owns that shared mathematics; the operator modules only choose the axes.

For each slice (the elements that share one mean), with M elements in the slice:

    mu = mean(x),  var = mean((x - mu)^2)            (biased, two-pass)
    rstd = 1 / sqrt(var + eps),  xhat = (x - mu) * rstd
    y = gamma * xhat + beta

With upstream gradient dy and g = gamma * dy, sums taken per slice:

    dx = rstd / M * (M * g - sum(g) - xhat * sum(g * xhat))

and the parameter gradients sum dy and dy * xhat over every axis but the channel axis.

All arithmetic is float64, whatever dtype the inputs arrive in. Degenerate slices follow
IEEE arithmetic: a constant slice has var = 0, so with eps > 0 it gives xhat = 0 and
y = beta, and with eps = 0 it gives rstd = inf and xhat = 0 * inf = NaN.

A slice whose largest |x| reaches 2^SAFE_EXPONENT would overflow float64 in its sums
and squares, although xhat, y and the parameter gradients are of ordinary size. Such
a slice is computed on x / c, c a power of two that brings its largest |x| below
2^SAFE_EXPONENT, with eps / c^2: xhat is the same, rstd is the scaled one divided
by c, and so is dx. Dividing by a power of two is exact down to float64's
subnormal range, so only values below 2^-1074 * c (at most 2^-450) lose bits, a
negligible part of a slice whose largest value is 2^400 or more. Other slices get
c = 1 and the plain formulas.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np

CHANNEL_AXIS = 1
# Slices whose largest finite |x| reaches 2^SAFE_EXPONENT are computed on x scaled
# down by a power of two. The squares of the scaled values stay below 2^800, so
# sums of them over any slice that fits in memory stay finite.
SAFE_EXPONENT = 400


@dataclass(frozen=True)
class Statistics:
    """Per-slice statistics, shaped to broadcast against x (reduced axes kept as 1).

    `scale` is the power of two c that the slice was divided by (1 for most), and
    `scaled_rstd` is rstd * c, the rstd of x / c with eps / c^2. `var` is the
    variance of x itself, which is inf where it exceeds float64's range.
    """

    mean: np.ndarray
    var: np.ndarray
    rstd: np.ndarray
    scale: np.ndarray | float = 1.0
    scaled_rstd: np.ndarray | None = None

    def normalize(self, x: np.ndarray) -> np.ndarray:
        """Return xhat = (x - mean) * rstd, computed on the scaled slice so that
        x - mean cannot overflow."""
        rstd = self.rstd if self.scaled_rstd is None else self.scaled_rstd
        with np.errstate(invalid="ignore"):
            return (x / self.scale - self.mean / self.scale) * rstd


@dataclass(frozen=True)
class Forward:
    output: np.ndarray
    xhat: np.ndarray
    stats: Statistics


@dataclass(frozen=True)
class Gradients:
    grad_input: np.ndarray
    grad_gamma: np.ndarray
    grad_beta: np.ndarray


def as_float64(array: np.ndarray) -> np.ndarray:
    """Return array as float64 (a bfloat16 input arrives in a wider container)."""
    return np.asarray(array, dtype=np.float64)


def broadcast_parameter(
    parameter: np.ndarray, ndim: int, spans: tuple[int, ...] = (CHANNEL_AXIS,)
) -> np.ndarray:
    """Reshape an affine parameter to broadcast against x of rank `ndim`.

    `spans` are the axes of x the parameter runs along, in order. They are (1,)
    for a per-channel vector of length C, the default. LayerNorm's elementwise
    parameters span the last k axes. GroupNorm's per-channel vector spans axes 1
    and 2 of x viewed as (N, G, C / G, ...).
    """
    parameter = as_float64(parameter)
    shape = [1] * ndim
    sizes = parameter.shape if len(spans) > 1 else (-1,)
    for axis, size in zip(spans, sizes, strict=True):
        shape[axis] = size
    return parameter.reshape(shape)


def slice_scale(x: np.ndarray, axes: tuple[int, ...]) -> np.ndarray:
    """Return, per slice over `axes` (kept as size 1), the power of two c >= 1 that
    the reference divides the slice by: 1 unless its largest finite |x| reaches
    2^SAFE_EXPONENT, else the power that brings it just below."""
    x = as_float64(x)
    with np.errstate(invalid="ignore"):
        magnitude = np.abs(x)
        finite = np.where(np.isfinite(magnitude), magnitude, 0.0)
        peak = np.max(finite, axis=axes, keepdims=True, initial=0.0)
    _, exponent = np.frexp(peak)
    return np.ldexp(1.0, np.maximum(exponent - SAFE_EXPONENT, 0))


def statistics(x: np.ndarray, eps: float, axes: tuple[int, ...]) -> Statistics:
    """Compute the two-pass mean, biased variance and rstd over the given axes,
    on each slice scaled by slice_scale."""
    x = as_float64(x)
    scale = slice_scale(x, axes)
    scaled = x / scale
    mean, var, scaled_rstd = _scaled_statistics(scaled, eps / scale / scale, axes)
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        mean = mean * scale
        # A constant slice has var = 0, where eps / c^2 may have underflowed to 0.
        # Its x - mean is exactly 0 without scaling, so it keeps c = 1 and rstd
        # = 1 / sqrt(eps), which rstd * c could push beyond float64's range.
        constant = (var == 0) & (scale > 1)
        rstd = np.where(constant, 1.0 / np.sqrt(eps), scaled_rstd / scale)
        scaled_rstd = np.where(constant, rstd, scaled_rstd)
        return Statistics(
            mean=mean,
            var=var * scale * scale,
            rstd=rstd,
            scale=np.where(constant, 1.0, scale),
            scaled_rstd=scaled_rstd,
        )


def _scaled_statistics(
    x: np.ndarray, eps: float | np.ndarray, axes: tuple[int, ...]
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Return the mean, biased variance and rstd of x over `axes` (kept as size 1)."""
    with np.errstate(invalid="ignore"), warnings.catch_warnings():
        # A slice with no elements (BatchNorm on an empty batch) has mean 0/0 =
        # NaN, as IEEE arithmetic gives; NumPy also warns about it.
        warnings.simplefilter("ignore", RuntimeWarning)
        mean = np.mean(x, axis=axes, keepdims=True)
        # One correction pass: the rounded mean of a constant slice of, say, 0.1 is
        # an ulp off, which would leave var near 1e-34 instead of exactly 0. Each
        # x - mean is then exact (Sterbenz), so adding their mean lands on the value.
        # An infinite mean stays as it is: inf - inf would make it NaN.
        correction = np.mean(x - mean, axis=axes, keepdims=True)
        mean = np.where(np.isfinite(mean), mean + correction, mean)
        centered = x - mean
        var = np.mean(centered * centered, axis=axes, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        rstd = 1.0 / np.sqrt(var + eps)
    return mean, var, rstd


def forward(
    x: np.ndarray,
    gamma: np.ndarray,
    beta: np.ndarray,
    eps: float,
    axes: tuple[int, ...],
    spans: tuple[int, ...] = (CHANNEL_AXIS,),
) -> Forward:
    """Normalize x over `axes`, then scale by gamma and shift by beta, which run
    along the axes `spans` of x (per channel by default)."""
    x = as_float64(x)
    stats = statistics(x, eps, axes)

    with np.errstate(invalid="ignore"):
        xhat = stats.normalize(x)
        output = broadcast_parameter(gamma, x.ndim, spans) * xhat + broadcast_parameter(
            beta, x.ndim, spans
        )

    return Forward(output=output, xhat=xhat, stats=stats)


def parameter_axes(
    ndim: int, spans: tuple[int, ...] = (CHANNEL_AXIS,)
) -> tuple[int, ...]:
    """Return the axes gamma and beta are shared over: every axis but `spans`
    (by default every axis but the channel axis)."""
    return tuple(axis for axis in range(ndim) if axis not in spans)


def reduction_length(shape: tuple[int, ...], axes: tuple[int, ...]) -> int:
    """Return M, the number of elements in one normalized slice."""
    return int(np.prod([shape[axis] for axis in axes], dtype=np.int64))


def backward(
    x: np.ndarray,
    gamma: np.ndarray,
    grad_output: np.ndarray,
    eps: float,
    axes: tuple[int, ...],
    fwd: Forward | None = None,
    spans: tuple[int, ...] = (CHANNEL_AXIS,),
) -> Gradients:
    """Return the input, gamma and beta gradients by the compact formula, gamma
    running along the axes `spans` of x (per channel by default). The parameter
    gradients have gamma's shape.

    `fwd` may carry a forward result already computed for the same x and eps.
    """
    x = as_float64(x)
    dy = as_float64(grad_output)
    if fwd is None:
        fwd = forward(x, gamma, np.zeros_like(as_float64(gamma)), eps, axes, spans)
    xhat, stats = fwd.xhat, fwd.stats
    rstd = stats.rstd if stats.scaled_rstd is None else stats.scaled_rstd
    m = reduction_length(x.shape, axes)

    with np.errstate(invalid="ignore"):
        g = broadcast_parameter(gamma, x.ndim, spans) * dy
        sum_g = np.sum(g, axis=axes, keepdims=True)
        sum_g_xhat = np.sum(g * xhat, axis=axes, keepdims=True)
        # rstd of the scaled slice, then the division by its scale c: one rounding
        # where the true rstd is subnormal.
        grad_input = rstd / m * (m * g - sum_g - xhat * sum_g_xhat) / stats.scale

        shared = parameter_axes(x.ndim, spans)
        shape = np.shape(gamma)
        grad_gamma = np.sum(dy * xhat, axis=shared).reshape(shape)
        grad_beta = np.sum(dy, axis=shared).reshape(shape)

    return Gradients(grad_input=grad_input, grad_gamma=grad_gamma, grad_beta=grad_beta)


def backward_three_term(
    x: np.ndarray,
    gamma: np.ndarray,
    grad_output: np.ndarray,
    eps: float,
    axes: tuple[int, ...],
) -> np.ndarray:
    """Return the input gradient by the chain rule through mu and var.

    This is the dx/dmu and dx/dvar form that MXNet's kernels write out. It equals
    the compact formula in exact arithmetic and serves as an independent check of it.
    """
    x = as_float64(x)
    dy = as_float64(grad_output)
    stats = statistics(x, eps, axes)
    m = reduction_length(x.shape, axes)
    centered = x - stats.mean
    g = broadcast_parameter(gamma, x.ndim) * dy

    grad_var = np.sum(g * centered, axis=axes, keepdims=True) * -0.5 * stats.rstd**3
    grad_mean = (
        -np.sum(g, axis=axes, keepdims=True) * stats.rstd
        + grad_var * np.sum(-2.0 * centered, axis=axes, keepdims=True) / m
    )

    return g * stats.rstd + grad_var * 2.0 * centered / m + grad_mean / m
