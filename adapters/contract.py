"""The adapter contract: what a framework adapter declares and computes.

Vendors implement this to put their own backend through normconf. An adapter is a
class (or an instance) with the attributes and methods of `Adapter` below. It only
computes: it converts NumPy inputs to its framework, runs one implementation, and
returns NumPy results. The suite compares them with the reference and decides every
verdict.

Contract version 1:

- `framework`: a short lowercase name used in test ids and reports ("torch").
- `version()`: the framework's version string.
- `implementations()`: the ways this adapter computes each operator, each with a
  name that is unique within the adapter, the operator it computes (InstanceNorm
  when it names none) and a flag saying whether it returns gradients.
- `devices()`: every device the adapter supports, available or not, with the reason
  when it is not (a missing GPU is reported, not hidden).
- `unsupported_reason(implementation, device, dtype)`: None when the combination runs,
  otherwise a sentence saying why not.
- `math_modes()`: optional, the framework's switches that change floating-point
  precision (TF32 and the like) as a name-to-value mapping, recorded in the report.
- `run(request)`: compute one case and return a `Result`. Raise `Rejected` when the
  framework rejects the input with its own error for that input. Any other exception
  means the adapter broke, and the item gets the verdict `error`.

Second derivatives, optional: an implementation that sets `second_order` gets
second-order requests, whose `grad_grad_input` is a direction v shaped like x.
The adapter then computes grad_input with its graph kept (create_graph in
autograd terms) and returns the gradients of L = sum(v * grad_input) with respect
to x, gamma and grad_output in `Result.grad2_input`, `grad2_gamma` and
`grad2_grad_output`. An implementation without them may say why in
`second_order_reason`. Adapters that set neither field never see such a request.

Running statistics, optional: a batch_norm or instance_norm implementation that
keeps a running mean and variance names its update rule in `running_stats`, one
of the conventions of references/running_stats.py ("torch", "keras", "mxnet",
"onnx", "tf-fused"). It then also gets requests that carry `running_mean` and
`running_var`: with `mode` "training" the adapter runs one training step from
those values with `momentum` and returns the updated values in
`Result.running_mean` and `running_var`; with `mode` "inference" it normalizes
with them in place of the batch's statistics and returns the output and the
gradients, the statistics held constant. `running_stats_reason` says why an
implementation has none.

Repeated backward, optional: an implementation lists in `backward_schemes` the
schemes of BACKWARD_SCHEMES it runs, and gets requests that carry
`grad_outputs`, a stack of K grad_output arrays. In the scheme "repeat" the
adapter runs one forward pass and then K backward passes through its graph,
the k-th with grad_outputs[k], each into fresh gradients. In the scheme
"accumulate" it runs K steps of forward and backward that add their gradients
into the same buffers, the framework's accumulate mode. It returns the
gradients after each call, stacked, in `Result.grad_input_steps`,
`grad_gamma_steps` and `grad_beta_steps`. `backward_schemes_reason` says why a
scheme is missing. An optional method
`backward_scheme_reason(implementation, scheme, device, dtype)` returns why a
declared scheme cannot run on a device or dtype, or None.
"""

from __future__ import annotations

import abc
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

CONTRACT_VERSION = 1

# The operators of the family (docs/operators.md):
# - instance_norm: each (n, c) slice over the spatial axes, gamma and beta per channel;
# - group_norm: each (n, group) over its C / G consecutive channels and the spatial
#   axes, `Request.groups` groups, gamma and beta per channel;
# - layer_norm: each sample over the last `Request.normalized_ndim` axes of the
#   (N, C, *spatial) array, gamma and beta of the shape of those axes;
# - batch_norm: training mode, each channel over the batch and the spatial axes with
#   the batch's own statistics, gamma and beta per channel.
OPERATORS = ("instance_norm", "group_norm", "layer_norm", "batch_norm")
# The operators that keep running statistics per channel.
RUNNING_OPERATORS = ("instance_norm", "batch_norm")

# The modes of a request: "training" normalizes with the batch's own statistics
# (and updates running statistics when the request carries them), "inference"
# with the request's running statistics.
MODES = ("training", "inference")

# The execution mode every implementation runs in: the adapter's own default
# path (eager execution, or the default session options). An implementation may
# declare further modes in `execution_modes`, such as a compiled one.
DEFAULT_MODE = "default"

# The update rules an implementation may name in `running_stats`; the keys of
# references.running_stats.CONVENTIONS, which defines each.
RUNNING_CONVENTIONS = ("torch", "keras", "mxnet", "onnx", "tf-fused")

