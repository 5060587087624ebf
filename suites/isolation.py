"""Run adapters in worker processes, so that a crash, a hang or a leak costs one item.

The pytest process keeps the adapter it loaded for everything but computing: its
name, version, implementations and devices. `IsolatedAdapter.run` sends each
request to a worker process that loaded the same adapter, and waits for the result
with a time limit while it watches the worker's resident memory. When the worker
dies, runs past the limit or grows past its memory limit, the item gets verdict
`error` with the cause, the worker is stopped, and a new one starts for the next
item.

The worker is `python -m suites.isolation READ_FD WRITE_FD INPUTS OUTPUTS KIND
NAME`. It talks to the pytest process over two pipes of its own, so that a
framework writing to stdout cannot corrupt the messages. The arrays cross through
two memory-mapped files instead (INPUTS and OUTPUTS, in /dev/shm where it exists),
because a long-reduction item's 8 MB took 15 ms through the pipes. Its stderr
goes to a file whose last lines are quoted when it dies, and faulthandler writes
the Python stack of a fatal signal there.
"""

from __future__ import annotations

import ctypes
import dataclasses
import faulthandler
import fcntl
import mmap
import os
import signal
import subprocess
import sys
import tempfile
import time
import traceback
import zlib
from dataclasses import dataclass
from multiprocessing.connection import Connection

import numpy as np

from adapters import registry
from adapters.contract import Rejected, Request, Result
from suites import cases, error_model

# How often the pytest process checks the worker's memory while it waits.
POLL_INTERVAL_S = 0.05
# fcntl's command that sets a pipe's buffer size (linux/fcntl.h).
F_SETPIPE_SZ = 1031
# prctl's option for the signal a process gets when its parent dies (linux/prctl.h).
PR_SET_PDEATHSIG = 1
# The fields of a Result that contain arrays: the quantities.
RESULT_ARRAYS = (
    *error_model.QUANTITIES,
    *error_model.SECOND_ORDER_QUANTITIES,
    *error_model.RUNNING_QUANTITIES,
    "grad_input_steps",
    "grad_gamma_steps",
    "grad_beta_steps",
)
# How much of the worker's stderr a failure message quotes.
STDERR_TAIL_LINES = 12
STDERR_TAIL_CHARACTERS = 2000


# The peak resident memory of every worker this process stopped, in MiB, for
# benchmarks/speed.py. A worker killed after dying on its own is not measured.
WORKER_PEAKS_MIB: list[int] = []


class WorkerFailure(Exception):
    """An item's worker process died, timed out, ran out of its memory limit or
    could not send its result. The message is the item's `error` verdict message."""


@dataclass(frozen=True)
class Limits:
    """The limits each item runs under: seconds until the worker is killed, and
    the resident memory in MiB above which it is killed (None: no limit)."""

    timeout_s: float
    memory_mib: int | None


def _widen(pipe: int) -> None:
    """Raise a pipe's buffer to /proc/sys/fs/pipe-max-size (Linux): arrays cross
    it in fewer rounds between the two processes. Elsewhere, leave it."""
    try:
        with open("/proc/sys/fs/pipe-max-size", encoding="ascii") as limit:
            size = int(limit.read())
        fcntl.fcntl(pipe, F_SETPIPE_SZ, size)
    except (OSError, ValueError):
        return


def physical_memory_mib() -> int | None:
    """Return the machine's physical memory in MiB, or None where unknown."""
    try:
        pages = os.sysconf("SC_PHYS_PAGES")
        page_size = os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):
        return None
    return pages * page_size // (1024 * 1024)


def _status_mib(pid: int, field: str) -> int | None:
    """Return a memory field of /proc/PID/status (Linux) in MiB, or None where
    /proc does not have it."""
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as status:
            for line in status:
                if line.startswith(f"{field}:"):
                    return int(line.split()[1]) // 1024
    except (OSError, ValueError):
        return None
    return None


def resident_mib(pid: int) -> int | None:
    """Return the resident memory of process `pid` in MiB, or None if unknown."""
    return _status_mib(pid, "VmRSS")


def peak_resident_mib(pid: int) -> int | None:
    """Return the peak resident memory of process `pid` in MiB, or None."""
    return _status_mib(pid, "VmHWM")


def describe_exit(returncode: int) -> str:
    """Return how a process ended, from its subprocess return code."""
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = f"signal {-returncode}"
        return f"died from signal {name} ({-returncode})"
    return f"exited with status {returncode}"


