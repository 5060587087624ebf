"""Each framework's running-statistics update against references.running_stats.

One test per framework, each skipped where the framework is not installed; every
framework's tox environment runs its own. The input is float32, so the comparison
allows float32 rounding.
"""

from __future__ import annotations

import os

import numpy as np
import pytest

from references.running_stats import CONVENTIONS, batch_norm_step, instance_norm_step

OLD_MEAN = np.array([1.0, -1.0], dtype=np.float32)
OLD_VAR = np.array([2.0, 0.5], dtype=np.float32)
RTOL = 1e-5


def inputs() -> np.ndarray:
    """Return a float32 (4, 2, 5) batch with mean 3 and spread 2."""
    return np.random.default_rng(0).normal(3.0, 2.0, size=(4, 2, 5)).astype(np.float32)


def test_torch_batch_and_instance_norm():
    torch = pytest.importorskip("torch")
    x = inputs()
    for module, step in (
        (torch.nn.BatchNorm1d(2, momentum=0.1), batch_norm_step),
        (
            torch.nn.InstanceNorm1d(2, momentum=0.1, track_running_stats=True),
            instance_norm_step,
        ),
    ):
        with torch.no_grad():
            module.running_mean.copy_(torch.from_numpy(OLD_MEAN))
            module.running_var.copy_(torch.from_numpy(OLD_VAR))
        module.train()
        module(torch.from_numpy(x))
        expected = step(x, OLD_MEAN, OLD_VAR, 0.1, CONVENTIONS["torch"])
        np.testing.assert_allclose(
            module.running_mean.numpy(), expected.mean, rtol=RTOL
        )
        np.testing.assert_allclose(module.running_var.numpy(), expected.var, rtol=RTOL)


def test_keras_batch_normalization():
    os.environ.setdefault("KERAS_BACKEND", "tensorflow")
    keras = pytest.importorskip("keras")
    x = inputs()
    layer = keras.layers.BatchNormalization(axis=1, momentum=0.99)
    layer.build(x.shape)
    layer.moving_mean.assign(OLD_MEAN)
    layer.moving_variance.assign(OLD_VAR)
    layer(x, training=True)
    expected = batch_norm_step(x, OLD_MEAN, OLD_VAR, 0.99, CONVENTIONS["keras"])
    np.testing.assert_allclose(layer.moving_mean.numpy(), expected.mean, rtol=RTOL)
    np.testing.assert_allclose(layer.moving_variance.numpy(), expected.var, rtol=RTOL)


def test_tensorflow_fused_batch_norm():
    tf = pytest.importorskip("tensorflow")
    x = inputs()
    # FusedBatchNormV3 takes channels-last input: (4, 5, 2) as NHWC with W = 1.
    nhwc = np.ascontiguousarray(np.moveaxis(x, 1, -1))[:, :, None, :]
    _, mean, variance = tf.compat.v1.nn.fused_batch_norm(
        nhwc,
        np.ones(2, np.float32),
        np.zeros(2, np.float32),
        mean=OLD_MEAN,
        variance=OLD_VAR,
        epsilon=1e-5,
        data_format="NHWC",
        is_training=True,
        exponential_avg_factor=0.25,
    )
    expected = batch_norm_step(x, OLD_MEAN, OLD_VAR, 0.25, CONVENTIONS["tf-fused"])
    np.testing.assert_allclose(mean.numpy(), expected.mean, rtol=RTOL)
    np.testing.assert_allclose(variance.numpy(), expected.var, rtol=RTOL)


def test_mxnet_gluon_batch_norm():
    mx = pytest.importorskip("mxnet")
    x = inputs()
    layer = mx.gluon.nn.BatchNorm(axis=1, momentum=0.9, in_channels=2)
    layer.initialize()
    layer.running_mean.set_data(mx.nd.array(OLD_MEAN))
    layer.running_var.set_data(mx.nd.array(OLD_VAR))
    with mx.autograd.record():
        output = layer(mx.nd.array(x))
    # The running values change only once the step is run to its end, backward
    # included (measured with MXNet 1.9.1: reading them after the forward alone
    # gave the old values).
    output.backward()
    expected = batch_norm_step(x, OLD_MEAN, OLD_VAR, 0.9, CONVENTIONS["mxnet"])
    running_mean = layer.running_mean.data().asnumpy()
    np.testing.assert_allclose(running_mean, expected.mean, rtol=RTOL)
    running_var = layer.running_var.data().asnumpy()
    np.testing.assert_allclose(running_var, expected.var, rtol=RTOL)


def test_onnxruntime_batch_normalization_training_mode():
    ort = pytest.importorskip("onnxruntime")
    helper = pytest.importorskip("onnx.helper")
    onnx = pytest.importorskip("onnx")
    x = inputs()
    node = helper.make_node(
        "BatchNormalization",
        ["x", "scale", "bias", "mean", "var"],
        ["y", "running_mean", "running_var"],
        momentum=0.9,
        training_mode=1,
    )
    float_type = onnx.TensorProto.FLOAT
    graph = helper.make_graph(
        [node],
        "batch-norm-training",
        [
            helper.make_tensor_value_info(name, float_type, shape)
            for name, shape in (
                ("x", list(x.shape)),
                ("scale", [2]),
                ("bias", [2]),
                ("mean", [2]),
                ("var", [2]),
            )
        ],
        [
            helper.make_tensor_value_info(name, float_type, shape)
            for name, shape in (
                ("y", list(x.shape)),
                ("running_mean", [2]),
                ("running_var", [2]),
            )
        ],
    )

    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 15)])
    model.ir_version = 8
    session = ort.InferenceSession(
        model.SerializeToString(), providers=["CPUExecutionProvider"]
    )

    _, running_mean, running_var = session.run(
        None,
        {
            "x": x,
            "scale": np.ones(2, np.float32),
            "bias": np.zeros(2, np.float32),
            "mean": OLD_MEAN,
            "var": OLD_VAR,
        },
    )
    expected = batch_norm_step(x, OLD_MEAN, OLD_VAR, 0.9, CONVENTIONS["onnx"])
    np.testing.assert_allclose(running_mean, expected.mean, rtol=RTOL)
    np.testing.assert_allclose(running_var, expected.var, rtol=RTOL)
