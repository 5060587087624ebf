"""Tests of the second derivatives (references.second_order) by central differences.

The loss is sum(v * grad_input), with grad_input from the first-order reference, so
the differences share no formula with the analytic second derivatives.
"""

from __future__ import annotations

import numpy as np
import pytest

from references import normalization
from references.second_order import double_backward
from tests.test_reference import EPS, FD_RTOL, assert_close_to_scale, central_difference

# (shape, axes, spans): InstanceNorm, BatchNorm in training mode, LayerNorm over the
# last two axes, and GroupNorm with 2 groups on x viewed as (N, G, C / G, L).
LAYOUTS = [
    ((2, 3, 6), (2,), (1,)),
    ((2, 3, 2, 3), (2, 3), (1,)),
    ((3, 2, 4), (0, 2), (1,)),
    ((2, 3, 4), (1, 2), (1, 2)),
    ((2, 2, 2, 3), (2, 3), (1, 2)),
]
LAYOUT_IDS = ["instance-1d", "instance-2d", "batch", "layer-last-two", "group"]


def inputs(shape, spans, seed):
    rng = np.random.default_rng(seed)
    parameter_shape = tuple(shape[axis] for axis in spans)
    x = rng.standard_normal(shape) + rng.uniform(-1.0, 1.0)
    gamma = rng.uniform(0.5, 2.0, parameter_shape) * rng.choice(
        [-1.0, 1.0], parameter_shape
    )
    return x, gamma, rng.standard_normal(shape), rng.standard_normal(shape)


@pytest.mark.parametrize("wrt", ["x", "gamma", "grad_output"])
@pytest.mark.parametrize(("shape", "axes", "spans"), LAYOUTS, ids=LAYOUT_IDS)
def test_double_backward_matches_differences(shape, axes, spans, wrt):
    x, gamma, dy, v = inputs(shape, spans, seed=len(shape) + len(axes))
    arrays = {"x": x, "gamma": gamma, "grad_output": dy}

    def loss():
        grads = normalization.backward(x, gamma, dy, EPS, axes, spans=spans)
        return np.sum(v * grads.grad_input)

    expected = central_difference(loss, arrays[wrt])
    second = double_backward(x, gamma, dy, v, EPS, axes, spans)
    actual = {
        "x": second.grad_x,
        "gamma": second.grad_gamma,
        "grad_output": second.grad_grad_output,
    }[wrt]
    assert actual.shape == arrays[wrt].shape
    assert_close_to_scale(actual, expected, FD_RTOL)


def test_uniform_direction_gives_zero():
    # grad_input sums to 0 over every slice, so v constant per slice gives L = 0
    # for any x, gamma and dy, and all three gradients vanish.
    x, gamma, dy, _ = inputs((2, 3, 5), (1,), seed=4)
    v = np.ones_like(x) * np.array([1.0, -2.0, 0.5])[None, :, None]
    second = double_backward(x, gamma, dy, v, EPS, (2,))
    for array in (second.grad_x, second.grad_gamma, second.grad_grad_output):
        np.testing.assert_allclose(array, 0.0, atol=1e-12)
