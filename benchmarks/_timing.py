"""Load-gated, interleaved timing shared by the benchmarks: numbers that cannot silently include
someone else's work.

Every sample records the cores other processes kept busy while it ran (`_report.OtherLoad`); a
sample above `OtherLoad.LOADED_CORES` is retried (up to `max_tries` per wanted sample) and kept in
the record either way. Implementations being compared run in turn within each round, so a load
spell or a thermal change hits all of them alike. A result is `loaded` when fewer than `repeats`
quiet samples were obtained; its median then comes from every sample and must not be published.
"""
from __future__ import annotations

import statistics
import time
from typing import Any, Callable

from _report import OtherLoad


def timed_ms(fn: Callable[[], Any]) -> tuple[float, float]:
    """(milliseconds, other processes' cores) of one call; fn must block until its work is done."""
    with OtherLoad() as load:
        start = time.perf_counter()
        fn()
        ms = (time.perf_counter() - start) * 1e3
    return ms, load.cores


def interleaved(jobs: dict[str, Callable[[], Any]], repeats: int, max_tries: int = 4) -> dict[str, dict]:
    """name -> summary of `repeats` quiet samples of each job, taken in rounds (one of each job per round)."""
    samples: dict[str, list[tuple[float, float]]] = {name: [] for name in jobs}
    for _ in range(repeats * max_tries):
        if all(_quiet_count(samples[name]) >= repeats for name in jobs):
            break
        for name, fn in jobs.items():
            if _quiet_count(samples[name]) < repeats:
                samples[name].append(timed_ms(fn))
    return {name: summarize(samples[name], repeats) for name, fn in jobs.items()}


def summarize(samples: list[tuple[float, float]], repeats: int) -> dict:
    quiet = [ms for ms, cores in samples if cores <= OtherLoad.LOADED_CORES]
    used = quiet if len(quiet) >= repeats else [ms for ms, _ in samples]
    ordered = sorted(used)
    return {
        "median_ms": round(statistics.median(used), 2),
        "p25_ms": round(_quantile(ordered, 0.25), 2),
        "p75_ms": round(_quantile(ordered, 0.75), 2),
        "quiet_samples": len(quiet),
        "loaded": len(quiet) < repeats,
        "samples": [{"ms": round(ms, 2), "other_cores": round(cores, 3)} for ms, cores in samples],
    }


def _quiet_count(samples: list[tuple[float, float]]) -> int:
    return sum(1 for _, cores in samples if cores <= OtherLoad.LOADED_CORES)


def _quantile(ordered: list[float], q: float) -> float:
    position = q * (len(ordered) - 1)
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)
