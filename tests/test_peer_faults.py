"""A process of a several-process run stopped (SIGSTOP) or killed (SIGKILL) mid-run: the others stop
with one line and exit 75 within KIP_PEER_TIMEOUT, and `kip distill --processes N` returns promptly
with one line of its own (pipeline/run/distributed.py, docs/scaling.md "Several processes").

Every run is the real CLI in real processes on 127.0.0.1, 2 processes of 1 device, the small
embedded digits set; the fault comes once the first checkpoint exists (the run is under way: the
processes are in their step loop, blocked in or between collectives). KIP_PEER_TIMEOUT is 3 s to
keep the tests short. The kill of a worker, and the resumed rerun after it, is
tests/test_multiprocess.py's.

Time bounds, from the fault to the exit: the watchdog counts time in ticks of 0.5 s, so it decides
within the timeout plus two ticks (the tick it crosses the timeout on, and the tick lost when a
round trip had just been replaced by the next); the launcher then waits 1 s for the others' echoes
before it reports, and polls every 0.2 s. The remaining slack (2 s) is for a loaded 2-core CI
machine, where a late tick counts two ticks at most, so that detection can be later than on an
idle one, never earlier.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="finds the launcher's children in /proc")

TIMEOUT = 3.0
WATCHDOG = TIMEOUT + 2 * 0.5  # the watchdog's verdict: the timeout plus two ticks
SLACK = 2.0
LAUNCHER = 1.0 + 0.2  # the launcher's wait for echoes, and its polling
RUN = ["distill", "--source", "embedded", "--dataset", "digits", "--support-per-class", "3", "--target-batch", "400",
       "--float64", "--learn-labels", "-q", "--steps", "5000", "--checkpoint-every", "10"]
RERUN = "rerun the same command on every process to resume from the last checkpoint"


def _env(**extra: str) -> dict[str, str]:
    # No TF_CPP_MIN_LOG_LEVEL from the test: what a user sees, JAX's own fatal logs included if any.
    env = {k: v for k, v in os.environ.items() if not k.startswith(("KIP_", "TF_CPP_")) or k == "KIP_CACHE_DIR"}
    env.update({"KIP_PEER_TIMEOUT": str(TIMEOUT), **extra})
    return env


def _cli(args: list[str], env: dict[str, str], cwd: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "pipeline.run.cli", *args], env=env, cwd=cwd, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def _under_way(tmp_path: Path, processes: list[subprocess.Popen]) -> None:
    deadline = time.monotonic() + 240
    while not (tmp_path / "run.ckpt.npz").exists():
        assert time.monotonic() < deadline and all(p.poll() is None for p in processes), "the run never checkpointed"
        time.sleep(0.05)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.strip()]


def _launched(tmp_path: Path) -> tuple[subprocess.Popen, list[int]]:
    """`kip distill --processes 2`, under way, and the process ids of its two processes (0, 1)."""
    launcher = _cli([*RUN, "--checkpoint", str(tmp_path / "run.ckpt.npz"), "-o", str(tmp_path / "out.npz"),
                     "--processes", "2"], _env(), tmp_path)
    _under_way(tmp_path, [launcher])
    children = [int(pid) for pid in Path(f"/proc/{launcher.pid}/task/{launcher.pid}/children").read_text().split()]
    assert len(children) == 2, children
    return launcher, children  # started in order: process 0, then process 1


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def _finish_launcher(launcher: subprocess.Popen, children: list[int], since: float) -> tuple[int, list[str], float]:
    try:
        _, err = launcher.communicate(timeout=120)
    finally:
        for pid in children:  # whatever happened, nothing of this test outlives it
            if not _gone(pid):
                os.kill(pid, signal.SIGKILL)
    took = time.monotonic() - since
    assert all(_gone(pid) for pid in children), "the launcher left a process behind"
    return launcher.returncode, _lines(err), took


def test_a_stopped_coordinator_stops_the_other_with_one_line_within_the_peer_timeout(tmp_path):
    """Cluster configuration (environment variables, process 0 hosts the coordination service):
    process 0 stopped, its socket still accepting, so process 1's key-value calls to it never
    return. Process 1's watchdog times them: one line, exit 75, within the timeout."""
    port = _free_port()
    pair = [_cli([*RUN, "--checkpoint", str(tmp_path / "run.ckpt.npz"), "-o", str(tmp_path / f"out{i}.npz")],
                 _env(KIP_COORDINATOR=f"127.0.0.1:{port}", KIP_NUM_PROCESSES="2", KIP_PROCESS_ID=str(i)), tmp_path)
            for i in range(2)]
    try:
        _under_way(tmp_path, pair)
        pair[0].send_signal(signal.SIGSTOP)
        stopped_at = time.monotonic()
        _, err = pair[1].communicate(timeout=120)
        took = time.monotonic() - stopped_at
    finally:
        for process in pair:
            process.send_signal(signal.SIGCONT)
            process.kill()
            process.communicate()
    lines = _lines(err)
    assert pair[1].returncode == 75, err[-3000:]
    assert len(lines) == 1 and lines[0].startswith("kip: the coordinator (process 0) stopped responding") \
        and RERUN in lines[0], err[-3000:]
    assert took < WATCHDOG + SLACK, took


