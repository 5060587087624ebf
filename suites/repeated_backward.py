"""Repeated backward through the suite: several backward calls for one input, each
into fresh gradients or added into the same buffers.

An item is an (implementation, device, dtype, case, scheme), in the default
execution mode, for an implementation that lists schemes in `backward_schemes`,
or that gives in `backward_schemes_reason` why it has none (its items are then
unsupported). The
adapter receives the case's inputs and a stack of REPEATS grad_output arrays: the
case's own first, then further draws from the case's generator, from the seeded
streams "grad_output:2", "grad_output:3" and so on. Each call thus has its own
grad_output, and a result that carries something over from an earlier call
differs from the reference.

- "repeat": one forward pass, then a backward pass per grad_output through its
  graph, each into fresh gradients. The k-th call's gradients are judged against
  the first-order reference for the k-th grad_output, with the first-order
  scales and budgets: `repeated_grad_input`, `repeated_grad_gamma`,
  `repeated_grad_beta`.
- "accumulate": a forward and backward step per grad_output, whose gradients the
  framework adds into the same buffers. After the k-th call the buffers are
  judged against the sum of the first k references, with the scale of
  error_model.accumulated_scale: `accumulated_grad_input` and so on.

Each quantity gets one record, for its worst call; the message names the call.
When a quantity fails, the adapter also runs one fresh first-order call per
grad_output. If every call matches those (their sums in "accumulate"), the
message ends in error_model.FRESH_MATCH: the error is first-order, and a
deviation entry for the first-order gradient covers it. Otherwise the message
names the call that differs, as state kept between calls.
Not posed: a case beyond CHUNK_ELEMENTS elements, as for second derivatives.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import numpy as np

from adapters.contract import (
    BACKWARD_SCHEMES,
    Device,
    Implementation,
    Request,
    Result,
)
from references.family import INSTANCE_NORM, Operator
from suites import cases, dtypes, error_model
from suites.cases import Case, Inputs
from suites.verdicts import (
    Item,
    Record,
    build_request,
    call_adapter,
    check_array,
    declared_reason,
    from_layout,
    item_inputs,
    layout_shape,
    record_comparison,
    to_layout,
    unpack_result,
)
from suites.verdicts import reference_from_inputs as first_order_reference
from suites.verdicts import unsupported_reason as first_order_unsupported_reason

# The number of backward calls per item, K. Three, as in the reported input:
# the second call shows what the first left behind, and the third whether the
# second call's state differs from the first's.
REPEATS = 3
# The record's quantity prefix of each scheme.
PREFIXES = {"repeat": "repeated", "accumulate": "accumulated"}
# The first-order gradients, and the Result field that contains each one's steps.
GRADIENTS = ("grad_input", "grad_gamma", "grad_beta")
STEP_FIELDS = {name: f"{name}_steps" for name in GRADIENTS}


@dataclasses.dataclass(frozen=True)
class BackwardTarget:
    """One repeated-backward item: a conformance item's coordinates and a scheme."""

    adapter: object
    implementation: Implementation
    device: Device
    item: Item
    scheme: str

    @property
    def test_id(self) -> str:
        return f"{self.item.item_id}-{self.scheme}"


def declares(implementation: Implementation) -> bool:
    """Return True if the implementation gets repeated-backward items: it runs a
    scheme, or it gives the reason it runs none."""
    return bool(
        implementation.backward_schemes or implementation.backward_schemes_reason
    )


def select_targets(targets: list) -> list[BackwardTarget]:
    """Return one BackwardTarget per scheme for each target (suites.plugin.Target)
    whose implementation gets repeated-backward items, in the order given."""
    return [
        BackwardTarget(
            target.adapter, target.implementation, target.device, target.item, scheme
        )
        for target in targets
        if declares(target.implementation)
        for scheme in BACKWARD_SCHEMES
    ]


def gradients_for(case: Case) -> tuple[str, ...]:
    """Return the first-order gradients of the case: no parameter gradients
    without affine parameters."""
    return GRADIENTS if case.affine else GRADIENTS[:1]


