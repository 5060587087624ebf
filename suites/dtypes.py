"""The floating-point dtypes normconf tests, and exact rounding of inputs to them.

NumPy has no bfloat16, so bfloat16 values travel in float32 arrays whose low 16 bits
are zero. Every array handed to an adapter contains values that are exactly
representable in the tested dtype.
"""

from __future__ import annotations

import numpy as np

# Unit roundoff u = 2^-p for a p-bit significand (round to nearest).
UNIT_ROUNDOFF = {
    "float64": 2.0**-53,
    "float32": 2.0**-24,
    "float16": 2.0**-11,
    "bfloat16": 2.0**-8,
}

MAX_FINITE = {
    "float64": float(np.finfo(np.float64).max),
    "float32": float(np.finfo(np.float32).max),
    "float16": float(np.finfo(np.float16).max),
    # (2 - 2^-7) * 2^127
    "bfloat16": float((2.0 - 2.0**-7) * 2.0**127),
}

DTYPES = tuple(UNIT_ROUNDOFF)

# The spacing of each dtype's subnormal numbers: rounding a result below the smallest
# normal number to the dtype may move it by half of this, whatever its magnitude.
SMALLEST_SUBNORMAL = {
    "float64": 2.0**-1074,
    "float32": 2.0**-149,
    "float16": 2.0**-24,
    "bfloat16": 2.0**-133,
}

# The smallest positive normal number of each dtype: 2^(1 - bias).
SMALLEST_NORMAL = {
    "float64": 2.0**-1022,
    "float32": 2.0**-126,
    "float16": 2.0**-14,
    "bfloat16": 2.0**-126,
}

# The smallest float64 magnitude that round_to() turns into an infinity, or None
# where no finite float64 value overflows. For direct rounding to nearest it is the
# largest finite value plus half its spacing, (2 - u) * 2^emax. round_to() rounds to
# bfloat16 through float32, so a value within half a float32 spacing (2^103) below
# bfloat16's own threshold first rounds up to it and then overflows.
OVERFLOW_THRESHOLD = {
    "float64": None,
    "float32": (2.0 - 2.0**-24) * 2.0**127,
    "float16": (2.0 - 2.0**-11) * 2.0**15,
    "bfloat16": (2.0 - 2.0**-8 - 2.0**-24) * 2.0**127,
}

# Formats a framework may compute in, which Result.compute_dtype names: the tested
# dtypes and TensorFloat-32, float32's 8-bit exponent with a 10-bit stored fraction
# (so u = 2^-11), used by tensor-core math modes.
COMPUTE_UNIT_ROUNDOFF = {**UNIT_ROUNDOFF, "tfloat32": 2.0**-11}

# The coarser formats that may set a result's units, by tested dtype. Only a math
# mode of the hardware qualifies: a kernel that computes float32 input in float16 is
# less accurate than float32, and that is what the suite must report.
COARSER_COMPUTE = {"float32": ("tfloat32",)}


def compute_dtype_problem(tested: str, computed: str | None) -> str | None:
    """Return why a declared compute format is not acceptable, or None."""
    if computed is None:
        return None
    if computed not in COMPUTE_UNIT_ROUNDOFF:
        known = ", ".join(COMPUTE_UNIT_ROUNDOFF)
        return f"Result.compute_dtype {computed!r} is not one of {known}"
    coarser = COMPUTE_UNIT_ROUNDOFF[computed] > UNIT_ROUNDOFF[tested]
    if coarser and computed not in COARSER_COMPUTE.get(tested, ()):
        return (
            f"Result.compute_dtype {computed!r} is coarser than the tested {tested}; "
            "only tfloat32 on float32 input may set coarser units"
        )
    return None


def judging_dtype(tested: str, computed: str | None) -> str:
    """Return the dtype whose unit roundoff measures a result's error.

    A result is judged in units of the tested dtype, unless the framework computed
    in a coarser format (float32 input on TF32 tensor cores), whose units apply.
    """
    if computed is None:
        return tested
    if COMPUTE_UNIT_ROUNDOFF[computed] > UNIT_ROUNDOFF[tested]:
        return computed
    return tested


# The NumPy dtype that carries each tested dtype's values exactly.
CONTAINER = {
    "float64": np.float64,
    "float32": np.float32,
    "float16": np.float16,
    "bfloat16": np.float32,
}


def check_dtype(name: str) -> str:
    """Return name if it is a known dtype, else raise ValueError listing known names."""
    if name not in UNIT_ROUNDOFF:
        known = ", ".join(DTYPES)
        raise ValueError(f"unknown dtype {name!r}; known dtypes: {known}")
    return name


def _round_to_bfloat16(values: np.ndarray) -> np.ndarray:
    """Round to the nearest bfloat16, ties to even, returned in a float32 array."""
    single = np.asarray(values, dtype=np.float32)
    bits = single.view(np.uint32).astype(np.uint64)
    tie_breaker = (bits >> 16) & 1
    rounded = ((bits + 0x7FFF + tie_breaker) & 0xFFFF0000).astype(np.uint32)
    result = rounded.view(np.float32).copy()
    nan = np.isnan(single)
    result[nan] = np.float32("nan")
    return result


def round_to(values: np.ndarray, dtype: str) -> np.ndarray:
    """Round float64 values to `dtype`, in that dtype's NumPy container.

    Values beyond the dtype's range become infinities, as a cast does.
    """
    check_dtype(dtype)
    with np.errstate(over="ignore"):
        if dtype == "bfloat16":
            return _round_to_bfloat16(values)
        return np.asarray(values, dtype=CONTAINER[dtype])


def is_representable(values: np.ndarray, dtype: str) -> bool:
    """Return True if every value survives rounding to `dtype` and back unchanged."""
    values = np.asarray(values, dtype=np.float64)
    back = round_to(values, dtype).astype(np.float64)
    return bool(np.array_equal(back, values, equal_nan=True))
