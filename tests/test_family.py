"""Tests of the float64 GroupNorm and LayerNorm references (references.family).

Their gradients are checked against central differences, which share no formula
with the reference, and against the members of the family they reduce to.
"""

from __future__ import annotations

import numpy as np
import pytest

from references import family
from references import instance_norm as instance_norm_module
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


# The operators as the suite poses them (references.family.Operator).

OPERATOR_SHAPE = (2, 6, 3, 4)


def _operator_inputs(seed: int = 5):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=OPERATOR_SHAPE)
    dy = rng.normal(size=OPERATOR_SHAPE)
    return rng, x, dy


@pytest.mark.parametrize("groups", [1, 2, 3, 6])
def test_operator_group_norm_matches_group_norm(groups):
    rng, x, dy = _operator_inputs()
    gamma, beta = rng.normal(size=6), rng.normal(size=6)
    operator = family.Operator("group_norm", groups=groups)
    got = operator.evaluate(x, gamma, beta, dy, 1e-5)
    want = family.group_norm(x, gamma, beta, dy, 1e-5, groups)
    for name in ("output", "grad_input", "grad_gamma", "grad_beta"):
        assert np.array_equal(getattr(got, name), getattr(want, name)), name
    assert got.grad_gamma.shape == (6,)
    # group_norm is built on the Operator, so check the view against LayerNorm
    # over each (n, group) flattened to one axis, without affine parameters.
    plain = operator.evaluate(x, None, None, dy, 1e-5)
    rows = (OPERATOR_SHAPE[0], groups, -1)
    flat = family.layer_norm(x.reshape(rows), None, None, dy.reshape(rows), 1e-5, 1)
    for name in ("output", "grad_input"):
        np.testing.assert_allclose(
            getattr(plain, name),
            getattr(flat, name).reshape(OPERATOR_SHAPE),
            rtol=1e-12,
            atol=1e-12,
            err_msg=name,
        )


@pytest.mark.parametrize("normalized_ndim", [1, 2, 3])
def test_operator_layer_norm_matches_layer_norm(normalized_ndim):
    rng, x, dy = _operator_inputs()
    shape = OPERATOR_SHAPE[len(OPERATOR_SHAPE) - normalized_ndim :]
    gamma, beta = rng.normal(size=shape), rng.normal(size=shape)
    operator = family.Operator("layer_norm", normalized_ndim=normalized_ndim)
    assert operator.parameter_shape(OPERATOR_SHAPE) == shape
    got = operator.evaluate(x, gamma, beta, dy, 1e-5)
    want = family.layer_norm(x, gamma, beta, dy, 1e-5, normalized_ndim)
    for name in ("output", "grad_input", "grad_gamma", "grad_beta"):
        assert np.array_equal(getattr(got, name), getattr(want, name)), name


@pytest.mark.parametrize(
    ("name", "function"),
    [
        ("instance_norm", instance_norm_module.instance_norm),
        ("batch_norm", instance_norm_module.batch_norm_training),
    ],
)
def test_operator_per_channel_members(name, function):
    rng, x, dy = _operator_inputs()
    gamma, beta = rng.normal(size=6), rng.normal(size=6)
    got = family.Operator(name).evaluate(x, gamma, beta, dy, 1e-5)
    want = function(x, gamma, beta, dy, 1e-5)
    for quantity in ("output", "grad_input", "grad_gamma", "grad_beta"):
        assert np.array_equal(getattr(got, quantity), getattr(want, quantity))


def test_operator_rejects_wrong_configuration():
    with pytest.raises(ValueError, match="groups"):
        family.Operator("group_norm")
    with pytest.raises(ValueError, match="groups"):
        family.Operator("instance_norm", groups=2)
    with pytest.raises(ValueError, match="normalized_ndim"):
        family.Operator("layer_norm")
    with pytest.raises(ValueError, match="unknown operator"):
        family.Operator("rms_norm")
    with pytest.raises(ValueError, match="do not divide"):
        family.Operator("group_norm", groups=4).view_shape(OPERATOR_SHAPE)
    with pytest.raises(ValueError, match="normalized_ndim"):
        family.Operator("layer_norm", normalized_ndim=4).axes(OPERATOR_SHAPE)
