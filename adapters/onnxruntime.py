"""ONNX Runtime adapter: the normalization family as small ONNX models run by
InferenceSession.

Each implementation is an ONNX graph built with onnx.helper and checked with
onnx.checker. InstanceNorm runs as the InstanceNormalization operator at opset 6, at
the newest opset the installed onnx defines and, when onnxruntime cannot load that
one, at the newest opset it can; as GroupNormalization with num_groups = C; and as
BatchNormalization in training mode on the (1, N*C, ...) reshape. GroupNorm,
LayerNorm and BatchNorm run as one GroupNormalization, LayerNormalization or
BatchNormalization node. ONNX operators take channels-first input only, so every
implementation declares that layout alone.

Devices are execution providers, listed in the environment variable
NORMCONF_ORT_PROVIDERS (comma-separated provider names) or, without it, taken from
onnxruntime.get_available_providers(). The plain onnxruntime package has no
gradient graph builder, so `OnnxRuntimeAdapter` returns outputs only.
`OnnxRuntimeTrainingAdapter` runs with the onnxruntime-training package instead and
returns gradients where that package's gradient builder supports the operator.

The batch_norm implementation also takes running statistics and follows the "onnx"
convention, in which momentum weights the old value and the variance is biased.
They become the BatchNormalization inputs input_mean and input_var. A training step
also returns the node's running_mean and running_var outputs, and inference sets
training_mode = 0.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import re
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace

import numpy as np
import onnx
import onnxruntime
from onnx import TensorProto, helper, numpy_helper
from onnxruntime.capi import onnxruntime_pybind11_state as ort_state

from adapters.contract import (
    BACKWARD_SCHEMES,
    CONTRACT_VERSION,
    DEFAULT_MODE,
    Adapter,
    Device,
    Implementation,
    Rejected,
    Request,
    Result,
)

PROVIDERS_VARIABLE = "NORMCONF_ORT_PROVIDERS"
CPU_PROVIDER = "CPUExecutionProvider"
CUDA_PROVIDER = "CUDAExecutionProvider"
PROVIDER_SUFFIX = "ExecutionProvider"

# The Azure provider sends requests to remote endpoints and runs no ONNX operator
# itself, so a session on it computes on the CPU provider. It is left out of the
# default list; naming it in NORMCONF_ORT_PROVIDERS still declares its device.
REMOTE_PROVIDERS = ("AzureExecutionProvider",)

ONNX_TYPES = {
    "float32": TensorProto.FLOAT,
    "float64": TensorProto.DOUBLE,
    "float16": TensorProto.FLOAT16,
    "bfloat16": TensorProto.BFLOAT16,
}

# The spelling of each dtype in ONNX operator schemas' type constraints.
SCHEMA_TYPE_NAMES = {
    "float32": "tensor(float)",
    "float64": "tensor(double)",
    "float16": "tensor(float16)",
    "bfloat16": "tensor(bfloat16)",
}

# onnxruntime's Python API converts no NumPy array to or from bfloat16, so a
# bfloat16 graph takes and returns float32 and casts at its boundary. Both casts are
# exact, because the requests' float32 arrays contain bfloat16 values and float32
# represents every bfloat16 value.
BOUNDARY_TYPES = {**ONNX_TYPES, "bfloat16": TensorProto.FLOAT}

# The exceptions onnxruntime raises from C++ (none derives from RuntimeError).
# EPFail is missing from older releases.
ORT_ERRORS: tuple[type[Exception], ...] = tuple(
    getattr(ort_state, name)
    for name in (
        "Fail",
        "InvalidArgument",
        "NoSuchFile",
        "NoModel",
        "EngineError",
        "RuntimeException",
        "InvalidProtobuf",
        "ModelLoaded",
        "NotImplemented",
        "InvalidGraph",
        "EPFail",
    )
    if hasattr(ort_state, name)
)

# Operators that only compute shapes or move data. On a non-CPU device every other
# node of a graph must run on that device's provider.
DATA_MOVEMENT_OPS = frozenset(
    {
        "Shape",
        "Slice",
        "Concat",
        "Reshape",
        "Tile",
        "ConstantOfShape",
        "Constant",
        "Identity",
        "Cast",
        "Div",  # GroupNormalization's expansion divides C by num_groups in int64
        "Mul",  # the batch-norm reshape multiplies N by C in int64
        "Unsqueeze",
        "Squeeze",
    }
)

# Quiet session logging: every opset-6 session otherwise prints onnxruntime's
# warning that it guarantees opsets 7 and newer only.
SESSION_LOG_SEVERITY = 3  # 0 verbose, 1 info, 2 warning, 3 error, 4 fatal
PROBE_LOG_SEVERITY = 4
LOG_WARNING = 2
LOGGED_MESSAGE_LIMIT = 240
# The length of the start of a logged message that, found in an exception's
# text, marks the message as a repeat of the exception.
LOGGED_PREFIX = 60
DEFAULT_LOG_SEVERITY = 2  # onnxruntime's own default for its default logger
ASSIGNMENT_CONFIG_KEY = "session.record_ep_graph_assignment_info"

INSTANCE_NORM = "InstanceNormalization"
GROUP_NORM = "GroupNormalization"
LAYER_NORM = "LayerNormalization"
BATCH_NORM = "BatchNormalization"

# The first opset whose BatchNormalization has the training_mode attribute, and the
# first whose GroupNormalization takes scale and bias per channel rather than per
# group.
BATCH_NORM_TRAINING_OPSET = 14
GROUP_NORM_PER_CHANNEL_VERSION = 21

# The opsets that the group_norm, layer_norm and batch_norm implementations import:
# the ones that introduced the operator versions they use (GroupNormalization-21,
# LayerNormalization-17, BatchNormalization-15). LayerNormalization needs opset 17
# for onnxruntime-training 1.19.2: its CPU provider has no float64 or float16
# LayerNormalizationGrad kernel, and the function body it inlines instead calls
# ReduceMean with the `axes` attribute, which opsets 18 and newer reject ("Unrecognized
# attribute: axes for operator ReduceMean").
GROUP_NORM_OPSET = 21
LAYER_NORM_OPSET = 17
BATCH_NORM_OPSET = 15

# The graph inputs that carry a request's running statistics (BatchNormalization's
# own input names).
RUNNING_INPUTS = ("input_mean", "input_var")

# The reason each InstanceNorm implementation keeps no running statistics, keyed by
# the ONNX operator it runs (from the operator schemas of onnx 1.23.2).
INSTANCE_NORM_RUNNING_REASONS = {
    INSTANCE_NORM: (
        f"ONNX {INSTANCE_NORM} (versions 1, 6 and 22) has no running mean or "
        "variance among its inputs and outputs"
    ),
    GROUP_NORM: (
        f"ONNX {GROUP_NORM} (versions 18 and 21) has no running mean or variance "
        "among its inputs and outputs"
    ),
    BATCH_NORM: (
        f"{BATCH_NORM} on the (1, N*C, ...) reshape would keep running statistics "
        "per (n, c) slice, not per channel as InstanceNorm's running statistics are"
    ),
}

# The signature every support probe builds: rank 2 input, three channels, eps 1e-5.
# onnxruntime registers kernels per operator version, dtype and provider, not per
# shape or attribute value, so one signature shows which dtypes run.
PROBE_RANK = 2
PROBE_CHANNELS = 3
PROBE_EPS = 1e-5
PROBE_GROUPS = 1
PROBE_NORMALIZED_NDIM = 1
# The x of the accumulate probe (OnnxRuntimeTrainingAdapter), whose graph has fixed
# dimensions: a (2, 3, 4, 4) input.
PROBE_BATCH = 2
PROBE_SIZE = 4


class DeviceFallbackError(Exception):
    """A session did not run on the requested execution provider."""


class GradientBuilderError(Exception):
    """onnxruntime-training's gradient builder refused the model."""


