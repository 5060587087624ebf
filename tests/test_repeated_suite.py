"""The repeated-backward suite: the contract's fields, the grad_output stack, the
scale of accumulated gradients, the kernels of tests/backward_faults.py in both
directions, the reported input's exact values, and a run through pytest."""

from __future__ import annotations

import dataclasses
import datetime
import json

import numpy as np
import pytest
from packaging.specifiers import SpecifierSet

from adapters.contract import (
    BACKWARD_SCHEMES,
    ContractError,
    Device,
    Implementation,
    Request,
    Result,
    validate,
)
from suites import cases, deviations, dtypes, error_model, repeated_backward
from suites.error_model import FRESH_MATCH
from suites.verdicts import AdapterMethodError, Item
from tests import backward_faults as backward
from tests.broken_adapters import Declares
from tests.subprocess_runs import run_suite

SEEDS = range(3)


def item_for(case_name: str, dtype: str = "float32", seed: int = 0) -> Item:
    return Item(
        "numpy-repeated", "kernel", "cpu", dtype, cases.by_name(case_name), seed
    )


def test_request_and_result_default_to_one_backward_call():
    request = Request(
        "instance_norm",
        "in",
        "cpu",
        "float32",
        None,
        None,
        None,
        None,
        1e-5,
        True,
        True,
    )
    assert request.grad_outputs is None
    assert request.backward_scheme is None
    result = Result(output=None)
    assert result.grad_input_steps is None
    assert result.grad_gamma_steps is None
    assert result.grad_beta_steps is None


@pytest.mark.parametrize(
    "fields, fragment",
    [
        ({"backward_schemes": ("retain",)}, "use distinct members"),
        ({"backward_schemes": ("repeat", "repeat")}, "use distinct members"),
        ({"backward_schemes": "repeat"}, "not a tuple"),
        (
            {"backward_schemes": ("repeat",), "gradients": False},
            "without gradients",
        ),
    ],
)
def test_contract_rejects_bad_schemes(fields, fragment):
    implementation = Implementation("in", "", **fields)
    with pytest.raises(ContractError, match=fragment):
        validate(Declares(implementation), "test")


def test_declared_schemes_pass_validation():
    validate(Declares(Implementation("in", "", backward_schemes=BACKWARD_SCHEMES)), "t")


def test_missing_scheme_is_unsupported_with_its_reason():
    reason = "the framework has no gradient buffers to add into"
    implementation = Implementation(
        "in", "", backward_schemes=("repeat",), backward_schemes_reason=reason
    )
    item = item_for("random-2d")
    adapter = Declares(implementation)
    device = Device("cpu")
    assert repeated_backward.declares(implementation)
    missing = repeated_backward.unsupported_reason(
        adapter, implementation, device, item, "accumulate"
    )
    assert missing == reason
    runs = repeated_backward.unsupported_reason(
        adapter, implementation, device, item, "repeat"
    )
    assert runs is None


class SchemeGaps(Declares):
    """Declares both schemes, and gives a reason for accumulate in float16."""

    def backward_scheme_reason(self, implementation, scheme, device, dtype):
        if scheme == "accumulate" and dtype == "float16":
            return f"{implementation} on {device}: no float16 buffers"
        return None


def test_scheme_reason_per_dtype_makes_items_unsupported():
    implementation = Implementation("in", "", backward_schemes=BACKWARD_SCHEMES)
    adapter = SchemeGaps(implementation)
    device = Device("cpu")
    reason = repeated_backward.unsupported_reason(
        adapter, implementation, device, item_for("random-2d", "float16"), "accumulate"
    )
    assert reason == "kernel on cpu: no float16 buffers"
    for dtype, scheme in [("float32", "accumulate"), ("float16", "repeat")]:
        item = item_for("random-2d", dtype)
        assert (
            repeated_backward.unsupported_reason(
                adapter, implementation, device, item, scheme
            )
            is None
        )


class BrokenSchemeReason(Declares):
    def backward_scheme_reason(self, implementation, scheme, device, dtype):
        return 3


