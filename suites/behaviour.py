"""Print a framework's measured behaviour from a normconf report, as Markdown tables.

    python -m suites.behaviour reports/torch.json [--device cpu]

The docs/frameworks/ pages take their tables from this output, so that what they say
about refusals, dtypes and layouts is what the suite measured. Three tables: how each
implementation treats the cases that are not plain passes, which dtypes run and what
dtype comes back, and the layouts and gradients each implementation declares.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter, defaultdict
from pathlib import Path

REJECTION_NOTE = " [rejection"
MESSAGE_LIMIT = 90
REASON_LIMIT = 400


def _short(text: str, limit: int = MESSAGE_LIMIT) -> str:
    text = text.split(REJECTION_NOTE)[0].replace("\n", " ")
    if len(text) > limit:
        text = text[: limit - 3] + "..."
    # A pipe would end the Markdown table cell.
    return text.replace("|", "\\|")


def outcome(records: list[dict]) -> str:
    """Summarize one item's records (one per quantity) in a few words."""
    ran = [record for record in records if record["verdict"] != "unsupported"]
    if not ran:
        return "unsupported"
    # Gradient quantities of an implementation without gradients are unsupported;
    # the outcome is what the quantities that ran show.
    records = ran
    verdicts = {record["verdict"] for record in records}
    if verdicts == {"pass"}:
        return "pass"
    if verdicts == {"rejected"}:
        return f"rejected: `{_short(records[0]['message'])}`"
    parts = []
    for verdict in ("fail", "deviation", "error", "rejected"):
        quantities = [r["quantity"] for r in records if r["verdict"] == verdict]
        if quantities:
            parts.append(f"{verdict} ({', '.join(quantities)})")
    return "; ".join(parts) or "pass"


def _join_by_outcome(by_dtype: dict[str, str]) -> str:
    grouped: dict[str, list[str]] = defaultdict(list)
    for dtype, text in by_dtype.items():
        grouped[text].append(dtype)
    if len(grouped) == 1:
        return next(iter(grouped))
    return "<br>".join(
        f"{', '.join(dtypes)}: {text}" for text, dtypes in grouped.items()
    )


def tables(document: dict, device: str) -> list[str]:
    results = [r for r in document["results"] if r["device"] == device]
    items: dict[tuple[str, str, str], list[dict]] = defaultdict(list)
    for record in results:
        key = (record["implementation"], record["case"], record["dtype"])
        items[key].append(record)
    implementations = sorted({key[0] for key in items})
    dtypes = sorted({key[2] for key in items})
    cases = sorted({key[1] for key in items})

    lines = [f"### Cases that do not simply pass ({device})", ""]
    lines.append("| case | " + " | ".join(f"`{i}`" for i in implementations) + " |")
    lines.append("| --- |" + " --- |" * len(implementations))
    for case in cases:
        cells, interesting = [], False
        for implementation in implementations:
            by_dtype = {
                dtype: outcome(items[(implementation, case, dtype)])
                for dtype in dtypes
                if (implementation, case, dtype) in items
            }
            ran = {d: t for d, t in by_dtype.items() if t != "unsupported"}
            interesting |= any(text != "pass" for text in ran.values())
            cells.append(_join_by_outcome(ran) if ran else "not run")
        if interesting:
            lines.append(f"| `{case}` | " + " | ".join(cells) + " |")

    lines += ["", f"### dtypes ({device})", ""]
    lines.append("| implementation | " + " | ".join(dtypes) + " |")
    lines.append("| --- |" + " --- |" * len(dtypes))
    for implementation in implementations:
        cells = []
        for dtype in dtypes:
            records = [
                r
                for (i, _, d), group in items.items()
                if i == implementation and d == dtype
                for r in group
            ]
            ran = [r for r in records if r["verdict"] != "unsupported"]
            returned = sorted({r["result_dtype"] for r in ran if r["result_dtype"]})
            if returned:
                cells.append(f"returns {', '.join(returned)}")
            elif ran:
                cells.append("runs (no result on any case)")
            else:
                # The most common reason: layout refusals of single cases aside.
                reasons = Counter(
                    r["message"] for r in records if r["quantity"] == "output"
                )
                reason = (
                    _short(reasons.most_common(1)[0][0], REASON_LIMIT)
                    if reasons
                    else "none"
                )
                cells.append(f"unsupported: {reason}")
        lines.append(f"| `{implementation}` | " + " | ".join(cells) + " |")

    lines += ["", "### Declared layouts and gradients", ""]
    lines.append("| framework | implementation | layouts | gradients |")
    lines.append("| --- | --- | --- | --- |")
    for framework, info in sorted(document["environment"]["frameworks"].items()):
        for implementation in info.get("implementations", []):
            gradients = (
                "yes"
                if implementation["gradients"]
                else f"no: {implementation['gradient_reason'] or 'none declared'}"
            )
            lines.append(
                f"| {framework} {info['version']} | `{implementation['name']}` | "
                f"{', '.join(implementation['layouts'])} | {gradients} |"
            )
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m suites.behaviour", description=__doc__.splitlines()[0]
    )
    parser.add_argument("report", type=Path, help="a normconf JSON report")
    parser.add_argument("--device", default="cpu", help="device to tabulate")
    args = parser.parse_args(argv)
    try:
        document = json.loads(args.report.read_text())
    except (OSError, json.JSONDecodeError) as error:
        return _fail(parser, f"cannot read {args.report}: {error}")
    if not isinstance(document, dict) or document.get("schema") != "normconf-report":
        return _fail(parser, f"{args.report} is not a normconf report")
    devices = sorted({record["device"] for record in document["results"]})
    if args.device not in devices:
        return _fail(
            parser,
            f"{args.report} has no records for device {args.device!r}; "
            f"its devices: {', '.join(devices) or 'none'}",
        )
    print("\n".join(tables(document, args.device)))
    return 0


def _fail(parser: argparse.ArgumentParser, message: str) -> int:
    """Print `message` in the form of argparse's own errors and return status 2."""
    print(f"{parser.prog}: error: {message}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
