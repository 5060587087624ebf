"""Run one (implementation, device, dtype, case) item and give each quantity a verdict.

Verdicts:
    pass         within the error budget
    fail         outside the budget, or NaN or infinity where the exact answer is finite
                 (or finite where it is NaN)
    rejected     the framework raised on the input (conforming if the case allows it)
    unsupported  the adapter declares that it does not run this combination
    deviation    a documented, known difference (not produced yet: no deviations file)
    error        the adapter broke: an unexpected exception or a malformed result
"""

from __future__ import annotations

import dataclasses
import functools
import math
import traceback
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from adapters.contract import (
    DEFAULT_MODE,
    Device,
    Implementation,
    Rejected,
    Request,
    Result,
)
from references import instance_norm as reference
from references.family import INSTANCE_NORM, Operator
from suites import dtypes, error_model, isolation
from suites.cases import (
    CHUNK_ELEMENTS,
    Case,
    Inputs,
    materialize,
    operator_inputs,
    sample_chunks,
)

VERDICTS = ("pass", "fail", "rejected", "unsupported", "deviation", "error")
OP = INSTANCE_NORM.name
# The quantities shaped like x, given in the request's layout.
X_SHAPED = (
    "output",
    "grad_input",
    "grad2_input",
    "grad2_grad_output",
    "inference_output",
    "inference_grad_input",
)


@dataclass
class Record:
    """One verdict for one (implementation, device, dtype, case, quantity)."""

    op: str
    framework: str
    implementation: str
    device: str
    dtype: str
    case: str
    quantity: str
    verdict: str
    conforming: bool
    error: float | None
    budget: float | None
    message: str
    # Index of the worst element in (N, C, *spatial) order, whatever the layout.
    worst_index: list[int] | None = None
    got: float | None = None
    expected: float | None = None
    result_dtype: str | None = None
    deviation: int | None = None
    # The eps the reference used when the framework received a rounded one (see
    # Result.eps); None when it received the case's eps.
    eps: float | None = None
    # The format the framework computed in, when its adapter declared it.
    compute_dtype: str | None = None

    @property
    def item_id(self) -> str:
        return "-".join(
            (self.framework, self.implementation, self.device, self.dtype, self.case)
        )


@functools.lru_cache(maxsize=8)
def catalogue_reference(
    case: Case,
    dtype: str,
    seed: int,
    eps: float | None = None,
    operator: Operator = INSTANCE_NORM,
) -> tuple[reference.Expected, dict[str, np.ndarray]]:
    """Return the operator's float64 reference and the error scales for the case's
    inputs rounded to `dtype`, with the case's eps or, when given, the eps the
    framework received.

    Cached so that every implementation and device tested in this dtype shares it.
    A case larger than CHUNK_ELEMENTS has no whole reference: see reference_pieces.
    """
    if case.large:
        raise ValueError(
            f"case {case.name} has {case.elements} elements, more than the "
            f"{CHUNK_ELEMENTS} of a whole reference: use reference_pieces"
        )
    inputs = operator_inputs(case, dtype, seed, operator)
    return reference_from_inputs(inputs, case.eps if eps is None else eps, operator)


# The formats in which a framework's interface may store eps, as ONNX stores its
# attributes in float32. A Result may declare eps rounded to one of them only.
EPS_FORMATS = ("float32", "float16", "bfloat16")


def received_eps(requested: float, declared: object) -> tuple[float | None, str | None]:
    """Check an adapter's declared eps: return (eps to use or None, problem or None).

    None for eps means the request's own value; a declared value equal to it is
    treated the same way.
    """
    if declared is None:
        return None, None
    if not isinstance(declared, (float, int)) or isinstance(declared, bool):
        return None, f"Result.eps is a {type(declared).__name__}, not a float"
    declared = float(declared)
    if declared == requested:
        return None, None
    for name in EPS_FORMATS:
        rounded = float(dtypes.round_to(np.array([requested]), name)[0])
        if declared == rounded:
            return declared, None
    return None, (
        f"Result.eps {declared!r} is not the requested eps {requested!r} rounded to "
        f"any of {', '.join(EPS_FORMATS)}"
    )


