"""TensorFlow adapter: InstanceNorm three ways, GroupNorm and LayerNorm through Keras,
and BatchNorm in training mode three ways, with gradients through tf.GradientTape
and second derivatives through two nested tapes. The Keras and fused BatchNorm
implementations also take running statistics: a training step that updates them,
or inference that normalizes with them. Repeated backward runs as several
gradient calls on one persistent tape, or, accumulated, through a Keras
optimizer's gradient accumulators.

Written against TensorFlow 2.21 with Keras 3 on its TensorFlow backend. The default
execution mode runs eagerly. The modes "function" and "xla" run the forward and its
gradients inside tf.function, without and with XLA (see EXECUTION_MODES). Every
mode is pinned to the requested device with tf.device.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass

# Keras 3 reads KERAS_BACKEND once, when it is first imported.
KERAS_BACKEND = os.environ.setdefault("KERAS_BACKEND", "tensorflow")
if KERAS_BACKEND != "tensorflow":
    raise ImportError(
        f"the TensorFlow adapter needs Keras on its TensorFlow backend, but "
        f"KERAS_BACKEND is {KERAS_BACKEND!r}; unset it or set it to 'tensorflow'"
    )
# Level 2 hides TensorFlow's INFO and WARNING lines printed at import and on first
# use of a device. A value the user set is kept.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from adapters.contract import (  # noqa: E402
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

if keras.backend.backend() != "tensorflow":
    # Keras was imported before this module with another KERAS_BACKEND.
    raise ImportError(
        f"the TensorFlow adapter needs Keras on its TensorFlow backend, but Keras "
        f"{keras.__version__} was already loaded with the "
        f"{keras.backend.backend()!r} backend"
    )

TF_DTYPES = {
    "float64": tf.float64,
    "float32": tf.float32,
    "float16": tf.float16,
    "bfloat16": tf.bfloat16,
}

CHANNELS_FIRST = "channels_first"
CHANNELS_LAST = "channels_last"
BOTH_LAYOUTS = (CHANNELS_FIRST, CHANNELS_LAST)


@dataclass
class Computed:
    """An implementation's output and the gamma and beta it was computed from.

    gamma and beta are the tensors or variables to differentiate against, or None
    when affine is off. `eps` is the eps the op stores when its interface rounds
    the requested one (see Result.eps), else None.
    """

    output: tf.Tensor
    gamma: tf.Tensor | tf.Variable | None
    beta: tf.Tensor | tf.Variable | None
    eps: float | None = None
    compute_dtype: str | None = None
    # The running mean and variance after a training step, or None when the
    # request carries no running statistics or asks for inference.
    running_mean: tf.Tensor | None = None
    running_var: tf.Tensor | None = None


@dataclass(frozen=True)
class Running:
    """A request's running statistics, in the tested dtype, with what to do with
    them: update them in a training step with `momentum`, or normalize with them
    (`training` False)."""

    mean: tf.Tensor
    variance: tf.Tensor
    training: bool
    momentum: float


# forward(x, gamma, beta, eps, layout, **arguments), where `arguments` contains the
# operator's own request fields: `groups` for group_norm, `normalized_ndim` for
# layer_norm, none for the others. The implementations that keep running
# statistics also take `running`, a Running, when the request carries them.
Forward = Callable[..., Computed]


def _to_channels_last(x: tf.Tensor) -> tf.Tensor:
    """Transpose (N, C, *spatial) to (N, *spatial, C)."""
    return tf.transpose(x, [0, *range(2, x.shape.rank), 1])


def _to_channels_first(x: tf.Tensor) -> tf.Tensor:
    """Transpose (N, *spatial, C) to (N, C, *spatial)."""
    rank = x.shape.rank
    return tf.transpose(x, [0, rank - 1, *range(1, rank - 1)])


def _new_instance_group_norm_layer(shape, dtype, eps, layout, affine):
    """Build keras-group-norm's layer for x of `shape` in `layout`: one group per
    channel over the channels-last form of x."""
    if layout == CHANNELS_FIRST:
        shape = (shape[0], *shape[2:], shape[1])
    # The layer's dtype policy is the tested dtype. Under the default float32 policy
    # Keras 3.15.1 returns float32 for float64 input (call() casts its result to the
    # compute dtype).
    layer = keras.layers.GroupNormalization(
        groups=shape[-1],
        axis=-1,
        epsilon=eps,
        center=affine,
        scale=affine,
        dtype=dtype.name,
    )
    layer.build(shape)
    return layer


def _keras_group_norm(x, gamma, beta, eps, layout, *, layer=None):
    if layer is None:
        layer = _new_instance_group_norm_layer(
            tuple(x.shape), x.dtype, eps, layout, gamma is not None
        )
    channels_first = layout == CHANNELS_FIRST
    if channels_first:
        x = _to_channels_last(x)
    output = _call_keras_layer(layer, x, gamma, beta)
    if channels_first:
        output = _to_channels_first(output)
    # Keras 3.15.1's GroupNormalization casts float16 and bfloat16 input to float32,
    # computes, and rounds the output once (its call() and a traced graph show it).
    low_precision = x.dtype in (tf.float16, tf.bfloat16)
    computed_in = "float32" if low_precision else x.dtype.name
    return Computed(output, layer.gamma, layer.beta, compute_dtype=computed_in)


def _parameter_shape(rank: int, channels: int, layout: str) -> list[int]:
    """Return the shape that broadcasts a (C,) parameter against x in `layout`."""
    shape = [1] * rank
    shape[1 if layout == CHANNELS_FIRST else rank - 1] = channels
    return shape


def _moments(x, gamma, beta, eps, layout):
    rank = x.shape.rank
    if layout == CHANNELS_FIRST:
        channels, axes = x.shape[1], list(range(2, rank))
    else:
        channels, axes = x.shape[-1], list(range(1, rank - 1))
    shape = _parameter_shape(rank, channels, layout)
    mean, variance = tf.nn.moments(x, axes=axes, keepdims=True)
    output = tf.nn.batch_normalization(
        x,
        mean,
        variance,
        offset=tf.reshape(beta, shape) if beta is not None else None,
        scale=tf.reshape(gamma, shape) if gamma is not None else None,
        variance_epsilon=eps,
    )
    return Computed(output, gamma, beta)


if hasattr(tf.nn, "fused_batch_norm"):
    FUSED_BATCH_NORM = tf.nn.fused_batch_norm
    FUSED_BATCH_NORM_NAME = "tf.nn.fused_batch_norm"
else:
    # TensorFlow 2.21 exports it under tf.compat.v1 only.
    FUSED_BATCH_NORM = tf.compat.v1.nn.fused_batch_norm
    FUSED_BATCH_NORM_NAME = "tf.compat.v1.nn.fused_batch_norm"


def _fused_parameter_dtype(x_dtype: tf.DType) -> tf.DType:
    """Return the dtype (the op's attribute U) in which FusedBatchNormV3 takes
    scale, offset, mean and variance for x of `x_dtype`: float32 for float16 and
    bfloat16 input. TensorFlow 2.21.0 raises InvalidArgumentError for a float16
    or bfloat16 mean ("input #3(zero-based) was expected to be a float tensor")."""
    return tf.float64 if x_dtype == tf.float64 else tf.float32


def _fused_parameters(x_dtype, gamma, beta, channels: int):
    """Return FusedBatchNormV3's scale and offset for x of `x_dtype`, in the
    op's parameter dtype. The op requires both even when affine is off, so ones
    and zeros stand in."""
    parameter_dtype = _fused_parameter_dtype(x_dtype)
    if gamma is None:
        return tf.ones([channels], parameter_dtype), tf.zeros(
            [channels], parameter_dtype
        )
    return tf.cast(gamma, parameter_dtype), tf.cast(beta, parameter_dtype)


def _fused_batch_norm_reshape(x, gamma, beta, eps, layout):
    """Batch-normalize the (1, N*C, ...) fold of x in training mode.

    FusedBatchNormV3 takes 4-D and 5-D input only. Rank-3 input gets a trailing
    spatial axis of size 1, which keeps every (n, c) slice's elements, so the
    statistics are those of the original slice.
    """
    rank = x.shape.rank
    channels_first = layout == CHANNELS_FIRST
    if channels_first:
        batch, channels = x.shape[0], x.shape[1]
        spatial = list(x.shape[2:])
        folded_spatial = spatial + [1] if rank == 3 else spatial
        folded = tf.reshape(x, [1, batch * channels, *folded_spatial])
        data_format = "NCHW" if len(folded_spatial) == 2 else "NCDHW"
    else:
        batch, channels = x.shape[0], x.shape[-1]
        spatial = list(x.shape[1:-1])
        folded_spatial = spatial + [1] if rank == 3 else spatial
        # Move the batch axis next to the channel axis, (N, *spatial, C) to
        # (*spatial, N, C), so that one reshape gives channel index n * C + c.
        moved = tf.transpose(x, [*range(1, rank - 1), 0, rank - 1])
        folded = tf.reshape(moved, [1, *folded_spatial, batch * channels])
        data_format = "NHWC" if len(folded_spatial) == 2 else "NDHWC"

    scale, offset = _fused_parameters(x.dtype, gamma, beta, channels)
    folded_output, _, _ = FUSED_BATCH_NORM(
        folded,
        tf.tile(scale, [batch]),
        tf.tile(offset, [batch]),
        epsilon=eps,
        data_format=data_format,
        is_training=True,
    )

    if channels_first:
        output = tf.reshape(folded_output, x.shape)
    else:
        unfolded = tf.reshape(folded_output, [*spatial, batch, channels])
        output = tf.transpose(unfolded, [rank - 2, *range(rank - 2), rank - 1])
    # FusedBatchNormV3 declares epsilon as a float attribute, which is float32.
    return Computed(output, gamma, beta, eps=float(np.float32(eps)))


def _keras_compute_dtype(x: tf.Tensor) -> str:
    """Return the dtype Keras 3.15.1's normalization layers compute x in.

    GroupNormalization, LayerNormalization and BatchNormalization each cast their
    input to result_type(dtype, float32), compute, and cast the output back once.
    """
    return "float32" if x.dtype in (tf.float16, tf.bfloat16) else x.dtype.name


def _call_keras_layer(
    layer, x, gamma, beta, running: Running | None = None, **call_arguments
) -> tf.Tensor:
    """Set the built `layer`'s gamma and beta weights (and its moving mean and
    variance from `running`), and call it on x.

    In the compiled modes these assignments are part of the traced function, so
    one layer serves every call with the same signature."""
    if gamma is not None:
        layer.gamma.assign(gamma)
    if beta is not None:
        layer.beta.assign(beta)
    if running is not None:
        layer.moving_mean.assign(running.mean)
        layer.moving_variance.assign(running.variance)
    return layer(x, **call_arguments)


def _channel_axis(layout: str) -> int:
    return 1 if layout == CHANNELS_FIRST else -1


# Each Keras layer gets the tested dtype as its dtype policy, because under the
# default float32 policy Keras 3.15.1 returns float32 for float64 input. The
# factories build the layer for x of `shape`, so that the compiled modes can
# create its variables outside the traced function.


def _new_group_norm_layer(shape, dtype, eps, layout, affine, *, groups):
    layer = keras.layers.GroupNormalization(
        groups=groups,
        axis=_channel_axis(layout),
        epsilon=eps,
        center=affine,
        scale=affine,
        dtype=dtype.name,
    )
    layer.build(shape)
    return layer


def _group_norm_keras(x, gamma, beta, eps, layout, *, groups, layer=None):
    if layer is None:
        layer = _new_group_norm_layer(
            tuple(x.shape), x.dtype, eps, layout, gamma is not None, groups=groups
        )
    output = _call_keras_layer(layer, x, gamma, beta)
    return Computed(
        output, layer.gamma, layer.beta, compute_dtype=_keras_compute_dtype(x)
    )


def _new_layer_norm_layer(shape, dtype, eps, layout, affine, *, normalized_ndim):
    rank = len(shape)
    layer = keras.layers.LayerNormalization(
        axis=list(range(rank - normalized_ndim, rank)),
        epsilon=eps,
        center=affine,
        scale=affine,
        dtype=dtype.name,
    )
    layer.build(shape)
    return layer


def _layer_norm_keras(x, gamma, beta, eps, layout, *, normalized_ndim, layer=None):
    if layer is None:
        layer = _new_layer_norm_layer(
            tuple(x.shape),
            x.dtype,
            eps,
            layout,
            gamma is not None,
            normalized_ndim=normalized_ndim,
        )
    output = _call_keras_layer(layer, x, gamma, beta)
    return Computed(
        output, layer.gamma, layer.beta, compute_dtype=_keras_compute_dtype(x)
    )


def _new_batch_norm_layer(shape, dtype, eps, layout, affine, *, momentum=None):
    """Build batch_norm.keras's layer, with Keras's default momentum unless
    `momentum` is given."""
    options = {} if momentum is None else {"momentum": momentum}
    layer = keras.layers.BatchNormalization(
        axis=_channel_axis(layout),
        epsilon=eps,
        center=affine,
        scale=affine,
        dtype=dtype.name,
        **options,
    )
    layer.build(shape)
    return layer


def _batch_norm_keras(
    x, gamma, beta, eps, layout, running: Running | None = None, *, layer=None
):
    # Without `running`, training=True normalizes with the batch's statistics and
    # the layer updates its default moving mean and variance, which the adapter
    # discards with the layer (or overwrites on the next call in a compiled mode).
    if layer is None:
        momentum = None if running is None else running.momentum
        layer = _new_batch_norm_layer(
            tuple(x.shape), x.dtype, eps, layout, gamma is not None, momentum=momentum
        )
    training = running is None or running.training
    output = _call_keras_layer(
        layer, x, gamma, beta, running=running, training=training
    )
    computed = Computed(
        output, layer.gamma, layer.beta, compute_dtype=_keras_compute_dtype(x)
    )
    if running is not None and running.training:
        # Keras 3.15.1 keeps moving_mean and moving_variance in the layer's
        # variable dtype, which is float16 or bfloat16 under a float16 or
        # bfloat16 policy. call() computes the update in float32 and rounds it
        # once when it assigns it, so the values are final here.
        computed.running_mean = tf.convert_to_tensor(layer.moving_mean)
        computed.running_var = tf.convert_to_tensor(layer.moving_variance)
    return computed


def _batch_norm_moments(x, gamma, beta, eps, layout):
    rank = x.shape.rank
    if layout == CHANNELS_FIRST:
        channels, axes = x.shape[1], [0, *range(2, rank)]
    else:
        channels, axes = x.shape[-1], list(range(rank - 1))
    shape = _parameter_shape(rank, channels, layout)
    mean, variance = tf.nn.moments(x, axes=axes, keepdims=True)
    output = tf.nn.batch_normalization(
        x,
        mean,
        variance,
        offset=tf.reshape(beta, shape) if beta is not None else None,
        scale=tf.reshape(gamma, shape) if gamma is not None else None,
        variance_epsilon=eps,
    )
    return Computed(output, gamma, beta)


def _batch_norm_fused(x, gamma, beta, eps, layout, running: Running | None = None):
    """Batch-normalize x with FusedBatchNormV3: in training mode, or with
    `running` as a training step that updates those statistics or as inference
    that normalizes with them.

    The op takes 4-D and 5-D input only. Rank-3 input gets a spatial axis of size 1
    next to its own, which leaves each channel's elements and statistics unchanged.
    Input of rank 6 or more reaches the op as it is, and the op rejects it.
    """
    rank = x.shape.rank
    channels_first = layout == CHANNELS_FIRST
    channels = x.shape[1] if channels_first else x.shape[-1]
    expanded = x
    if rank == 3:
        expanded = tf.expand_dims(x, -1 if channels_first else -2)
    if channels_first:
        data_format = "NCHW" if expanded.shape.rank == 4 else "NCDHW"
    else:
        data_format = "NHWC" if expanded.shape.rank == 4 else "NDHWC"

    scale, offset = _fused_parameters(x.dtype, gamma, beta, channels)
    statistics = {"is_training": True}
    if running is not None:
        parameter_dtype = _fused_parameter_dtype(x.dtype)
        statistics = {
            "mean": tf.cast(running.mean, parameter_dtype),
            "variance": tf.cast(running.variance, parameter_dtype),
            "is_training": running.training,
        }
        if running.training:
            # With f = exponential_avg_factor, TensorFlow 2.21.0 returns
            # (1 - f) * old + f * batch with the batch's unbiased variance, which
            # is the "tf-fused" convention.
            statistics["exponential_avg_factor"] = running.momentum
    output, running_mean, running_var = FUSED_BATCH_NORM(
        expanded,
        scale,
        offset,
        epsilon=eps,
        data_format=data_format,
        **statistics,
    )
    if rank == 3:
        output = tf.reshape(output, x.shape)
    updated = running is not None and running.training
    # FusedBatchNormV3 declares epsilon as a float attribute, which is float32.
    return Computed(
        output,
        gamma,
        beta,
        eps=float(np.float32(eps)),
        running_mean=running_mean if updated else None,
        running_var=running_var if updated else None,
    )


# The execution modes besides the default, eager one, each as the jit_compile
# argument of tf.function. "function" runs the traced graph with TensorFlow's
# graph optimizations (Grappler) and without XLA, and "xla" compiles the whole
# graph with XLA. TensorFlow 2.21.0's XLA on the CPU compiles every
# implementation here in every dtype that its default mode runs, for ranks 3 to
# 5 in both layouts, with first and second derivatives and running statistics.
# NOTE: neither mode has run on a GPU.
EXECUTION_MODES = {"function": False, "xla": True}

# The contents of the compiled modes' tf.function, appended to each
# implementation's description.
COMPILED_SCOPE = (
    ". In the modes function (tf.function with jit_compile=False) and xla "
    "(jit_compile=True), one traced function per input signature contains the "
    "forward, its GradientTape gradients of x, gamma and beta, and for a "
    "second-order request the outer tape"
)
KERAS_COMPILED_SCOPE = (
    COMPILED_SCOPE + ". The layer and its variables are created outside that "
    "function, which assigns gamma and beta to the weights and calls the layer"
)


# Repeated backward: "repeat" is K gradient calls on one persistent tape. A tape
# keeps no gradient buffers, so "accumulate" uses Keras's: an optimizer built with
# gradient_accumulation_steps keeps one accumulator variable per trainable
# variable and adds each applied gradient into it (see _Computation._accumulated).


IMPLEMENTATIONS: dict[str, tuple[Implementation, Forward]] = {
    "keras-group-norm": (
        Implementation(
            "keras-group-norm",
            "keras.layers.GroupNormalization(groups=C, axis=-1) with a dtype policy "
            "of the tested dtype (the layer computes float16 and bfloat16 input in "
            "float32 and rounds the output); channels-first input is transposed to "
            "(N, ..., C) by the adapter and the output transposed back"
            + KERAS_COMPILED_SCOPE,
            layouts=BOTH_LAYOUTS,
            second_order=True,
            execution_modes=tuple(EXECUTION_MODES),
            backward_schemes=BACKWARD_SCHEMES,
            running_stats_reason=(
                "Keras 3.15.1 has no InstanceNorm layer, and its GroupNormalization "
                "keeps no moving statistics: its only weights are gamma and beta"
            ),
        ),
        _keras_group_norm,
    ),
    "moments": (
        Implementation(
            "moments",
            "tf.nn.moments over the spatial axes (keepdims) followed by "
            "tf.nn.batch_normalization" + COMPILED_SCOPE,
            layouts=BOTH_LAYOUTS,
            second_order=True,
            execution_modes=tuple(EXECUTION_MODES),
            backward_schemes=BACKWARD_SCHEMES,
            running_stats_reason=(
                "tf.nn.moments and tf.nn.batch_normalization keep no state, and "
                "TensorFlow 2.21.0 has no InstanceNorm op with running statistics"
            ),
        ),
        _moments,
    ),
    "fused-batch-norm-reshape": (
        Implementation(
            "fused-batch-norm-reshape",
            f"{FUSED_BATCH_NORM_NAME} in training mode on the (1, N*C, ...) "
            "reshape with gamma and beta tiled N times (data_format NCHW or NCDHW; "
            "channels-last input is transposed to (..., N, C) by the adapter and "
            "runs as NHWC or NDHWC; rank-3 input gets a trailing spatial axis of 1)"
            + COMPILED_SCOPE,
            layouts=BOTH_LAYOUTS,
            second_order=True,
            execution_modes=tuple(EXECUTION_MODES),
            backward_schemes=BACKWARD_SCHEMES,
            running_stats_reason=(
                "FusedBatchNormV3 on the (1, N*C, ...) reshape updates one running "
                "value per (n, c) slice, not per channel, and TensorFlow 2.21.0 has "
                "no InstanceNorm op that keeps per-channel running statistics"
            ),
        ),
        _fused_batch_norm_reshape,
    ),
    "group_norm.keras": (
        Implementation(
            "group_norm.keras",
            "keras.layers.GroupNormalization(groups=G, axis=1 for channels-first or "
            "-1 for channels-last input, epsilon=eps) with a dtype policy of the "
            "tested dtype and center and scale off when affine is off; gamma and "
            "beta are assigned to its weights (the layer computes float16 and "
            "bfloat16 input in float32 and rounds the output)" + KERAS_COMPILED_SCOPE,
            layouts=BOTH_LAYOUTS,
            second_order=True,
            execution_modes=tuple(EXECUTION_MODES),
            backward_schemes=BACKWARD_SCHEMES,
            operator="group_norm",
        ),
        _group_norm_keras,
    ),
    "layer_norm.keras": (
        Implementation(
            "layer_norm.keras",
            "keras.layers.LayerNormalization(axis=[the last normalized_ndim axes], "
            "epsilon=eps) with a dtype policy of the tested dtype and center and "
            "scale off when affine is off; gamma and beta are assigned to its "
            "weights (the layer computes float16 and bfloat16 input in float32 "
            "and rounds the output)" + KERAS_COMPILED_SCOPE,
            operator="layer_norm",
            second_order=True,
            execution_modes=tuple(EXECUTION_MODES),
            backward_schemes=BACKWARD_SCHEMES,
        ),
        _layer_norm_keras,
    ),
    "batch_norm.keras": (
        Implementation(
            "batch_norm.keras",
            "keras.layers.BatchNormalization(axis=1 for channels-first or -1 for "
            "channels-last input, epsilon=eps) called with training=True, with a "
            "dtype policy of the tested dtype and center and scale off when "
            "affine is off; gamma and beta are assigned to its weights (the layer "
            "computes float16 and bfloat16 input in float32 and rounds the "
            "output). With running statistics: momentum=momentum, the statistics "
            "assigned to moving_mean and moving_variance, and training=True for "
            "a training step or training=False for inference" + KERAS_COMPILED_SCOPE,
            layouts=BOTH_LAYOUTS,
            second_order=True,
            execution_modes=tuple(EXECUTION_MODES),
            backward_schemes=BACKWARD_SCHEMES,
            operator="batch_norm",
            running_stats="keras",
        ),
        _batch_norm_keras,
    ),
    "batch_norm.moments": (
        Implementation(
            "batch_norm.moments",
            "tf.nn.moments over the batch and spatial axes (keepdims) followed by "
            "tf.nn.batch_normalization" + COMPILED_SCOPE,
            layouts=BOTH_LAYOUTS,
            second_order=True,
            execution_modes=tuple(EXECUTION_MODES),
            backward_schemes=BACKWARD_SCHEMES,
            operator="batch_norm",
            running_stats_reason=(
                "tf.nn.moments returns the batch's statistics and keeps no state, so "
                "in TensorFlow 2.21.0 any running update would be the adapter's "
                "arithmetic rather than TensorFlow's"
            ),
        ),
        _batch_norm_moments,
    ),
    "batch_norm.fused": (
        Implementation(
            "batch_norm.fused",
            f"{FUSED_BATCH_NORM_NAME}(epsilon=eps, is_training=True) with "
            "data_format NCHW or NCDHW for channels-first and NHWC or NDHWC for "
            "channels-last input, ones and zeros for scale and offset when affine "
            "is off; rank-3 input gets a spatial axis of size 1. With running "
            "statistics (in float32 for float16 and bfloat16 input): mean and "
            "variance, and exponential_avg_factor=momentum for a training step "
            "or is_training=False for inference" + COMPILED_SCOPE,
            layouts=BOTH_LAYOUTS,
            second_order=True,
            execution_modes=tuple(EXECUTION_MODES),
            backward_schemes=BACKWARD_SCHEMES,
            operator="batch_norm",
            running_stats="tf-fused",
        ),
        _batch_norm_fused,
    ),
}

FUSED_FLOAT64_REASON = (
    "FusedBatchNormV3 accepts x in float16, bfloat16 and float32 only: float64 "
    f"raises InvalidArgumentError in TensorFlow {tf.__version__} (its type "
    "attributes T and U do not allow double)"
)


def _tf_device(name: str) -> str:
    """Map a normconf device name ("cpu", "gpu", "gpu:1") to a TensorFlow one."""
    kind, _, index = name.partition(":")
    return f"/{kind.upper()}:{index or 0}"


def _to_numpy(tensor: tf.Tensor | tf.Variable | None) -> np.ndarray | None:
    if tensor is None:
        return None
    if tensor.dtype == tf.bfloat16:
        # NumPy has no bfloat16, but float32 represents every bfloat16 value exactly.
        tensor = tf.cast(tensor, tf.float32)
    return np.array(tensor.numpy())


# The factories of the Keras implementations' layers, called as
# factory(shape, dtype, eps, layout, affine, **operator_arguments).
KERAS_LAYERS = {
    "keras-group-norm": _new_instance_group_norm_layer,
    "group_norm.keras": _new_group_norm_layer,
    "layer_norm.keras": _new_layer_norm_layer,
    "batch_norm.keras": _new_batch_norm_layer,
}

# The number of compiled functions kept. Over the whole catalogue the two compiled
# modes made 2846 traces with 128 entries, as many as a simulation of the suite's
# item order gives for 512 (tensorflow-cpu 2.21.0).
COMPILED_CACHE_SIZE = 128


def _operator_arguments(request: Request) -> dict[str, object]:
    """Return the request fields that the implementation's forward takes as keywords."""
    implementation, _ = IMPLEMENTATIONS[request.implementation]
    if implementation.operator == "group_norm":
        return {"groups": request.groups}
    if implementation.operator == "layer_norm":
        return {"normalized_ndim": request.normalized_ndim}
    return {}


