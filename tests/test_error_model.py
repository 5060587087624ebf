"""The error model's arithmetic: normalized errors, non-finite handling, budgets."""

from __future__ import annotations

import math

import numpy as np
import pytest

from references.family import Operator
from references.instance_norm import evaluate, instance_norm
from suites import dtypes, error_model

U32 = dtypes.UNIT_ROUNDOFF["float32"]


def errors(got, expected, scale, dtype="float32"):
    return error_model.normalized_errors(
        np.asarray(got, dtype=np.float64),
        np.asarray(expected, dtype=np.float64),
        np.asarray(scale, dtype=np.float64),
        dtype,
    )


def test_error_in_unit_roundoffs():
    # An error of 3 u against a scale of 2 is 3 * 2 * u in absolute terms.
    result = errors([1.0 + 3 * 2 * U32], [1.0], [2.0])
    assert result[0] == pytest.approx(3.0)


def test_exact_match_is_zero():
    assert errors([0.5], [0.5], [0.0])[0] == 0.0


def test_matching_nan_is_zero():
    assert errors([np.nan], [np.nan], [np.nan])[0] == 0.0


def test_nan_where_finite_expected():
    assert errors([np.nan], [1.0], [1.0])[0] == math.inf


def test_finite_where_nan_expected():
    assert errors([1.0], [np.nan], [np.nan])[0] == math.inf


def test_matching_infinity_is_zero():
    assert errors([np.inf], [np.inf], [np.inf])[0] == 0.0


def test_wrong_sign_infinity():
    assert errors([-np.inf], [np.inf], [np.inf])[0] == math.inf


def test_zero_scale_mismatch():
    assert errors([1e-30], [0.0], [0.0])[0] == math.inf


def test_mixed_array_applies_each_rule_per_element():
    got = [1.0 + 3 * 2 * U32, np.nan, np.inf, 1.0, 0.5, -np.inf, 1e-30, np.nan]
    expected = [1.0, np.nan, np.inf, np.nan, 0.5, np.inf, 0.0, 2.0]
    scale = [2.0, np.nan, np.inf, np.nan, 0.0, np.inf, 0.0, 1.0]
    result = errors(got, expected, scale)
    assert result[0] == pytest.approx(3.0)
    assert list(result[1:]) == [0.0, 0.0, math.inf, 0.0, math.inf, math.inf, math.inf]


def test_budget_grows_with_length():
    budgets = [error_model.budget("output", "float32", n) for n in (1, 64, 4096)]
    assert budgets[0] < budgets[1] < budgets[2]


def test_budget_formula():
    base, growth = error_model.BUDGET["output"]["float32"]
    assert error_model.budget("output", "float32", 256) == base + growth * 16


def test_parameter_gradients_reduce_over_batch():
    shape = (4, 3, 5, 5)
    assert error_model.budget_reduction_length("output", shape) == 25
    assert error_model.budget_reduction_length("grad_gamma", shape) == 100
    assert error_model.budget_reduction_length("grad_beta", shape) == 100


def test_compare_reports_worst_element():
    expected = np.array([[1.0, 2.0], [3.0, 4.0]])
    got = expected.copy()
    got[1, 0] += 100 * U32 * 3.0
    scale = np.full_like(expected, 3.0)
    comparison = error_model.compare(
        "output", got, expected, scale, "float32", (1, 1, 2, 2)
    )
    assert comparison.index == (1, 0)
    assert comparison.error == pytest.approx(100.0)
    assert not comparison.within_budget


def test_compare_empty_passes():
    empty = np.zeros((0, 3, 2))
    comparison = error_model.compare(
        "output", empty, empty, empty, "float32", empty.shape
    )
    assert comparison.within_budget
    assert comparison.index is None


def test_scales_bound_the_results():
    # Each scale is at least the magnitude of the exact result it judges.
    rng = np.random.default_rng(7)
    x = rng.normal(3.0, 2.0, size=(2, 3, 4, 5))
    gamma = rng.normal(size=3)
    beta = rng.normal(size=3)
    dy = rng.normal(size=x.shape)
    expected = instance_norm(x, gamma, beta, dy, 1e-5)
    scales = error_model.scales(x, gamma, beta, dy, expected)
    for quantity in error_model.QUANTITIES:
        exact = np.abs(getattr(expected, quantity))
        assert np.all(scales[quantity] >= exact * (1 - 1e-12)), quantity


def test_large_mean_scale_covers_mean_rounding():
    # Rounding the mean of x = 1e6 + spread to float32 moves it by up to
    # 2^-24 * 1e6; the output scale must make that error at most a few u.
    rng = np.random.default_rng(3)
    x = dtypes.round_to(rng.normal(1e6, 1.0, size=(1, 1, 256)), "float32")
    x = x.astype(np.float64)
    ones, zeros = np.ones(1), np.zeros(1)
    dy = np.zeros_like(x)
    expected = instance_norm(x, ones, zeros, dy, 1e-5)
    scale = error_model.scales(x, ones, zeros, dy, expected)["output"]
    shifted_mean = float(np.float32(expected.mean.item()))
    perturbed = (x - shifted_mean) * expected.rstd
    error = errors(perturbed, expected.output, scale)
    assert np.max(error) <= 1.0


def test_exact_value_beyond_range_expects_infinity():
    expected = np.array([261909.18, 1.0])
    scale = np.array([262144.0, 1.0])
    shape = (1, 2, 512, 512)
    inf_result = np.array([np.inf, 1.0], dtype=np.float16)
    finite_result = np.array([65504.0, 1.0], dtype=np.float16)
    accepted = error_model.compare(
        "grad_beta", inf_result, expected, scale, "float16", shape
    )
    rejected = error_model.compare(
        "grad_beta", finite_result, expected, scale, "float16", shape
    )
    assert accepted.within_budget
    assert not rejected.within_budget


def test_budget_reduction_length_per_operator():
    shape = (2, 6, 5, 5)
    lengths = {
        Operator("instance_norm"): (25, 50),
        Operator("batch_norm"): (50, 50),
        # A group of 3 channels: 75 elements per slice. A channel's parameter
        # sums run over 50 elements, each with its group's statistics' error.
        Operator("group_norm", groups=2): (75, 75),
        Operator("layer_norm", normalized_ndim=3): (150, 150),
        Operator("layer_norm", normalized_ndim=1): (5, 60),
    }
    for operator, (slice_length, parameter_length) in lengths.items():
        got = [
            error_model.budget_reduction_length(quantity, shape, operator)
            for quantity in ("output", "grad_input", "grad_gamma", "grad_beta")
        ]
        assert got == [slice_length] * 2 + [parameter_length] * 2, operator.label


def test_layer_norm_scales_have_parameter_shape():
    rng = np.random.default_rng(3)
    x, dy = rng.normal(size=(2, 3, 4)), rng.normal(size=(2, 3, 4))
    gamma, beta = rng.normal(size=(3, 4)), rng.normal(size=(3, 4))
    axes, spans = (1, 2), (1, 2)
    expected = evaluate(x, gamma, beta, dy, 1e-5, axes, spans)
    scales = error_model.scales(x, gamma, beta, dy, expected, axes, spans)
    assert scales["grad_gamma"].shape == (3, 4)
    # Each element's parameter gradient sums over the batch alone, so its scale
    # is at least the batch's sum of |dy * xhat|.
    bound = np.sum(np.abs(dy * expected.xhat), axis=0)
    assert np.all(scales["grad_gamma"] >= bound)
