"""The TensorFlow adapter's accumulate scheme: a Keras optimizer's gradient
accumulators. Skipped where TensorFlow is not installed.

The repeated-backward suite judges the numbers over the catalogue. These tests
pin what the adapter does with the optimizer: every call adds into the same
accumulators, each request starts from zero, and the reported input gives its
exact values.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

pytest.importorskip("tensorflow")

from adapters import tensorflow as adapter_module  # noqa: E402
from adapters.contract import Request  # noqa: E402
from suites import cases  # noqa: E402
from tests.frameworks.accumulate_checks import (  # noqa: E402
    assert_reported_sums,
    assert_running_sums,
    assert_same_buffers,
)

IMPLEMENTATIONS = list(adapter_module.IMPLEMENTATIONS)


@pytest.fixture(scope="module")
def adapter():
    return adapter_module.TensorFlowAdapter()


def repeated_request(implementation: str, case_name: str, scheme: str) -> Request:
    """A float32 request of the case with three grad_outputs: the case's own,
    then two seeded draws."""
    declared, _ = adapter_module.IMPLEMENTATIONS[implementation]
    case = cases.by_name(case_name)
    inputs = cases.materialize(case, "float32", 0)
    rng = np.random.default_rng(5)
    gamma, beta = inputs.gamma, inputs.beta
    options = {}
    if declared.operator == "layer_norm":
        gamma, beta = rng.standard_normal((2, inputs.x.shape[-1]), np.float32)
        options["normalized_ndim"] = 1
    elif declared.operator == "group_norm":
        options["groups"] = 1
    draws = [rng.standard_normal(inputs.x.shape, np.float32) for _ in range(2)]
    stack = np.stack([inputs.grad_output, *draws])
    stack.setflags(write=False)
    return Request(
        op=declared.operator,
        implementation=implementation,
        device="cpu",
        dtype="float32",
        x=inputs.x,
        gamma=gamma,
        beta=beta,
        grad_output=stack[0],
        eps=case.eps,
        affine=case.affine,
        gradients=True,
        grad_outputs=stack,
        backward_scheme=scheme,
        **options,
    )


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_accumulators_are_running_sums_of_single_calls(adapter, implementation):
    accumulated = adapter.run(
        repeated_request(implementation, "random-2d", "accumulate")
    )
    repeated = adapter.run(repeated_request(implementation, "random-2d", "repeat"))
    assert_running_sums(accumulated, repeated)


def test_reported_accumulate_adds_four_per_call(adapter):
    # The reported input, loss = sum(y) three times: dbeta = 4, 8 and 12 per
    # channel, dgamma and dx 0 up to float32 roundoff.
    request = repeated_request("moments", "reported-repeated-backward", "accumulate")
    ones = np.ones_like(request.grad_outputs)
    result = adapter.run(
        dataclasses.replace(request, grad_output=ones[0], grad_outputs=ones)
    )
    assert_reported_sums(result)


def test_each_accumulate_request_starts_from_zero(adapter):
    request = repeated_request("layer_norm.keras", "random-2d", "accumulate")
    first = adapter.run(request)
    second = adapter.run(request)
    assert_same_buffers(first, second)


def test_accumulate_without_affine_returns_the_input_gradient_only(adapter):
    request = repeated_request("moments", "random-2d", "accumulate")
    result = adapter.run(
        dataclasses.replace(request, affine=False, gamma=None, beta=None)
    )
    assert result.grad_input_steps.shape == (3, *request.x.shape)
    assert result.grad_gamma_steps is None
    assert result.grad_beta_steps is None


def test_accumulate_in_a_compiled_mode_raises_value_error(adapter):
    request = repeated_request("moments", "random-2d", "accumulate")
    with pytest.raises(ValueError, match="default execution mode only"):
        adapter.run(dataclasses.replace(request, execution_mode="function"))
