"""TensorFlow adapter: InstanceNorm three ways, GroupNorm and LayerNorm through Keras,
and BatchNorm in training mode three ways, with gradients through tf.GradientTape
and second derivatives through two nested tapes. The Keras and fused BatchNorm
implementations also take running statistics: a training step that updates them,
or inference that normalizes with them.

Written against TensorFlow 2.21 with Keras 3 on its TensorFlow backend. Everything
runs eagerly (no tf.function), pinned to the requested device with tf.device.
"""

from __future__ import annotations

import os
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
    CONTRACT_VERSION,
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


def _keras_group_norm(x, gamma, beta, eps, layout):
    channels_first = layout == CHANNELS_FIRST
    if channels_first:
        x = _to_channels_last(x)
    # The layer's dtype policy is the tested dtype. Under the default float32 policy
    # Keras 3.15.1 returns float32 for float64 input (call() casts its result to the
    # compute dtype).
    layer = keras.layers.GroupNormalization(
        groups=x.shape[-1],
        axis=-1,
        epsilon=eps,
        center=beta is not None,
        scale=gamma is not None,
        dtype=x.dtype.name,
    )
    layer.build(x.shape)
    if gamma is not None:
        layer.gamma.assign(gamma)
    if beta is not None:
        layer.beta.assign(beta)
    output = layer(x)
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
    """Build `layer` for x, set its gamma and beta weights (and its moving mean
    and variance from `running`), and call it on x."""
    layer.build(x.shape)
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


def _group_norm_keras(x, gamma, beta, eps, layout, *, groups):
    # Each Keras layer gets the tested dtype as its dtype policy, because under the
    # default float32 policy Keras 3.15.1 returns float32 for float64 input.
    layer = keras.layers.GroupNormalization(
        groups=groups,
        axis=_channel_axis(layout),
        epsilon=eps,
        center=beta is not None,
        scale=gamma is not None,
        dtype=x.dtype.name,
    )
    output = _call_keras_layer(layer, x, gamma, beta)
    return Computed(
        output, layer.gamma, layer.beta, compute_dtype=_keras_compute_dtype(x)
    )


def _layer_norm_keras(x, gamma, beta, eps, layout, *, normalized_ndim):
    rank = x.shape.rank
    layer = keras.layers.LayerNormalization(
        axis=list(range(rank - normalized_ndim, rank)),
        epsilon=eps,
        center=beta is not None,
        scale=gamma is not None,
        dtype=x.dtype.name,
    )
    output = _call_keras_layer(layer, x, gamma, beta)
    return Computed(
        output, layer.gamma, layer.beta, compute_dtype=_keras_compute_dtype(x)
    )


