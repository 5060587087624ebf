"""The HTML report in a real browser: Debian's chromium, driven by Playwright.

The page is rendered from a merged report of real suite runs (tests.faults and
tests.broken_adapters kernels, one deviation entry), so its cells hold every verdict.
Each test reads what chromium displays and compares it with the records.

Without Playwright or chromium the tests skip, unless NORMCONF_REQUIRE_BROWSER=1,
which .ci/run sets, makes them fail instead. NORMCONF_CHROMIUM names the browser
binary (default: chromium on PATH). NORMCONF_SCREENSHOT_DIR, when set, keeps the
screenshots the tests take.
"""

from __future__ import annotations

import colorsys
import json
import os
import re
import shutil
from collections import Counter
from pathlib import Path

import pytest

from suites import reports
from tests.subprocess_runs import run_suite

CHROMIUM_FLAGS = [
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-quic",
    "--no-first-run",
]
VIEWPORT = {"width": 1600, "height": 1200}
DEVIATIONS = """\
[[deviation]]
framework = "fault-one-pass-variance"
versions = ">=1"
date = 2026-12-04
cases = ["large-mean-1e4"]
implementations = ["kernel"]
quantities = ["grad_gamma"]
reason = "a deviation entry for the browser test, so that the page shows one"
link = "tests/test_html_browser.py"
"""
# What each test reads from the page: every heatmap cell with its row, column,
# text, classes and computed background colour.
READ_CELLS = """() => {
  const columns = Array.from(document.querySelectorAll("table.heatmap th.case"))
    .map((th) => th.textContent);
  const cells = [];
  document.querySelectorAll("table.heatmap tbody tr").forEach((tr) => {
    const row = tr.querySelector("th").textContent;
    tr.querySelectorAll("td").forEach((td, index) => {
      cells.push({
        row: row,
        case: columns[index],
        text: td.textContent,
        classes: Array.from(td.classList).filter((name) => name !== "selected")
          .sort(),
        colour: getComputedStyle(td).backgroundColor,
      });
    });
  });
  return cells;
}"""


def write_report(path: Path, *arguments: str, replay_dir: Path | None = None) -> Path:
    options = [f"--report={path}"]
    if replay_dir is not None:
        options.append(f"--replay-dir={replay_dir}")
    completed = run_suite(*arguments, *options)
    assert path.exists(), completed.stdout[-3000:] + completed.stderr[-3000:]
    return path


@pytest.fixture(scope="module")
def report_files(tmp_path_factory) -> dict[str, Path]:
    """Merge four suite runs into one report and render its page. The runs give
    pass and unsupported (the float32 kernel), fail with a replay bundle and
    deviation (one-pass variance), rejected and error (Erratic)."""
    folder = tmp_path_factory.mktemp("browser")
    deviations = folder / "deviations.toml"
    deviations.write_text(DEVIATIONS, encoding="utf-8")

    runs = [
        write_report(
            folder / "kernel.json",
            "--adapter=tests.faults:Float32Kernel",
            "--cases=M1,random-2d,large-mean-1e4,constant-slice",
        ),
        write_report(
            folder / "fault.json",
            "--adapter=tests.faults:OnePassVariance",
            "--dtypes=float32",
            "--cases=large-mean-1e4,random-2d",
            f"--deviations={deviations}",
            replay_dir=folder / "bundles",
        ),
        # In float16 alone, so that its cell contains unsupported records only.
        write_report(
            folder / "kernel-float16.json",
            "--adapter=tests.faults:Float32Kernel",
            "--dtypes=float16",
            "--cases=eps1e-3",
        ),
        write_report(
            folder / "erratic.json",
            "--adapter=tests.broken_adapters:Erratic",
            "--dtypes=float32",
            "--cases=N0,M1,random-2d",
        ),
    ]

    merged = folder / "merged.json"
    page = folder / "summary.html"
    assert reports.main(["merge", *map(str, runs), "--output", str(merged)]) == 0
    assert reports.main(["html", str(merged), "--output", str(page)]) == 0
    return {"merged": merged, "page": page}


@pytest.fixture(scope="module")
def records(report_files) -> list[dict]:
    return json.loads(report_files["merged"].read_text(encoding="utf-8"))["results"]


@pytest.fixture(scope="module")
def browser():
    required = os.environ.get("NORMCONF_REQUIRE_BROWSER") == "1"
    give_up = pytest.fail if required else pytest.skip
    try:
        from playwright.sync_api import sync_playwright
    except ImportError as error:
        give_up(f"Playwright is not installed ({error}); pip install playwright")
    executable = os.environ.get("NORMCONF_CHROMIUM") or shutil.which("chromium")
    if not executable or not Path(executable).exists():
        give_up(
            "no chromium binary (install Debian's chromium package or set "
            "NORMCONF_CHROMIUM)"
        )
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(
            executable_path=executable, args=CHROMIUM_FLAGS
        )
        yield launched
        launched.close()


