"""KIP across several processes: JAX's multi-controller runtime, configured from the environment.

Every process runs the same program on the same params and data; `jax.distributed` joins their
devices into one global set, `devices.mesh()` spans it, and target batches are split across all
of them while the support is replicated (docs/scaling.md, "Several processes"). What is
ours, rather than JAX's:

* Configuration. Explicit: KIP_COORDINATOR=host:port, KIP_NUM_PROCESSES=N, KIP_PROCESS_ID=i on
  every process (process 0 hosts the coordination service). Or KIP_DISTRIBUTED=auto, which lets
  `jax.distributed.initialize()` read a scheduler's own variables (SLURM, Open MPI, ...). Neither
  set: one process, and nothing here does anything.
* CPU collectives. On CPU the processes exchange gradients through gloo (TCP), which JAX ships.
* One executable everywhere. The compiled step's identity must not depend on which line of which
  program called it: tracebacks stay out of the compiled modules (`initialize_from_env`).
* A watchdog. A process whose peer dies would otherwise wait in a collective until JAX's own
  heartbeat gives up (100 s by default, then an abort with a page of logs). Each process beats
  a counter into the coordination service's key-value store twice a second and watches its peers':
  when one stops for `KIP_PEER_TIMEOUT` seconds (default 10), or the service itself fails or stops
  answering for that long (a stopped coordinator still accepts connections, so a call to it would
  block forever: the calls run on a thread of their own and the watchdog times them), the process
  prints one line and exits with code 75, whatever its main thread is blocked in. Every way out of
  a failed run goes through one lock, so a process says one line however many threads notice.
* `launch`: `kip distill --processes N` starts N such processes on this machine (for trying it,
  and for the tests) and stops them all, with one line, when one fails. The launcher hosts the
  coordination service itself (KIP_SERVICE_IN_LAUNCHER=1 tells process 0 not to start one): JAX's
  coordination agent aborts every process (exit 134, a page of fatal logs) the moment the service's
  connection drops, and with process 0 hosting it, a killed process 0 would take it along.

Only process 0 writes (artifacts, checkpoints, MLflow); all of them read a checkpoint to resume.
"""
from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from typing import Sequence

from pipeline.errors import UserError

EXIT_PEER_LOST = 75  # EX_TEMPFAIL: rerun, the checkpoint resumes it
_BEAT_SECONDS = 0.5
_STOP_GRACE_SECONDS = 5.0  # how long `launch` lets a process it stops unwind after SIGTERM
_SERVICE_IN_LAUNCHER = "KIP_SERVICE_IN_LAUNCHER"
_state = {"initialized": False}
_leaving = threading.Lock()  # held by the one thread that says why this process stops, then ends it


def initialize_from_env() -> bool:
    """Join the processes named by the environment; False (and nothing done) for a single process."""
    if _state["initialized"]:
        return True
    explicit = os.environ.get("KIP_COORDINATOR")
    if not explicit and os.environ.get("KIP_DISTRIBUTED") != "auto":
        return False
    import jax

    timeout = _peer_timeout()
    jax.config.update("jax_cpu_collectives_implementation", "gloo")  # CPU devices only; GPUs use NCCL
    # Processes that reach one jitted step from different lines (the distill stage's process 0
    # tracks the run, the others do not) compile modules that differ only in their traceback
    # metadata. On jax 0.12.1 (not on 0.5.3) their all-reduces then never meet: every process
    # waits in gloo for ever (tests/test_multiprocess.py, the stage test). The innermost frame,
    # our own code and the same in every process, stays in the metadata.
    jax.config.update("jax_include_full_tracebacks_in_locations", False)
    if explicit:
        count, index = _int_env("KIP_NUM_PROCESSES", 1), _int_env("KIP_PROCESS_ID", 0)
        if not 0 <= index < count:
            raise UserError(f"KIP_PROCESS_ID={index} is not allowed with KIP_NUM_PROCESSES={count}; expected 0..{count - 1}")
        in_launcher = os.environ.get(_SERVICE_IN_LAUNCHER) == "1"
        with _no_service_here() if in_launcher else contextlib.nullcontext():
            jax.distributed.initialize(coordinator_address=explicit, num_processes=count, process_id=index,
                                       initialization_timeout=_int_env("KIP_INIT_TIMEOUT", 120))
        coordinator = "the launcher (it hosts the coordination service)" if in_launcher else "the coordinator (process 0)"
    else:
        jax.distributed.initialize()
        coordinator = "the coordinator (process 0)"
    _state["initialized"] = True
    if jax.process_count() > 1:
        _start_watchdog(jax.process_index(), jax.process_count(), timeout, coordinator)
    return True


