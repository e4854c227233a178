#!/usr/bin/env python
"""Mutation check of the numerical core: cosmic-ray on the targets of tests/mutation/cosmic-ray.toml.

    pip install -c constraints.txt -e '.[full,dev,mutation]'
    python tests/mutation/run.py                   # all targets, 2 at a time; writes .mutation/report.md
    python tests/mutation/run.py krr --jobs 1      # one target
    python tests/mutation/run.py --survivors-only  # re-test last run's survivors (after new tests)

Why cosmic-ray and why this driver (docs/mutation.md): cosmic-ray writes each mutant into the source
file and runs the tests in a fresh process, so nothing traced or jit-compiled from the unmutated
code can leak into a mutant's run (a fork-based tool would inherit JAX's caches), and it mutates
decorated functions and module-level constants too (the custom_vjp rules, the arc-cosine
coefficients). It mutates files in place, so every run works in its own copy of the repository
under .mutation/ (git-ignored; pytest never recurses into dot-folders): the working tree is never
touched. Each target is split into --jobs shards, one copy and one cosmic-ray session each, and the
shards run side by side.

Before mutating, each copy is checked: `import pipeline` from the test command's working
directory must load the copy (not the editable install), and the unmutated tests must pass (their
time sets the timeout). Afterwards the report counts killed / survived / timeout / incompetent
per target and lists every survivor's diff.
"""
from __future__ import annotations

import argparse
import ast
import json
import os
import shlex
import shutil
import sqlite3
import subprocess
import sys
import time
import tomllib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CONFIG = Path(__file__).with_name("cosmic-ray.toml")
SCRATCH = ROOT / ".mutation"
COPIED = ("pipeline", "tests", "pyproject.toml")
PYTEST = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider"]
ENV = {
    **os.environ,
    "PYTHONDONTWRITEBYTECODE": "1",  # no stale .pyc of a mutant can outlive it (cosmic-ray sets it too)
    "JAX_PLATFORMS": "cpu",
    "TF_CPP_MIN_LOG_LEVEL": "3",
}


