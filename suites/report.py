"""The JSON conformance report and the terminal table of verdict counts."""

from __future__ import annotations

import datetime
import functools
import json
import platform
import sys
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from references.family import INSTANCE_NORM, Operator
from suites import cases, files
from suites.cases import Case, Inputs, operator_inputs, sample_chunks
from suites.verdicts import VERDICTS, json_number

SCHEMA = "normconf-report"
SCHEMA_VERSION = 1


def _clean(record: dict) -> dict:
    cleaned = dict(record)
    for key in ("error", "budget", "got", "expected"):
        cleaned[key] = json_number(cleaned.get(key))
    return cleaned


def array_summary(values: np.ndarray) -> dict:
    """Return the count, the number of NaN and infinite elements, and the minimum,
    maximum, mean and standard deviation of the finite ones, in float64.

    An array larger than CHUNK_ELEMENTS is read a group of samples at a time
    (_large_array_summary), so that its float64 copy never exists whole.
    """
    values = np.asarray(values)
    if values.size > cases.CHUNK_ELEMENTS and values.ndim > 1:
        return _large_array_summary(values)
    flat = np.asarray(values, dtype=np.float64).ravel()
    finite = flat[np.isfinite(flat)]
    stats = {"count": int(flat.size), "nan": int(np.isnan(flat).sum())}
    stats["inf"] = int(flat.size - finite.size - stats["nan"])
    if finite.size:
        # Scaled to at most 1 in magnitude, so that the sums inside the mean and
        # the standard deviation cannot overflow near float64's largest value.
        scale = float(np.abs(finite).max()) or 1.0
        scaled = finite / scale
        moments = {
            "min": float(finite.min()),
            "max": float(finite.max()),
            "mean": float(scaled.mean()) * scale,
            "std": float(scaled.std()) * scale,
        }
    else:
        moments = dict.fromkeys(("min", "max", "mean", "std"))
    stats.update({name: json_number(value) for name, value in moments.items()})
    return stats