class PageWatch:
    """A loaded report page and everything it asked for or complained about."""

    def __init__(self, page) -> None:
        self.page = page
        self.requests: list[str] = []
        self.errors: list[str] = []
        page.on("request", lambda request: self.requests.append(request.url))
        page.on("pageerror", lambda error: self.errors.append(str(error)))
        page.on(
            "console",
            lambda message: (
                self.errors.append(message.text) if message.type == "error" else None
            ),
        )

    def cells(self) -> list[dict]:
        return self.page.evaluate(READ_CELLS)


def open_page(browser, path: Path, scripts: bool = True) -> PageWatch:
    context = browser.new_context(viewport=VIEWPORT, java_script_enabled=scripts)
    # A missing element fails in seconds, not in the 30 s Playwright waits by default.
    context.set_default_timeout(5000)
    # Only the page itself may load. A request for anything else is recorded by
    # PageWatch and aborted here.
    context.route(
        re.compile(r"^(?!file:).*"), lambda route: route.abort("blockedbyclient")
    )
    watch = PageWatch(context.new_page())
    watch.page.goto(path.as_uri())
    return watch


@pytest.fixture
def page(browser, report_files):
    watch = open_page(browser, report_files["page"])
    yield watch
    watch.page.context.close()


# The page's rules, restated from its legend, for the expected cells.


def hsl_to_rgb(colour: str) -> tuple[int, int, int]:
    if colour.startswith("#"):
        return tuple(int(colour[i : i + 2], 16) for i in (1, 3, 5))
    hue, saturation, lightness = map(float, re.findall(r"[\d.]+", colour))
    red, green, blue = colorsys.hls_to_rgb(hue / 360, lightness / 100, saturation / 100)
    return tuple(round(255 * part) for part in (red, green, blue))


def parse_rgb(colour: str) -> tuple[int, int, int]:
    return tuple(int(part) for part in re.findall(r"\d+", colour)[:3])


def expected_cell(entries: list[dict]) -> dict:
    """Return the text, classes and colour a cell of these records must show."""
    verdicts = {record["verdict"] for record in entries}
    ratios = [
        reports.headroom(record)
        for record in entries
        if record["verdict"] in ("pass", "fail")
    ]
    ratios = [ratio for ratio in ratios if ratio is not None]

    if not ratios:
        verdict = next(name for name in reports.HTML_MARKS if name in verdicts)
        return {
            "text": reports.HTML_MARKS[verdict],
            "classes": ["mark", f"mark-{verdict}"],
            "colour": None,
        }

    worst = max(ratios)
    label = "inf" if worst == float("inf") else f"{worst:.2g}"
    flags = "".join(
        reports.HTML_MARKS[name]
        for name in ("error", "rejected", "deviation")
        if name in verdicts
    )
    classes = []
    if worst > 1:
        classes.append("over")
    if flags:
        classes.append("flagged")
    return {
        "text": f"{label} {flags}" if flags else label,
        "classes": sorted(classes),
        "colour": hsl_to_rgb(reports.headroom_colour(worst)),
    }


def expected_cells(records: list[dict], kept: dict[str, str]) -> dict:
    """Return the expected cell of every (row, case) that the filter values in
    `kept` leave, with "" for a present row's empty cells."""
    chosen = [
        record
        for record in records
        if all(record[name] == value for name, value in kept.items())
    ]
    grouped: dict[tuple[str, str], list[dict]] = {}
    for record in chosen:
        row = f"{record['framework']}/{record['implementation']}"
        grouped.setdefault((row, record["case"]), []).append(record)
    columns = {record["case"] for record in records}
    rows = {row for row, _ in grouped}
    empty = {"text": "", "classes": [], "colour": None}
    return {
        (row, case): expected_cell(grouped[row, case])
        if (row, case) in grouped
        else empty
        for row in rows
        for case in columns
    }


def assert_cells_match(shown: list[dict], expected: dict) -> None:
    assert {(cell["row"], cell["case"]) for cell in shown} == set(expected)
    for cell in shown:
        want = expected[cell["row"], cell["case"]]
        where = f"{cell['row']} {cell['case']}"
        assert cell["text"] == want["text"], where
        assert cell["classes"] == want["classes"], where
        if want["colour"] is not None:
            got = parse_rgb(cell["colour"])
            assert (
                max(abs(a - b) for a, b in zip(got, want["colour"], strict=True)) <= 1
            ), where