def test_non_string_scheme_reason_is_error():
    implementation = Implementation("in", "", backward_schemes=BACKWARD_SCHEMES)
    with pytest.raises(AdapterMethodError, match="backward_scheme_reason"):
        repeated_backward.unsupported_reason(
            BrokenSchemeReason(implementation),
            implementation,
            Device("cpu"),
            item_for("random-2d"),
            "repeat",
        )


def test_implementation_without_schemes_gets_no_items():
    assert not repeated_backward.declares(Implementation("in", ""))


def test_large_case_not_posed():
    large = next(case for case in cases.CATALOGUE if case.large)
    assert repeated_backward.unposed_reason(large) is not None
    assert repeated_backward.unposed_reason(cases.by_name("random-2d")) is None


@pytest.mark.parametrize("dtype", dtypes.DTYPES)
def test_grad_output_stack(dtype):
    case = cases.by_name("random-2d")
    stack = repeated_backward.grad_outputs(case, dtype, 0)
    assert stack.shape == (repeated_backward.REPEATS, *case.shape)
    assert not stack.flags.writeable
    own = cases.materialize(case, dtype, 0).grad_output
    np.testing.assert_array_equal(stack[0], own)
    # Each call has its own grad_output, rounded to the dtype.
    assert not np.array_equal(stack[1], stack[0])
    assert not np.array_equal(stack[2], stack[1])
    np.testing.assert_array_equal(dtypes.round_to(stack, dtype), stack)
    again = repeated_backward.grad_outputs.__wrapped__(case, dtype, 0)
    np.testing.assert_array_equal(again, stack)


def test_constant_grad_output_repeats():
    stack = repeated_backward.grad_outputs(
        cases.by_name("reported-repeated-backward"), "float32", 0
    )
    np.testing.assert_array_equal(stack, np.ones_like(stack))


def reported_expected(scheme: str) -> dict[str, np.ndarray]:
    """The suite's exact gradients after each call on the reported input."""
    item = item_for("reported-repeated-backward")
    reference = repeated_backward.catalogue_reference(item.case, "float32", 0)
    return {
        name: repeated_backward.expected_values(
            reference, name, scheme, item, item.case.shape, "float32"
        )[0]
        for name in repeated_backward.GRADIENTS
    }


def test_reported_repeat_gives_the_same_gradients_each_call():
    expected = reported_expected("repeat")
    np.testing.assert_allclose(expected["grad_beta"], np.full((3, 2), 4.0))
    np.testing.assert_allclose(expected["grad_gamma"], 0.0, atol=1e-12)
    np.testing.assert_allclose(expected["grad_input"], 0.0, atol=1e-12)


def test_reported_accumulate_adds_four_per_call():
    expected = reported_expected("accumulate")
    np.testing.assert_allclose(
        expected["grad_beta"], [[4.0, 4.0], [8.0, 8.0], [12.0, 12.0]]
    )
    np.testing.assert_allclose(expected["grad_gamma"], 0.0, atol=1e-12)
    np.testing.assert_allclose(expected["grad_input"], 0.0, atol=1e-12)


def test_buffer_sums_keep_an_overflowed_sum_infinite():
    # Keras's float16 accumulators on eps-vs-variance-1e-10 (TensorFlow 2.21.0):
    # 44000 + 23700 overflows, and the later -32900 cannot bring it back.
    values = np.array(
        [[44000.0, -56960.0, 1.0], [23700.0, -24510.0, 2.0], [-32900.0, 5.0, 3.0]]
    )
    sums = repeated_backward.buffer_sums(values, "float16")
    np.testing.assert_array_equal(
        sums, [[44000.0, -56960.0, 1.0], [np.inf, -np.inf, 3.0], [np.inf, -np.inf, 6.0]]
    )
    # In float32 the same sums are exact.
    np.testing.assert_array_equal(
        repeated_backward.buffer_sums(values, "float32"), np.cumsum(values, axis=0)
    )


