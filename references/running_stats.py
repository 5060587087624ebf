"""Float64 running statistics of BatchNorm and InstanceNorm, and inference with them.

A training step updates a running mean and variance per channel from the batch. The
frameworks agree on the form, an exponential moving average, and differ in two
conventions, which this module takes as data (CONVENTIONS) instead of tolerating
the difference:

- which value `momentum` weights: the new batch statistic
  (running = (1 - momentum) * running + momentum * batch), or the old running value
  (running = momentum * running + (1 - momentum) * batch);
- which variance is stored: the biased one (divided by M) or the unbiased one
  (divided by M - 1), M being the number of elements per channel.

InstanceNorm with running statistics (torch's track_running_stats) computes the
statistics per (n, c) slice and feeds their average over the batch to the update.
Inference normalizes with the running statistics in place of the batch's.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

from references import normalization
from references.instance_norm import Expected


@dataclass(frozen=True)
class Convention:
    """A framework's rule for updating running statistics."""

    momentum_weights_new: bool
    unbiased_variance: bool
    default_momentum: float


# Measured with a training step on (4, 2, 5) input and known running values
# (docs/running-statistics.md gives the scripts): torch 2.13.0 BatchNorm1d and
# InstanceNorm1d, Keras 3.15.1 BatchNormalization on TensorFlow 2.21.0, MXNet 1.9.1
# gluon.nn.BatchNorm, ONNX Runtime 1.31.1 BatchNormalization (opset 15,
# training_mode = 1), and TensorFlow 2.21.0's tf.compat.v1.nn.fused_batch_norm
# (FusedBatchNormV3), whose exponential_avg_factor weights the new value and
# whose batch variance output is the unbiased one.
CONVENTIONS = {
    "torch": Convention(True, True, 0.1),
    "keras": Convention(False, False, 0.99),
    "mxnet": Convention(False, False, 0.9),
    "onnx": Convention(False, False, 0.9),
    "tf-fused": Convention(True, True, 1.0),
}


@dataclass(frozen=True)
class RunningUpdate:
    """The running statistics after one training step, per channel."""

    mean: np.ndarray
    var: np.ndarray


def update(
    running_mean: np.ndarray,
    running_var: np.ndarray,
    batch_mean: np.ndarray,
    batch_var: np.ndarray,
    count: int,
    momentum: float,
    convention: Convention,
) -> RunningUpdate:
    """Return the running statistics after one step, given the batch's mean and its
    biased variance over `count` elements per channel."""
    running_mean = normalization.as_float64(running_mean)
    running_var = normalization.as_float64(running_var)
    variance = normalization.as_float64(batch_var)
    if convention.unbiased_variance:
        # A single element has no unbiased variance: M / (M - 1) is infinite, and
        # the stored value becomes inf or NaN.
        with np.errstate(divide="ignore", invalid="ignore"):
            variance = variance * (count / np.float64(count - 1))
    new_weight = momentum if convention.momentum_weights_new else 1.0 - momentum
    return RunningUpdate(
        mean=(1.0 - new_weight) * running_mean + new_weight * batch_mean,
        var=(1.0 - new_weight) * running_var + new_weight * variance,
    )


def unchanged(running_mean: np.ndarray, running_var: np.ndarray) -> RunningUpdate:
    """Return the running statistics as they were, in float64."""
    return RunningUpdate(
        mean=normalization.as_float64(running_mean).copy(),
        var=normalization.as_float64(running_var).copy(),
    )


def batch_norm_step(
    x: np.ndarray,
    running_mean: np.ndarray,
    running_var: np.ndarray,
    momentum: float,
    convention: Convention,
) -> RunningUpdate:
    """Return BatchNorm's running statistics after a training step on x, shaped
    (N, C, *spatial): the statistics are taken per channel over every other axis.
    An empty batch has no statistics to contribute and leaves them as they were."""
    x = normalization.as_float64(x)
    if x.size == 0:
        return unchanged(running_mean, running_var)
    axes = normalization.parameter_axes(x.ndim)
    stats = normalization.statistics(x, 0.0, axes)
    count = normalization.reduction_length(x.shape, axes)
    return update(
        running_mean,
        running_var,
        stats.mean.reshape(-1),
        stats.var.reshape(-1),
        count,
        momentum,
        convention,
    )


def instance_norm_step(
    x: np.ndarray,
    running_mean: np.ndarray,
    running_var: np.ndarray,
    momentum: float,
    convention: Convention,
) -> RunningUpdate:
    """Return InstanceNorm's running statistics after a training step on x: each
    (n, c) slice's mean and variance, averaged over the batch, update the running
    values of channel c. An empty batch leaves them as they were."""
    x = normalization.as_float64(x)
    if x.size == 0:
        return unchanged(running_mean, running_var)
    axes = tuple(range(2, x.ndim))
    stats = normalization.statistics(x, 0.0, axes)
    count = normalization.reduction_length(x.shape, axes)
    channels = x.shape[normalization.CHANNEL_AXIS]
    slice_mean = stats.mean.reshape(x.shape[0], channels)
    slice_var = stats.var.reshape(x.shape[0], channels)
    if convention.unbiased_variance:
        # Made unbiased per slice, before the average over the batch.
        with np.errstate(divide="ignore", invalid="ignore"):
            slice_var = slice_var * (count / np.float64(count - 1))
        convention = dataclasses.replace(convention, unbiased_variance=False)
    return update(
        running_mean,
        running_var,
        slice_mean.mean(axis=0),
        slice_var.mean(axis=0),
        count,
        momentum,
        convention,
    )


def inference(
    x: np.ndarray,
    gamma: np.ndarray | None,
    beta: np.ndarray | None,
    grad_output: np.ndarray,
    running_mean: np.ndarray,
    running_var: np.ndarray,
    eps: float,
) -> Expected:
    """Return the output and gradients of normalization with fixed per-channel
    statistics, as BatchNorm and InstanceNorm compute in inference mode.

    The statistics do not depend on x, so the input gradient is gamma * rstd * dy.
    `mean` and `rstd` of the result are the running ones, shaped to broadcast.
    """
    x = normalization.as_float64(x)
    dy = normalization.as_float64(grad_output)
    channels = x.shape[normalization.CHANNEL_AXIS]
    affine = gamma is not None
    gamma = np.ones(channels) if gamma is None else gamma
    beta = np.zeros(channels) if beta is None else beta
    mean = normalization.broadcast_parameter(running_mean, x.ndim)
    with np.errstate(divide="ignore", invalid="ignore"):
        rstd = 1.0 / np.sqrt(
            normalization.broadcast_parameter(running_var, x.ndim) + eps
        )
        xhat = (x - mean) * rstd
        gamma_b = normalization.broadcast_parameter(gamma, x.ndim)
        output = gamma_b * xhat + normalization.broadcast_parameter(beta, x.ndim)
        shared = normalization.parameter_axes(x.ndim)
        return Expected(
            output=output,
            grad_input=gamma_b * rstd * dy,
            grad_gamma=np.sum(dy * xhat, axis=shared) if affine else None,
            grad_beta=np.sum(dy, axis=shared) if affine else None,
            mean=mean,
            rstd=rstd,
            xhat=xhat,
        )