def _batch_norm_keras(x, gamma, beta, eps, layout, running: Running | None = None):
    # Without `running`, training=True normalizes with the batch's statistics and
    # the layer updates its default moving mean and variance, which the adapter
    # discards with the layer.
    options = {} if running is None else {"momentum": running.momentum}
    layer = keras.layers.BatchNormalization(
        axis=_channel_axis(layout),
        epsilon=eps,
        center=beta is not None,
        scale=gamma is not None,
        dtype=x.dtype.name,
        **options,
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


IMPLEMENTATIONS: dict[str, tuple[Implementation, Forward]] = {
    "keras-group-norm": (
        Implementation(
            "keras-group-norm",
            "keras.layers.GroupNormalization(groups=C, axis=-1) with a dtype policy "
            "of the tested dtype (the layer computes float16 and bfloat16 input in "
            "float32 and rounds the output); channels-first input is transposed to "
            "(N, ..., C) by the adapter and the output transposed back",
            layouts=BOTH_LAYOUTS,
            second_order=True,
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
            "tf.nn.batch_normalization",
            layouts=BOTH_LAYOUTS,
            second_order=True,
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
            "runs as NHWC or NDHWC; rank-3 input gets a trailing spatial axis of 1)",
            layouts=BOTH_LAYOUTS,
            second_order=True,
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
            "bfloat16 input in float32 and rounds the output)",
            layouts=BOTH_LAYOUTS,
            second_order=True,
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
            "and rounds the output)",
            operator="layer_norm",
            second_order=True,
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
            "a training step or training=False for inference",
            layouts=BOTH_LAYOUTS,
            second_order=True,
            operator="batch_norm",
            running_stats="keras",
        ),
        _batch_norm_keras,
    ),
    "batch_norm.moments": (
        Implementation(
            "batch_norm.moments",
            "tf.nn.moments over the batch and spatial axes (keepdims) followed by "
            "tf.nn.batch_normalization",
            layouts=BOTH_LAYOUTS,
            second_order=True,
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
            "or is_training=False for inference",
            layouts=BOTH_LAYOUTS,
            second_order=True,
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


def _operator_arguments(request: Request) -> dict[str, object]:
    """Return the request fields that the implementation's forward takes as keywords."""
    implementation, _ = IMPLEMENTATIONS[request.implementation]
    if implementation.operator == "group_norm":
        return {"groups": request.groups}
    if implementation.operator == "layer_norm":
        return {"normalized_ndim": request.normalized_ndim}
    return {}


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
        dtype = TF_DTYPES[request.dtype]
        want = request.gradients

        # Without soft placement, an op with no kernel on the requested device
        # raises instead of silently running on the CPU.
        soft_placement = tf.config.get_soft_device_placement()
        tf.config.set_soft_device_placement(False)
        try:
            with tf.device(_tf_device(request.device)):
                if request.grad_grad_input is not None:
                    return self._second_order(forward, request, dtype)
                computed, gradients = self._compute(forward, request, dtype, want)
        except (tf.errors.OpError, ValueError) as error:
            # TensorFlow's runtime errors are OpError subclasses, and Keras raises
            # ValueError for input it does not accept. Anything else is an adapter bug.
            raise Rejected(f"{type(error).__name__}: {error}") from error
        finally:
            tf.config.set_soft_device_placement(soft_placement)

        output = computed.output
        grad_input, grad_gamma, grad_beta = gradients
        return Result(
            output=_to_numpy(output),
            grad_input=_to_numpy(grad_input),
            grad_gamma=_to_numpy(grad_gamma),
            grad_beta=_to_numpy(grad_beta),
            dtype=output.dtype.name,
            eps=computed.eps,
            compute_dtype=computed.compute_dtype,
            running_mean=_to_numpy(computed.running_mean),
            running_var=_to_numpy(computed.running_var),
        )

    @staticmethod
    def _compute(forward: Forward, request: Request, dtype: tf.DType, want: bool):
        """Run `forward` under a gradient tape and return its result with the
        gradients of x, gamma and beta (all None when request.gradients is False)."""

        def tensor(array: np.ndarray | None) -> tf.Tensor | None:
            if array is None:
                return None
            # bfloat16 values arrive in float32 arrays, so the cast is exact.
            return tf.cast(tf.constant(np.asarray(array)), dtype)

        x = tensor(request.x)
        gamma = tensor(request.gamma)
        beta = tensor(request.beta)
        arguments = _operator_arguments(request)
        if request.running_mean is not None:
            # The tape does not watch the statistics, so the gradients of
            # inference hold them constant.
            arguments["running"] = Running(
                mean=tensor(request.running_mean),
                variance=tensor(request.running_var),
                training=request.mode == "training",
                momentum=request.momentum,
            )
        with tf.GradientTape() as tape:
            for watched in (x, gamma, beta):
                if watched is not None:
                    tape.watch(watched)
            computed = forward(x, gamma, beta, request.eps, request.layout, **arguments)
        if not want:
            return computed, (None, None, None)

        sources = {"x": x, "gamma": computed.gamma, "beta": computed.beta}
        present = {
            name: source for name, source in sources.items() if source is not None
        }
        grads = tape.gradient(
            computed.output,
            list(present.values()),
            output_gradients=tensor(request.grad_output),
        )
        by_name = dict(zip(present, grads, strict=True))
        return computed, (by_name.get("x"), by_name.get("gamma"), by_name.get("beta"))

    @staticmethod
    def _second_order(forward: Forward, request: Request, dtype: tf.DType) -> Result:
        """Differentiate grad_input along v = request.grad_grad_input.

        An inner tape computes grad_input from x and grad_output, and an outer tape
        records that computation and returns the gradients of sum(v * grad_input)
        with respect to x, gamma and grad_output. The forward runs under both.
        """

        def tensor(array: np.ndarray | None) -> tf.Tensor | None:
            if array is None:
                return None
            return tf.cast(tf.constant(np.asarray(array)), dtype)

        x = tensor(request.x)
        gamma = tensor(request.gamma)
        beta = tensor(request.beta)
        grad_output = tensor(request.grad_output)
        direction = tensor(request.grad_grad_input)
        with tf.GradientTape() as outer:
            outer.watch([x, grad_output])
            if gamma is not None:
                outer.watch([gamma, beta])
            with tf.GradientTape() as inner:
                inner.watch(x)
                if gamma is not None:
                    inner.watch([gamma, beta])
                computed = forward(
                    x,
                    gamma,
                    beta,
                    request.eps,
                    request.layout,
                    **_operator_arguments(request),
                )
            grad_input = inner.gradient(
                computed.output, x, output_gradients=grad_output
            )
            loss = tf.reduce_sum(direction * grad_input)
        # The Keras layers compute with their own gamma variable, which both tapes
        # watch because it is trainable.
        sources = [x, grad_output]
        if computed.gamma is not None:
            sources.append(computed.gamma)
        # An input that grad_input does not depend on gets zeros, not None.
        second = outer.gradient(
            loss, sources, unconnected_gradients=tf.UnconnectedGradients.ZERO
        )
        output = computed.output
        return Result(
            output=_to_numpy(output),
            grad_input=_to_numpy(grad_input),
            dtype=output.dtype.name,
            eps=computed.eps,
            compute_dtype=computed.compute_dtype,
            grad2_input=_to_numpy(second[0]),
            grad2_gamma=_to_numpy(second[2]) if computed.gamma is not None else None,
            grad2_grad_output=_to_numpy(second[1]),
        )
