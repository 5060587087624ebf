"""Second derivatives through the suite: the gradients of L = sum(v * grad_input).

A second-order item is an (implementation, device, dtype, case) like a first-order
one, for an implementation that declares `second_order`, or that gives in
`second_order_reason` the reason it has none (its items are then unsupported).
The adapter receives the case's inputs and a direction v shaped like x, drawn from
the case's seeded stream "grad_grad_input" as a standard normal and rounded to the
tested dtype like every input. It returns the gradients of L with respect to x,
gamma and grad_output, which are judged against references.second_order on the
operator's view, with the scales of error_model.second_order_scales.

Not posed: the case beyond CHUNK_ELEMENTS elements, which the first-order suite
judges a group of samples at a time. Every other case is posed as it is, the
degenerate ones included: the reference gives NaN where a slice has a NaN or
infinity or is constant with eps = 0, zeros for a one-element slice, and empty
arrays for the empty batch, and a case that allows a rejection allows it here too.
"""

from __future__ import annotations

import dataclasses
import functools

import numpy as np

from adapters.contract import Device, Implementation, Request
from references import instance_norm as first_order
from references import normalization
from references.family import INSTANCE_NORM, Operator
from references.second_order import double_backward
from suites import cases, dtypes, error_model
from suites.cases import Case, Inputs
from suites.verdicts import (
    Item,
    Record,
    build_request,
    call_adapter,
    item_inputs,
    problem_record,
    record_comparison,
    to_layout,
    unpack_result,
)
from suites.verdicts import unsupported_reason as first_order_unsupported_reason

QUANTITIES = error_model.SECOND_ORDER_QUANTITIES
# The seeded stream v is drawn from, and its distribution.
DIRECTION_ROLE = "grad_grad_input"
DIRECTION = cases.Normal()
# The second derivatives shaped like x; grad2_gamma has gamma's shape.
X_SHAPED = ("grad2_input", "grad2_grad_output")


def declares(implementation: Implementation) -> bool:
    """Return True if the implementation gets second-order items: it returns
    second derivatives, or it gives the reason it does not."""
    return bool(implementation.second_order or implementation.second_order_reason)


def select_targets(targets: list) -> list:
    """Return the targets (suites.plugin.Target) whose implementation gets
    second-order items, in the order given."""
    return [target for target in targets if declares(target.implementation)]


def quantities_for(case: Case) -> tuple[str, ...]:
    """Return the second-order quantities of the case: no grad2_gamma without
    affine parameters."""
    if case.affine:
        return QUANTITIES
    return tuple(quantity for quantity in QUANTITIES if quantity != "grad2_gamma")


def unposed_reason(case: Case) -> str | None:
    """Return why the case gets no second-order items, or None if it does."""
    if case.large:
        return (
            f"second derivatives are judged on whole inputs, and case {case.name} "
            f"has {case.elements} elements, beyond the {cases.CHUNK_ELEMENTS} of "
            "a whole reference"
        )
    spread = not isinstance(case.x, cases.Constant)
    if spread and case.x.max_abs() >= 2.0**normalization.SAFE_EXPONENT:
        # The first-order reference divides such slices by a power of two and
        # stays exact. The second-order one multiplies by rstd / M and rstd^2,
        # which fall into float64's subnormal range there and lose bits: rstd
        # is about 1e-308 on range-max-float64 and rstd^2 about 1e-309 on
        # squares-overflow-float64. A constant slice has rstd = 1 / sqrt(eps).
        return (
            f"x of case {case.name} reaches 2^{normalization.SAFE_EXPONENT} in "
            "magnitude, where the second derivatives, which scale as rstd^2, lie "
            "in or below float64's subnormal range and the float64 reference "
            "loses precision"
        )
    return None


@functools.lru_cache(maxsize=8)
def direction(case: Case, dtype: str, seed: int) -> np.ndarray:
    """Return the case's direction v in (N, C, *spatial) order, rounded to `dtype`
    and read-only."""
    # The stream is seeded as the case's other inputs are, by seed, case and role.
    rng = cases._stream(seed, case.name, DIRECTION_ROLE)
    values = dtypes.round_to(DIRECTION.generate(rng, case.shape), dtype)
    values.flags.writeable = False
    return values


@dataclasses.dataclass(frozen=True)
class Reference:
    """The exact second derivatives and their error scales, by quantity, in the
    shapes of x (channels-first) and gamma."""

    expected: dict[str, np.ndarray]
    scales: dict[str, np.ndarray]


def reference_from_inputs(
    inputs: Inputs, v: np.ndarray, eps: float, operator: Operator = INSTANCE_NORM
) -> Reference:
    """Return the float64 second derivatives of the operator for these inputs and
    direction, with their scales."""
    shape = inputs.x.shape
    x, gamma, beta, dy = operator.views(
        inputs.x, inputs.gamma, inputs.beta, inputs.grad_output
    )
    v = np.reshape(v, x.shape)
    axes, spans = operator.axes(shape), operator.spans(shape)
    first = first_order.evaluate(x, gamma, beta, dy, eps, axes, spans)
    ones = np.ones(tuple(x.shape[axis] for axis in spans))
    second = double_backward(
        x, ones if gamma is None else gamma, dy, v, eps, axes, spans
    )
    scale = error_model.second_order_scales(x, gamma, dy, v, first, axes, spans)
    parameters = operator.parameter_shape(shape)
    expected = {
        "grad2_input": second.grad_x.reshape(shape),
        "grad2_gamma": second.grad_gamma.reshape(parameters),
        "grad2_grad_output": second.grad_grad_output.reshape(shape),
    }
    scales = {
        name: array.reshape(shape if name in X_SHAPED else parameters)
        for name, array in scale.items()
    }
    return Reference(expected=expected, scales=scales)


