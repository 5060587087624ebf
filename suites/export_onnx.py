"""ONNX backend test folders for the golden data export. Needs the onnx package.

For each channels-first (case, dtype), `backend_test` builds the files of
onnx/test_<case>_<dtype>/ in the layout of ONNX's own backend tests:

    model.onnx                   one InstanceNormalization node: inputs x, scale, B,
                                 output y, epsilon = the case's eps
    test_data_set_0/input_0.pb   x in the dtype
    test_data_set_0/input_1.pb   scale: gamma, or ones when affine is off
    test_data_set_0/input_2.pb   B: beta, or zeros when affine is off
    test_data_set_0/output_0.pb  the expected y: the float64 reference rounded to
                                 the dtype
    reference_output.pb          that reference in float64
    output_scale.pb              the reference's per-element error scale, float64

ONNX stores float attributes in float32, so the model's epsilon is the case's eps
rounded to float32, and the reference and scale here are computed with that
epsilon. The last two files lie outside test_data_set_0, where ONNX's backend test
runner (onnx.backend.test.runner, onnx 1.23.2) does not look.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from suites import cases, dtypes
from suites.cases import Case
from suites.export import SCHEMA_VERSION, array_fields
from suites.verdicts import catalogue_reference

OPERATOR = "InstanceNormalization"
# InstanceNormalization has versions 1, 6 and 22 in onnx 1.23.2. Version 6 accepts
# float16, float and double, and version 22 adds bfloat16, so opset 22 is the first
# at which one model form covers all four dtypes. onnxruntime 1.31.1 loads it.
OPSET = 22
PRODUCER_NAME = "normconf"
# The golden data schema version, not a package version, so that the model bytes
# change only when the export's format does.
PRODUCER_VERSION = str(SCHEMA_VERSION)
GRAPH_NAME = "normconf_instance_norm"

# Each dtype's ONNX tensor element type and its spelling in operator schemas.
TENSOR_TYPES = {
    "float32": (TensorProto.FLOAT, "tensor(float)"),
    "float64": (TensorProto.DOUBLE, "tensor(double)"),
    "float16": (TensorProto.FLOAT16, "tensor(float16)"),
    "bfloat16": (TensorProto.BFLOAT16, "tensor(bfloat16)"),
}
TEST_DATA = "test_data_set_0"


def schema_problem() -> str | None:
    """Return why the installed onnx cannot build the export's models, or None."""
    newest = onnx.defs.onnx_opset_version()
    if newest < OPSET:
        return (
            f"onnx {onnx.__version__} defines opsets up to {newest}, but the export "
            f"builds opset {OPSET} models; install an onnx release that defines opset "
            f"{OPSET} (normconf tests with onnx 1.23.2)"
        )
    return None


def accepted_dtypes() -> list[str]:
    """Return the dtypes that InstanceNormalization accepts at OPSET, read from
    the installed onnx's operator schema."""
    schema = onnx.defs.get_schema(OPERATOR, OPSET, "")
    (constraint,) = schema.type_constraints
    allowed = set(constraint.allowed_type_strs)
    return [
        dtype
        for dtype, (_, schema_name) in TENSOR_TYPES.items()
        if schema_name in allowed
    ]


def skip_reason(case: Case, dtype: str) -> str | None:
    """Return why the (case, dtype) has no ONNX backend test, or None."""
    if case.layout != "channels_first":
        return (
            f"ONNX {OPERATOR} takes channels-first (N, C, ...) input only; case "
            f"{case.name} hands x over in {case.layout} layout"
        )
    if dtype not in accepted_dtypes():
        return f"ONNX {OPERATOR} at opset {OPSET} does not accept {dtype}"
    return None


def build_model(case: Case, dtype: str) -> onnx.ModelProto:
    """Build and check the case's one-node InstanceNormalization model."""
    element, _ = TENSOR_TYPES[dtype]
    shape = list(case.shape)
    node = helper.make_node(OPERATOR, ["x", "scale", "B"], ["y"], epsilon=case.eps)
    graph = helper.make_graph(
        [node],
        GRAPH_NAME,
        [
            helper.make_tensor_value_info("x", element, shape),
            helper.make_tensor_value_info("scale", element, [case.channels]),
            helper.make_tensor_value_info("B", element, [case.channels]),
        ],
        [helper.make_tensor_value_info("y", element, shape)],
    )
    opset = helper.make_opsetid("", OPSET)
    model = helper.make_model(
        graph,
        opset_imports=[opset],
        ir_version=helper.find_min_ir_version_for([opset]),
        producer_name=PRODUCER_NAME,
        producer_version=PRODUCER_VERSION,
    )
    onnx.checker.check_model(model, full_check=True)
    return model


def model_epsilon(model: onnx.ModelProto) -> float:
    """Return the epsilon the model's node stores (the case's eps in float32)."""
    (attribute,) = model.graph.node[0].attribute
    return float(helper.get_attribute_value(attribute))


def tensor_bytes(name: str, values: np.ndarray, dtype: str) -> bytes:
    """Return the serialized TensorProto of `values` stored as `dtype`. Every value
    must be exactly representable in `dtype`."""
    numpy_type = helper.tensor_dtype_to_np_dtype(TENSOR_TYPES[dtype][0])
    proto = numpy_helper.from_array(np.asarray(values).astype(numpy_type), name)
    return proto.SerializeToString(deterministic=True)


def backend_test(
    case: Case, dtype: str, seed: int
) -> tuple[str, list[tuple[str, bytes, dict | None]], dict]:
    """Return the folder of the case's backend test (relative to the export's
    output), its files as (path in the folder, bytes, tensor fields or None for
    the model), and the model's manifest fields."""
    model = build_model(case, dtype)
    epsilon = model_epsilon(model)
    inputs = cases.materialize(case, dtype, seed)
    expected, scale = catalogue_reference(case, dtype, seed, epsilon)
    container = dtypes.CONTAINER[dtype]
    gamma = inputs.gamma if case.affine else np.ones(case.channels, container)
    beta = inputs.beta if case.affine else np.zeros(case.channels, container)

    tensors = [
        (f"{TEST_DATA}/input_0.pb", "x", inputs.x, dtype),
        (f"{TEST_DATA}/input_1.pb", "scale", gamma, dtype),
        (f"{TEST_DATA}/input_2.pb", "B", beta, dtype),
        (
            f"{TEST_DATA}/output_0.pb",
            "y",
            dtypes.round_to(expected.output, dtype),
            dtype,
        ),
        ("reference_output.pb", "y_reference", expected.output, "float64"),
        ("output_scale.pb", "y_scale", scale["output"], "float64"),
    ]
    written: list[tuple[str, bytes, dict | None]] = [
        ("model.onnx", model.SerializeToString(deterministic=True), None)
    ]
    for relative, name, values, stored in tensors:
        fields = array_fields(name, values, stored)
        written.append((relative, tensor_bytes(name, values, stored), fields))
    model_fields = {
        "opset": OPSET,
        "ir_version": model.ir_version,
        "model_epsilon": epsilon,
    }
    return f"onnx/test_{case.name}_{dtype}", written, model_fields


def manifest_fields() -> dict:
    """Return the manifest's top-level fields about the ONNX files."""
    return {"onnx_version": onnx.__version__}