def quantities_for(case: Case, gradients: bool) -> tuple[str, ...]:
    """Return the quantities that exist for this case: no parameter gradients without
    affine parameters, and only the output when gradients are not requested."""
    if not gradients:
        return ("output",)
    if not case.affine:
        return ("output", "grad_input")
    return error_model.QUANTITIES


def format_value(value: float | None) -> str:
    if value is None:
        return "none"
    return f"{value:.9g}"


@dataclass(frozen=True)
class Item:
    """The coordinates of one conformance item."""

    framework: str
    implementation: str
    device: str
    dtype: str
    case: Case
    seed: int
    operator: Operator = INSTANCE_NORM
    execution_mode: str = DEFAULT_MODE

    @property
    def label(self) -> str:
        """The implementation's name in test ids and records: `<name>@<mode>`
        outside the default execution mode."""
        if self.execution_mode == DEFAULT_MODE:
            return self.implementation
        return f"{self.implementation}@{self.execution_mode}"

    @property
    def item_id(self) -> str:
        return "-".join(
            (
                self.framework,
                self.label,
                self.device,
                self.dtype,
                self.case.name,
            )
        )

    def record(self, quantity: str, verdict: str, conforming: bool, message: str, **kw):
        return Record(
            op=self.operator.name,
            framework=self.framework,
            implementation=self.label,
            device=self.device,
            dtype=self.dtype,
            case=self.case.name,
            quantity=quantity,
            verdict=verdict,
            conforming=conforming,
            error=kw.pop("error", None),
            budget=kw.pop("budget", None),
            message=message,
            **kw,
        )

    def unsupported(self, quantities: Sequence[str], reason: str) -> list[Record]:
        """Record each quantity as `unsupported` (conforming) with the reason."""
        return [self.record(q, "unsupported", True, reason) for q in quantities]

    def errors(self, quantities: Sequence[str], message: str) -> list[Record]:
        """Record each quantity as `error` (not conforming) with the message."""
        return [self.record(q, "error", False, message) for q in quantities]


class AdapterMethodError(Exception):
    """An adapter method the suite calls for one item raised or returned a value
    the contract does not allow. The message is the item's `error` message."""


def unsupported_records(item: Item, reason: str, gradients: bool) -> list[Record]:
    """Record every quantity of an item that cannot run, with the reason."""
    return item.unsupported(quantities_for(item.case, gradients), reason)


def check_array(
    name: str, array: object, expected_shape: tuple[int, ...]
) -> str | None:
    if array is None:
        return f"{name} is missing (None) from the adapter's result"
    if isinstance(array, isolation.Foreign):
        return f"{name} is a {array.type_name}, not a NumPy array"
    if not isinstance(array, np.ndarray):
        return f"{name} is a {type(array).__name__}, not a NumPy array"
    if array.dtype.kind != "f":
        return f"{name} has dtype {array.dtype}, not a floating-point dtype"
    if array.shape != expected_shape:
        return f"{name} has shape {array.shape}, expected {expected_shape}"
    return None


def reference_from_inputs(
    inputs: Inputs, eps: float, operator: Operator = INSTANCE_NORM
) -> tuple[reference.Expected, dict[str, np.ndarray]]:
    """Return the operator's float64 reference and the error scales for the given
    inputs, in the shapes of x and gamma."""
    shape = inputs.x.shape
    views = operator.views(inputs.x, inputs.gamma, inputs.beta, inputs.grad_output)
    axes, spans = operator.axes(shape), operator.spans(shape)
    expected = reference.evaluate(*views, eps, axes, spans)
    scale = error_model.scales(*views, expected, axes, spans)
    if operator.view_shape(shape) != shape:
        parameters = operator.parameter_shape(shape)
        scale = {
            name: array.reshape(
                shape if array.ndim == len(views[0].shape) else parameters
            )
            for name, array in scale.items()
        }
    return operator.restore(expected, shape), scale


@dataclass(frozen=True)
class Unpacked:
    """An adapter's Result taken apart for judging: the eps and units the
    reference and errors use, the dtype the framework returned, the arrays of the
    quantities that are well formed (x-shaped ones in (N, C, *spatial) order) and
    why each other quantity is not."""

    eps: float | None
    units: str
    result_dtype: str | None
    arrays: dict[str, np.ndarray]
    problems: dict[str, str]