def quantities_for(case: Case, scheme: str) -> tuple[str, ...]:
    """Return the record quantities of the scheme for the case."""
    return tuple(f"{PREFIXES[scheme]}_{name}" for name in gradients_for(case))


def unposed_reason(case: Case) -> str | None:
    """Return why the case gets no repeated-backward items, or None if it does."""
    if case.large:
        return (
            f"repeated backward calls are judged on whole inputs, and case "
            f"{case.name} has {case.elements} elements, beyond the "
            f"{cases.CHUNK_ELEMENTS} of a whole reference"
        )
    return None


def unsupported_reason(
    adapter: object,
    implementation: Implementation,
    device: Device,
    item: Item,
    scheme: str,
) -> str | None:
    """Return why the item cannot run, or None when it runs: the implementation
    lacks the scheme, the first-order item cannot run, the case is not posed, or
    the adapter's optional backward_scheme_reason(implementation, scheme, device,
    dtype) gives a reason. Raises AdapterMethodError as
    suites.verdicts.unsupported_reason does."""
    if scheme not in implementation.backward_schemes:
        return implementation.backward_schemes_reason or (
            f"implementation {implementation.name} has no backward scheme {scheme!r}"
        )
    reason = first_order_unsupported_reason(adapter, implementation, device, item)
    reason = reason or unposed_reason(item.case)
    return reason or declared_reason(
        adapter,
        "backward_scheme_reason",
        item.implementation,
        scheme,
        item.device,
        item.dtype,
    )


@functools.lru_cache(maxsize=8)
def grad_outputs(case: Case, dtype: str, seed: int) -> np.ndarray:
    """Return the REPEATS grad_output arrays of the case, stacked, in
    (N, C, *spatial) order, rounded to `dtype` and read-only. The first is the
    case's own grad_output."""
    first = cases.materialize(case, dtype, seed).grad_output
    stack = [first]
    for call in range(2, REPEATS + 1):
        # Seeded as the case's other inputs are, by seed, case and role.
        rng = cases._stream(seed, case.name, f"grad_output:{call}")
        drawn = case.grad_output.generate(rng, case.shape)
        stack.append(dtypes.round_to(drawn, dtype).astype(first.dtype))
    values = np.stack(stack)
    values.flags.writeable = False
    return values


@dataclasses.dataclass(frozen=True)
class Reference:
    """The first-order reference of each call, by gradient: the exact values and
    scales of each call on its own, in the shapes of x (channels-first) and
    gamma, stacked along a first axis of length REPEATS."""

    exact: dict[str, np.ndarray]
    scales: dict[str, np.ndarray]


def reference_from_inputs(
    inputs: Inputs, stack: np.ndarray, eps: float, operator: Operator = INSTANCE_NORM
) -> Reference:
    """Return the float64 gradients and scales of each call for these inputs and
    grad_output stack."""
    exact: dict[str, list[np.ndarray]] = {name: [] for name in GRADIENTS}
    scales: dict[str, list[np.ndarray]] = {name: [] for name in GRADIENTS}
    for grad_output in stack:
        call_inputs = dataclasses.replace(inputs, grad_output=grad_output)
        expected, scale = first_order_reference(call_inputs, eps, operator)
        for name in GRADIENTS:
            exact[name].append(getattr(expected, name))
            scales[name].append(scale[name])
    return Reference(
        exact={name: np.stack(arrays) for name, arrays in exact.items()},
        scales={name: np.stack(arrays) for name, arrays in scales.items()},
    )


@functools.lru_cache(maxsize=8)
def catalogue_reference(
    case: Case,
    dtype: str,
    seed: int,
    eps: float | None = None,
    operator: Operator = INSTANCE_NORM,
) -> Reference:
    """Return reference_from_inputs for the catalogue's inputs and grad_output
    stack of (case, dtype, seed), with the case's eps or the eps the framework
    received. Cached so that every implementation, device and scheme tested in
    this dtype shares it."""
    inputs = cases.operator_inputs(case, dtype, seed, operator)
    use_eps = case.eps if eps is None else eps
    return reference_from_inputs(
        inputs, grad_outputs(case, dtype, seed), use_eps, operator
    )


