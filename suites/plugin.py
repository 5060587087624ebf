"""The normconf pytest plugin: options, adapter loading, parametrization, the report.

Loaded by the top-level conftest.py. Adapters load only when the run collects the
conformance suites, so `pytest tests` needs no framework installed.
"""

from __future__ import annotations

import dataclasses
import datetime
import gc
import os
import shlex
import signal
import tempfile
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from adapters import registry
from adapters.contract import DEFAULT_MODE, Device, Implementation
from suites import (
    cases,
    deviations,
    dtypes,
    files,
    isolation,
    repeated_backward,
    replay,
    report,
    running_statistics,
)
from suites.second_order import select_targets
from suites.verdicts import AdapterMethodError, Item, item_inputs

SUITES_DIR = Path(__file__).resolve().parent
DEFAULT_DTYPES = ("float32", "float64", "float16", "bfloat16")
RECORDS_KEY = "normconf_records"
# Part of the node id of every conformance item.
CONFORMANCE_TEST = "::test_normalization["
# Part of the node id of every second-order item (suites/test_second_order.py),
# and the fixture that carries its target.
SECOND_ORDER_TEST = "::test_second_order["
SECOND_ORDER_FIXTURE = "second_order_target"
METAMORPHIC_TEST = "::test_metamorphic["
METAMORPHIC_FIXTURE = "metamorphic_target"
RUNNING_TEST = "::test_running_statistics["
RUNNING_FIXTURE = "running_target"
BACKWARD_TEST = "::test_repeated_backward["
BACKWARD_FIXTURE = "backward_target"
# The ONNX Runtime adapter reads its providers from this variable, which worker
# processes inherit; --ort-providers sets it.
ORT_PROVIDERS_VARIABLE = "NORMCONF_ORT_PROVIDERS"
# The isolation options by destination name, with their defaults. A rerun command
# repeats those a run changed. The item time limit is generous, because the first
# item of a worker also pays for the framework's own start (a CUDA context, kernel
# compilation). The memory limit is half the machine's memory.
ISOLATION_DEFAULTS = {
    "isolation": "process",
    "item_timeout": 120.0,
    "worker_memory": (isolation.physical_memory_mib() or 0) // 2,
}


@dataclass(frozen=True)
class Target:
    """One parametrized conformance item: the adapter and the item's coordinates."""

    adapter: object
    implementation: Implementation
    device: Device
    item: Item

    @property
    def test_id(self) -> str:
        return self.item.item_id


@dataclass
class State:
    adapters: list[object]
    missing: list[registry.Missing]
    deviations: list[deviations.Deviation]
    records: list[dict]
    # How each adapter was loaded, by framework name: ("framework", built-in name)
    # or ("adapter", module:object spec). Replay bundles store it.
    sources: dict[str, tuple[str, str]] = dataclasses.field(default_factory=dict)
    # The conformance items collected and selected, or None where this process
    # did not collect them (the controller of an xdist run).
    expected_items: int | None = None
    # The node ids of the items that recorded verdicts.
    recorded_items: set[str] = dataclasses.field(default_factory=set)
    # Why a file the run writes at its end could not be written, by option name.
    failed_writes: dict[str, str] = dataclasses.field(default_factory=dict)

    def deviation_status(self) -> DeviationStatus:
        """Sort the entries for the frameworks that ran by what this run showed.

        Stale: records in the entry's selection ran and none matched it (an
        intermittent entry is never stale). Outgrown: a record in its selection
        failed with an expected verdict but beyond its message or max_error.
        Unexercised: no record in its selection ran, as when it names an
        implementation the adapter does not declare.
        """
        versions = {adapter.framework: adapter.version() for adapter in self.adapters}
        status = DeviationStatus()
        for entry in self.deviations:
            version = versions.get(entry.framework)
            if version is None or not deviations.version_matches(
                version, entry.versions
            ):
                continue
            covered = [r for r in self.records if entry.covers(r, version)]
            ran = [r for r in covered if r["verdict"] != "unsupported"]
            used = [r for r in covered if r.get("deviation") == entry.index]
            beyond = [
                r
                for r in covered
                if not r["conforming"] and r["verdict"] in entry.verdicts
            ]
            if not ran:
                status.unexercised.append(entry)
            elif beyond:
                status.outgrown.append(entry)
            elif not used and not entry.intermittent:
                status.stale.append(entry)
        return status


@dataclass
class DeviationStatus:
    """The deviation entries that a run's records call into question."""

    stale: list = dataclasses.field(default_factory=list)
    outgrown: list = dataclasses.field(default_factory=list)
    unexercised: list = dataclasses.field(default_factory=list)


