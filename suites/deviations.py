"""Known deviations: documented differences that get the verdict `deviation`.

An entry in the TOML data file selects records by framework and version range, and by
test id patterns (`items`), by exact coordinates (`implementations` and `cases`), or
by both, narrowed by optional devices, dtypes and quantities. It states the verdicts
it expects, the reason, a link to the evidence and the date it was recorded, and it
may bound what it covers with a message pattern and a largest error. A matching
non-conforming record becomes `deviation` and keeps its measured error and message;
a record outside those bounds keeps its own verdict, so an entry never hides a failure
other than the one it records.

After a run, an entry whose records ran but matched none is stale, and one that
selected no record at all is reported as unexercised.
"""

from __future__ import annotations

import datetime
import fnmatch
import functools
import json
import re
import tomllib
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from packaging.specifiers import InvalidSpecifier, SpecifierSet
from packaging.version import InvalidVersion, Version

from suites import dtypes, files
from suites.cases import CATALOGUE
from suites.error_model import (
    ACCUMULATED_QUANTITIES,
    BASE_QUANTITY,
    FRESH_MATCH,
    INFERENCE_QUANTITIES,
    QUANTITIES,
    REPEATED_QUANTITIES,
    RUNNING_QUANTITIES,
    SECOND_ORDER_QUANTITIES,
)

DEFAULT_PATH = Path(__file__).with_name("deviations.toml")
# An `error` is replaceable too, but only by an entry that names it in `verdicts`.
# A framework whose known defect returns NaN everywhere gets `error` ("the backend
# returned no numbers"), because a broken adapter looks the same.
REPLACEABLE = ("fail", "rejected", "error")
REQUIRED = ("framework", "versions", "reason", "link", "date")
STRING_LISTS = ("items", "implementations", "cases", "devices", "dtypes", "quantities")
OPTIONAL = (*STRING_LISTS, "verdicts", "message", "max_error", "intermittent")
# Drafts written by --update-deviations start their reason and link with this; the
# loader rejects such entries until a person has written both.
DRAFT_MARK = "TODO"
FILE_HEADER = """\
# Known differences between a framework and the exact answer, each with evidence.
# A matching `fail` record, or a `rejected` or `error` one that `verdicts` names,
# becomes `deviation`: the item passes and the report keeps the measured error. Keys:
#   framework, versions (PEP 440 specifiers), reason, link, date: required
#   items: test id patterns (fnmatch: * and ?), each matched against the whole id
#     framework-implementation-device-dtype-case
#   implementations, cases: exact names; give items, or both of these, or all three
#   devices, dtypes, quantities: optional, exact; omitted means every one
#   verdicts: optional, the verdicts expected and replaced ("fail", "rejected",
#     "error"); default ["fail"]
#   message: optional regular expression that the measured message must contain
#   max_error: optional, the largest normalized error (u) the entry covers
#   intermittent: optional, true when the difference shows in some seeds only; such
#     an entry is not reported stale by a run that it does not match
"""

# The metamorphic suite's records: the case `metamorphic`, with the relations of
# suites/metamorphic.py as quantities (kept here to spare this module its imports).
METAMORPHIC_CASE = "metamorphic"
RELATIONS = ("shift", "scale", "slice-independence", "gradient-sums")
KNOWN_QUANTITIES = (
    *QUANTITIES,
    *SECOND_ORDER_QUANTITIES,
    *RUNNING_QUANTITIES,
    *INFERENCE_QUANTITIES,
    *REPEATED_QUANTITIES,
    *ACCUMULATED_QUANTITIES,
    *RELATIONS,
)


class DeviationsError(Exception):
    """The deviations file is missing or malformed."""


def item_id(record: dict) -> str:
    """Return the test id of a record's item: framework-implementation-device-..."""
    return "-".join(
        record[key]
        for key in ("framework", "implementation", "device", "dtype", "case")
    )