# Offsets of arrays in an ArrayArea are multiples of this, a cache line.
AREA_ALIGNMENT = 64
# The folder of ArrayArea files: NORMCONF_AREA_DIR when set, else shared memory
# where Linux has it, else the temporary folder.
AREA_FOLDER = os.environ.get("NORMCONF_AREA_DIR") or (
    "/dev/shm" if os.path.isdir("/dev/shm") else None
)


class ArrayArea:
    """A file that both processes map into memory, through which arrays cross
    without being pickled and piped: the writer copies them in and sends only
    their offsets, shapes and dtypes. Only the writer grows the file, and the
    reader maps as much of it as each message gives."""

    def __init__(self, path: str) -> None:
        self.file = open(path, "r+b")  # noqa: SIM115 - open for the area's life
        self.map: mmap.mmap | None = None
        self.size = 0

    def _map(self, size: int) -> None:
        # The old map is not closed, because arrays a caller still keeps may view
        # it. It is freed with the last of them.
        self.map = mmap.mmap(self.file.fileno(), size)
        self.size = size

    def attach(self, size: int) -> None:
        """Map at least `size` bytes, which the writer has already written."""
        if size > self.size:
            self._map(size)

    def put(self, arrays: dict[str, np.ndarray]) -> tuple[dict, int]:
        """Copy `arrays` into the area, growing it as needed; return where each
        lies, as (offset, shape, dtype) by name, and the bytes in use."""
        layout, end = {}, 0
        for name, array in arrays.items():
            layout[name] = (end, array.shape, array.dtype.str)
            end += -(-array.nbytes // AREA_ALIGNMENT) * AREA_ALIGNMENT
        if end > self.size:
            self.file.truncate(end)
            self._map(end)
        for name, array in arrays.items():
            self.view(layout[name])[...] = array
        return layout, end

    def view(self, place: tuple) -> np.ndarray:
        """Return the array at `place`, one entry of a layout, as a view."""
        offset, shape, dtype = place
        dtype = np.dtype(dtype)
        count = int(np.prod(shape, dtype=np.int64))
        if count == 0:
            return np.empty(shape, dtype)
        flat = np.frombuffer(self.map, dtype=dtype, count=count, offset=offset)
        return flat.reshape(shape)

    def close(self) -> None:
        self.file.close()


def _area_file() -> str:
    """Create an empty file for an ArrayArea and return its path."""
    handle, path = tempfile.mkstemp(prefix="normconf-", dir=AREA_FOLDER)
    os.close(handle)
    return path


def _numeric_arrays(owner: object, names: tuple[str, ...]) -> dict[str, np.ndarray]:
    """Return the fields of `owner` among `names` that are NumPy arrays of numbers,
    the ones an ArrayArea can carry."""
    return {
        name: value
        for name in names
        if isinstance(value := getattr(owner, name), np.ndarray)
        and value.dtype.kind in "biufc"
    }


class Worker:
    """One worker process running one adapter, started on first use."""

    def __init__(self, source: tuple[str, str], limits: Limits) -> None:
        self.source = source
        self.limits = limits
        self.process: subprocess.Popen | None = None
        self.requests: Connection | None = None
        self.replies: Connection | None = None
        self.inputs: ArrayArea | None = None
        self.outputs: ArrayArea | None = None
        self.stderr = None
        self.stderr_offset = 0
        # Why the adapter failed to load in a worker, once it has: later items
        # fail at once instead of paying for the same failed start again.
        self.start_failure: str | None = None

    def start(self) -> None:
        """Start the worker and wait until it has loaded the adapter."""
        if self.start_failure is not None:
            raise WorkerFailure(self.start_failure)
        to_worker_read, to_worker_write = os.pipe()
        from_worker_read, from_worker_write = os.pipe()
        for pipe in (to_worker_write, from_worker_write):
            _widen(pipe)
        self.stderr = tempfile.TemporaryFile()

        environment = dict(os.environ)
        # The worker imports what this process imports: --adapter modules found
        # through the working folder or pytest's rootdir included.
        environment["PYTHONPATH"] = os.pathsep.join(path for path in sys.path if path)
        kind, name = self.source
        paths = (_area_file(), _area_file())
        self.inputs, self.outputs = ArrayArea(paths[0]), ArrayArea(paths[1])
        command = [
            sys.executable,
            "-m",
            "suites.isolation",
            str(to_worker_read),
            str(from_worker_write),
            *paths,
            kind,
            name,
        ]

        try:
            self.process = subprocess.Popen(
                command,
                pass_fds=(to_worker_read, from_worker_write),
                stdin=subprocess.DEVNULL,
                stderr=self.stderr,
                env=environment,
                start_new_session=True,
            )
        finally:
            os.close(to_worker_read)
            os.close(from_worker_write)
        self.requests = Connection(to_worker_write, readable=False)
        self.replies = Connection(from_worker_read, writable=False)

        try:
            reply = self._wait("loading the adapter")
        except WorkerFailure as failure:
            self.start_failure = str(failure)
            raise
        finally:
            # The worker opens the area files before it loads the adapter, so
            # once it has replied or died their names can go. Nothing is left
            # behind, whatever happens to either process later.
            for path in paths:
                os.unlink(path)
        if reply[0] != "ready":
            self.stop()
            self.start_failure = (
                f"the worker process could not load the adapter: {reply[1]}"
            )
            raise WorkerFailure(self.start_failure)

    def stop(self) -> None:
        """Kill the worker's process group and release its pipes, noting its peak
        resident memory in WORKER_PEAKS_MIB first."""
        if self.process is not None and self.process.poll() is None:
            peak = peak_resident_mib(self.process.pid)
            if peak is not None:
                WORKER_PEAKS_MIB.append(peak)
            try:
                os.killpg(self.process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.process.wait()
        for connection in (self.requests, self.replies, self.inputs, self.outputs):
            if connection is not None:
                connection.close()
        if self.stderr is not None:
            self.stderr.close()
        self.process = self.requests = self.replies = self.stderr = None
        self.inputs = self.outputs = None

    def run(self, request: Request) -> object:
        """Run the request in the worker and return the adapter's result. Raises
        Rejected as the adapter did, and WorkerFailure for any other failure."""
        if self.process is None:
            self.start()
        self._mark_stderr()
        arrays = _numeric_arrays(request, INPUT_NAMES)
        layout, size = self.inputs.put(arrays)
        skeleton = dataclasses.replace(request, **dict.fromkeys(layout))
        try:
            self.requests.send(("run", skeleton, layout, size))
        except (BrokenPipeError, OSError):
            self._died("before the item reached it")
        reply = self._wait("running the item")
        kind = reply[0]
        in_area = {name: self.inputs.view(place) for name, place in layout.items()}
        changed = changed_inputs_message(in_area, arrays)
        if changed is not None:
            raise WorkerFailure(changed)
        if kind == "result":
            self._check_memory_after_item()
            return self._unpack(reply[1], reply[2], reply[3])
        if kind == "rejected":
            raise Rejected(reply[1])
        raise WorkerFailure(reply[1])

    def _unpack(self, result: object, layout: dict, size: int) -> object:
        """Return the result with its arrays copied out of the output area, which
        the next item reuses."""
        if not layout:
            return result
        self.outputs.attach(size)
        arrays = {
            name: self.outputs.view(place).copy() for name, place in layout.items()
        }
        return dataclasses.replace(result, **arrays)

    def _mark_stderr(self) -> None:
        self.stderr_offset = self.stderr.seek(0, os.SEEK_END)

    def _stderr_tail(self) -> str:
        """Return what the worker wrote to stderr during this item: faulthandler's
        report of a fatal signal, shortened to its error and innermost frame, or
        else the last lines."""
        self.stderr.seek(self.stderr_offset)
        text = self.stderr.read().decode("utf-8", "replace").strip()
        if not text:
            return ""
        lines = text.splitlines()
        fatal = [line for line in lines if line.startswith("Fatal Python error:")]
        frames = [line.strip() for line in lines if line.strip().startswith("File ")]
        if fatal and frames:
            return f"; faulthandler: {fatal[-1]}, innermost frame: {frames[0]}"
        tail = " | ".join(line.strip() for line in lines[-STDERR_TAIL_LINES:])
        return "; its stderr ended: " + tail[-STDERR_TAIL_CHARACTERS:]

    def _wait(self, doing: str) -> tuple:
        """Wait for the worker's next message while it runs under the limits."""
        deadline = time.monotonic() + self.limits.timeout_s
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                self.stop()
                raise WorkerFailure(
                    f"timed out: the worker process was {doing} for more than "
                    f"{self.limits.timeout_s:g} s (--item-timeout) and was killed"
                )
            try:
                if self.replies.poll(min(left, POLL_INTERVAL_S)):
                    return self.replies.recv()
            except (EOFError, OSError):
                self._died(f"while {doing}")
            if self.process.poll() is not None:
                # Exited without a word: read anything it wrote before it went.
                if self.replies.poll(0):
                    try:
                        return self.replies.recv()
                    except (EOFError, OSError):
                        pass
                self._died(f"while {doing}")
            self._check_memory(doing)

    def _check_memory(self, doing: str) -> None:
        limit = self.limits.memory_mib
        if limit is None:
            return
        used = resident_mib(self.process.pid)
        if used is not None and used > limit:
            self.stop()
            raise WorkerFailure(
                f"out of memory: the worker process used {used} MiB while {doing}, "
                f"over the --worker-memory limit of {limit} MiB, and was killed"
            )

    def _check_memory_after_item(self) -> None:
        """Restart the worker before the next item when this one left it over the
        memory limit. The item's result is kept, and its leak does not reach the
        next item."""
        limit = self.limits.memory_mib
        used = resident_mib(self.process.pid) if limit is not None else None
        if used is not None and used > limit:
            self.stop()

    def _died(self, when: str) -> None:
        self.process.wait()
        tail = self._stderr_tail()
        cause = describe_exit(self.process.returncode)
        self.stop()
        raise WorkerFailure(f"the worker process {cause} {when}{tail}")


class IsolatedAdapter:
    """An adapter whose run() happens in a worker process. Every other attribute
    is the adapter's own, loaded in this process."""

    def __init__(self, adapter: object, source: tuple[str, str], limits: Limits):
        self.adapter = adapter
        self.worker = Worker(source, limits)

    def __getattr__(self, name: str):
        return getattr(self.adapter, name)

    def run(self, request: Request) -> object:
        return self.worker.run(request)

    def close(self) -> None:
        self.worker.stop()


# The worker process.


def _load(kind: str, name: str) -> object:
    if kind == "framework":
        return registry.load_builtin(name)
    return registry.load(name)


INPUT_NAMES = (
    "x",
    "gamma",
    "beta",
    "grad_output",
    "grad_grad_input",
    "running_mean",
    "running_var",
    "grad_outputs",
)


@dataclass(frozen=True)
class Checksum:
    """The CRC-32 of an input's bytes, kept in place of a copy of a large input."""

    value: int


def _checksum(array: np.ndarray) -> Checksum:
    return Checksum(zlib.crc32(memoryview(np.ascontiguousarray(array)).cast("B")))


def input_snapshot(request: Request) -> dict[str, np.ndarray | Checksum]:
    """Return a copy of each input array, or its checksum when it has more than
    CHUNK_ELEMENTS elements, to tell afterwards whether the adapter wrote to its
    inputs. For small arrays a copy and a comparison cost less than a checksum;
    for large ones the checksum spares a copy of hundreds of MiB."""
    return {
        name: _checksum(array) if array.size > cases.CHUNK_ELEMENTS else array.copy()
        for name in INPUT_NAMES
        if (array := getattr(request, name)) is not None
    }


def _same_bytes(current: np.ndarray, before: np.ndarray | Checksum) -> bool:
    """Return True if `current` has the bytes that `before` had (a copy) or summed
    to (a Checksum). Bytes are compared, not values, so a NaN equals itself."""
    if isinstance(before, Checksum):
        return _checksum(current) == before
    if current.shape != before.shape or current.dtype != before.dtype:
        return False
    contiguous = current.flags.c_contiguous and before.flags.c_contiguous
    if current.size <= cases.CHUNK_ELEMENTS or not contiguous:
        return current.tobytes() == before.tobytes()
    # A large array piece by piece, through byte views: no copy of it whole.
    now, then = current.reshape(-1).view(np.uint8), before.reshape(-1).view(np.uint8)
    step = cases.CHUNK_ELEMENTS
    return all(
        np.array_equal(now[start : start + step], then[start : start + step])
        for start in range(0, now.size, step)
    )


def changed_inputs_message(
    current: dict[str, np.ndarray], before: dict[str, np.ndarray | Checksum]
) -> str | None:
    """Return the error message for the inputs whose `current` arrays differ from
    `before` (a copy or a checksum of each, by name), or None when none differs."""
    changed = [
        name for name, array in before.items() if not _same_bytes(current[name], array)
    ]
    if not changed:
        return None
    return (
        f"the adapter changed its input {', '.join(changed)} in place; a kernel "
        "must leave its inputs unchanged"
    )


def _reply_to(adapter: object, request: Request) -> tuple:
    try:
        result = adapter.run(request)
    except Rejected as rejection:
        return ("rejected", str(rejection))
    except BaseException as crash:  # noqa: BLE001 - any adapter failure is a verdict
        # BaseException: an adapter's SystemExit or KeyboardInterrupt is its own
        # failure too, and the worker is in a session of its own, so a Ctrl-C on
        # the terminal never reaches it.
        last = traceback.extract_tb(crash.__traceback__)[-1]
        return (
            "raised",
            f"adapter raised {type(crash).__name__}: {crash} "
            f"(at {last.filename}:{last.lineno})",
        )
    return ("result", sendable(result))


@dataclass(frozen=True)
class Foreign:
    """Stands in for an object of the adapter's result that is not a NumPy array
    or a Result (a framework tensor, say): such objects are not sent back, because
    unpickling them can need the framework's own machinery. The verdicts name its
    type."""

    type_name: str


def sendable(result: object) -> object:
    """Return the result with every field that must be an array and is not one,
    and any object that is not a Result or None, replaced by a Foreign."""
    if result is None:
        return None
    if not isinstance(result, Result):
        return Foreign(type(result).__name__)
    fields = {}
    for name in RESULT_ARRAYS:
        value = getattr(result, name)
        if value is not None and not isinstance(value, np.ndarray):
            fields[name] = Foreign(type(value).__name__)
    return dataclasses.replace(result, **fields) if fields else result


def _die_with_parent() -> None:
    """Ask Linux to kill this process when the pytest process dies, so that a
    worker stuck in a loop does not outlive a killed run. Elsewhere, do nothing."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):
        return


def _receive(message: tuple, inputs: ArrayArea) -> Request:
    """Return the request a "run" message describes, its arrays read-only views of
    the input area, as they are read-only in the pytest process."""
    _, skeleton, layout, size = message
    inputs.attach(size)
    views = {name: inputs.view(place) for name, place in layout.items()}
    for view in views.values():
        view.flags.writeable = False
    return dataclasses.replace(skeleton, **views)


def _pack(reply: tuple, outputs: ArrayArea) -> tuple:
    """Return a "result" reply with the result's arrays moved to the output area,
    or any other reply as it is."""
    if reply[0] != "result" or not isinstance(reply[1], Result):
        return (*reply, {}, 0) if reply[0] == "result" else reply
    result = reply[1]
    layout, size = outputs.put(_numeric_arrays(result, RESULT_ARRAYS))
    return (
        "result",
        dataclasses.replace(result, **dict.fromkeys(layout)),
        layout,
        size,
    )


def worker_main(arguments: list[str]) -> int:
    read_fd, write_fd, inputs_path, outputs_path, kind, name = arguments
    _die_with_parent()
    faulthandler.enable()
    requests = Connection(int(read_fd), writable=False)
    replies = Connection(int(write_fd), readable=False)
    inputs, outputs = ArrayArea(inputs_path), ArrayArea(outputs_path)
    try:
        adapter = _load(kind, name)
    except Exception as error:  # noqa: BLE001 - sent to the pytest process
        replies.send(("failed", f"{type(error).__name__}: {error}"))
        return 1
    replies.send(("ready", getattr(adapter, "framework", "")))
    while True:
        try:
            message = requests.recv()
        except EOFError:
            return 0
        reply = _pack(_reply_to(adapter, _receive(message, inputs)), outputs)
        try:
            replies.send(reply)
        except Exception as error:  # noqa: BLE001 - an unpicklable result
            replies.send(
                (
                    "raised",
                    f"the adapter's result cannot be sent to the pytest process: "
                    f"{type(error).__name__}: {error}",
                )
            )


if __name__ == "__main__":
    # Run the worker from the imported module, not from __main__, so that the
    # classes it sends (Foreign) unpickle as suites.isolation's in pytest.
    from suites import isolation

    sys.exit(isolation.worker_main(sys.argv[1:]))
