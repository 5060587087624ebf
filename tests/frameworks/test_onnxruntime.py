"""The ONNX Runtime adapter's own logic; skipped where onnxruntime is not installed.

The conformance run covers the numbers; these tests cover what it cannot see: device
discovery from NORMCONF_ORT_PROVIDERS, the reasons given for absent providers, the
eps the adapter declares, models that must not depend on Reshape's 0 and -1, and
onnxruntime-training's accumulate scheme: its buffers, its reasons, its errors.
"""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")

from adapters import onnxruntime as adapter_module  # noqa: E402
from adapters.contract import Request  # noqa: E402
from suites import cases  # noqa: E402
from tests.frameworks.accumulate_checks import (  # noqa: E402
    assert_reported_sums,
    assert_running_sums,
    assert_same_buffers,
)
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


# onnxruntime-training's accumulate scheme (training API Module)


@pytest.fixture(scope="module")
def training_adapter(adapter):
    if not isinstance(adapter, adapter_module.OnnxRuntimeTrainingAdapter):
        pytest.skip("the accumulate scheme needs the onnxruntime-training package")
    return adapter


def repeated_request(
    implementation: str, case_name: str, scheme: str, calls: int = 3
) -> Request:
    """A float32 request of the case with `calls` grad_outputs: the case's own
    first, then draws from a seeded generator."""
    single = request(implementation, case_name)
    rng = np.random.default_rng(11)
    stack = [single.grad_output] + [
        rng.standard_normal(single.x.shape).astype(np.float32) for _ in range(calls - 1)
    ]
    stack = np.stack(stack)
    stack.setflags(write=False)
    op = {"layer_norm.onnx": "layer_norm", "batch_norm.onnx": "batch_norm"}
    if implementation == "layer_norm.onnx":
        # LayerNorm over the last axis: gamma and beta of that axis's length.
        gamma, beta = rng.standard_normal((2, single.x.shape[-1]), np.float32)
        single = dataclasses.replace(single, gamma=gamma, beta=beta, normalized_ndim=1)
    return dataclasses.replace(
        single,
        op=op.get(implementation, "instance_norm"),
        gradients=True,
        grad_output=stack[0],
        grad_outputs=stack,
        backward_scheme=scheme,
    )


def test_reported_accumulate_adds_four_per_call(training_adapter):
    # The reported input, loss = sum(y) three times: dbeta = 4, 8 and 12 per
    # channel, dgamma = 0 and dx = 0 up to float32 roundoff.
    ones = repeated_request("batch-norm-reshape", "reported-repeated-backward", "")
    stack = np.ones_like(ones.grad_outputs)
    result = training_adapter.run(
        dataclasses.replace(
            ones,
            grad_output=stack[0],
            grad_outputs=stack,
            backward_scheme="accumulate",
        )
    )
    assert_reported_sums(result)


@pytest.mark.parametrize(
    "implementation", ["batch-norm-reshape", "batch_norm.onnx", "layer_norm.onnx"]
)
def test_accumulated_buffers_are_running_sums_of_single_calls(
    training_adapter, implementation
):
    accumulated = training_adapter.run(
        repeated_request(implementation, "random-2d", "accumulate")
    )
    repeated = training_adapter.run(
        repeated_request(implementation, "random-2d", "repeat")
    )
    assert_running_sums(accumulated, repeated)


def test_each_accumulate_request_starts_from_zero(training_adapter):
    request_ = repeated_request("layer_norm.onnx", "random-2d", "accumulate")
    first = training_adapter.run(request_)
    second = training_adapter.run(request_)
    assert_same_buffers(first, second)


def test_accumulate_without_affine_returns_the_input_gradient_only(
    training_adapter,
):
    request_ = repeated_request("batch_norm.onnx", "random-2d", "accumulate")
    result = training_adapter.run(dataclasses.replace(request_, affine=False))
    assert result.grad_input_steps.shape == (3, *request_.x.shape)
    assert result.grad_gamma_steps is None
    assert result.grad_beta_steps is None


@pytest.mark.parametrize(
    ("dtype", "cause"),
    [
        ("float64", "InPlaceAccumulatorV2"),
        ("float16", "CheckpointState.load_checkpoint raised RuntimeError: "),
        ("float16", "data_types_internal.h:342: Unsupported data type: 10"),
    ],
)
def test_accumulate_reason_names_the_missing_piece(training_adapter, dtype, cause):
    reason = training_adapter.backward_scheme_reason(
        "layer_norm.onnx", "accumulate", "cpu", dtype
    )
    assert cause in reason
    # The C++ function signature is left out; the source location stays.
    assert "onnxruntime::" not in reason
    assert "/onnxruntime_src/" in reason