class TrainingApiError(Exception):
    """onnxruntime-training's training API (artifacts, CheckpointState, Module)
    refused the model or failed to run it."""


@dataclass(frozen=True)
class Spec:
    """One implementation: the ONNX operator, the opset the model imports, and the
    declaration that the contract publishes."""

    operator: str
    opset: int
    implementation: Implementation


@dataclass(frozen=True)
class Signature:
    """Everything an ONNX graph depends on. `channels` is set only for graphs that
    fix C (InstanceNorm through GroupNormalization with num_groups = C); every other
    dimension is symbolic. `groups` is GroupNormalization's num_groups, and
    `normalized_ndim` the number of trailing axes that LayerNormalization normalizes
    over. `mode` is set only for a batch_norm graph whose running statistics are
    graph inputs ("training" or "inference"), and `momentum` only when such a graph
    is in training mode; both are None for the graph without running statistics."""

    implementation: str
    dtype: str
    rank: int
    eps: float
    channels: int | None
    gradients: bool
    groups: int | None = None
    normalized_ndim: int | None = None
    mode: str | None = None
    momentum: float | None = None


# ---------------------------------------------------------------------------------
# Graph construction


def _dimension_names(rank: int) -> list[str]:
    return ["N", "C"] + [f"D{axis}" for axis in range(1, rank + 1)]


def _instance_norm_nodes(signature: Signature) -> list[onnx.NodeProto]:
    return [
        helper.make_node(
            INSTANCE_NORM,
            ["x", "scale", "B"],
            ["y"],
            name="normalize",
            epsilon=signature.eps,
        )
    ]


def _group_norm_nodes(signature: Signature) -> list[onnx.NodeProto]:
    # stash_type is the precision of the statistics: float32 by default, which
    # would round float64 input to float32, so float64 input requests float64.
    stash = TensorProto.DOUBLE if signature.dtype == "float64" else TensorProto.FLOAT
    return [
        helper.make_node(
            GROUP_NORM,
            ["x", "scale", "B"],
            ["y"],
            name="normalize",
            epsilon=signature.eps,
            num_groups=signature.groups,
            stash_type=stash,
        )
    ]


def _layer_norm_nodes(signature: Signature) -> list[onnx.NodeProto]:
    # stash_type stays at its default, float32: the standard allows only float32 and
    # bfloat16 for the Mean and InvStdDev outputs that the gradient builder needs.
    # onnxruntime 1.31.1's and 1.19.2's CPU kernels compute float64 input in float64
    # all the same (measured: stash_type 1 and 11 give the same float64 outputs).
    outputs = ["y"]
    if signature.gradients:
        # onnxruntime-training 1.19.2's LayerNormalization gradient reads the saved
        # statistics and fails ("i < node_->OutputDefs().size() was false") on a
        # node that does not declare them.
        outputs += ["saved_mean", "saved_inv_std_dev"]
    return [
        helper.make_node(
            LAYER_NORM,
            ["x", "scale", "B"],
            outputs,
            name="normalize",
            axis=-signature.normalized_ndim,
            epsilon=signature.eps,
        )
    ]


def _int64(name: str, values: list[int]) -> onnx.NodeProto:
    tensor = helper.make_tensor(name, TensorProto.INT64, [len(values)], values)
    return helper.make_node("Constant", [], [name], value=tensor)


def _batch_norm_training_nodes(
    signature: Signature, x: str, scale: str, bias: str, y: str
) -> list[onnx.NodeProto]:
    """Run BatchNormalization in training mode on `x`, with running statistics of
    zeros and ones shaped like `scale`, and write the normalized output to `y`."""
    element_type = ONNX_TYPES[signature.dtype]
    # ConstantOfShape allows bfloat16 only from opset 20 on, so bfloat16 statistics
    # are made in float32 and cast.
    cast = signature.dtype == "bfloat16"
    stats_type = TensorProto.FLOAT if cast else element_type
    zero = helper.make_tensor("zero", stats_type, [1], [0.0])
    one = helper.make_tensor("one", stats_type, [1], [1.0])
    stats = ["mean_stats", "var_stats"] if cast else ["mean_in", "var_in"]

    nodes = [
        helper.make_node("Shape", [scale], ["stats_shape"]),
        helper.make_node("ConstantOfShape", ["stats_shape"], [stats[0]], value=zero),
        helper.make_node("ConstantOfShape", ["stats_shape"], [stats[1]], value=one),
    ]
    if cast:
        nodes += [
            helper.make_node("Cast", ["mean_stats"], ["mean_in"], to=element_type),
            helper.make_node("Cast", ["var_stats"], ["var_in"], to=element_type),
        ]
    return [
        *nodes,
        # In training mode the output uses the batch statistics; the running mean
        # and variance inputs only feed the unused running outputs.
        helper.make_node(
            BATCH_NORM,
            [x, scale, bias, "mean_in", "var_in"],
            [y, "running_mean", "running_var"],
            name="normalize",
            epsilon=signature.eps,
            momentum=0.9,
            training_mode=1,
        ),
    ]


def _batch_norm_nodes(signature: Signature) -> list[onnx.NodeProto]:
    if signature.mode is None:
        return _batch_norm_training_nodes(signature, "x", "scale", "B", "y")
    return _batch_norm_running_nodes(signature)


def _batch_norm_running_nodes(signature: Signature) -> list[onnx.NodeProto]:
    """Run BatchNormalization on the graph inputs input_mean and input_var. In
    training mode the node normalizes with the batch's statistics and writes the
    updated running_mean and running_var outputs. In inference mode it normalizes
    with the inputs and has the output y alone, because BatchNormalization-15
    allows the running outputs only in training mode."""
    # NOTE: ONNX stores momentum as float32, like epsilon. The suite's 0.25 is
    # exact, but another momentum would reach the kernel rounded, and the
    # contract has no Result field that declares a rounded momentum.
    inputs = ["x", "scale", "B", *RUNNING_INPUTS]
    if signature.mode == "inference":
        return [
            helper.make_node(
                BATCH_NORM,
                inputs,
                ["y"],
                name="normalize",
                epsilon=signature.eps,
                training_mode=0,
            )
        ]
    return [
        helper.make_node(
            BATCH_NORM,
            inputs,
            ["y", "running_mean", "running_var"],
            name="normalize",
            epsilon=signature.eps,
            momentum=signature.momentum,
            training_mode=1,
        )
    ]


def _batch_norm_reshape_nodes(signature: Signature) -> list[onnx.NodeProto]:
    """Fold x to (1, N*C, *spatial), repeat scale and B N times, run
    BatchNormalization in training mode and unfold the output."""
    return [
        helper.make_node("Shape", ["x"], ["x_shape"]),
        helper.make_node("Shape", ["x"], ["batch"], start=0, end=1),
        helper.make_node("Shape", ["x"], ["channels"], start=1, end=2),
        helper.make_node("Shape", ["x"], ["spatial"], start=2),
        # N*C is computed, not left to Reshape's -1, which cannot infer a dimension
        # of an empty tensor (N = 0).
        helper.make_node("Mul", ["batch", "channels"], ["folded_channels"]),
        _int64("one_batch", [1]),
        helper.make_node(
            "Concat",
            ["one_batch", "folded_channels", "spatial"],
            ["folded_shape"],
            axis=0,
        ),
        # allowzero = 1: a 0 in the shape is a zero dimension, not "copy the input's"
        helper.make_node("Reshape", ["x", "folded_shape"], ["folded"], allowzero=1),
        helper.make_node("Tile", ["scale", "batch"], ["scale_repeated"]),
        helper.make_node("Tile", ["B", "batch"], ["B_repeated"]),
        *_batch_norm_training_nodes(
            signature, "folded", "scale_repeated", "B_repeated", "folded_y"
        ),
        helper.make_node("Reshape", ["folded_y", "x_shape"], ["y"], allowzero=1),
    ]


