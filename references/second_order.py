"""Float64 second derivatives of normalization: the gradients of sum(v * grad_input).

For one slice of M elements, with g = gamma * dy, xhat = (x - mu) * rstd and
r = rstd, the input gradient is

    dx = r / M * (M * g - sum(g) - xhat * sum(g * xhat)).

Given a direction v shaped like x, let L = sum(v * dx). Then, with the per-slice sums
A = sum(v * g), B = sum(v), C = sum(g), D = sum(v * xhat), E = sum(g * xhat):

    w          = r / M * (M * v - B - xhat * D)      (dL / dg, the same operator on v)
    dL / d dy  = gamma * w
    dL / dgamma = sum of w * dy over the axes gamma is shared on
    dL / dx    = -(r^2 / M) * (xhat * K + (E * (M * v - B - xhat * D)
                                           + D * (M * g - C - xhat * E)) / M)

where K = A - B * C / M - D * E / M. The last line follows from
d r / d x_j = -r^2 * xhat_j / M and d xhat_i / d x_j = r / M * (M * [i = j] - 1 -
xhat_i * xhat_j); tests/test_second_order.py checks all three against central
differences of L.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from references import normalization


@dataclass(frozen=True)
class SecondOrder:
    """The gradients of sum(v * grad_input) with respect to each input."""

    grad_x: np.ndarray
    grad_gamma: np.ndarray
    grad_grad_output: np.ndarray


def double_backward(
    x: np.ndarray,
    gamma: np.ndarray,
    grad_output: np.ndarray,
    v: np.ndarray,
    eps: float,
    axes: tuple[int, ...],
    spans: tuple[int, ...] = (normalization.CHANNEL_AXIS,),
) -> SecondOrder:
    """Return the gradients of sum(v * grad_input) for normalization over `axes`,
    gamma running along the axes `spans` of x (per channel by default)."""
    x = normalization.as_float64(x)
    dy = normalization.as_float64(grad_output)
    v = normalization.as_float64(v)
    stats = normalization.statistics(x, eps, axes)
    m = normalization.reduction_length(x.shape, axes)
    gamma_b = normalization.broadcast_parameter(gamma, x.ndim, spans)

    def per_slice(values: np.ndarray) -> np.ndarray:
        return np.sum(values, axis=axes, keepdims=True)

    with np.errstate(invalid="ignore", over="ignore"):
        r = stats.rstd
        xhat = stats.normalize(x)
        g = gamma_b * dy
        a, b, c = per_slice(v * g), per_slice(v), per_slice(g)
        d, e = per_slice(v * xhat), per_slice(g * xhat)

        v_part = m * v - b - xhat * d
        w = r / m * v_part
        k = a - b * c / m - d * e / m
        bracket = xhat * k + (e * v_part + d * (m * g - c - xhat * e)) / m
        scale = r * r / m
        grad_x = -scale * bracket
        # A constant slice with a tiny eps: r^2 overflows, but the bracket is
        # exactly 0 there, and so is the derivative.
        grad_x = np.where(np.isinf(scale) & (bracket == 0), -bracket, grad_x)
        shared = normalization.parameter_axes(x.ndim, spans)
        grad_gamma = np.sum(w * dy, axis=shared).reshape(np.shape(gamma))
    return SecondOrder(
        grad_x=grad_x, grad_gamma=grad_gamma, grad_grad_output=gamma_b * w
    )
