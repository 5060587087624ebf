"""A stand-in for a vendor's compute library, written in NumPy.

It plays the backend that adapter.py drives, with what a real library has: its
own tensor type and error type, storage formats, a device query, and kernels that
compute InstanceNorm forward and backward. When you copy this package, delete this
module and import your own library in adapter.py instead.

Storage formats are float32, float16 and bfloat16. NumPy has no bfloat16, so a
bfloat16 tensor stores the upper 16 bits of each float32 value in a uint16 array.
Every kernel widens its inputs to float32, computes in float32 and rounds each
result to the inputs' storage format once, at the end.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__version__ = "0.1.0"

STORAGE = {"float32": np.float32, "float16": np.float16, "bfloat16": np.uint16}


class BackendError(RuntimeError):
    """The library's error for an input that it does not accept."""


@dataclass(frozen=True)
class Tensor:
    """A tensor in the library's own storage, on one of its devices."""

    storage: np.ndarray
    format: str
    device: str = "cpu"

    @property
    def shape(self) -> tuple[int, ...]:
        return self.storage.shape


@dataclass(frozen=True)
class SavedStatistics:
    """Per-slice statistics in float32, kept for the backward pass. A slice whose
    largest magnitude exceeds 2^LARGE_EXPONENT is normalized as x * 2^-shift, so
    that its sums and squares stay finite; `mean` and `rstd` belong to that
    scaled slice, and `shift` is 0 for every other slice."""

    mean: np.ndarray
    rstd: np.ndarray
    shift: np.ndarray


# Slices beyond 2^LARGE_EXPONENT are scaled down by a power of two, which is exact.
LARGE_EXPONENT = 60


def accelerator_count() -> int:
    """Return how many accelerators the driver reports.

    A real library queries its driver. The stand-in has no accelerator, so it
    returns 0.
    """
    return 0


def from_float(values: np.ndarray, format: str, device: str = "cpu") -> Tensor:
    """Copy `values` into a new tensor in `format` on `device`.

    Raises BackendError for an unknown format or device, or for values that the
    format cannot hold exactly.
    """
    if format not in STORAGE:
        raise BackendError(f"unknown storage format {format!r}")
    if device != "cpu":
        raise BackendError(f"device {device!r} not found")
    if format != "bfloat16":
        return Tensor(np.array(values, dtype=STORAGE[format]), format, device)
    words = np.ascontiguousarray(values, dtype=np.float32).view(np.uint32)
    if np.any(words & 0xFFFF):
        raise BackendError("bfloat16 input has values with more than 8 bits")
    return Tensor((words >> 16).astype(np.uint16), format, device)


def to_float(tensor: Tensor) -> np.ndarray:
    """Return the tensor's values as a new NumPy array.

    float32 and float16 come back in their own dtype, bfloat16 in float32.
    """
    if tensor.format == "bfloat16":
        return (tensor.storage.astype(np.uint32) << 16).view(np.float32)
    return tensor.storage.copy()


def _widen(tensor: Tensor) -> np.ndarray:
    return to_float(tensor).astype(np.float32, copy=False)


def _narrow(values: np.ndarray, format: str, device: str) -> Tensor:
    """Round float32 values to `format`, to nearest with ties to even."""
    if format != "bfloat16":
        with np.errstate(over="ignore"):
            return Tensor(values.astype(STORAGE[format]), format, device)
    words = values.view(np.uint32).astype(np.uint64)
    # Adding 0x7FFF, plus 1 when the last kept bit is odd, carries into the kept
    # bits exactly when the dropped half is above one half, or is one half and
    # the kept part is odd. A carry out of the largest finite value gives infinity.
    odd = (words >> 16) & 1
    upper = ((words + 0x7FFF + odd) >> 16).astype(np.uint16)
    # The carry can turn a NaN into an infinity or a NaN of the other sign.
    upper[np.isnan(values)] = 0x7FC0
    return Tensor(upper, format, device)


def _check_operands(x: Tensor, *others: Tensor | None) -> None:
    if x.storage.size == 0:
        raise BackendError(f"instance_norm: zero-size input of shape {x.shape}")
    for other in others:
        if other is not None and other.format != x.format:
            raise BackendError(
                f"instance_norm: mixed formats {x.format} and {other.format}"
            )


def _slices(x: np.ndarray, channels_last: bool) -> tuple[np.ndarray, int]:
    """View x as (N, C, M), or as (N, M, C) when channels_last, without copying.

    Returns the view and the axis of M, which the statistics reduce over.
    """
    if channels_last:
        return x.reshape(x.shape[0], -1, x.shape[-1]), 1
    return x.reshape(x.shape[0], x.shape[1], -1), 2


def _per_channel(values: Tensor | None, fill: float, shape: tuple[int, ...]):
    """Widen gamma or beta to float32 in a shape that broadcasts over the slices
    view. A missing tensor means `fill` for every channel."""
    if values is None:
        return np.float32(fill)
    return _widen(values).reshape(shape)


def _channel_shape(x_view: np.ndarray, reduce_axis: int) -> tuple[int, ...]:
    return (1, 1, x_view.shape[2]) if reduce_axis == 1 else (1, x_view.shape[1], 1)


