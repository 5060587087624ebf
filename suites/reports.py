"""Merge normconf JSON reports and render a report as Markdown or HTML.

    python -m suites.reports merge reports/torch.json reports/mxnet.json \\
        --output reports/merged.json
    python -m suites.reports merge reports --output reports/merged.json
    python -m suites.reports markdown reports/merged.json --output reports/summary.md
    python -m suites.reports html reports/merged.json --output reports/summary.html
    python -m suites.reports diff old.json new.json --output reports/diff.md

`merge` reads reports written by `pytest suites --report PATH` (schema
`normconf-report`) or by an earlier merge (schema `normconf-merged-report`) and writes
one merged report. A folder argument means every *.json file directly inside it
except merged reports, so that a merge into that folder can run again. `markdown`
reads either kind of report and writes a summary for a CI job page. `html` writes one
self-contained page with a filterable heatmap of error / budget. `diff` compares
two reports of either kind, prints the records whose verdict or error changed, and
exits with status 1 when a record regressed, so that a CI job can fail on it.

Every command exits with status 2, and an error naming the file, when an input cannot
be read, is not a normconf report, has an unknown schema version, or repeats a record
that another input contains.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import html
import json
import math
import re
import sys
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from adapters.contract import OPERATORS
from suites import cases, files, report
from suites.deviations import METAMORPHIC_CASE
from suites.verdicts import VERDICTS, json_number

MERGED_SCHEMA = "normconf-merged-report"
MERGED_SCHEMA_VERSION = 1
# The schema versions this module reads, per schema.
KNOWN_VERSIONS = {
    report.SCHEMA: (report.SCHEMA_VERSION,),
    MERGED_SCHEMA: (MERGED_SCHEMA_VERSION,),
}
# The fields that identify a record: no two inputs of a merge may share a record.
RECORD_KEY = ("framework", "implementation", "device", "dtype", "case", "quantity")
# The lists of deviation entries that a run called into question (suites/plugin.py).
# Reports written before a list existed lack it, and it reads as empty.
DEVIATION_LISTS = ("stale_deviations", "outgrown_deviations", "unexercised_deviations")
NON_FINITE = {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}
ERROR_STATUS = 2


class ReportError(Exception):
    """An input that cannot be merged or rendered, or an output that cannot be
    written. The message names the file."""


@dataclass
class Loaded:
    """One input file: its sources (one for a single-run report) keyed by name, and
    its records, each with a `source` field naming its entry in `sources`."""

    name: str
    merged: bool
    sources: dict[str, dict]
    results: list[dict]


def display_name(path: Path) -> str:
    """Return `path` relative to the working directory when it lies inside it, so
    that a merged report names its sources the same way on every machine."""
    try:
        return path.resolve().relative_to(Path.cwd().resolve()).as_posix()
    except ValueError:
        return path.as_posix()


def _reject_constant(name: str) -> float:
    raise ValueError(
        f"the literal {name} is not strict JSON. normconf reports write non-finite "
        'numbers as the strings "NaN", "Infinity" and "-Infinity"'
    )


def read_json(path: Path, name: str) -> object:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError as error:
        raise ReportError(f"{name}: file not found") from error
    except UnicodeDecodeError as error:
        raise ReportError(f"{name}: not a JSON file (not UTF-8 text)") from error
    except OSError as error:
        raise ReportError(f"{name}: cannot read the file: {error}") from error
    try:
        return json.loads(text, parse_constant=_reject_constant)
    except ValueError as error:
        raise ReportError(f"{name}: not a JSON file: {error}") from error


def _check_schema(document: object, name: str) -> str:
    """Return the document's schema, or raise unless it is a known normconf one."""
    if not isinstance(document, dict) or document.get("schema") not in KNOWN_VERSIONS:
        found = document.get("schema") if isinstance(document, dict) else None
        raise ReportError(
            f"{name}: not a normconf report (schema {found!r}; expected "
            f"{report.SCHEMA!r} or {MERGED_SCHEMA!r})"
        )
    schema = document["schema"]
    version = document.get("schema_version")
    if type(version) is not int or version not in KNOWN_VERSIONS[schema]:
        known = ", ".join(str(v) for v in KNOWN_VERSIONS[schema])
        raise ReportError(
            f"{name}: unknown schema_version {version!r} of {schema}; this normconf "
            f"reads version {known}, so merge it with the normconf that wrote it"
        )
    return schema


def _is_report_number(value: object) -> bool:
    if value is None or (isinstance(value, str) and value in NON_FINITE):
        return True
    return isinstance(value, int | float) and not isinstance(value, bool)


def _check_record(record: object, index: int, name: str) -> None:
    where = f"{name}: results[{index}]"
    if not isinstance(record, dict):
        raise ReportError(f"{where} is not a JSON object")
    for field in (*RECORD_KEY, "verdict", "message"):
        if not isinstance(record.get(field), str):
            raise ReportError(f"{where}: field {field!r} is missing or not a string")
    if record["verdict"] not in VERDICTS:
        raise ReportError(
            f"{where}: unknown verdict {record['verdict']!r} "
            f"(known: {', '.join(VERDICTS)})"
        )
    if not isinstance(record.get("conforming"), bool):
        raise ReportError(f"{where}: field 'conforming' is missing or not a boolean")
    for field in ("error", "budget"):
        if not _is_report_number(record.get(field)):
            raise ReportError(
                f"{where}: field {field!r} is {record.get(field)!r}, not a number, "
                'null, "NaN", "Infinity" or "-Infinity"'
            )


def _source_entry(document: dict, name: str, where: str) -> dict:
    """Return the parts of a single-run report that describe its run."""
    environment = document.get("environment")
    if not isinstance(environment, dict) or not isinstance(
        environment.get("frameworks"), dict
    ):
        raise ReportError(f"{where}: 'environment.frameworks' is missing")
    entry = {
        "schema": report.SCHEMA,
        "schema_version": report.SCHEMA_VERSION,
        "created": document.get("created"),
        "environment": environment,
        "summary": document.get("summary"),
        "run": document.get("run"),
    }
    for key in DEVIATION_LISTS:
        entries = document.get(key, [])
        if not isinstance(entries, list):
            raise ReportError(f"{where}: {key!r} is not a list")
        entry[key] = entries
    return entry


def _results(document: dict, name: str) -> list[dict]:
    results = document.get("results")
    if not isinstance(results, list):
        raise ReportError(f"{name}: 'results' is missing or not a list")
    for index, record in enumerate(results):
        _check_record(record, index, name)
    return results


