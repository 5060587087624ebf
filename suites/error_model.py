"""The error model: how far a result may be from the float64 reference.

Each element's error is measured against the magnitude of the terms that produce it
(its forward-error scale), in units of the tested dtype's unit roundoff u:

    error = |got - expected| / (scale * u)

A correct implementation that rounds each intermediate to the tested dtype makes an
error of a few u relative to that scale for each operation, and the reductions add an
error that grows with the reduction length. The scales, per element, with
s = (|x| + mean(|x|)) * rstd the scale of xhat and g = gamma * dy:

    output      |gamma| * s + |beta|
    grad_input  rstd / M * (M * |g| + sum|g| + |xhat| * sum(|g| * s)
                              + s * sum(|g| * |xhat|))         (sums per slice)
    grad_gamma  P + sqrt(sum((dy * s)^2)), with P the sum over the channel's
                slices of |sum(dy)| * mean(|x|) * rstd + |sum(dy * xhat)|
    grad_beta   |sum(dy)| + sqrt(sum(dy^2))
                (outer sums over the batch and spatial axes, per channel)

The mean(|x|) term is there because the mean computed in the tested dtype carries an
error proportional to the mean of |x| over the slice (about |mu| when the offset
dominates), and every later step inherits it. A one-pass variance
E[x^2] - E[x]^2 carries an error proportional to mu^2 instead, which no scale here
covers, so it fails on inputs with a large mean and a small spread.

A slice whose values are all equal is the exception: its mean is the value itself,
which a kernel delivers exactly when the mean of equal values stays equal to them,
so its scales drop the mean(|x|) term and s is 0 there. The output must then be
beta, and the input gradient gamma * (dy - mean(dy)) / sqrt(eps), to within the
rounding of those terms alone.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import numpy as np

from references import normalization
from references.family import INSTANCE_NORM, Operator
from references.instance_norm import Expected
from suites import dtypes

QUANTITIES = ("output", "grad_input", "grad_gamma", "grad_beta")

# Budget in units of u, per (quantity, dtype): BASE + GROWTH * sqrt(L) for a reduction
# of length L. A sum accumulated one element at a time in the working precision has
# a relative rounding error whose standard deviation is about sqrt(L / 3) u when the
# terms share a sign, which normalizes to at most 0.58 * sqrt(L) u per standard
# deviation; GROWTH = 2.5 admits 4.3 standard deviations. Measured on the
# long-reduction case (L = 2^18, 1284 u budget): SerialSumKernel in tests/faults.py
# 535 u over 10 seeds, MXNet 1.9.1 and TensorFlow 2.21.0 float32 CPU kernels 584 u
# at most over 30 seeds, torch 2.13.0 float64 batch_norm 236 u (docs/error-model.md).
BASE = 4.0
GROWTH = 2.5
# float16 and bfloat16 kernels accumulate in float32: a serial float16 sum stops
# growing at 2048 and a bfloat16 one at 256, so a half-precision accumulator is a
# defect (tests/faults.py has two). Their budgets admit float32 accumulation, the
# float32 growth expressed in half-precision units, plus a larger base for the
# several results that such kernels store in the half dtype (docs/calibration.md).
HALF_BASE = 5.0
BUDGET: dict[str, dict[str, tuple[float, float]]] = {
    quantity: {
        "float64": (BASE, GROWTH),
        "float32": (BASE, GROWTH),
        "float16": (
            HALF_BASE,
            GROWTH * dtypes.UNIT_ROUNDOFF["float32"] / dtypes.UNIT_ROUNDOFF["float16"],
        ),
        "bfloat16": (
            HALF_BASE,
            GROWTH * dtypes.UNIT_ROUNDOFF["float32"] / dtypes.UNIT_ROUNDOFF["bfloat16"],
        ),
    }
    for quantity in QUANTITIES
}


# The second derivatives: the gradients of L = sum(v * grad_input) with respect to
# x, gamma and grad_output, for a direction v shaped like x (suites/second_order.py).
SECOND_ORDER_QUANTITIES = ("grad2_input", "grad2_gamma", "grad2_grad_output")
# The quantities that sum over every axis their parameter does not run along.
PARAMETER_GRADIENTS = ("grad_gamma", "grad_beta", "grad2_gamma")
# Their budgets have the same form and, as measured, the same constants: the
# correct kernels of tests/second_order_faults.py over seeds 0 to 9 reached 0.55 of
# them (995 u of 1810 u, grad2_grad_output of serial float32 sums at L = 2^18), and
# torch 2.13.0's float32 and float64 CPU double backward 0.22 (docs/error-model.md).
# A table of its own, because the golden-data export writes BUDGET, which contains the
# first-order quantities only.
SECOND_ORDER_BUDGET: dict[str, dict[str, tuple[float, float]]] = {
    quantity: {
        "float64": (BASE, GROWTH),
        "float32": (BASE, GROWTH),
        "float16": BUDGET["grad_input"]["float16"],
        "bfloat16": BUDGET["grad_input"]["bfloat16"],
    }
    for quantity in SECOND_ORDER_QUANTITIES
}


# Running statistics (suites/running_statistics.py): the running mean and
# variance after a training step, and the output and gradients of inference with
# running statistics, named apart from the training-mode quantities.
RUNNING_QUANTITIES = ("running_mean", "running_var")
INFERENCE_QUANTITIES = (
    "inference_output",
    "inference_grad_input",
    "inference_grad_gamma",
    "inference_grad_beta",
)
# The running values after a step, (1 - w) * old + w * batch, round three times in
# the dtype they are stored in, and each rounding in the subnormal range may move
# them by half a subnormal spacing. torch 2.13.0 keeps float16 running values in
# float16, and on eps-vs-variance-1e-8 (seed 0) returned a running_var 0.68 of a
# spacing (2^-24) from the exact 1.1517e-6, which one half spacing did not cover.
# The other quantities get one half spacing.
SUBNORMAL_ROUNDINGS = {"running_mean": 3, "running_var": 3}
# Elementwise in inference: no reduction stands behind them (length 1).
# NOTE: their 6.5 u budget was reached to 0.70 on the CPU (docs/error-model.md);
# GPU kernels with an approximate reciprocal square root are not measured.
ELEMENTWISE = ("inference_output", "inference_grad_input")
# The sums per channel over the batch and spatial axes, whose budget length is
# that of a parameter gradient.
CHANNEL_SUMS = (
    *PARAMETER_GRADIENTS,
    *RUNNING_QUANTITIES,
    "inference_grad_gamma",
    "inference_grad_beta",
)
# Their budgets take the first-order constants: each is a sum per channel, or a
# few roundings of one element, as the first-order quantities are.
RUNNING_BUDGET: dict[str, dict[str, tuple[float, float]]] = {
    quantity: BUDGET["grad_input"] for quantity in RUNNING_QUANTITIES
} | {quantity: BUDGET["grad_input"] for quantity in INFERENCE_QUANTITIES}


# Repeated backward (suites/repeated_backward.py): the gradients of each of K
# backward calls on one input, each into fresh gradients ("repeated_") or added
# into the same buffers ("accumulated_"). Each takes the budget and reduction
# length of the first-order gradient behind it (BASE_QUANTITY); the scale of an
# accumulated one is accumulated_scale.
REPEATED_QUANTITIES = (
    "repeated_grad_input",
    "repeated_grad_gamma",
    "repeated_grad_beta",
)
ACCUMULATED_QUANTITIES = (
    "accumulated_grad_input",
    "accumulated_grad_gamma",
    "accumulated_grad_beta",
)
BASE_QUANTITY = {
    quantity: quantity.split("_", 1)[1]
    for quantity in (*REPEATED_QUANTITIES, *ACCUMULATED_QUANTITIES)
}
# The note that ends the message of a failing repeated or accumulated record when
# every call matches the same adapter's fresh, single backward calls with those
# grad_outputs (their sums in "accumulate"): the error is first-order, not state
# kept between calls, so a deviation entry for the first-order gradient covers it.
FRESH_MATCH = "every call matches fresh single backward calls"


def budget(quantity: str, dtype: str, reduction_length: int) -> float:
    """Return the largest normalized error a correct result may show."""
    quantity = BASE_QUANTITY.get(quantity, quantity)
    for table in (BUDGET, SECOND_ORDER_BUDGET, RUNNING_BUDGET):
        if quantity in table:
            break
    base, growth = table[quantity][dtype]
    return base + growth * math.sqrt(max(reduction_length, 1))


def budget_reduction_length(
    quantity: str, shape: tuple[int, ...], operator: Operator = INSTANCE_NORM
) -> int:
    """Return the length of the reduction behind `quantity` for x of this shape.

    The output and grad_input reduce over one slice (M elements). A parameter
    gradient sums over every axis its parameter does not run along, and each term
    carries the error of its slice's statistics, so its length is the longer of
    the two: N * M for InstanceNorm and BatchNorm. The running statistics are such
    sums too, and the output and grad_input of inference reduce over nothing.
    """
    quantity = BASE_QUANTITY.get(quantity, quantity)
    if quantity in ELEMENTWISE:
        return 1
    view = operator.view_shape(tuple(shape))
    axes = operator.axes(tuple(shape))
    slice_length = int(np.prod([view[axis] for axis in axes], dtype=np.int64))
    if quantity not in CHANNEL_SUMS:
        return slice_length
    spans = operator.spans(tuple(shape))
    shared = [view[axis] for axis in range(len(view)) if axis not in spans]
    terms = int(np.prod(shared, dtype=np.int64))
    # An empty batch sums nothing, whatever the slice length.
    return max(terms, slice_length) if terms else 0


def scales(
    x: np.ndarray,
    gamma: np.ndarray | None,
    beta: np.ndarray | None,
    grad_output: np.ndarray,
    expected: Expected,
    axes: tuple[int, ...] | None = None,
    spans: tuple[int, ...] = (normalization.CHANNEL_AXIS,),
) -> dict[str, np.ndarray]:
    """Return the forward-error scale of every element of every quantity.

    x is normalized over `axes` (default: the spatial axes, as InstanceNorm does),
    and gamma and beta run along the axes `spans` of x. For GroupNorm, x must
    already be viewed as (N, G, C / G, ...), as suites.verdicts.reference_from_inputs
    does.
    """
    x = normalization.as_float64(x)
    dy = normalization.as_float64(grad_output)
    ndim = x.ndim
    if axes is None:
        axes = tuple(range(2, ndim))
    m = normalization.reduction_length(x.shape, axes)
    parameters = tuple(x.shape[axis] for axis in spans)

    abs_gamma = normalization.broadcast_parameter(
        np.abs(gamma) if gamma is not None else np.ones(parameters), ndim, spans
    )
    abs_beta = normalization.broadcast_parameter(
        np.abs(beta) if beta is not None else np.zeros(parameters), ndim, spans
    )

    with np.errstate(invalid="ignore", over="ignore"), warnings.catch_warnings():
        # An empty slice (BatchNorm on an empty batch) has a NaN mean.
        warnings.simplefilter("ignore", RuntimeWarning)
        s, mean_abs_rstd = centering_scales(x, axes, expected.rstd)
        # A slice whose values are all equal has an exact mean in any kernel that
        # keeps the mean of equal values equal to them, so x - mean and xhat are
        # exactly 0 there: no error of the mean or of xhat is allowed for it.
        constant = constant_slices(x, axes)
        mean_abs_rstd = np.where(constant, 0.0, mean_abs_rstd)
        s = np.where(constant, 0.0, s)
        abs_g = abs_gamma * np.abs(dy)
        sum_abs_g = np.sum(abs_g, axis=axes, keepdims=True)
        abs_xhat = np.abs(expected.xhat)
        sum_abs_g_s = np.sum(abs_g * s, axis=axes, keepdims=True)
        sum_abs_g_xhat = np.sum(abs_g * abs_xhat, axis=axes, keepdims=True)
        # The last term is first order in the errors of xhat * sum(g * xhat):
        # |xhat| times the error of the sum plus the error of xhat times the sum.
        product_scale = abs_xhat * sum_abs_g_s + s * sum_abs_g_xhat
        shared = normalization.parameter_axes(ndim, spans)

        result = {
            "output": abs_gamma * s + abs_beta,
            "grad_input": expected.rstd / m * (m * abs_g + sum_abs_g + product_scale),
        }
        result.update(
            parameter_scale_parts(dy, expected, s, mean_abs_rstd, axes, shared)
        )
        for quantity in ("grad_gamma", "grad_beta"):
            result[quantity] = parameter_scale(
                result[f"{quantity}_sum"], result[f"{quantity}_squares"]
            )
    return result


def accumulated_scale(
    step_scales: list[np.ndarray],
    step_exact: list[np.ndarray],
    limit: float,
    units: str,
) -> np.ndarray:
    """Return the scale of a gradient that K backward calls added up, from each
    call's scale and exact value. `limit` is the budget (u) of one call's
    gradient, and `units` the dtype whose roundoff u measures errors.

    Each call's gradient g_k is off by at most limit * u * S_k. Adding K of them
    rounds K - 1 times, each time by at most u times the partial sum, which is at
    most the sum of |G_k| + limit * u * S_k over the calls. The scale returned,
    sum(S_k) + (K - 1) / limit * sum(|G_k| + limit * u * S_k), turns that whole
    bound into `limit` units. Where an exact value is not finite, so is the scale,
    and only an exact match passes there.
    """
    unit = dtypes.COMPUTE_UNIT_ROUNDOFF[units]
    with np.errstate(invalid="ignore", over="ignore"):
        total = np.sum(step_scales, axis=0)
        magnitude = np.sum(np.abs(step_exact), axis=0) + limit * unit * total
        return total + (len(step_scales) - 1) / limit * magnitude


def centering_scales(
    x: np.ndarray, axes: tuple[int, ...], rstd: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Return s = (|x| + mean(|x|)) * rstd per element and mean(|x|) * rstd per
    slice over `axes`: the relative sizes of the errors of x - mean and of the
    mean. Each slice is divided by its normalization.slice_scale first, so that
    mean(|x|) of values near float64's largest cannot overflow."""
    scale = normalization.slice_scale(x, axes)
    with np.errstate(invalid="ignore", over="ignore"), warnings.catch_warnings():
        # An empty slice (BatchNorm on an empty batch) has a NaN mean.
        warnings.simplefilter("ignore", RuntimeWarning)
        scaled_rstd = rstd * scale
        abs_scaled = np.abs(x / scale)
        mean_abs = np.mean(abs_scaled, axis=axes, keepdims=True)
        return (abs_scaled + mean_abs) * scaled_rstd, mean_abs * scaled_rstd