def instance_norm_forward(
    x: Tensor,
    gamma: Tensor | None,
    beta: Tensor | None,
    epsilon: np.float32,
    channels_last: bool = False,
) -> tuple[Tensor, SavedStatistics]:
    """Normalize each (n, c) slice of x to zero mean and unit variance, then scale
    by gamma and shift by beta. A missing gamma is 1 and a missing beta is 0.

    Takes epsilon as float32, as a C interface with a `float epsilon` parameter
    does. Returns the output in x's format and layout, and the statistics that
    instance_norm_backward needs.
    """
    _check_operands(x, gamma, beta)
    view, axis = _slices(_widen(x), channels_last)
    shape = _channel_shape(view, axis)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        view, shift = _scale_large_slices(view, axis)
        mean = view.mean(axis=axis, keepdims=True)
        # One correction pass: the mean of equal values is then that value, so a
        # constant slice gives x - mean = 0 and the output beta exactly.
        correction = (view - mean).mean(axis=axis, keepdims=True)
        mean = np.where(np.isfinite(mean), mean + correction, mean)
        centered = view - mean
        # Two passes: the variance of the centered values, which loses nothing to
        # cancellation when the mean is large compared with the spread.
        variance = np.square(centered).mean(axis=axis, keepdims=True)
        rstd = np.float32(1) / np.sqrt(variance + _scaled_epsilon(epsilon, shift))
        # A scaled constant slice whose scaled epsilon underflowed: its rstd is
        # 2^shift / sqrt(epsilon).
        lost = (shift > 0) & (variance == 0)
        exact = np.ldexp(np.float32(1) / np.sqrt(np.float32(epsilon)), shift)
        rstd = np.where(lost, exact.astype(np.float32), rstd)
        scaled = centered * rstd * _per_channel(gamma, 1.0, shape)
        output = scaled + _per_channel(beta, 0.0, shape)
    result = _narrow(output.reshape(x.shape), x.format, x.device)
    return result, SavedStatistics(mean, rstd, shift)


def _scale_large_slices(view: np.ndarray, axis: int) -> tuple[np.ndarray, np.ndarray]:
    """Return the slices with those beyond 2^LARGE_EXPONENT scaled down by a power
    of two, and each slice's exponent of that scale (0 where it is not scaled)."""
    magnitudes = np.where(np.isfinite(view), np.abs(view), np.float32(0))
    largest = magnitudes.max(axis=axis, keepdims=True)
    _, exponent = np.frexp(largest)
    shift = np.where(largest > 2.0**LARGE_EXPONENT, exponent - LARGE_EXPONENT, 0)
    if not shift.any():
        return view, shift
    return np.ldexp(view, -shift).astype(np.float32), shift


def _scaled_epsilon(epsilon: np.float32, shift: np.ndarray) -> np.ndarray:
    """Return epsilon in the units of each scaled slice's squares: eps * 4^-shift."""
    if not shift.any():
        return np.float32(epsilon)
    return np.ldexp(np.float64(epsilon), -2 * shift).astype(np.float32)


def instance_norm_inference(
    x: Tensor,
    gamma: Tensor | None,
    beta: Tensor | None,
    epsilon: np.float32,
) -> Tensor:
    """Forward pass only, for channels-first x: the entry point of an inference
    library, which keeps no statistics and has no backward pass."""
    output, _ = instance_norm_forward(x, gamma, beta, epsilon, channels_last=False)
    return output


def instance_norm_backward(
    grad_output: Tensor,
    x: Tensor,
    gamma: Tensor | None,
    saved: SavedStatistics,
    channels_last: bool = False,
) -> tuple[Tensor, Tensor, Tensor]:
    """Return the gradients of sum(output * grad_output) with respect to x, gamma
    and beta, in x's format (x's layout for the input gradient)."""
    _check_operands(x, grad_output, gamma)
    view, axis = _slices(_widen(x), channels_last)
    dy, _ = _slices(_widen(grad_output), channels_last)
    shape = _channel_shape(view, axis)
    parameter_axes = (0, axis)
    with np.errstate(invalid="ignore", over="ignore"):
        if saved.shift.any():
            view = np.ldexp(view, -saved.shift).astype(np.float32)
        normalized = (view - saved.mean) * saved.rstd
        weighted = dy * _per_channel(gamma, 1.0, shape)
        # d/dx of the normalized slice, written with two per-slice means:
        # rstd * (g - mean(g) - xhat * mean(g * xhat)), where g = gamma * dy.
        mean_weighted = weighted.mean(axis=axis, keepdims=True)
        mean_projection = (weighted * normalized).mean(axis=axis, keepdims=True)
        grad_x = saved.rstd * (weighted - mean_weighted - normalized * mean_projection)
        if saved.shift.any():
            # rstd is the scaled slice's: dx in x's units is 2^-shift times it.
            grad_x = np.ldexp(grad_x, -saved.shift).astype(np.float32)
        grad_gamma = (dy * normalized).sum(axis=parameter_axes)
        grad_beta = dy.sum(axis=parameter_axes)
    return (
        _narrow(grad_x.reshape(x.shape), x.format, x.device),
        _narrow(grad_gamma, x.format, x.device),
        _narrow(grad_beta, x.format, x.device),
    )
