"""Sharding across devices changes where the work runs, not the result.

The same small KIP run, KRR evaluation and Label Solve run in two fresh processes: one with JAX's
single CPU device and one with four (XLA_FLAGS=--xla_force_host_platform_device_count=4; the
device count is fixed when JAX starts, hence the subprocesses). The four-device process also
reports proof that the work was split: the compiled KIP step contains an all-reduce, and kernel
blocks come back spread over four devices.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

SCRIPT = textwrap.dedent("""
    import json, sys
    from pathlib import Path
    import jax, jax.numpy as jnp, numpy as np, optax
    from pipeline.compat import enable_x64
    from pipeline.run import devices
    from pipeline.evaluate import scoring as evaluate
    from pipeline.kernels import functions as kernels
    from pipeline.distill import kip
    from pipeline.distill import krr
    from pipeline.data import preprocess
    from pipeline.run.config import DataConfig, DistillConfig, KernelConfig, PreprocessConfig
    from pipeline.data.datasets import load_dataset

    data = load_dataset(DataConfig(source="embedded", name="digits"), Path("/nonexistent"))
    transform = preprocess.fit(PreprocessConfig("standardize"), data.x_train)
    x_train, x_test = transform.apply(data.x_train), transform.apply(data.x_test)
    kernel_fn = kernels.make(KernelConfig())
    out = {"devices": jax.device_count()}
    for name, block in (("whole", 10_000_000), ("blocked", 96 * 30)):  # 96 targets x 30 support images
        config = DistillConfig(support_per_class=3, steps=4, learning_rate=0.01, target_batch=400,
                               kernel_block=block, learn_labels=True, float64=True, checkpoint_every=0)
        result = kip.distill(x_train, data.y_train, 10, kernel_fn, config, progress=False)
        out[name] = {"images": result.images.tolist(), "labels": result.labels.tolist(),
                     "loss": [h["loss"] for h in result.history]}
    # Scoring and Label Solve are compared in float64: both solve systems whose condition number
    # reaches ~1/reg = 1e6, so float32 kernels that differ in the last bit between layouts (4
    # devices tile the rows differently) may legitimately differ by 1e6 * 6e-8 ~ 6e-2 relative.
    with enable_x64():
        scores = evaluate.krr_scores(kernel_fn, np.asarray(out["whole"]["images"]), np.asarray(out["whole"]["labels"]),
                                     x_test.astype(np.float64), data.y_test, 10, 1e-6, block_size=100)
        solved = kip.label_solve(x_train.astype(np.float64), data.y_train, 10, kernel_fn,
                                 DistillConfig(method="label_solve", support_per_class=3, float64=True),
                                 block_size=100)
    out["scores"] = scores
    out["label_solve"] = solved.labels.tolist()
    # Proof of distribution: the compiled step reduces across devices; kernel blocks are split.
    optimizer = optax.adam(0.01)
    support = kip.Support(jnp.asarray(x_train[:30]), jnp.asarray(np.eye(10)[data.y_train[:30]] - 0.1, jnp.float32))
    step = kip.make_step(kernel_fn, optimizer, DistillConfig(reg=1e-6, learn_labels=False))
    x_dev = devices.put_replicated(x_train)
    y_dev = devices.put_replicated((np.eye(10)[data.y_train] - 0.1).astype(np.float32))
    idx = jnp.arange(400, dtype=jnp.int32)
    hlo = step.lower(support, optimizer.init(support), x_dev, y_dev, idx).compile().as_text()
    out["step_all_reduce"] = "all-reduce" in hlo
    tile = kernels._jitted(kernel_fn)(devices.put_rows(x_test[:400]), devices.put_replicated(x_train[:30]))
    out["tile_devices"] = len(tile.sharding.device_set)
    print(json.dumps(out))
