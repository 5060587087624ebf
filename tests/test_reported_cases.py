"""The catalogue's reported cases: each input a user reported against a framework,
with the exact answer given in the report, asserted against the float64 reference
on the inputs the suite hands over (rounded to the dtype named)."""

from __future__ import annotations

import numpy as np
import pytest

from references import family
from references.instance_norm import instance_norm
from suites import cases

# y of a four-element slice whose values are equally spaced: (i - 1.5) / sqrt(1.25).
RAMP_OF_FOUR = [-1.3416, -0.4472, 0.4472, 1.3416]


def reference(name: str, dtype: str, seed: int = 0):
    """Return the InstanceNorm reference for the case's inputs in `dtype`, and the
    inputs (channels-first)."""
    case = cases.by_name(name)
    inputs = cases.materialize(case, dtype, seed)
    expected = instance_norm(
        inputs.x, inputs.gamma, inputs.beta, inputs.grad_output, case.eps
    )
    return expected, inputs


def test_every_reported_case_is_in_the_catalogue():
    names = {case.name for case in cases.CATALOGUE}
    assert {case.name for case in cases.REPORTED} <= names
    assert all(case.group == "reported" for case in cases.REPORTED)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_range_overflow_is_finite(dtype):
    # The variance, 5e76, is beyond float32 but the answer is finite.
    expected, inputs = reference("reported-range-overflow", dtype)
    np.testing.assert_allclose(expected.output.reshape(-1), RAMP_OF_FOUR, atol=5e-5)
    assert np.var(inputs.x.astype(np.float64)) > np.finfo(np.float32).max


@pytest.mark.parametrize("name", ["reported-offset-40000", "reported-offset-2000"])
def test_offset_ramps_normalize_to_ramp(name):
    expected, _ = reference(name, "float32")
    np.testing.assert_allclose(expected.output.reshape(-1), RAMP_OF_FOUR, atol=5e-5)


def test_one_pass_variance_of_offset_is_negative_in_float32():
    _, inputs = reference("reported-offset-40000", "float32")
    x = inputs.x.astype(np.float32)
    one_pass = np.mean(x * x) - np.mean(x) ** 2
    assert one_pass <= 0


@pytest.mark.parametrize(
    ("name", "dtype"),
    [
        ("reported-constant-3.3e7", "float32"),
        ("reported-constant-1e10", "float32"),
        ("reported-zeros-eps1e-12", "float16"),
        ("reported-zeros-eps1e-12", "float32"),
    ],
)
def test_constant_slices_give_beta_and_zero_dx(name, dtype):
    expected, inputs = reference(name, dtype)
    beta = inputs.beta.astype(np.float64).reshape(1, -1, *([1] * (inputs.x.ndim - 2)))
    assert np.array_equal(expected.output, np.broadcast_to(beta, expected.output.shape))
    assert np.all(expected.grad_input == 0.0)
    assert np.all(expected.grad_gamma == 0.0)


def test_zero_input_eps_rounds_to_zero_in_float16():
    assert np.float16(cases.by_name("reported-zeros-eps1e-12").eps) == 0.0


def test_alternating_512_normalizes_to_signs():
    expected, inputs = reference("reported-alternating-512", "float16")
    np.testing.assert_allclose(expected.output, np.sign(inputs.x), atol=1e-9)
    # Its float16 sum of squares overflows.
    with np.errstate(over="ignore"):
        squares = inputs.x.astype(np.float16) ** 2
    assert np.isinf(np.sum(squares, dtype=np.float16))


def test_nhwc_ramp_instance_norm_per_channel():
    expected, inputs = reference("reported-nhwc-ramp", "float32")
    assert cases.by_name("reported-nhwc-ramp").layout == "channels_last"
    for channel in range(4):
        values = expected.output[0, channel].reshape(-1)
        np.testing.assert_allclose(values, RAMP_OF_FOUR, atol=5e-5)
    # The ramp: 100 * channel + spatial index.
    assert inputs.x[0, 2].reshape(-1).tolist() == [200.0, 201.0, 202.0, 203.0]


def test_nhwc_ramp_group_norm_groups_channel_pairs():
    case = cases.by_name("reported-nhwc-ramp")
    inputs = cases.materialize(case, "float32", 0)
    expected = family.group_norm(
        inputs.x, inputs.gamma, inputs.beta, inputs.grad_output, case.eps, 2
    )
    for group in range(2):
        values = inputs.x[0, 2 * group : 2 * group + 2].astype(np.float64)
        centered = (values - values.mean()) / np.sqrt(values.var() + case.eps)
        np.testing.assert_allclose(
            expected.output[0, 2 * group : 2 * group + 2], centered, rtol=1e-12
        )
    # Channel 0's positions come out negative in its group, channel 1's positive.
    assert np.all(expected.output[0, 0] < 0) and np.all(expected.output[0, 1] > 0)


def test_small_eps_beside_tiny_variance():
    expected, _ = reference("reported-eps1e-8-variance1e-8", "float32")
    np.testing.assert_allclose(
        expected.output.reshape(-1), np.tile([0.7071, -0.7071], 4), atol=5e-5
    )
    # With eps raised to 1e-5 the answer would be about 0.0316.
    x = np.tile([1e-4, -1e-4], 4)
    assert abs(x[0] / np.sqrt(np.var(x) + 1e-5) - 0.0316) < 1e-4


def test_repeated_backward_gradients():
    expected, _ = reference("reported-repeated-backward", "float32")
    np.testing.assert_allclose(expected.grad_beta, [4.0, 4.0])
    np.testing.assert_allclose(expected.grad_gamma, [0.0, 0.0], atol=1e-12)
    np.testing.assert_allclose(expected.grad_input, 0.0, atol=1e-12)


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_constant_family_is_constant_in_its_dtype(dtype):
    for label in ("tiny", "third", "sqrt-max", "max"):
        case = cases.by_name(f"constant-{label}-{dtype}")
        x = cases.materialize(case, dtype, 0).x
        assert case.reduction_length == 13
        assert np.all(x == x.reshape(-1)[0])
        assert np.isfinite(x).all()


def test_eps_underflow_family_rounds_eps_to_zero():
    underflow = cases.by_name("eps-underflow-float16").eps
    assert np.float16(underflow) == 0.0
    assert np.float32(underflow) > 0.0
    for dtype, kind in (("float16", np.float16), ("float32", np.float32)):
        subnormal = cases.by_name(f"eps-subnormal-{dtype}").eps
        assert 0.0 < kind(subnormal) < np.finfo(kind).tiny


def test_offset_family_covers_ratios_per_dtype():
    for dtype in ("float64", "float32", "float16", "bfloat16"):
        names = [c.name for c in cases.CATALOGUE if c.name.endswith(f"-{dtype}")]
        offsets = [n for n in names if n.startswith("offset-")]
        assert offsets == [f"offset-1e{e}-{dtype}" for e in range(2, 8)]


def test_layout_ramps_cover_every_rank():
    ramps = [c for c in cases.CATALOGUE if c.name.startswith("layout-ramp-")]
    assert sorted(len(c.shape) - 2 for c in ramps) == [1, 2, 3]
    assert all(c.layout == "channels_last" for c in ramps)
