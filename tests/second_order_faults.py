"""NumPy double backward of the four operators, for the suite's own tests: correct
kernels, and faulty ones with defects of a hand-written double backward.

`SecondOrderKernel` computes InstanceNorm, GroupNorm, LayerNorm and BatchNorm in
training mode the way a careful kernel does, in its working precision (float32,
or float64 in `Float64SecondOrderKernel`): two-pass variance, the compact input
gradient and, for a second-order request, the gradients of L = sum(v * grad_input)
by the formulas of references/second_order.py. `SerialSumSecondOrderKernel` sums
one element at a time, and `Float16SecondOrderKernel` takes and returns float16
while computing in float32. Each faulty kernel changes one step of the second
derivatives, so its first-order results stay correct.

Like tests/faults.py these are ordinary adapters:
`--adapter tests.second_order_faults:SecondOrderKernel` runs one through both
suites.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from adapters.contract import (
    LAYOUTS,
    OPERATORS,
    Implementation,
    Request,
    Result,
)
from suites import second_order
from suites.verdicts import Record
from tests.family_faults import operator_item
from tests.faults import NumpyKernel, _serial_sum, careful_statistics


class SecondOrderKernel(NumpyKernel):
    """A correct float32 double backward of the four operators in NumPy."""

    framework = "numpy-second-order"
    dtype = "float32"
    # The precision every step computes in.
    working = np.float32

    def implementations(self) -> Sequence[Implementation]:
        description = (type(self).__doc__ or self.framework).splitlines()[0]
        return [
            Implementation(
                f"{operator}.kernel",
                description,
                layouts=("channels_first",) if operator == "layer_norm" else LAYOUTS,
                operator=operator,
                second_order=True,
            )
            for operator in OPERATORS
        ]

    # The steps below are what the other kernels override.

    def sum(self, values: np.ndarray, axes: tuple[int, ...]) -> np.ndarray:
        """Sum over `axes` in the working precision, keeping dimensions."""
        return np.sum(values, axis=axes, keepdims=True, dtype=self.working)

    def mean(self, values: np.ndarray, axes: tuple[int, ...]) -> np.ndarray:
        count = int(np.prod([values.shape[axis] for axis in axes]))
        return self.sum(values, axes) / self.working(max(count, 1))

    def variance(self, values, mean, axes) -> np.ndarray:
        centered = values - mean
        return self.mean(centered * centered, axes)

    def rstd(self, var, eps) -> np.ndarray:
        return self.working(1.0) / np.sqrt(var + self.working(eps))

    def grad2_input(self, r, xhat, k, e, v_part, d, g_part, m) -> np.ndarray:
        """Return -(r^2 / M) * (xhat * K + (E * v_part + D * g_part) / M), which
        is 0 where the bracket is: on a constant slice, where r^2 may overflow."""
        bracket = xhat * k + (e * v_part + d * g_part) / m
        return np.where(bracket == 0, bracket, -(r * r / m) * bracket)

    def direction_part(self, v, b, xhat, d, m) -> np.ndarray:
        """Return M * v - B - xhat * D, the bracket of w for grad2_gamma."""
        return m * v - b - xhat * d

    def grad2_grad_output(self, gamma, w) -> np.ndarray:
        return gamma * w

    def view(self, request: Request, shape: tuple[int, ...]):
        """Return (view shape, reduction axes, axes gamma runs along) of x in
        (N, C, *spatial) order."""
        ndim = len(shape)
        if request.op == "group_norm":
            samples, channels = shape[:2]
            view = (samples, request.groups, channels // request.groups, *shape[2:])
            return view, tuple(range(2, ndim + 1)), (1, 2)
        if request.op == "layer_norm":
            axes = tuple(range(ndim - request.normalized_ndim, ndim))
            return shape, axes, axes
        if request.op == "batch_norm":
            return shape, (0, *range(2, ndim)), (1,)
        return shape, tuple(range(2, ndim)), (1,)

    def run(self, request: Request) -> Result:
        f = self.working
        channels_last = request.layout == "channels_last"

        def channels_first(array: np.ndarray) -> np.ndarray:
            array = np.asarray(array, dtype=f)
            return np.moveaxis(array, -1, 1) if channels_last else array

        x = channels_first(request.x)
        shape = x.shape
        view, axes, spans = self.view(request, shape)
        # gamma's shape in the request: (C,), or the normalized axes' for LayerNorm.
        parameters = np.shape(request.gamma)
        broadcast = [view[axis] if axis in spans else 1 for axis in range(len(view))]
        if request.affine:
            gamma = np.asarray(request.gamma, dtype=f).reshape(broadcast)
            beta = np.asarray(request.beta, dtype=f).reshape(broadcast)
        else:
            gamma, beta = np.ones(broadcast, f), np.zeros(broadcast, f)
        x = x.reshape(view)
        m = f(np.prod([view[axis] for axis in axes]))
        shared = tuple(axis for axis in range(len(view)) if axis not in spans)

        def restore(array: np.ndarray) -> np.ndarray:
            array = array.reshape(shape)
            return np.moveaxis(array, 1, -1) if channels_last else array

        with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
            # r is the rstd of x scaled by 2^-k per slice (k = 0 but for values
            # beyond 2^60), so each result with r^n is scaled by 2^(-n k).
            statistics = careful_statistics(self, x, axes, request.eps)
            r, xhat = statistics.rstd, statistics.xhat

            def unscale(values: np.ndarray, power: int = 1) -> np.ndarray:
                if not np.any(statistics.k):
                    return values
                return np.ldexp(values, -power * statistics.k).astype(f)

            result = Result(output=restore(gamma * xhat + beta), dtype=self.dtype)
            if not request.gradients:
                return result

            dy = channels_first(request.grad_output).reshape(view)
            g = gamma * dy
            c, e = self.sum(g, axes), self.sum(g * xhat, axes)
            g_part = m * g - c - xhat * e
            result.grad_input = restore(unscale(r / m * g_part))
            if request.affine:
                grad_gamma = np.sum(dy * xhat, axis=shared, dtype=f)
                result.grad_gamma = grad_gamma.reshape(parameters)
                result.grad_beta = np.sum(dy, axis=shared, dtype=f).reshape(parameters)
            if request.grad_grad_input is None:
                return result

            v = channels_first(request.grad_grad_input).reshape(view)
            a, b = self.sum(v * g, axes), self.sum(v, axes)
            d = self.sum(v * xhat, axes)
            v_part = m * v - b - xhat * d
            k = a - b * c / m - d * e / m
            grad2_x = self.grad2_input(r, xhat, k, e, v_part, d, g_part, m)
            result.grad2_input = restore(unscale(grad2_x, 2))
            w = unscale(r / m * v_part)
            result.grad2_grad_output = restore(self.grad2_grad_output(gamma, w))
            if request.affine:
                w_gamma = unscale(r / m * self.direction_part(v, b, xhat, d, m))
                grad2_gamma = np.sum(w_gamma * dy, axis=shared, dtype=f)
                result.grad2_gamma = grad2_gamma.reshape(parameters)
        return result


class Float64SecondOrderKernel(SecondOrderKernel):
    """A correct float64 double backward of the four operators in NumPy."""

    framework = "numpy-second-order-float64"
    dtype = "float64"
    working = np.float64


class SerialSumSecondOrderKernel(SecondOrderKernel):
    """A correct float32 double backward that accumulates every per-slice sum one
    element at a time, as simple CPU loops do."""

    framework = "numpy-second-order-serial-sum"

    def sum(self, values, axes):
        return _serial_sum(values, axes)


class Float16SecondOrderKernel(SecondOrderKernel):
    """A correct float16 double backward: float16 input and results, every step
    in float32."""

    framework = "numpy-second-order-float16"
    dtype = "float16"

    def run(self, request):
        result = super().run(request)
        with np.errstate(over="ignore"):
            for name in (
                "output",
                "grad_input",
                "grad_gamma",
                "grad_beta",
                *second_order.QUANTITIES,
            ):
                value = getattr(result, name)
                if value is not None:
                    setattr(result, name, value.astype(np.float16))
        return result


class DroppedGrad2InputTerm(SecondOrderKernel):
    """grad2_input drops D * g_part / M, the term through which the input gradient's
    own xhat * sum(g * xhat) depends on x by way of D = sum(v * xhat)."""

    framework = "fault-dropped-grad2-input-term"

    def grad2_input(self, r, xhat, k, e, v_part, d, g_part, m):
        return -(r * r / m) * (xhat * k + e * v_part / m)


class GammaMissingFromGrad2GradOutput(SecondOrderKernel):
    """grad2_grad_output is w instead of gamma * w, as when the chain rule through
    g = gamma * dy leaves out gamma."""

    framework = "fault-gamma-missing-from-grad2-grad-output"

    def grad2_grad_output(self, gamma, w):
        return w


class UncenteredGrad2Gamma(SecondOrderKernel):
    """grad2_gamma uses w without the -sum(v) term, as when the derivative of
    grad_input with respect to gamma leaves out the path through sum(g)."""

    framework = "fault-uncentered-grad2-gamma"

    def direction_part(self, v, b, xhat, d, m):
        return m * v - xhat * d


FAULTS = (DroppedGrad2InputTerm, GammaMissingFromGrad2GradOutput, UncenteredGrad2Gamma)
CORRECT_KERNELS = (
    SecondOrderKernel,
    Float64SecondOrderKernel,
    SerialSumSecondOrderKernel,
    Float16SecondOrderKernel,
)


def run_case(
    adapter: SecondOrderKernel, operator: str, case_name: str, seed: int
) -> dict[str, Record]:
    """Judge one case's second derivatives computed by the kernel's `operator`, as
    the suite does, and return the records by quantity (unsupported where the case
    is not posed for the operator, the dtype or second derivatives)."""
    implementation, item = operator_item(adapter, operator, case_name, seed)
    device = adapter.devices()[0]
    reason = second_order.unsupported_reason(adapter, implementation, device, item)
    if reason is not None:
        records = second_order.unsupported_records(item, reason)
    else:
        records = second_order.run_item(adapter, item)
    return {record.quantity: record for record in records}
