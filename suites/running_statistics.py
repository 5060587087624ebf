"""Running statistics through the suite: the running mean and variance after a
training step, and inference with running statistics.

An item is an (implementation, device, dtype, case, mode) for an implementation
that names its update convention in `running_stats`, or that gives in
`running_stats_reason` why it keeps none (its items are then unsupported). Both
modes hand the adapter the case's inputs and running statistics posed from them
(posed_statistics):

- "training": one training step with momentum MOMENTUM. The running values after
  it are judged against references.running_stats for the implementation's
  convention: `running_mean` and `running_var`.
- "inference": normalization with the posed statistics. The output and the
  gradients of x, gamma and beta are judged against
  references.running_stats.inference: `inference_output`, `inference_grad_input`,
  `inference_grad_gamma` and `inference_grad_beta`.

The scales are error_model.running_scales and inference_scales. Not posed: a case
beyond CHUNK_ELEMENTS elements, as for second derivatives.
"""

from __future__ import annotations

import dataclasses
import functools
import warnings

import numpy as np

from adapters.contract import MODES, Device, Implementation, Request
from references import normalization, running_stats
from references.family import INSTANCE_NORM, Operator
from suites import cases, dtypes, error_model
from suites.cases import Case, Inputs
from suites.verdicts import (
    Item,
    Record,
    array_dtype,
    build_request,
    call_adapter,
    item_inputs,
    problem_record,
    record_comparison,
    unpack_result,
)
from suites.verdicts import unsupported_reason as first_order_unsupported_reason

# The momentum every request carries. Not 0.5, where weighting the new value and
# weighting the old one give the same update and a mixed-up convention would pass.
MOMENTUM = 0.25
# The Result field behind each inference quantity.
FIELDS = {
    "inference_output": "output",
    "inference_grad_input": "grad_input",
    "inference_grad_gamma": "grad_gamma",
    "inference_grad_beta": "grad_beta",
}
# Running statistics posed for a channel that has no finite element.
EMPTY_STATISTICS = (0.0, 1.0)


@dataclasses.dataclass(frozen=True)
class RunningTarget:
    """One running-statistics item: a conformance item's coordinates and a mode."""

    adapter: object
    implementation: Implementation
    device: Device
    item: Item
    mode: str

    @property
    def test_id(self) -> str:
        return f"{self.item.item_id}-{self.mode}"


def declares(implementation: Implementation) -> bool:
    """Return True if the implementation gets running-statistics items: it keeps
    running statistics, or it gives the reason it does not."""
    return bool(implementation.running_stats or implementation.running_stats_reason)


def select_targets(targets: list) -> list[RunningTarget]:
    """Return one RunningTarget per mode for each target (suites.plugin.Target)
    whose implementation gets running-statistics items, in the order given."""
    return [
        RunningTarget(
            target.adapter, target.implementation, target.device, target.item, mode
        )
        for target in targets
        if declares(target.implementation)
        for mode in MODES
    ]


def quantities_for(case: Case, mode: str, gradients: bool = True) -> tuple[str, ...]:
    """Return the quantities of a mode: the running values after a training step,
    or inference's output and, with gradients, its gradients (no parameter
    gradients without affine parameters)."""
    if mode == "training":
        return error_model.RUNNING_QUANTITIES
    if not gradients:
        return ("inference_output",)
    if case.affine:
        return error_model.INFERENCE_QUANTITIES
    return ("inference_output", "inference_grad_input")


def unposed_reason(case: Case, mode: str = "training") -> str | None:
    """Return why the case gets no running-statistics items in `mode`, or None
    if it does."""
    if case.large:
        return (
            f"running statistics are judged on whole inputs, and case {case.name} "
            f"has {case.elements} elements, beyond the {cases.CHUNK_ELEMENTS} of "
            "a whole reference"
        )
    if mode == "inference" and case.x.max_abs() >= 2.0**normalization.SAFE_EXPONENT:
        # Inference divides x - running_mean by sqrt(running_var + eps) for
        # running values of order 1, so xhat is as large as x, and the float64
        # sums of dy * xhat (grad_gamma) and of their squares (its scale)
        # overflow, giving inf - inf = NaN where the exact sum is finite.
        return (
            f"x of case {case.name} reaches 2^{normalization.SAFE_EXPONENT} in "
            "magnitude, and inference with running statistics of order 1 keeps "
            "xhat as large, so the float64 reference's sums of dy * xhat overflow"
        )
    return None