@pytest.mark.parametrize(
    ("values", "container", "dtype", "expected"),
    [
        ([1.0, np.inf], np.float16, "float16", "float16"),
        # A float16 buffer returned in a float32 array.
        ([65504.0, np.inf, np.nan], np.float32, "float16", "float16"),
        # MXNet 1.9.1's float16 BatchNorm: float32 gamma and beta gradients.
        ([261906.547], np.float32, "float16", "float32"),
        ([0.1], np.float32, "float16", "float32"),
        # bfloat16 values travel in float32 arrays.
        ([1.5, -3.0], np.float32, "bfloat16", "bfloat16"),
        ([0.1], np.float64, "float32", "float64"),
    ],
)
def test_buffer_dtype_follows_the_returned_values(values, container, dtype, expected):
    array = np.array(values, dtype=container)
    assert repeated_backward.buffer_dtype(array, dtype) == expected


def test_buffer_sums_at_overflow_threshold():
    # float16 rounds 59980 to 59968 and 5541 to 5540: their sum, 65508, is
    # finite in a float16 buffer although the exact 65521 is not.
    near = repeated_backward.buffer_sums(
        np.array([[59980.0], [5541.0], [-60000.0]]), "float16"
    )
    np.testing.assert_allclose(near[:, 0], [59980.0, 65521.0, 5521.0])
    # 60000 + 5520 (5519.9 rounded) rounds to infinity in the buffer.
    over = repeated_backward.buffer_sums(
        np.array([[60000.0], [5519.9], [-60000.0]]), "float16"
    )
    np.testing.assert_array_equal(over[:, 0], [60000.0, np.inf, np.inf])


def test_buffer_sums_add_an_overflowing_call_as_infinity():
    # A call whose exact gradient is beyond float16's range returns infinity, so
    # the buffer contains it although the exact sum (53273) is in range.
    values = np.array([[-20000.0, 70000.0], [73273.0, -70000.0]])
    sums = repeated_backward.buffer_sums(values, "float16")
    np.testing.assert_array_equal(sums, [[-20000.0, np.inf], [np.inf, np.nan]])


@pytest.mark.parametrize("calls", [2, 3, 8])
@pytest.mark.parametrize("units", ["float32", "float16"])
def test_accumulated_scale_covers_worst_rounding(calls, units):
    # Each call's gradient is off by nearly its whole budget after rounding to
    # the dtype, all in one direction, and the sum rounds once per addition: the
    # sum stays within the budget.
    rng = np.random.default_rng(7)
    limit = error_model.budget("grad_input", units, 16)
    unit = dtypes.UNIT_ROUNDOFF[units]
    exact = rng.uniform(1.0, 2.0, (calls, 4096)) * np.logspace(-3, 3, 4096)
    scales = exact * rng.uniform(1.0, 2.0, exact.shape)
    worst = dtypes.round_to(exact + (limit - 1) * unit * scales, units)
    single = error_model.normalized_errors(worst, exact, scales, units)
    assert single.max() <= limit
    total = worst[0]
    for call in range(1, calls):
        total = dtypes.round_to(total + worst[call], units)
    scale = error_model.accumulated_scale(list(scales), list(exact), limit, units)
    errors = error_model.normalized_errors(total, exact.sum(axis=0), scale, units)
    assert errors.max() <= limit
    bare = error_model.normalized_errors(
        total, exact.sum(axis=0), scales.sum(axis=0), units
    )
    # The additions' roundings add to the calls' own errors.
    assert bare.max() > single.max()


def test_accumulated_scale_of_one_call_is_its_own():
    scale = np.array([1.0, 2.0])
    combined = error_model.accumulated_scale(
        [scale], [np.array([5.0, 7.0])], 9.0, "float32"
    )
    np.testing.assert_array_equal(combined, scale)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("scheme", BACKWARD_SCHEMES)
def test_correct_kernel_passes_catalogue(scheme, seed):
    kernel = backward.RepeatedKernel()
    failing = []
    for case in cases.CATALOGUE:
        for record in backward.run_case(kernel, case.name, scheme, seed).values():
            if not record.conforming:
                failing.append(record.message)
    assert not failing


