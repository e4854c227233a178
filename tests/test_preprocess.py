"""Standardisation and ZCA, checked against their defining properties."""
from __future__ import annotations

import numpy as np
import pytest

from pipeline.data import preprocess
from pipeline.run.config import PreprocessConfig


@pytest.fixture
def colour_images(rng):
    base = rng.standard_normal((400, 4, 4, 3)) * np.array([1.0, 3.0, 0.5]) + np.array([0.2, -1.0, 4.0])
    return base.astype(np.float32)


def test_standardize_gives_zero_mean_unit_std_per_channel_on_train(colour_images):
    """Reference: the definition, NumPy's mean and std of the output, taken in float32. The
    float32-stored mean shifts the output's mean by <= u |mean| / std = 4.8e-7, and NumPy's float32
    pairwise sums over 6,400 values round by ~1e-6 (measured: 9e-8 for the mean, 1.7e-6 for the
    std). atol 1e-5 is 6x the latter; a sample std (ddof=1) is off by 7.8e-5."""
    transform = preprocess.fit(PreprocessConfig("standardize"), colour_images)
    out = transform.apply(colour_images).reshape(-1, 3)
    np.testing.assert_allclose(out.mean(axis=0), 0.0, atol=1e-5)
    np.testing.assert_allclose(out.std(axis=0), 1.0, atol=1e-5)


def test_zca_whitens_with_the_documented_shrinkage(rng):
    """After ZCA the train covariance has eigenvalues s / (s + r), r = zca_reg * mean(s),
    where s are the eigenvalues of the covariance of the per-image normalised data.
    Reference: that formula, with s from NumPy's float64 eigvalsh. The whitened images come back
    in float32 (each entry rounded by <= u relative), which moves the covariance by
    <= 2u |W|^T |W| / n and so each eigenvalue by <= 2u tr = 1e-6 (tr <= 8); atol 1e-5 is 10x that
    (measured 2.3e-9)."""
    images = (rng.standard_normal((2000, 3, 3, 1)) @ np.ones((1, 1)) + rng.standard_normal((2000, 1, 1, 1))).astype(np.float32)
    images[..., 0, 0, :] *= 3.0
    reg = 0.1
    transform = preprocess.fit(PreprocessConfig("zca", zca_reg=reg), images)
    flat = images.reshape(len(images), -1).astype(np.float64)
    centred = flat - flat.mean(axis=1, keepdims=True)
    normalised = centred / np.linalg.norm(centred, axis=1, keepdims=True)
    cov = normalised.T @ normalised / len(normalised)
    s = np.linalg.eigvalsh(cov)
    r = reg * s.sum() / len(s)
    white = transform.apply(images).reshape(len(images), -1).astype(np.float64)
    got = np.linalg.eigvalsh(white.T @ white / len(white))
    np.testing.assert_allclose(np.sort(got), np.sort(s / (s + r)), atol=1e-5)


def test_zca_matrix_is_symmetric(colour_images):
    transform = preprocess.fit(PreprocessConfig("zca"), colour_images)
    np.testing.assert_allclose(transform.zca_matrix, transform.zca_matrix.T, atol=1e-10)


@pytest.mark.parametrize("method", ["none", "standardize", "zca"])
def test_transform_survives_a_round_trip_through_arrays(colour_images, method, tmp_path):
    transform = preprocess.fit(PreprocessConfig(method), colour_images[:300])
    np.savez(tmp_path / "t.npz", **transform.to_arrays())
    with np.load(tmp_path / "t.npz") as data:
        restored = preprocess.Transform.from_arrays(dict(data))
    held_out = colour_images[300:]
    np.testing.assert_array_equal(restored.apply(held_out), transform.apply(held_out))


def test_fit_uses_only_the_images_it_is_given(colour_images):
    """Each fit's channel mean and std are those of the images it was given: NumPy float64 mean and
    population std over every pixel of each channel. Both are stored as float32, so they agree to
    the storage's half-ulp rounding (2^-24 relative) plus float64 summation error (~1e-14): one
    float32 ulp, 2^-23, is the tolerance. A sample std (ddof=1) would be off by ~1e-4 relative."""
    for images in (colour_images[:200], colour_images):
        pixels = images.reshape(-1, 3).astype(np.float64)
        fitted = preprocess.fit(PreprocessConfig("standardize"), images)
        np.testing.assert_allclose(fitted.channel_mean, pixels.mean(axis=0), rtol=2.0 ** -23, atol=0)
        np.testing.assert_allclose(fitted.channel_std, pixels.std(axis=0), rtol=2.0 ** -23, atol=0)
    # the two sets' means differ, so a fit that saw other images than it was given would show
    first_half = colour_images[:200].reshape(-1, 3).astype(np.float64)
    assert np.abs(first_half.mean(axis=0) - colour_images.reshape(-1, 3).mean(axis=0)).max() > 1e-3


