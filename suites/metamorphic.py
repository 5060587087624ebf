"""Relations every correct normalization satisfies, checked by running it twice.

Each relation compares an adapter's results on two inputs, or the parts of one
result, with no float64 reference value in the comparison:

    shift               y(x + c) = y(x); dx, dgamma and dbeta are unchanged too
    scale               with eps = 0, y(a * x) = y(x), dx(a * x) = dx(x) / a
    slice-independence  changing the normalized slice of element (0, 0, ...) leaves
                        every other slice's y and dx, and the parameter gradients
                        that sum no element of it, unchanged
    gradient-sums       per slice, sum(dx) = 0, and with eps = 0 sum(dx * xhat) = 0

A slice is what the operator normalizes together: an (n, c) slice for InstanceNorm,
a channel for BatchNorm, an (n, group) for GroupNorm (here G = 1 of 3 channels, so
a sample) and a sample for LayerNorm (here over its last three axes).

The inputs are multiples of 1/8 below 2 in magnitude, and c and a are powers of two
chosen per dtype, so that x + c and a * x are exact in the tested dtype. The two runs
therefore receive exactly the inputs the relation speaks of. A difference is measured in
units of the dtype's roundoff against the error model's scales of both inputs,
and must stay within the error model's budget for the quantity.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from adapters.contract import Rejected, Request, Result
from references.family import INSTANCE_NORM, Operator
from suites import dtypes, error_model
from suites.cases import Inputs
from suites.verdicts import reference_from_inputs

RELATIONS = ("shift", "scale", "slice-independence", "gradient-sums")
SHAPE = (2, 3, 4, 6)
# The largest power of two c for which k / 8 + c is exact for |k| <= 16: the sum
# needs log2(c) + 4 significant bits.
SHIFT = {"float64": 2.0**40, "float32": 2.0**16, "float16": 2.0**6, "bfloat16": 2.0**3}
# Small enough that a * x has a variance near 1e-5, where an eps raised to 1e-5
# would change y by about a third.
SCALE = 2.0**-8
EPS = 1e-5


@dataclass(frozen=True)
class Outcome:
    """One relation's verdict: its largest normalized difference and the budget.
    `satisfied` is None when the relation could not be checked, with the reason."""

    relation: str
    satisfied: bool | None
    error: float
    budget: float
    message: str


def grid_operator(name: str) -> Operator:
    """Return the operator `name` as the relations pose it on SHAPE."""
    if name == "group_norm":
        return Operator(name, groups=1)
    if name == "layer_norm":
        return Operator(name, normalized_ndim=len(SHAPE) - 1)
    return Operator(name)


def grid_inputs(
    dtype: str, seed: int, operator: Operator = INSTANCE_NORM
) -> dict[str, np.ndarray]:
    """Return x, gamma, beta and dy as multiples of 1/8, exact in every dtype,
    gamma and beta shaped for the operator."""
    rng = np.random.default_rng([seed, 8])
    parameters = operator.parameter_shape(SHAPE)
    arrays = {
        "x": rng.integers(-16, 17, SHAPE) / 8.0,
        "gamma": rng.integers(4, 13, parameters) / 8.0,
        "beta": rng.integers(-8, 9, parameters) / 8.0,
        "grad_output": rng.integers(-16, 17, SHAPE) / 8.0,
    }
    return {name: dtypes.round_to(values, dtype) for name, values in arrays.items()}


def _run(adapter, implementation, device: str, dtype: str, arrays, eps: float):
    operator = grid_operator(implementation.operator)
    request = Request(
        op=operator.name,
        implementation=implementation.name,
        device=device,
        dtype=dtype,
        x=arrays["x"],
        gamma=arrays["gamma"],
        beta=arrays["beta"],
        grad_output=arrays["grad_output"],
        eps=eps,
        affine=True,
        gradients=implementation.gradients,
        groups=operator.groups,
        normalized_ndim=operator.normalized_ndim,
    )
    result = adapter.run(request)
    if not isinstance(result, Result):
        raise TypeError(f"adapter returned {type(result).__name__}, not a Result")
    return result


def _reference(arrays, eps: float, operator: Operator = INSTANCE_NORM):
    """Return the float64 reference of the inputs and its error scales. The
    relations use xhat and the scales only, never the reference's results."""
    inputs = Inputs(
        x=arrays["x"],
        gamma=arrays["gamma"],
        beta=arrays["beta"],
        grad_output=arrays["grad_output"],
    )
    return reference_from_inputs(inputs, eps, operator)