def load(path: Path) -> Loaded:
    """Read and check one report of either schema."""
    name = display_name(path)
    document = read_json(path, name)
    schema = _check_schema(document, name)
    results = _results(document, name)
    if schema == report.SCHEMA:
        sources = {name: _source_entry(document, name, name)}
        records = [{**record, "source": name} for record in results]
        return Loaded(name, merged=False, sources=sources, results=records)

    stored = document.get("sources")
    if not isinstance(stored, dict) or not stored:
        raise ReportError(f"{name}: 'sources' is missing or empty")
    sources = {}
    for source, entry in stored.items():
        if not isinstance(entry, dict):
            raise ReportError(f"{name}: sources[{source!r}] is not a JSON object")
        sources[source] = _source_entry(entry, source, f"{name}: sources[{source!r}]")
    for index, record in enumerate(results):
        if record.get("source") not in sources:
            raise ReportError(
                f"{name}: results[{index}] names the source {record.get('source')!r}, "
                "which is not in 'sources'"
            )
    return Loaded(name, merged=True, sources=sources, results=list(results))


def expand_inputs(arguments: Iterable[str]) -> list[Path]:
    """Return the files that the command-line arguments name.

    A folder means every *.json file directly inside it, in name order, except
    merged reports. A file named explicitly is always read.
    """
    paths = []
    for argument in arguments:
        path = Path(argument)
        if not path.is_dir():
            paths.append(path)
            continue
        single_run = []
        for file in sorted(path.glob("*.json")):
            if _is_merged(file):
                print(
                    f"skipping the merged report {display_name(file)}; name it "
                    "explicitly to merge it",
                    file=sys.stderr,
                )
            else:
                single_run.append(file)
        if not single_run:
            raise ReportError(
                f"{display_name(path)}: the folder contains no single-run report "
                "(*.json)"
            )
        paths.extend(single_run)
    return paths


def _is_merged(path: Path) -> bool:
    try:
        document = read_json(path, display_name(path))
    except ReportError:
        return False  # load() reports the problem with the file.
    return isinstance(document, dict) and document.get("schema") == MERGED_SCHEMA


def _record_key(record: dict) -> tuple[str, ...]:
    return tuple(record[field] for field in RECORD_KEY)


def _describe_key(key: Sequence[str]) -> str:
    return (
        "("
        + ", ".join(
            f"{field} {value}" for field, value in zip(RECORD_KEY, key, strict=True)
        )
        + ")"
    )


def _origin(loaded: Loaded, source: str) -> str:
    if loaded.merged:
        return f"{loaded.name} (source {source})"
    return loaded.name


def merge(inputs: Sequence[Loaded]) -> dict:
    """Combine loaded reports into one merged report document.

    Raises ReportError when two inputs, or one input twice, contain a record with
    the same RECORD_KEY. A source name that an earlier input already uses gets the
    name of its merged file as a prefix.
    """
    sources: dict[str, dict] = {}
    results: list[dict] = []
    seen: dict[tuple[str, ...], str] = {}
    for loaded in inputs:
        renamed = {}
        for source, entry in loaded.sources.items():
            new_name = source
            if new_name in sources:
                new_name = f"{loaded.name}:{source}"
            if new_name in sources:
                raise ReportError(
                    f"{loaded.name}: the source name {source!r} is already used by "
                    "another input; rename one of the report files"
                )
            renamed[source] = new_name
            sources[new_name] = entry
        for record in loaded.results:
            key = _record_key(record)
            origin = _origin(loaded, record["source"])
            if seen.get(key) == origin:
                raise ReportError(
                    f"{origin}: contains the record {_describe_key(key)} twice"
                )
            if key in seen:
                raise ReportError(
                    f"the record {_describe_key(key)} is in both {seen[key]} and "
                    f"{origin}; merge each run's report once"
                )
            seen[key] = origin
            results.append({**record, "source": renamed[record["source"]]})

    results.sort(key=lambda record: (*_record_key(record), record["source"]))
    counts = Counter(record["verdict"] for record in results)
    return {
        "schema": MERGED_SCHEMA,
        "schema_version": MERGED_SCHEMA_VERSION,
        "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "sources": sources,
        "summary": {verdict: counts.get(verdict, 0) for verdict in VERDICTS},
        "results": results,
    }


def load_all(paths: Sequence[Path]) -> list[Loaded]:
    """Load each file, rejecting a file given twice under any spelling."""
    loaded = []
    seen_paths: dict[Path, str] = {}
    for path in paths:
        resolved = path.resolve()
        if resolved in seen_paths:
            raise ReportError(
                f"{display_name(path)}: given twice (also as {seen_paths[resolved]}); "
                "merge each run's report once"
            )
        seen_paths[resolved] = str(path)
        loaded.append(load(path))
    return loaded


# Markdown rendering.

VERDICT_LABELS = {
    "pass": "pass",
    "fail": "fail",
    "rejected": "rej",
    "unsupported": "unsup",
    "deviation": "dev",
    "error": "err",
}
UNKNOWN_GROUP = "other"
MARKDOWN_SPECIAL = re.compile(r"([\\`*_\[\]<>|~&#])")


def escape(text: object) -> str:
    """Return `text` on one line, with Markdown and HTML syntax escaped, so that a
    message renders as written inside a list item or a table cell."""
    one_line = " ".join(str(text).split())
    return MARKDOWN_SPECIAL.sub(r"\\\1", one_line)


def _code(text: str) -> str:
    """Return `text` as a Markdown code span that keeps every character: its
    fence is one backtick longer than the longest run of backticks inside, with a
    space inside each end when the text starts or ends with a backtick."""
    longest = max((len(run) for run in re.findall(r"`+", text)), default=0)
    fence = "`" * (longest + 1)
    padding = " " if text.startswith("`") or text.endswith("`") else ""
    return f"{fence}{padding}{text}{padding}{fence}"


def to_float(value: object) -> float | None:
    """Return a report number as a float: None stays None, "NaN" becomes nan."""
    if value is None:
        return None
    if isinstance(value, str):
        return NON_FINITE[value]
    return float(value)


def headroom(record: dict) -> float | None:
    """Return error / budget, or None unless the record has both numbers, a finite
    positive budget and an error that is not NaN. An infinite error (a non-finite
    mismatch) gives inf."""
    error = to_float(record.get("error"))
    budget = to_float(record.get("budget"))
    if error is None or budget is None or math.isnan(error):
        return None
    if not math.isfinite(budget) or budget <= 0:
        return None
    return abs(error) / budget


def case_group(case_name: str) -> str:
    """Return the catalogue group of a case; the metamorphic suite's records form
    their own group."""
    if case_name == METAMORPHIC_CASE:
        return METAMORPHIC_CASE
    try:
        return cases.by_name(case_name).group
    except KeyError:
        return UNKNOWN_GROUP


def _table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> list[str]:
    lines = [
        "| " + " | ".join(header) + " |",
        "|" + "|".join(" --- " for _ in header) + "|",
    ]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines


def _format_counts(counts: Counter) -> str:
    parts = [
        f"{counts[verdict]} {VERDICT_LABELS[verdict]}"
        for verdict in VERDICTS
        if counts[verdict]
    ]
    return " · ".join(parts)


def _format_ratio(ratio: float) -> str:
    return "inf" if math.isinf(ratio) else f"{ratio:.3g}"