# The schemes of several backward calls for one input (suites/repeated_backward.py).
# "repeat" runs one forward pass and K backward passes through its graph, each into
# fresh gradients. "accumulate" runs K forward and backward steps whose gradients
# the framework adds into the same buffers.
BACKWARD_SCHEMES = ("repeat", "accumulate")

# Memory layouts of x: channels_first is (N, C, *spatial), channels_last is
# (N, *spatial, C).
LAYOUTS = ("channels_first", "channels_last")


class Rejected(Exception):
    """The framework refused the input; the message is the framework's own error."""


@dataclass(frozen=True)
class Implementation:
    """One way an adapter computes an operator, e.g. a native op or a reshape.

    `gradient_reason` gives the reason there are no gradients when `gradients` is
    False.
    `layouts` lists the layouts of x the implementation accepts without transposes.
    `operator` is the member of OPERATORS it computes.
    `second_order` says whether it returns second derivatives (it needs
    `gradients`), and `second_order_reason` why not when it does not, for
    example because the framework has no double backward for this path.
    `running_stats` names the convention by which it updates running statistics
    (one of RUNNING_CONVENTIONS, for an operator in RUNNING_OPERATORS), or is
    empty when it keeps none; `running_stats_reason` then may say why.
    `execution_modes` names the modes it runs in besides DEFAULT_MODE, such as
    "compile" for a compiled graph; each catalogue case runs in each of them,
    and test ids and records name the implementation as `<name>@<mode>`.
    `backward_schemes` lists the members of BACKWARD_SCHEMES it runs (it needs
    `gradients`), and `backward_schemes_reason` why the others are missing.
    """

    name: str
    description: str
    gradients: bool = True
    gradient_reason: str = ""
    layouts: tuple[str, ...] = ("channels_first",)
    operator: str = "instance_norm"
    second_order: bool = False
    second_order_reason: str = ""
    running_stats: str = ""
    running_stats_reason: str = ""
    execution_modes: tuple[str, ...] = ()
    backward_schemes: tuple[str, ...] = ()
    backward_schemes_reason: str = ""


@dataclass(frozen=True)
class Device:
    """A device the adapter can target, with the reason when it cannot be used now."""

    name: str
    available: bool = True
    reason: str = ""


@dataclass(frozen=True)
class Request:
    """One case for one implementation, device and dtype.

    Arrays hold values exactly representable in `dtype`. They are NumPy arrays of that
    dtype, except bfloat16, which arrives in float32 arrays. gamma and beta are None
    when `affine` is False. x and grad_output are in `layout`: (N, *spatial, C) for
    channels_last. The arrays are read-only: copy before writing.

    `op` is the implementation's operator. `groups` is set for group_norm only, and
    divides C. `normalized_ndim` is set for layer_norm only: the operator normalizes
    over the last `normalized_ndim` axes of x in (N, C, *spatial) order, and gamma
    and beta have the shape of those axes (layer_norm runs in channels_first only).
    gamma and beta have shape (C,) for every other operator.

    `grad_grad_input` is None except in a second-order request, sent only to an
    implementation that declares `second_order`. It is then the direction v, shaped
    and laid out like x and read-only like the other arrays, and `gradients` is
    True. The adapter computes L = sum(v * grad_input), keeping grad_input
    differentiable, and returns the gradients of L in the grad2 fields of the
    Result.

    `execution_mode` is DEFAULT_MODE, or one of the implementation's
    `execution_modes`: the adapter then runs the implementation that way.

    `running_mean` and `running_var` are None except in a running-statistics
    request, sent only to an implementation that names `running_stats`. They are
    then arrays of shape (C,) in the tested dtype, read-only like the others.
    With `mode` "training" the adapter runs one training step that starts from
    them, passing `momentum` to the framework's momentum parameter as it is (the
    convention says which value it weights), and returns the running values
    after the step. With `mode` "inference" it normalizes with them: the output
    and the gradients of x, gamma and beta hold the statistics constant.

    `grad_outputs` is None except in a repeated-backward request, sent only to an
    implementation that lists the scheme `backward_scheme` in `backward_schemes`,
    and `backward_scheme` is None otherwise. `grad_outputs` is then
    a read-only stack of K arrays, shape (K, *x.shape), each laid out like x, and
    `grad_output` is its first. In the scheme "repeat" the adapter runs the
    forward pass once and K backward passes through it, the k-th with
    grad_outputs[k], clearing the gradients before each. In "accumulate" it runs
    K forward and backward steps on the same x, gamma and beta, the k-th with
    grad_outputs[k], and leaves the framework to add each step's gradients to
    the last.
    """

    op: str
    implementation: str
    device: str
    dtype: str
    x: np.ndarray
    gamma: np.ndarray | None
    beta: np.ndarray | None
    grad_output: np.ndarray
    eps: float
    affine: bool
    gradients: bool
    layout: str = "channels_first"
    groups: int | None = None
    normalized_ndim: int | None = None
    grad_grad_input: np.ndarray | None = None
    mode: str = "training"
    running_mean: np.ndarray | None = None
    running_var: np.ndarray | None = None
    momentum: float | None = None
    execution_mode: str = DEFAULT_MODE
    grad_outputs: np.ndarray | None = None
    backward_scheme: str | None = None


