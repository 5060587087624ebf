"""The running-statistics suite: the contract's fields, the posed statistics, the
reference and scales it judges with, the fault-injected kernels of
tests/running_faults.py in both directions, and a run through pytest."""

from __future__ import annotations

import json

import numpy as np
import pytest

from adapters.contract import (
    RUNNING_CONVENTIONS,
    ContractError,
    Device,
    Implementation,
    Request,
    Result,
    validate,
)
from references import running_stats
from references.normalization import statistics
from suites import cases, dtypes, error_model, running_statistics
from suites.verdicts import Item
from tests import running_faults as running
from tests.broken_adapters import Declares
from tests.faults import SMALL_CASES
from tests.subprocess_runs import run_suite

SEEDS = range(5)
MODES = ("training", "inference")


def test_conventions_named_in_contract_are_defined():
    assert set(RUNNING_CONVENTIONS) == set(running_stats.CONVENTIONS)


def test_unknown_convention_rejected():
    implementation = Implementation(
        "bn", "", operator="batch_norm", running_stats="pytorch"
    )
    with pytest.raises(ContractError, match="running_stats 'pytorch'"):
        validate(Declares(implementation), "test")


def test_running_stats_on_layer_norm_rejected():
    implementation = Implementation(
        "ln", "", operator="layer_norm", running_stats="torch"
    )
    with pytest.raises(ContractError, match="keeps no running statistics"):
        validate(Declares(implementation), "test")


def test_running_stats_reason_on_layer_norm_rejected():
    implementation = Implementation(
        "ln", "", operator="layer_norm", running_stats_reason="none here"
    )
    with pytest.raises(ContractError, match="keeps no running statistics"):
        validate(Declares(implementation), "test")


def test_running_stats_with_reason_rejected():
    implementation = Implementation(
        "bn",
        "",
        operator="batch_norm",
        running_stats="torch",
        running_stats_reason="none here",
    )
    with pytest.raises(ContractError, match="set one or the other"):
        validate(Declares(implementation), "test")


def test_swapped_convention_named_in_message():
    records = running.run_case(
        running.MomentumWeightsOld(), "batch_norm", "random-2d", "training", 0
    )
    message = records["running_mean"].message
    assert "declares the 'torch' convention" in message
    assert "'keras'" in message and "'mxnet'" in message


def test_running_value_dtype_recorded():
    class Float64Running(running.RunningKernel):
        def run(self, request):
            result = super().run(request)
            if result.running_mean is not None:
                result.running_mean = result.running_mean.astype(np.float64)
            return result

    records = running.run_case(
        Float64Running(), "batch_norm", "random-2d", "training", 0
    )
    assert records["running_mean"].result_dtype == "float64"
    assert records["running_var"].result_dtype == "float32"


def test_request_and_result_default_to_no_running_statistics():
    request = Request(
        "batch_norm",
        "bn",
        "cpu",
        "float32",
        np.zeros(1),
        None,
        None,
        np.zeros(1),
        1e-5,
        False,
        False,
    )
    assert request.mode == "training"
    assert request.running_mean is None and request.momentum is None
    assert Result(output=None).running_var is None


def test_convention_momentum_does_not_hide_a_swap():
    # At 0.5 both weightings agree, and a swapped convention would pass.
    assert running_statistics.MOMENTUM != 0.5


@pytest.mark.parametrize("dtype", dtypes.DTYPES)
def test_posed_statistics_shape_and_dtype(dtype):
    case = cases.by_name("random-2d")
    mean, var = running_statistics.posed_statistics(case, dtype, 0)
    assert mean.shape == var.shape == (case.channels,)
    assert dtypes.is_representable(mean, dtype)
    assert dtypes.is_representable(var, dtype)
    assert np.all(var > 0)
    assert not mean.flags.writeable and not var.flags.writeable


