"""The KIP engine's guarantees, for every kernel it runs with: the closed-form FC NTK, RBF,
neural-tangents' exact ConvNet NTK, the random-feature ConvNet NNGP (a fresh draw every step) and a
finite network's empirical NTK (a fresh network every step).

At cheap sizes (8x8 digits, 10 support images, 100 targets a step, 6 steps), each kernel must:
give the same bytes for the same settings; resume from a checkpoint into exactly the bytes of the
run that was not interrupted; start afresh on a checkpoint of another key; write checkpoints from
process 0 only; stop a diverging run with a DivergenceError and never checkpoint a non-finite
support; and honour every option (loss, learned labels, init, corruption, schedule, kept step,
augmentation) or refuse it in one line.
"""
from __future__ import annotations

import dataclasses
import re

import jax.numpy as jnp
import numpy as np
import pytest

from pipeline.distill import kip, krr
from pipeline.errors import UserError
from pipeline.evaluate import scoring as evaluate
from pipeline.kernels import conv_features, finite_ntk, functions as kernels
from pipeline.run import distributed
from pipeline.run.config import DistillConfig, KernelConfig, TrainConfig

SHAPE = (8, 8, 1)
KERNELS = ("fc", "rbf", pytest.param("conv", marks=pytest.mark.exact), "conv_rf", "finite_ntk")  # conv: neural-tangents
BASE = DistillConfig(support_per_class=1, steps=6, learning_rate=0.01, target_batch=100, reg=1e-5, learn_labels=True,
                     eval_every=2, checkpoint_every=2, keep="best_validation", augment="crop", augment_on="both")


def make_kernel(name: str):
    if name == "conv_rf":
        return conv_features.RandomFeatureKernel(conv_features.ConvFeatureConfig(width=16, depth=2, networks=2), SHAPE, 0)
    if name == "finite_ntk":
        return finite_ntk.FiniteNetworkKernel(TrainConfig(width=64), SHAPE, 10, 0)
    spec = {"fc": KernelConfig(), "rbf": KernelConfig(architecture="rbf"),
            "conv": KernelConfig(architecture="conv", depth=1)}[name]
    return kip.FixedKernel(kernels.make(spec), {"name": name})


@pytest.fixture(scope="module")
def split(digits_standardized):
    x, y, _, _ = digits_standardized
    return x[300:], y[300:], x[:300], y[:300]  # train, validation (the test split is never passed)


@pytest.fixture(scope="module", params=KERNELS)
def kernel(request):
    return request.param, make_kernel(request.param)


def monitor_for(name, kernel, x_val, y_val, reg):
    kernel = getattr(kernel, "inner", kernel)
    if name == "conv_rf":
        return kernel.monitor(x_val, y_val, reg, networks=2, val_images=200)
    if name == "finite_ntk":
        return kernel.monitor(x_val[:200], y_val[:200], reg)

    def monitor(images, labels):
        return {"val_accuracy": evaluate.krr_scores(kernel.kernel_fn, images, labels, x_val[:200], y_val[:200], 10,
                                                    reg)["accuracy"]}
    return monitor


def run(split, kernel, config=BASE, **kwargs):
    name, fn = kernel
    x_train, y_train, x_val, y_val = split
    return kip.distill(x_train, y_train, 10, fn, config, monitor=monitor_for(name, fn, x_val, y_val, config.reg),
                       progress=False, **kwargs)


def assert_same_result(a: kip.KipResult, b: kip.KipResult) -> None:
    np.testing.assert_array_equal(a.images, b.images)
    np.testing.assert_array_equal(a.labels, b.labels)
    assert a.history == b.history and a.best_step == b.best_step


class _Stop(Exception):
    pass


@pytest.fixture(scope="module")
def whole_run(split, kernel):
    return run(split, kernel)


