"""Property-based exploration: Hypothesis draws cases the catalogue does not have.

Each example is a `Case` built from drawn parameters. They are the shape (rank 3 to
5, batch, channels, spatial sizes), the operator's configuration (GroupNorm's groups,
LayerNorm's normalized axes), the layout, affine on or off, eps, the dtype, and the
offset and spread of x. The suite runs it through one implementation exactly as it
runs a catalogue case and judges it against the float64 reference. An example whose
item is not conforming fails, Hypothesis shrinks it to a smaller example that still
fails, and the last (smallest) one is written as a replay bundle and printed as a
catalogue entry to add to suites/cases.py.

Two profiles bound the search (`--properties`):
- `ci`: few examples, the same ones every run (derandomized), over well-conditioned
  values: offsets at most the spread, eps from 1e-6 to 1e-1, at most 1024 elements
  per normalized slice. A one-pass variance, E[x^2] - E[x]^2, already exceeds its
  budget in float64 at an offset of 10 times the spread (ONNX Runtime 1.31.1's
  GroupNormalization, 11.1 u against 7.54 u). The catalogue covers larger offsets,
  so the ci profile stays below them.
  NOTE: a slice of two or three elements can still sit far from zero against its
  own spread by chance, which exposes a one-pass variance in the ci profile too
  (onnxruntime-training 1.19.2's LayerNormalization, recorded by an `items` entry).
- `deep`: many random examples over the whole range: offsets up to 1e6 times the
  spread, spreads down to 1e-4, eps down to 1e-12. It finds the known deviations too,
  because they are documented for catalogue cases, which a drawn example is not.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

from suites import dtypes
from suites.cases import M1_REASON, Case, Normal, Uniform

# The profiles' settings. Neither writes Hypothesis's example database: the failing
# example is kept as a replay bundle instead.
PROFILES = {
    "ci": {"max_examples": 10, "derandomize": True},
    "deep": {"max_examples": 300, "derandomize": False},
}
PROFILE_NAMES = (*PROFILES, "off")

# The largest number of elements an example's x has, and a normalized slice has
# in the ci profile.
MAX_ELEMENTS = 4096
CI_MAX_SLICE = 1024

CI_OFFSETS = (0.0, 1.0, -3.0)
CI_SPREADS = (1.0, 0.25, 4.0)
CI_EPS = (1e-6, 1e-5, 1e-3, 1e-1)
DEEP_OFFSETS = (0.0, 1.0, -1.0, 1e2, -1e3, 1e4, 1e6)
DEEP_SPREADS = (1e-4, 1e-2, 1.0, 1e2)
DEEP_EPS = (1e-12, 1e-8, 1e-6, 1e-5, 1e-3, 1e-1)


def profile_settings(name: str, max_examples: int | None = None) -> settings:
    """Return the Hypothesis settings of profile `name`, with `max_examples` in
    place of the profile's when given."""
    values = dict(PROFILES[name])
    if max_examples is not None:
        values["max_examples"] = max_examples
    return settings(
        deadline=None,
        database=None,
        print_blob=False,
        # An example runs a framework: slow examples and large inputs are the point.
        suppress_health_check=list(HealthCheck),
        **values,
    )


@dataclass(frozen=True)
class Example:
    """One drawn example: the case to run and the dtype to run it in."""

    case: Case
    dtype: str


def _slice_length(
    shape: tuple[int, ...], operator: str, groups: int, normalized_ndim: int
) -> int:
    """Return the number of elements the operator normalizes together."""
    spatial = math.prod(shape[2:])
    if operator == "batch_norm":
        return shape[0] * spatial
    if operator == "group_norm":
        return shape[1] // groups * spatial
    if operator == "layer_norm":
        return math.prod(shape[len(shape) - normalized_ndim :])
    return spatial