def constant_slices(x: np.ndarray, axes: tuple[int, ...]) -> np.ndarray:
    """Return True per slice (keepdims over `axes`) whose elements are all equal
    and finite; an empty slice is not constant."""
    if x.size == 0:
        shape = tuple(1 if axis in axes else size for axis, size in enumerate(x.shape))
        return np.zeros(shape, dtype=bool)
    with np.errstate(invalid="ignore"):
        lowest = np.min(x, axis=axes, keepdims=True)
        highest = np.max(x, axis=axes, keepdims=True)
        return (lowest == highest) & np.isfinite(lowest)


def parameter_scale_parts(
    dy: np.ndarray,
    expected: Expected,
    s: np.ndarray,
    mean_abs_rstd: np.ndarray,
    axes: tuple[int, ...],
    shared: tuple[int, ...],
) -> dict[str, np.ndarray]:
    """Return the two sums, per parameter element, from which parameter_scale
    makes each parameter gradient's scale. Both add over samples, so a batch
    judged a group of samples at a time adds its groups' parts.

    grad_beta = sum(dy):    sum = sum(dy) (signed), squares = sum(dy^2)
    grad_gamma = sum(dy * xhat):
        sum = sum over slices of |sum(dy)| * mean|x| * rstd + |sum(dy * xhat)|
        squares = sum((dy * s)^2)

    The inner sums run over the reduction axes that the parameter is shared over
    (for LayerNorm, whose parameters run along every reduction axis, over none).
    """
    with np.errstate(invalid="ignore", over="ignore"):
        inner = tuple(axis for axis in axes if axis in shared)
        slice_dy = np.sum(dy, axis=inner, keepdims=True)
        slice_dy_xhat = np.sum(dy * expected.xhat, axis=inner, keepdims=True)
        # One error per slice, from the slice's mean (about mean|x| relative) and
        # its rstd, reaches every element of the slice alike, so its effect on the
        # sum is that error times the slice's sum, not times sum(|dy|).
        systematic = np.abs(slice_dy) * mean_abs_rstd + np.abs(slice_dy_xhat)
        dy_s = dy * s
        return {
            "grad_gamma_sum": np.sum(systematic, axis=shared),
            "grad_gamma_squares": np.sum(dy_s * dy_s, axis=shared),
            "grad_beta_sum": np.sum(slice_dy, axis=shared),
            "grad_beta_squares": np.sum(dy * dy, axis=shared),
        }