state_key = pytest.StashKey[State]()


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("normconf", "normconf conformance suite")
    group.addoption(
        "--framework",
        action="append",
        default=[],
        metavar="NAME",
        help="built-in framework adapter to run (repeatable or comma-separated; "
        f"known: {', '.join(sorted(registry.BUILTIN))}). Default: every installed one, "
        "plus installed entry-point adapters, unless --adapter is given.",
    )
    group.addoption(
        "--adapter",
        action="append",
        default=[],
        metavar="MODULE:OBJECT",
        help="third-party adapter to run, as module:object (repeatable)",
    )
    group.addoption(
        "--devices",
        default=None,
        metavar="LIST",
        help="comma-separated devices to run, by name or kind (cpu, cuda, cuda:1, "
        "gpu:1); gpu selects every GPU, whether an adapter calls it cuda or gpu. "
        "Default: every device the adapters declare.",
    )
    group.addoption(
        "--dtypes",
        default=",".join(DEFAULT_DTYPES),
        metavar="LIST",
        help=f"comma-separated dtypes to test (known: {', '.join(dtypes.DTYPES)}; "
        f"default: %(default)s)",
    )
    group.addoption(
        "--cases",
        default=None,
        metavar="LIST",
        help="comma-separated catalogue case names to run (default: all)",
    )
    group.addoption(
        "--execution-modes",
        default=None,
        metavar="LIST",
        help="comma-separated execution modes to run the catalogue in: "
        f"{DEFAULT_MODE!r} and the modes implementations declare (compile, "
        "function, ...); default every declared mode",
    )
    group.addoption(
        "--seed",
        type=int,
        default=0,
        help="seed for every case's random inputs (default: %(default)s)",
    )
    group.addoption(
        "--deviations",
        default=str(deviations.DEFAULT_PATH),
        metavar="PATH",
        help="TOML file of known deviations (default: suites/deviations.toml)",
    )
    group.addoption(
        "--update-deviations",
        default=None,
        metavar="PATH",
        help="after the run, write the deviations file to PATH for review: every "
        "entry, marked where stale or unexercised, and a draft entry for each "
        "non-conforming item that no entry covers",
    )
    group.addoption(
        "--report",
        default=None,
        metavar="PATH",
        help="write the JSON conformance report to PATH",
    )
    group.addoption(
        "--ort-providers",
        default=None,
        metavar="LIST",
        help="ONNX Runtime execution providers to test, comma-separated (sets "
        f"{ORT_PROVIDERS_VARIABLE} for the run and its workers); default: that "
        "variable, or every provider the installed package reports",
    )
    group.addoption(
        "--isolation",
        choices=("process", "none"),
        default=ISOLATION_DEFAULTS["isolation"],
        help="where adapters compute: 'process' (default) runs each adapter in a "
        "worker process, so that a crash, hang or leak gives one item verdict "
        "error and the run goes on; 'none' runs them in the pytest process",
    )
    group.addoption(
        "--item-timeout",
        type=float,
        default=ISOLATION_DEFAULTS["item_timeout"],
        metavar="SECONDS",
        help="with --isolation=process, the seconds an item may run before its "
        "worker is killed and the item gets verdict error (default: %(default)s)",
    )
    group.addoption(
        "--worker-memory",
        type=int,
        default=ISOLATION_DEFAULTS["worker_memory"],
        metavar="MIB",
        help="with --isolation=process, the resident memory in MiB above which a "
        "worker is killed and its item gets verdict error; 0 for no limit "
        "(default: half the machine's memory, %(default)s)",
    )
    group.addoption(
        "--replay-dir",
        default=None,
        metavar="DIR",
        help="write a replay bundle (inputs.npz and item.json) to DIR/<test id>/ "
        "for every non-conforming item; rerun one with python -m suites.replay",
    )
    group.addoption(
        "--properties",
        choices=("ci", "deep", "off"),
        default="ci",
        help="the property-based suite's profile (suites/test_properties.py): 'ci' "
        "(default) runs 10 fixed examples per implementation and device over "
        "well-conditioned values; 'deep' runs 300 random ones over the whole range; "
        "'off' runs none. --cases also runs none",
    )
    group.addoption(
        "--property-examples",
        type=int,
        default=None,
        metavar="N",
        help="examples per property test, in place of the profile's number",
    )


def _split(values: list[str] | str | None) -> list[str]:
    if values is None:
        return []
    if isinstance(values, str):
        values = [values]
    parts = [
        part.strip() for value in values for part in value.split(",") if part.strip()
    ]
    # A name given twice selects once: duplicated items would share a test id.
    return list(dict.fromkeys(parts))


def _collects_suites(config: pytest.Config) -> bool:
    """Return True if the run's arguments include the conformance suites."""
    arguments = config.args or [str(config.rootpath)]
    for argument in arguments:
        path = Path(argument.split("::")[0]).resolve()
        if (
            path == SUITES_DIR
            or SUITES_DIR in path.parents
            or path in SUITES_DIR.parents
        ):
            return True
    return False


