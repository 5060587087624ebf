"""The deviations file: parsing, validation and matching."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from packaging.specifiers import SpecifierSet

from suites import deviations

ENTRY = """
[[deviation]]
framework = "torch"
versions = ">=2.10"
date = 2026-12-04
implementations = ["functional"]
cases = ["eps0"]
reason = "a reason"
link = "https://example.invalid/evidence"
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "deviations.toml"
    path.write_text(text, encoding="utf-8")
    return path


def record(**overrides) -> dict:
    row = {
        "framework": "torch",
        "implementation": "functional",
        "device": "cpu",
        "dtype": "float32",
        "case": "eps0",
        "quantity": "output",
        "verdict": "fail",
        "conforming": False,
        "message": "output: worst element ...",
    }
    row.update(overrides)
    return row


def test_shipped_file_parses():
    entries = deviations.load(deviations.DEFAULT_PATH)
    assert entries


def test_shipped_links_resolve():
    # Each link is a web address or a file in this repository (anchor ignored).
    root = deviations.DEFAULT_PATH.parents[1]
    for entry in deviations.load(deviations.DEFAULT_PATH):
        if entry.link.startswith("https://"):
            continue
        path = root / entry.link.split("#")[0]
        assert path.is_file(), entry.link


def test_entry_fields(tmp_path):
    (entry,) = deviations.load(write(tmp_path, ENTRY))
    assert entry.framework == "torch"
    assert entry.verdicts == ("fail",)
    assert entry.quantities is None


def test_fail_becomes_deviation(tmp_path):
    entries = deviations.load(write(tmp_path, ENTRY))
    row = record()
    used = deviations.apply([row], entries, "2.13.0+cpu")
    assert used == entries
    assert row["verdict"] == "deviation"
    assert row["conforming"]
    assert "a reason" in row["message"]
    assert "worst element" in row["message"]


def test_older_version_not_matched(tmp_path):
    entries = deviations.load(write(tmp_path, ENTRY))
    row = record()
    deviations.apply([row], entries, "2.9.1")
    assert row["verdict"] == "fail"


def test_other_case_not_matched(tmp_path):
    entries = deviations.load(write(tmp_path, ENTRY))
    row = record(case="random-2d")
    deviations.apply([row], entries, "2.13.0")
    assert row["verdict"] == "fail"


def test_error_replaced_only_when_named(tmp_path):
    # A framework whose known defect returns NaN everywhere gets `error`.
    plain = deviations.load(write(tmp_path, ENTRY))
    row = record(verdict="error")
    deviations.apply([row], plain, "2.13.0")
    assert row["verdict"] == "error"
    named = deviations.load(write(tmp_path, ENTRY + "verdicts = ['error']\n"))
    deviations.apply([row], named, "2.13.0")
    assert row["verdict"] == "deviation"


def test_rejected_needs_explicit_verdicts(tmp_path):
    entries = deviations.load(write(tmp_path, ENTRY))
    row = record(verdict="rejected")
    deviations.apply([row], entries, "2.13.0")
    assert row["verdict"] == "rejected"


def test_conforming_record_untouched(tmp_path):
    entries = deviations.load(write(tmp_path, ENTRY))
    row = record(verdict="pass", conforming=True)
    deviations.apply([row], entries, "2.13.0")
    assert row["verdict"] == "pass"


@pytest.mark.parametrize(
    "text, message",
    [
        ("[[deviation]]\nframework = 'torch'\n", "missing keys"),
        (ENTRY + "colour = 'red'\n", "unknown keys colour"),
        (ENTRY.replace(">=2.10", "newest"), "invalid versions"),
        (ENTRY + "dtypes = ['float8']\n", "unknown dtype 'float8'"),
        (ENTRY + "quantities = ['grad_x']\n", "unknown quantity 'grad_x'"),
        (ENTRY + "verdicts = ['unsupported']\n", "cannot be replaced"),
        (ENTRY.replace('["eps0"]', "[]"), "cases must not be empty"),
        (ENTRY.replace('["eps0"]', '"eps0"'), "cases must be a list"),
        ("deviation = 1\n", "use [[deviation]] tables"),
        ("[deviations]\n", "unknown tables deviations"),
        ("[[deviation]\n", "invalid TOML"),
        ("deviation = [1]\n", "deviation #1 is not a table"),
        (ENTRY + "intermittent = 'yes'\n", "intermittent must be true or false"),
        (ENTRY.replace('["eps0"]', '["eps-zero"]'), "unknown case 'eps-zero'"),
    ],
    ids=[
        "missing",
        "unknown-key",
        "versions",
        "dtype",
        "quantity",
        "verdict",
        "empty",
        "not-list",
        "not-table",
        "table-name",
        "toml",
        "entry-not-table",
        "intermittent",
        "case",
    ],
)
def test_malformed_file_rejected(tmp_path, text, message):
    with pytest.raises(deviations.DeviationsError, match=re.escape(message)):
        deviations.load(write(tmp_path, text))


def test_local_version_suffix_ignored():
    assert deviations.version_matches("2.13.0+cpu", SpecifierSet(">=2.10"))


def test_unparsable_version_never_matches():
    assert not deviations.version_matches("nightly", SpecifierSet(">=0"))