def _peer_timeout() -> float:
    value = os.environ.get("KIP_PEER_TIMEOUT", "10")
    try:
        seconds = float(value)
    except ValueError:
        seconds = float("nan")
    if not seconds > 0:
        raise UserError(f"KIP_PEER_TIMEOUT={value!r} is not allowed; expected a number of seconds > 0")
    return seconds


@contextlib.contextmanager
def _no_service_here():
    """`jax.distributed.initialize` makes process 0 host the coordination service; under `launch`
    the launcher already hosts it, so process 0 only connects, like the others."""
    from jax._src import distributed as jax_distributed

    # The module jax calls get_distributed_runtime_service on: xla_extension in jax 0.5, _jax later.
    name = next(n for n in ("xla_extension", "_jax") if hasattr(jax_distributed, n))
    real = getattr(jax_distributed, name)

    class _ClientOnly:
        def __getattr__(self, name: str):
            return getattr(real, name)

        @staticmethod
        def get_distributed_runtime_service(*args, **kwargs):
            return None  # jax's shutdown skips a service that is None

    setattr(jax_distributed, name, _ClientOnly())
    try:
        yield
    finally:
        setattr(jax_distributed, name, real)


def is_main() -> bool:
    """The process that writes. True when there is only one."""
    if not _state["initialized"]:
        return True
    import jax

    return jax.process_index() == 0


def same_on_every_process(value: int, what: str) -> None:
    """Refuse (one line) when the processes disagree on `value`: e.g. the step a checkpoint resumes
    from, when process 0 wrote it where the others cannot read it."""
    if process_count() == 1:
        return
    import numpy as np
    from jax.experimental import multihost_utils

    values = np.asarray(multihost_utils.process_allgather(np.asarray([value], np.int64))).reshape(-1)
    if len(set(values.tolist())) > 1:
        raise UserError(f"the processes disagree on {what} ({', '.join(map(str, values.tolist()))} by process): "
                        "put the checkpoint on a filesystem every process reads, or delete it to start afresh")


def process_count() -> int:
    if not _state["initialized"]:
        return 1
    import jax

    return jax.process_count()


# How a collective reports a peer that is gone (gloo on CPU; the coordination service; NCCL).
_PEER_GONE = ("gloo", "connection reset", "connection closed", "connection refused", "socket", "unavailable",
              "deadline_exceeded", "nccl", "coordination service")


def failed_collective(error: BaseException) -> bool:
    """An XLA runtime error, in a run of several processes, that says a peer died or vanished
    mid-collective (gloo reports the broken connection at once; the watchdog covers a peer that
    hangs). Other runtime errors (out of memory, a bug) keep their traceback."""
    if process_count() <= 1:
        return False
    import jax

    if not isinstance(error, jax.errors.JaxRuntimeError):  # jaxlib's XlaRuntimeError on jax 0.5.3
        return False
    message = str(error).lower()
    return any(sign in message for sign in _PEER_GONE)


def leave(code: int) -> None:
    """End this process's part. On success, tell the peers (they then wait for it at JAX's
    shutdown barrier instead of taking its silence for a death). On failure, leave at once: JAX's
    exit handler would wait at that barrier for peers that are blocked in the next collective, for
    minutes; exiting closes this process's connections, which stops them within seconds."""
    if not _state["initialized"]:
        return
    if code:
        exit_now(code)
    stopping = _state.get("stopping")
    if stopping is not None:
        stopping.set()
        # A beat still on its way would land after "done" and overwrite it: let it arrive first.
        _state["beater"].join(timeout=2.0)
    client = _state.get("client")
    if client is not None:
        try:
            client.key_value_set(f"kip/beat/{_state['index']}", _DONE, allow_overwrite=True)
        except Exception:
            pass


def describe_failed_collective(error: BaseException) -> str:
    """One line for the user: what broke, and that rerunning resumes."""
    reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    reason = reason.split(": ", 1)[-1][:200]
    return (f"a peer process stopped during a collective ({reason}); rerun the same command on every process "
            f"to resume from the last checkpoint (exit {EXIT_PEER_LOST})")


