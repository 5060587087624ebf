"""Export the catalogue's inputs and float64 references as golden data files.

    python -m suites.export --output DIR [--dtypes LIST] [--cases LIST] [--seed N]
        [--formats npz,onnx]

For every selected (case, dtype) that the dtype can hold, the npz format writes
DIR/npz/<case>_<dtype>.npz with the inputs as the suite hands them to an adapter,
the float64 reference and the per-element error scales. The onnx format writes an
ONNX backend test folder, DIR/onnx/test_<case>_<dtype>/, for every channels-first
case (suites/export_onnx.py, which needs the onnx package). DIR/manifest.json lists
every file with its SHA-256, each file's budgets and the error model's constants,
and every (case, dtype) it skipped with the reason. docs/golden-data.md describes
the files and the recipe that reproduces the suite's verdicts from them.

The same command writes the same bytes: the npz files are zip archives written
here with a fixed timestamp, a fixed entry order and no compression, and the
manifest is JSON with sorted keys. Argument errors exit with status 2 and one line
on stderr.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import io
import json
import sys
import tempfile
import zipfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NoReturn

import numpy as np

from suites import cases, dtypes, error_model, files
from suites.cases import Case
from suites.verdicts import catalogue_reference, quantities_for, to_layout

PROG = "python -m suites.export"
SCHEMA = "normconf-golden"
SCHEMA_VERSION = 1
FORMATS = ("npz", "onnx")
MANIFEST_FILE = "manifest.json"
EXIT_USAGE = 2

# Every zip entry gets this timestamp (the earliest a zip header can store), so
# that the archive's bytes do not depend on when it was written.
ZIP_DATE_TIME = (1980, 1, 1, 0, 0, 0)
# Unix as the creating system and rw-r--r-- as the entry's permissions, whatever the
# platform that writes the archive.
ZIP_CREATE_SYSTEM = 3
ZIP_EXTERNAL_ATTR = 0o100644 << 16

# Names of the arrays shaped like x, which the npz files store in the case's layout.
X_SHAPED = ("x", "grad_output", "output", "grad_input")


class ExportError(Exception):
    """A file of the export cannot be written. The message names the file."""


# ---------------------------------------------------------------------------------
# Files


def npz_bytes(arrays: dict[str, np.ndarray]) -> bytes:
    """Return an .npz archive of `arrays`, one little-endian .npy entry per array in
    the given order, with fixed zip metadata and no compression."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_STORED) as archive:
        for name, array in arrays.items():
            entry = zipfile.ZipInfo(f"{name}.npy", date_time=ZIP_DATE_TIME)
            entry.create_system = ZIP_CREATE_SYSTEM
            entry.external_attr = ZIP_EXTERNAL_ATTR
            little_endian = array.astype(array.dtype.newbyteorder("<"), copy=False)
            content = io.BytesIO()
            np.lib.format.write_array(
                content, np.ascontiguousarray(little_endian), allow_pickle=False
            )
            archive.writestr(entry, content.getvalue())
    return buffer.getvalue()


def write_file(output: Path, relative: str, data: bytes) -> dict:
    """Write `data` to output/relative atomically and return its manifest fields,
    the relative path and the SHA-256."""
    path = output / relative
    try:
        files.write_atomic(path, lambda handle: handle.write(data))
    except OSError as error:
        raise ExportError(f"cannot write {path}: {error}") from error
    return {"path": relative, "sha256": hashlib.sha256(data).hexdigest()}


def array_fields(name: str, array: np.ndarray, dtype: str | None = None) -> dict:
    """Return an array's manifest fields. `dtype` overrides the NumPy dtype's name,
    for arrays whose file stores another type (bfloat16 in an ONNX tensor)."""
    return {
        "name": name,
        "dtype": dtype or array.dtype.name,
        "shape": list(array.shape),
    }


# ---------------------------------------------------------------------------------
# Contents


def golden_arrays(case: Case, dtype: str, seed: int) -> dict[str, np.ndarray]:
    """Return the npz file's arrays: the inputs as the suite hands them to an
    adapter, the float64 reference of every quantity the case has, and each
    quantity's error scale, named `<quantity>_scale`.

    x-shaped arrays are in the case's layout. gamma, beta and the parameter
    gradients are absent when affine is off.
    """
    inputs = cases.materialize(case, dtype, seed)
    expected, scale = catalogue_reference(case, dtype, seed)
    quantities = quantities_for(case, gradients=True)
    arrays = {
        "x": inputs.x,
        "gamma": inputs.gamma,
        "beta": inputs.beta,
        "grad_output": inputs.grad_output,
    }
    arrays.update((quantity, getattr(expected, quantity)) for quantity in quantities)
    arrays.update((f"{quantity}_scale", scale[quantity]) for quantity in quantities)

    golden = {}
    for name, array in arrays.items():
        if array is None:
            continue
        if name.removesuffix("_scale") in X_SHAPED:
            array = to_layout(array, case.layout)
        golden[name] = array
    return golden


