"""The Markdown tables that docs/frameworks/ pages take from a report."""

from __future__ import annotations

import json

import pytest

from suites import behaviour


def record(implementation, case, dtype, quantity, verdict, message="", **extra):
    return {
        "framework": "fw",
        "implementation": implementation,
        "device": "cpu",
        "case": case,
        "dtype": dtype,
        "quantity": quantity,
        "verdict": verdict,
        "message": message,
        "result_dtype": dtype if verdict in ("pass", "fail") else None,
        **extra,
    }


DOCUMENT = {
    "schema": "normconf-report",
    "environment": {
        "frameworks": {
            "fw": {
                "version": "1.0",
                "implementations": [
                    {
                        "name": "a",
                        "gradients": False,
                        "gradient_reason": "no autograd",
                        "layouts": ["channels_first"],
                    }
                ],
            }
        }
    },
    "results": [
        record("a", "random-2d", "float32", "output", "pass"),
        record("a", "random-2d", "float32", "grad_input", "unsupported", "no autograd"),
        record(
            "a",
            "M1",
            "float32",
            "output",
            "rejected",
            "Error: a || b [rejection allowed: one element]",
        ),
        record("a", "random-2d", "float16", "output", "unsupported", "no float16"),
    ],
}


def test_rejection_message_escapes_pipes():
    lines = behaviour.tables(DOCUMENT, "cpu")
    row = next(line for line in lines if line.startswith("| `M1`"))
    assert "a \\|\\| b" in row
    assert "rejection allowed" not in row


def test_plain_pass_is_not_listed():
    lines = behaviour.tables(DOCUMENT, "cpu")
    assert not any(line.startswith("| `random-2d`") for line in lines)


def test_dtype_table_gives_reason_and_returned_dtype():
    lines = behaviour.tables(DOCUMENT, "cpu")
    row = next(line for line in lines if line.startswith("| `a` |"))
    assert "unsupported: no float16" in row
    assert "returns float32" in row


def test_missing_device_exits_2(tmp_path, capsys):
    path = tmp_path / "report.json"
    path.write_text(json.dumps(DOCUMENT), encoding="utf-8")
    assert behaviour.main([str(path), "--device", "cuda"]) == 2
    assert "no records for device 'cuda'" in capsys.readouterr().err


@pytest.mark.parametrize("content", ["[1]", "{}", "not json"])
def test_not_a_report_exits_2(tmp_path, capsys, content):
    path = tmp_path / "report.json"
    path.write_text(content, encoding="utf-8")
    assert behaviour.main([str(path)]) == 2
    error = capsys.readouterr().err
    assert error.startswith("python -m suites.behaviour: error: ")
    assert str(path) in error
