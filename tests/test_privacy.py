"""Privacy: nearest-training-image distances against scipy, and corruption that really stays noise."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from scipy.spatial.distance import cdist

from pipeline.distill import kip
from pipeline.errors import UserError
from pipeline.evaluate import privacy
from pipeline.kernels import functions as kernels
from pipeline.run.config import DistillConfig, KernelConfig


def test_nearest_train_matches_scipy(rng):
    train = rng.standard_normal((1000, 4, 4, 2))
    queries = rng.standard_normal((17, 4, 4, 2))
    distance, index = privacy.nearest_train(queries, train, block=128)
    full = cdist(queries.reshape(17, -1), train.reshape(1000, -1))
    np.testing.assert_allclose(distance, full.min(axis=1), rtol=1e-9)
    np.testing.assert_array_equal(index, full.argmin(axis=1))


def test_near_copies_get_their_exact_distance_despite_the_float32_search(rng):
    """The search runs in float32, where |q|^2 - 2 q.x + |x|^2 for images far from the origin
    (norm^2 ~ 784 * 50^2 = 2e6) loses everything below ~2e6 * 2^-24 * 784 ~ 100 in the squared
    distance: a near copy at squared distance 784e-6 would read as noise. The float64
    recomputation must still report its exact distance and index."""
    train = 50.0 + rng.standard_normal((2000, 28, 28, 1)).astype(np.float32)
    picked = np.array([3, 1500, 1999])
    queries = train[picked].astype(np.float64) + 1e-3 * rng.standard_normal((3, 28, 28, 1))
    distance, index = privacy.nearest_train(queries, train, block=512)
    full = cdist(queries.reshape(3, -1), train.reshape(2000, -1).astype(np.float64))
    np.testing.assert_array_equal(index, picked)
    np.testing.assert_allclose(distance, full.min(axis=1), rtol=1e-9)


def test_masked_nearest_train_matches_scipy_on_the_kept_pixels(rng):
    train = rng.standard_normal((400, 3, 3, 2))
    queries = rng.standard_normal((9, 3, 3, 2))
    mask = rng.random(queries.shape) < 0.3
    distance, index = privacy.nearest_train(queries, train, block=64, mask=mask)
    for i in range(len(queries)):
        keep = mask[i].reshape(-1)
        full = cdist(queries[i].reshape(1, -1)[:, keep], train.reshape(400, -1)[:, keep])[0]
        assert distance[i] == pytest.approx(full.min(), rel=1e-9) and index[i] == full.argmin()


def test_copies_of_training_images_are_found_at_distance_zero(rng):
    train = rng.standard_normal((300, 8, 8, 1)).astype(np.float32)
    test = rng.standard_normal((50, 8, 8, 1)).astype(np.float32)
    picked = np.array([5, 17, 299])
    section = privacy.report(train[picked], train, test, seed=0)
    assert section["nearest_train_index"] == picked.tolist()
    assert max(section["nearest_train_distance"]) < 1e-3
    assert section["support"]["count"] == 3 and section["real_heldout_images"]["count"] == 3
    assert section["real_heldout_images"]["median"] > 1.0 and section["median_ratio"] < 1e-3
    assert "learned_pixels" not in section  # nothing corrupted: the whole image is the learned part


def test_a_copy_hidden_under_frozen_noise_is_found_on_the_learned_pixels(rng):
    train = rng.standard_normal((300, 8, 8, 1))
    test = rng.standard_normal((50, 8, 8, 1))
    learned = rng.random((2, 8, 8, 1)) < 0.1
    support = np.where(learned, train[[3, 7]], 10 * rng.standard_normal((2, 8, 8, 1)))  # 90 % loud noise
    section = privacy.report(support, train, test, seed=0, learned=learned)
    assert section["support"]["median"] > section["real_heldout_images"]["median"]  # whole images look far
    assert section["learned_pixels"]["nearest_train_index"] == [3, 7]
    assert max(section["learned_pixels"]["nearest_train_distance"]) < 1e-6  # but the learned pixels are copies


def test_corrupted_pixels_are_noise_and_never_learned(digits_standardized):
    x_train, y_train, _, _ = digits_standardized
    config = DistillConfig(support_per_class=2, steps=30, target_batch=300, corruption=0.6, learn_labels=True,
                           checkpoint_every=0)
    kernel_fn = kernels.make(KernelConfig())
    result = kip.distill(x_train, y_train, 10, kernel_fn, config, progress=False)
    mask = kip.corruption_mask(result.images.shape, config)
    assert (mask.reshape(len(mask), -1).sum(axis=1) == round(0.6 * 64)).all()  # exactly, in every image
    np.testing.assert_array_equal(result.images[mask], result.initial_images[mask])
    assert np.abs(result.images[~mask] - result.initial_images[~mask]).max() > 1e-3  # the rest did learn
    clean = kip.init_support(x_train, y_train, 10, dataclasses.replace(config, corruption=0.0))[0]
    assert np.array_equal(result.initial_images[~mask], clean[~mask])  # uncorrupted pixels start as the real image
    assert not np.isclose(result.initial_images[mask], clean[mask]).any()


@pytest.mark.parametrize("overrides, fragment", [
    (dict(corruption=1.0), "distill.corruption=1.0 is not allowed; expected a fraction in [0, 1)"),
    (dict(corruption=-0.1), "distill.corruption=-0.1 is not allowed; expected a finite number >= 0"),
    (dict(method="label_solve", learn_labels=True), "distill.learn_labels=true is not allowed with distill.method=label_solve"),
])
def test_distill_cross_field_rules(overrides, fragment):
    with pytest.raises(UserError) as error:
        DistillConfig(**overrides)
    assert fragment in str(error.value)


def test_the_first_and_last_image_of_every_block_are_searched(rng):
    """Near copies of the training images at the block boundaries (the first image, each block's
    first and last, the last) must come back with their own index and their float64 distance. The
    reference is scipy's float64 cdist over all 2000 images. Each query is 1e-3 per pixel from its
    image (squared distance ~6e-5) and ~128 from any other, so the nearest is its own beyond any
    float32 rounding of the search; both distances are float64 differences (rtol 1e-9)."""
    train = rng.standard_normal((2000, 8, 8, 1)).astype(np.float32)
    picked = np.array([0, 1, 499, 500, 999, 1000, 1998, 1999])
    queries = train[picked].astype(np.float64) + 1e-3 * rng.standard_normal((len(picked), 8, 8, 1))
    full = cdist(queries.reshape(len(picked), -1), train.reshape(2000, -1).astype(np.float64))
    np.testing.assert_array_equal(full.argmin(axis=1), picked)
    for block in (500, 4096):  # four full blocks; one block larger than the training set
        distance, index = privacy.nearest_train(queries, train, block=block)
        np.testing.assert_array_equal(index, picked)
        np.testing.assert_allclose(distance, full.min(axis=1), rtol=1e-9)