def test_same_settings_same_bytes_and_a_resumed_run_is_the_whole_run(split, kernel, whole_run, tmp_path, monkeypatch,
                                                                     capsys):
    """A run stopped right after its step-4 checkpoint (augmentation and kernel draws included)
    resumes at step 4 and ends with the bytes of an uninterrupted run without a checkpoint."""
    path = tmp_path / "kip.ckpt.npz"
    real_save = kip._Run._save

    def save_then_stop(self, step):
        real_save(self, step)
        if step == 4:
            raise _Stop

    monkeypatch.setattr(kip._Run, "_save", save_then_stop)
    with pytest.raises(_Stop):
        run(split, kernel, checkpoint=path, checkpoint_key="a")
    monkeypatch.setattr(kip._Run, "_save", real_save)
    resumed = run(split, kernel, checkpoint=path, checkpoint_key="a")
    assert f"resuming from {path} at step 4" in capsys.readouterr().err
    assert_same_result(resumed, whole_run)
    scored = [h for h in whole_run.history if "val_accuracy" in h]
    assert [h["step"] for h in scored] == [0, 2, 4, 6]
    best = max(scored, key=lambda h: (h["val_accuracy"], -h["step"]))
    assert whole_run.best_step == best["step"]

    # The finished file under another key (other data, code or params) is another run's: replaced.
    again = run(split, kernel, checkpoint=path, checkpoint_key="b")
    assert "belongs to other params or code; starting from step 0" in capsys.readouterr().err
    assert_same_result(again, whole_run)


def test_only_process_zero_writes_the_checkpoint(split, kernel, whole_run, tmp_path, monkeypatch):
    path = tmp_path / "kip.ckpt.npz"
    monkeypatch.setattr(distributed, "is_main", lambda: False)
    assert_same_result(run(split, kernel, checkpoint=path, checkpoint_key="a"), whole_run)
    assert not path.exists()


class Poisoned:
    """A kernel whose predictions turn NaN from step `from_step` on (a planted divergence that
    needs no knowledge of where a kernel's loss would blow up)."""

    def __init__(self, inner, from_step: int):
        self.inner, self.from_step = inner, from_step
        self.refusals, self.settings = inner.refusals, {**inner.settings, "poisoned_from": from_step}

    def draw(self, step):
        return self.inner.draw(step), np.float32(np.nan if step >= self.from_step else 1.0)

    def fit(self, draw, images, labels, reg):
        return self.inner.fit(draw[0], images, labels, reg)

    def predict(self, draw, fitted, x):
        return self.inner.predict(draw[0], fitted, x) * draw[1]


def test_a_diverging_run_stops_and_keeps_its_last_good_checkpoint(split, kernel, tmp_path):
    """The loss of step 4 (0-based 3) is NaN: the run stops there, names the step-2 checkpoint,
    and that file still holds the finite step-2 state."""
    path = tmp_path / "kip.ckpt.npz"
    name, fn = kernel
    with pytest.raises(kip.DivergenceError, match=re.escape(f"KIP loss became nan at step 4: lower distill.learning_rate")
                       + ".*" + re.escape(f"last good checkpoint: {path} (step 2)")):
        run(split, (name, Poisoned(fn, 3)), checkpoint=path, checkpoint_key="a")
    meta, leaves = kip.read_checkpoint(path)
    assert meta["step"] == 2 and all(np.isfinite(leaf).all() for leaf in leaves)


def test_every_option_together(split, kernel):
    """Platt cross-entropy, fixed labels, noise init with 30 % corrupted pixels, a cosine schedule,
    the best validation step, augmented targets: the labels never move, the corrupted pixels keep
    their noise exactly, the temperature is learned and recorded, the kept step is the best one."""
    config = dataclasses.replace(BASE, loss="cross_entropy", learn_labels=False, init="noise", corruption=0.3,
                                 lr_schedule="cosine", augment="crop", augment_on="target")
    result = run(split, kernel, config)
    np.testing.assert_array_equal(result.labels, krr.centered_one_hot(result.classes, 10))
    frozen = kip.corruption_mask(result.images.shape, config)
    assert frozen.mean() == pytest.approx(0.3, abs=1 / 64)
    np.testing.assert_array_equal(result.images[frozen], result.initial_images[frozen])
    temperatures = [h["temperature"] for h in result.history if "loss" in h]
    assert len(temperatures) == config.steps and temperatures[0] != kip.INITIAL_TEMPERATURE
    scored = [h for h in result.history if "val_accuracy" in h]
    assert result.best_step == max(scored, key=lambda h: (h["val_accuracy"], -h["step"]))["step"]
    assert np.isfinite(result.images).all()