# The graph builders, keyed by (normconf operator, ONNX operator).
NODE_BUILDERS = {
    ("instance_norm", INSTANCE_NORM): _instance_norm_nodes,
    ("instance_norm", GROUP_NORM): _group_norm_nodes,
    ("instance_norm", BATCH_NORM): _batch_norm_reshape_nodes,
    ("group_norm", GROUP_NORM): _group_norm_nodes,
    ("layer_norm", LAYER_NORM): _layer_norm_nodes,
    ("batch_norm", BATCH_NORM): _batch_norm_nodes,
}


def _boundary_casts(signature: Signature) -> tuple[list, list]:
    """Return the nodes that convert bfloat16 graphs' float32 inputs and outputs,
    and nothing for other dtypes."""
    if signature.dtype != "bfloat16":
        return [], []
    to = ONNX_TYPES["bfloat16"]
    names = ["x", "scale", "B"] + (["dy"] if signature.gradients else [])
    names += _running_inputs(signature)
    before = [helper.make_node("Cast", [f"{n}_in"], [n], to=to) for n in names]
    after = [
        helper.make_node("Cast", [n], [f"{n}_out"], to=TensorProto.FLOAT)
        for n in ["y", *_running_outputs(signature)]
    ]
    return before, after


def _running_inputs(signature: Signature) -> list[str]:
    """Return the names of the running statistics the graph takes as inputs."""
    return [] if signature.mode is None else list(RUNNING_INPUTS)


def _running_outputs(signature: Signature) -> list[str]:
    """Return the names of the updated running statistics the graph outputs."""
    return ["running_mean", "running_var"] if signature.mode == "training" else []


def _loss_nodes() -> list[onnx.NodeProto]:
    """sum(y * dy), whose gradient with respect to y is dy, cast to float32.

    onnxruntime-training 1.19.2's gradient builder seeds the loss gradient as a
    float32 tensor and refuses a loss of another type ("Type (tensor(double)) of
    output arg (y_dy_grad) ... does not match expected type (tensor(float))"); the
    cast's gradient carries that seed back to the model's dtype exactly (it is 1).
    """
    return [
        helper.make_node("Mul", ["y", "dy"], ["y_dy"]),
        helper.make_node("ReduceSum", ["y_dy"], ["loss_t"], keepdims=0),
        helper.make_node("Cast", ["loss_t"], ["loss"], to=TensorProto.FLOAT),
    ]


def build_model(spec: Spec, signature: Signature, ir_version: int) -> onnx.ModelProto:
    """Build and check the ONNX model of one implementation and signature.

    Inputs x, scale and B (and dy with gradients); outputs y (and the scalar loss
    sum(y * dy) first, with gradients). scale and B have the shape of the last
    `normalized_ndim` axes of x for LayerNormalization and (C,) otherwise. A
    signature with a `mode` adds the inputs input_mean and input_var of shape (C,),
    and in training mode the outputs running_mean and running_var after y. A
    bfloat16 model's inputs and outputs are float32 and carry the names with `_in`
    and `_out` appended.
    """
    dims = _dimension_names(signature.rank)
    if signature.channels is not None:
        dims[1] = signature.channels
    if signature.normalized_ndim is None:
        parameter_dims = [dims[1]]
    else:
        parameter_dims = dims[-signature.normalized_ndim :]
    boundary = BOUNDARY_TYPES[signature.dtype]
    cast_before, cast_after = _boundary_casts(signature)
    suffix_in = "_in" if cast_before else ""
    suffix_out = "_out" if cast_after else ""

    inputs = [
        helper.make_tensor_value_info(f"x{suffix_in}", boundary, dims),
        helper.make_tensor_value_info(f"scale{suffix_in}", boundary, parameter_dims),
        helper.make_tensor_value_info(f"B{suffix_in}", boundary, parameter_dims),
    ]
    inputs += [
        helper.make_tensor_value_info(f"{name}{suffix_in}", boundary, parameter_dims)
        for name in _running_inputs(signature)
    ]
    builder = NODE_BUILDERS[(spec.implementation.operator, spec.operator)]
    nodes = cast_before + builder(signature) + cast_after
    outputs = [helper.make_tensor_value_info(f"y{suffix_out}", boundary, dims)]
    outputs += [
        helper.make_tensor_value_info(f"{name}{suffix_out}", boundary, parameter_dims)
        for name in _running_outputs(signature)
    ]
    if signature.gradients:
        inputs.append(helper.make_tensor_value_info(f"dy{suffix_in}", boundary, dims))
        nodes += _loss_nodes()
        outputs.insert(0, helper.make_tensor_value_info("loss", TensorProto.FLOAT, []))

    graph = helper.make_graph(nodes, f"normconf_{spec.operator}", inputs, outputs)
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", spec.opset)],
        ir_version=ir_version,
        producer_name="normconf",
    )
    onnx.checker.check_model(model, full_check=True)
    return model


def _identity_model(opset: int, ir_version: int) -> onnx.ModelProto:
    value = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N"])
    result = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N"])
    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])], "probe", [value], [result]
    )
    return helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=ir_version
    )


def _minimum_ir_version(opset: int) -> int:
    return helper.find_min_ir_version_for([helper.make_opsetid("", opset)])


# ---------------------------------------------------------------------------------
# Sessions


# The execution modes of every implementation: sessions with graph optimizations
# below onnxruntime's default level, ORT_ENABLE_ALL, which the default mode keeps.
# Each level's transformations (constant folding, node fusions, layout changes)
# may compute a model differently.
OPTIMIZATION_MODES = {
    "optimize-none": onnxruntime.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "optimize-basic": onnxruntime.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "optimize-extended": onnxruntime.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
}


def _session_options(
    provider: str, severity: int, mode: str = DEFAULT_MODE
) -> onnxruntime.SessionOptions:
    options = onnxruntime.SessionOptions()
    options.log_severity_level = severity
    # The arena keeps a session's peak memory after each run, and the adapter keeps
    # a session per signature and execution mode: with the arena, the sessions of
    # the four modes of GroupNormalization held more than 12 GiB after the 2^26
    # element case (onnxruntime 1.31.1).
    options.enable_cpu_mem_arena = False
    if mode != DEFAULT_MODE:
        options.graph_optimization_level = OPTIMIZATION_MODES[mode]
    if provider != CPU_PROVIDER:
        options.add_session_config_entry(ASSIGNMENT_CONFIG_KEY, "1")
    return options


def _check_placement(session: onnxruntime.InferenceSession, provider: str) -> None:
    """Raise DeviceFallbackError unless the session computes on `provider`.

    onnxruntime runs a node that no requested provider supports on the CPU provider,
    so without this check a CUDA item could silently report CPU results.
    """
    active = session.get_providers()
    if not active or active[0] != provider:
        raise DeviceFallbackError(
            f"onnxruntime created the session with providers {active}, "
            f"not with {provider} first"
        )
    if provider == CPU_PROVIDER:
        return
    # NOTE: onnxruntime releases without get_provider_graph_assignment_info (such
    # as onnxruntime-training 1.19.2) get only the check above, which does not see
    # single nodes placed on the CPU provider.
    assignments = getattr(session, "get_provider_graph_assignment_info", None)
    if assignments is None:
        return
    elsewhere = [
        f"{node.op_type} on {subgraph.ep_name}"
        for subgraph in assignments()
        if subgraph.ep_name != provider
        for node in subgraph.get_nodes()
        if node.op_type not in DATA_MOVEMENT_OPS
    ]
    if elsewhere:
        raise DeviceFallbackError(
            f"nodes that compute did not run on {provider}: {', '.join(elsewhere)}"
        )


