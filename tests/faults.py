"""NumPy adapters for the suite's own tests: one correct, the rest with real defects.

`Float32Kernel` computes InstanceNorm the way a careful float32 kernel does: every
array and intermediate is float32, the variance is two-pass, and the input gradient
uses the compact formula. Each subclass changes one step to a defect that has shipped
in real kernels. The suite must pass the correct kernel on every case and give each
faulty one `fail` on the cases that expose its defect.

These are ordinary adapters: `--adapter tests.faults:OnePassVariance` runs one through
the conformance suite.
"""

from __future__ import annotations

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

F32 = np.float32


class Float32Kernel(Adapter):
    """A correct float32 InstanceNorm in NumPy (two-pass variance, compact dx)."""

    contract_version = CONTRACT_VERSION
    framework = "numpy-float32"

    def version(self) -> str:
        return np.__version__

    def implementations(self) -> Sequence[Implementation]:
        description = (type(self).__doc__ or self.framework).splitlines()[0]
        return [Implementation("kernel", description, layouts=LAYOUTS)]

    def devices(self) -> Sequence[Device]:
        return [Device("cpu")]

    def unsupported_reason(self, implementation: str, device: str, dtype: str):
        if dtype != "float32":
            return f"{type(self).__name__} computes in float32 only"
        return None

    # The steps below are what the faulty kernels override.

    def mean(self, x: np.ndarray, axes: tuple[int, ...]) -> np.ndarray:
        return np.mean(x, axis=axes, keepdims=True, dtype=F32)

    def variance(self, x: np.ndarray, mean: np.ndarray, axes) -> np.ndarray:
        centered = x - mean
        return np.mean(centered * centered, axis=axes, keepdims=True, dtype=F32)

    def rstd(self, var: np.ndarray, eps: float) -> np.ndarray:
        with np.errstate(divide="ignore"):
            return F32(1.0) / np.sqrt(var + F32(eps))

    def grad_input(self, dy, gamma, xhat, rstd, m, axes) -> np.ndarray:
        g = gamma * dy
        sum_g = np.sum(g, axis=axes, keepdims=True, dtype=F32)
        sum_g_xhat = np.sum(g * xhat, axis=axes, keepdims=True, dtype=F32)
        return rstd / F32(m) * (F32(m) * g - sum_g - xhat * sum_g_xhat)

    def parameter_gradients(self, dy, xhat, shared) -> tuple[np.ndarray, np.ndarray]:
        grad_gamma = np.sum(dy * xhat, axis=shared, dtype=F32)
        grad_beta = np.sum(dy, axis=shared, dtype=F32)
        return grad_gamma, grad_beta

    def run(self, request: Request) -> Result:
        x = np.asarray(request.x, dtype=F32)
        # Channels-last input is reduced over its middle axes, with no transposes.
        channel_axis = 1 if request.layout == "channels_first" else x.ndim - 1
        channels = x.shape[channel_axis]
        shape = [1] * x.ndim
        shape[channel_axis] = channels
        gamma = (
            np.asarray(request.gamma, dtype=F32)
            if request.affine
            else np.ones(channels, F32)
        )
        beta = (
            np.asarray(request.beta, dtype=F32)
            if request.affine
            else np.zeros(channels, F32)
        )
        gamma_b, beta_b = gamma.reshape(shape), beta.reshape(shape)
        axes = tuple(axis for axis in range(1, x.ndim) if axis != channel_axis)
        m = int(np.prod([x.shape[axis] for axis in axes]))

        with np.errstate(invalid="ignore", over="ignore"):
            mean = self.mean(x, axes)
            var = self.variance(x, mean, axes)
            rstd = self.rstd(var, request.eps)
            xhat = (x - mean) * rstd
            output = gamma_b * xhat + beta_b

            result = Result(output=output, dtype="float32")
            if not request.gradients:
                return result

            dy = np.asarray(request.grad_output, dtype=F32)
            result.grad_input = self.grad_input(dy, gamma_b, xhat, rstd, m, axes)
            if request.affine:
                shared = (0, *axes)
                result.grad_gamma, result.grad_beta = self.parameter_gradients(
                    dy, xhat, shared
                )
        return result


def _serial_sum(values: np.ndarray, axes: tuple[int, ...]) -> np.ndarray:
    """Sum over `axes` one element at a time in float32, keeping dimensions."""
    kept = [axis for axis in range(values.ndim) if axis not in axes]
    length = int(np.prod([values.shape[axis] for axis in axes]))
    flat = np.transpose(values, kept + list(axes)).reshape(
        [values.shape[axis] for axis in kept] + [length]
    )
    if length:
        total = np.cumsum(flat, axis=-1, dtype=F32)[..., -1]
    else:
        total = np.zeros(flat.shape[:-1], F32)
    return total.reshape(
        [1 if axis in axes else n for axis, n in enumerate(values.shape)]
    )


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


FAULTS = (
    OnePassVariance,
    EpsOutsideSqrt,
    DroppedDxTerm,
    UnbiasedVariance,
    GammaMissingFromDx,
    SwappedParameterGradients,
)
