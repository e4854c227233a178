"""Per-channel standardisation and regularised ZCA whitening, fitted on the training split only.

The fitted transform is a value (`Transform`) that travels with every distilled artifact: a
distilled set lives in the transformed space, and test images must go through the same transform
before a kernel compares them (forgetting this costs ~10 points of accuracy with released sets).

ZCA follows the KIP follow-up code (Nguyen et al. 2021): each image is centred and scaled to unit
norm, then whitened with (C + zca_reg * tr(C)/d * I)^(-1/2), C = X^T X / n. Colour images are first
standardised per channel on the training split, as the papers do for RGB data, so that one bright
channel does not dominate the per-image norm. For one channel that step is skipped (mean 0, std 1,
applied exactly): per-image centring and unit norm remove a global shift and scale anyway.

The follow-up paper used ZCA with ConvNet kernels. FC and RBF kernels see images only through dot
products, and zca_reg=0.1 weights ~300 directions about equally (the top 20 principal components
keep 6 % of the variance instead of 79 %), so real images become nearly orthogonal and KRR on a
few random ones falls towards chance (Fashion-MNIST, FC NTK: 51 % for 100 random images against
73 % standardised; 21 % against 50 % for 10). The cause is the kernel's inductive bias on whitened
inputs, not input scale, bias, ridge or precision; see docs/reproduction.md, "ZCA and the random baseline".
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np

from pipeline.run.config import PreprocessConfig

_EPS = 1e-8


@dataclass(frozen=True)
class Transform:
    method: str
    channel_mean: np.ndarray  # (C,) used by standardize
    channel_std: np.ndarray  # (C,)
    zca_matrix: np.ndarray  # (d, d) used by zca; (0, 0) otherwise
    zca_reg: float

    ARRAY_KEYS = ("method", "channel_mean", "channel_std", "zca_matrix", "zca_reg")

    def apply(self, images: np.ndarray) -> np.ndarray:
        """Map NHWC float images into the space the kernel sees; float32 out."""
        images = np.asarray(images, dtype=np.float32)
        if self.method == "none":
            return images
        standardised = ((images - self.channel_mean) / self.channel_std).astype(np.float32)
        if self.method == "standardize":
            return standardised
        flat = _normalise_images(standardised.reshape(len(images), -1).astype(np.float64))
        return (flat @ self.zca_matrix).astype(np.float32).reshape(images.shape)

    def to_arrays(self) -> dict[str, np.ndarray]:
        """Flat name -> array mapping, for .npz files and Parquet metadata."""
        return {
            "method": np.array(self.method),
            "channel_mean": self.channel_mean,
            "channel_std": self.channel_std,
            "zca_matrix": self.zca_matrix,
            "zca_reg": np.array(self.zca_reg),
        }

    def checksum(self) -> str:
        """sha256 over the fitted arrays: two artifacts agree on preprocessing iff these match."""
        digest = hashlib.sha256()
        for key, value in sorted(self.to_arrays().items()):
            digest.update(key.encode())
            digest.update(np.ascontiguousarray(value).tobytes())
        return digest.hexdigest()

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray]) -> "Transform":
        return cls(
            method=str(arrays["method"]),
            channel_mean=np.asarray(arrays["channel_mean"], dtype=np.float32),
            channel_std=np.asarray(arrays["channel_std"], dtype=np.float32),
            zca_matrix=np.asarray(arrays["zca_matrix"], dtype=np.float64),
            zca_reg=float(arrays["zca_reg"]),
        )


def fit(config: PreprocessConfig, train_images: np.ndarray) -> Transform:
    """Fit the transform on training images (NHWC) only."""
    channels = train_images.shape[-1]
    mean = np.zeros(channels, np.float32)
    std = np.ones(channels, np.float32)
    zca = np.zeros((0, 0), np.float64)
    if config.method == "standardize" or (config.method == "zca" and channels > 1):
        pixels = train_images.reshape(-1, channels).astype(np.float64)
        mean = pixels.mean(axis=0).astype(np.float32)
        std = np.maximum(pixels.std(axis=0), _EPS).astype(np.float32)
    if config.method == "zca":
        standardised = ((np.asarray(train_images, np.float32) - mean) / std).astype(np.float32)
        zca = _fit_zca(standardised.reshape(len(train_images), -1).astype(np.float64), config.zca_reg)
    return Transform(config.method, mean, std, zca, float(config.zca_reg))


def _normalise_images(flat: np.ndarray) -> np.ndarray:
    centred = flat - flat.mean(axis=1, keepdims=True)
    return centred / np.maximum(np.linalg.norm(centred, axis=1, keepdims=True), _EPS)


def _fit_zca(flat: np.ndarray, zca_reg: float) -> np.ndarray:
    normalised = _normalise_images(flat)
    dim = normalised.shape[1]
    cov = normalised.T @ normalised / len(normalised)
    ridge = zca_reg * np.trace(cov) / dim
    eigvals, eigvecs = np.linalg.eigh(cov + ridge * np.eye(dim))
    inv_sqrt = 1.0 / np.sqrt(np.maximum(eigvals, _EPS))
    return (eigvecs * inv_sqrt) @ eigvecs.T
