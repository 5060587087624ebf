"""MXNet 1.9.1 adapter: InstanceNorm three ways, and GroupNorm, LayerNorm and BatchNorm
(training mode) through their native operators, with gradients through autograd.
BatchNorm also runs training steps that update running statistics, and inference
with them.

Every implementation also runs in the execution mode "hybridize": the same operators,
from mx.sym, in a hybridized gluon.HybridBlock, with gradients from autograd through
the block's CachedOp.

MXNet runs operators asynchronously, so a framework error surfaces when a result is
read. The adapter reads every result (`asnumpy`) inside the block that maps
exceptions to `Rejected`.
"""

from __future__ import annotations

import warnings
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

with warnings.catch_warnings():
    # mxnet 1.9.1's import touches NumPy aliases deprecated since NumPy 1.20
    # (np.bool, np.mirr, ...) and distutils' LooseVersion, which emit
    # DeprecationWarnings on every import. They do not concern the operators.
    warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"mxnet\.")
    import mxnet as mx
    from mxnet import autograd, gluon

from adapters.contract import (
    BACKWARD_SCHEMES,
    CONTRACT_VERSION,
    DEFAULT_MODE,
    MODES,
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


def _no_double_backward(operators: str, backward_op: str, *others: str) -> str:
    """Return the second_order_reason of an implementation whose graph contains
    operators without a registered gradient of their backward. The adapter's
    graph raises for `backward_op` first, and each of `others` raises the same
    error when its operator is differentiated twice on its own."""
    reason = (
        f"mxnet {mx.__version__} cannot differentiate the input gradient of "
        f"{operators} again: autograd.grad(..., create_graph=True) inside "
        f"autograd.record(), then backward() on sum(v * grad_input), raises "
        f"MXNetError: Operator {backward_op} is non-differentiable because it "
        "didn't register FGradient attribute"
    )
    for other in others:
        reason += f", and the same check fails for {other}"
    return reason


# The execution mode besides the default, described in HYBRIDIZE_DESCRIPTION.
# NOTE: it has run on the CPU only. On a GPU, mxnet 1.6 and later fuse pointwise
# operators of hybridized graphs (MXNET_USE_FUSION), such as group_norm.native's
# broadcast_mul and broadcast_add, so results there may differ from the default.
HYBRIDIZE = "hybridize"
EXECUTION_MODES = (HYBRIDIZE,)

# The options of HybridBlock.hybridize. static_alloc keeps the graph's memory
# between calls, and static_shape plans it once for the input shapes, which the
# cache key fixes anyway. Neither changes the time measurably. The adapter ran
# the catalogue's 880 CPU items other than the 2^26-element case in 3.8 to 4.8 s
# with both options off, static_alloc alone, or both, and with the cache below
# off or on. That range is the spread between repeated runs (mxnet 1.9.1 CPU
# build, 2 shared cores). A new block costs about 0.3 to 0.6 ms more than a
# cached one.
HYBRIDIZE_OPTIONS = {"static_alloc": True, "static_shape": True}

# The maximum number of hybridized blocks kept for reuse, least recently used
# first out, and the largest input x (in elements) whose block is kept. With
# static_alloc a kept block holds its buffers: measured on a float32 x of 2^22
# elements (16 MiB), each further cached block raised the resident memory by
# 115 MiB for batch-norm-reshape and 26 MiB for instance-norm. So the blocks of
# the catalogue's 2^26-element case are built, run and dropped.
GRAPH_CACHE_SIZE = 32
GRAPH_CACHE_MAX_ELEMENTS = 1 << 20


@dataclass(frozen=True)
class GraphSpec:
    """The fields of a request that an implementation's graph depends on. The
    forward functions read these, never the request's arrays, so that one
    hybridized block serves every request with the same GraphSpec."""

    implementation: str
    device: str
    dtype: str
    shape: tuple[int, ...]
    layout: str
    eps: float
    affine: bool
    groups: int | None
    normalized_ndim: int | None
    mode: str
    # The momentum of a training step with running statistics, else None.
    momentum: float | None


def _graph_spec(request: Request) -> GraphSpec:
    training_step = request.mode == "training" and request.running_mean is not None
    return GraphSpec(
        implementation=request.implementation,
        device=request.device,
        dtype=request.dtype,
        shape=tuple(request.x.shape),
        layout=request.layout,
        eps=request.eps,
        affine=request.affine,
        groups=request.groups,
        normalized_ndim=request.normalized_ndim,
        mode=request.mode,
        momentum=request.momentum if training_step else None,
    )


# A forward computes the operator of `spec` with the operators of the namespace F:
# mx.nd in the default mode, mx.sym inside a hybridized block. x, gamma and beta are
# NDArrays or symbols, gamma and beta ones and zeros when affine is off. The
# BatchNorm implementations also take moving_mean and moving_var (see
# _moving_statistics). Shapes come from `spec`, because a symbol has none.
Forward = Callable[..., mx.nd.NDArray]


def _instance_norm(F, spec, x, gamma, beta):
    return F.InstanceNorm(x, gamma, beta, eps=spec.eps)


def _group_norm(F, spec, x, gamma, beta):
    # In mxnet 1.9.1 GroupNorm's gamma and beta have one element per group, not per
    # channel (a (C,) gamma with num_groups = 1 raises "Shape size mismatch"). With
    # num_groups = C, a group is a channel, so this is InstanceNorm with a
    # per-channel scale and shift.
    return F.GroupNorm(x, gamma, beta, num_groups=spec.shape[1], eps=spec.eps)


def _batch_norm_reshape(F, spec, x, gamma, beta, moving_mean, moving_var):
    batch, channels = spec.shape[0], spec.shape[1]
    folded = F.reshape(x, shape=(1, batch * channels, *spec.shape[2:]))
    weight = F.tile(gamma, reps=(batch,))
    bias = F.tile(beta, reps=(batch,))
    output = F.BatchNorm(
        folded,
        weight,
        bias,
        moving_mean,
        moving_var,
        eps=spec.eps,
        # The default fix_gamma=True would replace gamma with 1 and zero its gradient.
        fix_gamma=False,
        # Use batch statistics. This also needs autograd's train mode, because
        # outside it BatchNorm normalizes with moving_mean and moving_var.
        use_global_stats=False,
        axis=1,
    )
    return F.reshape(output, shape=spec.shape)


def _group_norm_native(F, spec, x, gamma, beta):
    # In mxnet 1.9.1 GroupNorm's gamma and beta have one element per group, so it
    # runs with unit gamma and zero beta. The per-channel gamma and beta follow as
    # broadcast operators, which autograd records like GroupNorm. In the default
    # mode run() sets the current context, on which mx.nd.ones and mx.nd.zeros
    # create these.
    groups = spec.groups
    unit = F.ones(shape=(groups,), dtype=spec.dtype)
    zero = F.zeros(shape=(groups,), dtype=spec.dtype)
    normalized = F.GroupNorm(x, unit, zero, num_groups=groups, eps=spec.eps)
    if not spec.affine:
        return normalized
    # Reshaped to (C, 1, ...), gamma and beta broadcast along the channel axis.
    per_channel = (spec.shape[1],) + (1,) * (len(spec.shape) - 2)
    scaled = F.broadcast_mul(normalized, F.reshape(gamma, shape=per_channel))
    return F.broadcast_add(scaled, F.reshape(beta, shape=per_channel))


def _layer_norm_native(F, spec, x, gamma, beta):
    # LayerNorm normalizes along one axis, so the last normalized_ndim axes become
    # one. The reshapes run inside autograd, which returns the gradients of x, gamma
    # and beta in their own shapes.
    kept = len(spec.shape) - spec.normalized_ndim
    length = int(np.prod(spec.shape[kept:]))
    flat = F.reshape(x, shape=(*spec.shape[:kept], length))
    output = F.LayerNorm(
        flat,
        F.reshape(gamma, shape=(length,)),
        F.reshape(beta, shape=(length,)),
        axis=-1,
        eps=spec.eps,
    )
    return F.reshape(output, shape=spec.shape)


def _batch_norm_native(F, spec, x, gamma, beta, moving_mean, moving_var):
    running_options = {} if spec.momentum is None else {"momentum": spec.momentum}
    return F.BatchNorm(
        x,
        gamma,
        beta,
        moving_mean,
        moving_var,
        eps=spec.eps,
        fix_gamma=False,
        # Batch statistics need use_global_stats=False and autograd's train mode,
        # as in _batch_norm_reshape. Inference needs use_global_stats=True, because
        # in mxnet 1.9.1 predict mode with use_global_stats=False normalizes with
        # the moving statistics too, but its backward returns an input gradient
        # other than gamma * rstd * dy and changes moving_var.
        use_global_stats=spec.mode == "inference",
        axis=-1 if spec.layout == "channels_last" else 1,
        **running_options,
    )


class HybridGraph(gluon.HybridBlock):
    """One implementation's forward for one GraphSpec, as a block that hybridize()
    turns into a CachedOp. The block has no parameters: every array is an input."""

    def __init__(self, forward: Forward, spec: GraphSpec):
        super().__init__()
        self._forward = forward
        self._spec = spec

    def hybrid_forward(self, F, x, *inputs):
        return self._forward(F, self._spec, x, *inputs)


# The reason the InstanceNorm implementations keep no running statistics. In
# mxnet 1.9.1, mx.nd.InstanceNorm and mx.nd.GroupNorm take data, gamma, beta and eps
# (GroupNorm also num_groups and output_mean_var) and no moving statistics, and
# gluon.nn.InstanceNorm's parameters are gamma and beta alone.
NO_INSTANCE_NORM_RUNNING_STATS = (
    f"mxnet {mx.__version__}'s InstanceNorm keeps no running statistics: "
    "mx.nd.InstanceNorm takes no moving mean or variance, and "
    "gluon.nn.InstanceNorm has the parameters gamma and beta only"
)

# The description of the hybridize mode, appended to every implementation's.
HYBRIDIZE_DESCRIPTION = (
    ". In the hybridize mode the same operators, from mxnet.sym, form one "
    "gluon.HybridBlock, hybridized with static_alloc=True and static_shape=True. "
    "Autograd records its CachedOp, which runs the forward graph and the backward "
    "graph that MXNet derives from it"
)


def _hybridizable(name: str, description: str, **fields: object) -> Implementation:
    """Return an Implementation that runs in the hybridize mode too."""
    return Implementation(
        name,
        description + HYBRIDIZE_DESCRIPTION,
        execution_modes=EXECUTION_MODES,
        backward_schemes=BACKWARD_SCHEMES,
        **fields,
    )


IMPLEMENTATIONS: dict[str, tuple[Implementation, Forward]] = {
    "instance-norm": (
        _hybridizable(
            "instance-norm",
            "mxnet.nd.InstanceNorm",
            second_order_reason=_no_double_backward(
                "InstanceNorm", "_backward_InstanceNorm"
            ),
            running_stats_reason=NO_INSTANCE_NORM_RUNNING_STATS,
        ),
        _instance_norm,
    ),
    "group-norm": (
        _hybridizable(
            "group-norm",
            "mxnet.nd.GroupNorm, num_groups = C",
            second_order_reason=_no_double_backward("GroupNorm", "_backward_GroupNorm"),
            running_stats_reason=(
                f"mxnet {mx.__version__}'s GroupNorm keeps no running statistics "
                "(mx.nd.GroupNorm takes no moving mean or variance), and neither "
                "does its InstanceNorm"
            ),
        ),
        _group_norm,
    ),
    "batch-norm-reshape": (
        # BatchNorm's axis=-1 does not help with channels-last input: folding N into
        # the channel axis of (N, *spatial, C) needs N next to C, which takes a
        # transpose.
        _hybridizable(
            "batch-norm-reshape",
            "mxnet.nd.BatchNorm, training mode, fix_gamma=False, on the (1, N*C, ...) "
            "reshape with gamma and beta repeated N times",
            second_order_reason=_no_double_backward(
                "reshape and BatchNorm", "_backward_reshape", "_backward_BatchNorm"
            ),
            running_stats_reason=(
                "on the (1, N*C, ...) reshape, BatchNorm's moving statistics "
                "belong to the N*C slices, not to the C channels, and "
                + NO_INSTANCE_NORM_RUNNING_STATS
            ),
        ),
        _batch_norm_reshape,
    ),
    "group_norm.native": (
        _hybridizable(
            "group_norm.native",
            "mxnet.nd.GroupNorm(x, ones(G), zeros(G), num_groups=G, eps), then "
            "mxnet.nd.broadcast_mul by gamma and broadcast_add of beta per channel "
            "inside autograd (mxnet 1.9.1's GroupNorm takes gamma and beta per group, "
            "not per channel); without affine, GroupNorm alone",
            operator="group_norm",
            second_order_reason=_no_double_backward(
                "GroupNorm and broadcast_mul",
                "_backward_GroupNorm",
                "_backward_broadcast_mul",
            ),
        ),
        _group_norm_native,
    ),
    "layer_norm.native": (
        _hybridizable(
            "layer_norm.native",
            "mxnet.nd.LayerNorm(x, gamma, beta, axis=-1, eps); for normalized_ndim "
            "k > 1, on x reshaped to (*x.shape[:-k], product of the last k sizes) "
            "with gamma and beta flattened, inside autograd",
            operator="layer_norm",
            second_order_reason=_no_double_backward(
                "reshape and LayerNorm", "_backward_reshape", "_backward_LayerNorm"
            ),
        ),
        _layer_norm_native,
    ),
    "batch_norm.native": (
        _hybridizable(
            "batch_norm.native",
            "mxnet.nd.BatchNorm(x, gamma, beta, moving_mean, moving_var, eps, "
            "fix_gamma=False, axis=1, or axis=-1 for channels_last); moving_mean "
            "and moving_var are zeros(C) and ones(C), or with running statistics "
            "the request's, with momentum. Training: use_global_stats=False in "
            "autograd's train mode, and backward, after which the moving "
            "statistics hold the update. Inference: use_global_stats=True in "
            "autograd's predict mode",
            layouts=("channels_first", "channels_last"),
            operator="batch_norm",
            second_order_reason=_no_double_backward("BatchNorm", "_backward_BatchNorm"),
            running_stats="mxnet",
        ),
        _batch_norm_native,
    ),
}

# The implementations that call BatchNorm, which takes float32 parameters for
# float16 data.
BATCH_NORM_IMPLEMENTATIONS = ("batch-norm-reshape", "batch_norm.native")


def _parameter_dtype(implementation: str, dtype: str) -> str:
    """Return the dtype MXNet requires for gamma and beta."""
    if implementation in BATCH_NORM_IMPLEMENTATIONS and dtype == "float16":
        # BatchNorm wants float32 parameters for float16 data ("This layer requires
        # uniform type. Expected 'float32' v.s. given 'float16' at 'gamma'").
        # float32 represents every float16 value exactly.
        return "float32"
    # GroupNorm and LayerNorm reject parameters of another dtype than x: float32
    # ones for float16 data raise "Incompatible attr in node  at 1-th input:
    # expected float16, got float32".
    return dtype


# Operators whose eps parameter is a C++ float, so that MXNet computes with the
# request's eps rounded to float32 in every dtype. The 1.9.1 docstrings give the
# parameter types: "eps : float, optional, default=9.99999975e-06" for GroupNorm and
# LayerNorm, "float" for InstanceNorm too, and "double" for BatchNorm.
FLOAT32_EPS = ("instance-norm", "group-norm", "group_norm.native", "layer_norm.native")


def _received_eps(implementation: str, eps: float) -> float:
    """Return the eps the operator computes with for a requested eps."""
    if implementation in FLOAT32_EPS:
        return float(np.float32(eps))
    return eps


def _parameter_shape(request: Request) -> tuple[int, ...]:
    """Return the shape of gamma and beta for the request's operator."""
    if request.op == "layer_norm":
        return request.x.shape[request.x.ndim - request.normalized_ndim :]
    if request.layout == "channels_last":
        return (request.x.shape[-1],)
    return (request.x.shape[1],)


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


def _check_running_request(implementation: Implementation, request: Request) -> None:
    """Raise ValueError if the request's mode or running statistics do not fit the
    implementation. Running statistics go only to an implementation that names its
    convention, and inference needs them."""
    if request.mode not in MODES:
        raise ValueError(
            f"invalid mode {request.mode!r}; expected one of {', '.join(MODES)}"
        )
    has_running = request.running_mean is not None
    if has_running != (request.running_var is not None):
        raise ValueError(
            "invalid request: running_mean and running_var must be both set or "
            "both None"
        )
    if has_running and not implementation.running_stats:
        raise ValueError(
            f"implementation {implementation.name} keeps no running statistics, "
            "but the request carries them"
        )
    if request.mode == "inference" and not has_running:
        raise ValueError(
            "invalid request: mode 'inference' needs running_mean and running_var"
        )
    if has_running and request.mode == "training" and request.momentum is None:
        raise ValueError("invalid request: a training step needs a momentum")


def _moving_statistics(
    request: Request, parameter_dtype: str, context: mx.Context
) -> tuple[mx.nd.NDArray, ...]:
    """Return the moving_mean and moving_var inputs of a BatchNorm implementation,
    or () for the others.

    They are block inputs, not constants of the graph, because a symbolic BatchNorm
    updates them in place and mxnet 1.9.1 raises "Mutation target can only be
    Variable" for any other symbol. Training mode does not read them. Without
    running statistics they are zeros and ones whose update the adapter discards.
    They take gamma's dtype, which is float32 for a float16 x.
    """
    if request.implementation not in BATCH_NORM_IMPLEMENTATIONS:
        return ()
    if request.running_mean is not None:
        # mx.nd.array copies, and BatchNorm updates the copies.
        return (
            mx.nd.array(request.running_mean, ctx=context, dtype=parameter_dtype),
            mx.nd.array(request.running_var, ctx=context, dtype=parameter_dtype),
        )
    if request.implementation == "batch-norm-reshape":
        # On the (1, N*C, ...) reshape BatchNorm has N*C channels.
        shape = (request.x.shape[0] * request.x.shape[1],)
    else:
        shape = _parameter_shape(request)
    return (
        mx.nd.zeros(shape, ctx=context, dtype=parameter_dtype),
        mx.nd.ones(shape, ctx=context, dtype=parameter_dtype),
    )


def _cuda_enabled() -> bool:
    return mx.runtime.Features().is_enabled("CUDA")


class MXNetAdapter(Adapter):
    contract_version = CONTRACT_VERSION
    framework = "mxnet"

    def __init__(self) -> None:
        # Hybridized blocks by GraphSpec, least recently used first.
        self._graphs: OrderedDict[GraphSpec, HybridGraph] = OrderedDict()

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
        implementation, forward = IMPLEMENTATIONS[request.implementation]
        _check_running_request(implementation, request)
        mode = request.execution_mode
        if mode != DEFAULT_MODE and mode not in implementation.execution_modes:
            raise ValueError(
                f"implementation {implementation.name} has no execution mode "
                f"{mode!r}; it runs in {DEFAULT_MODE!r} and "
                f"{', '.join(implementation.execution_modes)}"
            )
        context = _device_context(request.device)
        dtype = request.dtype
        parameter_dtype = _parameter_dtype(request.implementation, dtype)
        parameter_shape = _parameter_shape(request)
        spec = _graph_spec(request)
        want = request.gradients
        training = request.mode == "training"
        training_step = training and request.running_mean is not None
        # mxnet 1.9.1's BatchNorm updates the moving statistics only when backward
        # runs. Read after the forward pass alone, with or without autograd.record(),
        # they contain the old values. So a training step records and runs backward
        # even when request.gradients is False, and then returns no gradients.
        record = want or training_step

        def ndarray(array: np.ndarray, array_dtype: str, grad: bool) -> mx.nd.NDArray:
            # mx.nd.array copies, so the request's read-only arrays stay untouched.
            value = mx.nd.array(np.asarray(array), ctx=context, dtype=array_dtype)
            if grad:
                value.attach_grad()
            return value

        try:
            x = ndarray(request.x, dtype, record)
            if request.affine:
                gamma = ndarray(request.gamma, parameter_dtype, record)
                beta = ndarray(request.beta, parameter_dtype, record)
            else:
                # Every MXNet operator takes gamma and beta, so affine off is
                # gamma = 1, beta = 0 with no gradients requested.
                gamma = mx.nd.ones(parameter_shape, ctx=context, dtype=parameter_dtype)
                beta = mx.nd.zeros(parameter_shape, ctx=context, dtype=parameter_dtype)
            affine_gradients = want and request.affine
            moving = _moving_statistics(request, parameter_dtype, context)

            if request.implementation == "instance-norm" and request.x.size == 0:
                # Measured: mxnet 1.9.1's CPU InstanceNorm on an input with zero
                # elements kills the process with SIGFPE. That is a crash, not a
                # refusal, so the item gets `error`. With gradients requested this
                # line is never reached: attach_grad() already raised MXNetError.
                raise RuntimeError(EMPTY_INSTANCE_NORM)
            if mode == HYBRIDIZE:
                compute = self._hybrid_graph(forward, spec)
            else:

                def compute(*inputs: mx.nd.NDArray) -> mx.nd.NDArray:
                    with context:
                        return forward(mx.nd, spec, *inputs)

            if request.grad_outputs is not None:
                return self._run_repeated(
                    request, compute, ndarray, gamma, beta, moving
                )
            if record:
                with autograd.record(train_mode=training):
                    output = compute(x, gamma, beta, *moving)
                output.backward(ndarray(request.grad_output, dtype, False))
            else:
                scope = autograd.train_mode() if training else autograd.predict_mode()
                with scope:
                    output = compute(x, gamma, beta, *moving)
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
            if training_step:
                moving_mean, moving_var = moving
                result.running_mean = moving_mean.asnumpy()
                result.running_var = moving_var.asnumpy()
        except mx.base.MXNetError as error:
            raise Rejected(_framework_message(error)) from error
        return result

    def _run_repeated(
        self,
        request: Request,
        compute: Callable[..., mx.nd.NDArray],
        ndarray: Callable[[np.ndarray, str, bool], mx.nd.NDArray],
        gamma: mx.nd.NDArray,
        beta: mx.nd.NDArray,
        moving: Sequence[mx.nd.NDArray],
    ) -> Result:
        """Run several backward calls, one per grad_output of the request.

        "repeat": one recorded forward pass, then backward(retain_graph=True) per
        grad_output into arrays attached with grad_req "write", which each call
        overwrites. "accumulate": arrays attached with grad_req "add", MXNet's
        accumulate mode, and a recorded forward and backward pass per
        grad_output, so that MXNet adds each call's gradients to the last."""
        accumulate = request.backward_scheme == "accumulate"
        grad_req = "add" if accumulate else "write"
        x = ndarray(request.x, request.dtype, False)
        leaves = [x, gamma, beta] if request.affine else [x]
        for leaf in leaves:
            # attach_grad allocates zeroed gradient buffers, which "add" needs.
            leaf.attach_grad(grad_req=grad_req)
        training = request.mode == "training"
        steps: list[list[np.ndarray]] = [[] for _ in leaves]
        output = None
        for array in request.grad_outputs:
            if output is None or accumulate:
                with autograd.record(train_mode=training):
                    output = compute(x, gamma, beta, *moving)
            output.backward(
                ndarray(array, request.dtype, False), retain_graph=not accumulate
            )
            for stack, leaf in zip(steps, leaves, strict=True):
                # asnumpy() copies and waits for the backward call.
                stack.append(leaf.grad.asnumpy())
        stacked = [np.stack(stack) for stack in steps]
        return Result(
            output=None,
            grad_input_steps=stacked[0],
            grad_gamma_steps=stacked[1] if request.affine else None,
            grad_beta_steps=stacked[2] if request.affine else None,
            dtype=np.dtype(output.dtype).name,
            eps=_received_eps(request.implementation, request.eps),
        )

    def _hybrid_graph(self, forward: Forward, spec: GraphSpec) -> HybridGraph:
        """Return the hybridized block for `spec`, from the cache or newly built."""
        block = self._graphs.get(spec)
        if block is not None:
            self._graphs.move_to_end(spec)
            return block
        block = HybridGraph(forward, spec)
        block.hybridize(**HYBRIDIZE_OPTIONS)
        if int(np.prod(spec.shape)) <= GRAPH_CACHE_MAX_ELEMENTS:
            self._graphs[spec] = block
            if len(self._graphs) > GRAPH_CACHE_SIZE:
                self._graphs.popitem(last=False)
        return block