def rejection_rule(case: Case, mode: str) -> tuple[bool, str]:
    """Return (allowed, reason) for a rejection of the case in `mode`.

    A training step computes the batch's statistics, so the case's own rule
    holds. Inference computes none: a one-element slice or a constant slice with
    eps = 0 has a well-defined result there, and only the empty batch may still
    be rejected."""
    if mode == "training" or case.rejection_reason == cases.EMPTY_REASON:
        return case.rejection_allowed, case.rejection_reason
    return False, ""


@functools.lru_cache(maxsize=16)
def posed_statistics(
    case: Case, dtype: str, seed: int, mode: str = "training"
) -> tuple[np.ndarray, np.ndarray]:
    """Return the running mean and variance posed with the case for `mode`, shape
    (C,), rounded to `dtype` and read-only.

    They derive from the case's x, per channel over its finite elements, and sit
    away from the batch's statistics, so that a swapped convention, an update
    never made or inference with the batch's statistics moves a result by more
    than its budget. The mean is the batch's plus half its standard deviation plus
    a quarter of |mean|: on a large mean with a small spread the batch's mean
    carries an error of about u * |mean|, and a running mean a few spreads away
    could not be told from it in float32. The variance is 1.5 times the batch's
    biased variance in a training step, so that an error in the batch's variance
    is not lost beside a large running value. In inference it is that plus
    mean^2 / 4, so that x - running mean, about |mean| / 4, is divided by about
    |mean| / 2 and the results stay near 1.

    A channel without finite elements gets 0 and 1. A zero variance stays zero
    where nothing adds to it (rstd is then 1 / sqrt(eps)), except with eps = 0,
    where it is 1, so that inference has a finite result. Values beyond the
    dtype's range are clipped to it.
    """
    x = normalization.as_float64(cases.materialize(case, dtype, seed).x)
    channels = case.channels
    finite = np.where(np.isfinite(x), x, np.nan)
    axes = normalization.parameter_axes(x.ndim)
    with warnings.catch_warnings(), np.errstate(invalid="ignore", over="ignore"):
        # An empty batch or a channel without finite elements: all-NaN slices.
        warnings.simplefilter("ignore", RuntimeWarning)
        mean = np.nanmean(finite, axis=axes) if x.size else np.full(channels, np.nan)
        variance = np.nanvar(finite, axis=axes) if x.size else np.full(channels, np.nan)
        running_mean = mean + 0.5 * np.sqrt(variance) + 0.25 * np.abs(mean)
        running_var = 1.5 * variance
        if mode == "inference":
            running_var = running_var + 0.25 * mean * mean
    missing = ~np.isfinite(running_mean) | ~np.isfinite(running_var)
    running_mean[missing], running_var[missing] = EMPTY_STATISTICS
    if case.eps == 0.0:
        running_var[running_var == 0.0] = 1.0
    largest = dtypes.MAX_FINITE[dtype]
    posed = []
    for values in (running_mean, running_var):
        rounded = dtypes.round_to(np.clip(values, -largest, largest), dtype)
        rounded.flags.writeable = False
        posed.append(rounded)
    return posed[0], posed[1]


@dataclasses.dataclass(frozen=True)
class Reference:
    """The exact values and their error scales, by quantity."""

    expected: dict[str, np.ndarray]
    scales: dict[str, np.ndarray]