@pytest.mark.parametrize("name", ["conv_rf", "finite_ntk"])
@pytest.mark.parametrize("option", ["float64", "several processes"])
def test_options_a_kernel_cannot_honour_are_refused_in_one_line(split, name, option, monkeypatch):
    config = BASE
    if option == "float64":
        config = dataclasses.replace(BASE, float64=True)
    else:
        monkeypatch.setattr(distributed, "process_count", lambda: 2)
    x_train, y_train, _, _ = split
    with pytest.raises(UserError, match=re.escape(option) + " is not available with .*: .+") as raised:
        kip.distill(x_train, y_train, 10, make_kernel(name), config, progress=False)
    assert "\n" not in str(raised.value)


def test_keeping_the_best_step_needs_a_validation_split(split):
    x_train, y_train, _, _ = split
    with pytest.raises(UserError, match="distill.keep=best_validation needs a validation split"):
        kip.distill(x_train, y_train, 10, make_kernel("fc"), BASE, progress=False)
    from pipeline.run import workflow

    with pytest.raises(UserError, match=r"distill.keep=best_validation .* and eval_every=0; expected eval_every >= 1"):
        workflow.check_distill_settings(KernelConfig(), dataclasses.replace(BASE, eval_every=0))


def test_the_cosine_schedule_halves_the_second_of_two_steps(split):
    """Over 2 steps optax's cosine decay gives lr, then lr (1 + cos(pi / 2)) / 2 = lr / 2. Both runs
    reach the same support and Adam state after step 1, so step 2's Adam direction is the same and
    the cosine run's displacement must be half the constant run's. Tolerance: each float32 support
    is rounded once per step, so a displacement is off by at most 2 ulp of the largest pixel; 8 ulp
    covers both sides."""
    x_train, y_train, _, _ = split
    config = DistillConfig(support_per_class=1, steps=2, learning_rate=0.01, target_batch=100, checkpoint_every=1)
    fn = make_kernel("fc")

    def supports(schedule):
        first = kip.distill(x_train, y_train, 10, fn, dataclasses.replace(config, steps=1, lr_schedule=schedule),
                            progress=False)
        return first, kip.distill(x_train, y_train, 10, fn, dataclasses.replace(config, lr_schedule=schedule),
                                  progress=False)

    (first, constant), (first_cosine, cosine) = supports("constant"), supports("cosine")
    # Step 1 of a 1-step cosine run is also at lr: the premise above.
    np.testing.assert_allclose(first_cosine.images, first.images, rtol=0,
                               atol=2 * np.finfo(np.float32).eps * np.abs(first.images).max())
    full, halved = constant.images - first.images, cosine.images - first.images
    assert np.abs(full).max() > 1e-3
    tolerance = 8 * np.finfo(np.float32).eps * np.abs(constant.images).max()
    np.testing.assert_allclose(halved, 0.5 * full, rtol=0, atol=tolerance)


def test_augmentation_is_a_translation_with_zero_fill_and_a_function_of_seed_and_step():
    """Reference: numpy shifts. Every output image is its input shifted by at most `pad` pixels
    (zeros enter from the border), flips only with crop_flip; the same (seed, step) gives the same
    draw, another step another one."""
    from pipeline.distill import augment

    rng = np.random.default_rng(0)
    images = rng.normal(size=(16, 8, 8, 1)).astype(np.float32)
    key = augment.step_key(0, 3)
    np.testing.assert_array_equal(key, augment.step_key(0, 3))
    assert not np.array_equal(key, augment.step_key(0, 4))
    out = np.asarray(augment.apply(jnp.asarray(key), jnp.asarray(images), "crop", 2))
    padded = np.pad(images, ((0, 0), (2, 2), (2, 2), (0, 0)))
    shifts = {(i, j) for i in range(5) for j in range(5)}
    for image, shifted in zip(padded, out):
        assert any(np.array_equal(shifted, image[i:i + 8, j:j + 8]) for i, j in shifts)
    assert not np.array_equal(out, images)
    flipped = np.asarray(augment.apply(jnp.asarray(key), jnp.asarray(images), "crop_flip", 0))
    mirrored = [np.array_equal(f, i[:, ::-1]) and not np.array_equal(f, i) for f, i in zip(flipped, images)]
    unchanged = [np.array_equal(f, i) for f, i in zip(flipped, images)]
    assert all(m or u for m, u in zip(mirrored, unchanged)) and any(mirrored) and any(unchanged)
    np.testing.assert_array_equal(np.asarray(augment.apply(jnp.asarray(key), jnp.asarray(images), "none", 2)), images)


