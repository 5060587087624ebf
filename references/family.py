"""Float64 GroupNorm and LayerNorm on the shared core (references.normalization).

GroupNorm splits the C channels of x, shaped (N, C, *spatial), into G groups of C / G
consecutive channels. It normalizes each (n, group) over its channels and spatial
axes, and gamma and beta stay per channel. It runs the core on x viewed as
(N, G, C / G, *spatial), with the parameters spanning axes 1 and 2 of that view.
G = C is InstanceNorm, and G = 1 normalizes each sample over all its elements.

LayerNorm normalizes over the last k axes of x, whatever its rank, and its gamma and
beta have the shape of those k axes: one value per element of a normalized slice.
"""

from __future__ import annotations

import numpy as np

from references import normalization
from references.instance_norm import Expected, evaluate


def _affine(
    shape: tuple[int, ...], gamma: np.ndarray | None, beta: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray]:
    if (gamma is None) != (beta is None):
        raise ValueError("gamma and beta must both be given or both be None")
    if gamma is None:
        return np.ones(shape), np.zeros(shape)
    gamma, beta = normalization.as_float64(gamma), normalization.as_float64(beta)
    for name, parameter in (("gamma", gamma), ("beta", beta)):
        if parameter.shape != shape:
            raise ValueError(f"{name} has shape {parameter.shape}, expected {shape}")
    return gamma, beta


def group_norm(
    x: np.ndarray,
    gamma: np.ndarray | None,
    beta: np.ndarray | None,
    grad_output: np.ndarray,
    eps: float,
    groups: int,
) -> Expected:
    """Return GroupNorm's output and gradients for x of shape (N, C, *spatial).

    gamma and beta have shape (C,), or are both None for affine off. `mean` and
    `rstd` of the result have shape (N, G).
    """
    x = normalization.as_float64(x)
    if x.ndim < 2:
        raise ValueError(f"GroupNorm needs x of rank 2 or more, got rank {x.ndim}")
    samples, channels = x.shape[:2]
    if groups < 1 or channels % groups:
        raise ValueError(f"{groups} groups do not divide {channels} channels")
    affine = gamma is not None
    gamma, beta = _affine((channels,), gamma, beta)

    view_shape = (samples, groups, channels // groups, *x.shape[2:])
    view = x.reshape(view_shape)
    dy = normalization.as_float64(grad_output).reshape(view_shape)
    axes = tuple(range(2, view.ndim))
    spans = (1, 2)
    gamma_view = gamma.reshape(groups, channels // groups)
    beta_view = beta.reshape(groups, channels // groups)

    fwd = normalization.forward(view, gamma_view, beta_view, eps, axes, spans)
    grads = normalization.backward(view, gamma_view, dy, eps, axes, fwd, spans)
    return Expected(
        output=fwd.output.reshape(x.shape),
        grad_input=grads.grad_input.reshape(x.shape),
        grad_gamma=grads.grad_gamma.reshape(channels) if affine else None,
        grad_beta=grads.grad_beta.reshape(channels) if affine else None,
        mean=fwd.stats.mean.reshape(samples, groups),
        rstd=fwd.stats.rstd.reshape(samples, groups),
        xhat=fwd.xhat.reshape(x.shape),
    )


def layer_norm(
    x: np.ndarray,
    gamma: np.ndarray | None,
    beta: np.ndarray | None,
    grad_output: np.ndarray,
    eps: float,
    normalized_ndim: int,
) -> Expected:
    """Return LayerNorm's output and gradients over the last `normalized_ndim` axes.

    gamma and beta have the shape of those axes, or are both None for affine off.
    `mean` and `rstd` keep the normalized axes as size 1.
    """
    x = normalization.as_float64(x)
    if not 1 <= normalized_ndim <= x.ndim:
        raise ValueError(
            f"normalized_ndim {normalized_ndim} is not between 1 and the rank {x.ndim}"
        )
    normalized_shape = x.shape[x.ndim - normalized_ndim :]
    # The shape checks only: evaluate fills in the defaults for affine off.
    _affine(normalized_shape, gamma, beta)
    axes = tuple(range(x.ndim - normalized_ndim, x.ndim))
    return evaluate(x, gamma, beta, grad_output, eps, axes, axes)
