"""The golden data export (`python -m suites.export`), NumPy only.

The recipe check runs NumPy kernels from tests/faults.py on the exported inputs,
judges their results with `judge_by_recipe` (the recipe in docs/golden-data.md,
written with NumPy and the exported numbers alone) and requires the suite's own
verdict for every quantity.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest

from adapters.contract import Request
from suites import cases, dtypes, export
from suites.verdicts import OP, catalogue_reference, quantities_for, to_layout
from tests import faults

ROOT = Path(__file__).resolve().parents[1]
SEED = 0
# A few cases that cover both layouts, affine off, an empty batch, a NaN, an
# infinity, a rejectable case and a case float16 cannot hold.
EXPORTED_CASES = (
    "random-2d",
    "channels-last-2d",
    "no-affine",
    "M1",
    "N0",
    "constant-slice-eps0",
    "nan-element",
    "inf-element",
    "large-mean-1e4",
    "large-mean-1e6",
    "eps1e-3",
)
ERROR_PREFIX = "python -m suites.export: error: "


def judge_by_recipe(
    got: np.ndarray,
    expected: np.ndarray,
    scale: np.ndarray,
    unit_roundoff: float,
    budget: float,
    overflow_threshold: float | None,
    allowance: float,
) -> tuple[bool, float]:
    """Judge one quantity by the recipe of docs/golden-data.md and return whether
    it passes and its largest normalized error."""
    got = np.asarray(got, dtype=np.float64)
    if expected.size == 0:
        return True, 0.0
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        difference = np.maximum(np.abs(got - expected) - allowance, 0.0)
        errors = difference / (scale * unit_roundoff)
    errors[(got == expected) | (np.isnan(got) & np.isnan(expected))] = 0.0
    if overflow_threshold is not None:
        beyond = np.isfinite(expected) & (np.abs(expected) >= overflow_threshold)
        errors[beyond & (got == np.copysign(np.inf, expected))] = 0.0
    errors[np.isnan(errors)] = np.inf
    worst = float(errors.max())
    return worst <= budget, worst


def run_export(*arguments: str) -> int:
    """Run the export's main() with `arguments` and return its exit status."""
    try:
        return export.main(list(arguments))
    except SystemExit as exit_:
        return exit_.code


