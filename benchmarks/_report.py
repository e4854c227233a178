"""What every benchmark script does with its result: print it as JSON, optionally save it, and say
which machine it was measured on (numbers without a machine are not comparable) and how busy the
rest of that machine was while the script ran (times taken beside other work are not the code's).

Every benchmark imports this module first thing, so `_STARTED` is the script's start: `emit` adds
the cores other processes used on average since then (`other_load`), and flags the whole report
`loaded` above `OtherLoad.LOADED_CORES`. Benchmarks that compare timings also gate each sample
(`_timing.interleaved`); this run-wide figure is what the accuracy benchmarks' wall-clock and CPU
minutes can be judged by."""
from __future__ import annotations

import json
import os
import platform
from pathlib import Path
from typing import Any


def machine() -> dict[str, Any]:
    """The platform, the cores this process may use, and the CPU model with its vector extensions:
    two machines of "this kind" can differ in AVX-512/AMX, and with it in how fast matmuls run
    against element-wise work, which moves the ratios between implementations."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 0
    return {"platform": platform.platform(), "processor": platform.processor(), "cpus": cpus, **_cpu_model()}


def _cpu_model() -> dict[str, Any]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return {}
    fields = dict(line.split(":", 1) for line in text.splitlines() if ":" in line)
    fields = {key.strip(): value.strip() for key, value in fields.items()}
    flags = fields.get("flags", "").split()
    vector = sorted(f for f in flags if f in ("avx", "avx2", "fma", "avx512f", "avx512_bf16", "avx512_fp16", "amx_tile"))
    return {"cpu_model": fields.get("model name", ""), "vector_extensions": vector}


def emit(report: dict[str, Any], out: Path | None) -> None:
    text = json.dumps({**report, "other_load": run_load(), "machine": machine()}, indent=2)
    print(text)
    if out:
        out.write_text(text + "\n")


def run_load() -> dict[str, Any]:
    """Cores other processes kept busy, on average, since this script started."""
    wall = max(_now() - _STARTED[2], 1e-9)
    other = (_busy_seconds() - _STARTED[0]) - (_own_seconds() - _STARTED[1])
    cores = max(0.0, other / wall)
    return {"cores": round(cores, 3), "seconds": round(wall, 1), "loaded": cores > OtherLoad.LOADED_CORES,
            "how": "machine busy time (/proc/stat) minus this process's and its waited-for children's CPU time, over wall time"}


class OtherLoad:
    """How many cores *other* processes kept busy while a sample ran: the machine's busy time from
    /proc/stat minus this process's own CPU time, over the wall time. A timing taken while this is
    above LOADED_CORES is not a measurement of our code alone; benchmarks flag it."""

    LOADED_CORES = 0.1
    # A benchmark made of cooperating processes (benchmarks/multiprocess_step.py) sets this to the
    # pid of the parent that started them: their CPU time is then "ours" too, not other load.
    GROUP_PARENT: int | None = None

    def __enter__(self) -> "OtherLoad":
        self._busy, self._own, self._wall = _busy_seconds(), self._ours(), _now()
        return self

    def __exit__(self, *exc) -> None:
        wall = max(_now() - self._wall, 1e-9)
        other = (_busy_seconds() - self._busy) - (self._ours() - self._own)
        self.cores = max(0.0, other / wall)
        self.loaded = self.cores > self.LOADED_CORES


    def _ours(self) -> float:
        return _own_seconds() if self.GROUP_PARENT is None else _children_cpu_seconds(self.GROUP_PARENT)


def _children_cpu_seconds(parent: int) -> float:
    """User + system CPU time of every live process whose parent is `parent` (/proc/<pid>/stat)."""
    ticks, total = os.sysconf("SC_CLK_TCK"), 0.0
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == parent:  # fields[1] is ppid; utime and stime are fields[11] and [12]
            total += (int(fields[11]) + int(fields[12])) / ticks
    return total


def _busy_seconds() -> float:
    try:
        fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    except OSError:
        return float("nan")  # not Linux: the load is unknown, and `loaded` is then False; say so
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(v) for v in fields[:8])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def _own_seconds() -> float:
    times = os.times()
    return times.user + times.system + times.children_user + times.children_system


def _now() -> float:
    import time

    return time.perf_counter()


_STARTED = (_busy_seconds(), _own_seconds(), _now())
