"""PyTorch adapter: three ways to compute InstanceNorm and the functional GroupNorm,
LayerNorm and BatchNorm, with gradients and second derivatives through autograd."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from adapters.contract import (
    CONTRACT_VERSION,
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

IMPLEMENTATIONS: dict[str, tuple[Implementation, Forward]] = {
    "functional": (
        Implementation(
            "functional",
            "torch.nn.functional.instance_norm",
            layouts=BOTH_LAYOUTS,
            second_order=True,
            running_stats="torch",
        ),
        _functional,
    ),
    "group-norm": (
        Implementation(
            "group-norm",
            "torch.nn.functional.group_norm, groups = C",
            layouts=BOTH_LAYOUTS,
            second_order=True,
        ),
        _group_norm,
    ),
    "batch-norm-reshape": (
        Implementation(
            "batch-norm-reshape",
            "torch.nn.functional.batch_norm, training mode, on the (1, N*C, ...) "
            "reshape with gamma and beta repeated N times",
            layouts=BOTH_LAYOUTS,
            second_order=True,
        ),
        _batch_norm_reshape,
    ),
    "group_norm.functional": (
        Implementation(
            "group_norm.functional",
            "torch.nn.functional.group_norm(x, groups, weight, bias, eps)",
            layouts=BOTH_LAYOUTS,
            operator="group_norm",
            second_order=True,
        ),
        _family_group_norm,
    ),
    "layer_norm.functional": (
        Implementation(
            "layer_norm.functional",
            "torch.nn.functional.layer_norm(x, x.shape[-k:], weight, bias, eps)",
            operator="layer_norm",
            second_order=True,
        ),
        _family_layer_norm,
    ),
    "batch_norm.functional": (
        Implementation(
            "batch_norm.functional",
            "torch.nn.functional.batch_norm(x, running_mean, running_var, weight, "
            "bias, training, momentum, eps)",
            layouts=BOTH_LAYOUTS,
            operator="batch_norm",
            second_order=True,
            running_stats="torch",
        ),
        _family_batch_norm,
    ),
}


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

    def run(self, request: Request) -> Result:
        _, forward = IMPLEMENTATIONS[request.implementation]
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

        try:
            # A channels-last array becomes an (N, C, ...) view with channels-last
            # strides, which torch's channels-last kernels handle without a copy.
            logical = _channels_first_view(x) if channels_last else x
            output = forward(logical, gamma, beta, request, **extra)
            if want:
                grad_output = tensor(request.grad_output, False)
                if channels_last:
                    grad_output = _channels_first_view(grad_output)
                output.backward(grad_output)
        except Exception as error:  # noqa: BLE001 - the framework refused the input
            raise Rejected(f"{type(error).__name__}: {error}") from error

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
