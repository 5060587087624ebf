"""Metamorphic relations (suites.metamorphic): correct kernels satisfy all of them,
and each relation catches a defect that it is built for."""

from __future__ import annotations

import numpy as np
import pytest

from adapters.contract import Rejected
from suites import dtypes, metamorphic
from tests import faults


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