def exit_code_of_failure(error: Exception, command: str) -> int:
    """The exit code of `command` (e.g. "kip distill") after an unexpected error. A lost peer
    prints one line and exits EXIT_PEER_LOST at once (unless the watchdog, noticing the same loss,
    already is: then its line is the one); in one process the error propagates, its traceback
    being the report; among several, each prints its traceback and returns 1, so the launcher
    sees every process's rather than the first one's."""
    if failed_collective(error):
        _say_and_exit(f"{command}: {describe_failed_collective(error)}", EXIT_PEER_LOST)
    if process_count() == 1:
        raise error
    import traceback

    traceback.print_exception(error)
    return 1


def _int_env(name: str, default: int) -> int:
    value = os.environ.get(name, str(default))
    try:
        return int(value)
    except ValueError:
        raise UserError(f"{name}={value!r} is not allowed; expected an integer") from None


_DONE = "done"


def _start_watchdog(index: int, count: int, timeout: float, coordinator: str) -> None:
    import atexit

    from jax._src import distributed as jax_distributed  # the client of the process group just joined

    client = jax_distributed.global_state.client
    stopping = threading.Event()
    _state.update(client=client, stopping=stopping, index=index)
    # Registered after jax.distributed's own exit handler, so it runs first: no watchdog verdicts
    # while JAX's shutdown barrier waits for the peers (`leave` has told them how this one ended).
    atexit.register(stopping.set)
    beats = _Beats()
    _state["beater"] = threading.Thread(target=_beat, args=(client, index, beats, stopping), name="kip-peer-beat", daemon=True)
    _state["beater"].start()
    threading.Thread(target=_watch, args=(beats, index, count, timeout, stopping, coordinator), name="kip-peer-watchdog",
                     daemon=True).start()