def shard_env(work: Path) -> dict[str, str]:
    """ENV plus a persistent XLA compilation cache of the shard's own (its runs are sequential): the
    unmutated programs (neural-tangents' references, the tests' own) compile once per shard instead
    of once per mutant. Its key is a hash of the compiled program, so a mutant that changes a
    program compiles it afresh, and one that does not runs the same program: nothing stale."""
    return {**ENV, "JAX_COMPILATION_CACHE_DIR": str(work / ".jax-cache"),
            "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0", "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("targets", nargs="*", help="targets of cosmic-ray.toml (default: all)")
    parser.add_argument("--jobs", type=int, default=2, help="shards per target, run side by side (default 2)")
    parser.add_argument("--survivors-only", action="store_true",
                        help="reuse the last sessions; re-test only their survivors, against the current tests")
    args = parser.parse_args(argv)

    config = tomllib.loads(CONFIG.read_text())
    targets = args.targets or list(config["targets"])
    unknown = set(targets) - set(config["targets"])
    if unknown:
        parser.error(f"unknown targets {sorted(unknown)}; cosmic-ray.toml has {sorted(config['targets'])}")
    SCRATCH.mkdir(exist_ok=True)
    shards = [(name, k, args.jobs) for name in targets for k in range(args.jobs)]

    start = time.monotonic()
    with ThreadPoolExecutor(args.jobs) as pool:
        done = list(pool.map(lambda s: run_shard(config, *s, args.survivors_only), shards))
    wall = time.monotonic() - start

    summary = summarise(config, targets, args.jobs)
    summary["wall_seconds"] = round(wall)
    summary["baseline_seconds"] = {f"{n}/{k}": t for (n, k, _), t in zip(shards, done)}
    (SCRATCH / "summary.json").write_text(json.dumps(summary, indent=1))
    report = render(summary)
    (SCRATCH / "report.md").write_text(report)
    print(report)
    return 0


def run_shard(config: dict, name: str, shard: int, shards: int, survivors_only: bool) -> float:
    target = config["targets"][name]
    work = SCRATCH / f"{name}.{shard}"
    session = work.with_suffix(work.suffix + ".sqlite")
    fresh_copy(work)
    check_import(work)
    baseline = run_baseline(work, target)
    cr_config = work / "cosmic-ray.toml"
    write_cr_config(cr_config, target, timeout=3 * baseline + 30)
    if survivors_only and session.exists():
        forget_survivors(session)
    else:
        session.unlink(missing_ok=True)
        cosmic_ray(work, "cosmic-ray", "init", cr_config, session)
        cosmic_ray(work, "cr-filter-operators", session, cr_config)
        skip_out_of_scope(session, work / target["module"], target.get("functions"), shard, shards)
    log = SCRATCH / f"{name}.{shard}.log"
    with log.open("w") as handle:
        cosmic_ray(work, "cosmic-ray", "exec", cr_config, session, stdout=handle)
    return baseline


def fresh_copy(work: Path) -> None:
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    for item in COPIED:
        source = ROOT / item
        if source.is_dir():
            shutil.copytree(source, work / item, ignore=shutil.ignore_patterns("__pycache__", ".pytest_cache"))
        else:
            shutil.copy2(source, work / item)


def check_import(work: Path) -> None:
    """The test command must import the copy being mutated, not the editable install of ROOT."""
    out = subprocess.run([sys.executable, "-c", "import pipeline; print(pipeline.__file__)"], cwd=work, env=ENV,
                         capture_output=True, text=True, check=True).stdout.strip()
    if not Path(out).resolve().is_relative_to(work.resolve()):
        raise SystemExit(f"{work}: `import pipeline` loads {out}, not the copy under mutation")


def test_command(target: dict) -> list[str]:
    return PYTEST + list(target["tests"])


def run_baseline(work: Path, target: dict) -> float:
    start = time.monotonic()
    proc = subprocess.run(test_command(target), cwd=work, env=shard_env(work), capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{work}: the unmutated tests fail; fix them first:\n{proc.stdout[-4000:]}{proc.stderr[-2000:]}")
    return time.monotonic() - start


def write_cr_config(path: Path, target: dict, timeout: float) -> None:
    import toml  # cosmic-ray's own dependency, as it reads the file

    config = tomllib.loads(CONFIG.read_text())["cosmic-ray"]
    config.update({"module-path": target["module"], "timeout": round(timeout), "test-command": shlex.join(test_command(target))})
    path.write_text(toml.dumps({"cosmic-ray": config}))


def cosmic_ray(work: Path, tool: str, *args, stdout=None) -> None:
    executable = Path(sys.executable).with_name(tool)
    subprocess.run([str(executable), *map(str, args)], cwd=work, env=shard_env(work), check=True, stdout=stdout,
                   stderr=subprocess.STDOUT if stdout else None)


def scope_lines(module: Path, functions: list[str] | None) -> tuple[set[int] | None, set[tuple[int, int]]]:
    """Lines of the named top-level functions (None: the whole file), and the (line, column) spans
    of annotations: with `from __future__ import annotations` they are never evaluated, so a
    mutation there (`int | None` -> `int & None`) cannot change behaviour."""
    tree = ast.parse(module.read_text())
    lines = None
    if functions:
        found = {node.name: node for node in tree.body if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))}
        missing = set(functions) - set(found)
        if missing:
            raise SystemExit(f"{module}: no top-level function {sorted(missing)}")
        lines = {line for name in functions for line in range(found[name].lineno, found[name].end_lineno + 1)}
    annotations = set()
    for node in ast.walk(tree):
        spans = []
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.returns is not None:
            spans.append(node.returns)
        if isinstance(node, ast.arg) and node.annotation is not None:
            spans.append(node.annotation)
        if isinstance(node, ast.AnnAssign):
            spans.append(node.annotation)
        for span in spans:
            annotations.add((span.lineno, span.col_offset, span.end_lineno, span.end_col_offset))
    return lines, annotations