@dataclass(frozen=True)
class Deviation:
    framework: str
    versions: SpecifierSet
    reason: str
    link: str
    date: datetime.date
    items: tuple[str, ...] | None = None
    implementations: tuple[str, ...] | None = None
    cases: tuple[str, ...] | None = None
    devices: tuple[str, ...] | None = None
    dtypes: tuple[str, ...] | None = None
    quantities: tuple[str, ...] | None = None
    verdicts: tuple[str, ...] = ("fail",)
    message: str | None = None
    max_error: float | None = None
    # The difference shows in some seeds only, so a run that matches nothing does
    # not make the entry stale.
    intermittent: bool = False
    index: int = field(default=0, compare=False)

    def covers(self, record: dict, version: str) -> bool:
        """Return True if the record lies within this entry's selection.

        A record of an execution mode other than the default names its
        implementation `<name>@<mode>`. An entry that names the implementation,
        or whose item pattern matches the id without the mode, covers it in every
        mode; one that names `<name>@<mode>` covers that mode alone. An entry
        that names a first-order gradient also covers a repeated or accumulated
        record of that gradient (error_model.BASE_QUANTITY) whose message ends
        in FRESH_MATCH: each of its calls equals a fresh single call, so its
        error is the first-order one and not state kept between calls."""

        def allowed(values: tuple[str, ...] | None, value: str) -> bool:
            return values is None or value in values

        label = record["implementation"]
        base = label.split("@", 1)[0]
        ids = {item_id(record), item_id({**record, "implementation": base})}
        return (
            record["framework"] == self.framework
            and version_matches(version, self.versions)
            and (
                allowed(self.implementations, label)
                or allowed(self.implementations, base)
            )
            and allowed(self.cases, record["case"])
            and allowed(self.devices, record["device"])
            and allowed(self.dtypes, record["dtype"])
            and self._covers_quantity(record)
            and (
                self.items is None
                or any(
                    fnmatch.fnmatchcase(identifier, pattern)
                    for pattern in self.items
                    for identifier in ids
                )
            )
        )

    def _covers_quantity(self, record: dict) -> bool:
        """Return True if the entry selects the record's quantity. A repeated or
        accumulated quantity is selected by its own name. It is also selected
        through its first-order gradient (named, or every quantity), unless it
        failed with a message that does not end in FRESH_MATCH. A rejection or a
        crash is the first-order one, but a failure may be state kept between
        calls."""
        quantity = record["quantity"]
        base = BASE_QUANTITY.get(quantity)
        if base is None:
            return self.quantities is None or quantity in self.quantities
        if self.quantities is not None and quantity in self.quantities:
            return True
        first_order = record.get("verdict") != "fail" or str(
            record.get("message", "")
        ).endswith(FRESH_MATCH)
        return first_order and (self.quantities is None or base in self.quantities)

    def explains(self, record: dict) -> bool:
        """Return True if a covered non-conforming record is the difference this
        entry records: an expected verdict, the message pattern, the error bound."""
        if record["conforming"] or record["verdict"] not in self.verdicts:
            return False
        if self.message is not None and not re.search(self.message, record["message"]):
            return False
        if self.max_error is not None:
            error = record.get("error")
            if not isinstance(error, (int, float)) or not error <= self.max_error:
                return False
        return True

    def describe(self) -> str:
        selection = []
        if self.items:
            selection.append(", ".join(self.items))
        if self.implementations:
            selection.append(", ".join(self.implementations))
        if self.cases:
            selection.append(", ".join(self.cases))
        return (
            f"deviation #{self.index} ({self.framework} {self.versions}, "
            f"{'; '.join(selection)})"
        )


@functools.lru_cache(maxsize=64)
def _parse_version(version: str) -> Version | None:
    """Return `version` without a local suffix such as torch's '+cpu', parsed,
    or None where it is not a PEP 440 version. Cached, because every record is
    matched against its framework's version."""
    try:
        return Version(version.split("+")[0])
    except InvalidVersion:
        return None


def is_version(version: str) -> bool:
    """Return True if deviation entries can match `version`: a PEP 440 version,
    with or without a local suffix such as torch's '+cpu'."""
    return _parse_version(version) is not None


def version_matches(version: str, specifiers: SpecifierSet) -> bool:
    """Match a framework version, ignoring a local suffix such as torch's '+cpu'."""
    parsed = _parse_version(version)
    if parsed is None:
        return False
    return specifiers.contains(parsed, prereleases=True)


def _strings(entry: dict, key: str, where: str) -> tuple[str, ...]:
    value = entry[key]
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise DeviationsError(f"{where}: {key} must be a list of strings")
    if not value:
        raise DeviationsError(f"{where}: {key} must not be empty")
    return tuple(value)


def _date(value: object, where: str) -> datetime.date:
    if isinstance(value, datetime.datetime):
        return value.date()
    if isinstance(value, datetime.date):
        return value
    if isinstance(value, str):
        try:
            return datetime.date.fromisoformat(value)
        except ValueError:
            pass
    raise DeviationsError(
        f"{where}: date must be a date such as 2026-12-04, not {value!r}"
    )


def _check_names(where: str, kind: str, names: Iterable[str], known: Iterable[str]):
    known = set(known)
    for name in names:
        if name not in known:
            raise DeviationsError(f"{where}: unknown {kind} {name!r}")


