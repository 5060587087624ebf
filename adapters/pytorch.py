"""PyTorch adapter: three ways to compute InstanceNorm and the functional GroupNorm,
LayerNorm and BatchNorm, with gradients and second derivatives through autograd, and
an execution mode that runs first-order requests through torch.compile."""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch._dynamo
import torch._inductor.exc
import torch.nn.functional as F

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

TORCH_DTYPES = {
    "float64": torch.float64,
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}

# (x, gamma, beta, request) to the output; the implementations that keep running
# statistics also take `running`, the (running_mean, running_var) tensors.
Forward = Callable[..., torch.Tensor]
# Converts a request array (or None) to a tensor, requiring its gradient or not.
TensorMaker = Callable[["np.ndarray | None", bool], "torch.Tensor | None"]


def _functional(x, gamma, beta, request, running=(None, None)):
    # With running statistics, inference normalizes with them (use_input_stats
    # False), and training updates them in place.
    return F.instance_norm(
        x,
        running_mean=running[0],
        running_var=running[1],
        weight=gamma,
        bias=beta,
        use_input_stats=request.mode == "training",
        momentum=request.momentum or 0.1,
        eps=request.eps,
    )


def _group_norm(x, gamma, beta, request):
    return F.group_norm(x, x.shape[1], weight=gamma, bias=beta, eps=request.eps)


def _batch_norm_reshape(x, gamma, beta, request):
    eps = request.eps
    batch, channels = x.shape[0], x.shape[1]
    folded = x.reshape(1, batch * channels, *x.shape[2:])
    weight = gamma.repeat(batch) if gamma is not None else None
    bias = beta.repeat(batch) if beta is not None else None
    output = F.batch_norm(
        folded, None, None, weight=weight, bias=bias, training=True, eps=eps
    )
    return output.reshape(x.shape)


def _family_group_norm(x, gamma, beta, request):
    return F.group_norm(x, request.groups, weight=gamma, bias=beta, eps=request.eps)


def _family_layer_norm(x, gamma, beta, request):
    normalized_shape = x.shape[x.ndim - request.normalized_ndim :]
    return F.layer_norm(x, normalized_shape, weight=gamma, bias=beta, eps=request.eps)


def _family_batch_norm(x, gamma, beta, request, running=(None, None)):
    # Without running statistics, training mode normalizes with the batch's own;
    # with them, training updates them in place and inference normalizes with
    # them.
    return F.batch_norm(
        x,
        running[0],
        running[1],
        weight=gamma,
        bias=beta,
        training=request.mode == "training",
        momentum=request.momentum or 0.1,
        eps=request.eps,
    )


BOTH_LAYOUTS = ("channels_first", "channels_last")

# The execution mode that runs an implementation's forward and backward through
# torch.compile. Second-order and running-statistics requests come in the
# default mode only.
COMPILE_MODE = "compile"
COMPILE_DESCRIPTION = (
    "; in mode compile, torch.compile(backend='inductor', fullgraph=True, "
    "dynamic=True) traces this call into one forward graph, AOTAutograd derives "
    "its backward graph, and inductor compiles both (C++ kernels on the CPU)"
)