def parameter_scale(total: np.ndarray, squares: np.ndarray) -> np.ndarray:
    """Return a parameter gradient's scale from the parts of parameter_scale_parts:
    |sum| + sqrt(sum of squares).

    A sum of L terms rounded along the way has an error of about u times the
    root sum of squares of its partial sums. Where the terms share a sign, the
    partial sums grow like |sum| and that comes to sqrt(L / 3) * |sum| * u; where
    they cancel, the partial sums wander like a random walk and it comes to
    sqrt(L / 2) * sqrt(sum of squares) * u. The budget's growth term,
    GROWTH * sqrt(L), covers both. The earlier scale, sum(|dy|), was larger by
    about sqrt(L) for terms that cancel: at 2^24 terms per channel it passed a
    grad_beta of twice the exact value.
    """
    with np.errstate(invalid="ignore", over="ignore"):
        return np.abs(total) + np.sqrt(squares)


def running_scales(
    x: np.ndarray,
    running_mean: np.ndarray,
    running_var: np.ndarray,
    batch_var: np.ndarray,
    new_weight: float,
    variance_factor: float,
    slice_axes: tuple[int, ...],
    dtype: str,
) -> dict[str, np.ndarray]:
    """Return the scales of the running mean and variance after a training step,
    per channel, for x in (N, C, *spatial) order.

    The update is r' = (1 - w) * r + w * b, with b the batch's mean, or its
    variance `batch_var` (biased, per slice of `slice_axes` and averaged over
    the batch) times `variance_factor` (M / (M - 1) for an unbiased one):

        running_mean  (1 - w) * |r| + w * mean(|x|)
        running_var   (1 - w) * |r| + w * f * (var + sqrt(M) * u * mean(|x|)^2)

    The mean computed in the tested dtype is off by about u * mean(|x|) per term of
    its sum. A two-pass variance is then off by u * var per term, plus the square
    of the mean's error, about sqrt(M) * u * mean(|x|) squared, which divided by
    u and the budget's sqrt(M) leaves the last term. A one-pass variance
    E[x^2] - E[x]^2 is off by u * mean(x^2) instead, which that term covers only
    when var is tiny beside u * mean(x^2): it fails on a large mean with a small
    spread, as the forward scales make it fail.
    """
    x = normalization.as_float64(x)
    axes = normalization.parameter_axes(x.ndim)
    length = normalization.reduction_length(x.shape, slice_axes)
    unit = dtypes.UNIT_ROUNDOFF[dtype]
    with (
        np.errstate(invalid="ignore", over="ignore"),
        warnings.catch_warnings(),
    ):
        # An empty batch has a NaN mean.
        warnings.simplefilter("ignore", RuntimeWarning)
        # Divided by a power of two per channel first, so that the mean of
        # values near float64's largest does not overflow.
        scale = normalization.slice_scale(x, axes)
        mean_abs = np.mean(np.abs(x / scale), axis=axes, keepdims=True) * scale
        mean_abs = mean_abs.reshape(-1)
        variance = np.abs(batch_var) + math.sqrt(max(length, 1)) * unit * mean_abs**2
        old = 1.0 - new_weight
        return {
            "running_mean": old * np.abs(running_mean) + new_weight * mean_abs,
            "running_var": old * np.abs(running_var)
            + new_weight * variance_factor * variance,
        }


