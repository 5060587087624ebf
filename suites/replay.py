"""Replay bundles: one non-conforming item's inputs and metadata, rerun on their own.

With `--replay-dir DIR`, the suite writes DIR/<test id>/ for every item with a
non-conforming record (after the deviations file is applied):

- `inputs.npz`: x, gamma, beta and grad_output as the adapter received them, in the
  request's layout and in the tested dtype's NumPy container (bfloat16 values in
  float32 arrays). gamma and beta are absent when affine is off.
- `item.json`: the item's coordinates, the case's eps, affine flag, layout and shape,
  the adapter that ran it, the records' verdicts and messages, the pytest command
  that reruns the item (`command`) and the command that replays the bundle
  (`replay_command`).

`python -m suites.replay BUNDLE [--adapter MODULE:OBJECT | --framework NAME]` runs the
bundle's inputs through the adapter named in item.json, or the one given, judges the
result against the float64 reference computed from the bundle's arrays, and prints
one line per quantity. The deviations file is not applied. Exit status: 0 when every
quantity conforms, 1 when one does not, 2 when the bundle is invalid or the adapter
cannot load or run the item.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import shlex
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from adapters import registry
from adapters.contract import DEFAULT_MODE, LAYOUTS, Implementation
from references.family import INSTANCE_NORM, Operator
from suites import dtypes, files
from suites.cases import Case, Inputs
from suites.verdicts import (
    AdapterMethodError,
    Item,
    Record,
    build_request,
    error_records,
    from_layout,
    item_inputs,
    json_number,
    run_item,
    unsupported_reason,
)

SCHEMA = "normconf-replay"
SCHEMA_VERSION = 1
INPUTS_FILE = "inputs.npz"
ITEM_FILE = "item.json"
EXIT_CONFORMING = 0
EXIT_NON_CONFORMING = 1
EXIT_INVALID = 2

# Characters kept in a bundle's folder name. Device names may contain ':' ("cuda:1"),
# which some file systems reject, so every other character becomes '_'.
UNSAFE_NAME_CHARACTERS = re.compile(r"[^A-Za-z0-9._-]")


class BundleError(Exception):
    """A replay bundle is missing, unreadable or inconsistent."""


def bundle_name(item_id: str) -> str:
    """Return the folder name for the item's bundle."""
    return UNSAFE_NAME_CHARACTERS.sub("_", item_id)


def replay_options(source: tuple[str, str]) -> list[str]:
    """Return the replay options that select the adapter loaded from `source`."""
    kind, name = source
    return [f"--{kind}", name]


def replay_command(bundle: Path, source: tuple[str, str]) -> str:
    """Return the command that replays the bundle in folder `bundle` through the
    adapter loaded from `source`."""
    return shlex.join(
        ["python", "-m", "suites.replay", str(bundle), *replay_options(source)]
    )


def write_bundle(
    directory: Path,
    adapter: object,
    source: tuple[str, str],
    implementation: Implementation,
    item: Item,
    rows: list[dict],
    command: str,
) -> Path:
    """Write the item's bundle under `directory` and return the bundle's folder.

    `source` is how the adapter was loaded: ("framework", built-in name) or
    ("adapter", module:object spec). The inputs are rebuilt from the case and seed,
    which reproduces the arrays the adapter received without running anything.
    """
    bundle = directory / bundle_name(item.item_id)
    bundle.mkdir(parents=True, exist_ok=True)
    inputs = item_inputs(item)
    request = build_request(item, inputs, implementation.gradients)
    arrays = {"x": request.x, "grad_output": request.grad_output}
    if request.affine:
        arrays["gamma"] = request.gamma
        arrays["beta"] = request.beta
    files.write_atomic(bundle / INPUTS_FILE, lambda handle: np.savez(handle, **arrays))

    kind, name = source
    metadata = {
        "schema": SCHEMA,
        "schema_version": SCHEMA_VERSION,
        "framework": item.framework,
        "adapter_spec": name if kind == "adapter" else None,
        "builtin": name if kind == "framework" else None,
        "framework_version": adapter.version(),
        "implementation": item.implementation,
        "execution_mode": item.execution_mode,
        "op": item.operator.name,
        "groups": item.operator.groups,
        "normalized_ndim": item.operator.normalized_ndim,
        "device": item.device,
        "dtype": item.dtype,
        "layout": item.case.layout,
        "eps": item.case.eps,
        "affine": item.case.affine,
        "shape": list(item.case.shape),
        "case": item.case.name,
        "rejection_allowed": item.case.rejection_allowed,
        "rejection_reason": item.case.rejection_reason,
        "seed": item.seed,
        "gradients": implementation.gradients,
        "records": [_record_summary(row) for row in rows],
        "command": command,
        "replay_command": replay_command(bundle, source),
    }
    text = json.dumps(metadata, indent=2, allow_nan=False)
    files.write_text_atomic(bundle / ITEM_FILE, text + "\n")
    return bundle


