"""The normconf adapter for the example backend: the file a vendor adapts.

normconf hands `run` one case at a time as NumPy arrays. The adapter converts them
to the backend's tensors, calls one of the backend's kernels, and converts the
results back. It never judges them: the suite compares them with its float64
reference and sets every verdict.

`adapters.contract` comes from the normconf checkout, not from an installed
package. The suite runs from the checkout's root, which pytest puts on sys.path
(see README.md in this package), so this module imports only inside such a run.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from adapters import contract

# Replace this import with your own library.
from normconf_example_adapter import backend

# normconf's dtype names mapped to the backend's storage formats. The example
# backend happens to use the same names. A real library maps them to its enum.
FORMATS = {"float32": "float32", "float16": "float16", "bfloat16": "bfloat16"}


class ExampleBackendAdapter(contract.Adapter):
    """Runs InstanceNorm on the example backend, a float32-computing NumPy
    stand-in for a vendor library."""

    # The contract version this adapter was written against. The suite stops with
    # a usage error before any case when it does not support it.
    contract_version = contract.CONTRACT_VERSION
    # Starts every test id and names the backend in reports and deviation
    # entries: lowercase letters, digits, '.', '_' and '-'.
    framework = "example-backend"

    def version(self) -> str:
        # Deviation entries match this as a PEP 440 version.
        return backend.__version__

    def implementations(self) -> Sequence[contract.Implementation]:
        # One entry per kernel or code path worth judging separately. `layouts`
        # lists the layouts of x a kernel takes without a transpose, and cases in
        # other layouts are recorded `unsupported` for it. A kernel without a
        # backward pass sets gradients=False with the reason, and its gradient
        # quantities are recorded `unsupported` with that reason.
        return [
            contract.Implementation(
                "fused",
                "backend.instance_norm_forward and instance_norm_backward",
                layouts=contract.LAYOUTS,
            ),
            contract.Implementation(
                "inference",
                "backend.instance_norm_inference, forward only",
                gradients=False,
                gradient_reason="the inference kernel has no backward pass",
                layouts=("channels_first",),
            ),
        ]

    def devices(self) -> Sequence[contract.Device]:
        # Declare every device kind the backend supports, present or not. An
        # absent one is declared unavailable with the reason, so that its items
        # are recorded `unsupported` in the report instead of left out of it.
        declared = [contract.Device("cpu")]
        count = backend.accelerator_count()
        if count == 0:
            reason = "accelerator_count() of the example backend found no NPU"
            declared.append(contract.Device("npu", available=False, reason=reason))
        else:
            declared.append(contract.Device("npu"))
            declared += [contract.Device(f"npu:{index}") for index in range(1, count)]
        return declared

    def unsupported_reason(
        self, implementation: str, device: str, dtype: str
    ) -> str | None:
        # One sentence for each (implementation, device, dtype) the backend cannot
        # run, and None for the rest. The suite records those items `unsupported`
        # with the sentence and never calls run() for them.
        if dtype not in FORMATS:
            return f"the example backend has no {dtype} kernels"
        return None

    def run(self, request: contract.Request) -> contract.Result:
        # Convert the inputs to the backend's tensors here. The request's arrays
        # are read-only NumPy arrays in the tested dtype (bfloat16 values in
        # float32 arrays), and x and grad_output are in request.layout.
        storage = FORMATS[request.dtype]
        # request.device is one of the names that devices() declared as available.
        # Map it to your library's device handle here. The example backend uses
        # the same names.
        device = request.device
        x = backend.from_float(request.x, storage, device)
        gamma = beta = None
        if request.affine:
            gamma = backend.from_float(request.gamma, storage, device)
            beta = backend.from_float(request.beta, storage, device)
        # Pass eps explicitly, because framework defaults differ. This backend's
        # kernels take it as float32.
        epsilon = np.float32(request.eps)
        channels_last = request.layout == "channels_last"

        try:
            if request.implementation == "inference":
                output = backend.instance_norm_inference(x, gamma, beta, epsilon)
                return self._result(output, request)
            output, saved = backend.instance_norm_forward(
                x, gamma, beta, epsilon, channels_last
            )
            result = self._result(output, request)
            if not request.gradients:
                return result
            grad_output = backend.from_float(request.grad_output, storage, device)
            grad_x, grad_gamma, grad_beta = backend.instance_norm_backward(
                grad_output, x, gamma, saved, channels_last
            )
        except backend.BackendError as error:
            # The backend rejected this input with its own error, so report a
            # rejection with the backend's message. Whether a rejection conforms
            # depends on the case (an empty batch may be rejected, a large mean
            # may not). Catch only the library's input errors here. Any other
            # exception means the adapter or the backend broke, and the suite
            # records it as `error`.
            raise contract.Rejected(f"BackendError: {error}") from error

        result.grad_input = backend.to_float(grad_x)
        if request.affine:
            # Leave the parameter gradients None when affine is off.
            result.grad_gamma = backend.to_float(grad_gamma)
            result.grad_beta = backend.to_float(grad_beta)
        return result

    @staticmethod
    def _result(output: backend.Tensor, request: contract.Request) -> contract.Result:
        """Wrap the output tensor in a Result.

        The Result's arrays are NumPy arrays in the request's layout, in the tested
        dtype or a wider float dtype that represents its values exactly, as float32
        does for bfloat16.
        """
        return contract.Result(
            output=backend.to_float(output),
            # The format the backend returned, in normconf's spelling. A dtype
            # other than the tested one is recorded as `error`.
            dtype=output.format,
            # The format the kernel computed in. The suite records it, and still
            # judges the results in units of the tested dtype.
            compute_dtype="float32",
            # The eps the kernel received, because the backend stores it in
            # float32. Leave eps None when your interface takes eps as a double.
            eps=float(np.float32(request.eps)),
        )