def _finite_float64(piece: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Return a piece as a flat float64 array, and its finite elements."""
    flat = np.asarray(piece, dtype=np.float64).ravel()
    return flat, flat[np.isfinite(flat)]


def _large_array_summary(values: np.ndarray) -> dict:
    """array_summary in three passes over groups of samples: counts and extremes,
    then the mean, then the standard deviation about it. The sums are added piece
    by piece, so the last digits may differ from one pass over the whole array."""
    pieces = [values[start:stop] for start, stop in sample_chunks(values.shape)]
    count = nan = finite_count = 0
    low, high, largest = np.inf, -np.inf, 0.0
    for piece in pieces:
        flat, finite = _finite_float64(piece)
        count += flat.size
        nan += int(np.isnan(flat).sum())
        finite_count += finite.size
        if finite.size:
            low, high = min(low, finite.min()), max(high, finite.max())
            largest = max(largest, float(np.abs(finite).max()))
    stats = {"count": count, "nan": nan, "inf": count - finite_count - nan}
    if not finite_count:
        stats.update(dict.fromkeys(("min", "max", "mean", "std")))
        return stats

    scale = largest or 1.0
    total = 0.0
    for piece in pieces:
        total += float(np.sum(_finite_float64(piece)[1] / scale))
    mean = total / finite_count

    squares = 0.0
    for piece in pieces:
        deviations = _finite_float64(piece)[1] / scale - mean
        squares += float(np.dot(deviations, deviations))
    moments = {
        "min": float(low),
        "max": float(high),
        "mean": mean * scale,
        "std": (squares / finite_count) ** 0.5 * scale,
    }
    stats.update({name: json_number(value) for name, value in moments.items()})
    return stats


def inputs_summary(case: Case, seed: int, inputs: Inputs) -> dict:
    """Return what a report reader needs to know of an item's inputs: the case's
    parameters and a summary of each array as the framework received it (rounded
    to the tested dtype), in (N, C, *spatial) order."""
    arrays = {"x": inputs.x, "grad_output": inputs.grad_output}
    if inputs.gamma is not None:
        arrays["gamma"] = inputs.gamma
        arrays["beta"] = inputs.beta
    return {
        "shape": list(case.shape),
        "layout": case.layout,
        "eps": case.eps,
        "affine": case.affine,
        "seed": seed,
        **{name: array_summary(values) for name, values in arrays.items()},
    }


@functools.lru_cache(maxsize=8)
def cached_inputs_summary(
    case: Case, dtype: str, seed: int, operator: Operator = INSTANCE_NORM
) -> dict:
    """Return inputs_summary of the catalogue inputs of (case, dtype, seed) for the
    operator, which every implementation and device tested on them shares. Treat
    it as read-only."""
    return inputs_summary(case, seed, operator_inputs(case, dtype, seed, operator))


def worst_slice(
    inputs: Inputs, worst_index: list[int] | None, operator: Operator = INSTANCE_NORM
) -> dict | None:
    """Return a summary of the x values that share the worst element's
    normalization: for InstanceNorm, slice (n, c) for an element of the output or
    grad_input, channel c across the batch for an element of grad_gamma or
    grad_beta. `where` describes those values in words."""
    if not worst_index:
        return None
    x = inputs.x
    if operator.name == "instance_norm":
        if len(worst_index) == 1:
            channel = worst_index[0]
            return {
                "where": f"channel {channel}, all samples",
                "channel": channel,
                "x": array_summary(x[:, channel]),
            }
        sample, channel = worst_index[:2]
        return {
            "where": f"sample {sample}, channel {channel}",
            "sample": sample,
            "channel": channel,
            "x": array_summary(x[sample, channel]),
        }
    if len(worst_index) != x.ndim:
        # A parameter gradient's element sums over every axis its parameter does
        # not run along.
        if operator.name == "layer_norm":
            key = (slice(None),) * (x.ndim - len(worst_index)) + tuple(worst_index)
            where = f"element {tuple(worst_index)} of every sample"
            return {"where": where, "x": array_summary(x[key])}
        channel = worst_index[0]
        where = f"channel {channel}, all samples"
        return {"where": where, "channel": channel, "x": array_summary(x[:, channel])}
    sample, channel = worst_index[:2]
    if operator.name == "batch_norm":
        where = f"channel {channel}, all samples"
        return {"where": where, "channel": channel, "x": array_summary(x[:, channel])}
    if operator.name == "layer_norm":
        kept = x.ndim - operator.normalized_ndim
        key = tuple(worst_index[:kept])
        return {"where": f"index {key}", "x": array_summary(x[key])}
    size = x.shape[1] // operator.groups
    first = channel // size * size
    where = (
        f"sample {sample}, group {channel // size} (channels {first} to "
        f"{first + size - 1})"
    )
    return {"where": where, "x": array_summary(x[sample, first : first + size])}


@functools.lru_cache(maxsize=256)
def cached_worst_slice(
    case: Case,
    dtype: str,
    seed: int,
    worst_index: tuple[int, ...],
    operator: Operator = INSTANCE_NORM,
) -> dict:
    """Return worst_slice for the catalogue inputs of (case, dtype, seed), the
    operator and the worst element's index: implementations tested on the same
    inputs often share their worst slice. Treat it as read-only."""
    inputs = operator_inputs(case, dtype, seed, operator)
    return worst_slice(inputs, list(worst_index), operator)


def build(
    records: Iterable[dict],
    frameworks: dict[str, dict],
    seed: int,
    command: list[str],
) -> dict:
    """Assemble the report document.

    `frameworks` maps a framework name to {"version": ..., "devices": [...]} or to
    {"missing": reason} for a built-in framework that is not installed.
    """
    results = sorted(
        (_clean(record) for record in records),
        key=lambda r: (
            r["framework"],
            r["implementation"],
            r["device"],
            r["dtype"],
            r["case"],
            r["quantity"],
        ),
    )
    counts = Counter(record["verdict"] for record in results)
    return {
        "schema": SCHEMA,
        "schema_version": SCHEMA_VERSION,
        "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "environment": {
            "python": platform.python_version(),
            "implementation": platform.python_implementation(),
            "platform": platform.platform(),
            "numpy": np.__version__,
            "frameworks": frameworks,
            "seed": seed,
            "command": command,
        },
        "summary": {verdict: counts.get(verdict, 0) for verdict in VERDICTS},
        "results": results,
    }


def _json_fallback(value: object) -> object:
    """Return a JSON form of a value an adapter gave where the contract requires a
    plain one: a NumPy scalar's Python value, a dtype's name, or else its repr, so
    that an odd value costs a readable field instead of the whole report."""
    if isinstance(value, np.generic):
        return (
            json_number(value.item())
            if isinstance(value, np.floating)
            else value.item()
        )
    if isinstance(value, np.dtype):
        return value.name
    return repr(value)


def write(document: dict, path: Path) -> None:
    """Write the report as strict JSON (no NaN or Infinity literals)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(document, indent=1, allow_nan=False, default=_json_fallback)
    files.write_text_atomic(path, text + "\n")


def count_table(records: Iterable[dict]) -> list[str]:
    """Return text lines: verdict counts per framework implementation."""
    counts: dict[str, Counter] = {}
    for record in records:
        key = f"{record['framework']}/{record['implementation']}"
        counts.setdefault(key, Counter())[record["verdict"]] += 1
    if not counts:
        return []

    width = max(len("implementation"), *(len(key) for key in counts))
    header = "implementation".ljust(width) + "".join(
        f"{verdict:>12}" for verdict in VERDICTS
    )
    lines = [header, "-" * len(header)]
    for key in sorted(counts):
        row = counts[key]
        lines.append(
            key.ljust(width) + "".join(f"{row.get(v, 0):>12}" for v in VERDICTS)
        )
    return lines


def notable_items(records: Iterable[dict], width: int = 160) -> list[str]:
    """Return one line per item that has a rejected or deviation verdict.

    These are the items where a framework differs from the exact answer but still
    conforms, or refuses an input; a reader wants them named even when all pass.
    """
    lines = {}
    for record in records:
        if record["verdict"] not in ("rejected", "deviation"):
            continue
        item = "-".join(
            record[key]
            for key in ("framework", "implementation", "device", "dtype", "case")
        )
        if item in lines:
            continue
        text = f"{item}: {record['verdict']}: {record['message']}"
        lines[item] = text if len(text) <= width else text[: width - 3] + "..."
    return [lines[item] for item in sorted(lines)]


def main_command() -> list[str]:
    """Return the command line that started this run, as it was typed: `python -m
    pytest ...` rather than the path of pytest's __main__.py."""
    arguments = list(sys.argv)
    program = Path(arguments[0]) if arguments else Path()
    if program.name == "__main__.py":
        return ["python", "-m", program.parent.name, *arguments[1:]]
    if program.name in ("pytest", "py.test"):
        return [program.name, *arguments[1:]]
    return arguments
