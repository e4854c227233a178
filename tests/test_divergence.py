"""A run that went wrong stops with one line naming the parameter to change, and writes nothing.

Each case an outside tester found exiting 0 with a broken artifact: a learning rate so large that
the images overflow (1e39), one that makes KIP end worse than it started (100 .. 1e8), and Label
Solve on duplicated images without a ridge. Plus: a blow-up mid-run keeps the last good checkpoint.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

from pipeline.distill import kip
from pipeline.kernels import functions as kernels
from pipeline.run.config import DistillConfig, KernelConfig, PreprocessConfig

CLI = [sys.executable, "-m", "pipeline.run.cli", "distill", "--source", "embedded", "--dataset", "digits",
       "--support-per-class", "2", "--target-batch", "300"]


def _cli(*argv: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "JAX_PLATFORMS": "cpu"}
    return subprocess.run([*CLI, *argv], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def _error_line(result: subprocess.CompletedProcess) -> str:
    lines = [line for line in result.stderr.splitlines() if line.startswith("kip distill: error:")]
    assert result.returncode == 2 and len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    return lines[0]


@pytest.mark.parametrize("lr, steps", [("1e39", "1"), ("1e39", "20"), ("100", "20"), ("1e8", "1")])
def test_a_diverging_learning_rate_is_an_error_and_writes_nothing(tmp_path, lr, steps):
    result = _cli("--lr", lr, "--steps", steps, "--checkpoint", "run.ckpt.npz", "-o", "out.npz", cwd=tmp_path)
    assert "distill.learning_rate" in _error_line(result)
    assert not (tmp_path / "out.npz").exists()
    if (tmp_path / "run.ckpt.npz").exists():  # a checkpoint, if any, holds a finite support
        with np.load(tmp_path / "run.ckpt.npz") as data:
            assert all(np.isfinite(data[k]).all() for k in data.files if k != "meta")


def test_the_error_starts_its_own_line_after_the_progress_bar(tmp_path):
    """The bar is closed before the error is printed, not left for the message to glue onto."""
    result = _cli("--lr", "1e39", "--steps", "20", "-o", "out.npz", cwd=tmp_path)
    _error_line(result)
    assert "\nkip distill: error:" in result.stderr.replace("\r", "\n")
    assert "KIP:" in result.stderr  # the bar was shown (not -q)


def test_label_solve_on_duplicated_images_without_a_ridge(tmp_path):
    """Every image of a class is the same image, so the support kernel is singular at reg 0."""
    rng = np.random.default_rng(0)
    prototypes = rng.integers(0, 256, (10, 8, 8), dtype=np.uint8)
    labels = np.repeat(np.arange(10), 20)
    for split in ("train", "test"):
        np.savez(tmp_path / f"{split}.npz", x=prototypes[labels], y=labels)
    result = subprocess.run(
        [sys.executable, "-m", "pipeline.run.cli", "distill", "--source", "files", "--dataset", "dup",
         "--data-dir", str(tmp_path), "--method", "label_solve", "--reg", "0", "--support-per-class", "3",
         "-o", str(tmp_path / "out.npz")],
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "JAX_PLATFORMS": "cpu"},
        capture_output=True, text=True, timeout=300,
    )
    line = [line for line in result.stderr.splitlines() if line.startswith("kip distill: error:")]
    assert result.returncode == 2 and len(line) == 1, result.stderr
    assert "distill.reg" in line[0] and "non-finite" in line[0]
    assert not (tmp_path / "out.npz").exists()


@pytest.fixture(scope="module")
def standardized(digits):
    from pipeline.data import preprocess

    transform = preprocess.fit(PreprocessConfig("standardize"), digits.x_train)
    return transform.apply(digits.x_train), digits.y_train


def test_a_blow_up_mid_run_keeps_the_last_good_checkpoint(standardized, tmp_path):
    """Fault injection through the kernel: it returns NaN once any support pixel has moved more
    than 3.5 beyond the largest training pixel. Adam moves a pixel by at most ~lr (1.0) per step, so the
    run is good for at least 3 steps and breaks a few steps later, after the step-2 checkpoint."""
    x, y = standardized
    config = DistillConfig(support_per_class=2, steps=50, learning_rate=1.0, target_batch=300, checkpoint_every=2,
                           eval_every=0)
    start, _ = kip.init_support(x, y, 10, config)
    limit = float(max(np.abs(start).max(), np.abs(x).max())) + 3.5
    exact = kernels.make(KernelConfig())

    def fragile(a, b):
        k = exact(a, b)
        broken = jnp.maximum(jnp.abs(a).max(), jnp.abs(b).max()) > limit
        return jnp.where(broken, jnp.nan, k)

    checkpoint = tmp_path / "run.ckpt.npz"
    with pytest.raises(kip.DivergenceError) as failure:
        kip.distill(x, y, 10, fragile, config, checkpoint=checkpoint, checkpoint_key="k", progress=False)
    message = str(failure.value)
    assert "\n" not in message and "distill.learning_rate" in message
    with np.load(checkpoint) as data:
        meta = json.loads(str(data["meta"]))
        assert all(np.isfinite(data[k]).all() for k in data.files if k != "meta")
    assert meta["step"] >= 2 and f"last good checkpoint: {checkpoint} (step {meta['step']})" in message
    assert all(np.isfinite(h["loss"]) for h in meta["history"])


def test_a_run_that_ends_worse_than_it_started_is_an_error(standardized):
    x, y = standardized
    config = DistillConfig(support_per_class=2, steps=5, learning_rate=100.0, target_batch=300, eval_every=0,
                           checkpoint_every=0)
    with pytest.raises(kip.DivergenceError, match="above the .* it started from"):
        kip.distill(x, y, 10, kernels.make(KernelConfig()), config, progress=False)


def test_a_sane_run_passes_the_checks(standardized):
    """The control: the default learning rate is not mistaken for divergence, even over 1 step."""
    x, y = standardized
    for steps in (1, 5):
        config = DistillConfig(support_per_class=2, steps=steps, target_batch=300, eval_every=0, checkpoint_every=0)
        result = kip.distill(x, y, 10, kernels.make(KernelConfig()), config, progress=False)
        assert np.isfinite(result.images).all() and result.history[-1]["loss"] <= result.history[0]["loss"] * 1.01
