"""Running the `kip` CLI on hostile files: in a child process, under an address-space limit
(RLIMIT_AS) and a timeout, with one way to check the one-line error it must end with.

Not a test module (pytest collects only test_*.py); `tests/test_hostile_inputs.py` imports it the way
tests import `test_data`, because pytest puts tests/ on sys.path.

The limit per command is its own baseline + HEADROOM. The baseline is the peak address space
(VmPeak) of the same command on a *valid* input, measured once per session in the same
environment, because what a command reserves when it imports its libraries differs a lot
(pyarrow's allocator, jax/XLA, OpenBLAS thread buffers) and between machines: one fixed number would
be too tight on one and prove nothing on another.
"""
from __future__ import annotations

import os
import stat
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

GIB = 1 << 30
HEADROOM = GIB  # what a hostile file may cost beyond the command's baseline
MAX_BASELINE = 4 * GIB  # a baseline above this would leave a limit that proves little
TIMEOUT = 60  # seconds; a handled case takes a few seconds (jax imports included)
BASELINE_TIMEOUT = 300  # the first jax-compiling run of a session may be slow


def child_env(**extra: str) -> dict[str, str]:
    """The environment of every child: quiet TensorFlow, jax on the CPU, plus `extra`."""
    return {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "JAX_PLATFORMS": "cpu", **extra}


ENV = child_env()

_VM_PEAK = (
    "import sys\nfrom pipeline.run.cli import main\ncode = main(sys.argv[1:])\n"
    "peak = [l for l in open('/proc/self/status') if l.startswith('VmPeak')][0].split()[1]\n"
    "print('VMPEAK', peak, file=sys.stderr)\nsys.exit(code)\n"
)


def vm_peak(argv: Sequence, cwd: Path, expect: int = 0) -> int:
    """Peak address space (bytes) of `kip argv` run to its end, which must be exit code `expect`."""
    result = subprocess.run([sys.executable, "-c", _VM_PEAK, *map(str, argv)], cwd=cwd, env=ENV,
                            capture_output=True, text=True, timeout=BASELINE_TIMEOUT)
    assert result.returncode == expect, result.stderr[-3000:]
    peaks = [line for line in result.stderr.splitlines() if line.startswith("VMPEAK")]
    assert peaks, result.stderr[-3000:]
    return int(peaks[-1].split()[1]) * 1024


class Limits:
    """Address-space limit per command, measured the first time a test asks for it.

    `baselines` maps a command's name to (prepare, expected exit code): `prepare(directory)` writes a
    valid input into a fresh directory and returns the `kip` arguments to measure there.
    """

    def __init__(self, root: Path, baselines: dict[str, tuple[Callable[[Path], list], int]]):
        self.root, self.baselines, self.peaks = root, baselines, {}

    def __getitem__(self, command: str) -> int:
        if command not in self.peaks:
            prepare, expect = self.baselines[command]
            directory = self.root / command
            directory.mkdir()
            self.peaks[command] = vm_peak(prepare(directory), directory, expect)
            assert self.peaks[command] < MAX_BASELINE, self.peaks
        return self.peaks[command] + HEADROOM


# The limit is set by the child itself, first thing, rather than by a preexec_fn: that would run
# Python between fork and exec in a parent that has jax's threads (a known deadlock risk).
_LIMITED = (
    "import resource, runpy, sys\n"
    "limit = int(sys.argv[1])\n"
    "resource.setrlimit(resource.RLIMIT_AS, (limit, limit))\n"
    "sys.argv = ['kip', *sys.argv[2:]]\n"
    "runpy.run_module('pipeline.run.cli', run_name='__main__')\n"
)


def run_kip(argv: Sequence, limit: int, *, cwd: Path | None = None, env: dict[str, str] | None = None,
            prefix: Sequence[str] = ()) -> subprocess.CompletedProcess:
    """`kip argv` in a child limited to `limit` bytes of address space and TIMEOUT seconds.
    `prefix` wraps the command (e.g. `unshare ...`)."""
    return subprocess.run([*prefix, sys.executable, "-c", _LIMITED, str(limit), *map(str, argv)], cwd=cwd,
                          env=ENV if env is None else env, capture_output=True, text=True, timeout=TIMEOUT)


def assert_one_line_error(result: subprocess.CompletedProcess, names: Path | str, *fragments: str) -> str:
    """Exit code 2 and stderr exactly one non-empty line naming `names` and holding every fragment,
    with no traceback and no MemoryError. Returns the line."""
    lines = result.stderr.splitlines()
    assert result.returncode == 2, result.stderr[-3000:]
    assert len(lines) == 1 and lines[0].strip(), result.stderr[-3000:]
    assert "Traceback" not in result.stderr and "MemoryError" not in result.stderr, result.stderr[-3000:]
    assert str(names) in lines[0], lines[0]
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


def listing(directory: Path) -> list[str]:
    """Every path below `directory` (recursively), relative to it, sorted."""
    return sorted(str(p.relative_to(directory)) for p in directory.rglob("*"))


def snapshot(directory: Path) -> dict[str, tuple]:
    """Names, kinds, sizes and mtimes of everything in `directory` (hidden temp files included)."""
    result = {}
    for entry in os.scandir(directory):
        info = entry.stat(follow_symlinks=False)
        result[entry.name] = (stat.S_IFMT(info.st_mode), info.st_size, info.st_mtime_ns)
    return result
