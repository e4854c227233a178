"""Any TFDS image-classification dataset, read from a prepared `data_dir`.

We call `tfds.load(..., download=False)`: this project never reaches a dataset hub at run time.
Prepare a dataset once where a network is allowed (`tfds build mnist --data_dir DIR`) or from
manual files (TFDS "manual_dir"), then point `data.data_dir` at DIR.
"""
from __future__ import annotations

import os

import numpy as np

from pipeline.data.sources import RawSplits
from pipeline.errors import UserError


def load(name: str, data_dir: str | None) -> RawSplits:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    try:
        import tensorflow_datasets as tfds
    except ModuleNotFoundError:
        raise UserError("data.source=tfds needs TensorFlow Datasets, which this install lacks: "
                        "pip install -c constraints.txt -e '.[full,tfds]'") from None

    try:
        builder = tfds.builder(name, data_dir=data_dir)
    except tfds.core.registered.DatasetNotFoundError:
        raise UserError(
            f"data.name={name!r} is not a TFDS dataset; expected a name from `tfds.list_builders()`"
        ) from None
    info = builder.info
    supervised = info.supervised_keys
    if not supervised or len(supervised) != 2:
        raise UserError(f"data.name={name!r} has no (image, label) supervised keys; expected an image-classification dataset")
    label_feature = info.features[supervised[1]]
    num_classes = getattr(label_feature, "num_classes", None)
    if not num_classes:
        raise UserError(f"data.name={name!r} has no ClassLabel target; expected an image-classification dataset")
    splits = set(info.splits.keys()) if info.splits else {"train", "test"}
    for split in ("train", "test"):
        if splits and split not in splits:
            raise UserError(f"data.name={name!r} has splits {sorted(splits)}; expected train and test")
    try:
        train, test = tfds.load(
            name, split=["train", "test"], data_dir=data_dir, download=False, as_supervised=True
        )
    except AssertionError as err:  # TFDS's way of saying "not prepared in data_dir"
        raise UserError(
            f"TFDS dataset {name!r} is not prepared in data.data_dir={data_dir!r} ({str(err).splitlines()[0]}); "
            f"build it there first, e.g. `tfds build {name} --data_dir DIR`"
        ) from None
    x_train, y_train = _to_arrays(tfds, train)
    x_test, y_test = _to_arrays(tfds, test)
    if x_train.ndim == 3:
        x_train, x_test = x_train[..., None], x_test[..., None]
    pixel_max = 255.0 if x_train.dtype == np.uint8 else 1.0
    names = tuple(getattr(label_feature, "names", None) or (str(c) for c in range(num_classes)))
    return RawSplits(
        x_train=x_train,
        y_train=y_train.astype(np.int64),
        x_test=x_test,
        y_test=y_test.astype(np.int64),
        pixel_max=pixel_max,
        class_names=names,
        origin=f"tfds:{builder.info.full_name} (data_dir {data_dir or 'default'})",
    )


def _to_arrays(tfds, dataset) -> tuple[np.ndarray, np.ndarray]:
    """Materialise a (image, label) tf.data pipeline in chunks.

    `batch_size=-1` would be shorter, but TF 2.21 aborts the process on it for generator-backed
    datasets (seen with tfds.testing.mock_data); fixed-size batches work everywhere.
    """
    images, labels = [], []
    for x, y in tfds.as_numpy(dataset.batch(4096)):
        images.append(x)
        labels.append(y)
    if not images:
        raise UserError("the TFDS split is empty; expected images in train and test")
    return np.concatenate(images), np.concatenate(labels)