def test_accumulate_runs_in_float32_and_repeat_everywhere(training_adapter):
    reason = training_adapter.backward_scheme_reason
    assert reason("layer_norm.onnx", "accumulate", "cpu", "float32") is None
    assert reason("layer_norm.onnx", "repeat", "cpu", "float64") is None


def test_accumulate_is_cpu_only(training_adapter):
    reason = training_adapter.backward_scheme_reason(
        "layer_norm.onnx", "accumulate", "cuda", "float32"
    )
    assert "CPUExecutionProvider only" in reason


def test_missing_training_api_makes_accumulate_unsupported(
    training_adapter, monkeypatch
):
    def missing(name):
        raise ModuleNotFoundError("No module named 'torch'")

    monkeypatch.setattr(adapter_module.importlib, "import_module", missing)
    reason = training_adapter._probe_accumulate("layer_norm.onnx", "cpu", "float32")
    assert "importing onnxruntime.training failed" in reason
    assert "No module named 'torch'" in reason


def test_empty_batch_accumulate_raises_rejected(training_adapter):
    request_ = repeated_request("layer_norm.onnx", "N0", "accumulate")
    with pytest.raises(adapter_module.Rejected, match="raised RuntimeError"):
        training_adapter.run(request_)


SIGNATURES = [
    # onnxruntime-training 1.19.2's float16 checkpoint error, shortened.
    (
        "/onnxruntime_src/include/a.h:342 void ns::Policy<Ret>::operator()"
        "(int32_t, Ret&) const [with Ret = Status; int32_t = int] Unsupported "
        "data type: 10",
        "/onnxruntime_src/include/a.h:342: Unsupported data type: 10",
    ),
    (
        "/src/module.cc:312 ns::Module::Module(const A&, B<C* const>) [X] : 9 : Y",
        "/src/module.cc:312: [X] : 9 : Y",
    ),
    # A location inside the message, as in "Exception during initialization".
    (
        "/src/m.cc:1 ns::M::M(int) failed: /src/g.cc:549 bool ns::g::Remove(ns::"
        "Graph&, ns::Node&) Should be unreachable",
        "/src/m.cc:1: failed: /src/g.cc:549: Should be unreachable",
    ),
    (
        "/src/c.cc:7 void ns::(anonymous namespace)::Check(const Node&) No input",
        "/src/c.cc:7: No input",
    ),
    ("/src/l.cc:9 void Foo::Bar()::<lambda(int)> Bad index", "/src/l.cc:9: Bad index"),
    # Text without a signature comes back unchanged.
    ("/src/a.cc:12 Could not load (file missing) for node x", None),
    ("/src/a.cc:12 i < node->OutputDefs().size() was false", None),
    ("plain (text)", None),
]


@pytest.mark.parametrize(("text", "expected"), SIGNATURES)
def test_error_text_drops_the_function_signature(text, expected):
    assert adapter_module._without_signature(text) == (expected or text)


def test_error_text_leaves_out_logged_repeats():
    error = RuntimeError("/src/m.cc:1 ns::M::M(int) Exception: bad node")
    log = [
        "\x1b[1;31m2026-12-05 10:00:00.0 [E:onnxruntime:, m.cc:1] Exception: "
        "bad node\x1b[m\n"
        "\x1b[1;31m2026-12-05 10:00:00.0 [E:onnxruntime:, k.cc:2] other cause\x1b[m\n"
    ]
    assert adapter_module._training_error_text(error, log) == (
        "RuntimeError: /src/m.cc:1: Exception: bad node; onnxruntime logged: "
        "other cause"
    )


def test_failed_training_step_keeps_stderr_quiet(training_adapter, capfd):
    # LayerNorm over an axis of length 1: onnxruntime-training 1.19.2's
    # LayerNormGrad fails in the step, and logs its error to stderr too.
    request_ = repeated_request("layer_norm.onnx", "M1", "accumulate")
    with pytest.raises(adapter_module.Rejected, match="a training step raised"):
        training_adapter.run(request_)
    assert "onnxruntime" not in capfd.readouterr().err


def test_scheme_reason_names_an_undeclared_scheme(training_adapter):
    reason = training_adapter.backward_scheme_reason(
        "instance-norm-opset21", "accumulate", "cpu", "bfloat16"
    )
    assert reason == (
        "implementation instance-norm-opset21 has no backward scheme 'accumulate'"
    )


def test_running_statistics_in_accumulate_raise_value_error(
    training_adapter,
):
    request_ = repeated_request("batch_norm.onnx", "random-2d", "accumulate")
    statistics = np.zeros(request_.x.shape[1], np.float32)
    with pytest.raises(ValueError, match="running statistics"):
        training_adapter.run(
            dataclasses.replace(
                request_, running_mean=statistics, running_var=statistics + 1
            )
        )