def skip_out_of_scope(session: Path, module: Path, functions: list[str] | None, shard: int, shards: int) -> None:
    """Mark as skipped what is outside the target's functions, inside an annotation, or another shard's."""
    from cosmic_ray.work_db import WorkDB, use_db
    from cosmic_ray.work_item import WorkResult, WorkerOutcome

    lines, annotations = scope_lines(module, functions)

    def in_annotation(row, col):  # cosmic-ray (parso) rows are 1-based, columns 0-based, as ast's
        return any((r0, c0) <= (row, col) < (r1, c1) for r0, c0, r1, c1 in annotations)

    with use_db(str(session), WorkDB.Mode.open) as db:
        pending = sorted(db.pending_work_items, key=lambda w: (w.mutations[0].operator_name, w.mutations[0].occurrence))
        skip = {}
        kept = 0
        for item in pending:
            row, col = item.mutations[0].start_pos
            if lines is not None and row not in lines:
                skip[item.job_id] = "outside the target's functions"
            elif in_annotation(row, col):
                skip[item.job_id] = "inside an annotation (never evaluated)"
            else:
                if kept % shards != shard:
                    skip[item.job_id] = "another shard's"
                kept += 1
        for reason in set(skip.values()):
            db.set_multiple_results([j for j, r in skip.items() if r == reason],
                                    WorkResult(output=f"Filtered: {reason}", worker_outcome=WorkerOutcome.SKIPPED))


def forget_survivors(session: Path) -> None:
    """Delete the results of surviving (and incompetent) mutants, so `cosmic-ray exec` runs them again."""
    with sqlite3.connect(session) as db:
        db.execute("DELETE FROM work_results WHERE worker_outcome = 'NORMAL' AND test_outcome != 'KILLED'")
        db.execute("DELETE FROM work_results WHERE worker_outcome IN ('EXCEPTION', 'ABNORMAL')")


def summarise(config: dict, targets: list[str], shards: int) -> dict:
    from cosmic_ray.work_db import WorkDB, use_db
    from cosmic_ray.work_item import TestOutcome, WorkerOutcome

    summary = {"targets": {}}
    for name in targets:
        counts = {"killed": 0, "survived": 0, "timeout": 0, "incompetent": 0}
        survivors = []
        for shard in range(shards):
            with use_db(str(SCRATCH / f"{name}.{shard}.sqlite"), WorkDB.Mode.open) as db:
                for item, result in db.completed_work_items:
                    if result.worker_outcome == WorkerOutcome.SKIPPED:
                        continue
                    mutation = item.mutations[0]
                    if result.worker_outcome != WorkerOutcome.NORMAL or result.test_outcome == TestOutcome.INCOMPETENT:
                        status = "incompetent"
                    elif result.test_outcome == TestOutcome.KILLED:
                        status = "timeout" if result.output == "timeout" else "killed"
                    else:
                        status = "survived"
                    counts[status] += 1
                    if status in ("survived", "incompetent"):
                        changed = [line for line in (result.diff or "").splitlines()
                                   if line[:1] in "+-" and not line.startswith(("+++", "---"))]
                        survivors.append({"status": status, "line": mutation.start_pos[0],
                                          "operator": mutation.operator_name.removeprefix("core/"),
                                          "occurrence": mutation.occurrence, "changed": changed})
        counts["total"] = sum(counts.values())
        counts["score"] = round(100 * (counts["killed"] + counts["timeout"]) / max(counts["total"], 1), 1)
        target = config["targets"][name]
        summary["targets"][name] = {"module": target["module"], "functions": target.get("functions"),
                                    "tests": target["tests"], **counts,
                                    "survivors": sorted(survivors, key=lambda s: (s["line"], s["operator"]))}
    return summary


def render(summary: dict) -> str:
    lines = ["| target | scope | killed | survived | timeout | incompetent | total | score |",
             "|---|---|---|---|---|---|---|---|"]
    for name, t in summary["targets"].items():
        scope = t["module"] + (f" ({', '.join(t['functions'])})" if t["functions"] else "")
        lines.append(f"| {name} | {scope} | {t['killed']} | {t['survived']} | {t['timeout']} | {t['incompetent']} "
                     f"| {t['total']} | {t['score']} % |")
    lines.append(f"\nWall time {summary['wall_seconds']} s.")
    for name, t in summary["targets"].items():
        if t["survivors"]:
            lines.append(f"\n### {name}: survivors\n")
            for s in t["survivors"]:
                change = " / ".join(c.strip() for c in s["changed"])
                lines.append(f"- {t['module']}:{s['line']} {s['operator']} #{s['occurrence']} ({s['status']}): `{change}`")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