def _worst(
    first: np.ndarray,
    second: np.ndarray,
    scale: np.ndarray,
    dtype: str,
    where: np.ndarray | None = None,
) -> float:
    """Return the largest |first - second| / (scale * u) over `where` (default
    everywhere). A NaN or infinity where the other has a number counts as inf."""
    errors = error_model.normalized_errors(first, second, scale, dtype)
    if where is not None:
        errors = errors[where]
    return float(np.max(errors)) if errors.size else 0.0


def _outcome(
    relation: str, worst: dict[str, float], dtype: str, operator: Operator
) -> Outcome:
    m = error_model.budget_reduction_length("output", SHAPE, operator)
    limits = {
        quantity: error_model.budget(
            quantity,
            dtype,
            error_model.budget_reduction_length(quantity, SHAPE, operator),
        )
        for quantity in worst
    }
    satisfied = all(error <= limits[q] for q, error in worst.items())
    parts = ", ".join(f"{q} {e:.3g} u of {limits[q]:.3g}" for q, e in worst.items())
    message = f"{relation} {_state(satisfied)} (M = {m}): {parts}"
    largest = max(worst, key=lambda q: worst[q] / limits[q])
    return Outcome(relation, satisfied, worst[largest], limits[largest], message)


def _state(satisfied: bool) -> str:
    return "satisfied" if satisfied else "violated"


def _scale_outcome(
    plain, scaled, plain_scale, scaled_inputs, dtype: str, operator: Operator
) -> Outcome:
    """Judge y(a * x) = y(x) and a * dx(a * x) = dx(x) from two runs with eps = 0,
    given the error scales of the unscaled inputs."""
    gradients = plain.grad_input is not None and scaled.grad_input is not None
    _, small_scale = _reference(scaled_inputs, 0.0, operator)
    worst = {
        "output": _worst(
            scaled.output,
            plain.output,
            plain_scale["output"] + small_scale["output"],
            dtype,
        )
    }
    if gradients:
        worst["grad_input"] = _worst(
            np.asarray(scaled.grad_input, np.float64) * SCALE,
            plain.grad_input,
            plain_scale["grad_input"] + small_scale["grad_input"] * SCALE,
            dtype,
        )
    return _outcome("scale", worst, dtype, operator)


def _slice_sums(values: np.ndarray, operator: Operator) -> np.ndarray:
    """Return the sums of an x-shaped array over each normalized slice."""
    view = np.reshape(values, operator.view_shape(SHAPE))
    return np.sum(view, axis=operator.axes(SHAPE))


def _gradient_sums(
    grad_input, expected, scales, dtype: str, with_xhat: bool, operator: Operator
):
    """Judge sum(dx) = 0 per slice, and with `with_xhat` (eps = 0) also
    sum(dx * xhat) = 0. `expected` and `scales` are those of the inputs, with the
    eps the run used."""
    dx = np.asarray(grad_input, dtype=np.float64)
    scale = scales["grad_input"]
    sums = {"grad_input": (_slice_sums(dx, operator), _slice_sums(scale, operator))}
    if with_xhat:
        sums["grad_input * xhat"] = (
            _slice_sums(dx * expected.xhat, operator),
            _slice_sums(scale * np.abs(expected.xhat), operator),
        )
    unit = dtypes.UNIT_ROUNDOFF[dtype]
    length = error_model.budget_reduction_length("grad_input", SHAPE, operator)
    limit = error_model.budget("grad_input", dtype, length)
    worst_error, parts = 0.0, []
    for name, (total, total_scale) in sums.items():
        with np.errstate(divide="ignore", invalid="ignore"):
            error = np.abs(total) / (total_scale * unit)
        value = float(np.max(np.where(np.isfinite(error), error, np.inf)))
        worst_error = max(worst_error, value)
        parts.append(f"sum({name}) {value:.3g} u of {limit:.3g}")
    if not with_xhat:
        parts.append("sum(grad_input * xhat) not checked: eps = 0 was rejected")
    satisfied = worst_error <= limit
    message = f"gradient-sums {_state(satisfied)}: " + ", ".join(parts)
    return Outcome("gradient-sums", satisfied, worst_error, limit, message)