def unpack_result(
    item: Item,
    result: object,
    quantities: tuple[str, ...],
    x_shape: tuple[int, ...],
    dtype_source: str,
    fields: dict[str, str] | None = None,
) -> Unpacked | str:
    """Check an adapter's result against the contract and return its parts, or
    the message that makes every quantity an `error` (not a Result, an eps or
    compute dtype the contract does not allow, a dtype that is not a name).

    `dtype_source` names the Result field whose array shows the returned dtype
    when the adapter declared none. `fields` maps a quantity to the Result field
    that holds it, where the two names differ.
    """
    fields = fields or {}
    case, dtype = item.case, item.dtype
    if not isinstance(result, Result):
        kind = (
            result.type_name
            if isinstance(result, isolation.Foreign)
            else type(result).__name__
        )
        return f"adapter returned {kind}, not a Result"

    eps, problem = received_eps(case.eps, result.eps)
    if problem is None:
        problem = dtypes.compute_dtype_problem(dtype, result.compute_dtype)
    if problem is not None:
        return problem
    units = dtypes.judging_dtype(dtype, result.compute_dtype)
    result_dtype = result.dtype or array_dtype(getattr(result, dtype_source), dtype)
    if result_dtype is not None and not isinstance(result_dtype, str):
        # A NumPy dtype, or a framework's dtype object, in place of its name.
        name = getattr(result_dtype, "name", None)
        if not isinstance(name, str):
            return f"Result.dtype is {result_dtype!r}, not a dtype name"
        result_dtype = name

    problems: dict[str, str] = {}
    arrays: dict[str, np.ndarray] = {}
    for quantity in quantities:
        x_shaped = quantity in X_SHAPED
        shape = (
            layout_shape(x_shape, case.layout)
            if x_shaped
            else item.operator.parameter_shape(x_shape)
        )
        got = getattr(result, fields.get(quantity, quantity))
        problem = check_array(fields.get(quantity, quantity), got, shape)
        if problem is None and result_dtype is not None and result_dtype != dtype:
            problem = f"the framework returned {result_dtype} for a {dtype} input"
        if problem is not None:
            problems[quantity] = problem
        else:
            arrays[quantity] = from_layout(got, case.layout) if x_shaped else got
    return Unpacked(eps, units, result_dtype, arrays, problems)


def problem_record(item: Item, quantity: str, unpacked: Unpacked) -> Record:
    """Return the `error` record of a quantity whose array is malformed."""
    return item.record(
        quantity,
        "error",
        False,
        unpacked.problems[quantity],
        result_dtype=unpacked.result_dtype,
    )


