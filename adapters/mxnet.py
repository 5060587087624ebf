"""MXNet 1.9.1 adapter: three ways to compute InstanceNorm, gradients through autograd.

MXNet runs operators asynchronously, so a framework error surfaces when a result is
read. The adapter reads every result (`asnumpy`) inside the block that maps
exceptions to `Rejected`.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence

import numpy as np

with warnings.catch_warnings():
    # mxnet 1.9.1's import touches NumPy aliases deprecated since NumPy 1.20
    # (np.bool, np.mirr, ...) and distutils' LooseVersion, which emit
    # DeprecationWarnings on every import. They do not concern the operators.
    warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"mxnet\.")
    import mxnet as mx
    from mxnet import autograd

from adapters.contract import (
    CONTRACT_VERSION,
    Adapter,
    Device,
    Implementation,
    Rejected,
    Request,
    Result,
)

MX_DTYPES = ("float64", "float32", "float16")

NO_BFLOAT16 = (
    f"mxnet {mx.__version__}'s NDArray API has no bfloat16 dtype: "
    "mx.nd.array(..., dtype='bfloat16') raises TypeError: data type 'bfloat16' "
    "not understood"
)

# Measured with mxnet 1.9.1 on the CPU, where InstanceNorm's type check accepts
# float32 only. The message is the one MXNetError carries.
# NOTE: the GPU paths have never run, so this limit is unverified on mx.gpu().
INSTANCE_NORM_FLOAT32_ONLY = (
    "mxnet {version}'s InstanceNorm accepts float32 only: a {dtype} input raises "
    "MXNetError: Check failed: in_type->at(i) == mshadow::default_type_flag || "
    "in_type->at(i) == -1: Unsupported data type {flag}"
)

EMPTY_INSTANCE_NORM = (
    f"not run: mxnet {mx.__version__}'s InstanceNorm stops the process with SIGFPE "
    "(floating point exception) on an input with zero elements"
)

# mshadow's type flags, as InstanceNorm's message prints them.
MSHADOW_TYPE_FLAG = {"float32": 0, "float64": 1, "float16": 2}

Forward = Callable[[mx.nd.NDArray, mx.nd.NDArray, mx.nd.NDArray, float], mx.nd.NDArray]


def _instance_norm(x, gamma, beta, eps):
    return mx.nd.InstanceNorm(x, gamma, beta, eps=eps)


def _group_norm(x, gamma, beta, eps):
    # In mxnet 1.9.1 GroupNorm's gamma and beta have one element per group, not per
    # channel (a (C,) gamma with num_groups = 1 raises "Shape size mismatch"). With
    # num_groups = C, a group is a channel, so this is InstanceNorm with a
    # per-channel scale and shift.
    return mx.nd.GroupNorm(x, gamma, beta, num_groups=x.shape[1], eps=eps)


def _batch_norm_reshape(x, gamma, beta, eps):
    batch, channels = x.shape[0], x.shape[1]
    folded = x.reshape((1, batch * channels, *x.shape[2:]))
    weight = mx.nd.tile(gamma, reps=(batch,))
    bias = mx.nd.tile(beta, reps=(batch,))
    # The moving statistics are inputs that training mode updates but does not read.
    # They must have gamma's dtype, which is float32 for a float16 x.
    moving_mean = mx.nd.zeros(weight.shape, ctx=x.context, dtype=weight.dtype)
    moving_var = mx.nd.ones(weight.shape, ctx=x.context, dtype=weight.dtype)
    output = mx.nd.BatchNorm(
        folded,
        weight,
        bias,
        moving_mean,
        moving_var,
        eps=eps,
        # The default fix_gamma=True would replace gamma with 1 and zero its gradient.
        fix_gamma=False,
        # Use batch statistics. This also needs autograd's train mode, because
        # outside it BatchNorm normalizes with moving_mean and moving_var.
        use_global_stats=False,
        axis=1,
    )
    return output.reshape(x.shape)


IMPLEMENTATIONS: dict[str, tuple[Implementation, Forward]] = {
    "instance-norm": (
        Implementation("instance-norm", "mxnet.nd.InstanceNorm"),
        _instance_norm,
    ),
    "group-norm": (
        Implementation("group-norm", "mxnet.nd.GroupNorm, num_groups = C"),
        _group_norm,
    ),
    "batch-norm-reshape": (
        # BatchNorm's axis=-1 does not help with channels-last input: folding N into
        # the channel axis of (N, *spatial, C) needs N next to C, which takes a
        # transpose.
        Implementation(
            "batch-norm-reshape",
            "mxnet.nd.BatchNorm, training mode, fix_gamma=False, on the (1, N*C, ...) "
            "reshape with gamma and beta repeated N times",
        ),
        _batch_norm_reshape,
    ),
}


def _parameter_dtype(implementation: str, dtype: str) -> str:
    """Return the dtype MXNet requires for gamma and beta."""
    if implementation == "batch-norm-reshape" and dtype == "float16":
        # BatchNorm wants float32 parameters for float16 data ("This layer requires
        # uniform type. Expected 'float32' v.s. given 'float16' at 'gamma'").
        # float32 represents every float16 value exactly.
        return "float32"
    return dtype


# Operators whose eps parameter is a C++ float, so that MXNet computes with the
# request's eps rounded to float32 in every dtype. The 1.9.1 docstrings give the
# parameter types: "eps : float, optional, default=9.99999975e-06" for GroupNorm,
# "float" for InstanceNorm too, and "double" for BatchNorm.
FLOAT32_EPS = ("instance-norm", "group-norm")


def _received_eps(implementation: str, eps: float) -> float:
    """Return the eps the operator computes with for a requested eps."""
    if implementation in FLOAT32_EPS:
        return float(np.float32(eps))
    return eps


def _device_context(name: str) -> mx.Context:
    if name == "cpu":
        return mx.cpu()
    kind, _, index = name.partition(":")
    if kind != "gpu":
        raise ValueError(f"unknown mxnet device {name!r}; expected cpu, gpu or gpu:N")
    return mx.gpu(int(index) if index else 0)


def _framework_message(error: Exception) -> str:
    """Return an MXNetError's message without the C++ traceback that precedes it."""
    name = type(error).__name__
    lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
    for index, line in enumerate(lines):
        if line.startswith(f"{name}:"):
            return " ".join(lines[index:])
    # Some checks (NDArray.Reshape's, for one) carry no "MXNetError:" line.
    lines = [line for line in lines if not line.startswith(("Traceback", "File "))]
    return f"{name}: {' '.join(lines)}"


