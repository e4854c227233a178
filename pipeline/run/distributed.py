"""KIP across several processes: JAX's multi-controller runtime, configured from the environment.

Every process runs the same program on the same params and data; `jax.distributed` joins their
devices into one global set, `devices.mesh()` spans it, and target batches are split across all
of them while the support is replicated (docs/scaling.md, "Several processes"). What is
ours, rather than JAX's:

* Configuration. Explicit: KIP_COORDINATOR=host:port, KIP_NUM_PROCESSES=N, KIP_PROCESS_ID=i on
  every process (process 0 hosts the coordinator). Or KIP_DISTRIBUTED=auto, which lets
  `jax.distributed.initialize()` read a scheduler's own variables (SLURM, Open MPI, ...). Neither
  set: one process, and nothing here does anything.
* CPU collectives. On CPU the processes exchange gradients through gloo (TCP), which JAX ships.
* A watchdog. A process whose peer dies would otherwise wait in a collective until JAX's own
  heartbeat gives up (100 s by default, then an abort with a page of logs). Each process beats
  a counter into the coordinator's key-value store twice a second and watches its peers': when one
  stops for `KIP_PEER_TIMEOUT` seconds (default 10), or the coordinator itself is gone, the process
  prints one line and exits with code 75, whatever its main thread is blocked in.
* `launch`: `kip distill --processes N` starts N such processes on this machine (for trying it,
  and for the tests) and stops them all, with one line, when one fails.

Only process 0 writes (artifacts, checkpoints, MLflow); all of them read a checkpoint to resume.
"""
from __future__ import annotations

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
_state = {"initialized": False}


def initialize_from_env() -> bool:
    """Join the processes named by the environment; False (and nothing done) for a single process."""
    if _state["initialized"]:
        return True
    explicit = os.environ.get("KIP_COORDINATOR")
    if not explicit and os.environ.get("KIP_DISTRIBUTED") != "auto":
        return False
    import jax

    jax.config.update("jax_cpu_collectives_implementation", "gloo")  # CPU devices only; GPUs use NCCL
    if explicit:
        count, index = _int_env("KIP_NUM_PROCESSES", 1), _int_env("KIP_PROCESS_ID", 0)
        if not 0 <= index < count:
            raise UserError(f"KIP_PROCESS_ID={index} is not allowed with KIP_NUM_PROCESSES={count}; expected 0..{count - 1}")
        jax.distributed.initialize(coordinator_address=explicit, num_processes=count, process_id=index,
                                   initialization_timeout=_int_env("KIP_INIT_TIMEOUT", 120))
    else:
        jax.distributed.initialize()
    _state["initialized"] = True
    if jax.process_count() > 1:
        _start_watchdog(jax.process_index(), jax.process_count(), float(os.environ.get("KIP_PEER_TIMEOUT", "10")))
    return True


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
    if process_count() <= 1 or type(error).__name__ != "XlaRuntimeError":
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
    prints one line and gives EXIT_PEER_LOST; in one process the error propagates, its traceback
    being the report; among several, each prints its traceback and returns 1, so the launcher
    sees every process's rather than the first one's."""
    if failed_collective(error):
        print(f"{command}: {describe_failed_collective(error)}", file=sys.stderr)
        return EXIT_PEER_LOST
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


def _start_watchdog(index: int, count: int, timeout: float) -> None:
    import atexit

    from jax._src import distributed as jax_distributed  # the client of the process group just joined

    client = jax_distributed.global_state.client
    stopping = threading.Event()
    _state.update(client=client, stopping=stopping, index=index)
    # Registered after jax.distributed's own exit handler, so it runs first: no watchdog verdicts
    # while JAX's shutdown barrier waits for the peers (`leave` has told them how this one ended).
    atexit.register(stopping.set)
    thread = threading.Thread(target=_watch, args=(client, index, count, timeout, stopping), name="kip-peer-watchdog", daemon=True)
    thread.start()


def _watch(client, index: int, count: int, timeout: float, stopping: threading.Event) -> None:
    """Beat, and exit the process (one line, EXIT_PEER_LOST) when a peer or the coordinator is gone."""
    beat = 0
    last_seen = {peer: (None, time.monotonic()) for peer in range(count) if peer != index}
    while not stopping.is_set():
        beat += 1
        try:
            client.key_value_set(f"kip/beat/{index}", str(beat), allow_overwrite=True)
            values = dict(client.key_value_dir_get("kip/beat/"))
        except Exception:  # the coordinator (process 0) is unreachable: it died, or the network did
            if not stopping.is_set():
                _lost("the coordinator (process 0)")
            return
        now = time.monotonic()
        for peer, (seen, since) in last_seen.items():
            value = values.get(f"kip/beat/{peer}")
            if value == _DONE or value != seen:
                last_seen[peer] = (value, now)
            elif now - since > timeout and not stopping.is_set():
                _lost(f"process {peer}" if seen is not None else f"process {peer} (never started)")
                return
        stopping.wait(_BEAT_SECONDS)


def _lost(who: str) -> None:
    print(f"kip: {who} stopped responding; stopping this process too (exit {EXIT_PEER_LOST}): rerun the same command "
          "on every process to resume from the last checkpoint", file=sys.stderr, flush=True)
    exit_now(EXIT_PEER_LOST)  # the main thread may be blocked in a collective that will never finish


def exit_now(code: int) -> None:
    """Leave at once, skipping exit handlers: jax.distributed's own waits at a shutdown barrier for
    every process, and a dead peer never arrives there (minutes, not seconds)."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def launch(argv: Sequence[str], processes: int, devices_per_process: int | None = None) -> int:
    """Run `kip <argv>` as `processes` cooperating processes on this machine; their exit code.

    When one fails, the others are stopped (SIGTERM, then SIGKILL after 10 s) and one line says
    which. Process 0's output passes through; the others run quietly.
    """
    if processes < 1:
        raise UserError(f"--processes={processes} is not allowed; expected an integer >= 1")
    if devices_per_process is not None and devices_per_process < 1:
        raise UserError(f"--devices-per-process={devices_per_process} is not allowed; expected an integer >= 1")
    port = _free_port()
    children: list[subprocess.Popen] = []
    try:
        for index in range(processes):
            env = {**os.environ, "KIP_COORDINATOR": f"127.0.0.1:{port}", "KIP_NUM_PROCESSES": str(processes),
                   "KIP_PROCESS_ID": str(index)}
            if devices_per_process:
                flags = [f for f in env.get("XLA_FLAGS", "").split() if "device_count" not in f]
                env["XLA_FLAGS"] = " ".join([*flags, f"--xla_force_host_platform_device_count={devices_per_process}"])
            command = [sys.executable, "-m", "pipeline.run.cli", *argv] + ([] if index == 0 else ["--quiet"])
            children.append(subprocess.Popen(command, env=env, stdout=None if index == 0 else subprocess.DEVNULL))
        return _wait_all(children)
    finally:
        _stop(children)


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
        if child.poll() is None:
            child.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + 10
    for child in children:
        try:
            child.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]
