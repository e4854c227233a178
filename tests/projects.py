"""Scratch copies of this project for the tests that run DVC, as users do, in a git repo of their own.

`make_project` snapshots the sources, dvc.yaml and DVC config into a committed git + DVC project with
small params (`SMALL`: embedded digits, a few hundred cheap KIP steps, tiny networks). The
session fixture `small_project` (conftest.py) runs `dvc repro` in one such project once; the tests
that need a finished pipeline copy it (`copy_project`) instead of running all four stages again.
HOME points into the scratch folder, so the out-of-the-box remote (~/.cache/...) is exercised as
configured without touching the real one.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]

# distill: long enough to be killed after a checkpoint (tests/test_faults.py), cheap on 8x8 digits.
SMALL = {
    "data": {"source": "embedded", "name": "digits"},
    "distill": {"support_per_class": 2, "steps": 400, "target_batch": 400, "eval_every": 20, "checkpoint_every": 20},
    "evaluate": {"baseline_repeats": 2, "batch_size": 500},
    # optimizer_choice fixed: the choice (6 networks per side, some of 1000 Adam steps) is tested in test_finite
    "train": {"width": 64, "steps": 40, "eval_every": 20, "seeds": 2, "batch_size": 20, "optimizer_choice": "fixed"},
}


@dataclass(frozen=True)
class Project:
    """A scratch project: its root, the environment its commands run in, and what `dvc repro` printed."""

    root: Path
    env: dict[str, str]
    printed: str = ""


def env_for(home: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update({
        "HOME": str(home),
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
        "GIT_AUTHOR_NAME": "test", "GIT_AUTHOR_EMAIL": "test@example.com",
        "GIT_COMMITTER_NAME": "test", "GIT_COMMITTER_EMAIL": "test@example.com",
        "DVC_NO_ANALYTICS": "1", "TF_CPP_MIN_LOG_LEVEL": "3", "JAX_PLATFORMS": "cpu",
    })
    return env


def run(cwd: Path, env: dict[str, str], *cmd: str) -> str:
    result = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, f"{' '.join(cmd)} failed:\n{result.stdout}\n{result.stderr}"
    return result.stdout + result.stderr


def dvc(cwd: Path, env: dict[str, str], *args: str) -> str:
    return run(cwd, env, sys.executable, "-m", "dvc", *args)


def stages_ran(output: str) -> set[str]:
    return {line.split("'")[1] for line in output.splitlines() if line.startswith("Running stage '")}


def distilled_bytes(root: Path) -> dict[str, bytes]:
    return {name: (root / "artifacts" / name).read_bytes() for name in ("distilled.npz", "distilled.parquet")}


def make_project(root: Path, env: dict[str, str], overrides: dict[str, dict]) -> None:
    """A committed scratch git + DVC project at `root`: a snapshot of this project's sources,
    dvc.yaml and DVC config, with `overrides` ({section: {key: value}}) applied to params.yaml."""
    shutil.copytree(REPO / "pipeline", root / "pipeline", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(REPO / "stages", root / "stages", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("dvc.yaml", ".gitignore"):
        shutil.copy(REPO / name, root / name)
    shutil.copytree(REPO / "data" / "own", root / "data" / "own", ignore=shutil.ignore_patterns(".gitignore", "*.dvc"))
    write_params(root, overrides, yaml.safe_load((REPO / "params.yaml").read_text()))
    run(root, env, "git", "init", "-q", "-b", "main")
    dvc(root, env, "init", "-q")
    shutil.copy(REPO / ".dvc" / "config", root / ".dvc" / "config")
    run(root, env, "git", "add", "-A")
    run(root, env, "git", "commit", "-qm", "project")


def write_params(root: Path, overrides: dict[str, dict], params: dict | None = None) -> None:
    """Apply `overrides` section by section to `root`'s params.yaml (or to `params`)."""
    params = params if params is not None else yaml.safe_load((root / "params.yaml").read_text())
    for section, values in overrides.items():
        params[section].update(values)
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def copy_project(source: Project, target: Path, home: Path | None = None) -> Project:
    """A copy of `source` (git history, DVC cache, outputs, checkpoints) at `target`, with its own
    HOME (so its own default remote), unless `home` names another."""
    shutil.copytree(source.root, target, symlinks=True)
    if home is None:
        home = target.parent / f"{target.name}-home"
        home.mkdir()
    return Project(target, {**source.env, "HOME": str(home)}, source.printed)


def finished_project(base: Path) -> Project:
    """`make_project(SMALL)`, then `dvc repro`, committed: what `small_project` holds."""
    root, home = base / "project", base / "home"
    home.mkdir()
    env = env_for(home)
    make_project(root, env, SMALL)
    printed = dvc(root, env, "repro")
    run(root, env, "git", "add", "-A")
    run(root, env, "git", "commit", "-qm", "first run")
    return Project(root, env, printed)