def first_slice(operator: Operator) -> np.ndarray:
    """Return the mask of the elements of an x of SHAPE that the operator
    normalizes together with element (0, 0, ...)."""
    view = operator.view_shape(SHAPE)
    axes = operator.axes(SHAPE)
    mask = np.zeros(view, dtype=bool)
    mask[tuple(slice(None) if axis in axes else 0 for axis in range(len(view)))] = True
    return mask.reshape(SHAPE)


def untouched_parameters(operator: Operator, changed: np.ndarray) -> np.ndarray:
    """Return the mask of the parameter-gradient elements whose sums include no
    changed element of x."""
    view = operator.view_shape(SHAPE)
    spans = operator.spans(SHAPE)
    shared = tuple(axis for axis in range(len(view)) if axis not in spans)
    touched = np.any(changed.reshape(view), axis=shared)
    return ~touched.reshape(operator.parameter_shape(SHAPE))


def check(adapter, implementation, device: str, dtype: str, seed: int = 0):
    """Run every relation for one implementation, device and dtype; return a list
    of Outcome in RELATIONS order."""
    operator = grid_operator(implementation.operator)
    base = grid_inputs(dtype, seed, operator)
    gradients = implementation.gradients
    quantities = error_model.QUANTITIES if gradients else ("output",)
    result = _run(adapter, implementation, device, dtype, base, EPS)
    base_expected, base_scale = _reference(base, EPS, operator)
    outcomes = []

    shifted = dict(base, x=dtypes.round_to(base["x"] + SHIFT[dtype], dtype))
    if not np.array_equal(
        np.asarray(shifted["x"], np.float64) - SHIFT[dtype], base["x"]
    ):
        raise ValueError(f"x + {SHIFT[dtype]:g} is not exact in {dtype}")
    moved = _run(adapter, implementation, device, dtype, shifted, EPS)
    _, shift_scale = _reference(shifted, EPS, operator)
    worst = {
        q: _worst(
            getattr(moved, q),
            getattr(result, q),
            base_scale[q] + shift_scale[q],
            dtype,
        )
        for q in quantities
    }
    outcomes.append(_outcome("shift", worst, dtype, operator))

    scaled_inputs = dict(base, x=dtypes.round_to(base["x"] * SCALE, dtype))
    try:
        plain = _run(adapter, implementation, device, dtype, base, 0.0)
        scaled = _run(adapter, implementation, device, dtype, scaled_inputs, 0.0)
    except Rejected as rejection:
        # The second run may be the one rejected: neither run is used then.
        plain = None
        message = f"scale not checked: the implementation rejects eps = 0 ({rejection})"
        outcomes.append(Outcome("scale", None, 0.0, 0.0, message))
    else:
        plain_expected, plain_scale = _reference(base, 0.0, operator)
        outcomes.append(
            _scale_outcome(plain, scaled, plain_scale, scaled_inputs, dtype, operator)
        )

    changed_slice = first_slice(operator)
    changed_x = np.array(base["x"], dtype=np.float64)
    changed_x[changed_slice] = -changed_x[changed_slice] + 0.5
    changed = dict(base, x=dtypes.round_to(changed_x, dtype))
    other = _run(adapter, implementation, device, dtype, changed, EPS)
    untouched = untouched_parameters(operator, changed_slice)
    worst = {}
    for q in quantities:
        where = ~changed_slice if q in ("output", "grad_input") else untouched
        worst[q] = _worst(
            getattr(other, q), getattr(result, q), 2.0 * base_scale[q], dtype, where
        )
    outcomes.append(_outcome("slice-independence", worst, dtype, operator))

    if gradients:
        # sum(dx * xhat) is 0 only with eps = 0, where sum(xhat^2) = M exactly; with
        # eps > 0 it is rstd * eps / (var + eps) * sum(g * xhat).
        if plain is not None:
            outcome = _gradient_sums(
                plain.grad_input, plain_expected, plain_scale, dtype, True, operator
            )
        else:
            outcome = _gradient_sums(
                result.grad_input, base_expected, base_scale, dtype, False, operator
            )
        outcomes.append(outcome)
    return outcomes
