"""Pictures: the display mapping undoes the preprocessing, grids put each class on its row, PNGs are
reproducible bytes."""
from __future__ import annotations

import numpy as np

from pipeline.data import preprocess
from pipeline.evaluate import plots
from pipeline.run.config import PreprocessConfig


def test_viewable_undoes_standardisation(rng):
    raw = rng.random((6, 5, 5, 3)).astype(np.float32)
    transform = preprocess.fit(PreprocessConfig("standardize"), rng.random((40, 5, 5, 3)).astype(np.float32))
    shown = plots.viewable(transform.apply(raw), transform)
    lo, hi = raw.min(axis=(1, 2, 3), keepdims=True), raw.max(axis=(1, 2, 3), keepdims=True)
    np.testing.assert_allclose(shown, (raw - lo) / (hi - lo), atol=1e-5)


def test_viewable_undoes_zca_whitening_up_to_per_image_scale(rng):
    train = rng.random((200, 4, 4, 1)).astype(np.float32)
    transform = preprocess.fit(PreprocessConfig("zca", zca_reg=0.1), train)
    raw = rng.random((5, 4, 4, 1))
    shown = plots.viewable(transform.apply(raw), transform)
    lo, hi = raw.min(axis=(1, 2, 3), keepdims=True), raw.max(axis=(1, 2, 3), keepdims=True)
    # ZCA first centres and normalises each image: min-max scaling of the inverse gives the raw image back
    np.testing.assert_allclose(shown, (raw - lo) / (hi - lo), atol=1e-4)


def test_tile_puts_each_class_on_its_row():
    images = np.stack([np.full((2, 2, 1), v, np.float64) for v in (0.1, 0.2, 0.3)])
    grid = plots.tile(images, np.array([1, 0, 1]), num_classes=2, pad=1)
    assert grid.shape == (7, 7, 1)
    assert grid[1, 1, 0] == 0.2 and grid[4, 1, 0] == 0.1 and grid[4, 4, 0] == 0.3
    assert grid[1, 4, 0] == 1.0  # empty slot stays white


def test_figures_render_to_identical_png_bytes(rng):
    transform = preprocess.fit(PreprocessConfig("standardize"), rng.random((20, 8, 8, 1)).astype(np.float32))
    before = rng.standard_normal((20, 8, 8, 1))
    classes = np.repeat(np.arange(10), 2)
    names = [str(i) for i in range(10)]
    history = [{"step": s, "loss": 1.0 / s, **({"val_accuracy": 0.5} if s % 5 == 0 else {})} for s in range(1, 21)]
    first = plots.png_bytes(plots.support_figure(before, before + 0.1, classes, names, transform))
    again = plots.png_bytes(plots.support_figure(before, before + 0.1, classes, names, transform))
    assert first.startswith(b"\x89PNG") and first == again
    curves = plots.learning_curves_figure(history)
    assert plots.png_bytes(curves) == plots.png_bytes(plots.learning_curves_figure(history))


def test_the_support_figure_titles_do_not_overlap_at_one_image_a_class(rng):
    """At 10 images (one a class) the panels are narrow; their titles must stay apart and inside."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    transform = preprocess.fit(PreprocessConfig("standardize"), rng.random((20, 28, 28, 1)).astype(np.float32))
    for per_class in (1, 10, 50):
        images = rng.standard_normal((10 * per_class, 28, 28, 1))
        classes = np.repeat(np.arange(10), per_class)
        fig = plots.support_figure(images, images, classes, [str(i) for i in range(10)], transform)
        renderer = FigureCanvasAgg(fig).get_renderer()
        fig.draw(renderer)
        left, right = (ax.title.get_window_extent(renderer) for ax in fig.axes)
        assert left.x1 < right.x0, (per_class, left, right)
        assert left.x0 >= 0 and right.x1 <= fig.bbox.x1, (per_class, left, right)