IMPLEMENTATIONS: dict[str, tuple[Implementation, Forward]] = {
    "functional": (
        Implementation(
            "functional",
            "torch.nn.functional.instance_norm" + COMPILE_DESCRIPTION,
            layouts=BOTH_LAYOUTS,
            second_order=True,
            execution_modes=(COMPILE_MODE,),
            backward_schemes=BACKWARD_SCHEMES,
            running_stats="torch",
        ),
        _functional,
    ),
    "group-norm": (
        Implementation(
            "group-norm",
            "torch.nn.functional.group_norm, groups = C" + COMPILE_DESCRIPTION,
            layouts=BOTH_LAYOUTS,
            second_order=True,
            execution_modes=(COMPILE_MODE,),
            backward_schemes=BACKWARD_SCHEMES,
        ),
        _group_norm,
    ),
    "batch-norm-reshape": (
        Implementation(
            "batch-norm-reshape",
            "torch.nn.functional.batch_norm, training mode, on the (1, N*C, ...) "
            "reshape with gamma and beta repeated N times" + COMPILE_DESCRIPTION,
            layouts=BOTH_LAYOUTS,
            second_order=True,
            execution_modes=(COMPILE_MODE,),
            backward_schemes=BACKWARD_SCHEMES,
        ),
        _batch_norm_reshape,
    ),
    "group_norm.functional": (
        Implementation(
            "group_norm.functional",
            "torch.nn.functional.group_norm(x, groups, weight, bias, eps)"
            + COMPILE_DESCRIPTION,
            layouts=BOTH_LAYOUTS,
            operator="group_norm",
            second_order=True,
            execution_modes=(COMPILE_MODE,),
            backward_schemes=BACKWARD_SCHEMES,
        ),
        _family_group_norm,
    ),
    "layer_norm.functional": (
        Implementation(
            "layer_norm.functional",
            "torch.nn.functional.layer_norm(x, x.shape[-k:], weight, bias, eps)"
            + COMPILE_DESCRIPTION,
            operator="layer_norm",
            second_order=True,
            execution_modes=(COMPILE_MODE,),
            backward_schemes=BACKWARD_SCHEMES,
        ),
        _family_layer_norm,
    ),
    "batch_norm.functional": (
        Implementation(
            "batch_norm.functional",
            "torch.nn.functional.batch_norm(x, running_mean, running_var, weight, "
            "bias, training, momentum, eps)" + COMPILE_DESCRIPTION,
            layouts=BOTH_LAYOUTS,
            operator="batch_norm",
            second_order=True,
            execution_modes=(COMPILE_MODE,),
            backward_schemes=BACKWARD_SCHEMES,
            running_stats="torch",
        ),
        _family_batch_norm,
    ),
}


# ---------------------------------------------------------------------------------
# The compile mode


@dataclass(frozen=True)
class GraphConstants:
    """The request fields a forward reads, which become constants of a compiled
    graph. Compile mode serves training-mode requests without running statistics
    only."""

    eps: float
    groups: int | None
    normalized_ndim: int | None
    mode: str = "training"
    momentum: float | None = None


# dynamo keeps its graphs on the code object of `compiled_forward` in
# _compile_forward, which every compiled forward shares, so its limits count the
# graphs of all of them. torch 2.13.0's default recompile_limit of 8 stopped
# compilation at the ninth eps value of one implementation. With
# fail_on_recompile_limit_hit, reaching a limit raises FailOnRecompileLimitHit
# (verdict `error`), where dynamo would otherwise run the function eagerly and
# only log a warning.
DYNAMO_LIMITS = {
    "recompile_limit": 4096,
    "accumulated_recompile_limit": 4096,
    "fail_on_recompile_limit_hit": True,
}


def _compile_forward(forward: Forward, constants: GraphConstants) -> Forward:
    """Return forward(x, gamma, beta, constants) compiled by torch.compile.

    fullgraph=True makes a graph break raise (dynamo would otherwise run the
    untraceable part eagerly). dynamic=True traces sizes as symbols, so one graph
    serves every shape with the same number of dimensions, except that dynamo
    compiles another graph for each size of 0 or 1, which it specializes. It also
    guards on dtype, device, strides and requires_grad, and compiles a new graph
    when one of them changes.
    """

    def compiled_forward(x, gamma, beta):
        return forward(x, gamma, beta, constants)

    compiled = torch.compile(
        compiled_forward, backend="inductor", fullgraph=True, dynamic=True
    )

    def run_compiled(x, gamma, beta):
        with torch._dynamo.config.patch(**DYNAMO_LIMITS):
            return compiled(x, gamma, beta)

    return run_compiled


# Exceptions that mean the adapter or its environment broke (a failed C++
# toolchain, a graph break in the adapter's own code, a reached recompile limit),
# so they propagate and give the item the verdict `error`, never `rejected`.
COMPILER_FAULTS = (
    torch._inductor.exc.CppCompileError,
    torch._inductor.exc.InvalidCxxCompiler,
    torch._dynamo.exc.Unsupported,
    torch._dynamo.exc.FailOnRecompileLimitHit,
)


def _is_compiler_fault(error: BaseException) -> bool:
    """Return True if `error`, or an exception it was raised from, is one of
    COMPILER_FAULTS.

    dynamo wraps a backend's exception in BackendCompilerFailed (attribute
    inner_exception). The context of an exception is not followed, because dynamo
    raises TorchRuntimeError while handling an Unsupported. TorchRuntimeError is
    an operator's error on dynamo's fake tensors, so the framework rejected the
    input."""
    current: BaseException | None = error
    seen: set[int] = set()
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, COMPILER_FAULTS):
            return True
        current = getattr(current, "inner_exception", None) or current.__cause__
    return False


