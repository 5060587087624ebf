"""Checks of a framework adapter's accumulate scheme that need no framework: the
adapter tests of TensorFlow and onnxruntime-training share them."""

from __future__ import annotations

import numpy as np

from adapters.contract import Result

GRADIENTS = ("grad_input", "grad_gamma", "grad_beta")


def assert_running_sums(accumulated: Result, repeated: Result) -> None:
    """Assert that the float32 buffers of an "accumulate" result are the running
    sums of the calls of a "repeat" result on the same request, and that every
    call adds to them."""
    for name in GRADIENTS:
        steps = getattr(accumulated, f"{name}_steps")
        sums = np.cumsum(getattr(repeated, f"{name}_steps"), axis=0)
        assert steps.shape == sums.shape
        assert steps.dtype == np.float32
        np.testing.assert_allclose(steps, sums, rtol=0, atol=1e-5 * abs(sums).max())
        # Each call adds: the buffers are neither reset nor overwritten.
        assert not np.array_equal(steps[1], steps[2])


def assert_same_buffers(first: Result, second: Result) -> None:
    """Assert that two runs of one request return the same buffers, so that
    each request starts from zero."""
    np.testing.assert_array_equal(first.grad_beta_steps, second.grad_beta_steps)
    np.testing.assert_array_equal(first.grad_input_steps, second.grad_input_steps)


def assert_reported_sums(result: Result) -> None:
    """Assert the reported input's buffers after three calls with loss sum(y):
    dbeta = 4, 8 and 12 per channel, dgamma and dx 0 up to float32 roundoff."""
    np.testing.assert_array_equal(
        result.grad_beta_steps, [[4.0, 4.0], [8.0, 8.0], [12.0, 12.0]]
    )
    np.testing.assert_allclose(result.grad_gamma_steps, 0.0, atol=1e-5)
    np.testing.assert_allclose(result.grad_input_steps, 0.0, atol=1e-5)