def judge_result(
    item: Item, result: object, gradients: bool, inputs: Inputs | None = None
) -> list[Record]:
    """Compare an adapter's result with the reference: one record per quantity.

    The reference is computed from `inputs` when given (a replay bundle's arrays,
    in (N, C, *spatial) order), otherwise from the catalogue case and seed.
    """
    case, dtype = item.case, item.dtype
    quantities = quantities_for(case, gradients)
    x_shape = case.shape if inputs is None else inputs.x.shape
    unpacked = unpack_result(item, result, quantities, x_shape, "output")
    if isinstance(unpacked, str):
        return item.errors(quantities, unpacked)
    eps, units, result_dtype = unpacked.eps, unpacked.units, unpacked.result_dtype
    arrays, problems = unpacked.arrays, unpacked.problems
    # Arrays that are NaN throughout are an error, not a numerical failure, when
    # every exact value is finite. The loop over the pieces checks that.
    all_nan = len(arrays) == len(quantities) and all(
        array.size and np.all(np.isnan(array)) for array in arrays.values()
    )

    comparisons: dict[str, error_model.Comparison] = {}
    parameter_sums: dict[str, list[np.ndarray]] = {}
    whole_scales: dict[str, np.ndarray] = {}
    exact_finite = True
    pieces = 0
    for start, stop, expected, scale in reference_pieces(item, eps, inputs):
        pieces += 1
        for quantity in quantities:
            exact = getattr(expected, quantity)
            if all_nan:
                exact_finite = exact_finite and bool(np.all(np.isfinite(exact)))
            if quantity not in arrays:
                continue
            if quantity in ("grad_gamma", "grad_beta"):
                # Sums over the batch: one piece's share of the exact value and
                # of its scale's parts, added up below.
                parts = [exact, scale[f"{quantity}_sum"], scale[f"{quantity}_squares"]]
                earlier = parameter_sums.get(quantity)
                if earlier is not None:
                    parameter_sums[quantity] = [
                        total + part for total, part in zip(earlier, parts, strict=True)
                    ]
                else:
                    parameter_sums[quantity] = parts
                    whole_scales[quantity] = scale[quantity]
                continue
            comparison = error_model.compare(
                quantity,
                arrays[quantity][start:stop],
                exact,
                scale[quantity],
                dtype,
                x_shape,
                units,
                item.operator,
            )
            if comparison.index is not None and start:
                index = (comparison.index[0] + start, *comparison.index[1:])
                comparison = dataclasses.replace(comparison, index=index)
            best = comparisons.get(quantity)
            # The first worst element, as one comparison of the whole array finds.
            if best is None or comparison.error > best.error:
                comparisons[quantity] = comparison
    for quantity, (exact, total, squares) in parameter_sums.items():
        # One piece's own scale is the whole batch's; several pieces' parts make it.
        scale_of = (
            whole_scales[quantity]
            if pieces == 1
            else error_model.parameter_scale(total, squares)
        )
        comparisons[quantity] = error_model.compare(
            quantity,
            arrays[quantity],
            exact,
            scale_of,
            dtype,
            x_shape,
            units,
            item.operator,
        )

    if all_nan and exact_finite:
        message = (
            "every element of every returned quantity is NaN where every exact value "
            "is finite: the backend returned no numbers"
        )
        return [
            item.record(q, "error", False, message, result_dtype=result_dtype)
            for q in quantities
        ]
    records = []
    for quantity in quantities:
        if quantity in problems:
            records.append(problem_record(item, quantity, unpacked))
            continue
        record = record_comparison(
            item, quantity, comparisons[quantity], result_dtype, eps, units
        )
        record.compute_dtype = result.compute_dtype
        records.append(record)
    return records


def reference_pieces(item: Item, eps: float | None, inputs: Inputs | None = None):
    """Yield (start, stop, expected, scale): the float64 reference and error scales
    for samples start to stop of the item's inputs (`inputs`, or the catalogue's).

    Inputs within CHUNK_ELEMENTS are one piece, the whole batch, and the
    catalogue's come from the shared cache. A larger input comes a group of
    samples at a time (suites.cases.sample_chunks), computed afresh for each item:
    its whole float64 reference would take gigabytes. Every (n, c) slice lies in
    one piece, so each output and grad_input element equals the one the whole
    computation gives. The pieces' grad_gamma and grad_beta, and the parts of
    their scales, are partial sums over their samples.
    """
    case, operator = item.case, item.operator
    use_eps = case.eps if eps is None else eps
    if inputs is None and not case.large:
        expected, scale = catalogue_reference(
            case, item.dtype, item.seed, eps, operator
        )
        yield 0, case.shape[0], expected, scale
        return
    if 0 in operator.axes(case.shape):
        raise ValueError(
            f"{operator.name} reduces over the batch, so its reference cannot come "
            "a group of samples at a time"
        )
    if inputs is None:
        inputs = operator_inputs(case, item.dtype, item.seed, operator)
    for start, stop in sample_chunks(inputs.x.shape):
        if (start, stop) == (0, inputs.x.shape[0]):
            piece = inputs
        else:
            piece = dataclasses.replace(
                inputs,
                x=inputs.x[start:stop],
                grad_output=inputs.grad_output[start:stop],
            )
        yield start, stop, *reference_from_inputs(piece, use_eps, operator)


def array_dtype(array: object, dtype: str) -> str | None:
    """Return the dtype a result array shows when the adapter declared none: its
    NumPy dtype, except that a float32 array is bfloat16's container."""
    if not isinstance(array, np.ndarray) or array.dtype.name not in dtypes.DTYPES:
        return None
    if dtype == "bfloat16" and array.dtype == np.float32:
        return None
    return array.dtype.name


