"""Tests of the float64 GroupNorm and LayerNorm references (references.family).

Their gradients are checked against central differences, which share no formula
with the reference, and against the members of the family they reduce to.
"""

from __future__ import annotations

import numpy as np
import pytest

from references.family import group_norm, layer_norm
from references.instance_norm import instance_norm
from tests.test_reference import EPS, FD_RTOL, assert_close_to_scale, central_difference

# (shape, groups): one group, several, one per channel, over spatial ranks 0 to 2.
GROUPINGS = [
    ((2, 6, 4), 1),
    ((2, 6, 4), 3),
    ((2, 6, 4), 6),
    ((3, 8), 2),
    ((2, 4, 2, 3), 2),
]
GROUPING_IDS = ["G1", "G3", "G=C", "no-spatial", "2d"]
# (shape, k): LayerNorm over the last k axes.
LAYERS = [((3, 5), 1), ((2, 3, 4), 1), ((2, 3, 4), 2), ((2, 2, 3, 2), 3)]
LAYER_IDS = ["2d-last", "3d-last", "3d-last-two", "4d-last-three"]


def group_inputs(shape, seed):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(shape) + rng.uniform(-2.0, 2.0)
    gamma = rng.uniform(0.5, 2.0, shape[1]) * rng.choice([-1.0, 1.0], shape[1])
    beta = rng.standard_normal(shape[1])
    return x, gamma, beta, rng.standard_normal(shape)


def layer_inputs(shape, k, seed):
    rng = np.random.default_rng(seed)
    normalized = shape[len(shape) - k :]
    x = rng.standard_normal(shape) + rng.uniform(-2.0, 2.0)
    gamma = rng.uniform(0.5, 2.0, normalized) * rng.choice([-1.0, 1.0], normalized)
    beta = rng.standard_normal(normalized)
    return x, gamma, beta, rng.standard_normal(shape)


@pytest.mark.parametrize("quantity", ["grad_input", "grad_gamma", "grad_beta"])
@pytest.mark.parametrize(("shape", "groups"), GROUPINGS, ids=GROUPING_IDS)
def test_group_norm_gradients_match_differences(shape, groups, quantity):
    x, gamma, beta, dy = group_inputs(shape, seed=groups)
    wrt = {"grad_input": x, "grad_gamma": gamma, "grad_beta": beta}[quantity]

    def loss():
        return np.sum(group_norm(x, gamma, beta, dy, EPS, groups).output * dy)

    expected = central_difference(loss, wrt)
    actual = getattr(group_norm(x, gamma, beta, dy, EPS, groups), quantity)
    assert_close_to_scale(actual, expected, FD_RTOL)


@pytest.mark.parametrize("quantity", ["grad_input", "grad_gamma", "grad_beta"])
@pytest.mark.parametrize(("shape", "k"), LAYERS, ids=LAYER_IDS)
def test_layer_norm_gradients_match_differences(shape, k, quantity):
    x, gamma, beta, dy = layer_inputs(shape, k, seed=k)
    wrt = {"grad_input": x, "grad_gamma": gamma, "grad_beta": beta}[quantity]

    def loss():
        return np.sum(layer_norm(x, gamma, beta, dy, EPS, k).output * dy)

    expected = central_difference(loss, wrt)
    actual = getattr(layer_norm(x, gamma, beta, dy, EPS, k), quantity)
    assert actual.shape == wrt.shape
    assert_close_to_scale(actual, expected, FD_RTOL)


def test_group_norm_per_channel_groups():
    # One group per channel is InstanceNorm.
    x, gamma, beta, dy = group_inputs((2, 3, 4, 5), seed=7)
    grouped = group_norm(x, gamma, beta, dy, EPS, groups=3)
    single = instance_norm(x, gamma, beta, dy, EPS)
    for quantity in ("output", "grad_input", "grad_gamma", "grad_beta"):
        np.testing.assert_allclose(
            getattr(grouped, quantity),
            getattr(single, quantity),
            rtol=1e-13,
            atol=1e-13,
        )


def test_group_norm_single_group():
    # One group is LayerNorm over the whole sample.
    x, gamma, beta, dy = group_inputs((2, 3, 4, 5), seed=8)
    grouped = group_norm(x, gamma, beta, dy, EPS, groups=1)
    # LayerNorm over (C, H, W) with elementwise parameters equal to gamma per channel.
    elementwise = np.broadcast_to(gamma[:, None, None], (3, 4, 5)).copy()
    shift = np.broadcast_to(beta[:, None, None], (3, 4, 5)).copy()
    layered = layer_norm(x, elementwise, shift, dy, EPS, normalized_ndim=3)
    np.testing.assert_allclose(grouped.output, layered.output, rtol=1e-13, atol=1e-13)
    np.testing.assert_allclose(
        grouped.grad_input, layered.grad_input, rtol=1e-13, atol=1e-13
    )
    np.testing.assert_allclose(
        grouped.grad_gamma, layered.grad_gamma.sum(axis=(1, 2)), rtol=1e-12
    )


def test_group_norm_statistics_per_group():
    x = np.arange(2 * 4 * 3, dtype=np.float64).reshape(2, 4, 3)
    result = group_norm(x, None, None, np.zeros_like(x), 0.0, groups=2)
    # Group (0, 0) is channels 0 and 1: 0..5, mean 2.5, variance 35 / 12.
    assert result.mean.shape == (2, 2)
    assert result.mean[0, 0] == 2.5
    assert result.rstd[0, 0] == pytest.approx(1.0 / np.sqrt(35.0 / 12.0), rel=1e-15)
    assert result.grad_gamma is None


def test_layer_norm_normalizes_each_row():
    x = np.array([[1.0, 2.0, 3.0, 4.0], [10.0, 10.0, 10.0, 10.0]])
    result = layer_norm(x, None, None, np.zeros_like(x), 0.0, normalized_ndim=1)
    # Row 0: mean 2.5, variance 1.25, so y = (x - 2.5) / sqrt(1.25).
    np.testing.assert_allclose(
        result.output[0], (x[0] - 2.5) / np.sqrt(1.25), rtol=1e-15
    )
    # Row 1 is constant: with eps = 0, 0 / 0 is NaN.
    assert np.isnan(result.output[1]).all()


@pytest.mark.parametrize("groups", [0, 4, 5])
def test_group_count_must_divide_channels(groups):
    x = np.zeros((1, 6, 2))
    with pytest.raises(ValueError, match="do not divide"):
        group_norm(x, None, None, x, EPS, groups)


def test_layer_norm_parameter_shape_checked():
    x = np.zeros((2, 3, 4))
    with pytest.raises(ValueError, match="gamma has shape"):
        layer_norm(x, np.ones(4), np.zeros(4), x, EPS, normalized_ndim=2)
