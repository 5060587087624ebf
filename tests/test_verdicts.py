"""Verdicts for adapters that reject, crash or return malformed results."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from adapters.contract import Device, Implementation, Rejected, Result
from references.instance_norm import instance_norm
from suites import cases, report
from suites.verdicts import Item, run_item, unsupported_reason
from tests.faults import Float32Kernel


class RejectsEverything(Float32Kernel):
    framework = "rejects"

    def run(self, request):
        raise Rejected("ValueError: no thanks")


class Crashes(Float32Kernel):
    framework = "crashes"

    def run(self, request):
        raise ZeroDivisionError("division by zero")


class ReturnsNone(Float32Kernel):
    framework = "returns-none"

    def run(self, request):
        return None


class WrongShape(Float32Kernel):
    framework = "wrong-shape"

    def run(self, request):
        result = super().run(request)
        result.output = result.output.reshape(-1)
        return result


class WrongDtype(Float32Kernel):
    framework = "wrong-dtype"

    def run(self, request):
        result = super().run(request)
        result.dtype = "float64"
        return result


class MissingGradient(Float32Kernel):
    framework = "missing-gradient"

    def run(self, request):
        result = super().run(request)
        result.grad_beta = None
        return result


class NanEverywhere(Float32Kernel):
    framework = "nan-everywhere"

    def run(self, request):
        result = super().run(request)
        result.output = np.full_like(result.output, np.nan)
        return result


def verdicts(adapter, case_name: str) -> dict[str, object]:
    item = Item(
        adapter.framework, "kernel", "cpu", "float32", cases.by_name(case_name), 0
    )
    return {
        record.quantity: record
        for record in run_item(adapter, item, adapter.implementations()[0])
    }


def test_rejection_allowed_conforms():
    records = verdicts(RejectsEverything(), "M1")
    assert {r.verdict for r in records.values()} == {"rejected"}
    assert all(r.conforming for r in records.values())
    assert "no thanks" in records["output"].message


def test_rejection_of_ordinary_input_fails():
    records = verdicts(RejectsEverything(), "random-2d")
    assert {r.verdict for r in records.values()} == {"rejected"}
    assert not any(r.conforming for r in records.values())


def test_crash_is_error():
    record = verdicts(Crashes(), "random-2d")["output"]
    assert record.verdict == "error"
    assert "ZeroDivisionError" in record.message


def test_none_result_is_error():
    record = verdicts(ReturnsNone(), "random-2d")["grad_input"]
    assert record.verdict == "error"
    assert "NoneType" in record.message


def test_wrong_shape_is_error():
    records = verdicts(WrongShape(), "random-2d")
    assert records["output"].verdict == "error"
    assert "shape" in records["output"].message
    assert records["grad_input"].verdict == "pass"


def test_wrong_dtype_is_error():
    record = verdicts(WrongDtype(), "random-2d")["output"]
    assert record.verdict == "error"
    assert "float64 for a float32 input" in record.message


def test_missing_gradient_is_error():
    record = verdicts(MissingGradient(), "random-2d")["grad_beta"]
    assert record.verdict == "error"
    assert "missing" in record.message


def test_nan_output_fails():
    record = verdicts(NanEverywhere(), "random-2d")["output"]
    assert record.verdict == "fail"
    assert "non-finite mismatch" in record.message


def test_no_affine_has_two_quantities():
    records = verdicts(Float32Kernel(), "no-affine")
    assert sorted(records) == ["grad_input", "output"]


def test_no_gradients_marked_unsupported():
    item = Item("k", "kernel", "cpu", "float32", cases.by_name("random-2d"), 0)
    implementation = Implementation(
        "kernel", "forward only", gradients=False, gradient_reason="no autodiff"
    )
    records = {r.quantity: r for r in run_item(Float32Kernel(), item, implementation)}
    assert records["output"].verdict == "pass"
    assert records["grad_input"].verdict == "unsupported"
    assert records["grad_gamma"].verdict == "unsupported"
    assert records["grad_gamma"].message == "no autodiff"


def test_layout_unsupported_reason():
    item = Item("k", "kernel", "cpu", "float32", cases.by_name("channels-last-2d"), 0)
    adapter = Float32Kernel()
    implementation = Implementation("kernel", "channels-first only")
    reason = unsupported_reason(adapter, implementation, Device("cpu"), item)
    assert "channels_first input only" in reason


def test_absent_device_reason():
    item = Item("k", "kernel", "gpu", "float32", cases.by_name("random-2d"), 0)
    adapter = Float32Kernel()
    (implementation,) = adapter.implementations()
    device = Device("gpu", available=False, reason="no GPU seen")
    assert unsupported_reason(adapter, implementation, device, item) == "no GPU seen"


class ChannelsLastKernel(Float32Kernel):
    """Takes x as (N, *spatial, C) and computes with the float32 kernel."""

    framework = "channels-last"

    def implementations(self):
        return [Implementation("kernel", "channels-last", layouts=("channels_last",))]

    def run(self, request):
        moved = dataclasses.replace(
            request,
            x=np.moveaxis(request.x, -1, 1),
            grad_output=np.moveaxis(request.grad_output, -1, 1),
            layout="channels_first",
        )
        result = super().run(moved)
        result.output = np.moveaxis(result.output, 1, -1)
        result.grad_input = np.moveaxis(result.grad_input, 1, -1)
        return result


def test_channels_last_kernel_passes():
    records = verdicts(ChannelsLastKernel(), "channels-last-3d")
    assert {r.verdict for r in records.values()} == {"pass"}


def test_channels_last_request_layout():
    seen = []

    class Spy(ChannelsLastKernel):
        def run(self, request):
            seen.append(request)
            return super().run(request)

    verdicts(Spy(), "channels-last-2d")
    assert seen[0].x.shape == (2, 5, 7, 3)
    assert seen[0].layout == "channels_last"


def test_channels_first_output_for_channels_last_is_error():
    class Untransposed(ChannelsLastKernel):
        def run(self, request):
            result = super().run(request)
            result.output = np.moveaxis(result.output, -1, 1)
            return result

    record = verdicts(Untransposed(), "channels-last-2d")["output"]
    assert record.verdict == "error"
    assert "shape" in record.message


def test_report_is_strict_json(tmp_path):
    record = verdicts(NanEverywhere(), "random-2d")["output"]
    row = dict(vars(record))
    document = report.build([row], {"k": {"version": "1"}}, 0, ["pytest"])
    path = tmp_path / "report.json"
    report.write(document, path)
    text = path.read_text(encoding="utf-8")
    loaded = json.loads(text, parse_constant=pytest.fail)
    assert loaded["results"][0]["error"] == "Infinity"
    assert loaded["results"][0]["got"] == "NaN"
    assert loaded["summary"]["fail"] == 1


def test_count_table_rows():
    rows = [
        {"framework": "a", "implementation": "x", "verdict": "pass"},
        {"framework": "a", "implementation": "x", "verdict": "fail"},
        {"framework": "b", "implementation": "y", "verdict": "pass"},
    ]
    lines = report.count_table(rows)
    assert lines[0].startswith("implementation")
    assert lines[2].split()[:3] == ["a/x", "1", "1"]
    assert lines[3].split()[:2] == ["b/y", "1"]


class Float32EpsAttribute(Float32Kernel):
    """A float64 kernel whose eps reaches it rounded to float32, as an ONNX attribute
    does. It computes with the float64 reference itself, so only eps differs."""

    framework = "float32-eps"
    declared: object = "rounded"

    def unsupported_reason(self, implementation, device, dtype):
        return None

    def run(self, request):
        eps = float(np.float32(request.eps))
        exact = instance_norm(
            request.x, request.gamma, request.beta, request.grad_output, eps
        )
        declared = eps if self.declared == "rounded" else self.declared
        return Result(
            output=exact.output,
            grad_input=exact.grad_input,
            grad_gamma=exact.grad_gamma,
            grad_beta=exact.grad_beta,
            dtype="float64",
            eps=declared,
        )


def float64_verdicts(adapter, case_name: str) -> dict[str, object]:
    item = Item(
        adapter.framework, "kernel", "cpu", "float64", cases.by_name(case_name), 0
    )
    return {
        record.quantity: record
        for record in run_item(adapter, item, adapter.implementations()[0])
    }


def test_declared_float32_eps_passes_with_its_reference():
    records = float64_verdicts(Float32EpsAttribute(), "eps1e-3")
    assert {r.verdict for r in records.values()} == {"pass"}
    assert records["output"].eps == float(np.float32(1e-3))
    assert "as the framework stores it" in records["output"].message


def test_undeclared_float32_eps_fails_in_float64():
    adapter = Float32EpsAttribute()
    adapter.declared = None
    records = float64_verdicts(adapter, "eps1e-3")
    assert records["output"].verdict == "fail"
    assert records["output"].eps is None


@pytest.mark.parametrize("declared", [2e-3, "1e-3", True])
def test_unrounded_declared_eps_is_error(declared):
    adapter = Float32EpsAttribute()
    adapter.declared = declared
    records = float64_verdicts(adapter, "eps1e-3")
    assert {r.verdict for r in records.values()} == {"error"}
    assert "Result.eps" in records["output"].message


class DeclaresComputeDtype(Float32Kernel):
    """The correct float32 kernel, declaring a compute format for its results."""

    framework = "declares-compute-dtype"
    declared: object = "tfloat32"

    def run(self, request):
        result = super().run(request)
        result.compute_dtype = self.declared
        return result


class Tf32Rounding(DeclaresComputeDtype):
    """Rounds the output to TF32's 10-bit fraction, as tensor-core math would."""

    framework = "tf32-rounding"

    def run(self, request):
        result = super().run(request)
        mantissa, exponent = np.frexp(result.output.astype(np.float64))
        rounded = np.ldexp(np.round(mantissa * 2.0**11) / 2.0**11, exponent)
        result.output = rounded.astype(np.float32)
        return result