def _record_summary(row: dict) -> dict:
    return {
        "quantity": row["quantity"],
        "verdict": row["verdict"],
        "conforming": row["conforming"],
        "message": row["message"],
        "error": json_number(row["error"]),
        "budget": json_number(row["budget"]),
        "worst_index": row["worst_index"],
        "deviation": row["deviation"],
    }


@dataclass(frozen=True)
class Bundle:
    """A loaded replay bundle: its item.json and its inputs in (N, C, *spatial)."""

    path: Path
    metadata: dict
    case: Case
    inputs: Inputs
    operator: Operator = INSTANCE_NORM


# item.json fields that replay reads, with their JSON types.
REQUIRED_FIELDS = {
    "framework": str,
    "implementation": str,
    "device": str,
    "dtype": str,
    "layout": str,
    "eps": (int, float),
    "affine": bool,
    "shape": list,
    "case": str,
    "rejection_allowed": bool,
    "rejection_reason": str,
    "seed": int,
}


def _read_metadata(path: Path) -> dict:
    try:
        metadata = json.loads((path / ITEM_FILE).read_text(encoding="utf-8"))
    except FileNotFoundError as error:
        raise BundleError(f"{path} has no {ITEM_FILE}") from error
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise BundleError(f"cannot read {path / ITEM_FILE}: {error}") from error
    if not isinstance(metadata, dict):
        raise BundleError(f"{path / ITEM_FILE} is not a JSON object")

    schema = (metadata.get("schema"), metadata.get("schema_version"))
    if schema != (SCHEMA, SCHEMA_VERSION):
        raise BundleError(
            f"{path / ITEM_FILE} has schema {schema[0]!r} version {schema[1]!r}; "
            f"expected {SCHEMA!r} version {SCHEMA_VERSION}"
        )

    for field, kinds in REQUIRED_FIELDS.items():
        value = metadata.get(field)
        # bool is an int in Python, so a flag would pass as a seed without this.
        if not isinstance(value, kinds) or (
            kinds is not bool and isinstance(value, bool)
        ):
            raise BundleError(
                f"{path / ITEM_FILE}: field {field!r} is missing or invalid"
            )

    try:
        dtypes.check_dtype(metadata["dtype"])
    except ValueError as error:
        raise BundleError(f"{path / ITEM_FILE}: {error}") from error
    if metadata["layout"] not in LAYOUTS:
        raise BundleError(
            f"{path / ITEM_FILE}: unknown layout {metadata['layout']!r}; "
            f"expected one of {', '.join(LAYOUTS)}"
        )
    eps = float(metadata["eps"])
    if not math.isfinite(eps) or eps < 0:
        raise BundleError(f"{path / ITEM_FILE}: eps {eps!r} is not a finite eps >= 0")
    shape = metadata["shape"]
    if len(shape) < 3 or not all(
        isinstance(size, int) and not isinstance(size, bool) and size >= 0
        for size in shape
    ):
        raise BundleError(
            f"{path / ITEM_FILE}: shape {shape!r} is not (N, C, *spatial) sizes"
        )
    return metadata