EXPOSED = [
    (backward.BuffersNotCleared, "random-2d", "repeat", "repeated_grad_input"),
    (backward.BuffersNotCleared, "random-2d", "repeat", "repeated_grad_beta"),
    (
        backward.BuffersNotCleared,
        "reported-repeated-backward",
        "repeat",
        "repeated_grad_beta",
    ),
    (
        backward.AccumulateOverwrites,
        "random-2d",
        "accumulate",
        "accumulated_grad_input",
    ),
    (
        backward.AccumulateOverwrites,
        "reported-repeated-backward",
        "accumulate",
        "accumulated_grad_beta",
    ),
    (backward.FirstGradOutputKept, "random-2d", "repeat", "repeated_grad_input"),
    (backward.FirstGradOutputKept, "random-3d", "repeat", "repeated_grad_gamma"),
    (backward.SavedXhatScaledInPlace, "random-2d", "repeat", "repeated_grad_input"),
    (backward.SavedXhatScaledInPlace, "random-2d", "repeat", "repeated_grad_gamma"),
]


@pytest.mark.parametrize(
    "fault, case, scheme, quantity",
    EXPOSED,
    ids=[f"{fault.__name__}-{case}-{scheme}" for fault, case, scheme, _ in EXPOSED],
)
def test_fault_fails(fault, case, scheme, quantity):
    for seed in SEEDS:
        records = backward.run_case(fault(), case, scheme, seed)
        assert records[quantity].verdict == "fail", records[quantity].message
        # The first call is right; a later one shows the defect.
        assert not records[quantity].message.startswith("call 1 of")


SPARED = [
    # Zeroing nothing is the accumulate mode.
    (backward.BuffersNotCleared, "random-2d", "accumulate"),
    # Overwriting is what fresh gradients do.
    (backward.AccumulateOverwrites, "random-2d", "repeat"),
    # Every call's grad_output is the first one's.
    (backward.FirstGradOutputKept, "reported-repeated-backward", "repeat"),
    # Each accumulate step runs its own forward pass and saved state.
    (backward.SavedXhatScaledInPlace, "random-2d", "accumulate"),
    # gamma = 1 leaves xhat as it was.
    (backward.SavedXhatScaledInPlace, "no-affine", "repeat"),
]


@pytest.mark.parametrize(
    "fault, case, scheme",
    SPARED,
    ids=[f"{fault.__name__}-{case}-{scheme}" for fault, case, scheme in SPARED],
)
def test_fault_spared_where_harmless(fault, case, scheme):
    for seed in SEEDS:
        records = backward.run_case(fault(), case, scheme, seed)
        assert all(record.conforming for record in records.values())


class WrongStepCount(backward.RepeatedKernel):
    """Returns one call fewer than asked."""

    def run(self, request):
        result = super().run(request)
        if request.grad_outputs is None:
            return result
        return dataclasses.replace(
            result,
            grad_input_steps=result.grad_input_steps[:-1],
            grad_gamma_steps=result.grad_gamma_steps[:-1],
        )


def test_wrong_step_count_is_error():
    records = backward.run_case(WrongStepCount(), "random-2d", "repeat", 0)
    assert records["repeated_grad_input"].verdict == "error"
    assert "shape" in records["repeated_grad_input"].message
    assert records["repeated_grad_gamma"].verdict == "error"
    assert records["repeated_grad_beta"].verdict == "pass"


class WritesGradOutputs(backward.RepeatedKernel):
    """Writes the grad_output stack it was given, then computes correctly."""

    def run(self, request):
        if request.grad_outputs is not None:
            request.grad_outputs.flags.writeable = True
            request.grad_outputs[1] = 0.0
        return super().run(request)


def test_changed_grad_outputs_is_error():
    records = backward.run_case(WritesGradOutputs(), "random-2d", "repeat", 0)
    assert {record.verdict for record in records.values()} == {"error"}
    stack = repeated_backward.grad_outputs(cases.by_name("random-2d"), "float32", 0)
    assert np.any(stack[1] != 0.0)


def _entry(quantities):
    return deviations.Deviation(
        framework="numpy-repeated",
        versions=SpecifierSet(""),
        reason="a first-order grad_input defect",
        link="https://example.invalid/report",
        date=datetime.date(2026, 12, 5),
        implementations=("kernel",),
        cases=("random-2d",),
        quantities=quantities,
    )