def test_zca_maps_new_images_through_the_train_fit(colour_images):
    """Test images meet ZCA as the training images did: colour images are standardised per channel
    with the training split's mean and std, then each is centred and scaled to unit norm on its own,
    then multiplied by the matrix fitted on the training split (never refitted).
    Reference: that recipe written out in float64 NumPy with the fitted values (which the
    standardisation and whitening tests check). The transform standardises in float32 (one rounding,
    <= 2^-24 relative per pixel), then does the same float64 arithmetic and rounds to float32
    (<= 2^-24 relative): rtol 2^-23 covers the last rounding twice over. The first rounding moves the
    unit-norm vector by at most 2^-24 |s| / |s - mean(s)| (s: the standardised image), and the matrix
    multiplies that by at most its largest singular value: atol is that bound per image. Measured:
    within it by a factor of ~10."""
    train, new = colour_images[:300], colour_images[300:] * 2.0 + 0.5
    transform = preprocess.fit(PreprocessConfig("zca"), train)
    pixels = train.reshape(-1, 3).astype(np.float64)
    np.testing.assert_allclose(transform.channel_mean, pixels.mean(axis=0), rtol=2.0 ** -23)
    np.testing.assert_allclose(transform.channel_std, pixels.std(axis=0), rtol=2.0 ** -23)
    standardised = (new.astype(np.float64) - transform.channel_mean) / transform.channel_std
    flat = standardised.reshape(len(new), -1)
    centred = flat - flat.mean(axis=1, keepdims=True)
    expected = (centred / np.linalg.norm(centred, axis=1, keepdims=True)) @ transform.zca_matrix
    ratio = np.linalg.norm(flat, axis=1) / np.linalg.norm(centred, axis=1)
    atol = 2.0 ** -24 * ratio.max() * np.linalg.norm(transform.zca_matrix, 2)
    np.testing.assert_allclose(transform.apply(new).reshape(len(new), -1), expected, rtol=2.0 ** -23, atol=atol)
    refitted = preprocess.fit(PreprocessConfig("zca"), new)
    assert not np.allclose(refitted.apply(new), transform.apply(new), atol=1e-3)


def test_zca_ignores_each_images_brightness_and_contrast(colour_images):
    """The per-image normalisation makes one-channel ZCA blind to x -> a x + b per image (a > 0),
    so a support, a random subset and the test images land in one space whatever their pixel
    scale. (Colour images are standardised per channel first, which a per-image shift does not
    commute with.) Invariance check (no reference): ours against ours on the original images. Only
    the float32 rounding of a x + b differs, <= u |a x + b| per pixel, i.e. <= 1.4 u of the image's
    centred norm (|a x + b| / |centred| <= 1.4 here), which normalising at most doubles and the
    matrix amplifies by at most |M|_2 = 1 / sqrt(ridge) = 12.6 (d = 16): <= 2.1e-6, plus the outputs'
    float32 rounding. atol 1e-4 is 47x that."""
    colour_images = np.ascontiguousarray(colour_images[..., :1])
    transform = preprocess.fit(PreprocessConfig("zca"), colour_images)
    scale = np.linspace(0.5, 3.0, len(colour_images), dtype=np.float32)[:, None, None, None]
    shift = np.linspace(-1.0, 1.0, len(colour_images), dtype=np.float32)[:, None, None, None]
    np.testing.assert_allclose(transform.apply(colour_images * scale + shift), transform.apply(colour_images), atol=1e-4)


def test_one_channel_zca_skips_the_channel_standardisation_exactly(rng):
    """For one channel the per-image centring and unit norm already remove a global shift and scale,
    so ZCA stores mean 0 and std 1, whose application is exact in float32: the output is the recipe
    without that step, bit for bit (MNIST's prepared data do not change with colour support)."""
    gray = rng.uniform(0, 1, size=(200, 6, 6, 1)).astype(np.float32)
    transform = preprocess.fit(PreprocessConfig("zca"), gray)
    assert transform.channel_mean.tolist() == [0.0] and transform.channel_std.tolist() == [1.0]
    flat = gray.reshape(len(gray), -1).astype(np.float64)
    centred = flat - flat.mean(axis=1, keepdims=True)
    expected = ((centred / np.linalg.norm(centred, axis=1, keepdims=True)) @ transform.zca_matrix).astype(np.float32)
    np.testing.assert_array_equal(transform.apply(gray).reshape(len(gray), -1), expected)
