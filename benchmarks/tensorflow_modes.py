"""Compare TensorFlow's eager mode with tf.function for normconf's use.

    python benchmarks/tensorflow_modes.py    (in an environment with tensorflow)

normconf's TensorFlow adapter runs eagerly. A tf.function traces a graph for each
new input signature, and a normconf run meets each (shape, dtype) of the catalogue
about once per implementation, so it would pay for tracing on almost every item.
This script times the forward and backward pass of tf.nn.moments with
tf.nn.batch_normalization in float32. The cases are every channels-first catalogue
case with affine parameters and more than one element per slice. It runs three
rounds eagerly, then three rounds through one tf.function, whose first round
traces. It prints seconds per round and asserts nothing.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import tensorflow as tf  # noqa: E402

from suites import cases  # noqa: E402

ROUNDS = 3


def forward_backward(x, gamma, beta, grad_output, eps):
    """Return y and the gradients of x, gamma and beta for upstream grad_output."""
    with tf.GradientTape() as tape:
        tape.watch([x, gamma, beta])
        axes = list(range(2, len(x.shape)))
        mean, variance = tf.nn.moments(x, axes=axes, keepdims=True)
        shape = [1, -1] + [1] * (len(x.shape) - 2)
        y = tf.nn.batch_normalization(
            x, mean, variance, tf.reshape(beta, shape), tf.reshape(gamma, shape), eps
        )
    gradients = tape.gradient(y, [x, gamma, beta], output_gradients=grad_output)
    return (y, *gradients)


def catalogue_inputs() -> list[tuple]:
    chosen = [
        case
        for case in cases.CATALOGUE
        if case.layout == "channels_first"
        and case.affine
        and case.shape[0] > 0
        and np.prod(case.shape[2:]) > 1
    ]
    data = []
    for case in chosen:
        inputs = cases.materialize(case, "float32", 0)
        arrays = (inputs.x, inputs.gamma, inputs.beta, inputs.grad_output)
        data.append((*(tf.constant(array) for array in arrays), case.eps))
    return data


def main() -> int:
    data = catalogue_inputs()
    for name, function in (
        ("eager", forward_backward),
        ("tf.function", tf.function(forward_backward)),
    ):
        for round_number in range(ROUNDS):
            start = time.perf_counter()
            for x, gamma, beta, grad_output, eps in data:
                for tensor in function(x, gamma, beta, grad_output, eps):
                    tensor.numpy()
            seconds = time.perf_counter() - start
            print(f"{name} round {round_number}: {seconds:.3f} s for {len(data)} cases")
    return 0


if __name__ == "__main__":
    sys.exit(main())
