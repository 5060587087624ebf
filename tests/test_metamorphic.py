"""Metamorphic relations (suites.metamorphic): correct kernels satisfy all of them,
and each relation catches a defect that it is built for."""

from __future__ import annotations

import numpy as np
import pytest

from adapters.contract import Rejected
from suites import deviations, dtypes, metamorphic
from tests import family_faults, faults


class EpsRaisedTo1e5(faults.Float32Kernel):
    """eps below 1e-5 silently raised to 1e-5."""

    framework = "fault-eps-raised"

    def rstd(self, var, eps):
        return super().rstd(var, max(eps, 1e-5))


def outcomes(kernel, seed=0) -> dict[str, metamorphic.Outcome]:
    adapter = kernel()
    implementation = adapter.implementations()[0]
    results = metamorphic.check(adapter, implementation, "cpu", adapter.dtype, seed)
    return {outcome.relation: outcome for outcome in results}


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize(
    "kernel", [faults.Float32Kernel, faults.SerialSumKernel, faults.Float16Kernel]
)
def test_correct_kernels_satisfy_every_relation(kernel, seed):
    found = outcomes(kernel, seed)
    assert list(found) == list(metamorphic.RELATIONS)
    for outcome in found.values():
        assert outcome.satisfied, outcome.message


@pytest.mark.parametrize(
    ("kernel", "relation"),
    [
        (faults.OnePassVariance, "shift"),
        (EpsRaisedTo1e5, "scale"),
        (faults.StatisticsAcrossBatch, "slice-independence"),
        (faults.DroppedDxTerm, "gradient-sums"),
    ],
    ids=["one-pass-shift", "raised-eps-scale", "batch-stats-slices", "dropped-dx-sums"],
)
def test_relation_catches_its_defect(kernel, relation):
    outcome = outcomes(kernel)[relation]
    assert not outcome.satisfied, outcome.message


@pytest.mark.parametrize("dtype", dtypes.DTYPES)
def test_shifted_and_scaled_inputs_are_exact(dtype):
    x = metamorphic.grid_inputs(dtype, 0)["x"].astype(np.float64)
    shifted = dtypes.round_to(x + metamorphic.SHIFT[dtype], dtype).astype(np.float64)
    assert np.array_equal(shifted - metamorphic.SHIFT[dtype], x)
    scaled = dtypes.round_to(x * metamorphic.SCALE, dtype).astype(np.float64)
    assert np.array_equal(scaled / metamorphic.SCALE, x)


class RejectsEpsZero(faults.Float32Kernel):
    """A correct kernel that refuses eps = 0, as torch's batch_norm does."""

    framework = "rejects-eps-zero"

    def run(self, request):
        if request.eps == 0.0:
            raise Rejected("eps must be positive")
        return super().run(request)


def test_rejected_eps_zero_leaves_relations_unchecked():
    found = outcomes(RejectsEpsZero)
    assert found["scale"].satisfied is None
    assert "rejects eps = 0" in found["scale"].message
    assert found["gradient-sums"].satisfied
    assert "not checked" in found["gradient-sums"].message
    assert found["shift"].satisfied


# The family's operators (tests/family_faults.py), each on its own slices.


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("operator", family_faults.OPERATORS)
def test_family_kernel_satisfies_every_relation(operator, seed):
    adapter = family_faults.FamilyKernel()
    implementation = next(
        item for item in adapter.implementations() if item.operator == operator
    )
    found = metamorphic.check(adapter, implementation, "cpu", "float32", seed)
    assert [outcome.relation for outcome in found] == list(metamorphic.RELATIONS)
    for outcome in found:
        assert outcome.satisfied, outcome.message


@pytest.mark.parametrize(
    ("fault", "operator", "relation"),
    [
        (family_faults.OnePassVariance, "group_norm", "shift"),
        (family_faults.OnePassVariance, "layer_norm", "shift"),
        (family_faults.OnePassVariance, "batch_norm", "shift"),
        (family_faults.UnbiasedBatchVariance, "batch_norm", "gradient-sums"),
    ],
    ids=["one-pass-gn", "one-pass-ln", "one-pass-bn", "unbiased-bn-sums"],
)
def test_family_relation_catches_defect(fault, operator, relation):
    adapter = fault()
    implementation = next(
        item for item in adapter.implementations() if item.operator == operator
    )
    found = metamorphic.check(adapter, implementation, "cpu", "float32")
    outcome = {item.relation: item for item in found}[relation]
    assert outcome.satisfied is False, outcome.message


def test_first_slice_per_operator():
    sizes = {
        name: int(metamorphic.first_slice(metamorphic.grid_operator(name)).sum())
        for name in family_faults.OPERATORS + ("instance_norm",)
    }
    # SHAPE is (2, 3, 4, 6): a slice of 24, a channel over two samples, a sample.
    assert sizes == {
        "instance_norm": 24,
        "batch_norm": 48,
        "group_norm": 72,
        "layer_norm": 72,
    }


def test_deviations_know_the_relations():
    # suites/deviations.py keeps its own copy, so that deviation entries may name
    # a relation as their quantity.
    assert deviations.RELATIONS == metamorphic.RELATIONS
