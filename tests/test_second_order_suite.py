"""Second derivatives through the suite: the reference on each operator's view, the
error scales, the correct NumPy kernels passing every case over several seeds, each
injected defect failing where it shows, and the items of a pytest run."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from adapters.contract import (
    ContractError,
    Implementation,
    Request,
    validate,
)
from references.family import Operator
from references.instance_norm import evaluate
from suites import cases, error_model, second_order
from suites.cases import Inputs
from suites.verdicts import Item, build_request, run_item
from tests import second_order_faults as kernels
from tests.faults import SMALL_CASES
from tests.subprocess_runs import run_suite
from tests.test_reference import EPS, FD_RTOL, assert_close_to_scale, central_difference

SEEDS = range(5)
OPERATORS = ("instance_norm", "group_norm", "layer_norm", "batch_norm")


# The contract


def test_implementation_defaults_to_first_order():
    implementation = Implementation("kernel", "a kernel")
    assert implementation.second_order is False
    assert implementation.second_order_reason == ""
    assert not second_order.declares(implementation)


def test_second_order_without_gradients_rejected():
    class NoGradients(kernels.SecondOrderKernel):
        def implementations(self):
            return [Implementation("kernel", "x", gradients=False, second_order=True)]

    with pytest.raises(ContractError, match="second_order without gradients"):
        validate(NoGradients(), "tests:NoGradients")


def test_request_and_result_default_to_first_order():
    fields = {field.name: field.default for field in dataclasses.fields(Request)}
    assert fields["grad_grad_input"] is None
    result = kernels.SecondOrderKernel().run(
        build_request(*_item_and_inputs("random-1d"), gradients=True)
    )
    assert result.grad2_input is None
    assert result.grad2_gamma is None
    assert result.grad2_grad_output is None


def _item_and_inputs(case_name: str, operator: str = "instance_norm"):
    case = cases.by_name(case_name)
    item = Item(
        "numpy-second-order",
        f"{operator}.kernel",
        "cpu",
        "float32",
        case,
        0,
        case.operator(operator),
    )
    return item, cases.operator_inputs(case, "float32", 0, item.operator)


# The reference on each operator's view


def _random_inputs(shape, parameter_shape, seed):
    rng = np.random.default_rng(seed)
    gamma = rng.uniform(0.5, 2.0, parameter_shape) * rng.choice(
        [-1.0, 1.0], parameter_shape
    )
    x = rng.standard_normal(shape) + rng.uniform(-1.0, 1.0)
    return (
        Inputs(
            x=x,
            gamma=gamma,
            beta=rng.standard_normal(parameter_shape),
            grad_output=rng.standard_normal(shape),
        ),
        rng.standard_normal(shape),
    )


FAMILY = [
    ((2, 3, 5), Operator("instance_norm")),
    ((2, 4, 3), Operator("group_norm", groups=2)),
    ((2, 3, 2, 2), Operator("layer_norm", normalized_ndim=2)),
    ((3, 2, 4), Operator("batch_norm")),
]
FAMILY_IDS = [operator.name for _, operator in FAMILY]


@pytest.mark.parametrize("quantity", second_order.QUANTITIES)
@pytest.mark.parametrize(("shape", "operator"), FAMILY, ids=FAMILY_IDS)
def test_reference_matches_differences(shape, operator, quantity):
    inputs, v = _random_inputs(shape, operator.parameter_shape(shape), seed=7)
    # The loss through the first-order reference in x's shape: the differences
    # share neither the view nor the formulas of the second derivatives.
    arrays = {
        "grad2_input": inputs.x,
        "grad2_gamma": inputs.gamma,
        "grad2_grad_output": inputs.grad_output,
    }

    def loss():
        expected = operator.evaluate(
            inputs.x, inputs.gamma, inputs.beta, inputs.grad_output, EPS
        )
        return np.sum(v * expected.grad_input)

    differences = central_difference(loss, arrays[quantity])
    reference = second_order.reference_from_inputs(inputs, v, EPS, operator)
    assert reference.expected[quantity].shape == arrays[quantity].shape
    assert_close_to_scale(reference.expected[quantity], differences, FD_RTOL)


def test_group_per_channel_reference_is_instance_norm():
    inputs, v = _random_inputs((2, 3, 4), (3,), seed=3)
    group = second_order.reference_from_inputs(
        inputs, v, EPS, Operator("group_norm", groups=3)
    )
    instance = second_order.reference_from_inputs(
        inputs, v, EPS, Operator("instance_norm")
    )
    for quantity in second_order.QUANTITIES:
        np.testing.assert_allclose(
            group.expected[quantity], instance.expected[quantity], rtol=1e-13
        )
        np.testing.assert_allclose(
            group.scales[quantity], instance.scales[quantity], rtol=1e-13
        )


def test_affine_off_reference_uses_unit_gamma():
    inputs, v = _random_inputs((2, 3, 6), (3,), seed=5)
    plain = dataclasses.replace(inputs, gamma=None, beta=None)
    ones = dataclasses.replace(inputs, gamma=np.ones(3), beta=np.zeros(3))
    off = second_order.reference_from_inputs(plain, v, EPS)
    unit = second_order.reference_from_inputs(ones, v, EPS)
    for quantity in second_order.QUANTITIES:
        np.testing.assert_array_equal(off.expected[quantity], unit.expected[quantity])


# The error scales


@pytest.mark.parametrize(("shape", "operator"), FAMILY, ids=FAMILY_IDS)
def test_scales_bound_the_results(shape, operator):
    # Each scale replaces every term by a bound on its magnitude, so it is at
    # least the magnitude of the exact value.
    inputs, v = _random_inputs(shape, operator.parameter_shape(shape), seed=11)
    reference = second_order.reference_from_inputs(inputs, v, EPS, operator)
    for quantity in second_order.QUANTITIES:
        exact = np.abs(reference.expected[quantity])
        assert np.all(reference.scales[quantity] >= exact * (1 - 1e-12)), quantity


def test_grad2_grad_output_scale_from_grad_input():
    # grad2_grad_output = gamma * w, and w is grad_input's formula with v in
    # place of g, so its scale is |gamma| times grad_input's scale for gamma = 1
    # and upstream gradient v.
    inputs, v = _random_inputs((2, 3, 7), (3,), seed=2)
    axes = (2,)
    first = evaluate(inputs.x, None, None, v, EPS, axes)
    of_v = error_model.scales(inputs.x, None, None, v, first, axes)["grad_input"]
    reference = second_order.reference_from_inputs(inputs, v, EPS)
    gamma = np.abs(inputs.gamma)[None, :, None]
    np.testing.assert_allclose(
        reference.scales["grad2_grad_output"], gamma * of_v, rtol=1e-14
    )


def test_first_order_budgets_unchanged():
    assert set(error_model.BUDGET) == set(error_model.QUANTITIES)
    for quantity in second_order.QUANTITIES:
        assert quantity not in error_model.BUDGET
        for dtype in ("float64", "float32", "float16", "bfloat16"):
            assert error_model.budget(quantity, dtype, 256) == error_model.budget(
                "grad_input", dtype, 256
            )


@pytest.mark.parametrize(("shape", "operator"), FAMILY, ids=FAMILY_IDS)
def test_grad2_gamma_budget_length_is_grad_gamma_length(shape, operator):
    length = error_model.budget_reduction_length
    assert length("grad2_gamma", shape, operator) == length(
        "grad_gamma", shape, operator
    )
    assert length("grad2_input", shape, operator) == length(
        "grad_input", shape, operator
    )


# The items


# The float64 cases whose spread reaches beyond 2^400, where rstd^2 is subnormal.
NEAR_MAX_FLOAT64 = ("range-max-float64", "squares-overflow-float64")


def test_large_case_not_posed():
    case = next(case for case in cases.CATALOGUE if case.large)
    assert "judged on whole inputs" in second_order.unposed_reason(case)
    for case in SMALL_CASES:
        if case.name not in NEAR_MAX_FLOAT64:
            assert second_order.unposed_reason(case) is None, case.name


@pytest.mark.parametrize("name", NEAR_MAX_FLOAT64)
def test_near_max_float64_not_posed(name):
    reason = second_order.unposed_reason(cases.by_name(name))
    assert "subnormal range" in reason


def test_constant_near_max_float64_posed():
    assert second_order.unposed_reason(cases.by_name("constant-max-float64")) is None


def test_no_affine_has_no_grad2_gamma():
    assert second_order.quantities_for(cases.by_name("no-affine")) == (
        "grad2_input",
        "grad2_grad_output",
    )


def test_direction_drawn_per_case_and_seed():
    case = cases.by_name("random-2d")
    v = second_order.direction(case, "float32", 0)
    assert v.shape == case.shape
    assert v.dtype == np.float32
    assert not v.flags.writeable
    inputs = cases.materialize(case, "float32", 0)
    assert not np.array_equal(v, inputs.grad_output)
    assert not np.array_equal(v, second_order.direction(case, "float32", 1))
    np.testing.assert_array_equal(v, second_order.direction(case, "float32", 0))


def test_implementation_without_second_order_unsupported():
    class FirstOrderOnly(kernels.SecondOrderKernel):
        def implementations(self):
            return [
                dataclasses.replace(
                    implementation,
                    second_order=False,
                    second_order_reason="no double backward on this path",
                )
                for implementation in super().implementations()
            ]

    adapter = FirstOrderOnly()
    implementation = adapter.implementations()[0]
    item, _ = _item_and_inputs("random-2d")
    assert second_order.declares(implementation)
    reason = second_order.unsupported_reason(
        adapter, implementation, adapter.devices()[0], item
    )
    assert reason == "no double backward on this path"


def test_changed_direction_is_error():
    class WritesDirection(kernels.SecondOrderKernel):
        def run(self, request):
            if request.grad_grad_input is not None:
                direction = np.array(request.grad_grad_input)
                direction[...] = 0.0
                # Write through the request's own array, as a careless kernel
                # that reuses its input as scratch space does.
                request.grad_grad_input.flags.writeable = True
                request.grad_grad_input[...] = direction
            return super().run(request)

    item, _ = _item_and_inputs("random-1d")
    records = second_order.run_item(WritesDirection(), item)
    assert {record.verdict for record in records} == {"error"}
    assert "grad_grad_input" in records[0].message
    # The cached direction was dropped, so the next item draws it afresh.
    assert np.any(second_order.direction(item.case, "float32", 0) != 0.0)


@pytest.mark.parametrize("kernel", kernels.CORRECT_KERNELS, ids=lambda k: k.__name__)
@pytest.mark.parametrize("operator", OPERATORS)
@pytest.mark.parametrize("case", [case.name for case in SMALL_CASES])
def test_correct_kernel_passes(case, operator, kernel):
    adapter = kernel()
    for seed in SEEDS:
        records = kernels.run_case(adapter, operator, case, seed)
        for record in records.values():
            assert record.verdict in ("pass", "unsupported"), (
                f"seed {seed}: {record.message}"
            )


# (fault, operator, case, quantity that must fail). Each defect is visible on
# ordinary random inputs; the channels-last, degenerate and family cases check
# that it is seen through every path.
EXPOSED = [
    (kernels.DroppedGrad2InputTerm, "instance_norm", "random-1d", "grad2_input"),
    (kernels.DroppedGrad2InputTerm, "instance_norm", "channels-last-2d", "grad2_input"),
    (kernels.DroppedGrad2InputTerm, "instance_norm", "long-reduction", "grad2_input"),
    (kernels.DroppedGrad2InputTerm, "group_norm", "groups-2-of-6", "grad2_input"),
    (kernels.DroppedGrad2InputTerm, "layer_norm", "layer-last-axis", "grad2_input"),
    (kernels.DroppedGrad2InputTerm, "batch_norm", "random-3d", "grad2_input"),
    (kernels.DroppedGrad2InputTerm, "batch_norm", "no-affine", "grad2_input"),
    (
        kernels.GammaMissingFromGrad2GradOutput,
        "instance_norm",
        "gamma-negative",
        "grad2_grad_output",
    ),
    (
        kernels.GammaMissingFromGrad2GradOutput,
        "instance_norm",
        "gamma-zero",
        "grad2_grad_output",
    ),
    (
        kernels.GammaMissingFromGrad2GradOutput,
        "group_norm",
        "random-2d",
        "grad2_grad_output",
    ),
    (
        kernels.GammaMissingFromGrad2GradOutput,
        "layer_norm",
        "random-3d",
        "grad2_grad_output",
    ),
    (
        kernels.GammaMissingFromGrad2GradOutput,
        "batch_norm",
        "channels-last-3d",
        "grad2_grad_output",
    ),
    (kernels.UncenteredGrad2Gamma, "instance_norm", "random-2d", "grad2_gamma"),
    (kernels.UncenteredGrad2Gamma, "instance_norm", "long-reduction", "grad2_gamma"),
    (kernels.UncenteredGrad2Gamma, "group_norm", "groups-2-of-6", "grad2_gamma"),
    (kernels.UncenteredGrad2Gamma, "layer_norm", "layer-last-axis", "grad2_gamma"),
    (kernels.UncenteredGrad2Gamma, "batch_norm", "batch-of-one", "grad2_gamma"),
    (kernels.UncenteredGrad2Gamma, "batch_norm", "M1", "grad2_gamma"),
]


@pytest.mark.parametrize(
    ("fault", "operator", "case", "quantity"),
    EXPOSED,
    ids=[f"{f.__name__}-{o}-{c}-{q}" for f, o, c, q in EXPOSED],
)
def test_fault_fails(fault, operator, case, quantity):
    for seed in SEEDS:
        records = kernels.run_case(fault(), operator, case, seed)
        assert records[quantity].verdict == "fail", (
            f"seed {seed}: {records[quantity].message}"
        )


@pytest.mark.parametrize("fault", kernels.FAULTS, ids=lambda fault: fault.__name__)
def test_fault_confined_to_its_quantity(fault):
    # Each defect is in one second derivative: the other two pass, and so do the
    # first-order results of the same kernel.
    broken = {
        kernels.DroppedGrad2InputTerm: "grad2_input",
        kernels.GammaMissingFromGrad2GradOutput: "grad2_grad_output",
        kernels.UncenteredGrad2Gamma: "grad2_gamma",
    }[fault]
    for operator in OPERATORS:
        records = kernels.run_case(fault(), operator, "random-2d", 0)
        for quantity, record in records.items():
            if quantity != broken:
                assert record.verdict == "pass", record.message
        item, _ = _item_and_inputs("random-2d", operator)
        adapter = fault()
        implementation = next(
            candidate
            for candidate in adapter.implementations()
            if candidate.operator == operator
        )
        item = dataclasses.replace(item, framework=adapter.framework)
        for record in run_item(adapter, item, implementation):
            assert record.verdict == "pass", record.message


def test_gamma_fault_harmless_without_affine():
    # With affine off gamma is 1, so leaving it out changes nothing.
    records = kernels.run_case(
        kernels.GammaMissingFromGrad2GradOutput(), "instance_norm", "no-affine", 0
    )
    assert all(record.verdict == "pass" for record in records.values())


# A pytest run. -k leaves out the other suites' items.

ITEMS = "test_normalization or test_second_order"


def read_report(path):
    return json.loads(path.read_text(encoding="utf-8"))


@pytest.mark.parametrize("workers", [None, "2"], ids=["serial", "xdist"])
def test_run_records_second_order_items(tmp_path, workers):
    report = tmp_path / "report.json"
    arguments = [
        "--adapter=tests.second_order_faults:SecondOrderKernel",
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
    # Four operators on two cases, first-order and second-order items each.
    assert "16 passed" in completed.stdout
    document = read_report(report)
    assert document["run"]["items"] == 16
    assert document["run"]["complete"] is True
    second = [r for r in document["results"] if r["quantity"].startswith("grad2_")]
    assert {r["quantity"] for r in second} == set(second_order.QUANTITIES)
    assert {r["verdict"] for r in second} == {"pass"}
    # 4 operators * (3 quantities on random-2d + 2 on no-affine).
    assert len(second) == 20
    assert all("::test_second_order[" in r["command"] for r in second)
    record = next(
        r
        for r in second
        if r["implementation"] == "group_norm.kernel" and r["case"] == "random-2d"
    )
    assert record["op"] == "group_norm"
    assert record["inputs"]["shape"] == [2, 3, 5, 7]


def test_failing_item_writes_no_bundle(tmp_path):
    bundles = tmp_path / "bundles"
    report = tmp_path / "report.json"
    completed = run_suite(
        "--adapter=tests.second_order_faults:UncenteredGrad2Gamma",
        "--dtypes=float32",
        "--cases=random-2d",
        f"--replay-dir={bundles}",
        f"--report={report}",
        "-k",
        ITEMS,
    )
    assert completed.returncode == 1
    assert "4 failed, 4 passed" in completed.stdout
    failing = [r for r in read_report(report)["results"] if not r["conforming"]]
    assert {r["quantity"] for r in failing} == {"grad2_gamma"}
    assert all(r["replay_command"] is None for r in failing)
    assert list(bundles.iterdir()) == []