@dataclass
class Result:
    """An adapter's results as NumPy arrays, in the tested dtype or any float dtype
    that represents its values exactly (bfloat16 results usually come back as float32).

    output and grad_input are in the request's layout. Gradients are None when the
    request did not ask for them, and grad_gamma and grad_beta are None when affine
    is off; they have the shape of gamma. `dtype` names the dtype the framework
    returned its output in, as normconf spells dtypes ("float32").

    `compute_dtype` names the format the framework computed in, when the adapter
    has measured it: "float32" for float16 input that a kernel computes in float32, or
    "tfloat32" for float32 math on TF32 tensor cores. A result is judged in the units
    of the tested dtype, except that "tfloat32" on float32 input sets TF32's units;
    any other format coarser than the tested dtype is an `error`.

    `eps` is set only when the framework's interface cannot hold the request's eps
    and stores a rounded value: ONNX keeps the epsilon attribute in float32, so 1e-5
    reaches the kernel as 9.99999974737875e-06. It must equal the request's eps
    rounded to float32, float16 or bfloat16; the suite then computes the reference
    with it and records it. Any other value is an `error`.

    The grad2 fields answer a second-order request (`Request.grad_grad_input` set)
    and are None otherwise: the gradients of L = sum(v * grad_input) with respect
    to x (`grad2_input`, shaped like x in the request's layout), gamma
    (`grad2_gamma`, gamma's shape, None when affine is off) and grad_output
    (`grad2_grad_output`, shaped like x in the request's layout). For such a
    request the suite judges only these three; the other fields may be filled or
    left None.

    `running_mean` and `running_var` answer a training request that carries
    running statistics: the values after the step, shape (C,), in any float dtype
    that holds them (frameworks often keep them in float32 for float16 input).
    They are None otherwise.

    `grad_input_steps`, `grad_gamma_steps` and `grad_beta_steps` belong to a
    repeated-backward request: the gradients after each of its K backward calls,
    stacked, shape (K, *x.shape) in the request's layout and (K, *gamma.shape).
    In the scheme "accumulate" they are the framework's buffers after each call,
    the sums of the calls so far. The suite judges only these for such a
    request.
    """

    output: np.ndarray | None
    grad_input: np.ndarray | None = None
    grad_gamma: np.ndarray | None = None
    grad_beta: np.ndarray | None = None
    dtype: str | None = None
    eps: float | None = None
    compute_dtype: str | None = None
    grad2_input: np.ndarray | None = None
    grad2_gamma: np.ndarray | None = None
    grad2_grad_output: np.ndarray | None = None
    running_mean: np.ndarray | None = None
    running_var: np.ndarray | None = None
    grad_input_steps: np.ndarray | None = None
    grad_gamma_steps: np.ndarray | None = None
    grad_beta_steps: np.ndarray | None = None


class Adapter(abc.ABC):
    """Base class for adapters. Subclassing it is optional: the suite checks methods."""

    contract_version: int = CONTRACT_VERSION
    framework: str = ""

    @abc.abstractmethod
    def version(self) -> str: ...

    @abc.abstractmethod
    def implementations(self) -> Sequence[Implementation]: ...

    @abc.abstractmethod
    def devices(self) -> Sequence[Device]: ...

    def unsupported_reason(
        self, implementation: str, device: str, dtype: str
    ) -> str | None:
        """Return None if the combination runs, else why not. Default: all run."""
        return None

    def math_modes(self) -> dict[str, object]:
        """Return the framework's precision switches and their values. Default: none."""
        return {}

    @abc.abstractmethod
    def run(self, request: Request) -> Result: ...


REQUIRED_METHODS = ("version", "implementations", "devices", "run")