def inference_scales(
    x: np.ndarray,
    gamma: np.ndarray | None,
    beta: np.ndarray | None,
    grad_output: np.ndarray,
    running_mean: np.ndarray,
    expected: Expected,
) -> dict[str, np.ndarray]:
    """Return the scales of inference with running statistics, for x in
    (N, C, *spatial) order and `expected` from references.running_stats.inference
    (its rstd, the running one, and xhat). With s = (|x| + |running_mean|) * rstd:

        inference_output      |gamma| * s + |beta|
        inference_grad_input  |gamma| * rstd * |dy|
        inference_grad_gamma  |sum(dy * xhat)| + sqrt(sum((dy * s)^2))
        inference_grad_beta   |sum(dy)| + sqrt(sum(dy^2))

    The statistics are inputs, so only x - mean, its product with rstd and rstd's
    own rounding (relative, shared by the channel) stand behind each element.
    Kernels that fold the statistics into a scale and a shift, y = x * a + b with
    b = beta - mean * a, make errors of u * |x * a| and u * |mean * a|, which s
    covers.
    """
    x = normalization.as_float64(x)
    dy = normalization.as_float64(grad_output)
    channels = x.shape[normalization.CHANNEL_AXIS]
    abs_gamma = normalization.broadcast_parameter(
        np.abs(gamma) if gamma is not None else np.ones(channels), x.ndim
    )
    abs_beta = normalization.broadcast_parameter(
        np.abs(beta) if beta is not None else np.zeros(channels), x.ndim
    )
    mean = normalization.broadcast_parameter(np.abs(running_mean), x.ndim)
    shared = normalization.parameter_axes(x.ndim)
    with np.errstate(invalid="ignore", over="ignore"):
        s = (np.abs(x) + mean) * expected.rstd
        dy_s = dy * s
        return {
            "inference_output": abs_gamma * s + abs_beta,
            "inference_grad_input": abs_gamma * expected.rstd * np.abs(dy),
            "inference_grad_gamma": parameter_scale(
                np.sum(dy * expected.xhat, axis=shared),
                np.sum(dy_s * dy_s, axis=shared),
            ),
            "inference_grad_beta": parameter_scale(
                np.sum(dy, axis=shared), np.sum(dy * dy, axis=shared)
            ),
        }