def _read_arrays(path: Path, names: set[str]) -> dict[str, np.ndarray]:
    file = path / INPUTS_FILE
    try:
        with np.load(file, allow_pickle=False) as archive:
            found = set(archive.files)
            if found != names:
                raise BundleError(
                    f"{file} contains {sorted(found)}, expected {sorted(names)}"
                )
            return {name: archive[name] for name in names}
    except FileNotFoundError as error:
        raise BundleError(f"{path} has no {INPUTS_FILE}") from error
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as error:
        raise BundleError(f"cannot read {file}: {error}") from error


def load_bundle(path: Path) -> Bundle:
    """Load and check a bundle folder. Raises BundleError when it is invalid."""
    if not path.is_dir():
        raise BundleError(f"{path} is not a folder")
    metadata = _read_metadata(path)
    dtype, layout = metadata["dtype"], metadata["layout"]
    affine = metadata["affine"]
    names = {"x", "grad_output"} | ({"gamma", "beta"} if affine else set())
    arrays = _read_arrays(path, names)

    shape = tuple(metadata["shape"])
    container = np.dtype(dtypes.CONTAINER[dtype])
    for name, array in arrays.items():
        if array.dtype != container:
            raise BundleError(
                f"{name} has dtype {array.dtype}, but a {dtype} bundle stores "
                f"{container}"
            )
        if not dtypes.is_representable(array, dtype):
            raise BundleError(f"{name} contains values not representable in {dtype}")
    x = from_layout(arrays["x"], layout)
    grad_output = from_layout(arrays["grad_output"], layout)
    for name, array in (("x", x), ("grad_output", grad_output)):
        if array.shape != shape:
            raise BundleError(
                f"{name} has shape {array.shape} in (N, C, *spatial) order; "
                f"item.json gives {shape}"
            )
    operator = _operator(path, metadata)
    try:
        parameters = operator.parameter_shape(shape)
        operator.axes(shape)
    except ValueError as error:
        raise BundleError(f"{path / ITEM_FILE}: {error}") from error
    for name in names - {"x", "grad_output"}:
        if arrays[name].shape != parameters:
            raise BundleError(
                f"{name} has shape {arrays[name].shape}, expected {parameters}"
            )
    for array in (x, grad_output, *arrays.values()):
        array.flags.writeable = False

    case = Case(
        name=metadata["case"],
        group="replay",
        description=f"replayed from {path}",
        shape=shape,
        eps=float(metadata["eps"]),
        affine=affine,
        rejection_allowed=metadata["rejection_allowed"],
        rejection_reason=metadata["rejection_reason"],
        layout=layout,
    )
    inputs = Inputs(
        x=x,
        gamma=arrays.get("gamma"),
        beta=arrays.get("beta"),
        grad_output=grad_output,
    )
    return Bundle(path, metadata, case, inputs, operator)


def _operator(path: Path, metadata: dict) -> Operator:
    """Return the bundle's operator; bundles written before the family existed
    have no `op` field and hold InstanceNorm items."""
    name = metadata.get("op", "instance_norm")
    try:
        return Operator(
            name,
            groups=metadata.get("groups"),
            normalized_ndim=metadata.get("normalized_ndim"),
        )
    except (ValueError, TypeError) as error:
        raise BundleError(f"{path / ITEM_FILE}: invalid operator: {error}") from error


class ReplayError(Exception):
    """The adapter cannot be loaded or cannot run the bundle's item."""