@pytest.mark.parametrize("stopped", [0, 1], ids=["coordinator", "worker"])
def test_a_stopped_process_under_the_launcher_stops_the_run_promptly(tmp_path, stopped):
    """`kip distill --processes 2`, one process stopped (SIGSTOP): the other says so in one line, the
    launcher adds its one line, kills the stopped process at once (SIGTERM would wait for it to be
    resumed) and returns 75."""
    other = 1 - stopped
    launcher, children = _launched(tmp_path)
    os.kill(children[stopped], signal.SIGSTOP)
    code, lines, took = _finish_launcher(launcher, children, time.monotonic())
    assert code == 75, lines
    assert len(lines) == 2, lines
    assert lines[0].startswith(f"kip: process {stopped} stopped responding") and RERUN in lines[0], lines
    assert lines[1] == f"kip: process {other} of 2 exited with code 75; stopped the others", lines
    assert took < WATCHDOG + LAUNCHER + SLACK, took


def test_a_killed_coordinator_under_the_launcher_gives_one_line_and_the_launchers(tmp_path):
    """`kip distill --processes 2`, process 0 killed: process 1 stops with exactly one line (no
    fatal logs of JAX's coordination agent: the launcher hosts the coordination service, which
    process 0's death leaves up) and the launcher names the cause, process 0's SIGKILL (137)."""
    launcher, children = _launched(tmp_path)
    os.kill(children[0], signal.SIGKILL)
    code, lines, took = _finish_launcher(launcher, children, time.monotonic())
    assert code == 137, lines
    assert len(lines) == 2, lines
    assert lines[0].startswith(("kip distill: a peer process stopped during a collective", "kip: process 0 stopped responding")) \
        and RERUN in lines[0], lines
    assert lines[1] == "kip: process 0 of 2 exited with code -9; stopped the others", lines
    assert took < WATCHDOG + LAUNCHER + SLACK, took  # at once when the collective breaks, as a rule


@pytest.mark.parametrize("value", ["ten", "0", "-1", "nan"])
def test_a_bad_peer_timeout_is_a_one_line_error_before_joining(tmp_path, value):
    """Checked before `jax.distributed.initialize`, so the process does not wait for its peers first."""
    env = _env(KIP_COORDINATOR=f"127.0.0.1:{_free_port()}", KIP_NUM_PROCESSES="2", KIP_PROCESS_ID="1",
               KIP_PEER_TIMEOUT=value, KIP_INIT_TIMEOUT="5")
    process = _cli([*RUN, "-o", str(tmp_path / "out.npz")], env, tmp_path)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 2 and _lines(err) == [
        f"kip distill: error: KIP_PEER_TIMEOUT={value!r} is not allowed; expected a number of seconds > 0"], err[-2000:]
