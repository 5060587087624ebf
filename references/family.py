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

import dataclasses
from dataclasses import dataclass

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
    _affine((channels,), gamma, beta)
    expected = Operator("group_norm", groups=groups).evaluate(
        x, gamma, beta, grad_output, eps
    )
    return dataclasses.replace(
        expected,
        mean=expected.mean.reshape(samples, groups),
        rstd=expected.rstd.reshape(samples, groups),
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


@dataclass(frozen=True)
class Operator:
    """One member of the family with its configuration, as the suite poses it.

    Each member is the shared core run on a view of x, shaped (N, C, *spatial):
    - instance_norm: x itself, reduced over the spatial axes, parameters per channel;
    - batch_norm (training mode): x itself, reduced over the batch and spatial axes;
    - group_norm: x viewed as (N, G, C / G, *spatial), reduced over axes 2 and on,
      the per-channel parameters spanning axes 1 and 2 of the view;
    - layer_norm: x itself, reduced over its last `normalized_ndim` axes, which the
      elementwise parameters span.
    """

    name: str = "instance_norm"
    groups: int | None = None
    normalized_ndim: int | None = None

    def __post_init__(self) -> None:
        if self.name not in NAMES:
            raise ValueError(f"unknown operator {self.name!r}; known: {NAMES}")
        if (self.name == "group_norm") != (self.groups is not None):
            raise ValueError("groups is given for group_norm, and only for it")
        if (self.name == "layer_norm") != (self.normalized_ndim is not None):
            raise ValueError("normalized_ndim is given for layer_norm, and only for it")

    @property
    def label(self) -> str:
        """The operator with its configuration, as reports print it."""
        if self.groups is not None:
            return f"{self.name} (G = {self.groups})"
        if self.normalized_ndim is not None:
            return f"{self.name} (last {self.normalized_ndim} axes)"
        return self.name

    def view_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        """Return the shape of the view of x the core normalizes."""
        if self.name != "group_norm":
            return tuple(shape)
        samples, channels = shape[:2]
        if self.groups < 1 or channels % self.groups:
            raise ValueError(f"{self.groups} groups do not divide {channels} channels")
        return (samples, self.groups, channels // self.groups, *shape[2:])

    def axes(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        """Return the reduction axes of the view of x of this shape."""
        ndim = len(self.view_shape(shape))
        if self.name == "batch_norm":
            return (0, *range(2, ndim))
        if self.name == "group_norm":
            return tuple(range(2, ndim))
        if self.name == "layer_norm":
            if not 1 <= self.normalized_ndim < ndim:
                raise ValueError(
                    f"normalized_ndim {self.normalized_ndim} is not between 1 and "
                    f"{ndim - 1} for x of rank {ndim}"
                )
            return tuple(range(ndim - self.normalized_ndim, ndim))
        return tuple(range(2, ndim))

    def spans(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        """Return the axes of the view that gamma and beta run along."""
        if self.name == "group_norm":
            return (1, 2)
        if self.name == "layer_norm":
            return self.axes(shape)
        return (normalization.CHANNEL_AXIS,)

    def parameter_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        """Return the shape of gamma and beta (and their gradients)."""
        if self.name == "layer_norm":
            return tuple(shape[len(shape) - self.normalized_ndim :])
        return (shape[1],)

    def views(
        self,
        x: np.ndarray,
        gamma: np.ndarray | None,
        beta: np.ndarray | None,
        grad_output: np.ndarray,
    ) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None, np.ndarray]:
        """Return x, gamma, beta and grad_output reshaped to the view the core
        normalizes (no copies)."""
        if (gamma is None) != (beta is None):
            raise ValueError("gamma and beta must both be given or both be None")
        view = self.view_shape(np.shape(x))
        parameters = tuple(view[axis] for axis in self.spans(np.shape(x)))
        if gamma is not None:
            gamma = np.reshape(gamma, parameters)
            beta = np.reshape(beta, parameters)
        return np.reshape(x, view), gamma, beta, np.reshape(grad_output, view)

    def restore(self, expected: Expected, shape: tuple[int, ...]) -> Expected:
        """Return a result computed on the view in the shapes of x and gamma.
        `mean` and `rstd` keep the view's shape, with the reduced axes as size 1."""
        if self.view_shape(shape) == tuple(shape):
            return expected
        parameters = self.parameter_shape(shape)
        return Expected(
            output=expected.output.reshape(shape),
            grad_input=expected.grad_input.reshape(shape),
            grad_gamma=_reshaped(expected.grad_gamma, parameters),
            grad_beta=_reshaped(expected.grad_beta, parameters),
            mean=expected.mean,
            rstd=expected.rstd,
            xhat=expected.xhat.reshape(shape),
        )

    def evaluate(
        self,
        x: np.ndarray,
        gamma: np.ndarray | None,
        beta: np.ndarray | None,
        grad_output: np.ndarray,
        eps: float,
    ) -> Expected:
        """Return the operator's output and gradients, in the shapes of x and gamma."""
        shape = np.shape(x)
        views = self.views(x, gamma, beta, grad_output)
        expected = evaluate(*views, eps, self.axes(shape), self.spans(shape))
        return self.restore(expected, shape)


def _reshaped(array: np.ndarray | None, shape: tuple[int, ...]) -> np.ndarray | None:
    return None if array is None else array.reshape(shape)


NAMES = ("instance_norm", "group_norm", "layer_norm", "batch_norm")
INSTANCE_NORM = Operator()