def test_tf32_rounding_fails_in_float32_units():
    adapter = Tf32Rounding()
    adapter.declared = None
    assert verdicts(adapter, "random-2d")["output"].verdict == "fail"


def test_tf32_rounding_passes_in_tf32_units():
    record = verdicts(Tf32Rounding(), "random-2d")["output"]
    assert record.verdict == "pass"
    assert record.compute_dtype == "tfloat32"
    assert "u of tfloat32" in record.message


def test_finer_compute_dtype_keeps_tested_units():
    adapter = DeclaresComputeDtype()
    adapter.declared = "float64"
    record = verdicts(adapter, "random-2d")["output"]
    assert record.verdict == "pass"
    assert "u of float32" in record.message


def test_unknown_compute_dtype_is_error():
    adapter = DeclaresComputeDtype()
    adapter.declared = "float8"
    records = verdicts(adapter, "random-2d")
    assert {r.verdict for r in records.values()} == {"error"}
    assert "compute_dtype 'float8'" in records["output"].message


@pytest.mark.parametrize("declared", ["float16", "bfloat16"])
def test_coarser_non_tf32_compute_dtype_is_error(declared):
    adapter = DeclaresComputeDtype()
    adapter.declared = declared
    records = verdicts(adapter, "random-2d")
    assert {r.verdict for r in records.values()} == {"error"}
    assert "only tfloat32 on float32 input" in records["output"].message