def create_session(
    model: onnx.ModelProto | bytes,
    provider: str,
    severity: int = SESSION_LOG_SEVERITY,
    mode: str = DEFAULT_MODE,
) -> onnxruntime.InferenceSession:
    """Create a session on `provider` alone, with the graph optimizations of the
    execution `mode`, and check that it computes there.

    Raises onnxruntime's own errors (ORT_ERRORS) when it refuses the model, and
    DeviceFallbackError when the work would run on another provider.
    """
    data = model if isinstance(model, bytes) else model.SerializeToString()
    # enable_fallback=0 stops the Python wrapper from retrying on the CPU provider
    # when the requested one fails (releases that predate the keyword ignore it).
    session = onnxruntime.InferenceSession(
        data,
        _session_options(provider, severity, mode),
        providers=[provider],
        enable_fallback=0,
    )
    session.disable_fallback()
    _check_placement(session, provider)
    return session


def _loads(model: onnx.ModelProto) -> bool:
    try:
        create_session(model, CPU_PROVIDER, PROBE_LOG_SEVERITY)
    except ORT_ERRORS:
        return False
    return True


def newest_loadable_ir_version() -> int:
    """Return the newest ONNX IR version that this onnxruntime loads, by trial."""
    for ir_version in range(onnx.IR_VERSION, 3, -1):
        if _loads(_identity_model(7, ir_version)):
            return ir_version
    return 3


def model_ir_version(opset: int, newest_ir: int) -> int:
    """Return the IR version to stamp on a model of `opset`: the one the onnx
    release that introduced the opset used, capped at what onnxruntime loads."""
    return min(_minimum_ir_version(opset), newest_ir)


def newest_loadable_opset(newest_ir: int) -> int:
    """Return the newest default-domain opset that this onnxruntime loads, by trial."""
    for opset in range(onnx.defs.onnx_opset_version(), 6, -1):
        if _loads(_identity_model(opset, model_ir_version(opset, newest_ir))):
            return opset
    return 7


def _provider_error_text(error: BaseException) -> str:
    return f"{type(error).__name__}: {error}".strip()


# ---------------------------------------------------------------------------------
# Providers and devices


def device_name(provider: str) -> str:
    """Return the normconf device name of an execution provider: 'cpu' for
    CPUExecutionProvider, 'cuda' for CUDAExecutionProvider, and the lowercased name
    without 'ExecutionProvider' for the others ('tensorrt', 'openvino', 'dml')."""
    return provider.removesuffix(PROVIDER_SUFFIX).lower()


def requested_providers() -> list[str]:
    """Return the providers to test: NORMCONF_ORT_PROVIDERS, or the available ones
    without the remote-only providers, always with CPUExecutionProvider first."""
    value = os.environ.get(PROVIDERS_VARIABLE, "")
    if value.strip():
        providers = [part.strip() for part in value.split(",") if part.strip()]
        known = onnxruntime.get_all_providers()
        unknown = [provider for provider in providers if provider not in known]
        if unknown:
            # A misspelt name would otherwise become one more unavailable device,
            # and a run could pass without testing the provider it was meant for.
            raise ValueError(
                f"{PROVIDERS_VARIABLE} (which --ort-providers sets) names "
                f"{', '.join(unknown)}, which onnxruntime "
                f"{onnxruntime.__version__} does not know; execution provider names: "
                f"{', '.join(known)}"
            )
    else:
        providers = [
            provider
            for provider in onnxruntime.get_available_providers()
            if provider not in REMOTE_PROVIDERS
        ]
    ordered = [CPU_PROVIDER]
    for provider in providers:
        if provider not in ordered:
            ordered.append(provider)
    return ordered


def _package_description() -> str:
    available = ", ".join(onnxruntime.get_available_providers())
    return f"onnxruntime {onnxruntime.__version__} (providers: {available})"


def _probe_provider(provider: str) -> str | None:
    """Return why `provider` cannot run a session here, or None when it can."""
    if provider not in onnxruntime.get_all_providers():
        return (
            f"{provider} from {PROVIDERS_VARIABLE} is not an onnxruntime execution "
            f"provider name; known names: {', '.join(onnxruntime.get_all_providers())}"
        )
    if provider not in onnxruntime.get_available_providers():
        return f"{_package_description()} was not built with {provider}"
    model = _identity_model(7, _minimum_ir_version(7))
    # A provider whose libraries fail to load reports why only in onnxruntime's
    # default log on the process's stderr, so the probe captures that stream and
    # uses it as the device's reason.
    log: list[str] = []
    with _captured_stderr(log):
        onnxruntime.set_default_logger_severity(LOG_WARNING)
        try:
            create_session(model, provider, PROBE_LOG_SEVERITY)
            problem = None
        except (*ORT_ERRORS, DeviceFallbackError, ValueError, RuntimeError) as error:
            problem = _provider_error_text(error)
        finally:
            onnxruntime.set_default_logger_severity(DEFAULT_LOG_SEVERITY)
    if problem is None:
        return None
    causes = _logged_errors(log[0])
    return (
        f"{_package_description()} failed to create a session on {provider}: "
        f"{problem}" + (f"; onnxruntime logged: {causes}" if causes else "")
    )