def _rejection_text(error: Exception) -> str:
    """Return the framework's message for `error`, without what dynamo adds.

    dynamo appends the traceback of the traced code to an operator's error (from
    "from user code:" on). Its TorchRuntimeError, an operator's error on fake
    tensors, describes the call and then gives the operator's exception after
    "): got ", which this returns. Other dynamo errors come back on one line,
    without their hints."""
    text = str(error).split("\n\nfrom user code:")[0]
    if not isinstance(error, torch._dynamo.exc.TorchDynamoException):
        return f"{type(error).__name__}: {text}"
    lines = []
    for line in text.splitlines():
        if line.strip().startswith("Hint:"):
            break
        if line.strip():
            lines.append(line.strip())
    text = " ".join(lines)
    _, marker, operator_error = text.partition("): got ")
    if marker:
        return f"{type(error).__name__} from {operator_error}"
    return f"{type(error).__name__}: {text}"


@functools.cache
def _compiler_missing_reason(device_type: str) -> str | None:
    """Return why inductor cannot compile for `device_type` here, or None."""
    # Private modules of torch 2.13.0, imported here so that a torch without them
    # loses the compile mode only.
    from torch._inductor.cpp_builder import get_cpp_compiler
    from torch.utils._triton import has_triton

    if device_type == "cuda":
        # NOTE: compile mode has run only with the CPU build of torch 2.13.0, so
        # this CUDA branch (inductor's Triton kernels) is untested.
        if has_triton():
            return None
        return (
            f"torch {torch.__version__}'s inductor backend generates Triton kernels "
            "for CUDA, and the triton package is missing or sees no supported GPU"
        )
    try:
        get_cpp_compiler()
    except torch._inductor.exc.InvalidCxxCompiler as error:
        return (
            f"torch {torch.__version__}'s inductor backend compiles C++ kernels for "
            f"the CPU and found no C++ compiler ({error}); set CXX to one"
        )
    return None


def _to_numpy(tensor: torch.Tensor | None) -> np.ndarray | None:
    if tensor is None:
        return None
    tensor = tensor.detach().cpu().contiguous()
    if tensor.dtype == torch.bfloat16:
        # NumPy has no bfloat16, and float32 represents every bfloat16 value exactly.
        tensor = tensor.to(torch.float32)
    return tensor.numpy()


def _channels_first_view(tensor: torch.Tensor) -> torch.Tensor:
    """View (N, *spatial, C) as (N, C, *spatial) without moving data."""
    return tensor.permute(0, tensor.ndim - 1, *range(1, tensor.ndim - 1))


def _channels_last_view(tensor: torch.Tensor) -> torch.Tensor:
    """View (N, C, *spatial) as (N, *spatial, C) without moving data."""
    return tensor.permute(0, *range(2, tensor.ndim), 1)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