def build_backward_request(
    item: Item, inputs: Inputs, stack: np.ndarray, scheme: str
) -> Request:
    """Return the repeated-backward request of the item: the first-order request
    with gradients, the grad_output stack in the case's layout and the scheme."""
    request = build_request(item, inputs, gradients=True)
    layout = item.case.layout
    laid_out = np.stack([to_layout(grad_output, layout) for grad_output in stack])
    laid_out.flags.writeable = False
    return dataclasses.replace(
        request,
        grad_output=laid_out[0],
        grad_outputs=laid_out,
        backward_scheme=scheme,
    )


def unsupported_records(item: Item, scheme: str, reason: str) -> list[Record]:
    """Record every quantity of an item that cannot run."""
    return item.unsupported(quantities_for(item.case, scheme), reason)


def error_records(item: Item, scheme: str, message: str) -> list[Record]:
    """Record every quantity of an item as `error`."""
    return item.errors(quantities_for(item.case, scheme), message)


def run_item(
    adapter: object,
    item: Item,
    scheme: str,
    inputs: Inputs | None = None,
    stack: np.ndarray | None = None,
) -> list[Record]:
    """Run the item through the adapter in `scheme` and return one record per
    quantity. `inputs` and `stack` (in (N, C, *spatial) order) replace the
    catalogue's, and the reference is then computed from them."""
    supplied = inputs is not None or stack is not None
    if inputs is None:
        inputs = item_inputs(item)
    if stack is None:
        stack = grad_outputs(item.case, item.dtype, item.seed)
    request = build_backward_request(item, inputs, stack, scheme)
    quantities = quantities_for(item.case, scheme)
    caches = (grad_outputs, catalogue_reference)
    result, records = call_adapter(adapter, item, request, quantities, caches)
    if records is not None:
        return records

    def fresh() -> dict[str, np.ndarray] | None:
        return fresh_calls(adapter, item, inputs, stack)

    return judge_result(
        item, scheme, result, (inputs, stack) if supplied else None, fresh
    )


def fresh_calls(
    adapter: object, item: Item, inputs: Inputs, stack: np.ndarray
) -> dict[str, np.ndarray] | None:
    """Run one first-order request per grad_output of the stack, each a new
    forward and backward call, and return each gradient's results stacked, in
    (N, C, *spatial) order. Returns None when a call fails or returns a gradient
    that is missing or of another shape."""
    names = gradients_for(item.case)
    results: dict[str, list[np.ndarray]] = {name: [] for name in names}
    for grad_output in stack:
        single = dataclasses.replace(inputs, grad_output=grad_output)
        request = build_request(item, single, gradients=True)
        caches = (grad_outputs, catalogue_reference)
        result, records = call_adapter(adapter, item, request, names, caches)
        if records is not None or not isinstance(result, Result):
            return None
        for name in names:
            value = getattr(result, name)
            if not isinstance(value, np.ndarray):
                return None
            if name == "grad_input":
                value = from_layout(value, item.case.layout)
            results[name].append(np.asarray(value, dtype=np.float64))
    try:
        return {name: np.stack(values) for name, values in results.items()}
    except ValueError:
        return None


def buffer_sums(values: np.ndarray, dtype: str) -> np.ndarray:
    """Return the running sums over the first axis of `values` (one entry per
    call, exact) that a gradient buffer of `dtype` holds, in float64.

    Each sum is exact where a correct buffer stays finite: one that adds each
    call's gradient rounded to `dtype` and rounds each sum. Where that buffer
    overflows, the sum is its infinity (or NaN, after opposite infinities), and
    it stays so for the later calls even where a later exact sum is back in
    range."""
    values = np.asarray(values, dtype=np.float64)
    sums = np.empty_like(values)
    exact = np.zeros(values.shape[1:])
    buffer = np.zeros(values.shape[1:])
    with np.errstate(invalid="ignore", over="ignore"):
        for call, value in enumerate(values):
            exact = exact + value
            rounded = dtypes.round_to(value, dtype).astype(np.float64)
            buffer = dtypes.round_to(buffer + rounded, dtype).astype(np.float64)
            # NOTE: within a few spacings of the overflow threshold, a gradient
            # that is correct but rounded the other way can overflow where this
            # buffer does not, or the reverse, and that element then fails.
            sums[call] = np.where(np.isfinite(buffer), exact, buffer)
    return sums


