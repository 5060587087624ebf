"""Tests of the running-statistics reference (references.running_stats)."""

from __future__ import annotations

import numpy as np
import pytest

from references.running_stats import (
    CONVENTIONS,
    Convention,
    batch_norm_step,
    inference,
    instance_norm_step,
    update,
)
from tests.test_reference import EPS, FD_RTOL, assert_close_to_scale, central_difference

OLD_MEAN = np.array([1.0, -1.0])
OLD_VAR = np.array([2.0, 0.5])


def test_momentum_weighting_new_value():
    # torch: running = 0.9 * old + 0.1 * batch, variance times 4 / 3 for M = 4.
    result = update(
        OLD_MEAN,
        OLD_VAR,
        np.array([3.0, 3.0]),
        np.array([3.0, 0.0]),
        4,
        0.1,
        CONVENTIONS["torch"],
    )
    np.testing.assert_allclose(result.mean, [1.2, -0.6], rtol=1e-15)
    np.testing.assert_allclose(result.var, [2.2, 0.45], rtol=1e-15)


def test_momentum_weighting_old_value():
    # Keras with momentum 0.9: running = 0.9 * old + 0.1 * batch, biased variance.
    keras = Convention(False, False, 0.99)
    result = update(
        OLD_MEAN, OLD_VAR, np.array([3.0, 3.0]), np.array([3.0, 0.0]), 4, 0.9, keras
    )
    np.testing.assert_allclose(result.mean, [1.2, -0.6], rtol=1e-15)
    np.testing.assert_allclose(result.var, [2.1, 0.45], rtol=1e-15)


def test_batch_norm_step_reduction_axes():
    x = np.arange(2 * 2 * 3, dtype=np.float64).reshape(2, 2, 3)
    result = batch_norm_step(x, OLD_MEAN, OLD_VAR, 0.5, CONVENTIONS["torch"])
    channel = np.array([x[:, 0].ravel(), x[:, 1].ravel()])
    np.testing.assert_allclose(result.mean, 0.5 * OLD_MEAN + 0.5 * channel.mean(axis=1))
    np.testing.assert_allclose(
        result.var, 0.5 * OLD_VAR + 0.5 * channel.var(axis=1, ddof=1)
    )


def test_instance_norm_step_averages_slices():
    rng = np.random.default_rng(3)
    x = rng.normal(2.0, 3.0, size=(4, 2, 5))
    result = instance_norm_step(x, OLD_MEAN, OLD_VAR, 0.1, CONVENTIONS["torch"])
    slice_var = x.var(axis=2, ddof=1).mean(axis=0)
    np.testing.assert_allclose(result.mean, 0.9 * OLD_MEAN + 0.1 * x.mean(axis=(0, 2)))
    np.testing.assert_allclose(result.var, 0.9 * OLD_VAR + 0.1 * slice_var)


def test_unbiased_variance_single_element():
    x = np.array([[[2.0], [3.0]]])
    result = batch_norm_step(x, OLD_MEAN, OLD_VAR, 0.1, CONVENTIONS["torch"])
    assert not np.isfinite(result.var).any()
    # Keras weights the old value by momentum 0.1 here; the biased variance is 0.
    biased = batch_norm_step(x, OLD_MEAN, OLD_VAR, 0.1, CONVENTIONS["keras"])
    np.testing.assert_allclose(biased.var, 0.1 * OLD_VAR)


@pytest.mark.parametrize("quantity", ["grad_input", "grad_gamma", "grad_beta"])
def test_inference_gradients_match_differences(quantity):
    rng = np.random.default_rng(5)
    x = rng.standard_normal((2, 3, 4))
    gamma, beta = rng.uniform(0.5, 2.0, 3), rng.standard_normal(3)
    dy = rng.standard_normal(x.shape)
    mean, var = rng.standard_normal(3), rng.uniform(0.5, 2.0, 3)
    wrt = {"grad_input": x, "grad_gamma": gamma, "grad_beta": beta}[quantity]

    def loss():
        return np.sum(inference(x, gamma, beta, dy, mean, var, EPS).output * dy)

    expected = central_difference(loss, wrt)
    actual = getattr(inference(x, gamma, beta, dy, mean, var, EPS), quantity)
    assert_close_to_scale(actual, expected, FD_RTOL)