def load_adapter(bundle: Bundle, spec: str | None, framework: str | None) -> object:
    """Load the adapter given on the command line, or else the one in item.json."""
    if spec is None and framework is None:
        spec = bundle.metadata.get("adapter_spec")
        framework = bundle.metadata.get("builtin")
        if not isinstance(spec, str) and not isinstance(framework, str):
            raise BundleError(
                f"{bundle.path / ITEM_FILE} names no adapter (adapter_spec and "
                "builtin are both missing); pass --adapter or --framework"
            )
    try:
        if isinstance(framework, str):
            return registry.load_builtin(framework)
        return registry.load(spec)
    except registry.AdapterLoadError as error:
        raise ReplayError(str(error)) from error


def replay(bundle: Bundle, adapter: object) -> list[Record]:
    """Run the bundle's inputs through the adapter and judge them against the
    reference computed from those inputs. Returns one record per quantity."""
    metadata = bundle.metadata
    implementations = {item.name: item for item in adapter.implementations()}
    implementation = implementations.get(metadata["implementation"])
    if implementation is None:
        raise ReplayError(
            f"adapter {adapter.framework} has no implementation "
            f"{metadata['implementation']!r}; it has {', '.join(implementations)}"
        )
    devices = {device.name: device for device in adapter.devices()}
    device = devices.get(metadata["device"])
    if device is None:
        raise ReplayError(
            f"adapter {adapter.framework} has no device {metadata['device']!r}; "
            f"it has {', '.join(devices)}"
        )
    # Bundles written before execution modes existed ran in the default mode.
    mode = metadata.get("execution_mode", DEFAULT_MODE)
    declared = (DEFAULT_MODE, *implementation.execution_modes)
    if mode not in declared:
        raise ReplayError(
            f"implementation {implementation.name!r} has no execution mode "
            f"{mode!r}; it has {', '.join(declared)}"
        )
    item = Item(
        adapter.framework,
        implementation.name,
        device.name,
        metadata["dtype"],
        bundle.case,
        metadata["seed"],
        bundle.operator,
        mode,
    )
    if implementation.operator != bundle.operator.name:
        raise ReplayError(
            f"implementation {implementation.name!r} computes "
            f"{implementation.operator}, but the bundle holds a "
            f"{bundle.operator.name} item"
        )
    try:
        reason = unsupported_reason(adapter, implementation, device, item)
    except AdapterMethodError as error:
        return error_records(item, str(error), implementation.gradients)
    if reason:
        raise ReplayError(f"the adapter cannot run this item: {reason}")
    return run_item(adapter, item, implementation, bundle.inputs)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m suites.replay",
        description="Rerun one replay bundle written by --replay-dir and judge it. "
        "Exit status: 0 conforming, 1 non-conforming, 2 invalid bundle or adapter.",
    )
    parser.add_argument("bundle", type=Path, help="the bundle folder, DIR/<test id>")
    choice = parser.add_mutually_exclusive_group()
    choice.add_argument(
        "--adapter",
        metavar="MODULE:OBJECT",
        help="adapter to run instead of the one in item.json",
    )
    choice.add_argument(
        "--framework",
        metavar="NAME",
        help="built-in framework adapter to run instead of the one in item.json",
    )
    arguments = parser.parse_args(argv)
    try:
        bundle = load_bundle(arguments.bundle)
        adapter = load_adapter(bundle, arguments.adapter, arguments.framework)
        records = replay(bundle, adapter)
    # The same form as argparse's own errors: "PROG: error: MESSAGE".
    except BundleError as error:
        print(f"{parser.prog}: error: invalid bundle: {error}", file=sys.stderr)
        return EXIT_INVALID
    except ReplayError as error:
        print(
            f"{parser.prog}: error: cannot replay {arguments.bundle}: {error}",
            file=sys.stderr,
        )
        return EXIT_INVALID
    for record in records:
        print(f"{record.quantity}: {record.verdict}: {record.message}")
    if all(record.conforming for record in records):
        return EXIT_CONFORMING
    return EXIT_NON_CONFORMING


if __name__ == "__main__":
    sys.exit(main())