# Framework and implementation names appear in test ids and deviation entries.
NAME_PATTERN = re.compile(r"[a-z0-9][a-z0-9._-]*")
# Device names appear in test ids too: a kind, and an index after ':' (cuda:1).
DEVICE_PATTERN = re.compile(r"[a-z0-9][a-z0-9._-]*(:[0-9]+)?")


class ContractError(Exception):
    """An adapter does not satisfy the contract (raised before any case runs)."""


def validate(adapter: object, origin: str) -> None:
    """Raise ContractError if `adapter` lacks a required member or has a wrong version.

    `origin` names where the adapter came from, for the message.
    """
    version = getattr(adapter, "contract_version", None)
    if version != CONTRACT_VERSION:
        raise ContractError(
            f"adapter {origin} declares contract_version {version!r}; "
            f"this normconf supports contract version {CONTRACT_VERSION}"
        )
    framework = getattr(adapter, "framework", None)
    if not isinstance(framework, str) or not NAME_PATTERN.fullmatch(framework):
        raise ContractError(
            f"adapter {origin} has framework name {framework!r}; it must be a short "
            "lowercase name of letters, digits, '.', '_' and '-' (it starts test ids)"
        )
    for name in REQUIRED_METHODS:
        if not callable(getattr(adapter, name, None)):
            raise ContractError(f"adapter {origin} lacks the required method {name}()")
    declared = {}
    for method in ("version", "implementations", "devices"):
        try:
            declared[method] = getattr(adapter, method)()
        except Exception as error:  # noqa: BLE001 - reported before any case runs
            raise ContractError(
                f"adapter {origin}: {method}() raised {type(error).__name__}: {error}"
            ) from error
    if not isinstance(declared["version"], str) or not declared["version"]:
        raise ContractError(
            f"adapter {origin}: version() returned {declared['version']!r}, not a "
            "non-empty string"
        )
    for method in ("implementations", "devices"):
        if not declared[method]:
            raise ContractError(f"adapter {origin} declares no {method}")
    _check_members(
        origin, "implementations", declared["implementations"], Implementation
    )
    _check_members(origin, "devices", declared["devices"], Device)
    _check_devices(origin, declared["devices"])
    _check_math_modes(adapter, origin)
    names = [implementation.name for implementation in declared["implementations"]]
    if len(set(names)) != len(names):
        raise ContractError(f"adapter {origin} has duplicate implementation names")
    for name in names:
        if not isinstance(name, str) or not NAME_PATTERN.fullmatch(name):
            raise ContractError(
                f"adapter {origin} has implementation name {name!r}; use lowercase "
                "letters, digits, '.', '_' and '-'"
            )


def _check_members(origin: str, method: str, members: object, kind: type) -> None:
    """Raise ContractError unless `members` is a sequence of `kind` objects."""
    if isinstance(members, (str, bytes)) or not isinstance(members, Sequence):
        raise ContractError(
            f"adapter {origin}: {method}() returned a {type(members).__name__}, not a "
            f"list of {kind.__name__}"
        )
    for member in members:
        if not isinstance(member, kind):
            raise ContractError(
                f"adapter {origin}: {method}() returned {member!r}, not a "
                f"{kind.__name__}"
            )
    if kind is Implementation:
        for implementation in members:
            if implementation.operator not in OPERATORS:
                raise ContractError(
                    f"adapter {origin}: implementation {implementation.name!r} "
                    f"computes operator {implementation.operator!r}; use one of "
                    f"{', '.join(OPERATORS)}"
                )
            unknown = [
                layout for layout in implementation.layouts if layout not in LAYOUTS
            ]
            if unknown or not implementation.layouts:
                raise ContractError(
                    f"adapter {origin}: implementation {implementation.name!r} "
                    f"declares layouts {tuple(implementation.layouts)!r}; use one or "
                    f"more of {', '.join(LAYOUTS)}"
                )
            _check_running_stats(origin, implementation)
            _check_execution_modes(origin, implementation)
            _check_backward_schemes(origin, implementation)
            if implementation.second_order and not implementation.gradients:
                raise ContractError(
                    f"adapter {origin}: implementation {implementation.name!r} "
                    "declares second_order without gradients; second derivatives "
                    "differentiate the input gradient, so set gradients=True or "
                    "second_order=False"
                )