def _framework_rows(sources: dict[str, dict]) -> list[list[str]]:
    """Return a row per framework per report. A framework that one report names
    as not installed is left out when another report ran it: each tox
    environment installs one framework and lists the others as missing."""
    ran = {
        framework
        for entry in sources.values()
        for framework, details in entry["environment"]["frameworks"].items()
        if isinstance(details, dict) and "missing" not in details
    }
    rows = []
    for source, entry in sources.items():
        frameworks = entry["environment"]["frameworks"]
        for framework, details in sorted(frameworks.items()):
            if not isinstance(details, dict):
                continue
            if "missing" in details and framework in ran:
                continue
            if "missing" in details:
                version = "not installed"
                devices = escape(details["missing"])
            else:
                version = escape(details.get("version", "?"))
                devices = ", ".join(
                    escape(device.get("name", "?"))
                    + ("" if device.get("available", True) else " (unavailable)")
                    for device in details.get("devices", [])
                    if isinstance(device, dict)
                )
            modes = details.get("math_modes") or {}
            settings = ", ".join(f"{escape(k)} = {escape(v)}" for k, v in modes.items())
            rows.append([escape(framework), version, devices, settings, escape(source)])
    return rows


def _source_rows(sources: dict[str, dict]) -> list[list[str]]:
    rows = []
    for source, entry in sources.items():
        environment = entry["environment"]
        rows.append(
            [
                escape(source),
                escape(entry.get("created") or ""),
                escape(environment.get("python", "?")),
                escape(environment.get("numpy", "?")),
                escape(environment.get("platform", "?")),
                escape(environment.get("seed", "?")),
            ]
        )
    return rows


def _matrix_lines(results: list[dict]) -> list[str]:
    catalogue_order = list(dict.fromkeys(case.group for case in cases.CATALOGUE))
    present = {case_group(record["case"]) for record in results}
    order = [*catalogue_order, METAMORPHIC_CASE, UNKNOWN_GROUP]
    groups = [group for group in order if group in present]

    counts: dict[tuple[str, str], Counter] = {}
    worst: dict[tuple[str, str], float] = {}
    for record in results:
        row = f"{record['framework']}/{record['implementation']}"
        cell = (row, case_group(record["case"]))
        counts.setdefault(cell, Counter())[record["verdict"]] += 1
        ratio = headroom(record)
        if ratio is not None and record["verdict"] in HTML_RATIO_VERDICTS:
            worst[cell] = max(ratio, worst.get(cell, ratio))

    rows = []
    for row in sorted({row for row, _ in counts}):
        cells = [escape(row)]
        for group in groups:
            text = _format_counts(counts.get((row, group), Counter()))
            if (row, group) in worst:
                text += f"<br>worst {_format_ratio(worst[row, group])}"
            cells.append(text)
        rows.append(cells)
    header = ["framework/implementation", *(escape(group) for group in groups)]
    return _table(header, rows)


def operator_table(results: list[dict]) -> tuple[list[str], list[list[str]]]:
    """Return the header and rows of the table of operators by framework. Each
    cell gives the framework's implementations of that operator and their records
    per verdict, or `none`. Every operator of the family has a column, so a
    framework's gaps show."""
    frameworks = sorted({record["framework"] for record in results})
    implementations: dict[tuple[str, str], set[str]] = {}
    counts: dict[tuple[str, str], Counter] = {}
    for record in results:
        cell = (record["framework"], record.get("op", "instance_norm"))
        implementations.setdefault(cell, set()).add(record["implementation"])
        counts.setdefault(cell, Counter())[record["verdict"]] += 1
    operators = [*OPERATORS, *sorted({op for _, op in counts} - set(OPERATORS))]
    rows = []
    for framework in frameworks:
        row = [framework]
        for operator in operators:
            names = implementations.get((framework, operator))
            if not names:
                row.append("none")
                continue
            row.append(
                f"{len(names)} implementation{'s' if len(names) > 1 else ''}: "
                f"{_format_counts(counts[framework, operator])}"
            )
        rows.append(row)
    return ["framework / operator", *operators], rows


def _item_line(record: dict) -> str:
    item = " ".join(
        [f"{record['framework']}/{record['implementation']}"]
        + [record[field] for field in ("device", "dtype", "case", "quantity")]
    )
    return f"- {_code(item)}: {record['verdict']}: {escape(record['message'])}"


def _failure_lines(record: dict) -> list[str]:
    """Return a failure's list item and, under it, the command that replays its
    bundle or, without a bundle, the command that reruns its item."""
    lines = [_item_line(record)]
    if record.get("replay_command"):
        lines.append(f"  - replay: {_code(record['replay_command'])}")
    elif record.get("command"):
        lines.append(f"  - rerun: {_code(record['command'])}")
    return lines


def incomplete_runs(sources: dict[str, dict]) -> list[str]:
    """Return one sentence per source report whose run stopped before every
    selected item recorded verdicts (-x, --maxfail, Ctrl-C)."""
    sentences = []
    for name, entry in sources.items():
        run = entry.get("run")
        if isinstance(run, dict) and run.get("complete") is False:
            sentences.append(
                f"{name} is incomplete: {run.get('items_recorded')} of "
                f"{run.get('items')} selected items recorded verdicts (pytest exit "
                f"status {run.get('exit_status')})."
            )
    return sentences


def render_markdown(document: dict) -> str:
    """Return the Markdown summary of a merged report document.

    NOTE: the failure and deviation lists keep every record and whole messages, so
    a run with many failures gives a long page. The GitHub Actions runner rejects a
    step summary over 1024 KiB ("$GITHUB_STEP_SUMMARY upload aborted").
    """
    sources = document["sources"]
    results = document["results"]
    summary = document["summary"]
    failures = [record for record in results if not record["conforming"]]
    deviations = [record for record in results if record["verdict"] == "deviation"]

    lines = ["# normconf conformance summary", ""]
    lines += [f"> **Warning:** {escape(text)}\n" for text in incomplete_runs(sources)]
    lines += _table(
        ["framework", "version", "devices", "math modes", "report"],
        _framework_rows(sources),
    )
    lines += [""]
    lines += _table(
        ["report", "created", "Python", "NumPy", "platform", "seed"],
        _source_rows(sources),
    )
    lines += ["", "## Totals", ""]
    lines += [
        "Records per verdict, one record per (implementation, device, dtype, case, "
        "quantity):",
        "",
    ]
    lines += _table(list(VERDICTS), [[str(summary[verdict]) for verdict in VERDICTS]])

    lines += ["", "## Operators", ""]
    lines += [
        "Records per verdict of each framework's implementations of each operator; "
        "none means the framework's adapter declares no implementation of it.",
        "",
    ]
    header, rows = operator_table(results)
    lines += (
        _table(
            [escape(name) for name in header],
            [[escape(c) for c in row] for row in rows],
        )
        if rows
        else ["No records."]
    )

    lines += ["", "## Verdicts by case group", ""]
    legend = ", ".join(
        f"{label} = {verdict}" for verdict, label in VERDICT_LABELS.items()
    )
    lines += [
        f"Records per verdict ({legend}). `worst` is the largest error / budget among "
        "the cell's pass and fail records: above 1 is outside the budget, and inf "
        "is a NaN or infinity where a finite value was expected.",
        "",
    ]
    lines += _matrix_lines(results) if results else ["No records."]

    lines += ["", f"## Failures ({len(failures)})", ""]
    lines += [line for record in failures for line in _failure_lines(record)] or [
        "None."
    ]
    lines += ["", f"## Deviations ({len(deviations)})", ""]
    lines += [_item_line(record) for record in deviations] or ["None."]

    review = [
        f"- {escape(source)}: {key.removesuffix('_deviations')}: {escape(entry)}"
        for source, details in sources.items()
        for key in DEVIATION_LISTS
        for entry in details[key]
    ]
    if review:
        lines += ["", "## Deviation entries to review", ""]
        lines += [
            "Stale entries matched no record although their items ran; outgrown "
            "ones have items that failed beyond their message or max_error; "
            "unexercised ones selected no record that ran.",
            "",
        ]
        lines += review
    return "\n".join(lines) + "\n"


