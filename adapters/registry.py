"""Find adapters: built-in ones, `module:object` specs, and packaging entry points."""

from __future__ import annotations

import importlib
import importlib.metadata
from dataclasses import dataclass

from adapters.contract import ContractError, validate

ENTRY_POINT_GROUP = "normconf.adapters"

# Built-in adapters by framework name. Each module imports its framework at import
# time, so a framework that is not installed shows up as an ImportError here.
BUILTIN = {
    "mxnet": "adapters.mxnet:MXNetAdapter",
    "onnxruntime": "adapters.onnxruntime:OnnxRuntimeAdapter",
    "onnxruntime-training": "adapters.onnxruntime:OnnxRuntimeTrainingAdapter",
    "tensorflow": "adapters.tensorflow:TensorFlowAdapter",
    "torch": "adapters.pytorch:TorchAdapter",
}


class AdapterLoadError(Exception):
    """An adapter could not be found, imported or instantiated."""


@dataclass(frozen=True)
class Missing:
    """A built-in adapter whose framework is not installed."""

    framework: str
    reason: str


def load_object(spec: str) -> object:
    """Import `module:object` and return the object, instantiated if it is a class."""
    module_name, separator, attribute = spec.partition(":")
    if not separator or not module_name or not attribute:
        raise AdapterLoadError(
            f"invalid adapter spec {spec!r}: expected module:object, "
            "for example adapters.pytorch:TorchAdapter"
        )
    try:
        module = importlib.import_module(module_name)
    except Exception as error:  # noqa: BLE001 - a syntax error is a load error too
        raise AdapterLoadError(
            f"adapter module {module_name!r} from {spec!r} failed to import: "
            f"{type(error).__name__}: {error}"
        ) from error
    target = module
    for part in attribute.split("."):
        try:
            target = getattr(target, part)
        except AttributeError as error:
            raise AdapterLoadError(
                f"adapter object {attribute!r} not found in module {module_name!r}"
            ) from error
    if isinstance(target, type):
        try:
            target = target()
        except Exception as error:  # noqa: BLE001 - reported before any case runs
            # An adapter class may find at construction that its framework lacks
            # what it needs (onnxruntime without the training extension).
            raise AdapterLoadError(
                f"adapter {spec!r} cannot start: {type(error).__name__}: {error}"
            ) from error
    return target


def load(spec: str, origin: str | None = None) -> object:
    """Load and validate the adapter at `spec` (module:object). `origin` names it
    in error messages; default: the spec."""
    adapter = load_object(spec)
    try:
        validate(adapter, origin or spec)
    except ContractError as error:
        raise AdapterLoadError(str(error)) from error
    return adapter


def load_builtin(framework: str) -> object:
    """Load a built-in adapter by framework name."""
    if framework not in BUILTIN:
        known = ", ".join(sorted(BUILTIN))
        raise AdapterLoadError(
            f"unknown framework {framework!r}; built-in frameworks: {known}"
        )
    return load(BUILTIN[framework])


def discover_builtin() -> tuple[list[object], list[Missing]]:
    """Load every built-in adapter whose framework imports; list the others."""
    found, missing = [], []
    for framework in sorted(BUILTIN):
        try:
            found.append(load_builtin(framework))
        except AdapterLoadError as error:
            if not isinstance(error.__cause__, ImportError):
                raise
            missing.append(Missing(framework, str(error)))
    return found, missing


def entry_point_origin(name: str, spec: str) -> str:
    """Return how error messages name an entry-point adapter."""
    return f"{spec} (entry point {name!r} in group {ENTRY_POINT_GROUP})"


def entry_points_found(names: list[str] | None = None) -> dict[str, str]:
    """Return the module:object spec of each `normconf.adapters` entry point by
    entry point name.

    With `names`, return only those entry points and raise if one is not installed.
    """
    points = {
        point.name: point
        for point in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)
    }
    if names is not None:
        absent = [name for name in names if name not in points]
        if absent:
            raise AdapterLoadError(
                f"no {ENTRY_POINT_GROUP} entry point named {', '.join(absent)}; "
                f"installed: {', '.join(sorted(points)) or 'none'}"
            )
        points = {name: points[name] for name in names}
    return {name: point.value for name, point in points.items()}


def entry_point_specs(names: list[str] | None = None) -> list[str]:
    """Return the module:object spec of each `normconf.adapters` entry point."""
    return list(entry_points_found(names).values())


def load_entry_points(names: list[str] | None = None) -> list[object]:
    """Load adapters registered under the `normconf.adapters` entry point group.

    With `names`, load only those entry points and raise if one is not installed.
    """
    return [
        load(spec, entry_point_origin(name, spec))
        for name, spec in entry_points_found(names).items()
    ]
