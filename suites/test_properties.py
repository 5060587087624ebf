"""Property-based conformance: one test per (implementation, device), each running
the examples Hypothesis draws (suites/properties.py) through the implementation.

An example fails when any of its quantities is not conforming, judged exactly as a
catalogue item is (known deviations included). The smallest failing example is
written as a replay bundle and its catalogue entry is printed in the failure.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given

from suites import deviations, properties, replay
from suites.plugin import RECORDS_KEY, PropertyTarget, command_for_test, state_key
from suites.verdicts import Item, run_item, unsupported_reason


def _bundle_folder(request: pytest.FixtureRequest) -> Path:
    """Return the folder for the failing example's bundle: --replay-dir, or this
    test's temporary folder."""
    directory = request.config.getoption("replay_dir")
    if directory:
        return Path(directory).resolve() / "properties"
    return request.getfixturevalue("tmp_path") / "bundles"


def _runnable_dtypes(target: PropertyTarget, names: tuple[str, ...]) -> tuple:
    """Return the dtypes among `names` that the adapter runs the implementation
    in on the device."""
    declared = getattr(target.adapter, "unsupported_reason", None)
    if declared is None:
        return names
    return tuple(
        name
        for name in names
        if declared(target.implementation.name, target.device.name, name) is None
    )


def test_properties(property_target: PropertyTarget, request: pytest.FixtureRequest):
    target = property_target
    config = request.config
    profile = config.getoption("properties")
    if not target.device.available:
        pytest.skip(target.device.reason or f"device {target.device.name} is absent")
    selected = properties.supported_dtypes(config.getoption("dtypes").split(","))
    dtype_names = _runnable_dtypes(target, selected)
    if not dtype_names:
        pytest.skip(
            f"{target.implementation.name} runs none of {', '.join(selected)} "
            f"on {target.device.name}"
        )
    state = config.stash[state_key]
    seed = config.getoption("seed")
    implementation = target.implementation
    strategy = properties.examples(
        implementation.operator,
        implementation.layouts,
        dtype_names,
        deep=profile == "deep",
    )

    # The latest failing example: Hypothesis runs the smallest one last.
    failures: list[tuple[Item, list[dict]]] = []

    @properties.profile_settings(profile, config.getoption("property_examples"))
    @given(example=strategy)
    def check(example: properties.Example) -> None:
        case = example.case
        item = Item(
            target.adapter.framework,
            implementation.name,
            target.device.name,
            example.dtype,
            case,
            seed,
            case.operator(implementation.operator),
        )
        reason = unsupported_reason(target.adapter, implementation, target.device, item)
        if reason is not None:
            # A drawn value beyond the dtype's range: nothing to judge.
            return
        records = run_item(target.adapter, item, implementation)
        rows = [dict(vars(record)) for record in records]
        deviations.apply(rows, state.deviations, target.adapter.version())
        failing = [row for row in rows if not row["conforming"]]
        if failing:
            failures.append((item, rows))
            messages = "; ".join(row["message"] for row in failing)
            raise AssertionError(f"{item.item_id}: {messages}")

    try:
        check()
    except Exception:
        if not failures:
            raise
    else:
        return
    # Outside the except block, so that the failure shows without the traceback
    # of the exception Hypothesis raised.
    item, rows = failures[-1]
    message, command, replay_command = _failure_report(
        request, target, item, rows, seed
    )
    # The smallest failing example's records go into the report like a
    # catalogue item's, under its drawn case name.
    for row in rows:
        row.update(command=command, replay_command=replay_command, inputs=None)
        row["worst_slice"] = None
    request.node.user_properties.append((RECORDS_KEY, rows))
    pytest.fail(message, pytrace=False)


def _failure_report(
    request: pytest.FixtureRequest,
    target: PropertyTarget,
    item: Item,
    rows: list[dict],
    seed: int,
) -> tuple[str, str, str]:
    """Write the failing example's replay bundle. Return the failure message (the
    verdicts, the commands and the catalogue entry to add), the command that
    reruns the property test, and the command that replays the bundle."""
    config = request.config
    source = config.stash[state_key].sources[target.adapter.framework]
    failing = [row for row in rows if not row["conforming"]]
    summary = (
        f"{item.item_id}: {failing[0]['quantity']} {failing[0]['verdict']} "
        f"(operator {item.operator.label}, shape {item.case.shape})"
    )

    options = [
        f"--seed={seed}",
        f"--dtypes={config.getoption('dtypes')}",
        f"--devices={target.device.name}",
        f"--properties={config.getoption('properties')}",
    ]
    if config.getoption("property_examples") is not None:
        options.append(f"--property-examples={config.getoption('property_examples')}")
    command = command_for_test(request, target.adapter.framework, options)

    bundle = replay.write_bundle(
        _bundle_folder(request),
        target.adapter,
        source,
        target.implementation,
        item,
        rows,
        command,
    )
    replay_command = replay.replay_command(bundle, source)

    messages = "\n".join(f"  {row['message']}" for row in failing)
    entry = properties.catalogue_entry(item.case, seed, summary)
    message = (
        f"smallest failing example: {summary}\n{messages}\n"
        f"  replay the bundle: {replay_command}\n"
        f"  rerun the property test: {command}\n"
        f"  catalogue entry to add to suites/cases.py:\n{entry}"
    )
    return message, command, replay_command
