"""Float64 InstanceNorm and BatchNorm (training mode) on top of the shared core.

InstanceNorm normalizes each (n, c) slice of x, shaped (N, C, *spatial), over its
spatial axes. BatchNorm in training mode normalizes each channel over the batch and the
spatial axes. InstanceNorm on (N, C, ...) equals BatchNorm on the (1, N * C, ...)
reshape with gamma and beta repeated N times.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from references import normalization


@dataclass(frozen=True)
class Expected:
    """The exact (float64) results for one set of inputs.

    grad_gamma and grad_beta are None when the operator has no affine parameters.
    """

    output: np.ndarray
    grad_input: np.ndarray
    grad_gamma: np.ndarray | None
    grad_beta: np.ndarray | None
    mean: np.ndarray
    rstd: np.ndarray
    xhat: np.ndarray


def spatial_axes(ndim: int) -> tuple[int, ...]:
    """Return the axes after (N, C): the InstanceNorm reduction axes."""
    if ndim < 3:
        raise ValueError(f"InstanceNorm needs x of rank 3 or more, got rank {ndim}")
    return tuple(range(2, ndim))


def batch_axes(ndim: int) -> tuple[int, ...]:
    """Return the BatchNorm (training mode) reduction axes: batch and spatial axes."""
    return (0, *spatial_axes(ndim))


def _parameters(
    shape: tuple[int, ...], gamma: np.ndarray | None, beta: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray]:
    if gamma is None:
        gamma = np.ones(shape)
    if beta is None:
        beta = np.zeros(shape)
    return normalization.as_float64(gamma), normalization.as_float64(beta)


def evaluate(
    x: np.ndarray,
    gamma: np.ndarray | None,
    beta: np.ndarray | None,
    grad_output: np.ndarray,
    eps: float,
    axes: tuple[int, ...],
    spans: tuple[int, ...] = (normalization.CHANNEL_AXIS,),
) -> Expected:
    """Return the output and gradients of normalizing x over `axes`, with gamma and
    beta running along the axes `spans` of x (both None for affine off)."""
    x = normalization.as_float64(x)
    affine = gamma is not None
    shape = tuple(x.shape[axis] for axis in spans)
    gamma, beta = _parameters(shape, gamma, beta)

    fwd = normalization.forward(x, gamma, beta, eps, axes, spans)
    grads = normalization.backward(x, gamma, grad_output, eps, axes, fwd, spans)

    return Expected(
        output=fwd.output,
        grad_input=grads.grad_input,
        grad_gamma=grads.grad_gamma if affine else None,
        grad_beta=grads.grad_beta if affine else None,
        mean=fwd.stats.mean,
        rstd=fwd.stats.rstd,
        xhat=fwd.xhat,
    )


def instance_norm(
    x: np.ndarray,
    gamma: np.ndarray | None,
    beta: np.ndarray | None,
    grad_output: np.ndarray,
    eps: float,
) -> Expected:
    """Return InstanceNorm's output and gradients for x of shape (N, C, *spatial).

    Pass gamma = beta = None for affine off: the operator then uses gamma = 1 and
    beta = 0 and has no parameter gradients. Both must be None or both arrays.
    """
    if (gamma is None) != (beta is None):
        raise ValueError("gamma and beta must both be given or both be None")
    return evaluate(x, gamma, beta, grad_output, eps, spatial_axes(np.ndim(x)))


def batch_norm_training(
    x: np.ndarray,
    gamma: np.ndarray | None,
    beta: np.ndarray | None,
    grad_output: np.ndarray,
    eps: float,
) -> Expected:
    """Return BatchNorm's training-mode output and gradients (batch statistics)."""
    if (gamma is None) != (beta is None):
        raise ValueError("gamma and beta must both be given or both be None")
    return evaluate(x, gamma, beta, grad_output, eps, batch_axes(np.ndim(x)))