@functools.lru_cache(maxsize=8)
def catalogue_reference(
    case: Case,
    dtype: str,
    seed: int,
    eps: float | None = None,
    operator: Operator = INSTANCE_NORM,
) -> Reference:
    """Return reference_from_inputs for the catalogue's inputs and direction of
    (case, dtype, seed), with the case's eps or the eps the framework received.
    Cached so that every implementation and device tested in this dtype shares it."""
    inputs = cases.operator_inputs(case, dtype, seed, operator)
    use_eps = case.eps if eps is None else eps
    return reference_from_inputs(
        inputs, direction(case, dtype, seed), use_eps, operator
    )


def build_second_order_request(item: Item, inputs: Inputs, v: np.ndarray) -> Request:
    """Return the second-order request of the item: the first-order request with
    gradients and the direction v in the case's layout."""
    request = build_request(item, inputs, gradients=True)
    return dataclasses.replace(request, grad_grad_input=to_layout(v, item.case.layout))


def unsupported_reason(
    adapter: object, implementation: Implementation, device: Device, item: Item
) -> str | None:
    """Return why the second-order item cannot run, or None when it runs: the
    implementation has no second derivatives, the first-order item cannot run, or
    the case is not posed for second derivatives. Raises AdapterMethodError as
    suites.verdicts.unsupported_reason does."""
    if not implementation.second_order:
        return implementation.second_order_reason or (
            f"implementation {implementation.name} returns no second derivatives"
        )
    reason = first_order_unsupported_reason(adapter, implementation, device, item)
    return reason or unposed_reason(item.case)


def unsupported_records(item: Item, reason: str) -> list[Record]:
    """Record every second-order quantity of an item that cannot run."""
    return item.unsupported(quantities_for(item.case), reason)


def error_records(item: Item, message: str) -> list[Record]:
    """Record every second-order quantity of an item as `error`."""
    return item.errors(quantities_for(item.case), message)


def run_item(
    adapter: object,
    item: Item,
    inputs: Inputs | None = None,
    v: np.ndarray | None = None,
) -> list[Record]:
    """Run the second-order item through the adapter and return one record per
    quantity. `inputs` and `v` (in (N, C, *spatial) order) replace the
    catalogue's, and the reference is then computed from them."""
    supplied = inputs is not None or v is not None
    if inputs is None:
        inputs = item_inputs(item)
    if v is None:
        v = direction(item.case, item.dtype, item.seed)
    request = build_second_order_request(item, inputs, v)
    quantities = quantities_for(item.case)
    caches = (direction, catalogue_reference)
    result, records = call_adapter(adapter, item, request, quantities, caches)
    if records is not None:
        return records
    return judge_result(item, result, (inputs, v) if supplied else None)


def judge_result(
    item: Item, result: object, supplied: tuple[Inputs, np.ndarray] | None = None
) -> list[Record]:
    """Compare an adapter's second derivatives with the reference: one record per
    quantity. The reference comes from `supplied` (inputs and v) when set, else
    from the catalogue.

    Unlike suites.verdicts.judge_result, results that are NaN throughout get
    `fail`, not `error`. torch 2.13.0 composes its double backward of ops in the
    tested dtype, and in float16 they overflow to NaN on whole inputs (constant
    slices, long slices). That is a numerical result of the framework, not a
    broken adapter, so a deviations entry can record it."""
    case, dtype = item.case, item.dtype
    quantities = quantities_for(case)

    if supplied is None:
        x_shape = case.shape
    else:
        x_shape = supplied[0].x.shape
    unpacked = unpack_result(item, result, quantities, x_shape, "grad2_input")
    if isinstance(unpacked, str):
        return item.errors(quantities, unpacked)
    eps, units, result_dtype = unpacked.eps, unpacked.units, unpacked.result_dtype
    arrays, problems = unpacked.arrays, unpacked.problems

    if supplied is None:
        reference = catalogue_reference(case, dtype, item.seed, eps, item.operator)
    else:
        inputs, v = supplied
        use_eps = case.eps if eps is None else eps
        reference = reference_from_inputs(inputs, v, use_eps, item.operator)

    records = []
    for quantity in quantities:
        if quantity in problems:
            records.append(problem_record(item, quantity, unpacked))
            continue
        comparison = error_model.compare(
            quantity,
            arrays[quantity],
            reference.expected[quantity],
            reference.scales[quantity],
            dtype,
            x_shape,
            units,
            item.operator,
        )
        record = record_comparison(item, quantity, comparison, result_dtype, eps, units)
        record.compute_dtype = result.compute_dtype
        records.append(record)
    return records
