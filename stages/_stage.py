"""What every stage entry point shares: one-line user errors and a non-zero exit, like `kip`, and
the stage's MLflow run (nested under this pipeline execution's parent run)."""
from __future__ import annotations

import argparse
import contextlib
import csv
import io
import os
import sys
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

from pipeline.errors import UserError
from pipeline.run import runtime
from pipeline.run.config import TrackingConfig
from pipeline.run.params import section
from pipeline.run.tracking import Tracker, stage_run


def _require_full_install() -> None:
    """A stage run from the base or '.[read]' install (e.g. `dvc repro` where `dvc pull` was meant) ends in
    one line, before the stage's own imports reach for JAX, and puts back what DVC deleted."""
    from pipeline.run.install import require_full

    name = Path(sys.argv[0]).stem
    try:
        require_full()
    except UserError as err:
        restored = _restore_outputs(name)
        print(f"stage {name}: error: {err}" + (f"; {restored}" if restored else ""), file=sys.stderr)
        sys.exit(2)


def run_stage(name: str, main: Callable[[argparse.Namespace], None], parser: argparse.ArgumentParser,
              several_processes: bool = False) -> None:
    """several_processes: the stage may run as cooperating processes (pipeline/run/distributed.py)
    when the environment names them; only `distill` does."""
    args = parser.parse_args()
    runtime.tune_process()
    runtime.stop_on_sigterm()
    from pipeline.run import distributed

    code = _run(name, main, args, distributed, several_processes)
    if distributed.process_count() > 1:
        distributed.leave(code)
    if code:
        sys.exit(code)


def _run(name: str, main, args: argparse.Namespace, distributed, several_processes: bool) -> int:
    try:
        if several_processes:
            distributed.initialize_from_env()
        main(args)
    except UserError as err:
        restored = _restore_outputs(name)
        print(f"stage {name}: error: {err}" + (f"; {restored}" if restored else ""), file=sys.stderr)
        return 2
    except KeyboardInterrupt as stop:
        what = "terminated" if isinstance(stop, runtime.Terminated) else "interrupted"
        print(f"stage {name}: {what}; `dvc repro` resumes from the last checkpoint", file=sys.stderr)
        return 143 if isinstance(stop, runtime.Terminated) else 130
    except Exception as err:
        restored = _restore_outputs(name)
        if restored:
            print(f"stage {name}: {restored}", file=sys.stderr)
        return distributed.exit_code_of_failure(err, f"stage {name}")
    return 0


def _restore_outputs(name: str) -> str | None:
    """A failed stage leaves its outputs as DVC found them: DVC deleted them before the stage ran."""
    if not os.environ.get("DVC_ROOT"):  # run by hand, not by DVC: nothing was deleted
        return None
    from pipeline.artifacts.lockfile import restore_outputs
    from pipeline.run import distributed

    if not distributed.is_main():
        return None
    try:
        return restore_outputs(Path.cwd(), name)
    except Exception:  # restoring is a courtesy; the stage's own error is the one to report
        return None


@contextlib.contextmanager
def tracked(name: str, params: dict[str, Any], params_file: Path) -> Iterator[Tracker]:
    """The stage's MLflow run. `DVC_ROOT` (set by DVC, also for queued and `--temp` experiments)
    locates the project, so every run lands in the same store whatever directory the stage runs in;
    the git state recorded is the working directory's, the checkout DVC runs the stage in (a queued
    experiment's own, with its params applied), not the project's."""
    config = section(params, "tracking", TrackingConfig)
    root = Path(os.environ.get("DVC_ROOT") or Path.cwd())
    with stage_run(name, config, params_file=params_file, project_root=root, workspace=Path.cwd()) as tracker:
        yield tracker


def csv_text(rows: Sequence[Mapping[str, Any]], columns: Sequence[str]) -> str:
    """Rows as CSV (header first, other keys ignored): the format DVC plots read."""
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=list(columns), extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return out.getvalue()


_require_full_install()  # at import: every stage imports this module before its own dependencies
