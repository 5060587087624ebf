"""The InstanceNorm case catalogue: named, seeded, reproducible inputs.

A case fixes the shape (always given as (N, C, *spatial)), eps, the affine flag, the
layout the framework receives x in, and a generator for each input. It does not fix
a dtype: the suite rounds the generated float64 values to each tested dtype, and
the reference computes from those rounded values. Random streams are seeded from the run
seed and the case name, so a case's inputs do not depend on which other cases run.
"""

from __future__ import annotations

import functools
import zlib
from dataclasses import dataclass

import numpy as np

from references.family import Operator
from suites import dtypes


class Generator:
    """Makes one float64 input array from a seeded random stream."""

    # True when drawing consecutive pieces of the array from one stream gives the
    # same values as drawing it whole, so that a large input can be generated a
    # group of samples at a time (tests/test_cases.py checks it).
    in_pieces = False

    def generate(self, rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
        raise NotImplementedError

    def max_abs(self) -> float:
        """Return an upper bound on |value|, used to drop cases a dtype cannot hold."""
        raise NotImplementedError


# The maximum number of elements of an input that the suite handles as one float64
# array: 2^20, 8 MiB in float64. A larger input is generated, summarized and judged
# a group of samples at a time (see sample_chunks), so its float64 arrays stay
# about this size. Every case but the 2^26-element one is within it.
CHUNK_ELEMENTS = 2**20


def sample_chunks(shape: tuple[int, ...], limit: int | None = None):
    """Yield (start, stop) ranges of samples (axis 0) that cover an array of this
    shape, each of at most `limit` elements (default CHUNK_ELEMENTS), or of one
    sample where a sample alone is larger. An array within the limit, an empty one
    included, is the one range (0, N)."""
    limit = CHUNK_ELEMENTS if limit is None else limit
    samples = shape[0]
    per_sample = int(np.prod(shape[1:], dtype=np.int64))
    if samples * per_sample <= limit:
        yield 0, samples
        return
    step = max(1, limit // per_sample)
    for start in range(0, samples, step):
        yield start, min(start + step, samples)


@dataclass(frozen=True)
class Normal(Generator):
    loc: float = 0.0
    scale: float = 1.0
    in_pieces = True

    def generate(self, rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
        return rng.normal(self.loc, self.scale, size=shape)

    def max_abs(self) -> float:
        # Seven standard deviations: a float64 normal sample beyond that is rarer
        # than 1e-11 per element.
        return abs(self.loc) + 7.0 * self.scale


@dataclass(frozen=True)
class Uniform(Generator):
    low: float
    high: float
    in_pieces = True

    def generate(self, rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
        return rng.uniform(self.low, self.high, size=shape)

    def max_abs(self) -> float:
        return max(abs(self.low), abs(self.high))


@dataclass(frozen=True)
class Constant(Generator):
    value: float
    in_pieces = True

    def generate(self, rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
        return np.full(shape, self.value, dtype=np.float64)

    def max_abs(self) -> float:
        return abs(self.value)


@dataclass(frozen=True)
class WithConstantSlice(Generator):
    """Draws from `base`, then sets the (n, c) slice `index` to `value` throughout."""

    base: Generator
    value: float
    index: tuple[int, int] = (0, 1)

    def generate(self, rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
        values = self.base.generate(rng, shape)
        if values.size:
            values[self.index] = self.value
        return values

    def max_abs(self) -> float:
        return max(self.base.max_abs(), abs(self.value))


@dataclass(frozen=True)
class WithElement(Generator):
    """Draws from `base`, then sets the one element at `index` to `value`, which
    may be NaN or infinite."""

    base: Generator
    value: float
    index: tuple[int, ...]

    def generate(self, rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
        values = self.base.generate(rng, shape)
        values[self.index] = self.value
        return values

    def max_abs(self) -> float:
        # Non-finite values survive rounding to every dtype, so only the finite
        # ones bound the range a dtype must hold.
        if not np.isfinite(self.value):
            return self.base.max_abs()
        return max(self.base.max_abs(), abs(self.value))


@dataclass(frozen=True)
class Pattern(Generator):
    """Repeats `values` along every (n, c) slice in order (the flattened spatial
    axes), plus channel c's entry of `channel_offsets` (none: 0). Draws nothing, so
    a reported input can be written down exactly."""

    values: tuple[float, ...]
    channel_offsets: tuple[float, ...] = ()

    def generate(self, rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
        spatial = shape[2:]
        length = int(np.prod(spatial, dtype=np.int64))
        pattern = np.resize(np.asarray(self.values, dtype=np.float64), length)
        values = np.broadcast_to(pattern.reshape(spatial), shape).copy()
        if self.channel_offsets and shape[0]:
            offsets = np.asarray(self.channel_offsets, dtype=np.float64)
            values += offsets.reshape((1, -1) + (1,) * len(spatial))
        return values

    def max_abs(self) -> float:
        largest = max(abs(value) for value in self.values)
        return largest + max((abs(o) for o in self.channel_offsets), default=0.0)


@dataclass(frozen=True)
class SignedUniform(Generator):
    """Magnitudes drawn uniformly from [low, high] with random signs."""

    low: float
    high: float

    def generate(self, rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
        magnitudes = rng.uniform(self.low, self.high, size=shape)
        return np.where(rng.random(size=shape) < 0.5, -magnitudes, magnitudes)

    def max_abs(self) -> float:
        return max(abs(self.low), abs(self.high))


@dataclass(frozen=True)
class PerChannelNormal(Generator):
    """Normal values with mean `loc` and channel c's standard deviation
    `scales[c]`."""

    scales: tuple[float, ...]
    loc: float = 0.0

    def generate(self, rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
        values = rng.normal(size=shape)
        scales = np.asarray(self.scales, dtype=np.float64)
        return self.loc + values * scales.reshape((1, -1) + (1,) * (len(shape) - 2))

    def max_abs(self) -> float:
        return abs(self.loc) + 7.0 * max(self.scales)


DEFAULT_X = Normal()
DEFAULT_GAMMA = Uniform(0.5, 1.5)
DEFAULT_BETA = Normal(0.0, 0.5)
DEFAULT_GRAD_OUTPUT = Normal()


@dataclass(frozen=True)
class Case:
    """One catalogue entry.

    `rejection_allowed` is True if a framework that raises on this input still
    conforms, and `rejection_reason` gives the reason.

    Every operator of the family runs every case. `groups` is GroupNorm's group
    count (default: the smallest divisor of C between 1 and C, else 1) and
    `normalized_ndim` LayerNorm's number of normalized axes (default: all but the
    batch axis). The descriptions speak of InstanceNorm's (n, c) slices.
    """

    name: str
    group: str
    description: str
    shape: tuple[int, ...]
    eps: float = 1e-5
    affine: bool = True
    x: Generator = DEFAULT_X
    gamma: Generator = DEFAULT_GAMMA
    beta: Generator = DEFAULT_BETA
    grad_output: Generator = DEFAULT_GRAD_OUTPUT
    rejection_allowed: bool = False
    rejection_reason: str = ""
    layout: str = "channels_first"
    # The dtypes the case is posed in, and why not in the others.
    posed_in: tuple[str, ...] = dtypes.DTYPES
    posed_reason: str = ""
    groups: int | None = None
    normalized_ndim: int | None = None

    @property
    def channels(self) -> int:
        return self.shape[1]

    def operator(self, name: str) -> Operator:
        """Return the operator `name` configured for this case."""
        if name == "group_norm":
            groups = self.groups
            if groups is None:
                divisors = [
                    g for g in range(2, self.channels) if self.channels % g == 0
                ]
                groups = divisors[0] if divisors else 1
            return Operator(name, groups=groups)
        if name == "layer_norm":
            ndim = self.normalized_ndim or len(self.shape) - 1
            return Operator(name, normalized_ndim=ndim)
        return Operator(name)

    def unposed_reason(self, operator: Operator) -> str | None:
        """Return why the case is not posed for the operator, or None if it is."""
        if operator.name == "layer_norm" and self.layout != "channels_first":
            return (
                "LayerNorm normalizes the trailing axes of the (N, C, *spatial) "
                "array, so the suite poses it in channels_first only"
            )
        if self.large and 0 in operator.axes(self.shape):
            return (
                f"{operator.name} reduces over the batch, and the suite judges a "
                f"case beyond {CHUNK_ELEMENTS} elements a group of samples at a time"
            )
        return None

    @property
    def reduction_length(self) -> int:
        """M, the number of elements in one (n, c) slice."""
        return int(np.prod(self.shape[2:], dtype=np.int64))

    def largest_input(self) -> float:
        """Return an upper bound on the magnitude of every generated value."""
        generators = (self.x, self.gamma, self.beta, self.grad_output)
        return max(generator.max_abs() for generator in generators)

    def fits(self, dtype: str) -> bool:
        """Return True if every generated value is finite in `dtype`."""
        return self.largest_input() < dtypes.MAX_FINITE[dtype]

    @property
    def elements(self) -> int:
        """The number of elements of x."""
        return int(np.prod(self.shape, dtype=np.int64))

    @property
    def large(self) -> bool:
        """True when x has more than CHUNK_ELEMENTS elements, so that the suite
        works on it a group of samples at a time."""
        return self.elements > CHUNK_ELEMENTS

    def unfit_reason(self, dtype: str) -> str | None:
        """Return why the case cannot be posed in `dtype`, or None if it can."""
        if dtype not in self.posed_in:
            return (
                f"case {self.name} is posed in {', '.join(self.posed_in)} only: "
                f"{self.posed_reason}"
            )
        if self.fits(dtype):
            return None
        return (
            f"case {self.name} has inputs up to {self.largest_input():.3g}, beyond "
            f"{dtype}'s largest finite value {dtypes.MAX_FINITE[dtype]:.5g}"
        )


@dataclass(frozen=True)
class Inputs:
    """One case's inputs, rounded to the tested dtype (see suites.dtypes.CONTAINER)."""

    x: np.ndarray
    gamma: np.ndarray | None
    beta: np.ndarray | None
    grad_output: np.ndarray


def _stream(seed: int, case_name: str, role: str) -> np.random.Generator:
    key = [seed, zlib.crc32(case_name.encode()), zlib.crc32(role.encode())]
    return np.random.default_rng(key)


def generate_float64(
    case: Case, seed: int, parameter_shape: tuple[int, ...] | None = None
) -> dict[str, np.ndarray]:
    """Draw the case's float64 inputs, one independent stream per input. gamma and
    beta have shape (C,), or `parameter_shape` when given (LayerNorm)."""
    parameters = parameter_shape or (case.channels,)
    return {
        "x": case.x.generate(_stream(seed, case.name, "x"), case.shape),
        "gamma": case.gamma.generate(_stream(seed, case.name, "gamma"), parameters),
        "beta": case.beta.generate(_stream(seed, case.name, "beta"), parameters),
        "grad_output": case.grad_output.generate(
            _stream(seed, case.name, "grad_output"), case.shape
        ),
    }


@functools.lru_cache(maxsize=4)
def _cached_float64(
    case: Case, seed: int, parameter_shape: tuple[int, ...] | None = None
) -> dict[str, np.ndarray]:
    """generate_float64 for a case within CHUNK_ELEMENTS, kept while the items
    of its dtypes run one after another (suites.plugin orders them so)."""
    raw = generate_float64(case, seed, parameter_shape)
    for array in raw.values():
        array.flags.writeable = False
    return raw


def _generate_rounded(
    generator: Generator, rng: np.random.Generator, shape: tuple, dtype: str
) -> np.ndarray:
    """Draw one x-shaped input and round it to `dtype`, a group of samples at a
    time when it can be drawn in pieces, so that its float64 values never exist
    whole. The values equal those of one whole draw."""
    if not generator.in_pieces:
        return dtypes.round_to(generator.generate(rng, shape), dtype)
    rounded = np.empty(shape, dtype=dtypes.CONTAINER[dtype])
    for start, stop in sample_chunks(shape):
        piece = generator.generate(rng, (stop - start, *shape[1:]))
        rounded[start:stop] = dtypes.round_to(piece, dtype)
    return rounded


@functools.lru_cache(maxsize=8)
def materialize(
    case: Case, dtype: str, seed: int, parameter_shape: tuple[int, ...] | None = None
) -> Inputs:
    """Return the case's inputs rounded to `dtype` (gamma = beta = None for affine off),
    gamma and beta of shape (C,) or `parameter_shape`.

    The arrays are shared between callers through the cache: treat them as read-only.
    """
    if case.large:
        channels = parameter_shape or (case.channels,)
        rounded = {
            name: _generate_rounded(
                getattr(case, name), _stream(seed, case.name, name), case.shape, dtype
            )
            for name in ("x", "grad_output")
        }
        for name in ("gamma", "beta"):
            generator = getattr(case, name)
            values = generator.generate(_stream(seed, case.name, name), channels)
            rounded[name] = dtypes.round_to(values, dtype)
    else:
        raw = _cached_float64(case, seed, parameter_shape)
        rounded = {name: dtypes.round_to(values, dtype) for name, values in raw.items()}
    for array in rounded.values():
        array.flags.writeable = False
    return Inputs(
        x=rounded["x"],
        gamma=rounded["gamma"] if case.affine else None,
        beta=rounded["beta"] if case.affine else None,
        grad_output=rounded["grad_output"],
    )


def operator_inputs(case: Case, dtype: str, seed: int, operator: Operator) -> Inputs:
    """Return materialize's inputs with gamma and beta shaped for the operator; the
    operators with per-channel parameters share one cache entry."""
    shape = operator.parameter_shape(case.shape)
    return materialize(case, dtype, seed, None if shape == (case.channels,) else shape)


M1_REASON = (
    "a one-element slice has zero variance, so normalizing it carries no information"
)
EPS0_CONSTANT_REASON = "eps = 0 on a constant slice is 0/0; the exact answer is NaN"
EMPTY_REASON = "an empty batch has no slices, so rejecting it loses no result"

CATALOGUE: tuple[Case, ...] = (
    Case("random-1d", "shape", "normal x, spatial rank 1", (2, 3, 17)),
    Case("random-2d", "shape", "normal x, spatial rank 2", (2, 3, 5, 7)),
    Case("random-3d", "shape", "normal x, spatial rank 3", (2, 2, 3, 4, 5)),
    Case(
        "channels-last-1d",
        "layout",
        "normal x handed over as (N, L, C)",
        (2, 3, 17),
        layout="channels_last",
    ),
    Case(
        "channels-last-2d",
        "layout",
        "normal x handed over as (N, H, W, C)",
        (2, 3, 5, 7),
        layout="channels_last",
    ),
    Case(
        "channels-last-3d",
        "layout",
        "normal x handed over as (N, D, H, W, C)",
        (2, 2, 3, 4, 5),
        layout="channels_last",
    ),
    Case(
        "channels-last-batch-of-one",
        "layout",
        "one sample of normal x handed over as (N, H, W, C)",
        (1, 3, 4, 5),
        layout="channels_last",
    ),
    Case(
        "channels-last-large-mean-2d",
        "layout",
        "offset 1e4, unit spread, handed over as (N, H, W, C)",
        (2, 3, 16, 16),
        x=Normal(1e4, 1.0),
        layout="channels_last",
    ),
    Case(
        "channels-last-large-mean-3d",
        "layout",
        "offset 1e4, unit spread, handed over as (N, D, H, W, C)",
        (2, 3, 4, 8, 8),
        x=Normal(1e4, 1.0),
        layout="channels_last",
    ),
    Case(
        "no-affine",
        "shape",
        "affine off: gamma = 1, beta = 0, no parameter gradients",
        (2, 3, 6, 6),
        affine=False,
    ),
    Case(
        "M1",
        "degenerate",
        "spatial size 1 (rank 1): var = 0, y = beta, dx = 0",
        (2, 3, 1),
        rejection_allowed=True,
        rejection_reason=M1_REASON,
    ),
    Case(
        "M1x1",
        "degenerate",
        "spatial size 1x1: var = 0, y = beta, dx = 0",
        (2, 3, 1, 1),
        rejection_allowed=True,
        rejection_reason=M1_REASON,
    ),
    Case(
        "constant-slice",
        "degenerate",
        "slice (0, 1) constant 2.5, the rest normal: that slice gives y = beta "
        "and dx = (g - mean(g)) / sqrt(eps)",
        (2, 3, 4, 4),
        x=WithConstantSlice(Normal(), 2.5),
    ),
    Case(
        "constant-slice-eps0",
        "degenerate",
        "slice (0, 1) constant with eps = 0: NaN there, finite elsewhere",
        (2, 3, 4, 4),
        eps=0.0,
        x=WithConstantSlice(Normal(), 2.5),
        rejection_allowed=True,
        rejection_reason=EPS0_CONSTANT_REASON,
    ),
    Case(
        "nan-element",
        "non-finite",
        "one NaN in slice (0, 1): NaN in that slice's output, dx and its channel's "
        "grad_gamma, finite everywhere else",
        (2, 3, 4, 4),
        x=WithElement(Normal(), float("nan"), (0, 1, 2, 3)),
    ),
    Case(
        "inf-element",
        "non-finite",
        "one +inf in slice (0, 1): NaN in that slice's output and dx, finite "
        "everywhere else",
        (2, 3, 4, 4),
        x=WithElement(Normal(), float("inf"), (0, 1, 2, 3)),
    ),
    Case(
        "N0",
        "degenerate",
        "empty batch: empty output, zero parameter gradients",
        (0, 3, 4, 4),
        rejection_allowed=True,
        rejection_reason=EMPTY_REASON,
    ),
    Case(
        "tiny-variance",
        "conditioning",
        "offset 1000, spread 1e-4, eps 1e-5: var is far below eps",
        (2, 3, 8, 8),
        x=Normal(1000.0, 1e-4),
    ),
    Case(
        "large-mean-1e4",
        "conditioning",
        "offset 1e4, unit spread: one-pass variance cancels",
        (2, 3, 16, 16),
        x=Normal(1e4, 1.0),
    ),
    Case(
        "large-mean-1e6",
        "conditioning",
        "offset 1e6, unit spread: one-pass variance cancels",
        (2, 3, 16, 16),
        x=Normal(1e6, 1.0),
    ),
    Case(
        "long-reduction",
        "conditioning",
        "M = 512 * 512 elements per slice, offset 1",
        (1, 2, 512, 512),
        x=Normal(1.0, 1.0),
    ),
    Case(
        "long-reduction-dy-mean",
        "conditioning",
        "M = 512 * 512 elements per slice, offset 1, upstream gradient with mean 1: "
        "the parameter gradients' sums share a sign and grow with M",
        (1, 2, 512, 512),
        x=Normal(1.0, 1.0),
        grad_output=Normal(1.0, 1.0),
    ),
    Case(
        "long-reduction-2e26",
        "conditioning",
        "2^26 elements in all, 64 samples of 4 slices of M = 512 * 512, offset 1: "
        "the suite judges it a sample at a time, within bounded memory",
        (64, 4, 512, 512),
        x=Normal(1.0, 1.0),
        posed_in=("float32",),
        posed_reason="each item takes seconds and 1 GiB of inputs and results, so "
        "one dtype keeps the matrix's time and memory bounded",
        # LayerNorm over each (n, c) plane, M = 2^18 as for the other operators.
        # NOTE: over (C, H, W), 2^20 elements, a float32 kernel summing one
        # element at a time (MXNet 1.9.1's LayerNorm) exceeds the budget by half:
        # its rounding is biased at that length, which the budget's sqrt(M)
        # growth does not cover.
        normalized_ndim=2,
    ),
    Case("eps0", "eps", "eps = 0 on well-conditioned normal x", (2, 3, 6, 6), eps=0.0),
    Case("eps1e-3", "eps", "eps = 1e-3", (2, 3, 6, 6), eps=1e-3),
    Case("eps1e-12", "eps", "eps = 1e-12", (2, 3, 6, 6), eps=1e-12),
    Case(
        "gamma-negative",
        "parameters",
        "gamma drawn from [-1.5, -0.5]",
        (2, 3, 6, 6),
        gamma=Uniform(-1.5, -0.5),
    ),
    Case(
        "gamma-zero",
        "parameters",
        "gamma = 0: y = beta exactly, dx = 0 exactly",
        (2, 3, 6, 6),
        gamma=Constant(0.0),
    ),
    Case(
        "dy-ones",
        "gradient",
        "upstream gradient all ones: the exact dx is zero",
        (2, 3, 6, 6),
        grad_output=Constant(1.0),
    ),
    Case(
        "groups-2-of-6",
        "family",
        "six channels in GroupNorm's two groups of three; the other operators see "
        "normal x",
        (2, 6, 5, 5),
        groups=2,
    ),
    Case(
        "groups-per-channel",
        "family",
        "GroupNorm with one group per channel, which is InstanceNorm",
        (2, 4, 5, 5),
        groups=4,
    ),
    Case(
        "layer-last-axis",
        "family",
        "LayerNorm over the last axis only (a hidden size of 96), elementwise gamma "
        "and beta",
        (3, 5, 96),
        normalized_ndim=1,
    ),
    Case(
        "batch-of-one",
        "family",
        "one sample: BatchNorm's channel statistics are its (0, c) slice's",
        (1, 3, 6, 6),
    ),
)


# Inputs that users reported against real frameworks, each with its exact answer
# (asserted against the reference in tests/test_reported_cases.py). gamma = 1 and
# beta = 0 where the answer is given as y, and dy = 1 where it is given as dx = 0.
UNIT_AFFINE = {"gamma": Constant(1.0), "beta": Constant(0.0)}
REPORTED: tuple[Case, ...] = (
    Case(
        "reported-range-overflow",
        "reported",
        "one channel [-3e38, -1e38, 1e38, 3e38]: its variance, 5e76, is beyond "
        "float32; y = [-1.3416, -0.4472, 0.4472, 1.3416]",
        (1, 1, 4),
        x=Pattern((-3e38, -1e38, 1e38, 3e38)),
        **UNIT_AFFINE,
    ),
    Case(
        "reported-offset-40000",
        "reported",
        "one channel [40000, 40001, 40002, 40003]: E[x^2] - E[x]^2 is negative in "
        "float32; y = [-1.3416, -0.4472, 0.4472, 1.3416]",
        (1, 1, 4),
        x=Pattern((40000.0, 40001.0, 40002.0, 40003.0)),
        **UNIT_AFFINE,
    ),
    Case(
        "reported-offset-2000",
        "reported",
        "one channel 2000 + [-1.5, -0.5, 0.5, 1.5]; y = [-1.3416, -0.4472, 0.4472, "
        "1.3416]",
        (1, 1, 4),
        x=Pattern((1998.5, 1999.5, 2000.5, 2001.5)),
        **UNIT_AFFINE,
    ),
    Case(
        "reported-constant-3.3e7",
        "reported",
        "every channel constant at 3.3e7, M = 9: y = beta exactly, dx = 0 (dy = 1)",
        (3, 2, 3, 3),
        x=Constant(3.3e7),
        grad_output=Constant(1.0),
    ),
    Case(
        "reported-constant-1e10",
        "reported",
        "one channel [1e10, 1e10, 1e10]: y = beta, where x * rstd + (-mean * rstd) "
        "fused into one multiply-add gives a large wrong number; dx = 0 (dy = 1)",
        (1, 1, 3),
        x=Constant(1e10),
        grad_output=Constant(1.0),
    ),
    Case(
        "reported-zeros-eps1e-12",
        "reported",
        "all zeros with eps = 1e-12, which rounds to 0 in float16: y = beta, and 0 / 0 "
        "must not appear; dx = 0 (dy = 1)",
        (2, 2, 8),
        eps=1e-12,
        x=Constant(0.0),
        grad_output=Constant(1.0),
    ),
    Case(
        "reported-alternating-512",
        "reported",
        "channels alternating +512 and -512: y = +1 and -1, while a float16 sum of "
        "squares overflows",
        (1, 2, 16),
        x=Pattern((512.0, -512.0)),
        **UNIT_AFFINE,
    ),
    Case(
        "reported-nhwc-ramp",
        "reported",
        "(1, 2, 2, 4) NHWC input 100 * channel + spatial index: y = [-1.3416, "
        "-0.4472, 0.4472, 1.3416] in each channel; GroupNorm's two groups are "
        "channels {0, 1} and {2, 3}",
        (1, 4, 2, 2),
        x=Pattern((0.0, 1.0, 2.0, 3.0), (0.0, 100.0, 200.0, 300.0)),
        layout="channels_last",
        groups=2,
        **UNIT_AFFINE,
    ),
    Case(
        "reported-eps1e-8-variance1e-8",
        "reported",
        "one channel alternating +1e-4 and -1e-4 (variance 1e-8) with eps = 1e-8: "
        "y = +0.7071 and -0.7071, where eps raised to 1e-5 gives +-0.0316",
        (1, 1, 8),
        eps=1e-8,
        x=Pattern((1e-4, -1e-4)),
        **UNIT_AFFINE,
    ),
    Case(
        "reported-repeated-backward",
        "reported",
        "(1, 2, 2, 2) input, loss = sum(y): dbeta = 4 per channel, dgamma = 0, dx = 0",
        (1, 2, 2, 2),
        grad_output=Constant(1.0),
    ),
)


def _one_dtype(dtype: str) -> dict:
    """Return the Case arguments that pose a case in `dtype` alone."""
    return {
        "posed_in": (dtype,),
        "posed_reason": f"its values are scaled to {dtype}'s range",
    }


# The dtypes whose largest values the families below reach: every dtype. For
# float64 the reference divides each slice near float64's largest finite number by
# a power of two (references.normalization.slice_scale), so that its own sums and
# squares stay finite.
RANGE_DTYPES = ("float64", "float32", "float16", "bfloat16")
# The offsets of the offset families: 4e4 as reported in float32, and 2000 in the
# half-precision dtypes, whose range 4e4 nearly fills.
OFFSETS = {"float64": 4e4, "float32": 4e4, "float16": 2e3, "bfloat16": 2e3}


def _range_cases() -> list[Case]:
    """Return the families of values near each dtype's largest finite number."""
    families = []
    for dtype in RANGE_DTYPES:
        top = dtypes.MAX_FINITE[dtype]
        families.append(
            Case(
                f"range-max-{dtype}",
                "range",
                f"|x| from a quarter to 0.9 of {dtype}'s largest finite value, random "
                f"signs: sums, squares and the variance itself lie beyond {dtype}, "
                "the normalized output does not",
                (2, 3, 4, 4),
                x=SignedUniform(top / 4, 0.9 * top),
                **_one_dtype(dtype),
            )
        )
        families.append(
            Case(
                f"squares-overflow-{dtype}",
                "range",
                f"normal x with standard deviation 2 * sqrt({dtype}'s largest finite "
                f"value): squares and the variance, about 4 times that value, "
                f"overflow {dtype}",
                (2, 3, 16),
                x=Normal(0.0, 2.0 * float(np.sqrt(top))),
                **_one_dtype(dtype),
            )
        )
    return families


def _offset_cases() -> list[Case]:
    """Return the cancellation families: offset / spread ratios 1e2 to 1e7."""
    families = []
    for dtype in dtypes.DTYPES:
        offset = OFFSETS[dtype]
        for exponent in range(2, 8):
            families.append(
                Case(
                    f"offset-1e{exponent}-{dtype}",
                    "offset",
                    f"offset {offset:g} with spread {offset / 10**exponent:g}, a ratio "
                    f"of 1e{exponent}: E[x^2] - E[x]^2 cancels",
                    (2, 3, 7, 7),
                    x=Normal(offset, offset / 10**exponent),
                    **_one_dtype(dtype),
                )
            )
    return families


def _constant_cases() -> list[Case]:
    """Return constant slices of M = 13, a prime, at magnitudes across each
    dtype's range: a sum of 13 equal values is not always exact, and its mean
    must still be the value."""
    families = []
    for dtype in dtypes.DTYPES:
        top = dtypes.MAX_FINITE[dtype]
        magnitudes = {
            "tiny": 3.0 * dtypes.SMALLEST_NORMAL[dtype],
            "third": 1.0 / 3.0,
            "sqrt-max": float(np.sqrt(top)) / 3.0,
        }
        if dtype in RANGE_DTYPES:
            magnitudes["max"] = top / 3.0
        for label, value in magnitudes.items():
            families.append(
                Case(
                    f"constant-{label}-{dtype}",
                    "constant",
                    f"every slice constant at {value:.4g} with M = 13: y = beta, "
                    "dx = gamma * (dy - mean(dy)) / sqrt(eps)",
                    (2, 2, 13),
                    x=Constant(value),
                    **_one_dtype(dtype),
                )
            )
    return families


def _eps_range_cases() -> list[Case]:
    """Return eps below each dtype's smallest normal number and, for the
    half-precision dtypes, below their smallest subnormal one, with a zero slice.
    Such an eps rounds to 0 in float16 or bfloat16 but not in the float32 their
    kernels compute in. Below float32's smallest subnormal no float32 kernel can
    hold eps, so float32 and float64 get the subnormal eps only."""
    families = []
    for dtype in dtypes.DTYPES:
        values = {"subnormal": dtypes.SMALLEST_NORMAL[dtype] / 4}
        if dtype in ("float16", "bfloat16"):
            values["underflow"] = dtypes.SMALLEST_SUBNORMAL[dtype] / 4
        for label, eps in values.items():
            rounded = "a subnormal" if label == "subnormal" else "0"
            families.append(
                Case(
                    f"eps-{label}-{dtype}",
                    "eps-range",
                    f"eps = {eps:.3g}, {rounded} in {dtype}; slice (0, 1) all zeros: "
                    "y = beta there",
                    (2, 2, 8),
                    eps=eps,
                    x=WithConstantSlice(Normal(), 0.0),
                    **_one_dtype(dtype),
                )
            )
    return families


def _layout_cases() -> list[Case]:
    """Return channels-last ramps of every spatial rank, 100 * channel +
    position, whose slices a reshape without a transpose mixes."""
    families = []
    for rank, spatial in ((1, (5,)), (2, (3, 5)), (3, (2, 3, 4))):
        length = int(np.prod(spatial))
        families.append(
            Case(
                f"layout-ramp-{rank}d",
                "layout",
                "x = 100 * channel + position, handed over channels-last: a kernel "
                "that reshapes without transposing mixes positions and channels",
                (2, 4, *spatial),
                x=Pattern(
                    tuple(float(i) for i in range(length)), (0.0, 100.0, 200.0, 300.0)
                ),
                layout="channels_last",
                groups=2,
            )
        )
    return families


def _eps_variance_cases() -> list[Case]:
    """Return eps from 1e-12 to 1e-1 beside channel variances of eps / 100, eps and
    100 * eps, where a clamped or rounded eps shows."""
    families = []
    for exponent in (-12, -10, -8, -6, -4, -2, -1):
        eps = 10.0**exponent
        scales = tuple(float(np.sqrt(eps * factor)) for factor in (0.01, 1.0, 100.0))
        families.append(
            Case(
                f"eps-vs-variance-1e{exponent}",
                "eps",
                f"eps = 1e{exponent} beside channel variances eps / 100, eps and "
                "100 * eps",
                (2, 3, 24),
                eps=eps,
                x=PerChannelNormal(scales),
            )
        )
    return families


CATALOGUE = (
    CATALOGUE
    + REPORTED
    + tuple(_range_cases())
    + tuple(_offset_cases())
    + tuple(_constant_cases())
    + tuple(_eps_range_cases())
    + tuple(_layout_cases())
    + tuple(_eps_variance_cases())
)


def by_name(name: str) -> Case:
    """Return the catalogue case called `name`, or raise KeyError listing the names."""
    for case in CATALOGUE:
        if case.name == name:
            return case
    known = ", ".join(case.name for case in CATALOGUE)
    raise KeyError(f"unknown case {name!r}; known cases: {known}")