""")


def _run(device_count: int) -> dict:
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "JAX_PLATFORMS": "cpu"}
    flags = [f for f in env.get("XLA_FLAGS", "").split() if "device_count" not in f]
    if device_count > 1:
        flags.append(f"--xla_force_host_platform_device_count={device_count}")
    env["XLA_FLAGS"] = " ".join(flags)
    done = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def runs() -> tuple[dict, dict]:
    return _run(1), _run(4)


def test_four_devices_really_share_the_work(runs):
    one, four = runs
    assert (one["devices"], four["devices"]) == (1, 4)
    assert four["step_all_reduce"] and four["tile_devices"] == 4
    assert not one["step_all_reduce"] and one["tile_devices"] == 1


@pytest.mark.parametrize("name", ["whole", "blocked"])
def test_kip_is_the_same_on_four_devices(runs, name):
    """Reference: the same float64 run on one device. The layouts tile kernel rows and order the
    sums over targets differently: kernel entries by <= d eps = 1.4e-14 (d = 64), which the solve
    (cond(K_ss + ridge) = 212 at the start) and the residual's cancellation (|K_ts| |alpha| /
    |residual| = 68) carry to <= 2 x 212 x 1.4e-14 x 68 = 4e-10 in the loss: rtol 1e-9 is 2.5x
    that (measured 8e-16). The support: Adam divides by sqrt(v) + 1e-8, and some pixels' gradients
    are that small (1.2e-8 at the start; the largest is 2.4e-4), where a gradient change dg moves
    the step by lr dg / 2e-8: <= 0.01 x 4e-10 x 2.4e-4 / 2e-8 = 5e-8 per step, 2e-7 over the 4
    steps, before the final float32 rounding (1.2e-7 relative): atol 1e-6 is 5x that and rtol
    1e-5 adds room for the ulp (measured: bit-identical)."""
    one, four = runs
    np.testing.assert_allclose(four[name]["loss"], one[name]["loss"], rtol=1e-9)
    np.testing.assert_allclose(np.asarray(four[name]["images"]), np.asarray(one[name]["images"]), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(four[name]["labels"]), np.asarray(one[name]["labels"]), rtol=1e-5, atol=1e-6)


def test_blocked_targets_give_the_same_run(runs):
    """Consistency check, not a reference: target blocks of 96 against one block, one device.
    Only the order of the sums over targets and the blocks' kernel rounding differ, so the error
    analysis of the four-device test above applies (loss <= 4e-10 against rtol 1e-9; support
    <= 2e-7 against atol 1e-6; measured 4e-16 and bit-identical)."""
    one, _ = runs
    np.testing.assert_allclose(one["blocked"]["loss"], one["whole"]["loss"], rtol=1e-9)
    np.testing.assert_allclose(np.asarray(one["blocked"]["images"]), np.asarray(one["whole"]["images"]), rtol=1e-5, atol=1e-6)


def test_evaluation_and_label_solve_are_the_same_on_four_devices(runs):
    """Reference: the same float64 evaluation and Label Solve on one device. Kernel entries may
    round differently between layouts, by <= d eps = 1.4e-14 (d = 64). Scoring: cond(K_ss + ridge)
    = 211 and |K_ts| |alpha| / |residual| = 74 carry that to <= 2 x 211 x 1.4e-14 x 74 = 4.4e-10
    in the MSE: rel 1e-8 is 20x (measured equal). An argmax flip needs two class scores within
    ~1e-10 of each other: the smallest top-two gap of the 359 images is 6e-4. Label Solve: K_ts
    enters G = K_st K_ts twice and cond(G + ridge) = 2e5: ~6e-9 relative, and the labels are then
    rounded to float32 (one ulp: 1.2e-7 relative): rtol 1e-6 is 8x that (measured: one-ulp
    differences, 1e-7)."""
    one, four = runs
    assert four["scores"]["accuracy"] == one["scores"]["accuracy"]
    assert four["scores"]["mse"] == pytest.approx(one["scores"]["mse"], rel=1e-8)
    np.testing.assert_allclose(np.asarray(four["label_solve"]), np.asarray(one["label_solve"]), rtol=1e-6, atol=1e-7)
