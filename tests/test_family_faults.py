"""GroupNorm, LayerNorm and BatchNorm through the suite: a correct float32 kernel
passes every case over several seeds, and each injected defect fails on the cases
that expose it and passes where the defect makes no difference."""

from __future__ import annotations

import pytest

from tests import family_faults as family
from tests import faults

SEEDS = range(5)


@pytest.mark.parametrize("operator", family.OPERATORS)
@pytest.mark.parametrize("case", [case.name for case in faults.SMALL_CASES])
def test_correct_family_kernel_passes(case, operator):
    for seed in SEEDS:
        records = family.run_case(family.FamilyKernel(), operator, case, seed)
        for record in records.values():
            assert record.verdict in ("pass", "unsupported"), (
                f"seed {seed}: {record.message}"
            )


def test_layer_norm_not_posed_channels_last():
    records = family.run_case(
        family.FamilyKernel(), "layer_norm", "channels-last-2d", 0
    )
    assert {record.verdict for record in records.values()} == {"unsupported"}


# (fault, operator, case, quantity that must fail).
EXPOSED = [
    (family.GroupsIgnored, "group_norm", "random-2d", "output"),
    (family.GroupsIgnored, "group_norm", "groups-2-of-6", "output"),
    (family.GroupsIgnored, "group_norm", "groups-2-of-6", "grad_input"),
    (family.GammaPerGroup, "group_norm", "groups-2-of-6", "output"),
    (family.GammaPerGroup, "group_norm", "random-2d", "grad_input"),
    (family.LastAxisOnly, "layer_norm", "random-2d", "output"),
    (family.LastAxisOnly, "layer_norm", "random-3d", "grad_gamma"),
    (family.UnbiasedBatchVariance, "batch_norm", "random-2d", "output"),
    (family.UnbiasedBatchVariance, "batch_norm", "batch-of-one", "output"),
    (family.StatisticsPerSample, "batch_norm", "random-2d", "output"),
    (family.StatisticsPerSample, "batch_norm", "random-1d", "grad_input"),
    (family.OnePassVariance, "group_norm", "large-mean-1e4", "output"),
    (family.OnePassVariance, "layer_norm", "large-mean-1e4", "output"),
    (family.OnePassVariance, "batch_norm", "large-mean-1e4", "output"),
]


@pytest.mark.parametrize(
    ("fault", "operator", "case", "quantity"),
    EXPOSED,
    ids=[f"{f.__name__}-{o}-{c}-{q}" for f, o, c, q in EXPOSED],
)
def test_family_fault_fails(fault, operator, case, quantity):
    for seed in SEEDS:
        records = family.run_case(fault(), operator, case, seed)
        assert records[quantity].verdict == "fail", (
            f"seed {seed}: {records[quantity].message}"
        )


# (fault, operator, case): where the defect changes nothing, the suite passes it.
SPARED = [
    # One group per channel: ignoring the groups is then correct.
    (family.GroupsIgnored, "group_norm", "groups-per-channel"),
    (family.GroupsIgnored, "layer_norm", "random-2d"),
    # With one channel per group, the group's first gamma is the channel's.
    (family.GammaPerGroup, "group_norm", "groups-per-channel"),
    # A hidden size of 96 is one normalized axis.
    (family.LastAxisOnly, "layer_norm", "layer-last-axis"),
    (family.StatisticsPerSample, "batch_norm", "batch-of-one"),
    (family.UnbiasedBatchVariance, "group_norm", "random-2d"),
    (family.OnePassVariance, "batch_norm", "random-2d"),
]


@pytest.mark.parametrize(
    ("fault", "operator", "case"),
    SPARED,
    ids=[f"{f.__name__}-{o}-{c}" for f, o, c in SPARED],
)
def test_family_fault_passes_where_harmless(fault, operator, case):
    records = family.run_case(fault(), operator, case, 0)
    assert all(record.verdict == "pass" for record in records.values()), [
        record.message for record in records.values()
    ]


@pytest.mark.parametrize("fault", family.FAULTS, ids=lambda fault: fault.__name__)
def test_family_fault_never_breaks(fault):
    # An `error` verdict would mean the faulty kernel itself broke, so the defect
    # went untested.
    for operator in family.OPERATORS:
        for case in ("random-2d", "channels-last-2d", "N0", "M1", "no-affine"):
            records = family.run_case(fault(), operator, case, 0)
            errors = [r.message for r in records.values() if r.verdict == "error"]
            assert not errors, f"{operator} {case}: {errors}"
