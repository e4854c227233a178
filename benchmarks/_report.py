"""What every benchmark script does with its result: print it as JSON, optionally save it, and say
which machine it was measured on (numbers without a machine are not comparable)."""
from __future__ import annotations

import json
import os
import platform
from pathlib import Path
from typing import Any


def machine() -> dict[str, Any]:
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 0
    return {"platform": platform.platform(), "processor": platform.processor(), "cpus": cpus}


def emit(report: dict[str, Any], out: Path | None) -> None:
    text = json.dumps({**report, "machine": machine()}, indent=2)
    print(text)
    if out:
        out.write_text(text + "\n")


class OtherLoad:
    """How many cores *other* processes kept busy while a sample ran: the machine's busy time from
    /proc/stat minus this process's own CPU time, over the wall time. A timing taken while this is
    above LOADED_CORES is not a measurement of our code alone; benchmarks flag it."""

    LOADED_CORES = 0.1

    def __enter__(self) -> "OtherLoad":
        self._busy, self._own, self._wall = _busy_seconds(), _own_seconds(), _now()
        return self

    def __exit__(self, *exc) -> None:
        wall = max(_now() - self._wall, 1e-9)
        other = (_busy_seconds() - self._busy) - (_own_seconds() - self._own)
        self.cores = max(0.0, other / wall)
        self.loaded = self.cores > self.LOADED_CORES


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