def second_order_scales(
    x: np.ndarray,
    gamma: np.ndarray | None,
    grad_output: np.ndarray,
    direction: np.ndarray,
    expected: Expected,
    axes: tuple[int, ...],
    spans: tuple[int, ...] = (normalization.CHANNEL_AXIS,),
) -> dict[str, np.ndarray]:
    """Return the forward-error scale of every element of the second derivatives,
    the gradients of L = sum(direction * grad_input).

    The arrays are in the view the core normalizes, as for `scales`, and `expected`
    is the first-order reference (its rstd and xhat). The formulas, with sums per
    slice and |a|~ the bound on the magnitude of a that replaces every term by its
    absolute value, are in docs/error-model.md.
    """
    x = normalization.as_float64(x)
    dy = normalization.as_float64(grad_output)
    v = normalization.as_float64(direction)
    ndim = x.ndim
    m = float(normalization.reduction_length(x.shape, axes))
    parameters = tuple(x.shape[axis] for axis in spans)
    abs_gamma = normalization.broadcast_parameter(
        np.abs(gamma) if gamma is not None else np.ones(parameters), ndim, spans
    )

    def per_slice(values: np.ndarray) -> np.ndarray:
        return np.sum(values, axis=axes, keepdims=True)

    with (
        np.errstate(invalid="ignore", over="ignore", divide="ignore"),
        warnings.catch_warnings(),
    ):
        # An empty slice (BatchNorm on an empty batch) has a NaN mean.
        warnings.simplefilter("ignore", RuntimeWarning)
        r = expected.rstd
        xhat = expected.xhat
        abs_xhat = np.abs(xhat)
        s, mean_abs_rstd = centering_scales(x, axes, r)
        # On a constant slice near float64's largest (x * rstd beyond float64),
        # x - mean is exact in a kernel that keeps the mean of equal values
        # equal to them, as the first-order scales assume for every constant
        # slice.
        constant = constant_slices(x, axes) & ~np.isfinite(mean_abs_rstd)
        s = np.where(constant, 0.0, s)
        mean_abs_rstd = np.where(constant, 0.0, mean_abs_rstd)
        abs_v = np.abs(v)
        abs_g = abs_gamma * np.abs(dy)

        # The magnitudes of the per-slice sums B = sum(v), D = sum(v * xhat),
        # C = sum(g), E = sum(g * xhat) and A = sum(v * g), and the bounds of the
        # errors of D and E, whose terms carry the error of xhat (s per element).
        sum_v, sum_g = per_slice(abs_v), per_slice(abs_g)
        d_abs, d_err = per_slice(abs_v * abs_xhat), per_slice(abs_v * s)
        e_abs, e_err = per_slice(abs_g * abs_xhat), per_slice(abs_g * s)
        a_abs = per_slice(abs_v * abs_g)

        # v_part = M * v - B - xhat * D and g_part = M * g - C - xhat * E: their
        # magnitudes and the bounds of their errors.
        v_abs = m * abs_v + sum_v + abs_xhat * d_abs
        v_err = m * abs_v + sum_v + abs_xhat * d_err + s * d_abs
        g_abs = m * abs_g + sum_g + abs_xhat * e_abs
        g_err = m * abs_g + sum_g + abs_xhat * e_err + s * e_abs
        # K = A - B * C / M - D * E / M.
        k_abs = a_abs + sum_v * sum_g / m + d_abs * e_abs / m
        k_err = a_abs + sum_v * sum_g / m + (d_err * e_abs + d_abs * e_err) / m

        # grad2_input = -(r^2 / M) * (xhat * K + (E * v_part + D * g_part) / M).
        products = e_err * v_abs + e_abs * v_err + d_err * g_abs + d_abs * g_err
        grad2_input = r * r / m * (s * k_abs + abs_xhat * k_err + products / m)
        # grad2_grad_output = gamma * w with w = r / M * v_part: grad_input's scale
        # with v in place of g, times |gamma|.
        grad2_grad_output = abs_gamma * r / m * v_err

        shared = normalization.parameter_axes(ndim, spans)
        total, squares = _second_order_gamma_parts(
            x, dy, v, xhat, r, s, mean_abs_rstd, axes, shared
        )
    return {
        "grad2_input": grad2_input,
        "grad2_gamma": parameter_scale(total, squares),
        "grad2_grad_output": grad2_grad_output,
    }