@pytest.mark.parametrize("mode", MODES)
def test_posed_statistics_formula(mode):
    case = cases.by_name("large-mean-1e4")
    x = cases.materialize(case, "float64", 0).x
    mean, var = running_statistics.posed_statistics(case, "float64", 0, mode)
    batch = statistics(x, 0.0, (0, 2, 3))
    batch_mean, batch_var = batch.mean.reshape(-1), batch.var.reshape(-1)
    extra = 0.25 * batch_mean**2 if mode == "inference" else 0.0
    np.testing.assert_allclose(var, 1.5 * batch_var + extra)
    np.testing.assert_allclose(
        mean, batch_mean + 0.5 * np.sqrt(batch_var) + 0.25 * np.abs(batch_mean)
    )


def test_posed_statistics_ignore_nonfinite_elements():
    mean, var = running_statistics.posed_statistics(
        cases.by_name("nan-element"), "float32", 0
    )
    assert np.all(np.isfinite(mean)) and np.all(np.isfinite(var))


def test_posed_statistics_of_empty_batch():
    mean, var = running_statistics.posed_statistics(cases.by_name("N0"), "float32", 0)
    assert mean.tolist() == [0.0] * 3 and var.tolist() == [1.0] * 3


def test_posed_variance_zero_only_with_eps():
    # A constant channel keeps variance 0 when eps > 0 (rstd = 1 / sqrt(eps));
    # with eps = 0 it becomes 1, so that inference has an answer.
    for name in ("constant-slice-eps0", "eps0"):
        case = cases.by_name(name)
        _, var = running_statistics.posed_statistics(case, "float32", 0)
        assert np.all(var > 0)


def test_inference_rejection_allowed_for_empty_batch_only():
    m1 = cases.by_name("M1")
    assert running_statistics.rejection_rule(m1, "training")[0]
    assert not running_statistics.rejection_rule(m1, "inference")[0]
    assert running_statistics.rejection_rule(cases.by_name("N0"), "inference")[0]


def test_empty_batch_leaves_running_values():
    x = np.zeros((0, 2, 3))
    for step in (running_stats.batch_norm_step, running_stats.instance_norm_step):
        updated = step(
            x,
            np.array([1.0, 2.0]),
            np.array([3.0, 4.0]),
            0.25,
            running_stats.CONVENTIONS["torch"],
        )
        assert updated.mean.tolist() == [1.0, 2.0]
        assert updated.var.tolist() == [3.0, 4.0]


def test_infinite_element_makes_infinite_mean():
    x = np.array([[[1.0, np.inf, 2.0]]])
    updated = running_stats.batch_norm_step(
        x, np.zeros(1), np.ones(1), 0.25, running_stats.CONVENTIONS["keras"]
    )
    assert updated.mean[0] == np.inf
    assert np.isnan(updated.var[0])


def test_running_scales_cover_a_two_pass_variance():
    # A float32 two-pass variance of a large mean with a small spread is within
    # budget, and the one-pass variance is far beyond it.
    rng = np.random.default_rng(0)
    x = (1e4 + rng.normal(size=(4, 1, 64))).astype(np.float32)
    axes = (0, 2)
    exact = statistics(x, 0.0, axes).var.reshape(-1)
    mean = np.mean(x, axis=axes, keepdims=True, dtype=np.float32)
    two_pass = np.mean((x - mean) ** 2, axis=axes, dtype=np.float32)
    one_pass = np.mean(x * x, axis=axes, dtype=np.float32) - mean.reshape(-1) ** 2
    scale = error_model.running_scales(
        x, np.zeros(1), np.zeros(1), exact, 1.0, 1.0, axes, "float32"
    )["running_var"]
    limit = error_model.budget("running_var", "float32", x.size)
    unit = dtypes.UNIT_ROUNDOFF["float32"]
    assert abs(two_pass[0] - exact[0]) / (scale[0] * unit) <= limit
    assert abs(one_pass[0] - exact[0]) / (scale[0] * unit) > 10 * limit