def _load_adapters(
    config: pytest.Config,
) -> tuple[list[object], list[registry.Missing], dict[str, tuple[str, str]]]:
    """Load the selected adapters. Returns them, the built-ins that are not
    installed, and how each adapter was loaded (see State.sources)."""
    frameworks = _split(config.getoption("framework"))
    specs = config.getoption("adapter")
    try:
        if frameworks or specs:
            loaded = [
                (registry.load_builtin(name), ("framework", name))
                for name in frameworks
            ]
            loaded += [(registry.load(spec), ("adapter", spec)) for spec in specs]
            missing: list[registry.Missing] = []
        else:
            builtin, missing = registry.discover_builtin()
            loaded = [
                (adapter, ("framework", adapter.framework)) for adapter in builtin
            ]
            loaded += [
                (
                    registry.load(spec, registry.entry_point_origin(name, spec)),
                    ("adapter", spec),
                )
                for name, spec in registry.entry_points_found().items()
            ]
    except registry.AdapterLoadError as error:
        raise pytest.UsageError(str(error)) from error
    adapters = [adapter for adapter, _ in loaded]
    names = [adapter.framework for adapter in adapters]
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise pytest.UsageError(
            f"two adapters share the framework name {', '.join(duplicates)}; "
            "each adapter needs a unique `framework`"
        )
    sources = {adapter.framework: source for adapter, source in loaded}
    return adapters, missing, sources


def _validate_selection(config: pytest.Config) -> None:
    for option in ("dtypes", "cases", "devices", "execution_modes"):
        value = config.getoption(option)
        if value is not None and not _split(value):
            flag = option.replace("_", "-")
            raise pytest.UsageError(f"--{flag}: the list is empty")
    for option in ("framework", "adapter"):
        if any(not _split(value) for value in config.getoption(option)):
            raise pytest.UsageError(f"--{option}: empty value")
    for name in _split(config.getoption("dtypes")):
        try:
            dtypes.check_dtype(name)
        except ValueError as error:
            raise pytest.UsageError(f"--dtypes: {error}") from error
    for name in _split(config.getoption("cases")):
        try:
            cases.by_name(name)
        except KeyError as error:
            raise pytest.UsageError(f"--cases: {error.args[0]}") from error
    if config.getoption("seed") < 0:
        raise pytest.UsageError("--seed must be a non-negative integer")
    timeout = config.getoption("item_timeout")
    if not timeout > 0 or timeout == float("inf"):
        raise pytest.UsageError(
            f"--item-timeout must be a positive number of seconds, not {timeout}"
        )
    if config.getoption("worker_memory") < 0:
        raise pytest.UsageError("--worker-memory must be 0 (no limit) or more MiB")
    examples = config.getoption("property_examples")
    if examples is not None and examples < 1:
        raise pytest.UsageError(
            f"--property-examples must be a positive number of examples, not {examples}"
        )


def _isolate(config: pytest.Config, adapters: list, sources: dict) -> list:
    """Return the adapters, each wrapped to run in a worker process unless
    --isolation=none."""
    if config.getoption("isolation") == "none":
        return adapters
    limits = isolation.Limits(
        timeout_s=config.getoption("item_timeout"),
        memory_mib=config.getoption("worker_memory") or None,
    )
    return [
        isolation.IsolatedAdapter(adapter, sources[adapter.framework], limits)
        for adapter in adapters
    ]


def _stop_on_sigterm(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"stopped by signal {signal.Signals(signum).name}")


def pytest_configure(config: pytest.Config) -> None:
    _validate_selection(config)
    # A CI job that is cancelled gets SIGTERM. Stopping as on Ctrl-C lets pytest
    # finish the session, so the report is written and marked incomplete.
    if (
        threading.current_thread() is threading.main_thread()
        and signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
    ):
        signal.signal(signal.SIGTERM, _stop_on_sigterm)
    providers = config.getoption("ort_providers")
    if providers is not None:
        if not _split(providers):
            raise pytest.UsageError("--ort-providers: the list is empty")
        os.environ[ORT_PROVIDERS_VARIABLE] = ",".join(_split(providers))
    adapters: list[object] = []
    missing: list[registry.Missing] = []
    sources: dict[str, tuple[str, str]] = {}
    if _collects_suites(config):
        adapters, missing, sources = _load_adapters(config)
        if not adapters and not config.getoption("collectonly"):
            not_installed = "; ".join(m.reason for m in missing) or "none found"
            raise pytest.UsageError(
                "no adapter to run: no built-in framework is installed and no "
                f"--adapter or entry-point adapter was given ({not_installed})"
            )
        _check_devices(config, adapters)
        _check_execution_modes(config, adapters)
        adapters = _isolate(config, adapters, sources)
    _check_output_path(config, "report")
    _check_output_path(config, "update_deviations")
    _check_output_dir(config, "replay_dir")
    try:
        known = deviations.load(Path(config.getoption("deviations")))
    except deviations.DeviationsError as error:
        raise pytest.UsageError(f"--deviations: {error}") from error
    state = State(
        adapters=adapters,
        missing=missing,
        deviations=known,
        records=[],
        sources=sources,
    )
    config.stash[state_key] = state
    config.pluginmanager.register(RecordCollector(state), "normconf-records")