def _second_order_gamma_parts(
    x: np.ndarray,
    dy: np.ndarray,
    v: np.ndarray,
    xhat: np.ndarray,
    r: np.ndarray,
    s: np.ndarray,
    mean_abs_rstd: np.ndarray,
    axes: tuple[int, ...],
    shared: tuple[int, ...],
) -> tuple[np.ndarray, np.ndarray]:
    """Return the two parts of grad2_gamma's scale, per parameter element: the sum
    of the errors that each slice's statistics and sums spread over the slice, and
    the sum of squares of the independent errors of the terms dy * w.

    grad2_gamma = sum(dy * w) over the shared axes, w = r / M * (M * v - B - xhat * D).
    The errors of r, B = sum(v), D = sum(v * xhat) and of the mean reach every
    element of a slice alike, so each contributes its error times a slice sum:
    |sum(dy * w)| for r's relative error, r / M * |sum(dy)| * sum|v| for B's,
    r / M * |sum(dy * xhat)| * sum(|v| * s) for D's, and r / M * |sum(dy)| *
    mean|x| * r * |D| for the mean's shift of xhat. Each w also rounds on its own,
    by up to r / M * (M * |v| + sum|v| + s * sum(|v| * |xhat|)).
    """
    m = float(normalization.reduction_length(x.shape, axes))
    inner = tuple(axis for axis in axes if axis in shared)

    def per_slice(values: np.ndarray) -> np.ndarray:
        return np.sum(values, axis=axes, keepdims=True)

    def within(values: np.ndarray) -> np.ndarray:
        return np.sum(values, axis=inner, keepdims=True)

    abs_v = np.abs(v)
    sum_v = per_slice(abs_v)
    d_signed = per_slice(v * xhat)
    w = r / m * (m * v - per_slice(v) - xhat * d_signed)
    systematic = np.abs(within(dy * w)) + r / m * (
        np.abs(within(dy)) * (sum_v + mean_abs_rstd * np.abs(d_signed))
        + np.abs(within(dy * xhat)) * per_slice(abs_v * s)
    )
    independent = dy * r / m * (m * abs_v + sum_v + s * per_slice(abs_v * np.abs(xhat)))
    return (
        np.sum(systematic, axis=shared),
        np.sum(independent * independent, axis=shared),
    )