class TorchAdapter(Adapter):
    contract_version = CONTRACT_VERSION
    framework = "torch"

    def __init__(self) -> None:
        # The compiled forwards by (implementation, eps, groups, normalized_ndim),
        # the constants of their graphs. Within one, dynamo's guards select or
        # compile a graph for each dtype, device, layout and number of dimensions.
        self._compiled: dict[tuple, Forward] = {}

    def version(self) -> str:
        return torch.__version__

    def implementations(self) -> Sequence[Implementation]:
        return [implementation for implementation, _ in IMPLEMENTATIONS.values()]

    def math_modes(self) -> dict[str, object]:
        # torch's precision switches for float32 matrix multiplication and cuDNN
        # convolution, which select TF32 on tensor cores.
        matmul_precision = torch.get_float32_matmul_precision()
        return {
            "torch.get_float32_matmul_precision()": matmul_precision,
            "torch.backends.cuda.matmul.fp32_precision": (
                torch.backends.cuda.matmul.fp32_precision
            ),
            "torch.backends.cudnn.fp32_precision": torch.backends.cudnn.fp32_precision,
        }

    def devices(self) -> Sequence[Device]:
        devices = [Device("cpu")]
        if not torch.cuda.is_available():
            reason = (
                f"torch {torch.__version__} sees no CUDA device "
                f"(torch.cuda.is_available() is False, built for CUDA "
                f"{torch.version.cuda})"
            )
            devices.append(Device("cuda", available=False, reason=reason))
            return devices
        for index in range(torch.cuda.device_count()):
            name = "cuda" if index == 0 else f"cuda:{index}"
            devices.append(Device(name))
        return devices

    def execution_mode_reason(
        self, implementation: str, mode: str, device: str, dtype: str
    ) -> str | None:
        """Return why `mode` cannot run on `device`, or None when it runs."""
        if mode != COMPILE_MODE:
            return f"the torch adapter has no execution mode {mode!r}"
        if torch._dynamo.config.disable:
            # Each call would then raise RuntimeError ("found no compiled frames"
            # in torch 2.13.0), which would read as the framework rejecting the
            # input.
            return (
                "torch.compile is disabled (torch._dynamo.config.disable, set by "
                "TORCH_COMPILE_DISABLE=1). Unset it to run the compile mode"
            )
        return _compiler_missing_reason(torch.device(device).type)

    def compiled_forward(self, request: Request) -> Forward:
        """Return the compiled forward for the request, compiling it on first use.

        Raises ValueError for a request that compile mode does not serve."""
        if request.execution_mode != COMPILE_MODE:
            raise ValueError(
                f"the torch adapter has no execution mode {request.execution_mode!r}"
            )
        if request.grad_grad_input is not None or request.running_mean is not None:
            raise ValueError(
                f"execution mode {COMPILE_MODE!r} runs first-order requests without "
                "running statistics; second-order and running-statistics requests "
                f"come in mode {DEFAULT_MODE!r}"
            )
        key = (
            request.implementation,
            request.eps,
            request.groups,
            request.normalized_ndim,
        )
        if key not in self._compiled:
            _, forward = IMPLEMENTATIONS[request.implementation]
            constants = GraphConstants(
                request.eps, request.groups, request.normalized_ndim
            )
            self._compiled[key] = _compile_forward(forward, constants)
        return self._compiled[key]

    def run(self, request: Request) -> Result:
        _, forward = IMPLEMENTATIONS[request.implementation]
        compiled = None
        if request.execution_mode != DEFAULT_MODE:
            compiled = self.compiled_forward(request)
        dtype = TORCH_DTYPES[request.dtype]
        device = torch.device(request.device)

        def tensor(array: np.ndarray | None, grad: bool) -> torch.Tensor | None:
            if array is None:
                return None
            # The request's arrays are read-only; torch.tensor copies.
            value = torch.tensor(np.asarray(array), dtype=dtype, device=device)
            return value.requires_grad_(grad)

        if request.grad_grad_input is not None:
            return self._run_second_order(request, forward, tensor)
        if request.grad_outputs is not None:
            if compiled is None:

                def compute(x, gamma, beta):
                    return forward(x, gamma, beta, request)

            else:
                compute = compiled
            return self._run_repeated(request, compute, tensor)

        want = request.gradients
        x = tensor(request.x, want)
        gamma = tensor(request.gamma, want)
        beta = tensor(request.beta, want)
        channels_last = request.layout == "channels_last"
        # The running statistics, in the tested dtype; a training step updates
        # them in place.
        running = (
            tensor(request.running_mean, False),
            tensor(request.running_var, False),
        )
        extra = {} if running[0] is None else {"running": running}
        if compiled is None:

            def compute(x, gamma, beta):
                return forward(x, gamma, beta, request, **extra)

        else:
            compute = compiled

        try:
            # A channels-last array becomes an (N, C, ...) view with channels-last
            # strides, which torch's channels-last kernels handle without a copy.
            logical = _channels_first_view(x) if channels_last else x
            output = compute(logical, gamma, beta)
            if want:
                grad_output = tensor(request.grad_output, False)
                if channels_last:
                    grad_output = _channels_first_view(grad_output)
                # In compile mode, this runs the compiled backward graph.
                output.backward(grad_output)
        except Exception as error:  # noqa: BLE001 - the framework refused the input
            if _is_compiler_fault(error):
                raise
            raise Rejected(_rejection_text(error)) from error

        if channels_last:
            output = _channels_last_view(output)
        return Result(
            output=_to_numpy(output),
            grad_input=_to_numpy(x.grad) if want else None,
            grad_gamma=_to_numpy(gamma.grad) if want and gamma is not None else None,
            grad_beta=_to_numpy(beta.grad) if want and beta is not None else None,
            dtype=_dtype_name(output.dtype),
            running_mean=_to_numpy(running[0]) if request.mode == "training" else None,
            running_var=_to_numpy(running[1]) if request.mode == "training" else None,
        )

    def _run_repeated(
        self, request: Request, compute: Callable, tensor: TensorMaker
    ) -> Result:
        """Run several backward calls, one per grad_output of the request.

        "repeat": one forward pass, then backward(retain_graph=True) per
        grad_output, with each .grad set to None before the call. "accumulate":
        a forward and backward pass per grad_output, leaving .grad alone, so
        that autograd adds each call's gradients to it (torch's default)."""
        x = tensor(request.x, True)
        gamma = tensor(request.gamma, True)
        beta = tensor(request.beta, True)
        leaves = [x] if gamma is None else [x, gamma, beta]
        channels_last = request.layout == "channels_last"

        def logical(value: torch.Tensor) -> torch.Tensor:
            return _channels_first_view(value) if channels_last else value

        steps: list[list[np.ndarray]] = [[] for _ in leaves]
        try:
            output = None
            for array in request.grad_outputs:
                if output is None or request.backward_scheme == "accumulate":
                    output = compute(logical(x), gamma, beta)
                if request.backward_scheme == "repeat":
                    for leaf in leaves:
                        leaf.grad = None
                grad_output = logical(tensor(array, False))
                output.backward(
                    grad_output, retain_graph=request.backward_scheme == "repeat"
                )
                for stack, leaf in zip(steps, leaves, strict=True):
                    # A copy: autograd may add the next call's gradients to
                    # .grad in place, and _to_numpy shares a CPU tensor's memory.
                    stack.append(_to_numpy(leaf.grad).copy())
        except Exception as error:  # noqa: BLE001 - the framework refused the input
            if _is_compiler_fault(error):
                raise
            raise Rejected(_rejection_text(error)) from error

        stacked = [np.stack(stack) for stack in steps]
        return Result(
            output=None,
            grad_input_steps=stacked[0],
            grad_gamma_steps=stacked[1] if gamma is not None else None,
            grad_beta_steps=stacked[2] if gamma is not None else None,
            dtype=_dtype_name(output.dtype),
        )

    def _run_second_order(
        self, request: Request, forward: Forward, tensor: TensorMaker
    ) -> Result:
        """Differentiate grad_input along v = request.grad_grad_input: the first
        torch.autograd.grad keeps its graph (create_graph=True), and the second
        takes the vector-Jacobian product of grad_input with v, which is the
        gradient of sum(v * grad_input)."""
        x = tensor(request.x, True)
        gamma = tensor(request.gamma, True)
        beta = tensor(request.beta, True)
        grad_output = tensor(request.grad_output, True)
        direction = tensor(request.grad_grad_input, False)
        channels_last = request.layout == "channels_last"
        parameters = [] if gamma is None else [gamma, beta]

        def logical(value: torch.Tensor) -> torch.Tensor:
            return _channels_first_view(value) if channels_last else value

        try:
            output = forward(logical(x), gamma, beta, request)
            first = torch.autograd.grad(
                output,
                [x, *parameters],
                grad_outputs=logical(grad_output),
                create_graph=True,
            )
            # materialize_grads: an input that grad_input does not depend on gets
            # zeros, not None.
            second = torch.autograd.grad(
                first[0],
                [x, *parameters[:1], grad_output],
                grad_outputs=direction,
                materialize_grads=True,
            )
        except Exception as error:  # noqa: BLE001 - the framework refused the input
            raise Rejected(f"{type(error).__name__}: {error}") from error

        if channels_last:
            output = _channels_last_view(output)
        return Result(
            output=_to_numpy(output),
            grad_input=_to_numpy(first[0]),
            grad_gamma=_to_numpy(first[1]) if parameters else None,
            grad_beta=_to_numpy(first[2]) if parameters else None,
            dtype=_dtype_name(output.dtype),
            grad2_input=_to_numpy(second[0]),
            grad2_gamma=_to_numpy(second[1]) if parameters else None,
            grad2_grad_output=_to_numpy(second[-1]),
        )