def _check_output_path(config: pytest.Config, option: str) -> None:
    """Stop with a usage error unless the file that --OPTION names can be written."""
    path = config.getoption(option)
    if not path:
        return
    flag = "--" + option.replace("_", "-")
    try:
        target = files.replaceable_target(Path(path))
    except OSError as error:
        raise pytest.UsageError(f"{flag}: {error}") from error
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise pytest.UsageError(
            f"{flag}: cannot create the folder for {path}: {error}"
        ) from error
    if target.is_dir() or not os.access(target.parent, os.W_OK):
        raise pytest.UsageError(f"{flag}: {path} is not a writable file path")
    # Open it now, so that a path the checks above miss (/proc/x.json) fails before
    # the run rather than after it. A file created only by this check is removed.
    existed = target.exists()
    try:
        with open(target, "a", encoding="utf-8"):
            pass
    except OSError as error:
        raise pytest.UsageError(f"{flag}: cannot write {path}: {error}") from error
    if not existed:
        target.unlink()


def _check_output_dir(config: pytest.Config, option: str) -> None:
    """Stop with a usage error unless the folder that --OPTION names can be created
    and written to."""
    path = config.getoption(option)
    if not path:
        return
    flag = "--" + option.replace("_", "-")
    target = Path(path)
    try:
        target.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise pytest.UsageError(f"{flag}: cannot create {path}: {error}") from error
    if not target.is_dir() or not os.access(target, os.W_OK):
        raise pytest.UsageError(f"{flag}: {path} is not a writable folder")
    # Write a file now, so that a folder the checks above miss fails before the run
    # rather than at its first failing item.
    try:
        with tempfile.NamedTemporaryFile(dir=target):
            pass
    except OSError as error:
        raise pytest.UsageError(f"{flag}: cannot write in {path}: {error}") from error


# Device kinds that are GPUs: torch and ONNX Runtime name them "cuda", MXNet and
# TensorFlow "gpu". `--devices gpu` selects all of them.
GPU_KINDS = ("cuda", "gpu")


def _device_names(name: str) -> set[str]:
    """Return every --devices value that selects the device `name`."""
    kind = name.split(":")[0]
    names = {name, kind}
    if kind in GPU_KINDS:
        names.add("gpu")
    return names


def _device_selected(device: Device, requested: list[str]) -> bool:
    if not requested:
        return True
    return bool(_device_names(device.name) & set(requested))


def _check_execution_modes(config: pytest.Config, adapters: list[object]) -> None:
    """Raise a usage error for an --execution-modes name that no implementation
    of the loaded adapters declares."""
    requested = _split(config.getoption("execution_modes"))
    declared = {DEFAULT_MODE}
    for adapter in adapters:
        for implementation in adapter.implementations():
            declared.update(implementation.execution_modes)
    unknown = [mode for mode in requested if mode not in declared]
    if unknown:
        raise pytest.UsageError(
            f"--execution-modes: unknown mode {', '.join(unknown)}; the adapters "
            f"declare: {', '.join(sorted(declared))}"
        )


def _check_devices(config: pytest.Config, adapters: list[object]) -> None:
    requested = _split(config.getoption("devices"))
    if not requested or not adapters:
        return
    known = {
        name
        for adapter in adapters
        for device in adapter.devices()
        for name in _device_names(device.name)
    }
    unknown = [name for name in requested if name not in known]
    if unknown:
        declared = sorted(
            {device.name for adapter in adapters for device in adapter.devices()}
        )
        raise pytest.UsageError(
            f"--devices: unknown device {', '.join(unknown)}; "
            f"the adapters declare: {', '.join(declared)} (a kind such as cuda, "
            "or gpu for every GPU, selects too)"
        )


def targets(config: pytest.Config) -> list[Target]:
    """Expand the selected adapters, devices, dtypes and cases into items."""
    state = config.stash[state_key]
    selected_devices = _split(config.getoption("devices"))
    selected_dtypes = _split(config.getoption("dtypes"))
    selected_case_names = _split(config.getoption("cases"))
    selected_cases = (
        [cases.by_name(name) for name in selected_case_names]
        if selected_case_names
        else list(cases.CATALOGUE)
    )
    seed = config.getoption("seed")

    # Items that share a case and dtype run one after another, so that they share
    # the cached inputs and reference (suites.cases.materialize and
    # suites.verdicts.catalogue_reference) while those are in the cache, and the
    # dtypes of one case follow each other, sharing its float64 draws.
    selected_modes = _split(config.getoption("execution_modes"))
    combinations = [
        (adapter, implementation, device, mode)
        for adapter in state.adapters
        for implementation in adapter.implementations()
        for device in adapter.devices()
        if _device_selected(device, selected_devices)
        for mode in (DEFAULT_MODE, *implementation.execution_modes)
        if not selected_modes or mode in selected_modes
    ]
    expanded = []
    for case in selected_cases:
        for dtype in selected_dtypes:
            for adapter, implementation, device, mode in combinations:
                item = Item(
                    adapter.framework,
                    implementation.name,
                    device.name,
                    dtype,
                    case,
                    seed,
                    case.operator(implementation.operator),
                    mode,
                )
                expanded.append(Target(adapter, implementation, device, item))
    return expanded