@dataclass(frozen=True)
class Comparison:
    """The worst element of one quantity, judged against its budget.

    `error` is the largest normalized error, inf when a NaN or infinity is in the
    wrong place. `index` is that element's index, or None for an empty array.
    """

    error: float
    budget: float
    index: tuple[int, ...] | None
    got: float | None
    expected: float | None
    nonfinite_mismatch: bool

    @property
    def within_budget(self) -> bool:
        return self.error <= self.budget


def normalized_errors(
    got: np.ndarray,
    expected: np.ndarray,
    scale: np.ndarray,
    dtype: str,
    stored: str | None = None,
    subnormal_roundings: int = 1,
) -> np.ndarray:
    """Return |got - expected| / (scale * u) per element, in units of `dtype`.

    The difference first loses half the subnormal spacing of `stored`, the dtype
    the result is stored in (default `dtype`). Rounding an exact value below the
    smallest normal number moves it by up to that much, an error that no scale
    proportional to the value covers. (torch 2.13.0's float16 LayerNorm returns the
    correctly rounded 2^-24 for a grad_gamma element whose exact value is 5.5e-8,
    an error of 17.8 u without this allowance.)
    Where expected is NaN or infinite, got must match it exactly (error 0, else inf).
    Where the scale is zero, only an exact match is correct.
    """
    got = normalization.as_float64(got)
    expected = normalization.as_float64(expected)
    unit = dtypes.COMPUTE_UNIT_ROUNDOFF[dtype]
    # A result that several roundings in the stored dtype produce may be off by
    # half a subnormal spacing for each of them (subnormal_roundings).
    allowance = dtypes.SMALLEST_SUBNORMAL[stored or dtype] / 2 * subnormal_roundings

    # In place, in few passes: this runs four times per item, on up to 2^19
    # elements. Only elements whose error is not finite need the rules below,
    # and an exact match elsewhere already has error 0.
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        errors = np.subtract(got, expected)
        np.abs(errors, out=errors)
        np.subtract(errors, allowance, out=errors)
        np.maximum(errors, 0.0, out=errors)
        # Divided by the scale first: scale * u underflows to 0 where the scale
        # is near float64's smallest normal number (a float64 grad_input on
        # values near float64's largest), which would make every error infinite.
        errors /= scale
        errors /= unit
    special = ~np.isfinite(errors)
    if special.any():
        where = np.nonzero(special)
        got_here, expected_here = got[where], expected[where]
        exact = (got_here == expected_here) | (
            np.isnan(got_here) & np.isnan(expected_here)
        )
        # Anything else is a non-finite mismatch or a 0/0 with got != expected.
        errors[where] = np.where(exact, 0.0, np.inf)
    return errors