def _parse_entry(entry: object, index: int, path: Path) -> Deviation:
    where = f"{path}: deviation #{index}"
    if not isinstance(entry, dict):
        raise DeviationsError(f"{where} is not a table; use [[deviation]] tables")
    unknown = set(entry) - set(REQUIRED) - set(OPTIONAL)
    if unknown:
        raise DeviationsError(f"{where}: unknown keys {', '.join(sorted(unknown))}")
    absent = [key for key in REQUIRED if key not in entry]
    if absent:
        raise DeviationsError(f"{where}: missing keys {', '.join(absent)}")
    for key in ("framework", "versions", "reason", "link"):
        if not isinstance(entry[key], str) or not entry[key].strip():
            raise DeviationsError(f"{where}: {key} must be a non-empty string")
    for key in ("reason", "link"):
        if entry[key].strip().startswith(DRAFT_MARK):
            # A draft from --update-deviations must not pass failures unreviewed.
            raise DeviationsError(
                f"{where}: {key} is still the draft's {DRAFT_MARK!r}; write the "
                "reason and the evidence, or delete the entry"
            )
    try:
        versions = SpecifierSet(entry["versions"])
    except InvalidSpecifier as error:
        raise DeviationsError(f"{where}: invalid versions: {error}") from error

    lists = {key: _strings(entry, key, where) for key in STRING_LISTS if key in entry}
    has_coordinates = "implementations" in lists and "cases" in lists
    if "items" not in lists and not has_coordinates:
        raise DeviationsError(
            f"{where}: select records with items, or with implementations and cases"
        )
    for pattern in lists.get("items", ()):
        if not pattern.startswith(entry["framework"] + "-"):
            raise DeviationsError(
                f"{where}: item pattern {pattern!r} does not start with the "
                f"framework {entry['framework']!r} and a '-'"
            )
    case_names = [*(c.name for c in CATALOGUE), METAMORPHIC_CASE]
    _check_names(where, "case", lists.get("cases", ()), case_names)
    _check_names(where, "dtype", lists.get("dtypes", ()), dtypes.DTYPES)
    _check_names(where, "quantity", lists.get("quantities", ()), KNOWN_QUANTITIES)

    verdicts = _strings(entry, "verdicts", where) if "verdicts" in entry else ("fail",)
    for name in verdicts:
        if name not in REPLACEABLE:
            raise DeviationsError(
                f"{where}: verdict {name!r} cannot be replaced; "
                f"use {' or '.join(REPLACEABLE)}"
            )

    message = entry.get("message")
    if message is not None:
        if not isinstance(message, str) or not message:
            raise DeviationsError(f"{where}: message must be a non-empty string")
        try:
            re.compile(message)
        except re.error as error:
            raise DeviationsError(
                f"{where}: invalid message pattern: {error}"
            ) from error

    max_error = entry.get("max_error")
    if max_error is not None and (
        isinstance(max_error, bool)
        or not isinstance(max_error, (int, float))
        or not max_error > 0
    ):
        raise DeviationsError(f"{where}: max_error must be a positive number")

    intermittent = entry.get("intermittent", False)
    if not isinstance(intermittent, bool):
        raise DeviationsError(f"{where}: intermittent must be true or false")

    return Deviation(
        framework=entry["framework"],
        versions=versions,
        reason=entry["reason"].strip(),
        link=entry["link"].strip(),
        date=_date(entry["date"], where),
        items=lists.get("items"),
        implementations=lists.get("implementations"),
        cases=lists.get("cases"),
        devices=lists.get("devices"),
        dtypes=lists.get("dtypes"),
        quantities=lists.get("quantities"),
        verdicts=verdicts,
        message=message,
        max_error=None if max_error is None else float(max_error),
        intermittent=intermittent,
        index=index,
    )


def load(path: Path) -> list[Deviation]:
    """Parse a deviations file, raising DeviationsError with the file and entry."""
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as error:
        raise DeviationsError(f"cannot read deviations file {path}: {error}") from error
    except tomllib.TOMLDecodeError as error:
        raise DeviationsError(f"{path}: invalid TOML: {error}") from error
    unknown = set(data) - {"deviation"}
    if unknown:
        raise DeviationsError(f"{path}: unknown tables {', '.join(sorted(unknown))}")
    entries = data.get("deviation", [])
    if not isinstance(entries, list):
        raise DeviationsError(f"{path}: use [[deviation]] tables")
    return [_parse_entry(entry, i, path) for i, entry in enumerate(entries, start=1)]


def apply(
    records: list[dict], deviations: list[Deviation], version: str
) -> list[Deviation]:
    """Turn non-conforming records that an entry explains into deviations, in place.

    Returns the entries that matched at least one record.
    """
    used = []
    # Only non-conforming records can become deviations (see explains); most
    # records conform, so they are set aside before any entry looks at them.
    candidates = [record for record in records if not record["conforming"]]
    for deviation in deviations:
        for record in candidates:
            if not deviation.covers(record, version):
                continue
            if not deviation.explains(record):
                continue
            record["verdict"] = "deviation"
            record["conforming"] = True
            record["deviation"] = deviation.index
            record["message"] = (
                f"known deviation: {deviation.reason} ({deviation.link}); "
                f"measured: {record['message']}"
            )
            if deviation not in used:
                used.append(deviation)
    return used