def default_mode_targets(expanded: list[Target]) -> list[Target]:
    """Return the targets in the default execution mode: the second-order and
    running-statistics suites run in it alone."""
    return [t for t in expanded if t.item.execution_mode == DEFAULT_MODE]


def command_for_test(
    request: pytest.FixtureRequest, framework: str, options: list[str]
) -> str:
    """Return a command that reruns this test alone with `options`, through the
    adapter of `framework` as this run loaded it and with this run's deviations
    file and isolation settings, from the folder the run started in."""
    config = request.config
    state = config.stash[state_key]
    options = list(options)
    kind, name = state.sources[framework]
    options.append(f"--{kind}={name}")
    if config.getoption("deviations") != str(deviations.DEFAULT_PATH):
        options.append(f"--deviations={config.getoption('deviations')}")
    for option, default in ISOLATION_DEFAULTS.items():
        value = config.getoption(option)
        if value != default:
            options.append(f"--{option.replace('_', '-')}={value}")
    providers = os.environ.get(ORT_PROVIDERS_VARIABLE)
    if providers and framework.startswith("onnxruntime"):
        options.append(f"--ort-providers={providers}")
    # A node id is relative to the rootdir, so it names the test file only when
    # the run started there. Elsewhere the command uses the file's absolute path.
    node = request.node.nodeid
    if Path.cwd() != config.rootpath:
        node = f"{request.node.path}::{request.node.name}"
    return shlex.join(["python", "-m", "pytest", node, *options])


@dataclass(frozen=True)
class PropertyTarget:
    """One property-based test: an implementation on a device, over drawn cases."""

    adapter: object
    implementation: Implementation
    device: Device

    @property
    def test_id(self) -> str:
        return "-".join(
            (self.adapter.framework, self.implementation.name, self.device.name)
        )


@dataclass(frozen=True)
class MetamorphicTarget:
    """One metamorphic item: the relations for an implementation, device and dtype."""

    adapter: object
    implementation: Implementation
    device: Device
    dtype: str
    seed: int

    @property
    def test_id(self) -> str:
        return "-".join(
            (
                self.adapter.framework,
                self.implementation.name,
                self.device.name,
                self.dtype,
            )
        )


def metamorphic_targets(config: pytest.Config) -> list[MetamorphicTarget]:
    """Return one MetamorphicTarget per selected (adapter, implementation, device,
    dtype), or none with --cases, which selects catalogue cases only."""
    if config.getoption("cases"):
        return []
    state = config.stash[state_key]
    selected_devices = _split(config.getoption("devices"))
    seed = config.getoption("seed")
    return [
        MetamorphicTarget(adapter, implementation, device, dtype, seed)
        for dtype in _split(config.getoption("dtypes"))
        for adapter in state.adapters
        for implementation in adapter.implementations()
        for device in adapter.devices()
        if _device_selected(device, selected_devices)
    ]