# Comparing two reports.

REGRESSED_STATUS = 1
# An error change between two passing records is notable when error / budget grows
# or shrinks by more than this factor.
NOTABLE_FACTOR = 2.0
ABSENT = "absent"


@dataclass
class Change:
    """One record key with its record in the old and in the new report. A side is
    None where that report lacks the key."""

    key: tuple[str, ...]
    old: dict | None
    new: dict | None


@dataclass
class Category:
    """A kind of change between two reports: its heading, what puts a record into
    it, and a predicate over the old and new record (both present)."""

    title: str
    rule: str
    matches: Callable[[dict, dict], bool]


@dataclass
class Diff:
    """The changes between two reports, grouped by category title. A change can
    be in more than one category: fail -> pass is improved and newly passing."""

    old_name: str
    new_name: str
    old_count: int
    new_count: int
    common_count: int
    old_versions: dict[str, list[str]]
    new_versions: dict[str, list[str]]
    sections: dict[str, list[Change]]
    # Sentences naming the source reports of either side that are incomplete.
    warnings: list[str] = dataclasses.field(default_factory=list)

    @property
    def regressed(self) -> bool:
        return bool(self.sections[REGRESSED])

    def failing_sections(self, names: Sequence[str]) -> list[str]:
        """Return the sections among `names` (--fail-on names) that list a record."""
        return [name for name in names if self.sections[DIFF_SECTIONS[name]]]


def _regressed(old: dict, new: dict) -> bool:
    return old["conforming"] and not new["conforming"]


def _improved(old: dict, new: dict) -> bool:
    return not old["conforming"] and new["conforming"]


def _newly_rejected(old: dict, new: dict) -> bool:
    return new["verdict"] == "rejected" and old["verdict"] != "rejected"


def _newly_passing(old: dict, new: dict) -> bool:
    return new["verdict"] == "pass" and old["verdict"] != "pass"


def _newly_unsupported(old: dict, new: dict) -> bool:
    return new["verdict"] == "unsupported" and old["verdict"] != "unsupported"


def _newly_deviating(old: dict, new: dict) -> bool:
    return new["verdict"] == "deviation" and old["verdict"] != "deviation"


def changed_by_factor(old: float, new: float, factor: float) -> bool:
    """Return whether two non-negative numbers differ by more than `factor` either
    way. A change from 0 to any positive number counts as an infinite factor."""
    if old == new:
        return False
    smaller, larger = sorted((old, new))
    if smaller == 0:
        return True
    return larger / smaller > factor


def _error_changed(old: dict, new: dict) -> bool:
    if old["verdict"] != "pass" or new["verdict"] != "pass":
        return False
    old_ratio = headroom(old)
    new_ratio = headroom(new)
    if old_ratio is None or new_ratio is None:
        return False
    if not (math.isfinite(old_ratio) and math.isfinite(new_ratio)):
        return False
    return changed_by_factor(old_ratio, new_ratio, NOTABLE_FACTOR)


REGRESSED = "Regressed"
APPEARED = "Appeared"
DISAPPEARED = "Disappeared"
OTHER_CHANGES = "Other verdict changes"
CATEGORIES = (
    Category(
        REGRESSED,
        "conforming in OLD, not conforming in NEW: pass, deviation, unsupported or "
        "an allowed rejection became fail, error or a rejection the case does not "
        "allow.",
        _regressed,
    ),
    Category(
        "Improved",
        "not conforming in OLD, conforming in NEW.",
        _improved,
    ),
    Category(
        "Newly rejected",
        "rejected in NEW, any other verdict in OLD.",
        _newly_rejected,
    ),
    Category(
        "Newly passing",
        "pass in NEW, any other verdict in OLD.",
        _newly_passing,
    ),
    Category(
        "Newly unsupported",
        "unsupported in NEW, any other verdict in OLD: the item no longer runs.",
        _newly_unsupported,
    ),
    Category(
        "Newly deviating",
        "deviation in NEW, any other verdict in OLD: a difference from the exact "
        "result that a deviations entry now covers.",
        _newly_deviating,
    ),
    Category(
        "Error changed",
        "pass in both, and error / budget grew or shrank by more than a factor of "
        f"{NOTABLE_FACTOR:g}.",
        _error_changed,
    ),
)
PRESENCE_RULES = {
    OTHER_CHANGES: "a verdict change that no section above lists, such as fail "
    "to error.",
    APPEARED: "in NEW only.",
    DISAPPEARED: "in OLD only.",
}


def section_slug(title: str) -> str:
    """Return the --fail-on name of a diff section: "Newly unsupported" is
    newly-unsupported."""
    return title.lower().replace(" ", "-")


# Every section's --fail-on name, in the order the diff prints them.
DIFF_SECTIONS = {
    section_slug(title): title
    for title in [*(category.title for category in CATEGORIES), *PRESENCE_RULES]
}


def framework_versions(document: dict) -> dict[str, list[str]]:
    """Return the versions of each framework that has records in a merged report
    document, sorted. A merged report can contain several versions of one framework."""
    with_records = {record["framework"] for record in document["results"]}
    versions: dict[str, set[str]] = {name: set() for name in with_records}
    for entry in document["sources"].values():
        for framework, details in entry["environment"]["frameworks"].items():
            if framework not in versions or not isinstance(details, dict):
                continue
            if "missing" in details:
                versions[framework].add("not installed")
            else:
                versions[framework].add(str(details.get("version", "?")))
    return {name: sorted(found) or ["?"] for name, found in versions.items()}