def buffer_dtype(array: np.ndarray, dtype: str) -> str:
    """Return the dtype of a returned gradient buffer: the tested `dtype` when
    every value of the array is one of its values (the contract lets a float16
    buffer come back in a float32 array), else the array's own. MXNet 1.9.1's
    float16 BatchNorm returns float32 gradients of gamma and beta (261906.5 for
    grad_beta on long-reduction-dy-mean)."""
    own = np.dtype(array.dtype).name
    if own not in dtypes.CONTAINER or dtypes.is_representable(array, dtype):
        return dtype
    return own


def expected_values(
    reference: Reference,
    name: str,
    scheme: str,
    item: Item,
    x_shape: tuple[int, ...],
    units: str,
    buffer: str | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Return the exact values and scales of gradient `name` after each call,
    stacked: each call's own in the scheme "repeat", the running sums in
    "accumulate" (buffer_sums in the dtype `buffer`, by default the tested one:
    an overflowed sum stays infinite). `units` is the dtype whose roundoff
    measures the errors."""
    dtype = item.dtype
    exact, scales = reference.exact[name], reference.scales[name]
    if scheme == "repeat":
        return exact, scales
    limit = error_model.budget(
        name, dtype, error_model.budget_reduction_length(name, x_shape, item.operator)
    )
    sums = buffer_sums(exact, buffer or dtype)
    accumulated = [
        error_model.accumulated_scale(
            list(scales[: call + 1]), list(exact[: call + 1]), limit, units
        )
        for call in range(len(exact))
    ]
    return sums, np.stack(accumulated)


def judge_result(
    item: Item,
    scheme: str,
    result: object,
    supplied: tuple[Inputs, np.ndarray] | None = None,
    fresh: Callable[[], dict[str, np.ndarray] | None] | None = None,
) -> list[Record]:
    """Compare an adapter's gradients after each call with the reference: one
    record per quantity, for its worst call. The reference comes from `supplied`
    (inputs and grad_output stack) when set, else from the catalogue.

    `fresh` returns the adapter's fresh single calls (fresh_calls). It is called
    once a quantity fails, and the record's message then states whether every
    call matches them (ending in error_model.FRESH_MATCH, a first-order error)
    or which call does not (state kept between calls).

    As for second derivatives, results that are NaN throughout get `fail`, not
    `error`: a framework that keeps NaN from an earlier call is the defect this
    suite looks for."""
    case, dtype = item.case, item.dtype
    quantities = quantities_for(case, scheme)
    names = gradients_for(case)
    x_shape = case.shape if supplied is None else supplied[0].x.shape
    unpacked = unpack_result(item, result, (), x_shape, "grad_input_steps")
    if isinstance(unpacked, str):
        return item.errors(quantities, unpacked)
    eps, units, result_dtype = unpacked.eps, unpacked.units, unpacked.result_dtype

    if supplied is None:
        reference = catalogue_reference(case, dtype, item.seed, eps, item.operator)
        calls = REPEATS
    else:
        inputs, stack = supplied
        use_eps = case.eps if eps is None else eps
        reference = reference_from_inputs(inputs, stack, use_eps, item.operator)
        calls = len(stack)

    records = []
    singles = None
    for quantity, name in zip(quantities, names, strict=True):
        field = STEP_FIELDS[name]
        got = getattr(result, field)
        if name == "grad_input":
            shape = (calls, *layout_shape(x_shape, case.layout))
        else:
            shape = (calls, *item.operator.parameter_shape(x_shape))
        problem = check_array(field, got, shape)
        if problem is None and result_dtype is not None and result_dtype != dtype:
            problem = f"the framework returned {result_dtype} for a {dtype} input"
        if problem is not None:
            records.append(
                item.record(
                    quantity, "error", False, problem, result_dtype=result_dtype
                )
            )
            continue
        exact, scales = expected_values(
            reference, name, scheme, item, x_shape, units, buffer_dtype(got, dtype)
        )
        worst = None
        for call in range(calls):
            value = got[call]
            if name == "grad_input":
                value = from_layout(value, case.layout)
            comparison = error_model.compare(
                quantity,
                value,
                exact[call],
                scales[call],
                dtype,
                x_shape,
                units,
                item.operator,
            )
            if worst is None or comparison.error > worst[1].error:
                worst = (call, comparison)
        call, comparison = worst
        record = record_comparison(item, quantity, comparison, result_dtype, eps, units)
        record.message = f"call {call + 1} of {calls}: {record.message}"
        record.compute_dtype = result.compute_dtype
        if record.verdict == "fail" and fresh is not None:
            if singles is None:
                singles = fresh() or {}
            note = fresh_note(
                item,
                quantity,
                name,
                scheme,
                got,
                singles,
                reference,
                units,
                x_shape,
            )
            record.message = f"{record.message}; {note}"
        records.append(record)
    return records


def fresh_note(
    item: Item,
    quantity: str,
    name: str,
    scheme: str,
    got: np.ndarray,
    singles: dict[str, np.ndarray],
    reference: Reference,
    units: str,
    x_shape: tuple[int, ...],
) -> str:
    """Return whether each call's `got` matches the fresh single calls of
    gradient `name` (their running sums in "accumulate") within the quantity's
    budget: error_model.FRESH_MATCH, or the call that differs.

    The fresh calls run in the same process after the repeated ones, so a result
    kept across requests (a cache keyed on the input alone) reaches them too. Two
    fresh calls that return the same gradient, with a finite nonzero element, for
    grad_outputs whose exact gradients differ show such a cache, and the note
    names it instead. (A gradient that is all NaN or all zero whatever the
    grad_output is a first-order defect.)"""
    if name not in singles:
        return "the fresh single backward calls for comparison failed"
    expected = singles[name]
    scales, exact = reference.scales[name], reference.exact[name]
    for later in range(1, len(expected)):
        for earlier in range(later):
            value = expected[later]
            informative = bool(np.any(np.isfinite(value) & (value != 0)))
            same = np.array_equal(expected[earlier], value, equal_nan=True)
            if (
                informative
                and same
                and not np.array_equal(exact[earlier], exact[later], equal_nan=True)
            ):
                return (
                    f"fresh single calls {earlier + 1} and {later + 1} return the "
                    "same gradient for different grad_outputs: a result kept from "
                    "an earlier request, state kept between calls"
                )
    # Where the reference's scale is not finite (a NaN exact value), the calls are
    # compared relative to the framework's own values.
    with np.errstate(invalid="ignore"):
        scales = np.where(np.isfinite(scales), scales, np.abs(expected))
    if scheme == "accumulate":
        # The framework's buffer rounds each sum of its own single results, so
        # the scale bounds those roundings (accumulated_scale with the single
        # results in place of the exact values), not only the reference's.
        limit = error_model.budget(
            name,
            item.dtype,
            error_model.budget_reduction_length(name, x_shape, item.operator),
        )
        sums = buffer_sums(expected, buffer_dtype(got, item.dtype))
        scales = np.stack(
            [
                error_model.accumulated_scale(
                    list(scales[: call + 1]),
                    list(expected[: call + 1]),
                    limit,
                    units,
                )
                for call in range(len(expected))
            ]
        )
        expected = sums
    for call in range(len(expected)):
        value = got[call]
        if name == "grad_input":
            value = from_layout(value, item.case.layout)
        comparison = error_model.compare(
            quantity,
            value,
            expected[call],
            scales[call],
            item.dtype,
            x_shape,
            units,
            item.operator,
        )
        if not comparison.within_budget:
            return (
                f"call {call + 1} differs from a fresh single backward call with "
                f"its grad_output by {comparison.error:.3g} u: state kept between "
                "calls"
            )
    return error_model.FRESH_MATCH