def property_targets(config: pytest.Config) -> list[PropertyTarget]:
    """Return one PropertyTarget per selected (adapter, implementation, device),
    or none with --properties=off or --cases (which selects catalogue cases only)."""
    if config.getoption("properties") == "off" or config.getoption("cases"):
        return []
    state = config.stash[state_key]
    selected_devices = _split(config.getoption("devices"))
    return [
        PropertyTarget(adapter, implementation, device)
        for adapter in state.adapters
        for implementation in adapter.implementations()
        for device in adapter.devices()
        if _device_selected(device, selected_devices)
    ]


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "property_target" in metafunc.fixturenames:
        config = metafunc.config
        drawn = property_targets(config)
        if config.getoption("properties") == "off" or config.getoption("cases"):
            reason = (
                "--properties=off"
                if config.getoption("properties") == "off"
                else "--cases selects catalogue cases, and property tests draw theirs"
            )
            skipped = pytest.param(None, marks=pytest.mark.skip(reason=reason))
            metafunc.parametrize("property_target", [skipped], ids=["off"])
        else:
            metafunc.parametrize(
                "property_target", drawn, ids=[target.test_id for target in drawn]
            )
    if METAMORPHIC_FIXTURE in metafunc.fixturenames:
        checked = metamorphic_targets(metafunc.config)
        if metafunc.config.getoption("cases"):
            reason = "--cases selects catalogue cases, and the relations run none"
            skipped = pytest.param(None, marks=pytest.mark.skip(reason=reason))
            metafunc.parametrize(METAMORPHIC_FIXTURE, [skipped], ids=["off"])
        else:
            metafunc.parametrize(
                METAMORPHIC_FIXTURE,
                checked,
                ids=[target.test_id for target in checked],
            )
    if RUNNING_FIXTURE in metafunc.fixturenames:
        running = running_statistics.select_targets(
            default_mode_targets(targets(metafunc.config))
        )
        metafunc.parametrize(
            RUNNING_FIXTURE, running, ids=[target.test_id for target in running]
        )
    if BACKWARD_FIXTURE in metafunc.fixturenames:
        # The default mode only, as for second derivatives: torch's compile items
        # already take most of a torch run (docs/frameworks/torch.md, "Cost").
        repeated = repeated_backward.select_targets(
            default_mode_targets(targets(metafunc.config))
        )
        metafunc.parametrize(
            BACKWARD_FIXTURE, repeated, ids=[target.test_id for target in repeated]
        )
    if SECOND_ORDER_FIXTURE in metafunc.fixturenames:
        chosen = select_targets(default_mode_targets(targets(metafunc.config)))
        metafunc.parametrize(
            SECOND_ORDER_FIXTURE, chosen, ids=[target.test_id for target in chosen]
        )
    if "conformance_target" not in metafunc.fixturenames:
        return
    expanded = targets(metafunc.config)
    metafunc.parametrize(
        "conformance_target", expanded, ids=[target.test_id for target in expanded]
    )


def pytest_report_header(config: pytest.Config) -> list[str]:
    state = config.stash.get(state_key, None)
    if state is None or not (state.adapters or state.missing):
        return []
    import numpy

    lines = [
        f"normconf: seed {config.getoption('seed')}, numpy {numpy.__version__}, "
        f"dtypes {config.getoption('dtypes')}"
    ]
    for adapter in state.adapters:
        devices = []
        for device in adapter.devices():
            if device.available:
                devices.append(device.name)
            else:
                devices.append(f"{device.name} unavailable ({device.reason})")
        lines.append(
            f"normconf: {adapter.framework} {adapter.version()}: "
            f"devices {'; '.join(devices)}"
        )
        modes = getattr(adapter, "math_modes", None)
        settings = ", ".join(
            f"{name} = {value}"
            for name, value in (modes() if callable(modes) else {}).items()
        )
        if settings:
            lines.append(f"normconf: {adapter.framework} math modes: {settings}")
        entries = [e for e in state.deviations if e.framework == adapter.framework]
        if entries and not deviations.is_version(adapter.version()):
            lines.append(
                f"normconf: WARNING: {len(entries)} deviation entries for "
                f"{adapter.framework} cannot apply: its version "
                f"{adapter.version()!r} is not a PEP 440 version"
            )
    for missing in state.missing:
        lines.append(f"normconf: {missing.framework} not installed ({missing.reason})")
    return lines


def judge_item(
    request: pytest.FixtureRequest,
    target: Target,
    command: str,
    reason: Callable[[], str | None],
    error_records: Callable[[str], list],
    unsupported_records: Callable[[str], list],
    run: Callable[[], list],
) -> None:
    """Run one item of a suite that poses a further question of a catalogue item
    (second derivatives, running statistics, repeated backward), record its
    verdicts, and fail the test on a record that does not conform.

    `reason` returns why the item cannot run, or None, and may raise
    AdapterMethodError; the item then gets `error_records(message)` and fails,
    or `unsupported_records(reason)` and is skipped. `run` returns the records
    of an item that runs. No replay bundle is written, because a bundle contains
    a first-order request only, without the further question.
    """
    try:
        why = reason()
    except AdapterMethodError as error:
        records = error_records(str(error))
        record_verdicts(request.node, target, records, command, None, False)
        pytest.fail(str(error))
    if why:
        records = unsupported_records(why)
        record_verdicts(request.node, target, records, command, None, False)
        pytest.skip(why)

    records = run()
    inputs = item_inputs(target.item)
    rows = record_verdicts(request.node, target, records, command, inputs, False)

    overview = "; ".join(f"{r['quantity']} {r['verdict']}" for r in rows)
    for row in rows:
        assert row["conforming"], (
            f"{row['message']}\n  all quantities: {overview}\n  rerun: {command}"
        )


