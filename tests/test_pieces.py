"""Large inputs are generated, summarized and judged a group of samples at a time.

Each test lowers suites.cases.CHUNK_ELEMENTS so that small catalogue cases take
the piecewise path, and checks that it gives what the whole-array path gives.
"""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from suites import cases, dtypes, export, isolation, report, verdicts
from suites.verdicts import Item, run_item
from tests import faults


def clear_caches() -> None:
    cases.materialize.cache_clear()
    verdicts.catalogue_reference.cache_clear()
    report.cached_inputs_summary.cache_clear()


@pytest.fixture
def small_pieces(monkeypatch):
    """Make every case with more than 60 elements large, then restore the limit."""
    clear_caches()
    monkeypatch.setattr(cases, "CHUNK_ELEMENTS", 60)
    yield
    clear_caches()


def test_sample_chunks_cover_the_batch():
    assert list(cases.sample_chunks((4, 3, 5), limit=60)) == [(0, 4)]
    assert list(cases.sample_chunks((4, 3, 5), limit=30)) == [(0, 2), (2, 4)]
    assert list(cases.sample_chunks((5, 3, 5), limit=30)) == [(0, 2), (2, 4), (4, 5)]
    # A sample larger than the limit is a piece of its own.
    assert list(cases.sample_chunks((3, 3, 5), limit=4)) == [(0, 1), (1, 2), (2, 3)]
    assert list(cases.sample_chunks((0, 3, 5), limit=4)) == [(0, 0)]


def test_every_small_case_is_one_piece():
    largest = max(case.elements for case in faults.SMALL_CASES)
    assert largest <= cases.CHUNK_ELEMENTS
    assert [case.name for case in cases.CATALOGUE if case.large] == [
        "long-reduction-2e26"
    ]
    assert cases.by_name("long-reduction-2e26").elements == 2**26


@pytest.mark.parametrize("dtype", ["float64", "float32", "float16", "bfloat16"])
@pytest.mark.parametrize("name", ["random-2d", "random-3d", "constant-slice"])
def test_inputs_in_pieces_equal_whole_draws(name, dtype, monkeypatch):
    case = cases.by_name(name)
    clear_caches()
    whole = cases.materialize(case, dtype, 3)
    clear_caches()
    monkeypatch.setattr(cases, "CHUNK_ELEMENTS", 60)
    assert case.large
    pieces = cases.materialize(case, dtype, 3)
    clear_caches()
    for field in ("x", "gamma", "beta", "grad_output"):
        np.testing.assert_array_equal(getattr(pieces, field), getattr(whole, field))
        assert getattr(pieces, field).dtype == getattr(whole, field).dtype


JUDGED = [
    "random-2d",
    "random-3d",
    "channels-last-2d",
    "no-affine",
    "constant-slice",
    "constant-slice-eps0",
    "nan-element",
    "inf-element",
    "gamma-zero",
    "dy-ones",
]
KERNELS = [
    faults.Float32Kernel,
    faults.StatisticsAcrossBatch,
    faults.SwappedParameterGradients,
    faults.DroppedDxTerm,
]


def judge(kernel, name: str) -> list:
    case = cases.by_name(name)
    adapter = kernel()
    item = Item(adapter.framework, "kernel", "cpu", "float32", case, 0)
    return run_item(adapter, item, adapter.implementations()[0])


@pytest.mark.parametrize("kernel", KERNELS, ids=lambda kernel: kernel.__name__)
@pytest.mark.parametrize("name", JUDGED)
def test_judging_in_pieces_matches_whole(name, kernel, monkeypatch):
    clear_caches()
    whole = judge(kernel, name)
    clear_caches()
    monkeypatch.setattr(cases, "CHUNK_ELEMENTS", 60)
    assert cases.by_name(name).large
    pieces = judge(kernel, name)
    clear_caches()
    assert [r.quantity for r in pieces] == [r.quantity for r in whole]
    for got, expected in zip(pieces, whole, strict=True):
        assert got.verdict == expected.verdict, got.message
        assert got.worst_index == expected.worst_index, got.message
        assert got.budget == expected.budget
        if got.quantity in ("output", "grad_input"):
            # Every slice lies in one piece: the same float64 values.
            assert got.error == expected.error
            assert got.expected == pytest.approx(
                expected.expected, rel=0, abs=0, nan_ok=True
            )
        else:
            # The parameter gradients add the pieces' sums: the last digits move.
            assert got.error == pytest.approx(expected.error, rel=1e-6, abs=1e-9)
            assert got.expected == pytest.approx(
                expected.expected, rel=1e-12, nan_ok=True
            )