def _record(quantity, message):
    return {
        "framework": "numpy-repeated",
        "implementation": "kernel",
        "device": "cpu",
        "dtype": "float32",
        "case": "random-2d",
        "quantity": quantity,
        "verdict": "fail",
        "message": message,
    }


FIRST_ORDER_MESSAGE = f"call 2 of 3: accumulated_grad_input: ...; {FRESH_MATCH}"
LEAK_MESSAGE = (
    "call 2 of 3: accumulated_grad_input: ...; call 2 differs from a fresh single "
    "backward call with its grad_output by 9 u: state kept between calls"
)


def test_first_order_entry_covers_fresh_match():
    record = _record("accumulated_grad_input", FIRST_ORDER_MESSAGE)
    assert _entry(("grad_input",)).covers(record, np.__version__)


def test_first_order_entry_skips_other_gradient():
    record = _record("accumulated_grad_beta", FIRST_ORDER_MESSAGE)
    assert not _entry(("grad_input",)).covers(record, np.__version__)


@pytest.mark.parametrize("quantities", [("grad_input",), None], ids=["named", "all"])
def test_first_order_entry_skips_state_leak(quantities):
    record = _record("accumulated_grad_input", LEAK_MESSAGE)
    assert not _entry(quantities).covers(record, np.__version__)


def test_entry_naming_repeated_quantity_covers_leak():
    record = _record("accumulated_grad_input", LEAK_MESSAGE)
    assert _entry(("accumulated_grad_input",)).covers(record, np.__version__)


@pytest.mark.parametrize("scheme", BACKWARD_SCHEMES)
def test_first_order_defect_matches_fresh_calls(scheme):
    records = backward.run_case(backward.GradInputScaled(), "random-2d", scheme, 0)
    record = records[f"{repeated_backward.PREFIXES[scheme]}_grad_input"]
    assert record.verdict == "fail"
    assert record.message.endswith(FRESH_MATCH), record.message


def test_leak_beside_first_order_defect_named():
    kernel = backward.GradInputScaledBuffersNotCleared()
    record = backward.run_case(kernel, "random-2d", "repeat", 0)["repeated_grad_input"]
    assert record.verdict == "fail"
    assert "state kept between calls" in record.message


ITEMS = "test_repeated_backward"


@pytest.mark.parametrize("workers", [None, "2"], ids=["serial", "xdist"])
def test_run_records_backward_items(tmp_path, workers):
    report = tmp_path / "report.json"
    arguments = [
        "--adapter=tests.backward_faults:RepeatedKernel",
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
    # Two cases in two schemes.
    assert "4 passed" in completed.stdout
    document = json.loads(report.read_text(encoding="utf-8"))
    assert document["run"]["items"] == 4
    results = document["results"]
    # Three gradients on random-2d, one on no-affine, per scheme.
    assert len(results) == 2 * (3 + 1)
    assert {r["verdict"] for r in results} == {"pass"}
    accumulated = [r for r in results if r["quantity"].startswith("accumulated_")]
    assert len(accumulated) == 4
    assert all("-accumulate]" in r["command"] for r in accumulated)


def test_faulty_run_fails_its_scheme(tmp_path):
    report = tmp_path / "report.json"
    completed = run_suite(
        "--adapter=tests.backward_faults:AccumulateOverwrites",
        "--dtypes=float32",
        "--cases=random-2d",
        f"--report={report}",
        "-k",
        ITEMS,
    )
    assert completed.returncode == 1
    assert "1 failed, 1 passed" in completed.stdout
    results = json.loads(report.read_text(encoding="utf-8"))["results"]
    failing = {r["quantity"] for r in results if not r["conforming"]}
    assert failing == {
        "accumulated_grad_input",
        "accumulated_grad_gamma",
        "accumulated_grad_beta",
    }


@pytest.mark.parametrize("scheme", BACKWARD_SCHEMES)
def test_cache_across_requests_named(scheme):
    kernel = backward.GradOutputCachedAcrossRequests()
    records = backward.run_case(kernel, "random-2d", scheme, 0)
    record = records[f"{repeated_backward.PREFIXES[scheme]}_grad_input"]
    assert record.verdict == "fail"
    assert "kept from an earlier request" in record.message, record.message