def training_reference(
    x: np.ndarray,
    running_mean: np.ndarray,
    running_var: np.ndarray,
    convention: running_stats.Convention,
    operator: Operator,
    dtype: str,
) -> Reference:
    """Return the running statistics after one training step on x, in
    (N, C, *spatial) order, and their scales. InstanceNorm takes each (n, c)
    slice's statistics and averages them over the batch; BatchNorm takes each
    channel's."""
    step = (
        running_stats.instance_norm_step
        if operator.name == "instance_norm"
        else running_stats.batch_norm_step
    )
    with warnings.catch_warnings(), np.errstate(invalid="ignore", divide="ignore"):
        # An empty batch: the mean of no elements is NaN.
        warnings.simplefilter("ignore", RuntimeWarning)
        updated = step(x, running_mean, running_var, MOMENTUM, convention)
        x = normalization.as_float64(x)
        if operator.name == "instance_norm":
            slice_axes = tuple(range(2, x.ndim))
        else:
            slice_axes = normalization.parameter_axes(x.ndim)
        variance = normalization.statistics(x, 0.0, slice_axes).var
        batch_var = np.mean(variance, axis=normalization.parameter_axes(x.ndim))
        length = normalization.reduction_length(x.shape, slice_axes)
        # One element per slice makes the factor inf: the reference is then NaN.
        factor = (
            np.float64(length) / (length - 1) if convention.unbiased_variance else 1.0
        )
    new_weight = MOMENTUM if convention.momentum_weights_new else 1.0 - MOMENTUM
    scales = error_model.running_scales(
        x, running_mean, running_var, batch_var, new_weight, factor, slice_axes, dtype
    )
    return Reference(
        expected={"running_mean": updated.mean, "running_var": updated.var},
        scales=scales,
    )


def inference_reference(
    inputs: Inputs, running_mean: np.ndarray, running_var: np.ndarray, eps: float
) -> Reference:
    """Return inference's output and gradients with the running statistics, and
    their scales, for inputs in (N, C, *spatial) order."""
    exact = running_stats.inference(
        inputs.x,
        inputs.gamma,
        inputs.beta,
        inputs.grad_output,
        running_mean,
        running_var,
        eps,
    )
    scales = error_model.inference_scales(
        inputs.x,
        inputs.gamma,
        inputs.beta,
        inputs.grad_output,
        running_mean,
        exact,
    )
    expected = {
        quantity: getattr(exact, field)
        for quantity, field in FIELDS.items()
        if getattr(exact, field) is not None
    }
    return Reference(expected=expected, scales=scales)


@functools.lru_cache(maxsize=16)
def catalogue_reference(
    case: Case,
    dtype: str,
    seed: int,
    mode: str,
    convention: str,
    eps: float | None = None,
    operator: Operator = INSTANCE_NORM,
) -> Reference:
    """Return the reference of the mode for the catalogue's inputs and posed
    statistics, with the case's eps or the eps the framework received. Cached so
    that the devices tested in this dtype share it."""
    inputs = cases.operator_inputs(case, dtype, seed, operator)
    running_mean, running_var = posed_statistics(case, dtype, seed, mode)
    if mode == "training":
        return training_reference(
            inputs.x,
            running_mean,
            running_var,
            running_stats.CONVENTIONS[convention],
            operator,
            dtype,
        )
    use_eps = case.eps if eps is None else eps
    return inference_reference(inputs, running_mean, running_var, use_eps)


def build_running_request(
    item: Item,
    inputs: Inputs,
    statistics: tuple[np.ndarray, np.ndarray],
    mode: str,
    gradients: bool,
) -> Request:
    """Return the item's request in `mode`, carrying the running statistics."""
    request = build_request(item, inputs, gradients)
    return dataclasses.replace(
        request,
        mode=mode,
        running_mean=statistics[0],
        running_var=statistics[1],
        momentum=MOMENTUM,
    )


def unsupported_reason(
    adapter: object,
    implementation: Implementation,
    device: Device,
    item: Item,
    mode: str = "training",
) -> str | None:
    """Return why the running-statistics item cannot run, or None when it runs:
    the implementation keeps no running statistics, the first-order item cannot
    run, or the case is not posed. Raises AdapterMethodError as
    suites.verdicts.unsupported_reason does."""
    if not implementation.running_stats:
        return implementation.running_stats_reason or (
            f"implementation {implementation.name} keeps no running statistics"
        )
    reason = first_order_unsupported_reason(adapter, implementation, device, item)
    return reason or unposed_reason(item.case, mode)


