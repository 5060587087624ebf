"""The ONNX Runtime adapter's own logic; skipped where onnxruntime is not installed.

The conformance run covers the numbers; these tests cover what it cannot see: device
discovery from NORMCONF_ORT_PROVIDERS, the reasons given for absent providers, the
eps the adapter declares, and models that must not depend on Reshape's 0 and -1.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")

from adapters import onnxruntime as adapter_module  # noqa: E402
from adapters.contract import Request  # noqa: E402
from suites import cases  # noqa: E402
from tests.subprocess_runs import run_suite  # noqa: E402


def request(implementation: str, case_name: str, dtype: str = "float32") -> Request:
    case = cases.by_name(case_name)
    inputs = cases.materialize(case, dtype, 0)
    return Request(
        op="instance_norm",
        implementation=implementation,
        device="cpu",
        dtype=dtype,
        x=inputs.x,
        gamma=inputs.gamma,
        beta=inputs.beta,
        grad_output=inputs.grad_output,
        eps=case.eps,
        affine=case.affine,
        gradients=False,
    )


@pytest.fixture(scope="module")
def adapter():
    # In the onnxruntime-training environment the training adapter is the one that
    # runs; it builds the same models.
    try:
        return adapter_module.OnnxRuntimeAdapter()
    except ImportError:
        return adapter_module.OnnxRuntimeTrainingAdapter()


@pytest.mark.parametrize("value", ["NoSuchExecutionProvider", "CPU"])
def test_unknown_provider_name_raises(monkeypatch, adapter, value):
    monkeypatch.setenv(adapter_module.PROVIDERS_VARIABLE, value)
    with pytest.raises(ValueError, match=f"names {value}, which onnxruntime"):
        type(adapter)()


def test_plain_adapter_refuses_the_training_package():
    from onnxruntime.capi import onnxruntime_pybind11_state as state

    if not hasattr(state, "GradientGraphBuilder"):
        pytest.skip("the plain onnxruntime package is installed")
    with pytest.raises(ImportError, match="--framework onnxruntime-training"):
        adapter_module.OnnxRuntimeAdapter()


def test_cuda_is_always_declared(monkeypatch, adapter):
    monkeypatch.delenv(adapter_module.PROVIDERS_VARIABLE, raising=False)
    devices = {d.name: d for d in type(adapter)().devices()}
    assert "cuda" in devices
    if not devices["cuda"].available:
        assert ort.__version__ in devices["cuda"].reason


def test_provider_names_become_device_names():
    assert adapter_module.device_name("CUDAExecutionProvider") == "cuda"
    assert adapter_module.device_name("OpenVINOExecutionProvider") == "openvino"


def test_declares_the_float32_eps_it_computes_with(adapter):
    result = adapter.run(request("group-norm", "eps1e-3", "float64"))
    assert result.eps == float(np.float32(1e-3))
    assert result.eps != 1e-3


def test_empty_batch_through_the_reshape(adapter):
    result = adapter.run(request("batch-norm-reshape", "N0"))
    assert result.output.shape == cases.by_name("N0").shape


def test_logged_errors_keep_messages_only():
    text = (
        "\x1b[1;31m2026-12-04 15:44:16.2 [E:onnxruntime:Default, a.cc:1] "
        "Failed to load library x.so\x1b[m\n"
        "\x1b[0;93m2026-12-04 15:44:16.2 [W:onnxruntime:Default, b.cc:2] "
        "Require CUDA\x1b[m\n"
        "unrelated line\n"
    )
    assert (
        adapter_module._logged_errors(text)
        == "Failed to load library x.so | Require CUDA"
    )


def test_group_norm_model_inlines_a_one_pass_variance(adapter, tmp_path):
    """The evidence behind the deviation entry: the expanded function subtracts
    Mean * Mean from ReduceMean(X * X)."""
    import onnx

    spec = adapter._specs["group-norm"]
    signature = adapter._signature(spec, "float32", 2, 1e-5, 3, False)
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    ort.InferenceSession(
        adapter.model_bytes(spec, signature),
        options,
        providers=["CPUExecutionProvider"],
    )
    nodes = onnx.load(str(tmp_path / "optimized.onnx")).graph.node
    names = [node.op_type for node in nodes]
    assert "GroupNormalization" not in names
    assert any(
        node.op_type == "Sub" and "MeanOfSquare" in node.input[0] for node in nodes
    )


def test_ort_providers_option_selects_devices(adapter, tmp_path):
    report = tmp_path / "report.json"
    completed = run_suite(
        f"--framework={adapter.framework}",
        "--ort-providers=CPUExecutionProvider",
        "--cases=random-2d",
        "--dtypes=float32",
        f"--report={report}",
    )
    assert completed.returncode == 0, completed.stdout[-2000:]
    environment = json.loads(report.read_text(encoding="utf-8"))["environment"]
    devices = environment["frameworks"][adapter.framework]["devices"]
    # cuda is declared whatever the list, unavailable unless the list names it.
    available = [device["name"] for device in devices if device["available"]]
    assert available == ["cpu"]
    # A rerun tests the same providers.
    results = json.loads(report.read_text(encoding="utf-8"))["results"]
    assert all(
        record["command"].endswith("--ort-providers=CPUExecutionProvider")
        for record in results
    )


def test_ort_providers_option_rejects_unknown_name(adapter):
    completed = run_suite(
        f"--framework={adapter.framework}", "--ort-providers=NoSuchExecutionProvider"
    )
    assert completed.returncode == 4
    lines = [line for line in completed.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, completed.stderr
    assert "NoSuchExecutionProvider" in lines[0]
