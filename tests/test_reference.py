"""Tests of the float64 reference: finite differences, identities and exact results.

The conformance suites judge every framework against `references.instance_norm`, so
these tests check the reference by means that do not share its formulas: numerical
differentiation, the three-term gradient, the BatchNorm reshape identity, and inputs
whose results are known exactly.
"""

from __future__ import annotations

import numpy as np
import pytest

from references import normalization
from references.instance_norm import (
    batch_norm_training,
    instance_norm,
    spatial_axes,
)

# One shape per spatial rank (1, 2, 3), each (N, C, *spatial) with several slices.
SHAPES = [(2, 3, 5), (2, 3, 3, 4), (2, 2, 2, 3, 3)]
SHAPE_IDS = ["1d", "2d", "3d"]

EPS = 1e-5

# Central differences with step h have truncation error about h^2 / 6 * |L'''|, an
# estimated 1e-12 here, and rounding error about u * sum(|y * dy|) / h, an estimated
# 1e-8 for these sizes (u = 1.1e-16, sum(|y * dy|) of order 100). Both sit well below
# FD_RTOL = 1e-6 times the largest gradient entry, which is of order 1, and the
# measured error is about 1e-9 of it. A wrong term in a gradient formula gives errors
# of order 1e-1 of that scale.
FD_STEP = 1e-6
FD_RTOL = 1e-6


def make_inputs(shape, seed):
    """Return x, a non-constant gamma, beta and dy, all float64 and seeded."""
    rng = np.random.default_rng(seed)
    channels = shape[1]
    x = rng.standard_normal(shape)
    gamma = rng.uniform(0.5, 2.0, channels) * rng.choice([-1.0, 1.0], channels)
    beta = rng.standard_normal(channels)
    dy = rng.standard_normal(shape)
    return x, gamma, beta, dy


def central_difference(loss, array):
    """Return d loss / d array by central differences, perturbing array in place."""
    grad = np.empty_like(array)
    for index in np.ndindex(array.shape):
        original = array[index]
        array[index] = original + FD_STEP
        upper = loss()
        array[index] = original - FD_STEP
        lower = loss()
        array[index] = original
        grad[index] = (upper - lower) / (2.0 * FD_STEP)
    return grad


def assert_close_to_scale(actual, expected, rtol):
    """Assert max |actual - expected| <= rtol * max |expected|."""
    scale = np.max(np.abs(expected))
    error = np.max(np.abs(actual - expected))
    assert error <= rtol * scale, (
        f"max error {error:.3e} exceeds {rtol:.0e} x max |expected| = {scale:.3e}"
    )


@pytest.mark.parametrize("affine", [True, False], ids=["affine", "no_affine"])
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_grad_input_matches_finite_differences(shape, affine):
    x, gamma, beta, dy = make_inputs(shape, seed=1)
    if not affine:
        gamma = beta = None

    def loss():
        return np.sum(instance_norm(x, gamma, beta, dy, EPS).output * dy)

    expected = central_difference(loss, x)
    actual = instance_norm(x, gamma, beta, dy, EPS).grad_input

    assert_close_to_scale(actual, expected, FD_RTOL)


@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_grad_gamma_matches_finite_differences(shape):
    x, gamma, beta, dy = make_inputs(shape, seed=2)

    def loss():
        return np.sum(instance_norm(x, gamma, beta, dy, EPS).output * dy)

    expected = central_difference(loss, gamma)
    actual = instance_norm(x, gamma, beta, dy, EPS).grad_gamma

    assert_close_to_scale(actual, expected, FD_RTOL)


@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_grad_beta_matches_finite_differences(shape):
    x, gamma, beta, dy = make_inputs(shape, seed=3)

    def loss():
        return np.sum(instance_norm(x, gamma, beta, dy, EPS).output * dy)

    expected = central_difference(loss, beta)
    actual = instance_norm(x, gamma, beta, dy, EPS).grad_beta

    assert_close_to_scale(actual, expected, FD_RTOL)


@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_affine_off_has_no_parameter_gradients(shape):
    x, _, _, dy = make_inputs(shape, seed=4)

    result = instance_norm(x, None, None, dy, EPS)

    assert result.grad_gamma is None
    assert result.grad_beta is None


# The input is a standard normal sample, so every slice has variance of order 1 and the
# two formulas differ only by rounding, including with eps = 0.
@pytest.mark.parametrize("eps", [0.0, EPS], ids=["eps0", "eps1e-5"])
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_compact_grad_matches_three_term(shape, eps):
    x, gamma, beta, dy = make_inputs(shape, seed=5)
    axes = spatial_axes(x.ndim)

    compact = instance_norm(x, gamma, beta, dy, eps).grad_input
    three_term = normalization.backward_three_term(x, gamma, dy, eps, axes)

    assert_close_to_scale(compact, three_term, 1e-12)