def record_comparison(
    item: Item,
    quantity: str,
    comparison: error_model.Comparison,
    result_dtype,
    eps: float | None = None,
    units: str | None = None,
) -> Record:
    verdict = "pass" if comparison.within_budget else "fail"
    if comparison.index is None:
        message = f"{quantity}: empty, nothing to compare"
    else:
        where = ", ".join(str(i) for i in comparison.index)
        if item.case.layout == "channels_last" and quantity in X_SHAPED:
            # Indexes are in (N, C, *spatial) order, whatever the layout.
            where += " in (N, C, ...) order"
        relation = "<=" if comparison.within_budget else ">"
        error_text = (
            "a non-finite mismatch"
            if comparison.nonfinite_mismatch
            else f"{comparison.error:.3g} u"
        )
        message = (
            f"{quantity}: worst element [{where}]: got {format_value(comparison.got)}, "
            f"expected {format_value(comparison.expected)}, error {error_text} "
            f"{relation} budget {comparison.budget:.3g} u of {units or item.dtype}"
        )
    if eps is not None:
        message += f" (reference with eps {eps!r}, as the framework stores it)"
    return item.record(
        quantity,
        verdict,
        verdict == "pass",
        message,
        error=comparison.error,
        budget=comparison.budget,
        worst_index=list(comparison.index) if comparison.index is not None else None,
        got=comparison.got,
        expected=comparison.expected,
        result_dtype=result_dtype,
        eps=eps,
    )


def layout_shape(shape: tuple[int, ...], layout: str) -> tuple[int, ...]:
    """Return the shape an x-shaped array of `shape` has in `layout`."""
    if layout == "channels_first":
        return tuple(shape)
    return (shape[0], *shape[2:], shape[1])


def to_layout(array: np.ndarray, layout: str) -> np.ndarray:
    """Return x-shaped `array` in `layout` as a read-only contiguous array."""
    if layout == "channels_first":
        return array
    moved = np.ascontiguousarray(np.moveaxis(array, 1, -1))
    moved.flags.writeable = False
    return moved


def from_layout(array: np.ndarray, layout: str) -> np.ndarray:
    """Return an x-shaped array given in `layout` as (N, C, *spatial)."""
    if layout == "channels_first":
        return array
    return np.moveaxis(array, -1, 1)


def item_inputs(item: Item) -> Inputs:
    """Return the catalogue inputs of the item, with gamma and beta shaped for its
    operator (shared through suites.cases.materialize's cache)."""
    return operator_inputs(item.case, item.dtype, item.seed, item.operator)


def build_request(item: Item, inputs: Inputs, gradients: bool) -> Request:
    layout = item.case.layout
    return Request(
        op=item.operator.name,
        implementation=item.implementation,
        device=item.device,
        dtype=item.dtype,
        x=to_layout(inputs.x, layout),
        gamma=inputs.gamma,
        beta=inputs.beta,
        grad_output=to_layout(inputs.grad_output, layout),
        eps=item.case.eps,
        affine=item.case.affine,
        gradients=gradients,
        layout=layout,
        groups=item.operator.groups,
        normalized_ndim=item.operator.normalized_ndim,
        execution_mode=item.execution_mode,
    )


def unsupported_reason(
    adapter: object, implementation: Implementation, device: Device, item: Item
) -> str | None:
    """Return why the item cannot run (an absent device, or a layout, dtype or
    device limit the adapter declares), or None when it runs."""
    unfit = item.case.unfit_reason(item.dtype) or item.case.unposed_reason(
        item.operator
    )
    if unfit is not None:
        return unfit
    if not device.available:
        return device.reason or f"device {device.name} is not available"
    if item.case.layout not in implementation.layouts:
        layouts = ", ".join(implementation.layouts)
        return (
            f"implementation {implementation.name} accepts {layouts} input only, "
            f"not {item.case.layout}"
        )
    reason = declared_reason(
        adapter, "unsupported_reason", item.implementation, item.device, item.dtype
    )
    if reason is None and item.execution_mode != DEFAULT_MODE:
        reason = declared_reason(
            adapter,
            "execution_mode_reason",
            item.implementation,
            item.execution_mode,
            item.device,
            item.dtype,
        )
    return reason


