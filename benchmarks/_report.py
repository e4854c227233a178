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