def compare(old: dict, new: dict, old_name: str, new_name: str) -> Diff:
    """Compare two merged report documents record by record.

    Records match on RECORD_KEY, which includes the framework's name but not its
    version, so two releases of one framework compare with each other.
    """
    old_records = {_record_key(record): record for record in old["results"]}
    new_records = {_record_key(record): record for record in new["results"]}
    sections: dict[str, list[Change]] = {title: [] for title in DIFF_SECTIONS.values()}

    common = 0
    for key in sorted(old_records.keys() | new_records.keys()):
        old_record = old_records.get(key)
        new_record = new_records.get(key)
        change = Change(key, old_record, new_record)
        if old_record is None:
            sections[APPEARED].append(change)
            continue
        if new_record is None:
            sections[DISAPPEARED].append(change)
            continue
        common += 1
        listed = False
        for category in CATEGORIES:
            if category.matches(old_record, new_record):
                sections[category.title].append(change)
                listed = True
        if not listed and old_record["verdict"] != new_record["verdict"]:
            sections[OTHER_CHANGES].append(change)

    return Diff(
        old_name=old_name,
        new_name=new_name,
        old_count=len(old_records),
        new_count=len(new_records),
        common_count=common,
        warnings=[
            f"{side}: {text}"
            for side, document in (("OLD", old), ("NEW", new))
            for text in incomplete_runs(document["sources"])
        ],
        old_versions=framework_versions(old),
        new_versions=framework_versions(new),
        sections=sections,
    )


def _format_in_u(value: object) -> str:
    number = to_float(value)
    if number is None:
        return "none"
    if not math.isfinite(number):
        return str(number)
    return f"{number:.3g} u"


def _format_error(record: dict | None) -> str:
    return ABSENT if record is None else _format_in_u(record.get("error"))


def _format_error_change(old: dict | None, new: dict | None) -> str:
    """Return new error / old error as "×F", or "n/a" where either error is
    missing or NaN."""
    if old is None or new is None:
        return "n/a"
    old_error = to_float(old.get("error"))
    new_error = to_float(new.get("error"))
    if old_error is None or new_error is None:
        return "n/a"
    if math.isnan(old_error) or math.isnan(new_error):
        return "n/a"
    old_error = abs(old_error)
    new_error = abs(new_error)
    if old_error == new_error:
        return "×1"
    if old_error == 0 or math.isinf(new_error):
        return "×inf"
    return f"×{new_error / old_error:.3g}"


def _change_line(change: Change) -> str:
    framework, implementation, *rest = change.key
    item = " ".join([f"{framework}/{implementation}", *rest])
    old_verdict = change.old["verdict"] if change.old else ABSENT
    new_verdict = change.new["verdict"] if change.new else ABSENT
    line = (
        f"- {_code(item)}: {old_verdict} -> {new_verdict}, error "
        f"{_format_error(change.old)} -> {_format_error(change.new)} "
        f"({_format_error_change(change.old, change.new)})"
    )
    if change.old and change.new:
        old_budget = to_float(change.old.get("budget"))
        new_budget = to_float(change.new.get("budget"))
        # A rejected or broken record has no budget, which is no budget change.
        if None not in (old_budget, new_budget) and old_budget != new_budget:
            line += (
                f", budget {_format_in_u(change.old.get('budget'))} -> "
                f"{_format_in_u(change.new.get('budget'))}"
            )
    return line


def _version_lines(diff: Diff) -> list[str]:
    lines = []
    for framework in sorted(diff.old_versions.keys() | diff.new_versions.keys()):
        old = ", ".join(diff.old_versions.get(framework, []))
        new = ", ".join(diff.new_versions.get(framework, []))
        name = escape(framework)
        if framework not in diff.new_versions:
            lines.append(f"- {name} {escape(old)}: in OLD only")
        elif framework not in diff.old_versions:
            lines.append(f"- {name} {escape(new)}: in NEW only")
        elif old == new:
            lines.append(f"- {name} {escape(old)} (same version)")
        else:
            lines.append(f"- {name} {escape(old)} -> {escape(new)}")
    return lines or ["No records."]


def render_diff(diff: Diff) -> str:
    """Return the Markdown page of a Diff: framework versions, counts per category,
    then one list per category."""
    rules = {category.title: category.rule for category in CATEGORIES}
    rules.update(PRESENCE_RULES)

    lines = ["# normconf report diff", ""]
    lines += [f"> **Warning:** {escape(text)}\n" for text in diff.warnings]
    lines += [
        f"OLD: {_code(diff.old_name)} ({diff.old_count} records). "
        f"NEW: {_code(diff.new_name)} ({diff.new_count} records). "
        f"{diff.common_count} records are in both.",
        "",
        "Records match on (framework, implementation, device, dtype, case, "
        "quantity), so versions of one framework compare by its name. Each line "
        "shows the verdicts, the errors in units of u and new error / old error.",
        "",
        "## Frameworks",
        "",
    ]
    lines += _version_lines(diff)
    lines += ["", "## Changes", ""]
    lines += _table(
        ["change", "records", "rule"],
        (
            [title, str(len(changes)), rules[title]]
            for title, changes in diff.sections.items()
        ),
    )
    for title, changes in diff.sections.items():
        lines += ["", f"## {title} ({len(changes)})", ""]
        lines += [_change_line(change) for change in changes] or ["None."]
    return "\n".join(lines) + "\n"


# HTML rendering.

# A cell whose records have no error / budget ratio shows the letter of the first
# of these verdicts among its records, on that verdict's patterned background.
# A cell with a ratio adds the letters of the HTML_FLAGS verdicts among its records
# after the ratio, and a black inset border, so they are never hidden by it.
HTML_MARKS = {
    "error": "E",
    "fail": "F",
    "rejected": "R",
    "deviation": "D",
    "unsupported": "U",
    "pass": "P",
}
HTML_FLAGS = ("error", "rejected", "deviation")
# Only these verdicts colour a cell by their ratio: a deviation's ratio is over
# budget by design, and showing it in the over-budget colour would read as a failure.
HTML_RATIO_VERDICTS = ("pass", "fail")
OVER_BUDGET_COLOUR = "#7b1fa2"
HTML_FILTERS = ("framework", "device", "dtype", "quantity")

HTML_STYLE = """
body { font-family: sans-serif; margin: 1.5em; color: #222; }
table.heatmap { border-collapse: collapse; font-size: 0.8em; }
table.heatmap th, table.heatmap td { border: 1px solid #bbb; padding: 2px 4px; }
table.heatmap th.case { writing-mode: vertical-rl; font-weight: normal; }
table.heatmap th.row { text-align: left; white-space: nowrap; }
table.heatmap td { min-width: 2.2em; text-align: center; cursor: pointer;
  white-space: nowrap; }
table.heatmap td.selected { outline: 3px solid #000; }
td.flagged { box-shadow: inset 0 0 0 3px #000; }
td.over { color: #fff; font-weight: bold; }
td.mark { font-weight: bold; }
td.mark-error { background: repeating-linear-gradient(45deg, #333 0 4px, #666 4px 8px);
  color: #fff; }
td.mark-fail { background: repeating-linear-gradient(45deg, #e57373 0 4px,
  #fff 4px 8px); }
td.mark-rejected { background: repeating-linear-gradient(90deg, #bdbdbd 0 3px,
  #fff 3px 6px); }
td.mark-deviation { background: repeating-linear-gradient(0deg, #ffd54f 0 3px,
  #fff 3px 6px); }
td.mark-unsupported { background: #eee; color: #777; }
td.mark-pass { background: #c8e6c9; }
.filters label { margin-right: 1em; }
p.warning { background: #fff3cd; border: 1px solid #d39e00; padding: 0.5em; }
#detail table { border-collapse: collapse; margin-bottom: 1em; }
#detail th, #detail td { border: 1px solid #ccc; padding: 2px 6px; text-align: left;
  vertical-align: top; }
#detail td { white-space: pre-wrap; font-family: monospace; }
"""