class _Beats:
    """What the beating thread last read from the key-value store, for the watching thread."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.rounds = 0  # round trips completed
        self.in_flight = False  # a round trip has started and not come back
        self.values: dict[str, str] = {}
        self.error: Exception | None = None


def _beat(client, index: int, beats: _Beats, stopping: threading.Event) -> None:
    """Publish this process's beat and read everyone's, every _BEAT_SECONDS. Its own thread: a call
    to a coordinator that is stopped (SIGSTOP, a frozen host) never returns, and jaxlib's
    key-value calls take no timeout; `_watch` times each round trip instead."""
    beat = 0
    while not stopping.is_set():
        beat += 1
        with beats.lock:
            beats.in_flight = True
        try:
            client.key_value_set(f"kip/beat/{index}", str(beat), allow_overwrite=True)
            values = dict(client.key_value_dir_get("kip/beat/"))
        except Exception as error:  # the coordination service is unreachable: it died, or the network did
            with beats.lock:
                beats.error = error
            return
        with beats.lock:
            beats.in_flight, beats.values, beats.rounds = False, values, beats.rounds + 1
        stopping.wait(_BEAT_SECONDS)


def _watch(beats: _Beats, index: int, count: int, timeout: float, stopping: threading.Event, coordinator: str) -> None:
    """Exit the process (one line, EXIT_PEER_LOST) when a peer's beat or the coordinator's answer
    has been missing for `timeout` seconds, or the coordinator is gone.

    Time is counted in this thread's own ticks, each worth at most two: a process that was itself
    stopped or starved of the interpreter lock for a while does not, on waking, blame its peers or
    the coordinator for the time it could not look."""
    tick = min(_BEAT_SECONDS, timeout / 4)
    silent = {peer: [None, 0.0] for peer in range(count) if peer != index}  # last beat seen, seconds unchanged
    waiting, judged, previous = 0.0, 0, time.monotonic()
    while not stopping.wait(tick):
        now = time.monotonic()
        elapsed, previous = min(now - previous, 2 * tick), now
        with beats.lock:
            rounds, in_flight, values, error = beats.rounds, beats.in_flight, beats.values, beats.error
        if stopping.is_set():
            return
        if error is not None:
            _lost(coordinator)
        fresh, judged = rounds != judged, rounds
        waiting = waiting + elapsed if in_flight and not fresh else 0.0
        if waiting > timeout:  # this round trip has not come back: the coordinator is stopped or cut off
            _lost(coordinator)
        for peer, entry in silent.items():
            entry[1] += elapsed
            if fresh:
                value = values.get(f"kip/beat/{peer}")
                if value == _DONE or value != entry[0]:
                    entry[:] = [value, 0.0]
                elif entry[1] > timeout:
                    _lost(f"process {peer}" if entry[0] is not None else f"process {peer} (never started)")


def _lost(who: str) -> None:
    _say_and_exit(f"kip: {who} stopped responding; stopping this process too (exit {EXIT_PEER_LOST}): rerun the same "
                  "command on every process to resume from the last checkpoint", EXIT_PEER_LOST)


def _say_and_exit(line: str, code: int) -> None:
    """Print `line` and end the process with `code`, unless another thread already is ending it:
    then wait for that (the main thread and the watchdog often notice the same loss at once)."""
    _claim_exit()
    print(line, file=sys.stderr, flush=True)
    _exit(code)


def exit_now(code: int) -> None:
    """Leave at once, skipping exit handlers: jax.distributed's own waits at a shutdown barrier for
    every process, and a dead peer never arrives there (minutes, not seconds)."""
    _claim_exit()
    _exit(code)


def _claim_exit() -> None:
    if not _leaving.acquire(blocking=False):
        threading.Event().wait()  # another thread is printing its line; its os._exit ends this one too


def _exit(code: int) -> None:
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    finally:
        os._exit(code)  # the main thread may be blocked in a collective that will never finish


def launch(argv: Sequence[str], processes: int, devices_per_process: int | None = None) -> int:
    """Run `kip <argv>` as `processes` cooperating processes on this machine; their exit code.

    This process hosts the coordination service, so that a process killed or stopped does not take
    it along. When one process fails, the others are stopped (a stopped one SIGKILL at once, the
    rest SIGTERM, then SIGKILL after _STOP_GRACE_SECONDS) and one line says which failed. Process
    0's output passes through; the others run quietly.
    """
    if processes < 1:
        raise UserError(f"--processes={processes} is not allowed; expected an integer >= 1")
    if devices_per_process is not None and devices_per_process < 1:
        raise UserError(f"--devices-per-process={devices_per_process} is not allowed; expected an integer >= 1")
    from pipeline.compat import jaxlib_extension

    port = _free_port()
    service = jaxlib_extension().get_distributed_runtime_service(f"127.0.0.1:{port}", processes)
    children: list[subprocess.Popen] = []
    try:
        for index in range(processes):
            env = {**os.environ, "KIP_COORDINATOR": f"127.0.0.1:{port}", "KIP_NUM_PROCESSES": str(processes),
                   "KIP_PROCESS_ID": str(index), _SERVICE_IN_LAUNCHER: "1"}
            if devices_per_process:
                flags = [f for f in env.get("XLA_FLAGS", "").split() if "device_count" not in f]
                env["XLA_FLAGS"] = " ".join([*flags, f"--xla_force_host_platform_device_count={devices_per_process}"])
            command = [sys.executable, "-m", "pipeline.run.cli", *argv] + ([] if index == 0 else ["--quiet"])
            children.append(subprocess.Popen(command, env=env, stdout=None if index == 0 else subprocess.DEVNULL))
        return _wait_all(children)
    finally:
        _stop(children)
        service.shutdown()


def _wait_all(children: list[subprocess.Popen]) -> int:
    while True:
        codes = [child.poll() for child in children]
        if any(code not in (None, 0) for code in codes):
            # The first failure makes the others exit EXIT_PEER_LOST within moments; report the
            # cause, not the echo: give them a moment, then prefer a code that is not that one.
            time.sleep(1.0)
            codes = [child.poll() for child in children]
            failed = [(i, code) for i, code in enumerate(codes) if code not in (None, 0)]
            index, code = next(((i, c) for i, c in failed if c != EXIT_PEER_LOST), failed[0])
            print(f"kip: process {index} of {len(children)} exited with code {code}; stopped the others",
                  file=sys.stderr, flush=True)
            return code if code > 0 else 128 - code  # a signal's exit code, as a shell reports it
        if all(code == 0 for code in codes):
            return 0
        time.sleep(0.2)


def _stop(children: list[subprocess.Popen]) -> None:
    for child in children:
        if child.poll() is not None:
            continue
        if _is_stopped(child.pid):
            child.kill()  # SIGSTOPped: it would see SIGTERM only once resumed, and then add lines of its own
        else:
            child.send_signal(signal.SIGTERM)
            child.send_signal(signal.SIGCONT)  # in case it was stopped after all: SIGTERM then reaches it
    deadline = time.monotonic() + _STOP_GRACE_SECONDS
    for child in children:
        try:
            child.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()


def _is_stopped(pid: int) -> bool:
    """Whether the process is stopped (SIGSTOP, a debugger); False where /proc cannot say."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            return stat.read().rsplit(b")", 1)[1].split()[0] in (b"T", b"t")
    except (OSError, IndexError):
        return False


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]