def quantity_budgets(case: Case, dtype: str, quantities: Sequence[str]) -> dict:
    """Return each quantity's budget (in units of u) and the reduction length L
    that sets it."""
    budgets = {}
    for quantity in quantities:
        length = error_model.budget_reduction_length(quantity, case.shape)
        budgets[quantity] = {
            "budget": error_model.budget(quantity, dtype, length),
            "reduction_length": length,
        }
    return budgets


def case_fields(case: Case, dtype: str, seed: int) -> dict:
    """Return the manifest fields that describe the case posed in `dtype`."""
    return {
        "case": case.name,
        "description": case.description,
        "group": case.group,
        "dtype": dtype,
        "layout": case.layout,
        "shape": list(case.shape),
        "eps": case.eps,
        "affine": case.affine,
        "seed": seed,
        "rejection_allowed": case.rejection_allowed,
        "rejection_reason": case.rejection_reason,
        "unit_roundoff": dtypes.UNIT_ROUNDOFF[dtype],
        "subnormal_allowance": dtypes.SMALLEST_SUBNORMAL[dtype] / 2,
    }


def error_model_constants() -> dict:
    """Return the error model's constants as the manifest records them."""
    return {
        "quantities": list(error_model.QUANTITIES),
        "unit_roundoff": dict(dtypes.UNIT_ROUNDOFF),
        "subnormal_allowance": {
            dtype: spacing / 2 for dtype, spacing in dtypes.SMALLEST_SUBNORMAL.items()
        },
        "budget_formula": "base + growth * sqrt(max(L, 1))",
        "budget": {
            quantity: {
                dtype: {"base": base, "growth": growth}
                for dtype, (base, growth) in table.items()
            }
            for quantity, table in error_model.BUDGET.items()
        },
        "reduction_length": {
            quantity: "N * M" if quantity in ("grad_gamma", "grad_beta") else "M"
            for quantity in error_model.QUANTITIES
        },
        "overflow_threshold": dict(dtypes.OVERFLOW_THRESHOLD),
    }


def npz_name(case: Case, dtype: str) -> str:
    return f"npz/{case.name}_{dtype}.npz"


def write_npz(output: Path, case: Case, dtype: str, seed: int) -> dict:
    """Write the case's npz file and return its manifest entry."""
    arrays = golden_arrays(case, dtype, seed)
    entry = write_file(output, npz_name(case, dtype), npz_bytes(arrays))
    entry.update(case_fields(case, dtype, seed))
    entry["format"] = "npz"
    entry["container_dtype"] = np.dtype(dtypes.CONTAINER[dtype]).name
    quantities = quantities_for(case, gradients=True)
    entry["quantities"] = quantity_budgets(case, dtype, quantities)
    entry["arrays"] = [array_fields(name, array) for name, array in arrays.items()]
    return entry


def write_onnx_test(output: Path, case: Case, dtype: str, seed: int) -> dict:
    """Write the case's ONNX backend test folder and return its manifest entry."""
    from suites import export_onnx

    folder, tensors, model_fields = export_onnx.backend_test(case, dtype, seed)
    entry = {"path": folder, "format": "onnx", **case_fields(case, dtype, seed)}
    entry.update(model_fields)
    entry["quantities"] = quantity_budgets(case, dtype, ("output",))
    entry["files"] = []
    for relative, data, fields in tensors:
        written = write_file(output, f"{folder}/{relative}", data)
        entry["files"].append({**written, **(fields or {})})
    return entry


def export(
    output: Path,
    case_list: Sequence[Case],
    dtype_list: Sequence[str],
    seed: int,
    formats: Sequence[str],
) -> dict:
    """Write every selected file under `output`, then the manifest, and return the
    manifest."""
    entries: list[dict] = []
    skipped: list[dict] = []
    writers: dict[str, Callable[[Path, Case, str, int], dict]] = {
        "npz": write_npz,
        "onnx": write_onnx_test,
    }
    for case in case_list:
        for dtype in dtype_list:
            for kind in formats:
                reason = skip_reason(kind, case, dtype)
                if reason is not None:
                    skipped.append(
                        {
                            "format": kind,
                            "case": case.name,
                            "dtype": dtype,
                            "reason": reason,
                        }
                    )
                    continue
                entries.append(writers[kind](output, case, dtype, seed))

    manifest = {
        "schema": SCHEMA,
        "schema_version": SCHEMA_VERSION,
        "seed": seed,
        "formats": list(formats),
        "numpy_version": np.__version__,
        "error_model": error_model_constants(),
        "files": entries,
        "skipped": skipped,
    }
    if "onnx" in formats:
        from suites import export_onnx

        manifest.update(export_onnx.manifest_fields())
    text = json.dumps(manifest, indent=2, sort_keys=True, allow_nan=False) + "\n"
    write_file(output, MANIFEST_FILE, text.encode("utf-8"))
    return manifest