@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_instance_norm_equals_reshaped_batch_norm(shape):
    x, gamma, beta, dy = make_inputs(shape, seed=6)
    batch, channels = shape[0], shape[1]
    reshaped = (1, batch * channels, *shape[2:])

    # Channel n * C + c of the reshape is slice (n, c), so the parameters repeat
    # gamma[0], ..., gamma[C - 1] once per sample: np.tile, not np.repeat.
    instance = instance_norm(x, gamma, beta, dy, EPS)
    batch_result = batch_norm_training(
        x.reshape(reshaped),
        np.tile(gamma, batch),
        np.tile(beta, batch),
        dy.reshape(reshaped),
        EPS,
    )
    per_channel_gamma = batch_result.grad_gamma.reshape(batch, channels).sum(axis=0)
    per_channel_beta = batch_result.grad_beta.reshape(batch, channels).sum(axis=0)

    assert_close_to_scale(instance.output, batch_result.output.reshape(shape), 1e-13)
    assert_close_to_scale(
        instance.grad_input, batch_result.grad_input.reshape(shape), 1e-13
    )
    assert_close_to_scale(instance.grad_gamma, per_channel_gamma, 1e-13)
    assert_close_to_scale(instance.grad_beta, per_channel_beta, 1e-13)


@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_single_element_slices_are_exact(shape):
    rank = len(shape) - 2
    single = (*shape[:2], *([1] * rank))
    x, gamma, beta, dy = make_inputs(single, seed=7)
    beta_broadcast = normalization.broadcast_parameter(beta, x.ndim)

    result = instance_norm(x, gamma, beta, dy, EPS)

    assert np.array_equal(result.output, np.broadcast_to(beta_broadcast, x.shape))
    assert np.array_equal(result.grad_input, np.zeros(x.shape))
    assert np.array_equal(result.grad_gamma, np.zeros(shape[1]))
    assert_close_to_scale(
        result.grad_beta, dy.sum(axis=(0, *spatial_axes(x.ndim))), 1e-15
    )


# A constant slice has var = 0 exactly. The reference refines its mean with a
# correction pass, so this holds for constants whose M copies do not sum exactly,
# which test_constant_slice_of_decimal_value_is_nan checks.
CONSTANT = 1.5
CONSTANT_SLICE = (0, 1)


def make_constant_slice_inputs(shape, seed):
    x, gamma, beta, dy = make_inputs(shape, seed)
    x[CONSTANT_SLICE] = CONSTANT
    return x, gamma, beta, dy


def other_slices_mask(shape):
    """Return a boolean mask over x that is False on CONSTANT_SLICE only."""
    mask = np.ones(shape, dtype=bool)
    mask[CONSTANT_SLICE] = False
    return mask


@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_constant_slice_gives_beta(shape):
    x, gamma, beta, dy = make_constant_slice_inputs(shape, seed=8)
    channel = CONSTANT_SLICE[1]

    result = instance_norm(x, gamma, beta, dy, EPS)
    # With the constant slice's xhat exactly 0, grad_gamma of its channel comes only
    # from the other samples.
    rest = instance_norm(x[1:], gamma, beta, dy[1:], EPS)

    assert np.all(result.output[CONSTANT_SLICE] == beta[channel])
    assert_close_to_scale(result.grad_gamma[channel], rest.grad_gamma[channel], 1e-14)


# A constant slice with M > 1 and eps > 0 does not have a zero input gradient. At
# var = 0 the gradient of var is 0, so dxhat/dx = rstd * (I - 1/M) and
# dx = (g - mean(g)) / sqrt(eps), where g = gamma_c * dy. Only M = 1 makes it exactly 0.
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_constant_slice_grad_input_is_centered(shape):
    x, gamma, beta, dy = make_constant_slice_inputs(shape, seed=8)
    g = gamma[CONSTANT_SLICE[1]] * dy[CONSTANT_SLICE]
    expected = (g - np.mean(g)) / np.sqrt(EPS)

    result = instance_norm(x, gamma, beta, dy, EPS)

    assert_close_to_scale(result.grad_input[CONSTANT_SLICE], expected, 1e-13)


@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_constant_slice_matches_finite_differences(shape):
    x, gamma, beta, dy = make_constant_slice_inputs(shape, seed=8)

    def loss():
        return np.sum(instance_norm(x, gamma, beta, dy, EPS).output * dy)

    expected = central_difference(loss, x)
    actual = instance_norm(x, gamma, beta, dy, EPS).grad_input

    assert_close_to_scale(actual, expected, FD_RTOL)