def _input_tensors(request: Request) -> dict[str, tf.Tensor]:
    """Return the request's arrays as tensors of the tested dtype, by the names
    `_Computation` takes, leaving out those the request does not carry."""
    dtype = TF_DTYPES[request.dtype]
    arrays = {
        "x": request.x,
        "gamma": request.gamma,
        "beta": request.beta,
        "grad_output": request.grad_output,
        "running_mean": request.running_mean,
        "running_var": request.running_var,
        "direction": request.grad_grad_input,
        "grad_outputs": request.grad_outputs,
    }
    # bfloat16 values arrive in float32 arrays, so the cast is exact.
    return {
        name: tf.cast(tf.constant(np.asarray(array)), dtype)
        for name, array in arrays.items()
        if array is not None
    }


def _request_layer(request: Request):
    """Return a new built Keras layer for the request's implementation, or None
    for an implementation that is not a Keras layer."""
    new_layer = KERAS_LAYERS.get(request.implementation)
    if new_layer is None:
        return None
    options = _operator_arguments(request)
    if request.running_mean is not None:
        options["momentum"] = request.momentum
    return new_layer(
        request.x.shape,
        TF_DTYPES[request.dtype],
        request.eps,
        request.layout,
        request.affine,
        **options,
    )


class _Computation:
    """The forward of one request's implementation with the requested
    derivatives, as a function of `_input_tensors(request)`.

    Calling it returns a dict of tensors named as Result fields, so that the
    compiled modes can trace it into a tf.function. `eps` and `compute_dtype` are
    the Result fields that do not depend on the values, set by the first call.
    """

    def __init__(self, request: Request, forward: Forward, layer=None):
        self.forward = forward
        self.eps_requested = request.eps
        self.layout = request.layout
        self.arguments = _operator_arguments(request)
        self.scheme = request.backward_scheme
        if layer is None and self.scheme == "accumulate":
            # The steps must share the layer: the optimizer keeps its
            # accumulators per variable.
            layer = _request_layer(request)
        if layer is not None:
            self.arguments["layer"] = layer
        self.running = None
        if request.running_mean is not None:
            self.running = (request.mode == "training", request.momentum)
        self.second_order = request.grad_grad_input is not None
        self.repeated = request.grad_outputs is not None
        self.gradients = request.gradients
        self.eps: float | None = None
        self.compute_dtype: str | None = None

    def __call__(self, inputs: dict[str, tf.Tensor]) -> dict[str, tf.Tensor | None]:
        if self.second_order:
            return self._second_order(inputs)
        if self.scheme == "accumulate":
            return self._accumulated(inputs)
        if self.repeated:
            return self._repeated(inputs)
        return self._first_order(inputs)

    def _forward(self, inputs: dict[str, tf.Tensor]) -> Computed:
        arguments = dict(self.arguments)
        if self.running is not None:
            # The tapes do not watch the statistics, so the gradients of
            # inference hold them constant.
            training, momentum = self.running
            arguments["running"] = Running(
                mean=inputs["running_mean"],
                variance=inputs["running_var"],
                training=training,
                momentum=momentum,
            )
        computed = self.forward(
            inputs["x"],
            inputs.get("gamma"),
            inputs.get("beta"),
            self.eps_requested,
            self.layout,
            **arguments,
        )
        self.eps = computed.eps
        self.compute_dtype = computed.compute_dtype
        return computed

    def _taped_forward(
        self, inputs: dict[str, tf.Tensor], persistent: bool = False
    ) -> tuple[tf.GradientTape, Computed, dict[str, tf.Tensor]]:
        """Run the forward under a gradient tape that watches x, gamma and beta.
        Returns the tape, the computed values, and the sources of the gradients
        that exist, keyed "grad_input", "grad_gamma" and "grad_beta"."""
        with tf.GradientTape(persistent=persistent) as tape:
            for name in ("x", "gamma", "beta"):
                if name in inputs:
                    tape.watch(inputs[name])
            computed = self._forward(inputs)
        # The Keras layers compute with their own gamma and beta variables.
        sources = {
            "grad_input": inputs["x"],
            "grad_gamma": computed.gamma,
            "grad_beta": computed.beta,
        }
        present = {
            name: source for name, source in sources.items() if source is not None
        }
        return tape, computed, present

    def _first_order(self, inputs: dict[str, tf.Tensor]) -> dict[str, tf.Tensor | None]:
        """Run the forward under a gradient tape and return its output, the
        updated running statistics, and the gradients of x, gamma and beta when
        the request sets `gradients`."""
        tape, computed, present = self._taped_forward(inputs)
        outputs = {
            "output": computed.output,
            "running_mean": computed.running_mean,
            "running_var": computed.running_var,
        }
        if not self.gradients:
            return outputs

        gradients = tape.gradient(
            computed.output,
            list(present.values()),
            output_gradients=inputs["grad_output"],
        )
        outputs.update(zip(present, gradients, strict=True))
        return outputs

    def _repeated(self, inputs: dict[str, tf.Tensor]) -> dict[str, tf.Tensor | None]:
        """Run the forward once under a persistent tape and call its gradient once
        per grad_output of inputs["grad_outputs"], the scheme "repeat". Returns
        the output and each gradient's calls, stacked on a first axis."""
        tape, computed, present = self._taped_forward(inputs, persistent=True)
        calls = []
        # The number of calls is the static first dimension of grad_outputs, so a
        # traced function unrolls this loop into that many gradient graphs.
        for call in range(inputs["grad_outputs"].shape[0]):
            calls.append(
                tape.gradient(
                    computed.output,
                    list(present.values()),
                    output_gradients=inputs["grad_outputs"][call],
                )
            )
        del tape

        outputs: dict[str, tf.Tensor | None] = {"output": computed.output}
        for index, name in enumerate(present):
            outputs[f"{name}_steps"] = tf.stack(
                [gradients[index] for gradients in calls]
            )
        return outputs

    def _accumulated(self, inputs: dict[str, tf.Tensor]) -> dict[str, tf.Tensor | None]:
        """Run the scheme "accumulate": K forward and backward steps, whose
        gradients a Keras optimizer adds into its accumulators. Return the
        output of the last step and the accumulators after each step, stacked.

        The optimizer accumulates the gradients of variables only, so x, gamma
        and beta become Keras variables. A Keras layer differentiates its own
        gamma and beta variables instead. It is built with
        gradient_accumulation_steps = K + 1, so the K steps only add: the update
        step, which would change the variables and reset the accumulators, never
        comes."""
        calls = inputs["grad_outputs"].shape[0]
        variables = {
            name: keras.Variable(inputs[name], dtype=inputs[name].dtype.name, name=name)
            for name in ("x", "gamma", "beta")
            if name in inputs
        }
        stepped = {**inputs, **{name: v.value for name, v in variables.items()}}
        sources_of = {"grad_input": "x", "grad_gamma": "gamma", "grad_beta": "beta"}
        optimizer = keras.optimizers.SGD(gradient_accumulation_steps=calls + 1)
        steps: dict[str, list[tf.Tensor]] = {}
        accumulators: list = []
        for call in range(calls):
            tape, computed, present = self._taped_forward(stepped)
            gradients = tape.gradient(
                computed.output,
                list(present.values()),
                output_gradients=inputs["grad_outputs"][call],
            )
            targets = [
                source
                if isinstance(source, keras.Variable)
                else variables[sources_of[name]]
                for name, source in present.items()
            ]
            if not accumulators:
                optimizer.build(targets)
                # Keras 3.15.1 names each accumulator after its variable, and
                # creates them in the order of the variables it is built with.
                accumulators = [
                    v
                    for v in optimizer.variables
                    if v.path.endswith("_gradient_accumulator")
                ]
                if len(accumulators) != len(targets):
                    raise RuntimeError(
                        f"the Keras optimizer made {len(accumulators)} gradient "
                        f"accumulators for {len(targets)} variables"
                    )
            optimizer.apply_gradients(zip(gradients, targets, strict=True))
            for name, accumulator in zip(present, accumulators, strict=True):
                # Reading the variable returns a tensor that later steps leave.
                steps.setdefault(name, []).append(tf.identity(accumulator.value))

        outputs: dict[str, tf.Tensor | None] = {"output": computed.output}
        for name, stack in steps.items():
            outputs[f"{name}_steps"] = tf.stack(stack)
        return outputs

    def _second_order(
        self, inputs: dict[str, tf.Tensor]
    ) -> dict[str, tf.Tensor | None]:
        """Differentiate grad_input along v = inputs["direction"].

        An inner tape computes grad_input from x and grad_output, and an outer tape
        records that computation and returns the gradients of sum(v * grad_input)
        with respect to x, gamma and grad_output. The forward runs under both.
        """
        x, grad_output = inputs["x"], inputs["grad_output"]
        parameters = [inputs[name] for name in ("gamma", "beta") if name in inputs]
        with tf.GradientTape() as outer:
            outer.watch([x, grad_output, *parameters])
            with tf.GradientTape() as inner:
                inner.watch([x, *parameters])
                computed = self._forward(inputs)
            grad_input = inner.gradient(
                computed.output, x, output_gradients=grad_output
            )
            loss = tf.reduce_sum(inputs["direction"] * grad_input)
        # The Keras layers compute with their own gamma variable, which both tapes
        # watch because it is trainable.
        sources = [x, grad_output]
        if computed.gamma is not None:
            sources.append(computed.gamma)
        # An input that grad_input does not depend on gets zeros, not None.
        second = outer.gradient(
            loss, sources, unconnected_gradients=tf.UnconnectedGradients.ZERO
        )
        return {
            "output": computed.output,
            "grad_input": grad_input,
            "grad2_input": second[0],
            "grad2_grad_output": second[1],
            "grad2_gamma": second[2] if computed.gamma is not None else None,
        }