def declared_reason(adapter: object, method: str, *arguments: str) -> str | None:
    """Return what the adapter's optional `method` says about the arguments: a
    reason, or None (also when the adapter has no such method)."""
    declared = getattr(adapter, method, None)
    if declared is None:
        return None
    try:
        reason = declared(*arguments)
    except Exception as error:  # noqa: BLE001 - the item's verdict is error
        raise AdapterMethodError(
            f"the adapter's {method}() raised {type(error).__name__}: {error}"
        ) from error
    if reason is not None and not isinstance(reason, str):
        raise AdapterMethodError(
            f"the adapter's {method}() returned {reason!r}, not a string or None"
        )
    return reason or None


def error_records(item: Item, message: str, gradients: bool) -> list[Record]:
    """Record every quantity of an item as `error` with the message."""
    return item.errors(quantities_for(item.case, gradients), message)


def run_item(
    adapter: object,
    item: Item,
    implementation: Implementation,
    inputs: Inputs | None = None,
) -> list[Record]:
    """Run the item through the adapter and return one record per quantity.

    With `inputs` (in (N, C, *spatial) order), the adapter receives those arrays and
    the reference is computed from them. Without, both come from the catalogue case
    and seed. An implementation without gradients gets its gradient quantities
    recorded as unsupported, with its `gradient_reason`.
    """
    gradients = implementation.gradients
    records = []
    if not gradients:
        reason = implementation.gradient_reason or (
            f"implementation {implementation.name} returns no gradients"
        )
        gradient_quantities = [
            quantity
            for quantity in quantities_for(item.case, True)
            if quantity != "output"
        ]
        records = item.unsupported(gradient_quantities, reason)
    return _run(adapter, item, gradients, inputs) + records


def _run(
    adapter: object, item: Item, gradients: bool, given: Inputs | None
) -> list[Record]:
    inputs = given
    if inputs is None:
        inputs = item_inputs(item)
    request = build_request(item, inputs, gradients)
    quantities = quantities_for(item.case, gradients)
    result, records = call_adapter(adapter, item, request, quantities)
    if records is not None:
        return records
    return judge_result(item, result, gradients, given)


def call_adapter(
    adapter: object,
    item: Item,
    request: Request,
    quantities: tuple[str, ...],
    caches: tuple = (),
    rejection: tuple[bool, str] | None = None,
) -> tuple[object, list[Record] | None]:
    """Run the request through the adapter. Returns (result, None), or (None, one
    record per quantity) when the adapter raised, its worker failed, or it changed
    an input in place. In that last case the input caches are cleared, with the
    further functools caches `caches`. `rejection` (allowed, reason) replaces the
    case's own rule for a rejection, for a request that poses another question
    of the same input."""
    # An isolated adapter's worker checks its own copy of the inputs; here the
    # adapter works on the cached arrays, which every later item shares.
    in_process = not isinstance(adapter, isolation.IsolatedAdapter)
    before = isolation.input_snapshot(request) if in_process else None
    if rejection is None:
        rejection = (item.case.rejection_allowed, item.case.rejection_reason)
    try:
        result = adapter.run(request)
    except Rejected as refusal:
        allowed, reason = rejection
        if allowed:
            note = f"rejection allowed: {reason}"
        else:
            note = "rejection not allowed: this input has a well-defined answer"
        message = f"{refusal} [{note}]"
        return None, [item.record(q, "rejected", allowed, message) for q in quantities]
    except isolation.WorkerFailure as failure:
        return None, item.errors(quantities, str(failure))
    except Exception as crash:  # noqa: BLE001 - any adapter failure is a verdict
        last = traceback.extract_tb(crash.__traceback__)[-1]
        message = (
            f"adapter raised {type(crash).__name__}: {crash} "
            f"(at {last.filename}:{last.lineno})"
        )
        return None, item.errors(quantities, message)

    if before is not None:
        current = {name: getattr(request, name) for name in before}
        changed = isolation.changed_inputs_message(current, before)
        if changed is not None:
            # Later items must not see the changed arrays: drop the caches.
            for cache in (materialize, catalogue_reference, *caches):
                cache.cache_clear()
            return None, item.errors(quantities, changed)
    return result, None


def json_number(value: float | None) -> float | str | None:
    """Return value as strict JSON allows: non-finite floats become strings."""
    if value is None or math.isfinite(value):
        return value
    if math.isnan(value):
        return "NaN"
    return "Infinity" if value > 0 else "-Infinity"
