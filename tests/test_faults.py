"""Faults a user will meet: a distill killed mid-run, and malformed params or files.

The kill test runs `kip distill` in a subprocess, SIGKILLs it once a checkpoint exists, runs the same
command again, and compares the result byte for byte with an uninterrupted run.
"""
from __future__ import annotations

import dataclasses
import json
import os
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

    transform = preprocess.fit(cfg.PreprocessConfig("standardize"), rng.random((20, 4, 4, 1)).astype(np.float32))
    return artifacts.DistilledSet(rng.standard_normal((10, 4, 4, 1)).astype(np.float32),
                                  rng.standard_normal((10, 10)).astype(np.float32),
                                  np.arange(10, dtype=np.int32), transform, {"seed": 0})


def test_damaged_artifacts_are_reported_not_crashed_on(distilled, tmp_path, rng):
    npz, pq = tmp_path / "d.npz", tmp_path / "d.parquet"
    artifacts.save_npz(npz, distilled)
    parquet.save_parquet(pq, distilled, [str(i) for i in range(10)], npz_name="d.npz")
    for path, read in ((npz, artifacts.load_npz), (pq, parquet.read_parquet)):
        valid = path.read_bytes()
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