@pytest.mark.parametrize("operator", running.OPERATORS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("case", [case.name for case in SMALL_CASES])
def test_correct_kernel_passes(case, mode, operator):
    for seed in SEEDS:
        records = running.run_case(running.RunningKernel(), operator, case, mode, seed)
        for record in records.values():
            assert record.verdict in ("pass", "unsupported"), (
                f"seed {seed}: {record.message}"
            )


@pytest.mark.parametrize("convention", RUNNING_CONVENTIONS)
@pytest.mark.parametrize("operator", running.OPERATORS)
def test_correct_kernel_passes_under_each_convention(convention, operator):
    kernel = running.RunningKernel(convention)
    for case in ("random-2d", "channels-last-3d", "large-mean-1e4", "M1", "N0"):
        for seed in range(2):
            records = running.run_case(kernel, operator, case, "training", seed)
            for record in records.values():
                assert record.verdict in ("pass", "unsupported"), record.message


# (fault, operator, case, mode, quantity that must fail).
EXPOSED = [
    (running.MomentumWeightsOld, "batch_norm", "random-2d", "training", "running_mean"),
    (
        running.MomentumWeightsOld,
        "instance_norm",
        "random-1d",
        "training",
        "running_var",
    ),
    (
        running.BiasedRunningVariance,
        "batch_norm",
        "random-3d",
        "training",
        "running_var",
    ),
    (
        running.BiasedRunningVariance,
        "instance_norm",
        "random-2d",
        "training",
        "running_var",
    ),
    (
        running.UnbiasedOverBatch,
        "instance_norm",
        "random-2d",
        "training",
        "running_var",
    ),
    (
        running.OnePassRunningVariance,
        "batch_norm",
        "large-mean-1e4",
        "training",
        "running_var",
    ),
    (
        running.OnePassRunningVariance,
        "instance_norm",
        "large-mean-1e4",
        "training",
        "running_var",
    ),
    (
        running.RunningStatsNotUpdated,
        "batch_norm",
        "random-2d",
        "training",
        "running_mean",
    ),
    (
        running.RunningStatsNotUpdated,
        "instance_norm",
        "random-2d",
        "training",
        "running_var",
    ),
    (
        running.InferenceWithBatchStatistics,
        "batch_norm",
        "random-2d",
        "inference",
        "inference_output",
    ),
    (
        running.InferenceWithBatchStatistics,
        "instance_norm",
        "channels-last-2d",
        "inference",
        "inference_output",
    ),
    (
        running.InferenceGradientThroughStatistics,
        "batch_norm",
        "random-2d",
        "inference",
        "inference_grad_input",
    ),
    # A large mean with a small spread: in float32 the batch's statistics carry an
    # error of about u * |mean|, and the posed values lie far beyond it.
    (
        running.MomentumWeightsOld,
        "batch_norm",
        "large-mean-1e6",
        "training",
        "running_mean",
    ),
    (
        running.InferenceWithBatchStatistics,
        "batch_norm",
        "tiny-variance",
        "inference",
        "inference_output",
    ),
    (
        running.InferenceWithBatchStatistics,
        "instance_norm",
        "large-mean-1e6",
        "inference",
        "inference_grad_gamma",
    ),
    (
        running.InferenceGradientThroughStatistics,
        "instance_norm",
        "M1",
        "inference",
        "inference_grad_input",
    ),
]


@pytest.mark.parametrize(
    ("fault", "operator", "case", "mode", "quantity"),
    EXPOSED,
    ids=[f"{f.__name__}-{o}-{c}-{m}" for f, o, c, m, _ in EXPOSED],
)
def test_fault_fails(fault, operator, case, mode, quantity):
    for seed in SEEDS:
        records = running.run_case(fault(), operator, case, mode, seed)
        assert records[quantity].verdict == "fail", (
            f"seed {seed}: {records[quantity].message}"
        )


# (fault, convention, operator, case, mode): where the defect changes nothing.
SPARED = [
    # Under Keras's convention, weighting the old value is right.
    (running.MomentumWeightsOld, "keras", "batch_norm", "random-2d", "training"),
    (running.BiasedRunningVariance, "onnx", "batch_norm", "random-2d", "training"),
    # BatchNorm has one slice per channel, so N * M is its slice length.
    (running.UnbiasedOverBatch, "torch", "batch_norm", "random-2d", "training"),
    # A two-pass and a one-pass variance agree closely on a mean near 0.
    (running.OnePassRunningVariance, "torch", "batch_norm", "random-2d", "training"),
    # Faults of one mode leave the other alone.
    (running.RunningStatsNotUpdated, "torch", "batch_norm", "random-2d", "inference"),
    (
        running.InferenceWithBatchStatistics,
        "torch",
        "batch_norm",
        "random-2d",
        "training",
    ),
    (
        running.InferenceGradientThroughStatistics,
        "torch",
        "instance_norm",
        "random-2d",
        "training",
    ),
]


@pytest.mark.parametrize(
    ("fault", "convention", "operator", "case", "mode"),
    SPARED,
    ids=[f"{f.__name__}-{v}-{o}-{c}-{m}" for f, v, o, c, m in SPARED],
)
def test_fault_spared_where_harmless(fault, convention, operator, case, mode):
    for seed in SEEDS:
        records = running.run_case(fault(convention), operator, case, mode, seed)
        for record in records.values():
            assert record.verdict == "pass", f"seed {seed}: {record.message}"


def test_inference_gradient_fault_harmless_on_parameters():
    records = running.run_case(
        running.InferenceGradientThroughStatistics(),
        "batch_norm",
        "random-2d",
        "inference",
        0,
    )
    assert records["inference_grad_gamma"].verdict == "pass"
    assert records["inference_grad_beta"].verdict == "pass"


def test_implementation_without_running_stats_unsupported():
    implementation = Implementation(
        "in", "", running_stats_reason="this framework's InstanceNorm keeps none"
    )
    assert running_statistics.declares(implementation)
    assert not running_statistics.declares(Implementation("in", ""))
    item = Item("declares", "in", "cpu", "float32", cases.by_name("random-2d"), 0)
    reason = running_statistics.unsupported_reason(
        Declares(implementation), implementation, Device("cpu"), item
    )
    assert reason == "this framework's InstanceNorm keeps none"


class Writes(running.RunningKernel):
    """Writes the running mean it was given, then computes correctly."""

    def run(self, request):
        request.running_mean.flags.writeable = True
        request.running_mean[0] = 0.0
        return super().run(request)


def test_changed_running_mean_is_error():
    records = running.run_case(Writes(), "batch_norm", "random-2d", "training", 0)
    assert {record.verdict for record in records.values()} == {"error"}
    # The cache that held the changed array was cleared.
    mean, _ = running_statistics.posed_statistics(
        cases.by_name("random-2d"), "float32", 0
    )
    assert mean[0] != 0.0


ITEMS = "test_running_statistics"


@pytest.mark.parametrize("workers", [None, "2"], ids=["serial", "xdist"])
def test_run_records_running_items(tmp_path, workers):
    report = tmp_path / "report.json"
    arguments = [
        "--adapter=tests.running_faults:RunningKernel",
        "--dtypes=float32",
        "--cases=random-2d,no-affine",
        f"--report={report}",
        "-k",
        ITEMS,
    ]
    if workers:
        arguments += ["-n", workers]
    completed = run_suite(*arguments)
    assert completed.returncode == 0, completed.stdout[-3000:]
    # Two operators on two cases in two modes.
    assert "8 passed" in completed.stdout
    document = json.loads(report.read_text(encoding="utf-8"))
    assert document["run"]["items"] == 8
    assert document["run"]["complete"] is True
    results = document["results"]
    # Per operator: 2 running values per case, 4 inference quantities on
    # random-2d and 2 on no-affine.
    assert len(results) == 2 * (2 + 2 + 4 + 2)
    assert {r["verdict"] for r in results} == {"pass"}
    assert all("::test_running_statistics[" in r["command"] for r in results)
    inference = [r for r in results if r["quantity"].startswith("inference_")]
    assert all("-inference]" in r["command"] for r in inference)


def test_faulty_run_fails_its_quantity(tmp_path):
    report = tmp_path / "report.json"
    completed = run_suite(
        "--adapter=tests.running_faults:MomentumWeightsOld",
        "--dtypes=float32",
        "--cases=random-2d",
        f"--report={report}",
        "-k",
        ITEMS,
    )
    assert completed.returncode == 1
    assert "2 failed, 2 passed" in completed.stdout
    failing = [
        r
        for r in json.loads(report.read_text(encoding="utf-8"))["results"]
        if not r["conforming"]
    ]
    assert {r["quantity"] for r in failing} == {"running_mean", "running_var"}