# Re-renders the heatmap from the embedded records when a filter changes, and shows
# a cell's records on click. It builds every element with textContent, so no
# report text is parsed as HTML.
# Records from reports written before records carried `command`, `inputs` and
# `worst_slice` show the item's pytest id and no inputs rows instead.
HTML_SCRIPT = """
(function () {
  "use strict";
  const data = JSON.parse(document.getElementById("normconf-data").textContent);
  const records = data.records.map(function (record, index) {
    return { record: record, headroom: data.headroom[index] };
  });
  const body = document.querySelector("table.heatmap tbody");
  const detail = document.getElementById("detail");

  function selected() {
    const values = {};
    data.filters.forEach(function (name) {
      values[name] = document.getElementById("filter-" + name).value;
    });
    return values;
  }

  function worstRatio(entries) {
    let worst = null;
    entries.forEach(function (entry) {
      if (entry.headroom === null) { return; }
      if (worst === null || Number(entry.headroom.ratio) > Number(worst.ratio)) {
        worst = entry.headroom;
      }
    });
    return worst;
  }

  function styleCell(cell, entries) {
    const worst = worstRatio(entries);
    const verdicts = new Set(entries.map(function (entry) {
      return entry.record.verdict;
    }));
    if (worst !== null) {
      const flags = data.flags.filter(function (name) {
        return verdicts.has(name);
      }).map(function (name) { return data.marks[name]; }).join("");
      const classes = [];
      if (worst.over) { classes.push("over"); }
      if (flags) { classes.push("flagged"); }
      cell.textContent = flags ? worst.label + " " + flags : worst.label;
      cell.style.background = worst.colour;
      cell.className = classes.join(" ");
      return;
    }
    const verdict = Object.keys(data.marks).find(function (name) {
      return verdicts.has(name);
    });
    cell.textContent = data.marks[verdict];
    cell.className = "mark mark-" + verdict;
  }

  function text(value) {
    if (value === null || value === undefined) { return "none"; }
    return Array.isArray(value) ? "[" + value.join(", ") + "]" : String(value);
  }

  function number(value) {
    if (typeof value !== "number") { return text(value); }
    return String(Number(value.toPrecision(6)));
  }

  function arraySummary(stats) {
    if (!stats) { return "none"; }
    let line = stats.count + " values";
    if (stats.min !== null) {
      line += ", min " + number(stats.min) + ", max " + number(stats.max) +
        ", mean " + number(stats.mean) + ", std " + number(stats.std);
    }
    if (stats.nan || stats.inf) {
      line += ", " + stats.nan + " NaN, " + stats.inf + " infinite";
    }
    return line;
  }

  function inputRows(record) {
    const inputs = record.inputs;
    if (!inputs) { return []; }
    const rows = [["inputs", "shape " + text(inputs.shape) + " (N, C, *spatial), " +
      inputs.layout + ", eps " + number(inputs.eps) +
      (inputs.affine ? ", affine" : ", no affine parameters") +
      ", seed " + inputs.seed]];
    ["x", "grad_output", "gamma", "beta"].forEach(function (name) {
      if (inputs[name]) { rows.push([name, arraySummary(inputs[name])]); }
    });
    const slice = record.worst_slice;
    if (slice) {
      const where = slice.where || (slice.sample === undefined ?
        "channel " + slice.channel + ", all samples" :
        "sample " + slice.sample + ", channel " + slice.channel);
      rows.push(["x at worst", where + ": " + arraySummary(slice.x)]);
    }
    return rows;
  }

  function itemId(record) {
    return [record.framework, record.implementation, record.device, record.dtype,
      record.case].join("-");
  }

  function showDetail(cell, row, caseName, entries) {
    document.querySelectorAll("td.selected").forEach(function (other) {
      other.classList.remove("selected");
    });
    cell.classList.add("selected");
    detail.replaceChildren();
    const heading = document.createElement("h2");
    heading.textContent = row + " " + caseName + " (" + entries.length + " records)";
    detail.appendChild(heading);
    // The records that need a reader come first, unsupported ones last. Within a
    // verdict, records sort by device, dtype and quantity.
    const order = ["error", "fail", "rejected", "deviation", "pass", "unsupported"];
    const sorted = entries.slice().sort(function (a, b) {
      const first = order.indexOf(a.record.verdict) - order.indexOf(b.record.verdict);
      if (first !== 0) { return first; }
      const left = [a.record.device, a.record.dtype, a.record.quantity].join(" ");
      const right = [b.record.device, b.record.dtype, b.record.quantity].join(" ");
      return left < right ? -1 : (left > right ? 1 : 0);
    });
    sorted.forEach(function (entry) {
      const record = entry.record;
      const rows = [
        ["item", record.device + " " + record.dtype + " " + record.quantity],
        ["verdict", record.verdict],
        ["message", record.message],
        ["worst index", text(record.worst_index)],
        ["got", text(record.got)],
        ["expected", text(record.expected)],
        ["error", text(record.error)],
        ["budget", text(record.budget)],
      ];
      inputRows(record).forEach(function (row) { rows.push(row); });
      if (record.command) {
        rows.push(["rerun", record.command]);
      } else {
        rows.push(["pytest id", itemId(record)]);
      }
      if (record.replay_command) {
        rows.push(["replay", record.replay_command]);
      }
      const table = document.createElement("table");
      rows.forEach(function (pair) {
        const line = table.insertRow();
        const name = document.createElement("th");
        name.textContent = pair[0];
        line.appendChild(name);
        line.insertCell().textContent = pair[1];
      });
      detail.appendChild(table);
    });
    // The detail is below the table, which can be taller than the window.
    heading.scrollIntoView({ block: "start" });
  }

  function render() {
    const values = selected();
    const kept = records.filter(function (entry) {
      return data.filters.every(function (name) {
        return values[name] === "" || entry.record[name] === values[name];
      });
    });
    const cells = new Map();
    kept.forEach(function (entry) {
      const row = entry.record.framework + "/" + entry.record.implementation;
      const key = JSON.stringify([row, entry.record.case]);
      if (!cells.has(key)) { cells.set(key, []); }
      cells.get(key).push(entry);
    });
    body.replaceChildren();
    data.rows.forEach(function (row) {
      const present = data.columns.some(function (column) {
        return cells.has(JSON.stringify([row, column.case]));
      });
      if (!present) { return; }
      const line = body.insertRow();
      const label = document.createElement("th");
      label.className = "row";
      label.textContent = row;
      line.appendChild(label);
      data.columns.forEach(function (column) {
        const cell = line.insertCell();
        const entries = cells.get(JSON.stringify([row, column.case]));
        if (!entries) { return; }
        styleCell(cell, entries);
        cell.tabIndex = 0;
        cell.title = row + " " + column.case;
        const show = function () { showDetail(cell, row, column.case, entries); };
        cell.addEventListener("click", show);
        cell.addEventListener("keydown", function (event) {
          if (event.key === "Enter") { show(); }
        });
      });
    });
    detail.replaceChildren();
  }

  data.filters.forEach(function (name) {
    document.getElementById("filter-" + name).addEventListener("change", render);
  });
  render();
})();
"""