def _cuda_enabled() -> bool:
    return mx.runtime.Features().is_enabled("CUDA")


class MXNetAdapter(Adapter):
    contract_version = CONTRACT_VERSION
    framework = "mxnet"

    def version(self) -> str:
        return mx.__version__

    def implementations(self) -> Sequence[Implementation]:
        return [implementation for implementation, _ in IMPLEMENTATIONS.values()]

    def devices(self) -> Sequence[Device]:
        devices = [Device("cpu")]
        count = mx.context.num_gpus()
        if count == 0:
            build = "a CUDA build" if _cuda_enabled() else "a CPU-only build"
            reason = (
                f"mxnet {mx.__version__} sees no GPU (mx.context.num_gpus() is 0, "
                f"{build})"
            )
            devices.append(Device("gpu", available=False, reason=reason))
            return devices
        for index in range(count):
            devices.append(Device("gpu" if index == 0 else f"gpu:{index}"))
        return devices

    def unsupported_reason(
        self, implementation: str, device: str, dtype: str
    ) -> str | None:
        if dtype == "bfloat16":
            return NO_BFLOAT16
        if dtype not in MX_DTYPES:
            return f"the mxnet adapter does not know the dtype {dtype}"
        if implementation == "instance-norm" and dtype != "float32":
            return INSTANCE_NORM_FLOAT32_ONLY.format(
                version=mx.__version__, dtype=dtype, flag=MSHADOW_TYPE_FLAG[dtype]
            )
        return None

    def run(self, request: Request) -> Result:
        _, forward = IMPLEMENTATIONS[request.implementation]
        context = _device_context(request.device)
        dtype = request.dtype
        parameter_dtype = _parameter_dtype(request.implementation, dtype)
        channels = request.x.shape[1]
        want = request.gradients

        def ndarray(array: np.ndarray, array_dtype: str, grad: bool) -> mx.nd.NDArray:
            # mx.nd.array copies, so the request's read-only arrays stay untouched.
            value = mx.nd.array(np.asarray(array), ctx=context, dtype=array_dtype)
            if grad:
                value.attach_grad()
            return value

        try:
            x = ndarray(request.x, dtype, want)
            if request.affine:
                gamma = ndarray(request.gamma, parameter_dtype, want)
                beta = ndarray(request.beta, parameter_dtype, want)
            else:
                # Every MXNet implementation takes gamma and beta, so affine off is
                # gamma = 1, beta = 0 with no gradients requested.
                gamma = mx.nd.ones((channels,), ctx=context, dtype=parameter_dtype)
                beta = mx.nd.zeros((channels,), ctx=context, dtype=parameter_dtype)
            affine_gradients = want and request.affine

            if request.implementation == "instance-norm" and request.x.size == 0:
                # Measured: mxnet 1.9.1's CPU InstanceNorm on an input with zero
                # elements kills the process with SIGFPE. That is a crash, not a
                # refusal, so the item gets `error`. With gradients requested this
                # line is never reached: attach_grad() already raised MXNetError.
                raise RuntimeError(EMPTY_INSTANCE_NORM)
            if want:
                with autograd.record(train_mode=True):
                    output = forward(x, gamma, beta, request.eps)
                output.backward(ndarray(request.grad_output, dtype, False))
            else:
                with autograd.train_mode():
                    output = forward(x, gamma, beta, request.eps)
            # Reading each array waits for it, so an asynchronous MXNetError is
            # raised here rather than in a later item.
            result = Result(
                output=output.asnumpy(),
                grad_input=x.grad.asnumpy() if want else None,
                grad_gamma=gamma.grad.asnumpy() if affine_gradients else None,
                grad_beta=beta.grad.asnumpy() if affine_gradients else None,
                dtype=np.dtype(output.dtype).name,
                eps=_received_eps(request.implementation, request.eps),
            )
        except mx.base.MXNetError as error:
            raise Rejected(_framework_message(error)) from error
        return result