@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_constant_slice_without_eps_is_nan(shape):
    x, gamma, beta, dy = make_constant_slice_inputs(shape, seed=9)
    others = other_slices_mask(shape)

    result = instance_norm(x, gamma, beta, dy, 0.0)

    assert np.all(np.isnan(result.output[CONSTANT_SLICE]))
    assert np.all(np.isnan(result.grad_input[CONSTANT_SLICE]))
    assert np.all(np.isfinite(result.output[others]))
    assert np.all(np.isfinite(result.grad_input[others]))
    assert np.all(np.isfinite(result.grad_beta))


@pytest.mark.parametrize("value", [0.1, 0.3, 3.7, 3.3e7])
def test_constant_slice_of_decimal_value_is_nan(value):
    for shape in SHAPES:
        x, gamma, beta, dy = make_inputs(shape, seed=9)
        x[CONSTANT_SLICE] = value

        without_eps = instance_norm(x, gamma, beta, dy, 0.0)
        with_eps = instance_norm(x, gamma, beta, dy, EPS)

        assert np.all(np.isnan(without_eps.output[CONSTANT_SLICE])), shape
        assert np.all(with_eps.output[CONSTANT_SLICE] == beta[CONSTANT_SLICE[1]]), shape


@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_uniform_upstream_gradient_gives_zero(shape):
    x, gamma, beta, _ = make_inputs(shape, seed=10)
    dy = np.ones(shape)

    result = instance_norm(x, gamma, beta, dy, EPS)
    # dx = rstd / M * (M g - sum(g) - xhat * sum(g * xhat)) with g = gamma_c constant
    # per slice and sum(xhat) = 0 in exact arithmetic, so the terms cancel up to
    # rounding.
    bound = (
        1e-12 * result.rstd * np.abs(normalization.broadcast_parameter(gamma, x.ndim))
    )

    assert np.all(np.abs(result.grad_input) < bound)


@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_empty_batch_gives_zero_gradients(shape):
    channels = shape[1]
    empty = (0, *shape[1:])
    _, gamma, beta, _ = make_inputs(shape, seed=11)
    x = np.zeros(empty)
    dy = np.zeros(empty)

    result = instance_norm(x, gamma, beta, dy, EPS)

    assert result.output.shape == empty
    assert result.grad_input.shape == empty
    assert np.array_equal(result.grad_gamma, np.zeros(channels))
    assert np.array_equal(result.grad_beta, np.zeros(channels))


@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_large_offset_keeps_rstd_accurate(shape):
    offset = 1e8
    rng = np.random.default_rng(12)
    x = offset + rng.standard_normal(shape)
    _, gamma, beta, dy = make_inputs(shape, seed=12)
    axes = spatial_axes(x.ndim)
    # x and the offset are within a factor of 2, so x - offset is exact (Sterbenz) and
    # the statistics of `centered` are those of x without any cancellation.
    centered = x - offset
    centered_mean = np.mean(centered, axis=axes, keepdims=True)
    var = np.mean((centered - centered_mean) ** 2, axis=axes, keepdims=True)
    expected = 1.0 / np.sqrt(var + EPS)

    result = instance_norm(x, gamma, beta, dy, EPS)

    # Two-pass variance only loses (mean error)^2, about (u * 1e8)^2 = 1e-16, so rstd
    # keeps near-full precision. One-pass E[x^2] - E[x]^2 has rounding error of order
    # u * 1e16 = 1 in the variance, which makes rstd wrong by a relative error of
    # order 1.
    assert_close_to_scale(result.rstd, expected, 1e-12)


@pytest.mark.parametrize("given", ["gamma", "beta"])
def test_one_affine_parameter_raises(given):
    x, gamma, beta, dy = make_inputs(SHAPES[0], seed=13)
    if given == "gamma":
        beta = None
    else:
        gamma = None

    with pytest.raises(ValueError, match="gamma and beta"):
        instance_norm(x, gamma, beta, dy, EPS)


@pytest.mark.parametrize("shape", [(5,), (2, 3)], ids=["rank1", "rank2"])
def test_rank_below_three_raises(shape):
    channels = shape[1] if len(shape) > 1 else 1
    x = np.zeros(shape)
    gamma = np.ones(channels)
    beta = np.zeros(channels)

    with pytest.raises(ValueError, match="rank 3 or more"):
        instance_norm(x, gamma, beta, np.zeros(shape), EPS)