def export_cases(output: Path, *names: str, dtype_list: str | None = None) -> dict:
    """Export `names` into `output` and return the manifest."""
    arguments = ["--output", str(output), "--cases", ",".join(names)]
    if dtype_list is not None:
        arguments += ["--dtypes", dtype_list]
    assert run_export(*arguments) == 0
    return json.loads((output / export.MANIFEST_FILE).read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def golden(tmp_path_factory) -> tuple[Path, dict]:
    output = tmp_path_factory.mktemp("golden")
    return output, export_cases(output, *EXPORTED_CASES)


def load_arrays(path: Path) -> dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as archive:
        return {name: archive[name] for name in archive.files}


def npz_entry(manifest: dict, case_name: str, dtype: str) -> dict:
    (entry,) = [
        entry
        for entry in manifest["files"]
        if (entry["format"], entry["case"], entry["dtype"]) == ("npz", case_name, dtype)
    ]
    return entry


def relative_files(folder: Path) -> list[str]:
    return sorted(
        path.relative_to(folder).as_posix()
        for path in folder.rglob("*")
        if path.is_file()
    )


# ---------------------------------------------------------------------------------
# Determinism and the manifest


def test_export_is_byte_identical(golden, tmp_path, monkeypatch):
    first, _ = golden
    # Move time.time() a day ahead, so that a writer that stamps zip entries with
    # it would write other bytes.
    later = time.time() + 86400.0
    monkeypatch.setattr(time, "time", lambda: later)
    second = tmp_path / "again"
    export_cases(second, *EXPORTED_CASES)
    names = relative_files(first)
    assert names == relative_files(second)
    for name in names:
        assert (first / name).read_bytes() == (second / name).read_bytes(), name


def test_zip_entries_have_fixed_metadata(golden):
    output, manifest = golden
    for entry in manifest["files"]:
        with zipfile.ZipFile(output / entry["path"]) as archive:
            infos = archive.infolist()
        names = [f"{array['name']}.npy" for array in entry["arrays"]]
        assert [info.filename for info in infos] == names
        for info in infos:
            assert info.date_time == export.ZIP_DATE_TIME
            assert info.compress_type == zipfile.ZIP_STORED


def test_manifest_hashes_match_files(golden):
    output, manifest = golden
    for entry in manifest["files"]:
        data = (output / entry["path"]).read_bytes()
        assert hashlib.sha256(data).hexdigest() == entry["sha256"], entry["path"]


def test_manifest_lists_every_file(golden):
    output, manifest = golden
    listed = sorted(entry["path"] for entry in manifest["files"])
    assert listed == [
        name for name in relative_files(output) if name != export.MANIFEST_FILE
    ]


def test_manifest_is_sorted_json(golden):
    output, manifest = golden
    text = (output / export.MANIFEST_FILE).read_text(encoding="utf-8")
    assert text == json.dumps(manifest, indent=2, sort_keys=True) + "\n"
    assert manifest["schema"] == "normconf-golden"
    assert manifest["schema_version"] == 1
    assert manifest["seed"] == SEED


def test_manifest_describes_each_case(golden):
    _, manifest = golden
    for entry in manifest["files"]:
        case = cases.by_name(entry["case"])
        assert entry["description"] == case.description
        assert entry["group"] == case.group
        assert entry["layout"] == case.layout
        assert entry["shape"] == list(case.shape)
        assert entry["eps"] == case.eps
        assert entry["affine"] == case.affine
        assert entry["rejection_allowed"] == case.rejection_allowed
        container = np.dtype(dtypes.CONTAINER[entry["dtype"]]).name
        assert entry["container_dtype"] == container


def test_budgets_follow_manifest_formula(golden):
    _, manifest = golden
    table = manifest["error_model"]["budget"]
    for entry in manifest["files"]:
        n = entry["shape"][0]
        m = int(np.prod(entry["shape"][2:]))
        for quantity, fields in entry["quantities"].items():
            length = n * m if quantity in ("grad_gamma", "grad_beta") else m
            constants = table[quantity][entry["dtype"]]
            budget = constants["base"] + constants["growth"] * np.sqrt(max(length, 1))
            assert fields["reduction_length"] == length
            assert fields["budget"] == pytest.approx(budget, rel=1e-15)


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_overflow_threshold_matches_rounding(dtype):
    threshold = dtypes.OVERFLOW_THRESHOLD[dtype]
    below = np.nextafter(threshold, 0.0)
    rounded = dtypes.round_to(np.array([threshold, -threshold, below, -below]), dtype)
    assert np.isposinf(rounded[0])
    assert np.isneginf(rounded[1])
    assert np.all(np.isfinite(rounded[2:]))


def test_unfit_case_is_skipped(golden):
    output, manifest = golden
    case = cases.by_name("large-mean-1e6")
    skip = {
        "format": "npz",
        "case": case.name,
        "dtype": "float16",
        "reason": case.unfit_reason("float16"),
    }
    assert manifest["skipped"] == [skip]
    assert not (output / export.npz_name(case, "float16")).exists()


# ---------------------------------------------------------------------------------
# Array contents


def test_arrays_match_manifest(golden):
    output, manifest = golden
    for entry in manifest["files"]:
        arrays = load_arrays(output / entry["path"])
        listed = {
            array["name"]: (array["dtype"], array["shape"]) for array in entry["arrays"]
        }
        found = {
            name: (array.dtype.name, list(array.shape))
            for name, array in arrays.items()
        }
        assert found == listed, entry["path"]


def test_inputs_equal_materialize(golden):
    output, manifest = golden
    for entry in manifest["files"]:
        case = cases.by_name(entry["case"])
        inputs = cases.materialize(case, entry["dtype"], SEED)
        arrays = load_arrays(output / entry["path"])
        for name in ("x", "grad_output"):
            expected = to_layout(getattr(inputs, name), case.layout)
            assert arrays[name].dtype == expected.dtype
            assert np.array_equal(arrays[name], expected, equal_nan=True)
        if case.affine:
            assert np.array_equal(arrays["gamma"], inputs.gamma)
            assert np.array_equal(arrays["beta"], inputs.beta)
        else:
            assert "gamma" not in arrays
            assert "beta" not in arrays


def test_reference_and_scales_equal_suite(golden):
    output, manifest = golden
    for entry in manifest["files"]:
        case = cases.by_name(entry["case"])
        expected, scale = catalogue_reference(case, entry["dtype"], SEED)
        arrays = load_arrays(output / entry["path"])
        quantities = quantities_for(case, gradients=True)
        assert list(entry["quantities"]) == sorted(quantities)
        for quantity in quantities:
            x_shaped = quantity in ("output", "grad_input")
            layout = case.layout if x_shaped else "channels_first"
            reference = to_layout(getattr(expected, quantity), layout)
            assert np.array_equal(arrays[quantity], reference, equal_nan=True)
            scale_array = to_layout(scale[quantity], layout)
            assert np.array_equal(
                arrays[f"{quantity}_scale"], scale_array, equal_nan=True
            )


def test_bfloat16_inputs_in_float32(golden):
    output, manifest = golden
    entry = npz_entry(manifest, "random-2d", "bfloat16")
    arrays = load_arrays(output / entry["path"])
    assert arrays["x"].dtype == np.float32
    assert dtypes.is_representable(arrays["x"], "bfloat16")


# ---------------------------------------------------------------------------------
# The judging recipe against the suite's verdicts


def kernel_result(kernel: faults.Float32Kernel, entry: dict, arrays: dict):
    """Run the kernel on the npz file's inputs, as an adapter receives them."""
    request = Request(
        op=OP,
        implementation="kernel",
        device="cpu",
        dtype=entry["dtype"],
        x=arrays["x"],
        gamma=arrays.get("gamma"),
        beta=arrays.get("beta"),
        grad_output=arrays["grad_output"],
        eps=entry["eps"],
        affine=entry["affine"],
        gradients=True,
        layout=entry["layout"],
    )
    return kernel.run(request)


def recipe_verdicts(kernel, entry: dict, arrays: dict, manifest: dict) -> dict:
    """Return quantity -> (verdict, worst error) by the recipe."""
    result = kernel_result(kernel, entry, arrays)
    threshold = manifest["error_model"]["overflow_threshold"][entry["dtype"]]
    verdicts = {}
    for quantity, fields in entry["quantities"].items():
        passed, worst = judge_by_recipe(
            getattr(result, quantity),
            arrays[quantity],
            arrays[f"{quantity}_scale"],
            entry["unit_roundoff"],
            fields["budget"],
            threshold,
            entry["subnormal_allowance"],
        )
        verdicts[quantity] = ("pass" if passed else "fail", worst)
    return verdicts


def suite_verdicts(kernel, case_name: str) -> dict:
    records = faults.run_case(kernel, case_name, SEED)
    return {
        quantity: (record.verdict, record.error) for quantity, record in records.items()
    }


# (kernel, case, whether some quantity fails)
RECIPE_CASES = [
    (faults.Float32Kernel, "random-2d", False),
    (faults.Float32Kernel, "channels-last-2d", False),
    (faults.Float32Kernel, "no-affine", False),
    (faults.Float32Kernel, "M1", False),
    (faults.Float32Kernel, "N0", False),
    (faults.Float32Kernel, "constant-slice-eps0", False),
    (faults.Float32Kernel, "nan-element", False),
    (faults.Float32Kernel, "inf-element", False),
    (faults.Float32Kernel, "large-mean-1e4", False),
    (faults.Float32Kernel, "eps1e-3", False),
    (faults.Float16Kernel, "large-mean-1e4", False),
    (faults.OnePassVariance, "large-mean-1e4", True),
    (faults.EpsOutsideSqrt, "eps1e-3", True),
    (faults.NanLeaksAcrossSlices, "nan-element", True),
    (faults.ChannelsLastReadAsChannelsFirst, "channels-last-2d", True),
    (faults.Float16SumOfValues, "large-mean-1e4", True),
]


@pytest.mark.parametrize(
    "kernel_class, case_name, fails",
    RECIPE_CASES,
    ids=[f"{kernel.__name__}-{case}" for kernel, case, _ in RECIPE_CASES],
)
def test_recipe_gives_suite_verdicts(golden, kernel_class, case_name, fails):
    output, manifest = golden
    kernel = kernel_class()
    entry = npz_entry(manifest, case_name, kernel.dtype)
    arrays = load_arrays(output / entry["path"])
    by_recipe = recipe_verdicts(kernel, entry, arrays, manifest)
    assert by_recipe == suite_verdicts(kernel, case_name)
    assert any(verdict == "fail" for verdict, _ in by_recipe.values()) == fails


def test_recipe_passes_exact_overflow(tmp_path):
    # sum(dy) over 2^18 upstream gradients with mean 1 is far beyond float16's
    # range: the correct float16 grad_beta is an infinity.
    case_name = "long-reduction-dy-mean"
    manifest = export_cases(tmp_path, case_name, dtype_list="float16")
    entry = npz_entry(manifest, case_name, "float16")
    arrays = load_arrays(tmp_path / entry["path"])
    threshold = manifest["error_model"]["overflow_threshold"]["float16"]
    assert np.all(np.abs(arrays["grad_beta"]) >= threshold)
    kernel = faults.Float16Kernel()
    by_recipe = recipe_verdicts(kernel, entry, arrays, manifest)
    assert by_recipe == suite_verdicts(kernel, case_name)
    assert by_recipe["grad_beta"] == ("pass", 0.0)


# ---------------------------------------------------------------------------------
# Command line


def error_lines(capsys) -> list[str]:
    return capsys.readouterr().err.splitlines()


@pytest.mark.parametrize(
    "arguments, value",
    [
        (["--dtypes", "float32,float8"], "float8"),
        (["--cases", "random-2d,no-such-case"], "no-such-case"),
        (["--cases", ","], "','"),
        (["--formats", "npz,tflite"], "tflite"),
        (["--seed", "-1"], "-1"),
        (["--seed", "one"], "one"),
    ],
)
def test_invalid_argument_exits_2(tmp_path, capsys, arguments, value):
    status = run_export("--output", str(tmp_path), *arguments)
    lines = error_lines(capsys)
    assert status == export.EXIT_USAGE
    assert len(lines) == 1, lines
    assert lines[0].startswith(ERROR_PREFIX)
    assert value in lines[0]


def test_missing_output_exits_2(capsys):
    status = run_export("--cases", "random-2d")
    lines = error_lines(capsys)
    assert status == export.EXIT_USAGE
    assert len(lines) == 1, lines
    assert "--output" in lines[0]


@pytest.mark.parametrize("value", ["", "  "])
def test_empty_output_exits_2(tmp_path, capsys, monkeypatch, value):
    # An empty name would otherwise write the export into the current folder.
    monkeypatch.chdir(tmp_path)
    status = run_export("--output", value, "--cases", "random-2d")
    lines = error_lines(capsys)
    assert status == export.EXIT_USAGE
    assert lines == [f"{ERROR_PREFIX}argument --output: the folder name is empty"]
    assert list(tmp_path.iterdir()) == []


def test_unwritable_output_exits_2(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder\n", encoding="utf-8")
    output = blocker / "golden"
    status = run_export("--output", str(output), "--cases", "random-2d")
    lines = error_lines(capsys)
    assert status == export.EXIT_USAGE
    assert len(lines) == 1, lines
    assert lines[0].startswith(ERROR_PREFIX)
    assert str(output) in lines[0]


def test_onnx_without_package_exits_2(tmp_path, capsys, monkeypatch):
    # A None entry in sys.modules makes the package look absent.
    monkeypatch.setitem(sys.modules, "onnx", None)
    status = run_export("--output", str(tmp_path), "--formats", "npz,onnx")
    lines = error_lines(capsys)
    assert status == export.EXIT_USAGE
    assert len(lines) == 1, lines
    assert lines[0].startswith(ERROR_PREFIX)
    assert "onnx package" in lines[0]
    assert not (tmp_path / export.MANIFEST_FILE).exists()


def test_module_runs_from_command_line(tmp_path):
    completed = subprocess.run(
        [
            sys.executable,
            "-m",
            "suites.export",
            "--output",
            str(tmp_path),
            "--cases",
            "random-1d",
            "--dtypes",
            "float32",
            "--seed",
            "3",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert completed.returncode == 0, completed.stderr
    manifest = json.loads((tmp_path / export.MANIFEST_FILE).read_text("utf-8"))
    assert [entry["path"] for entry in manifest["files"]] == [
        "npz/random-1d_float32.npz"
    ]
    assert manifest["seed"] == 3
    inputs = cases.materialize(cases.by_name("random-1d"), "float32", 3)
    arrays = load_arrays(tmp_path / "npz" / "random-1d_float32.npz")
    assert np.array_equal(arrays["x"], inputs.x)