def _check_backward_schemes(origin: str, implementation: Implementation) -> None:
    """Raise ContractError unless the implementation's backward schemes are
    distinct members of BACKWARD_SCHEMES, declared with gradients."""
    schemes = implementation.backward_schemes
    name = implementation.name
    if isinstance(schemes, str) or not isinstance(schemes, Sequence):
        raise ContractError(
            f"adapter {origin}: implementation {name!r} declares backward_schemes "
            f"{schemes!r}, not a tuple of names"
        )
    unknown = [scheme for scheme in schemes if scheme not in BACKWARD_SCHEMES]
    if unknown or len(set(schemes)) != len(schemes):
        raise ContractError(
            f"adapter {origin}: implementation {name!r} declares backward_schemes "
            f"{tuple(schemes)!r}; use distinct members of {', '.join(BACKWARD_SCHEMES)}"
        )
    if schemes and not implementation.gradients:
        raise ContractError(
            f"adapter {origin}: implementation {name!r} declares backward_schemes "
            "without gradients; set gradients=True or leave backward_schemes empty"
        )


def _check_execution_modes(origin: str, implementation: Implementation) -> None:
    """Raise ContractError unless the implementation's execution modes are
    distinct names other than DEFAULT_MODE."""
    modes = implementation.execution_modes
    if isinstance(modes, str) or not isinstance(modes, (tuple, list)):
        raise ContractError(
            f"adapter {origin}: implementation {implementation.name!r} declares "
            f"execution_modes {modes!r}; use a tuple of mode names"
        )
    for mode in modes:
        if (
            not isinstance(mode, str)
            or not NAME_PATTERN.fullmatch(mode)
            or mode == DEFAULT_MODE
        ):
            raise ContractError(
                f"adapter {origin}: implementation {implementation.name!r} declares "
                f"execution mode {mode!r}; use lowercase letters, digits, '.', '_' "
                f"and '-', and not {DEFAULT_MODE!r}, which every implementation has"
            )
    if len(set(modes)) != len(modes):
        raise ContractError(
            f"adapter {origin}: implementation {implementation.name!r} declares an "
            "execution mode twice"
        )


def _check_running_stats(origin: str, implementation: Implementation) -> None:
    """Raise ContractError unless the implementation's running_stats is empty or
    a known convention of an operator that keeps running statistics."""
    convention = implementation.running_stats
    if convention and implementation.running_stats_reason:
        raise ContractError(
            f"adapter {origin}: implementation {implementation.name!r} declares "
            "running_stats and a running_stats_reason; the reason says why there "
            "are none, so set one or the other"
        )
    if implementation.operator not in RUNNING_OPERATORS and (
        convention or implementation.running_stats_reason
    ):
        raise ContractError(
            f"adapter {origin}: implementation {implementation.name!r} computes "
            f"{implementation.operator}, which keeps no running statistics; only "
            f"{' and '.join(RUNNING_OPERATORS)} do, so leave running_stats and "
            "running_stats_reason empty"
        )
    if not convention:
        return
    if convention not in RUNNING_CONVENTIONS:
        raise ContractError(
            f"adapter {origin}: implementation {implementation.name!r} declares "
            f"running_stats {convention!r}; use one of "
            f"{', '.join(RUNNING_CONVENTIONS)}, or leave it empty"
        )


def _check_devices(origin: str, devices: Sequence[Device]) -> None:
    names = [device.name for device in devices]
    for name in names:
        if not isinstance(name, str) or not DEVICE_PATTERN.fullmatch(name):
            raise ContractError(
                f"adapter {origin} has device name {name!r}; use lowercase letters, "
                "digits, '.', '_' and '-', with an optional ':index'"
            )
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise ContractError(
            f"adapter {origin} declares the device {', '.join(repeated)} twice"
        )


def _check_math_modes(adapter: object, origin: str) -> None:
    """Raise ContractError unless the optional math_modes() returns a mapping of
    names to strings, numbers or booleans."""
    method = getattr(adapter, "math_modes", None)
    if method is None:
        return
    try:
        modes = method()
    except Exception as error:  # noqa: BLE001 - reported before any case runs
        raise ContractError(
            f"adapter {origin}: math_modes() raised {type(error).__name__}: {error}"
        ) from error
    if not isinstance(modes, Mapping):
        raise ContractError(
            f"adapter {origin}: math_modes() returned a {type(modes).__name__}, "
            "not a mapping"
        )
    for name, value in modes.items():
        if not isinstance(name, str) or not isinstance(value, (str, int, float)):
            raise ContractError(
                f"adapter {origin}: math_modes() maps {name!r} to {value!r}; use "
                "string names and string, number or boolean values"
            )
