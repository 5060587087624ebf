"""Known deviations: documented differences that get the verdict `deviation`.

A deviation entry names exact coordinates (framework, implementations, cases, and
optionally devices, dtypes and quantities), the framework versions it applies to, the
verdicts it replaces, the reason and a link to the evidence. A matching non-conforming
record becomes `deviation` and keeps its measured error and message. An entry that
matched nothing in a run that covered its coordinates is reported as stale.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from packaging.specifiers import InvalidSpecifier, SpecifierSet
from packaging.version import InvalidVersion, Version

from suites import dtypes
from suites.cases import CATALOGUE
from suites.error_model import QUANTITIES

DEFAULT_PATH = Path(__file__).with_name("deviations.toml")
REPLACEABLE = ("fail", "rejected")
REQUIRED = ("framework", "versions", "implementations", "cases", "reason", "link")
OPTIONAL = ("devices", "dtypes", "quantities", "verdicts")


class DeviationsError(Exception):
    """The deviations file is missing or malformed."""


@dataclass(frozen=True)
class Deviation:
    framework: str
    versions: SpecifierSet
    implementations: tuple[str, ...]
    cases: tuple[str, ...]
    reason: str
    link: str
    devices: tuple[str, ...] | None = None
    dtypes: tuple[str, ...] | None = None
    quantities: tuple[str, ...] | None = None
    verdicts: tuple[str, ...] = ("fail",)
    # The difference shows in some seeds only, so a run that matches nothing does
    # not make the entry stale.
    intermittent: bool = False
    index: int = field(default=0, compare=False)

    def covers(self, record: dict, version: str) -> bool:
        """Return True if the record lies within this entry's coordinates."""
        return (
            record["framework"] == self.framework
            and version_matches(version, self.versions)
            and record["implementation"] in self.implementations
            and record["case"] in self.cases
            and (self.devices is None or record["device"] in self.devices)
            and (self.dtypes is None or record["dtype"] in self.dtypes)
            and (self.quantities is None or record["quantity"] in self.quantities)
        )

    def describe(self) -> str:
        return (
            f"deviation #{self.index} ({self.framework} {self.versions}, "
            f"{', '.join(self.implementations)}, {', '.join(self.cases)})"
        )


def version_matches(version: str, specifiers: SpecifierSet) -> bool:
    """Match a framework version, ignoring a local suffix such as torch's '+cpu'."""
    try:
        parsed = Version(version.split("+")[0])
    except InvalidVersion:
        return False
    return specifiers.contains(parsed, prereleases=True)


def _strings(entry: dict, key: str, where: str) -> tuple[str, ...]:
    value = entry[key]
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise DeviationsError(f"{where}: {key} must be a list of strings")
    if not value:
        raise DeviationsError(f"{where}: {key} must not be empty")
    return tuple(value)


def _parse_entry(entry: object, index: int, path: Path) -> Deviation:
    where = f"{path}: deviation #{index}"
    if not isinstance(entry, dict):
        raise DeviationsError(f"{where} is not a table; use [[deviation]] tables")
    unknown = set(entry) - set(REQUIRED) - set(OPTIONAL) - {"intermittent"}
    if unknown:
        raise DeviationsError(f"{where}: unknown keys {', '.join(sorted(unknown))}")
    absent = [key for key in REQUIRED if key not in entry]
    if absent:
        raise DeviationsError(f"{where}: missing keys {', '.join(absent)}")
    for key in ("framework", "versions", "reason", "link"):
        if not isinstance(entry[key], str) or not entry[key].strip():
            raise DeviationsError(f"{where}: {key} must be a non-empty string")
    try:
        versions = SpecifierSet(entry["versions"])
    except InvalidSpecifier as error:
        raise DeviationsError(f"{where}: invalid versions: {error}") from error

    known_cases = {case.name for case in CATALOGUE}
    for name in _strings(entry, "cases", where):
        if name not in known_cases:
            raise DeviationsError(f"{where}: unknown case {name!r}")

    optional = {key: _strings(entry, key, where) for key in OPTIONAL if key in entry}
    for name in optional.get("dtypes", ()):
        if name not in dtypes.DTYPES:
            raise DeviationsError(f"{where}: unknown dtype {name!r}")
    for name in optional.get("quantities", ()):
        if name not in QUANTITIES:
            raise DeviationsError(f"{where}: unknown quantity {name!r}")
    for name in optional.get("verdicts", ()):
        if name not in REPLACEABLE:
            raise DeviationsError(
                f"{where}: verdict {name!r} cannot be replaced; "
                f"use {' or '.join(REPLACEABLE)}"
            )

    intermittent = entry.get("intermittent", False)
    if not isinstance(intermittent, bool):
        raise DeviationsError(f"{where}: intermittent must be true or false")

    return Deviation(
        intermittent=intermittent,
        framework=entry["framework"],
        versions=versions,
        implementations=_strings(entry, "implementations", where),
        cases=_strings(entry, "cases", where),
        reason=entry["reason"].strip(),
        link=entry["link"].strip(),
        devices=optional.get("devices"),
        dtypes=optional.get("dtypes"),
        quantities=optional.get("quantities"),
        verdicts=optional.get("verdicts", ("fail",)),
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
    """Turn matching non-conforming records into deviations, in place.

    Returns the entries that matched at least one record.
    """
    used = []
    for deviation in deviations:
        for record in records:
            if record["conforming"] or record["verdict"] not in deviation.verdicts:
                continue
            if not deviation.covers(record, version):
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
