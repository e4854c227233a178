"""Pictures of a run: the support images before and after distillation, and the learning curves.

Distilled pixels live in the preprocessed space and drift outside the data's range, so for viewing
we undo what the transform can undo (standardisation exactly; ZCA's whitening matrix, which is
invertible) and rescale each image to [0, 1]. The per-image centring/normalisation that ZCA starts
with cannot be undone, nor needs to be: min-max scaling hides it anyway.

Figures use matplotlib's object API (no pyplot state, no display needed) and are saved without a
timestamp, so the same run gives the same PNG bytes.
"""
from __future__ import annotations

import io
from pathlib import Path
from typing import Sequence

import numpy as np
from matplotlib.figure import Figure

from pipeline.artifacts import atomic
from pipeline.data.preprocess import Transform


def viewable(images: np.ndarray, transform: Transform) -> np.ndarray:
    """NHWC images from the kernel's space to [0, 1] per image, for display only."""
    x = np.asarray(images, np.float64)
    if transform.method == "standardize":
        x = x * transform.channel_std + transform.channel_mean
    elif transform.method == "zca":
        flat = x.reshape(len(x), -1)
        x = np.linalg.solve(transform.zca_matrix, flat.T).T.reshape(x.shape)
        x = x * transform.channel_std + transform.channel_mean  # colour: the per-channel standardisation
    lo = x.min(axis=(1, 2, 3), keepdims=True)
    hi = x.max(axis=(1, 2, 3), keepdims=True)
    return (x - lo) / np.maximum(hi - lo, 1e-12)


def tile(images: np.ndarray, classes: np.ndarray, num_classes: int, pad: int = 1) -> np.ndarray:
    """One row per class, images of that class left to right, on a white background."""
    n, h, w, c = images.shape
    per_class = max(int(np.max(np.bincount(classes, minlength=num_classes))), 1)
    canvas = np.ones((num_classes * (h + pad) + pad, per_class * (w + pad) + pad, c))
    slot = np.zeros(num_classes, dtype=int)
    for image, cls in zip(images, classes):
        top, left = pad + cls * (h + pad), pad + slot[cls] * (w + pad)
        canvas[top:top + h, left:left + w] = image
        slot[cls] += 1
    return canvas


def support_figure(
    before: np.ndarray,
    after: np.ndarray,
    classes: np.ndarray,
    class_names: Sequence[str],
    transform: Transform,
) -> Figure:
    """Initial and distilled support side by side, one row per class."""
    num_classes = len(class_names)
    panels = [("initial", before), ("distilled", after)]
    per_class = max(int(np.max(np.bincount(classes, minlength=num_classes))), 1)
    width = min(max(2 + 2 * 0.45 * per_class, 5.5), 24)  # 5.5 in: room for both titles at 1 image a class
    fig = Figure(figsize=(width, 1.4 + 0.45 * num_classes), dpi=100, layout="constrained")
    axes = fig.subplots(1, 2)
    for ax, (title, images) in zip(axes, panels):
        grid = tile(viewable(images, transform), classes, num_classes)
        ax.imshow(grid[..., 0] if grid.shape[-1] == 1 else grid, cmap="gray", vmin=0, vmax=1, interpolation="nearest")
        ax.set_title(f"{title}\n{len(images)} images", fontsize=10)
        h = images.shape[1] + 1
        ax.set_yticks([1 + h * i + h / 2 - 1 for i in range(num_classes)], labels=list(class_names), fontsize=7)
        ax.set_xticks([])
    return fig


def learning_curves_figure(history: Sequence[dict[str, float]]) -> Figure:
    """KIP loss per step (log scale) and, where monitored, KRR accuracy on the validation split."""
    fig = Figure(figsize=(9, 3.2), dpi=100, layout="constrained")
    loss_ax, acc_ax = fig.subplots(1, 2)
    losses = [h for h in history if "loss" in h]
    loss_ax.plot([h["step"] for h in losses], [h["loss"] for h in losses], linewidth=0.8)
    loss_ax.set_yscale("log")
    loss_ax.set(xlabel="step", ylabel="KIP loss", title="loss")
    monitored = [h for h in history if "val_accuracy" in h]
    if monitored:
        acc_ax.plot([h["step"] for h in monitored], [h["val_accuracy"] for h in monitored], marker="o")
    acc_ax.set(xlabel="step", ylabel="KRR accuracy", title="accuracy on the validation split")
    for ax in (loss_ax, acc_ax):
        ax.grid(alpha=0.3)
    return fig


def png_bytes(fig: Figure) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", metadata={"Software": None})
    return buffer.getvalue()


def save_png(path: Path, fig: Figure) -> None:
    data = png_bytes(fig)
    with atomic.replace_on_success(Path(path)) as tmp:
        tmp.write_bytes(data)


def transfer_figure(curve: Sequence[dict[str, float]]) -> Figure:
    """Validation accuracy of finite networks during training: distilled support vs random real images."""
    fig = Figure(figsize=(5, 3.2), dpi=100, layout="constrained")
    ax = fig.subplots()
    for key, marker, label in (("distilled_val_accuracy", "o", "distilled support"),
                               ("baseline_val_accuracy", "s", "random real images")):
        points = [p for p in curve if key in p]  # a side that trained for fewer steps has fewer points
        ax.plot([p["step"] for p in points], [p[key] for p in points], marker=marker, label=label)
    ax.set(xlabel="training step", ylabel="validation accuracy (mean over seeds)", title="finite network")
    ax.grid(alpha=0.3)
    ax.legend()
    return fig