def test_page_requests_only_itself(page, report_files):
    page.page.wait_for_selector("table.heatmap tbody td")
    assert page.requests == [report_files["page"].as_uri()]
    assert page.errors == []


def test_heatmap_cells_match_records(page, records):
    shown = page.cells()
    assert_cells_match(shown, expected_cells(records, {}))
    texts = Counter(cell["text"] for cell in shown)
    # The runs were chosen so that every kind of cell appears.
    assert texts["E"]
    assert texts["R"]
    assert texts["U"]
    assert texts["inf D"]
    assert any(re.fullmatch(r"0\.\d+|\de-\d+", text) for text in texts)


def test_static_page_same_cells(browser, report_files, records):
    static = open_page(browser, report_files["page"], scripts=False)
    try:
        assert_cells_match(static.cells(), expected_cells(records, {}))
    finally:
        static.page.context.close()


def test_filter_values_keep_records(page, records):
    for name in reports.HTML_FILTERS:
        values = sorted({record[name] for record in records})
        options = page.page.eval_on_selector_all(
            f"#filter-{name} option", "(options) => options.map((o) => o.value)"
        )
        assert options == ["", *values]
        for value in values:
            page.page.select_option(f"#filter-{name}", value)
            assert_cells_match(page.cells(), expected_cells(records, {name: value}))
        page.page.select_option(f"#filter-{name}", "")
    assert page.errors == []


def test_combined_filters_show_deviation(page, records):
    page.page.select_option("#filter-quantity", "grad_gamma")
    page.page.select_option("#filter-framework", "fault-one-pass-variance")
    kept = {"quantity": "grad_gamma", "framework": "fault-one-pass-variance"}
    shown = page.cells()
    assert_cells_match(shown, expected_cells(records, kept))
    (cell,) = [cell for cell in shown if cell["case"] == "large-mean-1e4"]
    assert (cell["text"], cell["classes"]) == ("D", ["mark", "mark-deviation"])


def detail_tables(page) -> list[dict[str, str]]:
    return page.page.eval_on_selector_all(
        "#detail table",
        """(tables) => tables.map((table) => Object.fromEntries(
          Array.from(table.rows).map((row) => [row.cells[0].textContent,
            row.cells[1].textContent])))""",
    )


def cell_locator(page, row: str, case: str):
    columns = page.page.eval_on_selector_all(
        "table.heatmap th.case", "(cells) => cells.map((cell) => cell.textContent)"
    )
    line = page.page.locator("table.heatmap tbody tr", has_text=row)
    return line.locator("td").nth(columns.index(case))


def test_click_shows_inputs_and_commands(page, records):
    row, case = "fault-one-pass-variance/kernel", "large-mean-1e4"
    cell = cell_locator(page, row, case)
    cell.click()
    heading = page.page.inner_text("#detail h2")
    chosen = [
        record
        for record in records
        if f"{record['framework']}/{record['implementation']}" == row
        and record["case"] == case
    ]
    assert heading == f"{row} {case} ({len(chosen)} records)"
    tables = detail_tables(page)
    assert len(tables) == len(chosen)
    by_quantity = {table["item"].split()[-1]: table for table in tables}
    for record in chosen:
        table = by_quantity[record["quantity"]]
        assert table["verdict"] == record["verdict"]
        assert table["message"] == record["message"]
        assert table["rerun"] == record["command"]
        assert table["replay"] == record["replay_command"]
        assert "suites.replay" in table["replay"]
        inputs = record["inputs"]
        assert table["inputs"].startswith(
            f"shape [{', '.join(map(str, inputs['shape']))}] (N, C, *spatial), "
            "channels_first, eps 0.00001, affine, seed 0"
        )
        x = inputs["x"]
        assert table["x"].startswith(f"{x['count']} values, min ")
        # The page prints 6 significant digits; the mean reads back within them.
        shown_mean = float(re.search(r"mean (\S+),", table["x"]).group(1))
        assert shown_mean == pytest.approx(x["mean"], rel=1e-5)
        index = record["worst_index"]
        where = (
            f"sample {index[0]}, channel {index[1]}: "
            if len(index) > 1
            else f"channel {index[0]}, all samples: "
        )
        assert table["x at worst"].startswith(where)
    assert page.page.locator("td.selected").count() == 1