class NanEverywhere(faults.Float32Kernel):
    framework = "nan-everywhere"

    def run(self, request):
        result = super().run(request)
        for name in ("output", "grad_input", "grad_gamma", "grad_beta"):
            setattr(result, name, np.full_like(getattr(result, name), np.nan))
        return result


def test_no_numbers_found_across_pieces(small_pieces):
    records = judge(NanEverywhere, "random-2d")
    assert [r.verdict for r in records] == ["error"] * 4
    assert "returned no numbers" in records[0].message
    # Where some exact value is NaN, NaN everywhere is a numerical failure.
    records = judge(NanEverywhere, "nan-element")
    assert {r.verdict for r in records} == {"fail"}


def test_large_array_summary_matches_whole(monkeypatch):
    rng = np.random.default_rng(5)
    values = rng.normal(3.0, 2.0, size=(7, 3, 40)).astype(np.float32)
    values[1, 1, 1] = np.nan
    values[2, 0, 3] = -np.inf
    whole = report.array_summary(values)
    monkeypatch.setattr(cases, "CHUNK_ELEMENTS", 100)
    pieces = report.array_summary(values)
    assert pieces.keys() == whole.keys()
    for key in ("count", "nan", "inf", "min", "max"):
        assert pieces[key] == whole[key]
    for key in ("mean", "std"):
        assert pieces[key] == pytest.approx(whole[key], rel=1e-12)


def test_large_array_summary_without_finite_values(monkeypatch):
    monkeypatch.setattr(cases, "CHUNK_ELEMENTS", 10)
    summary = report.array_summary(np.full((4, 2, 3), np.nan))
    assert (summary["count"], summary["nan"], summary["inf"]) == (24, 24, 0)
    assert (summary["mean"], summary["std"]) == (None, None)


def test_large_case_has_no_whole_reference():
    with pytest.raises(ValueError, match="reference_pieces"):
        verdicts.catalogue_reference(cases.by_name("long-reduction-2e26"), "float32", 0)


def test_largest_case_posed_in_float32_only():
    case = cases.by_name("long-reduction-2e26")
    assert case.unfit_reason("float32") is None
    for dtype in ("float64", "float16", "bfloat16"):
        assert "posed in float32 only" in case.unfit_reason(dtype)


def test_export_skips_the_largest_case(tmp_path):
    options = ["--output", str(tmp_path), "--cases", "long-reduction-2e26"]
    assert export.main(options) == 0
    manifest = json.loads((tmp_path / export.MANIFEST_FILE).read_text())
    assert manifest["files"] == []
    reasons = {entry["dtype"]: entry["reason"] for entry in manifest["skipped"]}
    assert sorted(reasons) == sorted(dtypes.DTYPES)
    assert "more than the 1048576 of a whole float64 reference" in reasons["float32"]


def test_large_input_change_found_by_checksum(small_pieces):
    case = cases.by_name("random-2d")
    inputs = cases.materialize(case, "float32", 0)
    request = verdicts.build_request(
        Item("kernel", "kernel", "cpu", "float32", case, 0), inputs, True
    )
    writable = dataclasses.replace(request, x=request.x.copy())
    before = isolation.input_snapshot(writable)
    assert isinstance(before["x"], isolation.Checksum)
    assert isinstance(before["gamma"], np.ndarray)
    current = {name: getattr(writable, name) for name in before}
    assert isolation.changed_inputs_message(current, before) is None
    writable.x[1, 2, 4, 6] += 1.0
    message = isolation.changed_inputs_message(current, before)
    assert message is not None and "input x " in message


def test_large_arrays_compared_piece_by_piece(small_pieces):
    before = np.arange(200, dtype=np.float32).reshape(2, 100)
    before[0, 3] = np.nan
    now = before.copy()
    assert isolation.changed_inputs_message({"x": now}, {"x": before}) is None
    now[1, 99] = -1.0
    assert "input x " in isolation.changed_inputs_message({"x": now}, {"x": before})
    assert "input x " in isolation.changed_inputs_message(
        {"x": before.astype(np.float64)}, {"x": before}
    )
