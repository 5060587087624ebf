"""The case catalogue: reproducible inputs, exact rounding, and declared rejections."""

from __future__ import annotations

import numpy as np
import pytest

from suites import cases, dtypes

REQUIRED = [
    "random-1d",
    "random-2d",
    "random-3d",
    "no-affine",
    "M1",
    "M1x1",
    "constant-slice",
    "constant-slice-eps0",
    "N0",
    "tiny-variance",
    "large-mean-1e4",
    "large-mean-1e6",
    "long-reduction",
    "eps0",
    "eps1e-3",
    "eps1e-12",
    "gamma-negative",
    "gamma-zero",
    "dy-ones",
]


def test_catalogue_names_unique():
    names = [case.name for case in cases.CATALOGUE]
    assert len(names) == len(set(names))


@pytest.mark.parametrize("name", REQUIRED)
def test_required_case_present(name):
    assert cases.by_name(name).name == name


def test_unknown_case_lists_names():
    with pytest.raises(KeyError, match="known cases: random-1d"):
        cases.by_name("nope")


def test_inputs_reproducible():
    case = cases.by_name("random-2d")
    first = cases.generate_float64(case, seed=11)
    second = cases.generate_float64(case, seed=11)
    for name in first:
        assert np.array_equal(first[name], second[name]), name


def test_seed_changes_inputs():
    case = cases.by_name("random-2d")
    first = cases.generate_float64(case, seed=1)["x"]
    second = cases.generate_float64(case, seed=2)["x"]
    assert not np.array_equal(first, second)


def test_inputs_independent_of_other_cases():
    # A case's stream depends on its own name, not on what ran before it.
    case = cases.by_name("random-3d")
    before = cases.generate_float64(case, seed=0)["x"]
    cases.generate_float64(cases.by_name("random-1d"), seed=0)
    after = cases.generate_float64(case, seed=0)["x"]
    assert np.array_equal(before, after)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32", "float64"])
def test_materialized_inputs_representable(dtype):
    inputs = cases.materialize(cases.by_name("random-2d"), dtype, 0)
    for array in (inputs.x, inputs.gamma, inputs.beta, inputs.grad_output):
        assert dtypes.is_representable(array, dtype)


def test_materialized_inputs_read_only():
    inputs = cases.materialize(cases.by_name("random-2d"), "float32", 0)
    with pytest.raises(ValueError):
        inputs.x[0, 0, 0, 0] = 1.0


def test_no_affine_has_no_parameters():
    inputs = cases.materialize(cases.by_name("no-affine"), "float32", 0)
    assert inputs.gamma is None
    assert inputs.beta is None


def test_constant_slice_is_constant():
    x = cases.generate_float64(cases.by_name("constant-slice"), 0)["x"]
    assert np.all(x[0, 1] == 2.5)
    assert np.std(x[0, 0]) > 0


def test_large_mean_dropped_for_float16():
    case = cases.by_name("large-mean-1e6")
    assert not case.fits("float16")
    assert case.fits("float32")


def test_long_reduction_length():
    assert cases.by_name("long-reduction").reduction_length == 512 * 512


@pytest.mark.parametrize("name", ["M1", "M1x1", "constant-slice-eps0", "N0"])
def test_rejection_allowed(name):
    case = cases.by_name(name)
    assert case.rejection_allowed
    assert case.rejection_reason


@pytest.mark.parametrize(
    "name", ["random-2d", "eps0", "large-mean-1e6", "tiny-variance"]
)
def test_rejection_not_allowed(name):
    assert not cases.by_name(name).rejection_allowed


def test_bfloat16_rounding_ties_to_even():
    values = np.array([1.0 + 2.0**-8, 1.0 + 3 * 2.0**-8, -2.5, np.inf])
    rounded = dtypes.round_to(values, "bfloat16")
    assert rounded.tolist() == [1.0, 1.0 + 2.0**-6, -2.5, np.inf]


def test_unknown_dtype_rejected():
    with pytest.raises(ValueError, match="unknown dtype 'float8'"):
        dtypes.check_dtype("float8")