class _CompiledComputation:
    """A `_Computation` traced into one tf.function whose input_signature fixes
    every input's shape and dtype, so that it traces once: a call with another
    shape raises instead of retracing."""

    def __init__(
        self, request: Request, forward: Forward, inputs: dict[str, tf.Tensor]
    ):
        # Keras creates the layer's variables here, outside the traced function,
        # because tf.function creates variables on its first trace only and keeps
        # no reference to them. self.layer keeps them.
        layer = _request_layer(request)
        self.layer = layer
        self.computation = _Computation(request, forward, layer)
        signature = {
            name: tf.TensorSpec(tensor.shape, tensor.dtype)
            for name, tensor in inputs.items()
        }
        self.function = tf.function(
            self.computation,
            input_signature=[signature],
            jit_compile=EXECUTION_MODES[request.execution_mode],
        )

    @property
    def eps(self) -> float | None:
        return self.computation.eps

    @property
    def compute_dtype(self) -> str | None:
        return self.computation.compute_dtype

    def tracing_count(self) -> int:
        return self.function.experimental_get_tracing_count()


class _CompiledCache:
    """The compiled computations of the most recently used request signatures.

    A signature is everything a traced function fixes: the implementation, mode,
    device, dtype, layout, eps, the operator's arguments, running-statistics
    options, the derivatives requested and every input's shape. Catalogue cases
    that share one reuse the traced and compiled function.
    """

    def __init__(self, maxsize: int):
        self.maxsize = maxsize
        self.entries: OrderedDict[tuple, _CompiledComputation] = OrderedDict()
        self.hits = 0
        self.misses = 0
        # The traces of the entries already evicted.
        self.evicted_traces = 0

    def call(
        self, request: Request, forward: Forward, inputs: dict[str, tf.Tensor]
    ) -> tuple[_CompiledComputation, dict[str, tf.Tensor | None]]:
        """Call the compiled computation of the request's signature on `inputs`,
        compiling it first if it is not cached. Returns it with its outputs."""
        key = _signature(request, inputs)
        computation = self.entries.get(key)
        if computation is None:
            self.misses += 1
            computation = _CompiledComputation(request, forward, inputs)
            self.entries[key] = computation
            if len(self.entries) > self.maxsize:
                _, evicted = self.entries.popitem(last=False)
                self.evicted_traces += evicted.tracing_count()
        else:
            self.hits += 1
            self.entries.move_to_end(key)
        try:
            return computation, computation.function(inputs)
        except Exception:
            # A function that failed to trace or compile is not kept.
            del self.entries[key]
            self.evicted_traces += computation.tracing_count()
            raise

    def info(self) -> dict[str, int]:
        """Return the hits, misses and traces so far, and the current size."""
        traces = self.evicted_traces + sum(
            entry.tracing_count() for entry in self.entries.values()
        )
        return {
            "hits": self.hits,
            "misses": self.misses,
            "traces": traces,
            "size": len(self.entries),
        }


