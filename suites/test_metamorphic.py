"""Metamorphic conformance: one item per (implementation, device, dtype), each
checking the relations of suites/metamorphic.py on the implementation's operator.

The relations need no reference value: they run the implementation on related
inputs and compare its own results. Each relation is one record in the report, with
the case `metamorphic` and the relation as its quantity.
"""

from __future__ import annotations

import pytest

from adapters.contract import Rejected
from suites import deviations, metamorphic
from suites.plugin import RECORDS_KEY, MetamorphicTarget, command_for_test, state_key
from suites.verdicts import Record

CASE = deviations.METAMORPHIC_CASE


def _record(target: MetamorphicTarget, relation: str, verdict: str, **fields) -> Record:
    return Record(
        op=target.implementation.operator,
        framework=target.adapter.framework,
        implementation=target.implementation.name,
        device=target.device.name,
        dtype=target.dtype,
        case=CASE,
        quantity=relation,
        verdict=verdict,
        conforming=verdict in ("pass", "unsupported", "deviation"),
        error=fields.pop("error", None),
        budget=fields.pop("budget", None),
        message=fields.pop("message"),
    )


def _records(target: MetamorphicTarget) -> list[Record]:
    """Check every relation, or record why none can run."""
    relations = metamorphic.RELATIONS
    if not target.implementation.gradients:
        relations = relations[:-1]
    reason = _unsupported(target)
    if reason is not None:
        return [
            _record(target, relation, "unsupported", message=reason)
            for relation in relations
        ]
    try:
        outcomes = metamorphic.check(
            target.adapter,
            target.implementation,
            target.device.name,
            target.dtype,
            target.seed,
        )
    except Rejected as rejection:
        message = f"the framework rejected a relation's input: {rejection}"
        return [_record(target, r, "rejected", message=message) for r in relations]
    except Exception as error:  # noqa: BLE001 - any adapter failure is a verdict
        message = f"adapter raised {type(error).__name__}: {error}"
        return [_record(target, r, "error", message=message) for r in relations]
    records = []
    for outcome in outcomes:
        if outcome.satisfied is None:
            verdict = "unsupported"
        else:
            verdict = "pass" if outcome.satisfied else "fail"
        records.append(
            _record(
                target,
                outcome.relation,
                verdict,
                error=outcome.error,
                budget=outcome.budget,
                message=outcome.message,
            )
        )
    return records


def _unsupported(target: MetamorphicTarget) -> str | None:
    """Return why the relations cannot run on this target, or None."""
    if not target.device.available:
        return target.device.reason or f"device {target.device.name} is absent"
    if "channels_first" not in target.implementation.layouts:
        return "the relations' inputs are channels_first, which it does not accept"
    declared = getattr(target.adapter, "unsupported_reason", None)
    if declared is not None:
        return declared(target.implementation.name, target.device.name, target.dtype)
    return None


def test_metamorphic(metamorphic_target: MetamorphicTarget, request):
    target = metamorphic_target
    config = request.config
    state = config.stash[state_key]
    rows = [dict(vars(record)) for record in _records(target)]
    deviations.apply(rows, state.deviations, target.adapter.version())
    options = [
        f"--seed={target.seed}",
        f"--dtypes={target.dtype}",
        f"--devices={target.device.name}",
    ]
    command = command_for_test(request, target.adapter.framework, options)
    for row in rows:
        row.update(command=command, replay_command=None, inputs=None)
        row["worst_slice"] = None
    request.node.user_properties.append((RECORDS_KEY, rows))

    if all(row["verdict"] == "unsupported" for row in rows):
        pytest.skip(rows[0]["message"])
    failing = [row["message"] for row in rows if not row["conforming"]]
    if failing:
        pytest.fail("\n".join([*failing, f"  rerun: {command}"]), pytrace=False)