def test_a_foreign_file_at_the_checkpoint_path_is_never_overwritten(split, tmp_path):
    x_train, y_train, _, _ = split
    path = tmp_path / "ckpt.npz"
    path.write_text("not a checkpoint")
    config = dataclasses.replace(BASE, keep="last", eval_every=0)
    with pytest.raises(UserError, match="is not a kip checkpoint; it would be overwritten"):
        kip.distill(x_train, y_train, 10, make_kernel("fc"), config, checkpoint=path, progress=False)
    assert path.read_text() == "not a checkpoint"


def test_the_pipeline_refuses_flips_for_digits():
    """A mirrored digit is another symbol (or none): crop_flip is refused for mnist and digits, in one line."""
    from pathlib import Path

    from pipeline.data.prepared import prepare
    from pipeline.run import workflow
    from pipeline.run.config import DataConfig, PreprocessConfig

    prepared = prepare(DataConfig("embedded", "digits"), PreprocessConfig("standardize"), cache_dir=Path("/nonexistent"))
    with pytest.raises(UserError, match=re.escape("distill.augment=crop_flip mirrors images, and a mirrored digits "
                                                  "image is no longer its class; expected augment: none|crop")):
        workflow.distill(prepared, KernelConfig(), dataclasses.replace(BASE, augment="crop_flip"), progress=False)


def test_label_solve_takes_one_fixed_kernel_and_refuses_a_drawn_one(split):
    x_train, y_train, _, _ = split
    config = DistillConfig(method="label_solve", support_per_class=1)
    fixed = kip.label_solve(x_train, y_train, 10, make_kernel("fc"), config)
    assert np.array_equal(fixed.labels, kip.label_solve(x_train, y_train, 10, make_kernel("fc").kernel_fn, config).labels)
    for name in ("conv_rf", "finite_ntk"):
        with pytest.raises(UserError, match="Label Solve needs one fixed kernel; .* draws its kernel afresh every step"):
            kip.label_solve(x_train, y_train, 10, make_kernel(name), config)


def test_a_start_support_refuses_corruption(split):
    x_train, y_train, _, _ = split
    start = (x_train[:10], np.asarray(krr.centered_one_hot(y_train[:10], 10)), y_train[:10])
    with pytest.raises(UserError, match="distill.corruption=0.2 corrupts the support KIP initialises itself"):
        kip.distill(x_train, y_train, 10, make_kernel("fc"), dataclasses.replace(BASE, corruption=0.2, keep="last"),
                    start=start, progress=False)


def test_the_cross_entropy_summed_over_target_blocks_is_the_whole_batchs():
    """kernel_block splits the targets into blocks whose losses are summed: for the Platt
    cross-entropy too, the value and gradient equal the unblocked ones. float64, so rounding
    (sums of 30 terms in another order) stays below 1e-12 relative."""
    import jax
    from pipeline.compat import enable_x64

    rng = np.random.default_rng(0)
    kernel_fn = kernels.make(KernelConfig())
    with enable_x64():
        support = kip.Support(jnp.asarray(rng.standard_normal((6, 4, 4, 1))), jnp.asarray(rng.standard_normal((6, 3))),
                              jnp.log(jnp.asarray(kip.INITIAL_TEMPERATURE)))
        x_t = jnp.asarray(rng.standard_normal((30, 4, 4, 1)))
        y_t = jnp.asarray(krr.centered_one_hot(rng.integers(0, 3, 30), 3), jnp.float64)
        whole = jax.value_and_grad(lambda s: kip.kip_loss(kernel_fn, 1e-3, s, x_t, y_t))(support)
        blocked = jax.value_and_grad(lambda s: kip.kip_loss(kernel_fn, 1e-3, s, x_t, y_t, kernel_block=6 * 7))(support)
    assert float(blocked[0]) == pytest.approx(float(whole[0]), rel=1e-12)
    for a, b in zip(jax.tree_util.tree_leaves(whole[1]), jax.tree_util.tree_leaves(blocked[1])):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-10, atol=1e-14)