def _signature(request: Request, inputs: dict[str, tf.Tensor]) -> tuple:
    """Return the key under which _CompiledCache keeps the request's function."""
    running = None
    if request.running_mean is not None:
        running = (request.mode, request.momentum)
    return (
        request.implementation,
        request.execution_mode,
        request.device,
        request.dtype,
        request.layout,
        request.eps,
        tuple(sorted(_operator_arguments(request).items())),
        running,
        request.gradients,
        tuple((name, tuple(tensor.shape)) for name, tensor in inputs.items()),
    )


COMPILED = _CompiledCache(maxsize=COMPILED_CACHE_SIZE)


class TensorFlowAdapter(Adapter):
    contract_version = CONTRACT_VERSION
    framework = "tensorflow"

    def version(self) -> str:
        return tf.__version__

    def implementations(self) -> Sequence[Implementation]:
        return [implementation for implementation, _ in IMPLEMENTATIONS.values()]

    def math_modes(self) -> dict[str, object]:
        # On by default: float32 matrix multiplications and convolutions on GPUs
        # with tensor cores then run in TF32.
        return {
            "tf.config.experimental.tensor_float_32_execution_enabled()": (
                tf.config.experimental.tensor_float_32_execution_enabled()
            )
        }

    def devices(self) -> Sequence[Device]:
        # NOTE: the GPU path has never run: normconf's TensorFlow adapter was
        # measured with tensorflow-cpu only.
        devices = [Device("cpu")]
        gpus = tf.config.list_physical_devices("GPU")
        if not gpus:
            reason = (
                f"tensorflow {tf.__version__} sees no GPU "
                f"(tf.config.list_physical_devices('GPU') returned [], built with "
                f"CUDA: {tf.test.is_built_with_cuda()})"
            )
            devices.append(Device("gpu", available=False, reason=reason))
            return devices
        for index in range(len(gpus)):
            devices.append(Device("gpu" if index == 0 else f"gpu:{index}"))
        return devices

    def unsupported_reason(
        self, implementation: str, device: str, dtype: str
    ) -> str | None:
        fused = ("fused-batch-norm-reshape", "batch_norm.fused")
        if implementation in fused and dtype == "float64":
            return FUSED_FLOAT64_REASON
        return None

    def run(self, request: Request) -> Result:
        _, forward = IMPLEMENTATIONS[request.implementation]
        if (
            request.backward_scheme == "accumulate"
            and request.execution_mode != DEFAULT_MODE
        ):
            # The suite sends none: the optimizer creates variables, which a
            # traced function does not allow after its first trace.
            raise ValueError(
                "the accumulate scheme runs in the default execution mode only, "
                f"not in {request.execution_mode!r}"
            )

        # Without soft placement, an op with no kernel on the requested device
        # raises instead of silently running on the CPU.
        soft_placement = tf.config.get_soft_device_placement()
        tf.config.set_soft_device_placement(False)
        try:
            with tf.device(_tf_device(request.device)):
                inputs = _input_tensors(request)
                if request.execution_mode == DEFAULT_MODE:
                    computation = _Computation(request, forward)
                    outputs = computation(inputs)
                else:
                    computation, outputs = COMPILED.call(request, forward, inputs)
        except (tf.errors.OpError, ValueError) as error:
            # TensorFlow's runtime errors are OpError subclasses, and Keras raises
            # ValueError for input it does not accept. Anything else is an adapter bug.
            raise Rejected(f"{type(error).__name__}: {error}") from error
        finally:
            tf.config.set_soft_device_placement(soft_placement)

        return Result(
            **{name: _to_numpy(value) for name, value in outputs.items()},
            dtype=outputs["output"].dtype.name,
            eps=computation.eps,
            compute_dtype=computation.compute_dtype,
        )