def skip_reason(kind: str, case: Case, dtype: str) -> str | None:
    """Return why the (case, dtype) is not exported in format `kind`, or None."""
    if case.large:
        return (
            f"case {case.name} has {case.elements} elements, more than the "
            f"{cases.CHUNK_ELEMENTS} of a whole float64 reference, which the export "
            "writes"
        )
    unfit = case.unfit_reason(dtype)
    if unfit is not None or kind != "onnx":
        return unfit
    from suites import export_onnx

    return export_onnx.skip_reason(case, dtype)


# ---------------------------------------------------------------------------------
# Command line


class _Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one line: `prog: error: message`."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")


def _name_list(check: Callable[[str], object]) -> Callable[[str], list[str]]:
    """Return an argparse type that splits a comma-separated list, drops repeats
    and checks each name with `check`, which raises ValueError or KeyError."""

    def parse(text: str) -> list[str]:
        names = [part.strip() for part in text.split(",") if part.strip()]
        if not names:
            raise argparse.ArgumentTypeError(
                f"empty list {text!r}; give comma-separated names"
            )
        for name in names:
            try:
                check(name)
            except (ValueError, KeyError) as error:
                raise argparse.ArgumentTypeError(error.args[0]) from error
        return list(dict.fromkeys(names))

    return parse


def _check_format(name: str) -> None:
    if name not in FORMATS:
        raise ValueError(
            f"unknown format {name!r}; known formats: {', '.join(FORMATS)}"
        )


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog=PROG,
        description="Write the catalogue's inputs, float64 references, error scales "
        "and budgets as .npz files (and optionally ONNX backend tests), with a "
        "manifest.json that lists them with their SHA-256.",
    )
    parser.add_argument(
        "--output",
        required=True,
        type=_folder,
        metavar="DIR",
        help="folder to write into; created if missing",
    )
    parser.add_argument(
        "--dtypes",
        type=_name_list(dtypes.check_dtype),
        default=list(dtypes.DTYPES),
        metavar="LIST",
        help=f"comma-separated dtypes (default: {','.join(dtypes.DTYPES)})",
    )
    parser.add_argument(
        "--cases",
        type=_name_list(cases.by_name),
        default=None,
        metavar="LIST",
        help="comma-separated catalogue case names (default: every case)",
    )
    parser.add_argument(
        "--seed",
        type=int,
        default=0,
        metavar="N",
        help="seed of the random inputs, 0 or more (default: 0)",
    )
    parser.add_argument(
        "--formats",
        type=_name_list(_check_format),
        default=["npz"],
        metavar="LIST",
        help="comma-separated formats: npz, onnx (default: npz; onnx needs the "
        "onnx package)",
    )
    return parser


def _check_arguments(parser: argparse.ArgumentParser, arguments) -> None:
    """Stop with a usage error on a negative seed, an onnx format without the onnx
    package, or an output folder that cannot be created or written."""
    if arguments.seed < 0:
        parser.error(f"argument --seed: {arguments.seed} is negative; use 0 or more")
    if "onnx" in arguments.formats:
        if importlib.util.find_spec("onnx") is None:
            parser.error(
                "argument --formats: format 'onnx' needs the onnx package, which is "
                "not installed; pip install onnx, or leave onnx out of --formats"
            )
        from suites import export_onnx

        problem = export_onnx.schema_problem()
        if problem is not None:
            parser.error(f"argument --formats: {problem}")
    output = arguments.output
    try:
        output.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=output):
            pass
    except OSError as error:
        parser.error(f"argument --output: cannot write in {str(output)!r}: {error}")


def _folder(value: str) -> Path:
    """Parse --output: an empty value would mean the current folder by accident."""
    if not value.strip():
        raise argparse.ArgumentTypeError("the folder name is empty")
    return Path(value)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    arguments = parser.parse_args(argv)
    _check_arguments(parser, arguments)
    names = arguments.cases or [case.name for case in cases.CATALOGUE]
    case_list = [cases.by_name(name) for name in names]
    try:
        manifest = export(
            arguments.output,
            case_list,
            arguments.dtypes,
            arguments.seed,
            arguments.formats,
        )
    except ExportError as error:
        print(f"{PROG}: error: {error}", file=sys.stderr)
        return EXIT_USAGE
    counts = {kind: 0 for kind in FORMATS}
    for entry in manifest["files"]:
        counts[entry["format"]] += 1
    print(
        f"wrote {counts['npz']} npz files and {counts['onnx']} ONNX test folders, "
        f"skipped {len(manifest['skipped'])} (format, case, dtype) combinations; "
        f"manifest: {arguments.output / MANIFEST_FILE}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