def headroom_colour(ratio: float) -> str:
    """Return the cell colour of an error / budget ratio: a hue from green at 0 to
    red at 1, and OVER_BUDGET_COLOUR above 1."""
    if ratio > 1:
        return OVER_BUDGET_COLOUR
    hue = round(120 * (1 - ratio))
    return f"hsl({hue}, 70%, 62%)"


def _html_headroom(record: dict) -> dict | None:
    """Return the ratio, cell label and colour of a record, or None for a record
    without a ratio or with a verdict outside HTML_RATIO_VERDICTS. An infinite
    ratio is the string "Infinity", as in the reports."""
    ratio = headroom(record)
    if ratio is None or record["verdict"] not in HTML_RATIO_VERDICTS:
        return None
    return {
        "ratio": json_number(ratio),
        "label": "inf" if math.isinf(ratio) else f"{ratio:.2g}",
        "colour": headroom_colour(ratio),
        "over": ratio > 1,
    }


def _case_columns(results: list[dict]) -> list[dict]:
    """Return the cases that have records, grouped by case group in catalogue
    order, with cases missing from the catalogue last, in the group "other"."""
    present = {record["case"] for record in results}
    ordered = [case.name for case in cases.CATALOGUE if case.name in present]
    ordered += sorted(present - set(ordered))
    group_order = list(dict.fromkeys(case.group for case in cases.CATALOGUE))
    group_order += [METAMORPHIC_CASE, UNKNOWN_GROUP]
    ordered.sort(key=lambda name: group_order.index(case_group(name)))
    return [{"case": name, "group": case_group(name)} for name in ordered]


def _script_json(payload: dict) -> str:
    """Return payload as JSON that cannot end its <script> element early: "<", ">"
    and "&" only occur inside JSON strings, where the \\u escapes decode back."""
    text = json.dumps(payload, allow_nan=False)
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def _html_cell(entries: list[tuple[dict, dict | None]]) -> str:
    """Return the initial <td> of a cell, as the page's script renders it."""
    ratios = [ratio for _, ratio in entries if ratio is not None]
    verdicts = {record["verdict"] for record, _ in entries}
    if ratios:
        worst = max(ratios, key=lambda ratio: float(ratio["ratio"]))
        flags = "".join(HTML_MARKS[name] for name in HTML_FLAGS if name in verdicts)
        classes = []
        if worst["over"]:
            classes.append("over")
        if flags:
            classes.append("flagged")
        attribute = f' class="{" ".join(classes)}"' if classes else ""
        label = f"{worst['label']} {flags}" if flags else worst["label"]
        return f'<td{attribute} style="background: {worst["colour"]}">{label}</td>'
    verdict = next(name for name in HTML_MARKS if name in verdicts)
    return f'<td class="mark mark-{verdict}">{HTML_MARKS[verdict]}</td>'


def _html_heatmap(
    results: list[dict], ratios: list[dict | None], columns: list[dict]
) -> list[str]:
    groups = Counter(column["group"] for column in columns)
    lines = ['<table class="heatmap">', "<thead>", "<tr><th></th>"]
    lines += [
        f'<th colspan="{count}">{html.escape(group)}</th>'
        for group, count in groups.items()
    ]
    lines += ["</tr>", "<tr><th>framework/implementation</th>"]
    lines += [
        f'<th class="case">{html.escape(column["case"])}</th>' for column in columns
    ]
    lines += ["</tr>", "</thead>", "<tbody>"]

    cells: dict[tuple[str, str], list[tuple[dict, dict | None]]] = {}
    for record, ratio in zip(results, ratios, strict=True):
        row = f"{record['framework']}/{record['implementation']}"
        cells.setdefault((row, record["case"]), []).append((record, ratio))
    for row in sorted({row for row, _ in cells}):
        lines.append(f'<tr><th class="row">{html.escape(row)}</th>')
        for column in columns:
            entries = cells.get((row, column["case"]))
            lines.append(_html_cell(entries) if entries else "<td></td>")
        lines.append("</tr>")
    lines += ["</tbody>", "</table>"]
    return lines


def _html_filters(results: list[dict]) -> list[str]:
    lines = ['<p class="filters">']
    for name in HTML_FILTERS:
        values = sorted({record[name] for record in results})
        options = ['<option value="">all</option>']
        options += [
            f'<option value="{html.escape(value)}">{html.escape(value)}</option>'
            for value in values
        ]
        lines.append(
            f'<label>{name} <select id="filter-{name}">{"".join(options)}'
            "</select></label>"
        )
    lines.append("</p>")
    return lines


def _html_legend() -> str:
    marks = ", ".join(f"{letter} {verdict}" for verdict, letter in HTML_MARKS.items())
    flags = ", ".join(HTML_MARKS[name] for name in HTML_FLAGS)
    return (
        "<p>Each cell holds the records of one framework implementation and one "
        "case that the filters keep. Its number and colour are the largest error / "
        "budget among its pass and fail records: green at 0, through yellow, to red "
        "at 1, and purple above 1, which is outside the budget (inf is a NaN or "
        "infinity where a finite value was expected). Letters after the number "
        f"({flags}) and a black inner border mean that the cell also holds records "
        "with those verdicts. A cell without pass or fail records shows a letter on "
        f"a patterned background: {marks}, the first of these among its records. "
        "Click a cell, or press Enter on it, to list its records below the "
        "table.</p>"
    )


def _html_operator_table(results: list[dict]) -> list[str]:
    """Return the operators-by-framework table (operator_table) as HTML."""
    header, rows = operator_table(results)
    if not rows:
        return []
    lines = ['<table class="operators">', "<tr>"]
    lines += [f"<th>{html.escape(name)}</th>" for name in header]
    lines += ["</tr>"]
    for row in rows:
        cells = "".join(f"<td>{html.escape(cell)}</td>" for cell in row)
        lines.append(f"<tr>{cells}</tr>")
    lines.append("</table>")
    return ["<h2>Operators</h2>", *lines]