def unsupported_records(item: Item, mode: str, reason: str) -> list[Record]:
    """Record every quantity of the mode as unsupported, with the reason."""
    return item.unsupported(quantities_for(item.case, mode), reason)


def error_records(item: Item, mode: str, message: str) -> list[Record]:
    """Record every quantity of the mode as `error`."""
    return item.errors(quantities_for(item.case, mode), message)


def run_item(
    adapter: object, item: Item, implementation: Implementation, mode: str
) -> list[Record]:
    """Run the item in `mode` through the adapter and return one record per
    quantity. An implementation without gradients gets its inference gradients
    recorded as unsupported, with its `gradient_reason`."""
    gradients = implementation.gradients
    inputs = item_inputs(item)
    statistics = posed_statistics(item.case, item.dtype, item.seed, mode)
    request = build_running_request(item, inputs, statistics, mode, gradients)
    quantities = quantities_for(item.case, mode, gradients)

    missing = [
        item.record(
            quantity,
            "unsupported",
            True,
            implementation.gradient_reason
            or f"implementation {implementation.name} returns no gradients",
        )
        for quantity in quantities_for(item.case, mode)
        if quantity not in quantities
    ]
    result, records = call_adapter(
        adapter,
        item,
        request,
        quantities,
        (posed_statistics, catalogue_reference),
        rejection_rule(item.case, mode),
    )
    if records is None:
        records = judge_result(
            item, result, mode, implementation.running_stats, quantities
        )
    return records + missing


def judge_result(
    item: Item,
    result: object,
    mode: str,
    convention: str,
    quantities: tuple[str, ...],
) -> list[Record]:
    """Compare an adapter's result in `mode` with the reference of the catalogue
    case: one record per quantity."""
    case, dtype = item.case, item.dtype
    unpacked = unpack_result(item, result, quantities, case.shape, "output", FIELDS)
    if isinstance(unpacked, str):
        return item.errors(quantities, unpacked)
    reference = catalogue_reference(
        case, dtype, item.seed, mode, convention, unpacked.eps, item.operator
    )
    records = []
    for quantity in quantities:
        if quantity in unpacked.problems:
            records.append(problem_record(item, quantity, unpacked))
            continue
        comparison = error_model.compare(
            quantity,
            unpacked.arrays[quantity],
            reference.expected[quantity],
            reference.scales[quantity],
            dtype,
            case.shape,
            unpacked.units,
            item.operator,
        )
        # The running values may come back in another dtype than the output
        # (float32 for float16 input, say); their record names their own.
        result_dtype = unpacked.result_dtype
        if quantity in error_model.RUNNING_QUANTITIES:
            result_dtype = array_dtype(unpacked.arrays[quantity], dtype) or result_dtype
        record = record_comparison(
            item, quantity, comparison, result_dtype, unpacked.eps, unpacked.units
        )
        record.compute_dtype = result.compute_dtype
        if not record.conforming and mode == "training":
            record.message += convention_hint(
                item, quantity, unpacked.arrays[quantity], convention, unpacked.units
            )
        records.append(record)
    return records


def convention_hint(
    item: Item, quantity: str, got: np.ndarray, declared: str, units: str
) -> str:
    """Return a note naming the other conventions whose update the failing
    running value matches within its budget, or "" when none does."""
    case, dtype = item.case, item.dtype
    matching = []
    for name in running_stats.CONVENTIONS:
        if name == declared:
            continue
        other = catalogue_reference(case, dtype, item.seed, "training", name)
        comparison = error_model.compare(
            quantity,
            got,
            other.expected[quantity],
            other.scales[quantity],
            dtype,
            case.shape,
            units,
            item.operator,
        )
        if comparison.within_budget:
            matching.append(name)
    if not matching:
        return ""
    return (
        f" (the implementation declares the {declared!r} convention; the value "
        f"matches the update of {', '.join(repr(name) for name in matching)})"
    )