def record_verdicts(
    node: pytest.Item,
    target: Target,
    records: list,
    command: str,
    inputs: cases.Inputs | None,
    replayable: bool = True,
) -> list[dict]:
    """Turn an item's records into report rows and attach them to its test report
    (which also carries them across xdist workers). Returns the rows.

    Each row gets the known deviations applied, the pytest command that reruns the
    item, and, when the item ran (`inputs` are the arrays it ran on), a summary of
    its inputs and of the x slice around its worst element. With --replay-dir, a
    non-conforming item's rows also get the command that replays its bundle,
    unless `replayable` is False (second-order items, which a bundle cannot pose).
    """
    state = node.config.stash[state_key]
    # A shallow copy of each record's fields: dataclasses.asdict would deep-copy
    # every value, and nothing uses the records again.
    rows = [dict(vars(record)) for record in records]
    deviations.apply(rows, state.deviations, target.adapter.version())
    bundle = write_replay_bundle(node, target, rows, command) if replayable else None
    source = state.sources[target.adapter.framework]
    summary = None
    if inputs is not None:
        item = target.item
        summary = report.cached_inputs_summary(
            item.case, item.dtype, item.seed, item.operator
        )
    for row in rows:
        row["command"] = command
        row["replay_command"] = (
            replay.replay_command(bundle, source) if bundle else None
        )
        row["inputs"] = summary
        index = row["worst_index"]
        row["worst_slice"] = None
        if inputs is not None and index:
            # InstanceNorm's slice is set by (sample, channel) alone, and more
            # of its items share it so.
            key = tuple(index[:2] if item.operator.name == "instance_norm" else index)
            row["worst_slice"] = report.cached_worst_slice(
                item.case, item.dtype, item.seed, key, item.operator
            )
    node.user_properties.append((RECORDS_KEY, rows))
    return rows


def write_replay_bundle(
    node: pytest.Item, target: Target, rows: list[dict], command: str
) -> Path | None:
    """Write a replay bundle for the item when --replay-dir is set and a row is
    non-conforming. Returns the bundle's folder, or None when none is written."""
    directory = node.config.getoption("replay_dir")
    if not directory or all(row["conforming"] for row in rows):
        return None
    state = node.config.stash[state_key]
    return replay.write_bundle(
        Path(directory).resolve(),
        target.adapter,
        state.sources[target.adapter.framework],
        target.implementation,
        target.item,
        rows,
        command,
    )


class RecordCollector:
    """Collects the records attached to each test report, including xdist workers'."""

    def __init__(self, state: State) -> None:
        self.state = state

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        if report.when != "call":
            return
        for key, value in report.user_properties:
            if key == RECORDS_KEY:
                self.state.records.extend(value)
                # A failing property test records its smallest example too, but
                # the run's count of items leaves property tests out.
                if records_verdicts(report.nodeid):
                    self.state.recorded_items.add(report.nodeid)


def _framework_environment(state: State) -> dict[str, dict]:
    frameworks: dict[str, dict] = {}
    for adapter in state.adapters:
        modes = getattr(adapter, "math_modes", None)
        frameworks[adapter.framework] = {
            "version": adapter.version(),
            "math_modes": dict(modes()) if callable(modes) else {},
            "devices": [dataclasses.asdict(device) for device in adapter.devices()],
            "implementations": [
                dataclasses.asdict(implementation)
                for implementation in adapter.implementations()
            ],
        }
    for missing in state.missing:
        frameworks[missing.framework] = {"missing": missing.reason}
    return frameworks


def _write_updated_deviations(config: pytest.Config, state: State) -> None:
    path = config.getoption("update_deviations")
    if not path:
        return
    status = state.deviation_status()
    versions = {adapter.framework: adapter.version() for adapter in state.adapters}
    drafts = deviations.draft_entries(state.records, versions, datetime.date.today())
    deviations.write_updated(
        Path(path),
        state.deviations,
        status.stale,
        status.unexercised,
        drafts,
        status.outgrown,
    )


def pytest_collection_finish(session: pytest.Session) -> None:
    state = session.config.stash.get(state_key, None)
    if state is None:
        return
    state.expected_items = sum(records_verdicts(item.nodeid) for item in session.items)
    # The frameworks' modules and the collected items live until the run ends.
    # Frozen, they are skipped by every full garbage collection, including the
    # five at the end from pytest's unraisable-exception check (0.12 s each with
    # torch loaded, in a cProfile run without the freeze).
    gc.freeze()


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_node_collection_finished(node, ids: list[str]) -> None:
    """Count the selected items in the controller of a pytest-xdist run, which
    collects nothing itself: each worker reports the same ids."""
    state = node.config.stash.get(state_key, None)
    if state is None:
        return
    state.expected_items = sum(records_verdicts(nodeid) for nodeid in ids)


def records_verdicts(nodeid: str) -> bool:
    """Return True if the test `nodeid` records verdicts: an item of the
    catalogue, second-order, running-statistics, repeated-backward or metamorphic
    suite. A suite with nothing selected has one placeholder item, [NOTSET],
    which records none."""
    if nodeid.endswith(("[NOTSET]", "[off]")):
        return False
    return any(
        test in nodeid
        for test in (
            CONFORMANCE_TEST,
            SECOND_ORDER_TEST,
            RUNNING_TEST,
            BACKWARD_TEST,
            METAMORPHIC_TEST,
        )
    )