ITEMS_ENTRY = """
[[deviation]]
framework = "torch"
versions = ">=2.10"
date = "2026-12-04"
items = ["torch-functional-*-float32-eps0"]
reason = "a reason"
link = "https://example.invalid/evidence"
"""


def test_items_pattern_matches_whole_id(tmp_path):
    entries = deviations.load(write(tmp_path, ITEMS_ENTRY))
    row = record()
    deviations.apply([row], entries, "2.13.0")
    assert row["verdict"] == "deviation"


def test_items_pattern_other_dtype_not_matched(tmp_path):
    entries = deviations.load(write(tmp_path, ITEMS_ENTRY))
    row = record(dtype="float64")
    deviations.apply([row], entries, "2.13.0")
    assert row["verdict"] == "fail"


def test_message_pattern_limits_what_is_covered(tmp_path):
    entries = deviations.load(
        write(tmp_path, ENTRY + 'message = "non-finite mismatch"\n')
    )
    nan_row = record(message="output: ... error a non-finite mismatch > budget")
    numeric_row = record(message="output: ... error 52 u > budget 44 u")
    deviations.apply([nan_row, numeric_row], entries, "2.13.0")
    assert nan_row["verdict"] == "deviation"
    assert numeric_row["verdict"] == "fail"


def test_max_error_limits_what_is_covered(tmp_path):
    entries = deviations.load(write(tmp_path, ENTRY + "max_error = 300\n"))
    small = record(error=250.0)
    large = record(error=3000.0)
    deviations.apply([small, large], entries, "2.13.0")
    assert small["verdict"] == "deviation"
    assert large["verdict"] == "fail"


@pytest.mark.parametrize(
    "text, message",
    [
        (ENTRY.replace("date = 2026-12-04\n", ""), "missing keys date"),
        (ENTRY.replace("2026-12-04", '"yesterday"'), "date must be a date"),
        (
            ENTRY.replace('cases = ["eps0"]\n', ""),
            "select records with items, or with implementations and cases",
        ),
        (
            ITEMS_ENTRY.replace("torch-functional", "mxnet-functional"),
            "does not start with the framework 'torch'",
        ),
        (ENTRY + 'message = "("\n', "invalid message pattern"),
        (ENTRY + "max_error = -1\n", "max_error must be a positive number"),
    ],
    ids=["no-date", "bad-date", "no-selection", "pattern-framework", "regex", "bound"],
)
def test_new_keys_validated(tmp_path, text, message):
    with pytest.raises(deviations.DeviationsError, match=re.escape(message)):
        deviations.load(write(tmp_path, text))


def test_update_round_trip(tmp_path):
    entries = deviations.load(deviations.DEFAULT_PATH)
    failing = record(
        framework="torch",
        implementation="group-norm",
        case="random-2d",
        message="output: worst element [0, 1]\nsecond line",
    )
    drafts = deviations.draft_entries(
        [failing, record(conforming=True, verdict="pass")],
        {"torch": "2.13.0+cpu"},
        deviations.datetime.date(2026, 12, 4),
    )
    assert len(drafts) == 1
    target = tmp_path / "updated.toml"
    deviations.write_updated(target, entries, entries[:1], entries[1:2], drafts)
    # Drafts load only once a person has written their reason and link.
    with pytest.raises(deviations.DeviationsError, match="draft"):
        deviations.load(target)
    target.write_text(
        target.read_text(encoding="utf-8").replace("TODO", "written"),
        encoding="utf-8",
    )
    reloaded = deviations.load(target)
    assert len(reloaded) == len(entries) + 1
    assert reloaded[-1].items == ("torch-group-norm-cpu-float32-random-2d",)
    assert str(reloaded[-1].versions) == "==2.13.0"
    text = target.read_text(encoding="utf-8")
    assert text.count("STALE in this run") == 1
    assert text.count("not exercised in this run") == 1
    for old, new in zip(entries, reloaded, strict=False):
        assert (old.reason, old.link, old.versions) == (
            new.reason,
            new.link,
            new.versions,
        )


def test_written_strings_survive_toml():
    text = 'quote " backslash \\ tab \t newline \n emoji \U0001f600 del \x7f'
    line = deviations._toml_value(text)
    parsed = deviations.tomllib.loads(f"value = {line}\n")
    assert parsed["value"] == text


def test_draft_entries_are_rejected_until_written(tmp_path):
    text = ENTRY.replace('reason = "a reason"', 'reason = "TODO: explain"')
    with pytest.raises(deviations.DeviationsError, match="still the draft's 'TODO'"):
        deviations.load(write(tmp_path, text))


def test_comments_escape_control_characters(tmp_path):
    failing = record(message="\x1b[31mred\x1b[0m \x00 \x7f done")
    drafts = deviations.draft_entries(
        [failing], {"torch": "2.13.0"}, deviations.datetime.date(2026, 12, 4)
    )
    target = tmp_path / "updated.toml"
    deviations.write_updated(target, [], [], [], drafts)
    text = target.read_text(encoding="utf-8")
    parsed = deviations.tomllib.loads(text)
    assert len(parsed["deviation"]) == 1
    assert "\\x1b[31mred" in text