@st.composite
def examples(draw, operator: str, layouts: tuple[str, ...], dtype_names, deep: bool):
    """Draw an Example for an implementation of `operator` that accepts `layouts`,
    in one of `dtype_names`."""
    dtype = draw(st.sampled_from(dtype_names))
    rank = draw(st.integers(3, 5))
    samples = draw(st.integers(1, 3))
    groups, normalized_ndim = 1, 1
    if operator == "group_norm":
        groups = draw(st.integers(1, 4))
        channels = groups * draw(st.integers(1, 3))
    else:
        channels = draw(st.integers(1, 6))
    spatial = tuple(draw(st.integers(1, 9)) for _ in range(rank - 2))
    shape = (samples, channels, *spatial)
    if math.prod(shape) > MAX_ELEMENTS:
        shape = (samples, channels, *(1 for _ in spatial))
    if operator == "layer_norm":
        normalized_ndim = draw(st.integers(1, rank - 1))
        layout = "channels_first"
    else:
        layout = draw(st.sampled_from(layouts))
    affine = draw(st.booleans())

    offsets, spreads, eps_values = (
        (DEEP_OFFSETS, DEEP_SPREADS, DEEP_EPS)
        if deep
        else (CI_OFFSETS, CI_SPREADS, CI_EPS)
    )
    eps = draw(st.sampled_from(eps_values))
    offset = draw(st.sampled_from(offsets))
    spread = draw(st.sampled_from(spreads))
    if not deep:
        # Keep the ci profile within the conditioning every framework meets.
        spread = max(spread, abs(offset))
        if _slice_length(shape, operator, groups, normalized_ndim) > CI_MAX_SLICE:
            shape = (1, channels, *(1 for _ in spatial))
    gamma = Uniform(-1.5, 1.5) if deep and draw(st.booleans()) else Uniform(0.5, 1.5)
    # The variant names the case, and the name seeds its random inputs.
    variant = draw(st.integers(0, 2**16))
    # As in the catalogue, a framework may reject one-element slices.
    single = _slice_length(shape, operator, groups, normalized_ndim) == 1
    case = Case(
        name=f"property-{variant}",
        group="property",
        description="drawn by the property suite",
        shape=shape,
        eps=eps,
        affine=affine,
        x=Normal(offset, spread),
        gamma=gamma,
        layout=layout,
        groups=groups if operator == "group_norm" else None,
        normalized_ndim=normalized_ndim if operator == "layer_norm" else None,
        rejection_allowed=single,
        rejection_reason=M1_REASON if single else "",
    )
    return Example(case, dtype)


def _generator_text(generator) -> str:
    name = type(generator).__name__
    if isinstance(generator, Normal):
        return f"{name}({generator.loc!r}, {generator.scale!r})"
    if isinstance(generator, Uniform):
        return f"{name}({generator.low!r}, {generator.high!r})"
    return repr(generator)


def catalogue_entry(case: Case, seed: int, summary: str) -> str:
    """Return the Python text of a catalogue entry (suites/cases.py) for a drawn
    case. Its name seeds its inputs, so the entry keeps it: renamed, the case would
    draw other values."""
    fields = [
        f"    {case.name!r},",
        '    "property",',
        f"    {summary!r},",
        f"    {case.shape!r},",
        f"    eps={case.eps!r},",
    ]
    if not case.affine:
        fields.append("    affine=False,")
    if case.rejection_allowed:
        fields.append("    rejection_allowed=True,")
        fields.append("    rejection_reason=M1_REASON,")
    fields.append(f"    x={_generator_text(case.x)},")
    fields.append(f"    gamma={_generator_text(case.gamma)},")
    if case.layout != "channels_first":
        fields.append(f"    layout={case.layout!r},")

    if case.groups is not None:
        fields.append(f"    groups={case.groups!r},")
    if case.normalized_ndim is not None:
        fields.append(f"    normalized_ndim={case.normalized_ndim!r},")
    lines = [
        f"# found with --seed={seed}; the name seeds the inputs, so keep it",
        "Case(",
        *fields,
        "),",
    ]
    return "\n".join(lines)


def supported_dtypes(names: list[str]) -> tuple[str, ...]:
    """Return the known dtypes among `names`, in normconf's order."""
    return tuple(name for name in dtypes.DTYPES if name in names)