def run_summary(state: State, exit_status: int) -> dict:
    """Return how much of the selected matrix recorded verdicts, for the report:
    a run that -x, --maxfail or Ctrl-C stopped before its last item is marked
    incomplete. One stopped after every item recorded (as pytest-xdist's -x can
    be) is complete, whatever its exit status."""
    recorded = len(state.recorded_items)
    expected = state.expected_items
    complete = None
    if expected is not None:
        complete = recorded == expected
    return {
        "items": expected,
        "items_recorded": recorded,
        "complete": complete,
        "exit_status": int(exit_status),
    }


def pytest_unconfigure(config: pytest.Config) -> None:
    state = config.stash.get(state_key, None)
    if state is None:
        return
    for adapter in state.adapters:
        if isinstance(adapter, isolation.IsolatedAdapter):
            adapter.close()
    # Undo pytest_collection_finish's freeze, for a process that runs pytest
    # again (benchmarks/speed.py does).
    gc.unfreeze()


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    config = session.config
    state = config.stash.get(state_key, None)
    if state is None or hasattr(config, "workerinput"):
        return
    try:
        _write_updated_deviations(config, state)
    except OSError as error:
        _failed_write(session, state, "update_deviations", error)
    path = config.getoption("report")
    if not path:
        return
    document = report.build(
        state.records,
        _framework_environment(state),
        config.getoption("seed"),
        report.main_command(),
    )
    status = state.deviation_status()
    document["stale_deviations"] = [entry.describe() for entry in status.stale]
    document["outgrown_deviations"] = [entry.describe() for entry in status.outgrown]
    document["unexercised_deviations"] = [
        entry.describe() for entry in status.unexercised
    ]
    document["run"] = run_summary(state, exitstatus)
    try:
        report.write(document, Path(path))
    except OSError as error:
        _failed_write(session, state, "report", error)


def _failed_write(
    session: pytest.Session, state: State, option: str, error: OSError
) -> None:
    """Record that the file --OPTION names could not be written at the end of the
    run. The terminal summary reports the error in place of the path, and the run
    exits with pytest's usage-error status, as when the path fails the check at
    the start."""
    state.failed_writes[option] = (
        f"cannot write {session.config.getoption(option)}: {error}"
    )
    session.exitstatus = pytest.ExitCode.USAGE_ERROR


# A wrapper that runs first, so that its part after the yield comes after pytest's
# own summary sections, "short test summary info" included: the verdict table and
# the report paths end the output, before the final counts line.
@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_terminal_summary(terminalreporter, exitstatus: int, config: pytest.Config):
    result = yield
    state = config.stash.get(state_key, None)
    # A run that recorded nothing still names the files it wrote.
    writes = config.getoption("report") or config.getoption("update_deviations")
    if state is not None and (state.records or writes):
        write_summary(terminalreporter, config, state, exitstatus)
    return result


def write_summary(
    terminalreporter, config: pytest.Config, state: State, exit_status: int
) -> None:
    """Write the verdict table, the deviation entries to review and the paths of
    every file the run wrote."""
    terminalreporter.section("normconf verdicts")
    run = run_summary(state, exit_status)
    if run["complete"] is False:
        terminalreporter.write_line(
            f"incomplete run: {run['items_recorded']} of {run['items']} selected "
            "items recorded verdicts; the report says so",
            red=True,
        )
    terminalreporter.write_line(
        "records per verdict: one record per (item, quantity), so an item counts "
        "up to four times"
    )
    for line in report.count_table(state.records):
        terminalreporter.write_line(line)
    notable = report.notable_items(state.records)
    if notable:
        terminalreporter.write_line("")
        terminalreporter.write_line("rejected and deviating items:")
        for line in notable:
            terminalreporter.write_line(f"  {line}")
    status = state.deviation_status()
    for entry in status.stale:
        terminalreporter.write_line(
            f"stale: {entry.describe()} matched no record although its items ran"
        )
    for entry in status.outgrown:
        terminalreporter.write_line(
            f"outgrown: {entry.describe()} has items that failed beyond its message "
            "or max_error"
        )
    for entry in status.unexercised:
        terminalreporter.write_line(
            f"unexercised: {entry.describe()} selected no record that ran"
        )
    paths = [
        ("deviations for review", config.getoption("update_deviations")),
        ("report", config.getoption("report")),
        ("JUnit XML", getattr(config.option, "xmlpath", None)),
        ("replay bundles", config.getoption("replay_dir")),
    ]
    options = {"deviations for review": "update_deviations", "report": "report"}
    bundles = {row["replay_command"] for row in state.records if row["replay_command"]}
    for label, path in paths:
        if label == "replay bundles" and path:
            label = f"replay bundles ({len(bundles)} written by this run)"
        failure = state.failed_writes.get(options.get(label, ""))
        if failure:
            terminalreporter.write_line(f"ERROR: {label}: {failure}", red=True)
        elif path:
            terminalreporter.write_line(f"{label}: {Path(path).resolve()}")