def render_html(document: dict) -> str:
    """Return a self-contained HTML page of a merged report document: a heatmap of
    framework implementation by case with filters and per-record detail. The page
    loads nothing: its style, script and records are inline."""
    results = document["results"]
    ratios = [_html_headroom(record) for record in results]
    columns = _case_columns(results)
    payload = {
        "filters": list(HTML_FILTERS),
        "marks": HTML_MARKS,
        "flags": list(HTML_FLAGS),
        "rows": sorted(
            {f"{record['framework']}/{record['implementation']}" for record in results}
        ),
        "columns": columns,
        "records": results,
        "headroom": ratios,
    }
    versions = framework_versions(document)
    framework_items = [
        f"<li>{html.escape(name)} {html.escape(', '.join(versions[name]))}</li>"
        for name in sorted(versions)
    ]

    lines = [
        "<!DOCTYPE html>",
        '<html lang="en">',
        "<head>",
        '<meta charset="utf-8">',
        "<title>normconf conformance heatmap</title>",
        f"<style>{HTML_STYLE}</style>",
        "</head>",
        "<body>",
        "<h1>normconf conformance heatmap</h1>",
        *(
            f'<p class="warning">Warning: {html.escape(text)}</p>'
            for text in incomplete_runs(document["sources"])
        ),
        f"<p>{len(results)} records from {len(document['sources'])} reports, "
        f"merged {html.escape(str(document.get('created') or '?'))}.</p>",
        "<ul>",
        *(framework_items or ["<li>No records.</li>"]),
        "</ul>",
        *_html_operator_table(results),
        _html_legend(),
        *_html_filters(results),
        *_html_heatmap(results, ratios, columns),
        '<section id="detail"></section>',
        '<script type="application/json" id="normconf-data">'
        f"{_script_json(payload)}</script>",
        f"<script>{HTML_SCRIPT}</script>",
        "</body>",
        "</html>",
    ]
    return "\n".join(lines) + "\n"


# Command line.


def _write_text(path: Path, text: str) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        files.write_text_atomic(path, text)
    except OSError as error:
        raise ReportError(
            f"{display_name(path)}: cannot write the file: {error}"
        ) from error


def command_merge(arguments: argparse.Namespace) -> None:
    paths = expand_inputs(arguments.reports)
    output = Path(arguments.output).resolve()
    if any(Path(path).resolve() == output for path in paths):
        raise ReportError(
            f"{display_name(arguments.output)}: the output is also an input; "
            "write the merged report to another file"
        )
    inputs = load_all(paths)
    document = merge(inputs)
    try:
        report.write(document, arguments.output)
    except OSError as error:
        raise ReportError(
            f"{display_name(arguments.output)}: cannot write the file: {error}"
        ) from error
    print(
        f"merged {len(document['results'])} records from {len(inputs)} reports "
        f"into {display_name(arguments.output)}",
        file=sys.stderr,
    )


def command_markdown(arguments: argparse.Namespace) -> None:
    document = merge([load(arguments.report)])
    _write_text(arguments.output, render_markdown(document))


def command_html(arguments: argparse.Namespace) -> None:
    document = merge([load(arguments.report)])
    _write_text(arguments.output, render_html(document))


def command_diff(arguments: argparse.Namespace) -> int:
    old = load(arguments.old)
    new = load(arguments.new)
    # merge() rejects a file that contains one record twice.
    diff = compare(merge([old]), merge([new]), old.name, new.name)
    text = render_diff(diff)
    if arguments.output is not None:
        _write_text(arguments.output, text)
    print(text, end="")
    failing = diff.failing_sections(arguments.fail_on)
    if failing:
        print(
            f"exit status {REGRESSED_STATUS}: --fail-on sections with records: "
            f"{', '.join(failing)}",
            file=sys.stderr,
        )
        return REGRESSED_STATUS
    return 0


def fail_on_list(value: str) -> list[str]:
    """Parse --fail-on: comma-separated section names."""
    names = [name.strip() for name in value.split(",") if name.strip()]
    unknown = [name for name in names if name not in DIFF_SECTIONS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(
            f"unknown section {', '.join(unknown) or '(none given)'}; known: "
            f"{', '.join(DIFF_SECTIONS)}"
        )
    return names


def _add_output(
    parser: argparse.ArgumentParser, help_text: str, required: bool = True
) -> None:
    parser.add_argument(
        "--output", required=required, type=Path, metavar="PATH", help=help_text
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m suites.reports",
        description="Merge normconf JSON reports, render one as Markdown or HTML, "
        "or compare two.",
    )
    commands = parser.add_subparsers(dest="command", required=True)

    merge_parser = commands.add_parser(
        "merge",
        help="merge reports into one merged report",
        description="Merge normconf reports (single-run or merged) into one merged "
        "report. A folder means every *.json file directly inside it except "
        "merged reports.",
    )
    merge_parser.add_argument(
        "reports", nargs="+", metavar="REPORT", help="report file or folder"
    )
    _add_output(merge_parser, "merged report to write")
    merge_parser.set_defaults(run=command_merge)

    markdown_parser = commands.add_parser(
        "markdown",
        help="write a Markdown summary of a report",
        description="Write a Markdown summary of a single-run or merged report, "
        "for a CI job summary.",
    )
    markdown_parser.add_argument("report", type=Path, metavar="REPORT")
    _add_output(markdown_parser, "Markdown file to write")
    markdown_parser.set_defaults(run=command_markdown)

    html_parser = commands.add_parser(
        "html",
        help="write a self-contained HTML heatmap of a report",
        description="Write one HTML file with a heatmap of error / budget per "
        "framework implementation and case, filters and per-record detail. The "
        "file loads nothing from elsewhere.",
    )
    html_parser.add_argument("report", type=Path, metavar="REPORT")
    _add_output(html_parser, "HTML file to write")
    html_parser.set_defaults(run=command_html)

    diff_parser = commands.add_parser(
        "diff",
        help="compare two reports and list the changed records",
        description="Compare two normconf reports (single-run or merged), print "
        "the records that regressed, improved, became rejected or passing, changed "
        "error notably, appeared or disappeared, and exit with status 1 when a "
        "section named by --fail-on lists a record (default: regressed).",
    )
    diff_parser.add_argument("old", type=Path, metavar="OLD", help="earlier report")
    diff_parser.add_argument("new", type=Path, metavar="NEW", help="later report")
    _add_output(
        diff_parser,
        "Markdown file to write the comparison to, besides printing it",
        required=False,
    )
    diff_parser.add_argument(
        "--fail-on",
        type=fail_on_list,
        default=[section_slug(REGRESSED)],
        metavar="SECTIONS",
        help="comma-separated sections that make the exit status 1 when they list "
        f"a record (known: {', '.join(DIFF_SECTIONS)}; default: regressed)",
    )
    diff_parser.set_defaults(run=command_diff)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    arguments = parser.parse_args(argv)
    try:
        status = arguments.run(arguments)
    except ReportError as error:
        # The same form as argparse's own errors: "PROG COMMAND: error: MESSAGE".
        print(f"{parser.prog} {arguments.command}: error: {error}", file=sys.stderr)
        return ERROR_STATUS
    return status or 0


if __name__ == "__main__":
    sys.exit(main())
