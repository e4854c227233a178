"""Faults a user will meet: a distill or a `dvc repro` killed mid-run, and malformed params or files.

The kill test runs `kip distill` in a subprocess, SIGKILLs it once a checkpoint exists, runs the same
command again, and compares the result byte for byte with an uninterrupted run. The `dvc repro` tests
(below the file tests) do the same through DVC, killing it also while it writes dvc.lock, with
`kip doctor` as the documented repair; together they take about a minute and a half.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from pipeline import artifacts, config as cfg, parquet
from pipeline.data import load_dataset
from pipeline.errors import UserError
from test_dvc_pipeline import SMALL, _dvc, _run, make_project
from test_dvc_pipeline import _env as _dvc_env

DISTILL = [
    sys.executable, "-m", "pipeline.cli", "distill", "--source", "embedded", "--dataset", "digits",
    "--support-per-class", "2", "--steps", "1500", "--target-batch", "300", "--learn-labels",
    "--checkpoint-every", "50", "-q",
]


def _env() -> dict[str, str]:
    return {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "JAX_PLATFORMS": "cpu"}


def _checkpoint_step(path: Path) -> int:
    try:
        with np.load(path) as data:
            return json.loads(str(data["meta"]))["step"]
    except Exception:  # not written yet, or mid-rename
        return 0


def test_killed_distill_resumes_to_the_same_bytes(tmp_path):
    reference = tmp_path / "reference.npz"
    subprocess.run([*DISTILL, "-o", str(reference)], env=_env(), check=True, capture_output=True, timeout=600)

    checkpoint, out = tmp_path / "run.ckpt.npz", tmp_path / "run.npz"
    command = [*DISTILL, "--checkpoint", str(checkpoint), "-o", str(out)]
    victim = subprocess.Popen(command, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while _checkpoint_step(checkpoint) < 100:
        assert victim.poll() is None, "distill finished before it could be killed; raise --steps"
        assert time.monotonic() < deadline
        time.sleep(0.02)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    killed_at = _checkpoint_step(checkpoint)
    assert not out.exists() and 100 <= killed_at < 1500

    resumed = subprocess.run(command, env=_env(), capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr
    assert f"resuming from {checkpoint} at step" in resumed.stderr
    assert out.read_bytes() == reference.read_bytes()


# --- malformed params: every key of every section, fed values of every wrong kind ------------------

RECORDS = {
    "data": cfg.DataConfig, "preprocess": cfg.PreprocessConfig, "kernel": cfg.KernelConfig,
    "distill": cfg.DistillConfig, "evaluate": cfg.EvaluateConfig, "train": cfg.TrainConfig,
    "tracking": cfg.TrackingConfig,
}
VALUES = [None, "", "x", "1e-3", -1, 0, 0.5, 1, 10**12, -1e-9, True, False, [1], {"a": 1}, float("nan"), float("inf")]


@pytest.mark.parametrize("section", sorted(RECORDS))
def test_any_value_for_any_key_is_accepted_or_one_clear_line(section):
    record = RECORDS[section]
    for field in dataclasses.fields(record):
        for value in VALUES:
            try:
                cfg.from_mapping(record, {field.name: value}, section)
            except UserError as err:
                message = str(err)
                assert "\n" not in message and f"{section}." in message, message
            # anything else (TypeError, ValueError, ...) fails the test with its traceback


# --- malformed files ------------------------------------------------------------------------------

def _garbage(rng: np.random.Generator, valid: bytes) -> list[bytes]:
    """Empty, random, truncated and bit-flipped variants of a valid file."""
    flipped = bytearray(valid)
    for i in rng.choice(len(valid), size=8, replace=False):
        flipped[i] ^= 0xFF
    return [b"", rng.bytes(64), rng.bytes(4096), valid[: len(valid) // 2], valid[:-7], bytes(flipped)]


@pytest.fixture
def distilled(rng):
    from pipeline import preprocess
    from test_artifacts import lineage

    transform = preprocess.fit(cfg.PreprocessConfig("standardize"), rng.random((20, 4, 4, 1)).astype(np.float32))
    return artifacts.DistilledSet(rng.standard_normal((10, 4, 4, 1)).astype(np.float32),
                                  rng.standard_normal((10, 10)).astype(np.float32),
                                  np.arange(10, dtype=np.int32), transform, {**lineage("standardize"), "seed": 0})


def test_damaged_artifacts_are_reported_not_crashed_on(distilled, tmp_path, rng):
    npz, pq = tmp_path / "d.npz", tmp_path / "d.parquet"
    artifacts.save_npz(npz, distilled)
    parquet.save_parquet(pq, distilled, [str(i) for i in range(10)])
    for path, read in ((npz, artifacts.load_npz), (pq, parquet.read_parquet)):
        valid = path.read_bytes()
        read(path)  # the undamaged file is accepted, so the errors below are about the damage
        for damaged in _garbage(rng, valid):
            path.write_bytes(damaged)
            try:
                read(path)
            except UserError as err:
                assert "\n" not in str(err) and str(path) in str(err)
            else:  # a flip inside zip padding or Parquet statistics may leave the data intact
                assert damaged == valid or read(path).images.shape == distilled.images.shape
        path.write_bytes(valid)


def test_damaged_idx_files_are_reported_not_crashed_on(tmp_path, rng):
    from test_data import write_idx_dir

    write_idx_dir(tmp_path, compress=False, rng=rng)
    for name in sorted(p.name for p in tmp_path.iterdir()):
        valid = (tmp_path / name).read_bytes()
        for damaged in _garbage(rng, valid):
            (tmp_path / name).write_bytes(damaged)
            try:
                load_dataset(cfg.DataConfig(source="files", name="x", data_dir=str(tmp_path)), tmp_path)
            except UserError as err:
                assert "\n" not in str(err)
        (tmp_path / name).write_bytes(valid)


# --- `dvc repro` killed at the worst moments, then `kip doctor`: the bytes of an uninterrupted run ---
#
# DVC 3.67.1 rewrites dvc.lock and .dvc/tmp/rwlock in place (open "w+" truncates, then it writes), so a
# kill in between leaves a file every later DVC command rejects. `kip doctor` (pipeline/lockfile.py)
# repairs that; these tests kill `dvc repro` at chosen moments in a scratch copy of the project (the
# small embedded-digits setup of test_dvc_pipeline), run `kip doctor` and `dvc repro`, and compare every
# output and dvc.lock with an uninterrupted run. The writes are killed deterministically by running the
# DVC CLI under _KILLER, which SIGKILLs its own process once the Nth write has truncated the file and
# written a chosen fraction of the new text. Nothing is patched outside these test children.

needs_git = pytest.mark.skipif(shutil.which("git") is None, reason="needs git")
FAULT_PARAMS = {  # SMALL, with a distill long enough to be killed after a checkpoint, and a cheaper train
    **SMALL,
    "distill": {**SMALL["distill"], "steps": 400, "checkpoint_every": 20},
    "train": {**SMALL["train"], "steps": 20, "seeds": 1},
}
CHECKPOINT = "checkpoints/distill.ckpt.npz"
RESUMED = f"resuming from {CHECKPOINT} at step"

_KILLER = r'''\
"""The DVC CLI, SIGKILLing itself in the middle of its Nth write of dvc.lock or of .dvc/tmp/rwlock."""
import json, os, signal, sys, types

target, nth, fraction = os.environ["KIP_KILL_AT"].split(":")  # e.g. dvc.lock:2:0.5
nth, fraction = int(nth), float(fraction)
writes = 0


def _maybe_die(stream, text):
    global writes
    writes += 1
    if writes == nth:  # the file is open and truncated: write part of the new text, then die
        part = text[: int(len(text) * fraction)]
        stream.write(part[:-1] if 0 < fraction < 1 and part.endswith("\n") else part)  # a cut mid-line
        stream.flush()
        os.kill(os.getpid(), signal.SIGKILL)


if target == "dvc.lock":
    from dvc.utils.serialize import _yaml

    real_dump = _yaml._dump  # what modify_yaml() calls on the open, truncated stream

    def _dump(data, stream):
        if os.path.basename(getattr(stream, "name", "")) == "dvc.lock":
            _maybe_die(stream, _yaml.dumps_yaml(data))
        return real_dump(data, stream)

    _yaml._dump = _dump
elif target == "rwlock":
    import dvc.rwlock

    def _json_dump(obj, stream, **kwargs):
        _maybe_die(stream, json.dumps(obj, **kwargs))
        return json.dump(obj, stream, **kwargs)

    dvc.rwlock.json = types.SimpleNamespace(**{**vars(json), "dump": _json_dump})
else:
    raise SystemExit(f"unknown target {target}")

from dvc.cli import main

sys.exit(main(sys.argv[1:]))
'''


def _outputs(root: Path) -> dict[str, object]:
    """Every file the pipeline writes that DVC tracks (outs, metrics, plots), and dvc.lock parsed."""
    import yaml

    files = {
        str(path.relative_to(root)): path.read_bytes()
        for folder in ("artifacts", "metrics", "plots") for path in sorted((root / folder).rglob("*"))
        if path.is_file() and path.name != ".gitignore"
    }
    files["dvc.lock (parsed)"] = yaml.safe_load((root / "dvc.lock").read_text())
    return files


@pytest.fixture(scope="module")
def dvc_template(tmp_path_factory):
    """A committed scratch project (no run yet) that every fault test copies: one snapshot of the
    sources, so all runs here hash the same code even while pipeline/ is being edited."""
    base = tmp_path_factory.mktemp("faults")
    root, home = base / "template", base / "home"
    home.mkdir()
    env = _dvc_env(home)
    (base / "killer.py").write_text(_KILLER)
    make_project(root, env, FAULT_PARAMS)
    return root, env


@pytest.fixture(scope="module")
def reference(dvc_template):
    """The template after one uninterrupted `dvc repro`, committed; and its outputs."""
    template, env = dvc_template
    root = template.parent / "reference"
    shutil.copytree(template, root, symlinks=True)
    _dvc(root, env, "repro")
    _run(root, env, "git", "add", "-A")
    _run(root, env, "git", "commit", "-qm", "uninterrupted run")
    return root, _outputs(root)


def _copy(source: Path, name: str) -> Path:
    target = source.parent / name
    shutil.copytree(source, target, symlinks=True)
    return target


def _repro_killed_at(root: Path, env: dict[str, str], kill_at: str, *args: str) -> str:
    """`dvc repro ARGS` killed at KILL_AT (see _KILLER); what it printed."""
    killer = str(root.parent / "killer.py")
    result = subprocess.run([sys.executable, killer, "repro", *args], cwd=root, env={**env, "KIP_KILL_AT": kill_at},
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == -signal.SIGKILL, f"not killed at {kill_at}:\n{result.stdout}\n{result.stderr}"
    return result.stdout + result.stderr


def _dvc_fails(root: Path, env: dict[str, str], *args: str) -> str:
    result = subprocess.run([sys.executable, "-m", "dvc", *args], cwd=root, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode != 0, f"dvc {' '.join(args)} unexpectedly worked:\n{result.stdout}\n{result.stderr}"
    return result.stdout + result.stderr


def _repro_matches(root: Path, env: dict[str, str], reference) -> str:
    """`dvc repro` after a repair: every output and dvc.lock as in the uninterrupted reference run, and
    a clean git tree. Returns what DVC printed."""
    printed = _dvc(root, env, "repro")
    assert _outputs(root) == reference[1]
    assert _run(root, env, "git", "status", "--porcelain").strip() == ""
    return printed


def _doctor(root: Path, env: dict[str, str]) -> str:
    """`kip doctor` as a user runs it (the project's own copy of the package): one line."""
    result = subprocess.run([sys.executable, "-m", "pipeline.cli", "doctor"], cwd=root, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == 1 and lines[0].startswith("kip doctor: "), result.stdout + result.stderr
    return lines[0]


@needs_git
def test_repro_killed_while_writing_dvc_lock_resumes_after_kip_doctor(dvc_template, reference):
    """The reported defect: killed just after "Updating lock file", on a project with no committed lock."""
    template, env = dvc_template
    root = _copy(template, "empty-lock")
    printed = _repro_killed_at(root, env, "dvc.lock:2:0")  # the write after distill: open, truncated, empty
    assert printed.count("Updating lock file 'dvc.lock'") == 2 and "Running stage 'evaluate'" not in printed
    assert (root / "dvc.lock").read_bytes() == b""
    assert "validation failed" in _dvc_fails(root, env, "repro")  # what users met: stuck until repaired

    line = _doctor(root, env)
    assert "dvc.lock was empty" in line and "removed it" in line, line
    assert not (root / "dvc.lock").exists()
    resumed = _dvc(root, env, "repro")
    assert RESUMED in resumed  # distill had finished: it resumes from its last checkpoint, no recomputation
    assert _outputs(root) == reference[1]
    assert _doctor(root, env).startswith("kip doctor: nothing to repair")


@needs_git
def test_repro_killed_partway_through_dvc_lock_is_restored_from_git(dvc_template, reference):
    """Half a dvc.lock: the committed one comes back, and DVC sees that the outputs match it."""
    _, env = dvc_template
    root = _copy(reference[0], "partial-lock")
    _repro_killed_at(root, env, "dvc.lock:2:0.5", "--force")
    damaged = (root / "dvc.lock").read_bytes()
    assert damaged and not damaged.endswith(b"\n")  # DVC may read such a prefix, or may not: it depends where the cut falls

    line = _doctor(root, env)
    assert "dvc.lock was cut off mid-write" in line and "replaced it by the version staged in git" in line, line
    assert (root / "dvc.lock").read_bytes() == (reference[0] / "dvc.lock").read_bytes()
    _repro_matches(root, env, reference)


@needs_git
def test_repro_killed_while_writing_its_rwlock_runs_again_after_kip_doctor(dvc_template, reference):
    _, env = dvc_template
    root = _copy(reference[0], "empty-rwlock")
    # DVC 3.67.1 writes the rwlock 10 times per stage: the 11th is distill taking its locks, after prepare ran
    printed = _repro_killed_at(root, env, "rwlock:11:0", "--force")
    assert "Running stage 'prepare'" in printed and "Running stage 'distill'" not in printed
    assert (root / ".dvc" / "tmp" / "rwlock").read_bytes() == b""
    assert "RWLock" in _dvc_fails(root, env, "repro")

    line = _doctor(root, env)
    assert "removed the empty .dvc/tmp/rwlock" in line, line
    _repro_matches(root, env, reference)


@needs_git
def test_repro_killed_with_its_process_group_during_distill_resumes_from_the_checkpoint(dvc_template, reference):
    """Ctrl-C's harsher cousin: SIGKILL to `dvc repro` and its stage at once, mid-distill."""
    _, env = dvc_template
    root = _copy(reference[0], "killed-group")
    shutil.rmtree(root / "checkpoints")  # a genuine distill from step 0, to be killed part way
    victim = subprocess.Popen([sys.executable, "-m", "dvc", "repro", "--force"], cwd=root, env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while _checkpoint_step(root / CHECKPOINT) < 40:
            assert victim.poll() is None, "dvc repro finished before it could be killed; raise distill.steps"
            assert time.monotonic() < deadline
            time.sleep(0.02)
    finally:
        os.killpg(victim.pid, signal.SIGKILL)
        victim.wait()
    killed_at = _checkpoint_step(root / CHECKPOINT)
    assert 40 <= killed_at < FAULT_PARAMS["distill"]["steps"]
    assert not (root / "artifacts" / "distilled.npz").exists()  # DVC removed the outputs before distill ran

    line = _doctor(root, env)  # DVC would drop the dead process's rwlock entries itself; doctor says so too
    assert "cleared .dvc/tmp/rwlock of killed DVC processes" in line or "nothing to repair" in line, line
    assert f"{RESUMED} {killed_at}" in _repro_matches(root, env, reference)


@needs_git
def test_kip_doctor_refuses_while_dvc_runs_and_clears_what_killed_runs_left(tmp_path):
    import psutil
    from dvc.repo import Repo

    from pipeline.lockfile import repair

    with pytest.raises(UserError, match="not inside a DVC project"):
        repair(tmp_path)
    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
    Repo.init(str(tmp_path)).close()
    assert repair(tmp_path).startswith("nothing to repair")
    rwlock = tmp_path / ".dvc" / "tmp" / "rwlock"
    rwlock.write_text(json.dumps({"write": {str(tmp_path / "out"): {"pid": os.getpid(), "cmd": "dvc repro"}}}))
    (tmp_path / "dvc.lock").write_text("")
    with pytest.raises(UserError, match=rf"DVC is still running in .*pid {os.getpid()} \(dvc repro\)"):
        repair(tmp_path)  # a live DVC (between stages it does not hold the repo lock): touch nothing
    assert rwlock.exists() and (tmp_path / "dvc.lock").exists()

    before = psutil.Process().create_time() - 60  # the listed PID now names a process younger than the file:
    os.utime(rwlock, (before, before))            # reused by the system after its DVC was killed
    subprocess.run(["git", "add", "dvc.lock"], cwd=tmp_path, check=True)  # git's version is no better
    line = repair(tmp_path / ".dvc")
    assert "cleared .dvc/tmp/rwlock of killed DVC processes" in line and "dvc.lock was empty" in line, line
    assert "removed it (git has no valid version of it)" in line and line.endswith("run `dvc repro` to resume")
    assert not rwlock.exists() and not (tmp_path / "dvc.lock").exists()

    (tmp_path / ".git" / "index.lock").write_bytes(b"")  # git's lock, which only the user may remove
    line = repair(tmp_path)
    assert ".git/index.lock exists: a git command is running or was killed" in line and "delete it" in line, line
    assert (tmp_path / ".git" / "index.lock").exists()