def compare(
    quantity: str,
    got: np.ndarray,
    expected: np.ndarray,
    scale: np.ndarray,
    dtype: str,
    shape: tuple[int, ...],
    units: str | None = None,
    operator: Operator = INSTANCE_NORM,
) -> Comparison:
    """Judge one quantity; `shape` is the shape of x, which with the operator
    sets the budget.

    Errors are in units of the roundoff of `units` (default: `dtype`), and the
    budget is the tested dtype's entry of BUDGET.
    """
    limit = budget(quantity, dtype, budget_reduction_length(quantity, shape, operator))
    if expected.size == 0:
        return Comparison(0.0, limit, None, None, None, False)

    roundings = SUBNORMAL_ROUNDINGS.get(quantity, 1)
    errors = normalized_errors(got, expected, scale, units or dtype, dtype, roundings)
    # An exact value beyond the dtype's range rounds to an infinity, which is then
    # the one correct result (sum(dy) over 2^18 elements overflows float16).
    # Rounding the whole array costs more than the rest of the comparison, so it
    # happens only where some finite exact value lies beyond the largest finite
    # value of the dtype, the only values that can round to an infinity.
    exact = normalization.as_float64(expected)
    with np.errstate(over="ignore", invalid="ignore"):
        beyond = np.isfinite(exact) & (np.abs(exact) > dtypes.MAX_FINITE[dtype])
        if beyond.any():
            rounded = dtypes.round_to(exact, dtype)
            overflowed = np.isinf(rounded) & beyond
            errors = np.where(overflowed & (np.asarray(got) == rounded), 0.0, errors)
    flat = int(np.argmax(errors))
    index = tuple(int(i) for i in np.unravel_index(flat, errors.shape))
    got_value = float(np.asarray(got)[index])
    expected_value = float(exact[index])
    nonfinite = not (math.isfinite(got_value) and math.isfinite(expected_value))
    return Comparison(
        error=float(errors[index]),
        budget=limit,
        index=index,
        got=got_value,
        expected=expected_value,
        nonfinite_mismatch=nonfinite and errors[index] > 0,
    )