def test_detail_lists_failures_first(page):
    cell_locator(page, "numpy-float32/kernel", "random-2d").click()
    verdicts = [table["verdict"] for table in detail_tables(page)]
    # float32 passes, the other three dtypes are unsupported by this kernel.
    assert verdicts == ["pass"] * 4 + ["unsupported"] * 12
    cell_locator(page, "fault-one-pass-variance/kernel", "large-mean-1e4").click()
    verdicts = [table["verdict"] for table in detail_tables(page)]
    assert verdicts == ["fail", "fail", "deviation", "pass"]


def test_enter_key_opens_detail(page):
    cell = cell_locator(page, "erratic/kernel", "M1")
    cell.focus()
    page.page.keyboard.press("Enter")
    tables = detail_tables(page)
    assert tables and all(table["verdict"] == "error" for table in tables)
    assert all("one-element slice" in table["message"] for table in tables)
    # An error record has no worst element, and its item never ran to a bundle.
    assert all("x at worst" not in table and "replay" not in table for table in tables)


def cell_pixels(image, box: dict, inset: int) -> Counter:
    """Count the colours of the cell's pixels at least `inset` pixels inside it."""
    left, top = round(box["x"]) + inset, round(box["y"]) + inset
    right = round(box["x"] + box["width"]) - inset
    bottom = round(box["y"] + box["height"]) - inset
    return Counter(
        image.getpixel((x, y))[:3]
        for x in range(left, right)
        for y in range(top, bottom)
    )


def near(colour: tuple, expected: tuple, tolerance: int = 3) -> bool:
    return max(abs(a - b) for a, b in zip(colour, expected, strict=True)) <= tolerance


def test_screenshot_cell_colours(page, records, tmp_path):
    image_module = pytest.importorskip("PIL.Image")
    keep = os.environ.get("NORMCONF_SCREENSHOT_DIR")
    path = Path(keep) if keep else tmp_path
    path.mkdir(parents=True, exist_ok=True)
    shot = path / "heatmap.png"
    page.page.screenshot(path=str(shot), full_page=True)
    image = image_module.open(shot).convert("RGB")

    expected = expected_cells(records, {})
    checked = Counter()
    for (row, case), want in sorted(expected.items()):
        if not want["text"]:
            continue
        box = cell_locator(page, row, case).bounding_box()
        colours = cell_pixels(image, box, inset=4)
        if want["colour"] is not None:
            # The background fills the cell apart from its text.
            dominant, count = colours.most_common(1)[0]
            assert near(dominant, want["colour"]), (row, case, dominant)
            assert count > 0.5 * colours.total(), (row, case)
            border = image.getpixel((round(box["x"]) + 2, round(box["y"] + 2)))[:3]
            if "flagged" in want["classes"]:
                assert near(border, (0, 0, 0), 40), (row, case, border)
            else:
                assert near(border, want["colour"]), (row, case, border)
            checked["over" if "over" in want["classes"] else "ratio"] += 1
        elif want["classes"] == ["mark", "mark-unsupported"]:
            # Plain grey, the one mark without stripes.
            dominant, count = colours.most_common(1)[0]
            assert near(dominant, (0xEE, 0xEE, 0xEE)), (row, case, dominant)
            checked["mark-unsupported"] += 1
        else:
            # The other marks are striped: two colours, each a large share.
            (_, first), (_, second) = colours.most_common(2)
            assert first > 0.15 * colours.total(), (row, case)
            assert second > 0.15 * colours.total(), (row, case)
            checked[want["classes"][1]] += 1
    assert set(checked) == {
        "ratio",
        "over",
        "mark-error",
        "mark-rejected",
        "mark-unsupported",
    }


def test_detail_tolerates_missing_summaries(browser, report_files, tmp_path):
    # A record edited by hand, or written by an older normconf, may lack parts of
    # its inputs summary. The detail then shows "none" for them instead of failing.
    document = json.loads(report_files["merged"].read_text(encoding="utf-8"))
    record = next(r for r in document["results"] if r["case"] == "large-mean-1e4")
    record["worst_slice"] = {"channel": 0, "x": None}
    record["inputs"]["gamma"] = None
    merged = tmp_path / "edited.json"
    merged.write_text(json.dumps(document), encoding="utf-8")
    page_path = tmp_path / "edited.html"
    assert reports.main(["html", str(merged), "--output", str(page_path)]) == 0

    watch = open_page(browser, page_path)
    try:
        row = f"{record['framework']}/{record['implementation']}"
        cell_locator(watch, row, "large-mean-1e4").click()
        tables = detail_tables(watch)
        edited = next(
            table
            for table in tables
            if table["item"] == f"cpu float32 {record['quantity']}"
            and table["verdict"] == record["verdict"]
        )
        assert edited["x at worst"] == "channel 0, all samples: none"
        assert "gamma" not in edited
        assert watch.errors == []
    finally:
        watch.page.context.close()
