"""Inputs near float64's largest finite value: the reference, which divides such
slices by a power of two, its exact values, and the suite in both directions with
the float64 kernels of tests/faults.py."""

from __future__ import annotations

import numpy as np
import pytest

from references import normalization
from references.family import INSTANCE_NORM, Operator
from suites import cases
from tests import faults

NEAR_MAX = ("range-max-float64", "squares-overflow-float64", "constant-max-float64")
FLOAT64_ORDINARY = ("random-2d", "offset-1e4-float64", "constant-third-float64")
SEEDS = range(2)


def test_scaled_output_exact():
    # One slice at -3, -1, 1 and 3 times 0.5e308: the variance, 5 * 0.25e616, is
    # beyond float64, the normalized values are those of -3, -1, 1, 3.
    x = np.array([-1.5e308, -0.5e308, 0.5e308, 1.5e308]).reshape(1, 1, 4)
    expected = INSTANCE_NORM.evaluate(x, np.ones(1), np.zeros(1), np.ones_like(x), 1e-5)
    np.testing.assert_allclose(
        expected.output.ravel(), [-1.3416, -0.4472, 0.4472, 1.3416], atol=5e-5
    )
    assert expected.grad_beta[0] == 4.0
    assert abs(expected.grad_gamma[0]) < 1e-15


def test_scaled_gradients_match_scale_invariance():
    # Normalization is invariant under x -> x / c with eps -> eps / c^2, and dx
    # scales by 1 / c. With c = 2^600 the scaled input is ordinary.
    rng = np.random.default_rng(0)
    x = rng.uniform(-1.0, 1.0, (2, 3, 5)) * 1e308
    dy = rng.normal(size=x.shape)
    gamma, beta = rng.uniform(0.5, 1.5, 3), rng.normal(size=3)
    near_max = INSTANCE_NORM.evaluate(x, gamma, beta, dy, 1e-5)
    c = 2.0**600
    ordinary = INSTANCE_NORM.evaluate(x / c, gamma, beta, dy, 1e-5 / c / c)
    np.testing.assert_allclose(near_max.output, ordinary.output, rtol=1e-15)
    np.testing.assert_allclose(near_max.grad_gamma, ordinary.grad_gamma, rtol=1e-14)
    np.testing.assert_allclose(near_max.grad_beta, ordinary.grad_beta, rtol=1e-15)
    np.testing.assert_allclose(
        near_max.grad_input * c, ordinary.grad_input, rtol=1e-13, atol=0
    )


@pytest.mark.parametrize("eps", [1e-5, 1e-250])
def test_constant_slice_near_max_gives_beta(eps):
    # eps = 1e-250 makes 2^622 / sqrt(eps), rstd on the scaled slice, overflow.
    x = np.full((1, 2, 13), 1.7e308 / 3)
    dy = np.arange(26.0).reshape(x.shape)
    expected = INSTANCE_NORM.evaluate(x, np.ones(2), np.full(2, 0.5), dy, eps)
    assert np.all(expected.output == 0.5)
    # dx = gamma * (dy - mean(dy)) / sqrt(eps) on a constant slice.
    exact = (dy - dy.mean(axis=2, keepdims=True)) / np.sqrt(eps)
    np.testing.assert_allclose(expected.grad_input, exact, rtol=1e-14)


def test_constant_slice_near_max_eps0_is_nan():
    x = np.full((1, 1, 13), 1.7e308 / 3)
    expected = INSTANCE_NORM.evaluate(x, np.ones(1), np.zeros(1), np.ones_like(x), 0.0)
    assert np.all(np.isnan(expected.output))


def test_slice_scale_is_one_below_limit():
    x = np.array([1.0, -(2.0**399), np.inf, np.nan]).reshape(1, 1, 4)
    assert normalization.slice_scale(x, (2,)).ravel().tolist() == [1.0]


def test_slice_scale_brings_slice_below_limit():
    x = np.array([[[1.7e308, 1.0]], [[1e200, -3.0]]])
    scale = normalization.slice_scale(x, (2,))
    peaks = np.max(np.abs(x / scale), axis=2)
    assert np.all(peaks < 2.0**normalization.SAFE_EXPONENT)
    assert np.all(peaks >= 2.0 ** (normalization.SAFE_EXPONENT - 1))


def test_statistics_unscaled_below_limit():
    rng = np.random.default_rng(1)
    x = rng.normal(3.0, 2.0, (2, 3, 7))
    stats = normalization.statistics(x, 1e-5, (2,))
    mean = x.mean(axis=2, keepdims=True)
    mean = mean + (x - mean).mean(axis=2, keepdims=True)
    var = ((x - mean) ** 2).mean(axis=2, keepdims=True)
    assert np.array_equal(stats.mean, mean)
    assert np.array_equal(stats.rstd, 1.0 / np.sqrt(var + 1e-5))


@pytest.mark.parametrize("operator", ["instance_norm", "group_norm", "batch_norm"])
@pytest.mark.parametrize("name", NEAR_MAX)
def test_reference_finite_near_max(name, operator):
    case = cases.by_name(name)
    inputs = cases.materialize(case, "float64", 0)
    expected = case.operator(operator).evaluate(
        inputs.x, inputs.gamma, inputs.beta, inputs.grad_output, case.eps
    )
    for quantity in ("output", "grad_input", "grad_gamma", "grad_beta"):
        assert np.all(np.isfinite(getattr(expected, quantity))), quantity


def test_layer_norm_reference_finite_near_max():
    case = cases.by_name("range-max-float64")
    inputs = cases.materialize(case, "float64", 0)
    operator = Operator("layer_norm", normalized_ndim=1)
    shape = inputs.x.shape[-1:]
    expected = operator.evaluate(
        inputs.x, np.ones(shape), np.zeros(shape), inputs.grad_output, case.eps
    )
    assert np.all(np.isfinite(expected.output))
    assert np.all(np.isfinite(expected.grad_input))


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("name", NEAR_MAX + FLOAT64_ORDINARY)
def test_scaling_kernel_passes(name, seed):
    records = faults.run_case(faults.Float64Kernel(), name, seed)
    for record in records.values():
        assert record.verdict == "pass", record.message


@pytest.mark.parametrize("name", NEAR_MAX)
def test_unscaled_kernel_fails_output(name):
    records = faults.run_case(faults.UnscaledFloat64Kernel(), name, 0)
    assert records["output"].verdict in ("fail", "error"), records["output"].message


@pytest.mark.parametrize("name", FLOAT64_ORDINARY)
def test_unscaled_kernel_passes_ordinary(name):
    records = faults.run_case(faults.UnscaledFloat64Kernel(), name, 0)
    for record in records.values():
        assert record.verdict == "pass", record.message