# ---------------------------------------------------------------------------------
# Writing the file back, for --update-deviations


def _toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(float(value))
    if isinstance(value, datetime.date):
        return value.isoformat()
    if isinstance(value, str):
        # JSON's escapes are TOML's, except two: ASCII-only output would write
        # characters beyond the BMP as surrogate pairs, which TOML rejects, and
        # JSON leaves DEL unescaped, which TOML forbids.
        return json.dumps(value, ensure_ascii=False).replace("\x7f", "\\u007f")
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(item) for item in value) + "]"
    raise TypeError(f"cannot write {type(value).__name__} to TOML")


def _comment_text(text: str) -> str:
    """Return text safe for one TOML comment line: control characters escaped."""
    return "".join(
        character
        if character.isprintable() or character == " "
        else repr(character)[1:-1]
        for character in " ".join(text.split())
    )


def _entry_lines(fields: dict, comments: Iterable[str] = ()) -> list[str]:
    lines = [f"# {_comment_text(comment)}" for comment in comments]
    lines.append("[[deviation]]")
    for key, value in fields.items():
        if value is not None:
            lines.append(f"{key} = {_toml_value(value)}")
    return lines


def _fields(entry: Deviation) -> dict:
    return {
        "framework": entry.framework,
        "versions": str(entry.versions),
        "items": entry.items,
        "implementations": entry.implementations,
        "cases": entry.cases,
        "devices": entry.devices,
        "dtypes": entry.dtypes,
        "quantities": entry.quantities,
        "verdicts": None if entry.verdicts == ("fail",) else entry.verdicts,
        "message": entry.message,
        "max_error": entry.max_error,
        "intermittent": entry.intermittent or None,
        "date": entry.date,
        "reason": entry.reason,
        "link": entry.link,
    }


def draft_entries(
    records: Iterable[dict], versions: dict[str, str], today: datetime.date
) -> list[dict]:
    """Return one draft entry per item with a non-conforming record, for review.

    Each selects its item by exact id, with the quantities and verdicts seen, and
    carries a reason and link that a person must write.
    """
    failing: dict[str, dict] = {}
    for record in records:
        if record["conforming"] or record["verdict"] not in REPLACEABLE:
            continue
        key = item_id(record)
        draft = failing.setdefault(
            key,
            {
                "framework": record["framework"],
                "version": versions.get(record["framework"], ""),
                "quantities": [],
                "verdicts": [],
                "message": record["message"],
            },
        )
        if record["quantity"] not in draft["quantities"]:
            draft["quantities"].append(record["quantity"])
        if record["verdict"] not in draft["verdicts"]:
            draft["verdicts"].append(record["verdict"])
    drafts = []
    for key, draft in sorted(failing.items()):
        version = draft["version"].split("+")[0]
        drafts.append(
            {
                "comment": "measured: " + " ".join(draft["message"].split())[:300],
                "fields": {
                    "framework": draft["framework"],
                    "versions": f"=={version}" if version else ">=0",
                    "items": [key],
                    "quantities": draft["quantities"],
                    "verdicts": (
                        None if draft["verdicts"] == ["fail"] else draft["verdicts"]
                    ),
                    "date": today,
                    "reason": f"{DRAFT_MARK}: explain the difference, with evidence",
                    "link": f"{DRAFT_MARK}: link the evidence",
                },
            }
        )
    return drafts


def write_updated(
    path: Path,
    entries: list[Deviation],
    stale: list[Deviation],
    unexercised: list[Deviation],
    drafts: list[dict],
    outgrown: list[Deviation] = (),
) -> None:
    """Write the entries back with this run's findings marked, then the drafts."""
    stale_indexes = {entry.index for entry in stale}
    unexercised_indexes = {entry.index for entry in unexercised}
    outgrown_indexes = {entry.index for entry in outgrown}
    blocks = [FILE_HEADER.rstrip("\n")]
    for entry in entries:
        comments = []
        if entry.index in outgrown_indexes:
            comments.append(
                "OUTGROWN in this run: its items failed beyond its message or "
                "max_error; the difference changed, so check it before widening"
            )
        elif entry.index in stale_indexes:
            comments.append("STALE in this run: its items ran and none matched")
        elif entry.index in unexercised_indexes:
            comments.append("not exercised in this run: no record in its selection")
        blocks.append("\n".join(_entry_lines(_fields(entry), comments)))
    for draft in drafts:
        comments = ["NEW: a non-conforming item that no entry covers", draft["comment"]]
        blocks.append("\n".join(_entry_lines(draft["fields"], comments)))
    files.write_text_atomic(path, "\n\n".join(blocks) + "\n")