@contextlib.contextmanager
def _captured_stderr(log: list[str]) -> Iterator[None]:
    """Send what the process writes to file descriptor 2 (onnxruntime's C++ log
    included) to a temporary file while the block runs, and append its text to
    `log` afterwards, also when the block raises."""
    with tempfile.TemporaryFile(mode="w+b") as captured:
        saved = os.dup(2)
        os.dup2(captured.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            captured.seek(0)
            log.append(captured.read().decode(errors="replace"))


def _logged_errors(text: str) -> str:
    """Return the messages of the error lines of onnxruntime's log text, joined."""
    return " | ".join(_logged_messages(text))


def _logged_messages(text: str) -> list[str]:
    """Return the messages of the error and warning lines of onnxruntime's log
    text, each once, cut to LOGGED_MESSAGE_LIMIT characters."""
    messages = []
    for line in text.splitlines():
        line = re.sub(r"\x1b\[[0-9;]*m", "", line).strip()
        if "[E:onnxruntime" in line or "[W:onnxruntime" in line:
            message = line.split("] ", 1)[-1]
            if len(message) > LOGGED_MESSAGE_LIMIT:
                message = message[: LOGGED_MESSAGE_LIMIT - 3] + "..."
            if message not in messages:
                messages.append(message)
    return messages


def discover_devices(providers: list[str]) -> dict[str, tuple[Device, str]]:
    """Map device names to (Device, provider), declaring a 'cuda' device even when
    CUDAExecutionProvider is absent or fails, with the reason."""
    devices: dict[str, tuple[Device, str]] = {"cpu": (Device("cpu"), CPU_PROVIDER)}
    if CUDA_PROVIDER not in providers:
        providers = [*providers, CUDA_PROVIDER]
    for provider in providers:
        if provider == CPU_PROVIDER:
            continue
        name = device_name(provider)
        reason = _probe_provider(provider)
        if reason is None:
            devices[name] = (Device(name), provider)
        else:
            devices[name] = (Device(name, available=False, reason=reason), provider)
    return devices


# ---------------------------------------------------------------------------------
# Implementations


def _group_norm_per_channel(opset: int) -> bool:
    try:
        schema = onnx.defs.get_schema(GROUP_NORM, opset, "")
    except onnx.defs.SchemaError:
        return False
    return schema.since_version >= GROUP_NORM_PER_CHANNEL_VERSION


def build_specs(
    newest_opset: int, gradient_reason: Callable[[str], str]
) -> dict[str, Spec]:
    """Return the implementations, keyed by name, all without gradients.

    `gradient_reason` maps an ONNX operator to the reason there are no gradients.

    InstanceNormalization runs at opset 6 and at the newest opset onnx defines. When
    onnxruntime cannot load that opset, that implementation is declared anyway (its
    items are unsupported, with onnxruntime's error) and another runs at
    `newest_opset`, the newest that onnxruntime loads. InstanceNorm's
    GroupNormalization and BatchNormalization run at `newest_opset`. The group_norm,
    layer_norm and batch_norm implementations run at GROUP_NORM_OPSET,
    LAYER_NORM_OPSET and BATCH_NORM_OPSET, and are left out when onnxruntime cannot
    load that opset.
    """
    newest_defined = onnx.defs.onnx_opset_version()
    opsets = sorted({6, newest_defined, newest_opset})

    def implementation(name: str, description: str, operator: str) -> Implementation:
        return Implementation(
            name,
            description,
            gradients=False,
            gradient_reason=gradient_reason(operator),
            running_stats_reason=INSTANCE_NORM_RUNNING_REASONS[operator],
            execution_modes=tuple(OPTIMIZATION_MODES),
        )

    specs = {}
    for opset in opsets:
        name = f"instance-norm-opset{opset}"
        description = f"ONNX {INSTANCE_NORM} in a model importing opset {opset}"
        specs[name] = Spec(
            INSTANCE_NORM, opset, implementation(name, description, INSTANCE_NORM)
        )
    if _group_norm_per_channel(newest_opset):
        description = (
            f"ONNX {GROUP_NORM} (opset {newest_opset}) with num_groups = C, "
            "statistics in float64 for float64 input and in float32 otherwise"
        )
        specs["group-norm"] = Spec(
            GROUP_NORM,
            newest_opset,
            implementation("group-norm", description, GROUP_NORM),
        )
    if newest_opset >= BATCH_NORM_TRAINING_OPSET:
        description = (
            f"ONNX {BATCH_NORM} (opset {newest_opset}), training_mode = 1, on the "
            "(1, N*C, ...) reshape with scale and B repeated N times"
        )
        specs["batch-norm-reshape"] = Spec(
            BATCH_NORM,
            newest_opset,
            implementation("batch-norm-reshape", description, BATCH_NORM),
        )
    specs.update(_family_specs(newest_opset, gradient_reason))
    return specs


def _family_specs(
    newest_opset: int, gradient_reason: Callable[[str], str]
) -> dict[str, Spec]:
    """Return the group_norm, layer_norm and batch_norm implementations whose opset
    onnxruntime loads."""
    affine_off = "ones and zeros when affine is off"
    declared = (
        (
            "group_norm",
            GROUP_NORM,
            GROUP_NORM_OPSET,
            f"ONNX {GROUP_NORM}-21 in a model importing opset {GROUP_NORM_OPSET}: "
            "num_groups = groups, epsilon = eps, stash_type float64 for float64 "
            f"input and float32 otherwise, scale and bias of shape (C,) ({affine_off})",
        ),
        (
            "layer_norm",
            LAYER_NORM,
            LAYER_NORM_OPSET,
            f"ONNX {LAYER_NORM}-17 in a model importing opset {LAYER_NORM_OPSET}: "
            "axis = -normalized_ndim, epsilon = eps, stash_type left at float32, "
            "Scale and B of the shape of the normalized axes "
            f"({affine_off}), Mean and InvStdDev outputs declared only when "
            "gradients are built",
        ),
        (
            "batch_norm",
            BATCH_NORM,
            BATCH_NORM_OPSET,
            f"ONNX {BATCH_NORM}-15 in a model importing opset {BATCH_NORM_OPSET}: "
            f"epsilon = eps, scale and B of shape (C,) ({affine_off}). Without "
            "running statistics: training_mode = 1, momentum = 0.9, input_mean "
            "zeros and input_var ones, only the output Y read. With them: "
            "input_mean and input_var are the request's; training mode sets "
            "training_mode = 1 and momentum = the request's and reads Y, "
            "running_mean and running_var; inference mode sets training_mode = 0",
        ),
    )
    specs = {}
    for operator, onnx_operator, opset, description in declared:
        if opset > newest_opset:
            continue
        name = f"{operator}.onnx"
        declaration = Implementation(
            name,
            description,
            gradients=False,
            gradient_reason=gradient_reason(onnx_operator),
            operator=operator,
            running_stats="onnx" if operator == "batch_norm" else "",
            execution_modes=tuple(OPTIMIZATION_MODES),
        )
        specs[name] = Spec(onnx_operator, opset, declaration)
    return specs


def schema_reason(spec: Spec, dtype: str) -> str | None:
    """Return why the ONNX standard excludes `dtype` for the operator at the spec's
    opset (a type constraint without it), or None when it allows it."""
    schema = onnx.defs.get_schema(spec.operator, spec.opset, "")
    type_name = SCHEMA_TYPE_NAMES[dtype]
    data_input = schema.inputs[0]
    for constraint in schema.type_constraints:
        if constraint.type_param_str != data_input.type_str:
            continue
        allowed = list(constraint.allowed_type_strs)
        if type_name in allowed:
            return None
        return (
            f"ONNX {spec.operator} version {schema.since_version} (opset "
            f"{spec.opset}) does not allow {type_name}: its type constraint "
            f"{constraint.type_param_str} allows {', '.join(allowed)}"
        )
    return None


def _container(dtype: str):
    return np.float32 if dtype == "bfloat16" else np.dtype(dtype).type


# ---------------------------------------------------------------------------------
# The adapter


class OnnxRuntimeAdapter(Adapter):
    contract_version = CONTRACT_VERSION
    framework = "onnxruntime"

    def __init__(self) -> None:
        if type(self) is OnnxRuntimeAdapter and hasattr(
            ort_state, "GradientGraphBuilder"
        ):
            # Both packages install the `onnxruntime` module; the training one is a
            # different release with its own deviations, so it runs under its name.
            raise ImportError(
                f"the installed onnxruntime {onnxruntime.__version__} is the "
                "onnxruntime-training package: run --framework onnxruntime-training"
            )
        self._newest_ir = newest_loadable_ir_version()
        self._newest_opset = newest_loadable_opset(self._newest_ir)
        self._specs = build_specs(self._newest_opset, self._gradient_reason)
        self._devices = discover_devices(requested_providers())
        self._sessions: dict[tuple[Signature, str], onnxruntime.InferenceSession] = {}
        self._support: dict[tuple[str, str, str], str | None] = {}

    def _gradient_reason(self, operator: str) -> str:
        return (
            f"the onnxruntime package ({onnxruntime.__version__}) runs inference "
            "only: it has no gradient graph builder (that is in onnxruntime-training)"
        )

    def version(self) -> str:
        return onnxruntime.__version__

    def implementations(self) -> Sequence[Implementation]:
        return [spec.implementation for spec in self._specs.values()]

    def devices(self) -> Sequence[Device]:
        return [device for device, _ in self._devices.values()]

    def provider(self, device: str) -> str:
        return self._devices[device][1]

    def _signature(
        self,
        spec: Spec,
        dtype: str,
        rank: int,
        eps: float,
        channels: int,
        grads: bool,
        groups: int | None = None,
        normalized_ndim: int | None = None,
        mode: str | None = None,
        momentum: float | None = None,
    ) -> Signature:
        """Return the graph signature; `groups` applies to group_norm and
        `normalized_ndim` to layer_norm implementations, and both are ignored
        elsewhere. `mode` is the mode of a request that carries running
        statistics, None for one that does not, and `momentum` its momentum."""
        operator = spec.implementation.operator
        fixes_channels = operator == "instance_norm" and spec.operator == GROUP_NORM
        if fixes_channels:
            groups = channels
        elif operator != "group_norm":
            groups = None
        if not spec.implementation.running_stats:
            mode = None
        if mode != "training":
            # Only a training step reads the momentum.
            momentum = None
        return Signature(
            implementation=spec.implementation.name,
            dtype=dtype,
            rank=rank,
            eps=eps,
            channels=channels if fixes_channels else None,
            gradients=grads,
            groups=groups,
            normalized_ndim=normalized_ndim if operator == "layer_norm" else None,
            mode=mode,
            momentum=momentum,
        )

    def model_bytes(self, spec: Spec, signature: Signature) -> bytes:
        """Return the serialized model that a session for `signature` loads."""
        ir_version = model_ir_version(spec.opset, self._newest_ir)
        return build_model(spec, signature, ir_version).SerializeToString()

    def session(
        self, spec: Spec, signature: Signature, device: str, mode: str = DEFAULT_MODE
    ) -> onnxruntime.InferenceSession:
        """Return the cached session for `signature` on `device` in the execution
        `mode`, creating it once."""
        key = (signature, device, mode)
        session = self._sessions.get(key)
        if session is None:
            model = self.model_bytes(spec, signature)
            session = create_session(model, self.provider(device), mode=mode)
            self._sessions[key] = session
        return session

    def _wants_gradients(self, spec: Spec) -> bool:
        return spec.implementation.gradients

    def unsupported_reason(
        self, implementation: str, device: str, dtype: str
    ) -> str | None:
        """Build the implementation's probe session once per (implementation, device,
        dtype) and return onnxruntime's error when it refuses, else None."""
        key = (implementation, device, dtype)
        if key not in self._support:
            self._support[key] = self._probe(implementation, device, dtype)
        return self._support[key]

    def _probe_signature(self, spec: Spec, dtype: str, grads: bool) -> Signature:
        """Return the signature of the support probes (see PROBE_RANK)."""
        return self._signature(
            spec,
            dtype,
            PROBE_RANK,
            PROBE_EPS,
            PROBE_CHANNELS,
            grads,
            groups=PROBE_GROUPS,
            normalized_ndim=PROBE_NORMALIZED_NDIM,
        )

    def _probe(self, implementation: str, device: str, dtype: str) -> str | None:
        spec = self._specs[implementation]
        excluded = schema_reason(spec, dtype)
        if excluded is not None:
            return excluded
        signature = self._probe_signature(spec, dtype, self._wants_gradients(spec))
        try:
            self.session(spec, signature, device)
        except (*ORT_ERRORS, GradientBuilderError, DeviceFallbackError) as error:
            return (
                f"onnxruntime {onnxruntime.__version__} cannot run {implementation} "
                f"(opset {spec.opset}) in {dtype} on {self.provider(device)}: "
                f"{_provider_error_text(error)}"
            )
        return None

    def _feeds(self, request: Request, names: list[str]) -> dict[str, np.ndarray]:
        container = _container(request.dtype)
        if request.affine:
            scale, bias = request.gamma, request.beta
        else:
            if request.op == "layer_norm":
                shape = request.x.shape[-request.normalized_ndim :]
            else:
                shape = request.x.shape[1:2]
            scale = np.ones(shape, dtype=container)
            bias = np.zeros(shape, dtype=container)
        arrays = {
            "x": request.x,
            "scale": scale,
            "B": bias,
            "dy": request.grad_output,
            "input_mean": request.running_mean,
            "input_var": request.running_var,
        }
        suffix = "_in" if request.dtype == "bfloat16" else ""
        feeds = {}
        for name in names:
            array = np.ascontiguousarray(arrays[name], container)
            if name in RUNNING_INPUTS:
                # A session reads a contiguous array of its input type in place
                # and may write to it. onnxruntime-training 1.19.2's gradient graph
                # of the inference-mode model (see OnnxRuntimeTrainingAdapter)
                # stores a running-statistics update in the input_mean and
                # input_var buffers, even read-only ones.
                array = array.copy()
            feeds[f"{name}{suffix}"] = array
        return feeds

    def _request_signature(
        self, spec: Spec, request: Request, grads: bool
    ) -> Signature:
        """Return the graph signature of a request, with gradients if `grads`."""
        return self._signature(
            spec,
            request.dtype,
            request.x.ndim - 2,
            request.eps,
            request.x.shape[1],
            grads,
            groups=request.groups,
            normalized_ndim=request.normalized_ndim,
            mode=request.mode if request.running_mean is not None else None,
            momentum=request.momentum,
        )

    def run(self, request: Request) -> Result:
        spec = self._specs[request.implementation]
        grads = request.gradients and self._wants_gradients(spec)
        signature = self._request_signature(spec, request, grads)
        names = ["x", "scale", "B"] + (["dy"] if grads else [])
        names += _running_inputs(signature)
        try:
            session = self.session(
                spec, signature, request.device, request.execution_mode
            )
            outputs = session.run(None, self._feeds(request, names))
        except (*ORT_ERRORS, GradientBuilderError) as error:
            raise Rejected(_provider_error_text(error)) from error
        named = {
            meta.name.removesuffix("_out"): value
            for meta, value in zip(session.get_outputs(), outputs, strict=True)
        }
        return self.result(request, named)

    def result(self, request: Request, named: dict[str, np.ndarray]) -> Result:
        """Return the Result for the session outputs `named` (output suffixes
        stripped)."""
        output = named["y"]
        dtype = "bfloat16" if request.dtype == "bfloat16" else output.dtype.name
        # ONNX float attributes are float32: the kernel receives eps rounded to it.
        # Only a training-mode graph with running statistics outputs running_mean
        # and running_var.
        return Result(
            output=output,
            dtype=dtype,
            eps=float(np.float32(request.eps)),
            running_mean=named.get("running_mean"),
            running_var=named.get("running_var"),
        )


# ---------------------------------------------------------------------------------
# onnxruntime-training


def _training_api() -> tuple[object, object]:
    """Return onnxruntime-training's modules onnxruntime.training.artifacts and
    onnxruntime.training.api, or raise TrainingApiError when they cannot be
    imported. They are imported on first use, so that every other item runs
    where that import fails: in 1.19.2, onnxruntime.training imports torch, and
    raises ModuleNotFoundError without it."""
    try:
        return (
            importlib.import_module("onnxruntime.training.artifacts"),
            importlib.import_module("onnxruntime.training.api"),
        )
    except ImportError as error:
        raise TrainingApiError(
            f"importing onnxruntime.training failed: {_provider_error_text(error)}"
        ) from error


# A source location that starts an onnxruntime C++ exception's text, as in
# "/onnxruntime_src/onnxruntime/core/graph/graph_utils.cc:549 bool f(...) MESSAGE".
SOURCE_LOCATION = re.compile(r"(/[\w./+-]+:\d+) ")
# The brackets that a C++ signature nests: parameter lists, template arguments,
# and GCC's "[with T = float]".
OPENING = {"(": ")", "<": ">", "[": "]"}


def _words(text: str, start: int) -> list[tuple[int, int]]:
    """Return the (start, end) spans of the words of text[start:], split at the
    spaces outside brackets, so that "f(const A&, B)" is one word."""
    spans, depth, begin = [], 0, start
    for index in range(start, len(text)):
        character = text[index]
        if character in OPENING:
            depth += 1
        elif character in OPENING.values() and depth > 0:
            depth -= 1
        elif character == " " and depth == 0:
            if index > begin:
                spans.append((begin, index))
            begin = index + 1
    if begin < len(text):
        spans.append((begin, len(text)))
    return spans


def _signature_end(text: str, start: int) -> int | None:
    """Return where the C++ function signature that starts at `start` ends: up to
    three return-type words, a qualified name with its parameter list
    ("ns::Class::f(int)"), and an optional " const" and " [with T = ...]". Return
    None when the text there is not such a signature."""
    words = _words(text, start)
    for position, (begin, end) in enumerate(words[:4]):
        word = text[begin:end]
        if "(" not in word:
            if not re.fullmatch(r"[\w:<>,*&]+", word):
                return None
            continue
        if "::" not in word.split("(", 1)[0] and not word.startswith("operator"):
            return None
        following = [text[b:e] for b, e in words[position + 1 : position + 3]]
        suffix_words = 0
        if following[:1] == ["const"]:
            suffix_words += 1
        if len(following) > suffix_words and following[suffix_words].startswith(
            "[with "
        ):
            suffix_words += 1
        return words[position + suffix_words][1]
    return None


def _without_signature(text: str) -> str:
    """Return onnxruntime C++ exception text without the function signature that
    follows each source location: "FILE:LINE void ns::f(int) const MESSAGE"
    becomes "FILE:LINE: MESSAGE". Text without such a signature is unchanged."""
    pieces, copied = [], 0
    for location in SOURCE_LOCATION.finditer(text):
        if location.start() < copied:
            continue
        end = _signature_end(text, location.end())
        if end is None:
            continue
        pieces.append(text[copied : location.start()])
        pieces.append(f"{location.group(1)}:")
        copied = end
    pieces.append(text[copied:])
    return "".join(pieces)


def _training_error_text(error: BaseException, log: list[str]) -> str:
    """Return the training API's error, without C++ signatures, followed by the
    errors onnxruntime logged that the error's own text does not repeat."""
    # onnxruntime's messages end in blank lines and nest further messages.
    message = " ".join(str(error).split())
    text = f"{type(error).__name__}: {_without_signature(message)}"
    causes = []
    for logged in _logged_messages(log[0]) if log else []:
        # A logged message that starts as a part of the error's text repeats
        # it (the log cuts messages short, so only the start is compared).
        if logged[:LOGGED_PREFIX] not in text and logged[:LOGGED_PREFIX] not in message:
            causes.append(_without_signature(logged))
    return text + (f"; onnxruntime logged: {' | '.join(causes)}" if causes else "")


def _training_step(module: object, dy: np.ndarray) -> None:
    """Run one forward and backward step of a training API Module on dy."""
    log: list[str] = []
    try:
        # A failing kernel logs its error to stderr as well; the message
        # carries it instead.
        with _captured_stderr(log):
            module(dy)
    except (RuntimeError, *ORT_ERRORS) as error:
        text = _training_error_text(error, log)
        raise TrainingApiError(f"a training step raised {text}") from error


class OnnxRuntimeTrainingAdapter(OnnxRuntimeAdapter):
    """The same models run by the onnxruntime-training package, with gradients where
    its gradient builder supports the operator.

    onnxruntime-training installs the `onnxruntime` module in place of the plain
    package, so this adapter needs an environment of its own. Gradients come from
    onnxruntime's GradientGraphBuilder: the forward model plus the loss
    sum(y * dy) goes through the training graph transformations
    (get_optimized_model, which turns BatchNormalization in training mode into
    BatchNormInternal) and then gets a backward graph with outputs x_grad,
    scale_grad and B_grad, run in an ordinary InferenceSession. A training step
    with running statistics keeps running_mean and running_var among the outputs.

    Repeated backward runs in both schemes. "repeat" runs the gradient session once
    per grad_output. "accumulate" needs gradient buffers, which only the training
    API (onnxruntime.training: generate_artifacts, CheckpointState, Module) keeps:
    x, scale and B become the Module's parameters, and each training step adds
    its gradients into their buffers. The training API runs in float32 on the CPU
    provider only; `backward_scheme_reason` probes the rest.

    NOTE: onnxruntime-training 1.19.2 cannot differentiate BatchNormalization in
    inference mode. GradientGraphBuilder has no gradient for BatchNormalization
    itself ("The gradient builder has not been registered: BatchNormalization for
    node"), and get_optimized_model turns every BatchNormalization into
    BatchNormInternal with training_mode = 1, training_mode = 0 included. So an
    inference request with gradients runs in training mode: its output and
    gradients equal those of the model without running statistics, and they do
    not match inference's reference.
    """

    framework = "onnxruntime-training"

    # The operators whose gradient onnxruntime-training 1.19.2 builds, measured:
    # InstanceNormalization and GroupNormalization raise "The gradient builder has
    # not been registered: <operator> for node".
    GRADIENT_OPERATORS = (BATCH_NORM, LAYER_NORM)
    REQUIRES_GRAD = ("x", "scale", "B")

    def __init__(self) -> None:
        if not hasattr(ort_state, "GradientGraphBuilder"):
            raise ImportError(
                f"onnxruntime {onnxruntime.__version__} has no GradientGraphBuilder: "
                "install onnxruntime-training (requirements/onnxruntime-training.txt) "
                "in place of onnxruntime"
            )
        super().__init__()
        self._specs = {
            name: self._with_gradients(spec) for name, spec in self._specs.items()
        }
        self._accumulate_support: dict[tuple[str, str, str], str | None] = {}

    def _gradient_reason(self, operator: str) -> str:
        return (
            f"onnxruntime-training {onnxruntime.__version__} has no gradient builder "
            f"for {operator} (GradientGraphBuilder raises 'The gradient builder has "
            f"not been registered: {operator} for node')"
        )

    def _with_gradients(self, spec: Spec) -> Spec:
        if spec.operator not in self.GRADIENT_OPERATORS:
            return spec
        declared = replace(
            spec.implementation,
            description=spec.implementation.description
            + "; gradients from GradientGraphBuilder, and in the accumulate scheme "
            "from the training API's Module with x, scale and B as its parameters",
            gradients=True,
            gradient_reason="",
            backward_schemes=BACKWARD_SCHEMES,
        )
        return Spec(spec.operator, spec.opset, declared)

    def backward_scheme_reason(
        self, implementation: str, scheme: str, device: str, dtype: str
    ) -> str | None:
        """Return why the scheme cannot run on the device in the dtype, or None.
        "repeat" runs wherever the first-order gradients do. "accumulate" is
        probed once per (implementation, device, dtype): the training API lacks
        kernels and checkpoint types that the gradient graph alone does not
        need."""
        declared = self._specs[implementation].implementation
        if scheme not in declared.backward_schemes:
            return f"implementation {implementation} has no backward scheme {scheme!r}"
        if scheme != "accumulate":
            return None
        key = (implementation, device, dtype)
        if key not in self._accumulate_support:
            self._accumulate_support[key] = self._probe_accumulate(*key)
        return self._accumulate_support[key]

    def _probe_accumulate(
        self, implementation: str, device: str, dtype: str
    ) -> str | None:
        provider = self.provider(device)
        if provider != CPU_PROVIDER:
            return (
                f"the adapter runs the training API's Module on {CPU_PROVIDER} "
                "only: a Module, unlike an InferenceSession, does not say which "
                f"provider ran its nodes, so a run on {provider} could not be "
                "told from a silent fallback to the CPU"
            )
        spec = self._specs[implementation]
        signature = self._probe_signature(spec, dtype, True)
        shape = (PROBE_BATCH, PROBE_CHANNELS, *([PROBE_SIZE] * PROBE_RANK))
        container = _container(dtype)
        if signature.normalized_ndim is None:
            parameter_shape = shape[1:2]
        else:
            parameter_shape = shape[-signature.normalized_ndim :]
        suffix = "_in" if dtype == "bfloat16" else ""
        parameters = {
            f"x{suffix}": np.arange(np.prod(shape), dtype=container).reshape(shape),
            f"scale{suffix}": np.ones(parameter_shape, container),
            f"B{suffix}": np.zeros(parameter_shape, container),
        }
        try:
            module, _ = self._accumulating_module(spec, signature, parameters)
            _training_step(module, np.ones(shape, container))
        except TrainingApiError as error:
            return (
                f"onnxruntime-training {onnxruntime.__version__}'s training API "
                f"cannot accumulate the gradients of {implementation} (opset "
                f"{spec.opset}) in {dtype}: {error}"
            )
        return None

    def _accumulating_module(
        self, spec: Spec, signature: Signature, parameters: dict[str, np.ndarray]
    ) -> tuple[object, object]:
        """Build training artifacts in which `parameters` (x, scale and B, keyed by
        graph input name) are initializers that require gradients and dy stays a
        graph input. Return the training API's Module for them on the CPU
        provider, in training mode, and its CheckpointState. Raises
        TrainingApiError with onnxruntime's message and the errors it logged."""
        artifacts, api = _training_api()
        model = build_model(
            spec, signature, model_ir_version(spec.opset, self._newest_ir)
        )
        graph = model.graph
        inputs = [value for value in graph.input if value.name not in parameters]
        del graph.input[:]
        graph.input.extend(inputs)
        graph.initializer.extend(
            numpy_helper.from_array(array, name) for name, array in parameters.items()
        )
        log: list[str] = []
        step = "generate_artifacts"
        try:
            # generate_artifacts builds its gradient graph with default session
            # options. Those log each graph transformation at the info level to
            # stderr, so the capture keeps them out of the run's output.
            with tempfile.TemporaryDirectory() as directory, _captured_stderr(log):
                # loss=None: the model's first output, sum(y * dy) cast to
                # float32, is the loss. Only the training model is loaded: the
                # eval model that generate_artifacts writes sets training_mode =
                # 0 on BatchNormalization but keeps its three outputs, and
                # onnxruntime refuses to load it.
                artifacts.generate_artifacts(
                    model,
                    requires_grad=list(parameters),
                    loss=None,
                    artifact_directory=directory,
                )
                step = "CheckpointState.load_checkpoint"
                state = api.CheckpointState.load_checkpoint(
                    os.path.join(directory, "checkpoint")
                )
                step = "Module"
                module = api.Module(
                    os.path.join(directory, "training_model.onnx"),
                    state,
                    None,
                    device="cpu",
                    session_options=_session_options(
                        CPU_PROVIDER, SESSION_LOG_SEVERITY
                    ),
                )
        except (RuntimeError, *ORT_ERRORS) as error:
            text = _training_error_text(error, log)
            raise TrainingApiError(f"{step} raised {text}") from error
        module.train()
        return module, state

    def run(self, request: Request) -> Result:
        if request.backward_scheme == "accumulate":
            return self._accumulate(request)
        if request.grad_outputs is None:
            return super().run(request)
        return self._repeat(request)

    def _accumulate(self, request: Request) -> Result:
        """Run K training steps of one Module, the k-th with grad_outputs[k], and
        read its gradient buffers after each. The Module adds each step's
        gradients into the buffers (InPlaceAccumulatorV2 nodes) until
        lazy_reset_grad, which the adapter never calls."""
        if request.running_mean is not None:
            # The suite sends none: repeated backward runs without them.
            raise ValueError(
                "an accumulate request with running statistics: the accumulate "
                "path builds its model without the running-statistics inputs"
            )
        spec = self._specs[request.implementation]
        signature = self._request_signature(spec, request, True)
        # numpy_helper.from_array copies each array into the model, so the
        # checkpoint keeps no view of the read-only request.
        parameters = self._feeds(request, list(self.REQUIRES_GRAD))
        fields = {"x": "grad_input", "scale": "grad_gamma", "B": "grad_beta"}
        if not request.affine:
            fields = {"x": "grad_input"}
        steps: dict[str, list[np.ndarray]] = {field: [] for field in fields.values()}

        try:
            module, state = self._accumulating_module(spec, signature, parameters)
            for grad_output in request.grad_outputs:
                single = replace(request, grad_output=grad_output)
                (dy,) = self._feeds(single, ["dy"]).values()
                _training_step(module, dy)
                for name, field in fields.items():
                    name += "_in" if request.dtype == "bfloat16" else ""
                    # A copy: the buffer changes in place at the next step.
                    gradient = state.parameters[name].grad
                    steps[field].append(np.array(gradient, copy=True))
        except TrainingApiError as error:
            raise Rejected(str(error)) from error

        # The dtype of the buffers themselves: bfloat16 graphs return float32.
        buffer = steps["grad_input"][0]
        dtype = "bfloat16" if request.dtype == "bfloat16" else buffer.dtype.name
        return Result(
            output=None,
            dtype=dtype,
            eps=float(np.float32(request.eps)),
            **{f"{field}_steps": np.stack(stack) for field, stack in steps.items()},
        )

    def _repeat(self, request: Request) -> Result:
        """Run each grad_output of a repeated-backward request as its own session
        run, forward and backward together: the gradient graph cannot run its
        backward part alone."""
        steps: dict[str, list[np.ndarray]] = {
            "grad_input": [],
            "grad_gamma": [],
            "grad_beta": [],
        }
        result = None
        for grad_output in request.grad_outputs:
            single = replace(
                request,
                grad_output=grad_output,
                grad_outputs=None,
                backward_scheme=None,
            )
            result = super().run(single)
            for name, stack in steps.items():
                value = getattr(result, name)
                if value is not None:
                    # A copy, so that no later run can write into this call's array.
                    stack.append(np.array(value, copy=True))
        stacked = {
            f"{name}_steps": np.stack(stack) if stack else None
            for name, stack in steps.items()
        }
        return Result(output=None, dtype=result.dtype, eps=result.eps, **stacked)

    def model_bytes(self, spec: Spec, signature: Signature) -> bytes:
        forward = super().model_bytes(spec, signature)
        if not signature.gradients:
            return forward
        requires_grad = set(self.REQUIRES_GRAD)
        options = onnxruntime.SessionOptions()
        options.log_severity_level = PROBE_LOG_SEVERITY
        try:
            optimized = ort_state.get_optimized_model(forward, requires_grad, options)
            builder = ort_state.GradientGraphBuilder(
                optimized, {"loss"}, requires_grad, "loss", options
            )
            builder.build()
        except RuntimeError as error:
            raise GradientBuilderError(str(error)) from error
        return builder.get_model()

    def result(self, request: Request, named: dict[str, np.ndarray]) -> Result:
        result = super().result(request, named)
        if "x_grad" not in named:
            return result
        result.grad_input = named["x_grad"]
        if request.affine:
            result.grad_gamma = named["scale_grad"]
            result.grad_beta = named["B_grad"]
        return result
