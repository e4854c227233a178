"""A random-feature ConvNet kernel: the NNGP of a ConvNet, estimated from a few random finite ones.

Why: neural-tangents' exact kernel for a ConvNet with pooling tracks the covariance of every pair
of pixels through every layer; on 28x28 MNIST its KIP step (value and gradient) costs 0.1-0.35 s
*per image pair*, i.e. hours for one 100-support x 1,000-target step on 2 CPU cores
(benchmarks/conv_kip.py measures it). The NNGP is an expectation over random networks, so, as in
RFAD (Loo et al., NeurIPS 2022), we estimate it with `networks` random ConvNets of `width`
channels:

    k(x, x') ~= b_std^2 + (1 / networks) * sum_m (w_std^2 / F) <h_m(x), h_m(x')>

where h_m is network m's flattened last block (F numbers). That is an inner product of explicit
features, so a KIP step costs O((n_s + n_t) x one forward pass) rather than O(n_s x n_t) pixel-pair
covariances, and the targets need no gradient.

The network is exactly `finite.ConvNet` without its readout (3x3 conv, ReLU, 2x2 average pooling
per block; ntk parameterisation), so the kernel is the infinite-width limit of the network that
`train.architecture=conv` trains. Its error against the exact kernel has two parts: Monte-Carlo
noise, O(1/sqrt(networks x width)), and a finite-width bias, O(1/width) (tests/test_conv_features.py
holds both to neural-tangents on small images).
"""
from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from pipeline.distill import krr
from pipeline.errors import UserError, check_non_negative, check_positive
from pipeline.evaluate.finite import ScaledConv
from pipeline.run.config import KernelConfig

Params = dict


@dataclass(frozen=True)
class ConvFeatureConfig:
    """The random ConvNets behind the kernel: `depth` blocks of `width` channels, `networks` of them."""

    width: int = 64
    depth: int = 3
    networks: int = 4
    w_std: float = math.sqrt(2.0)
    b_std: float = 0.1

    def __post_init__(self) -> None:
        for name in ("width", "depth", "networks"):
            check_positive(f"conv_features.{name}", getattr(self, name), integer=True)
        check_positive("conv_features.w_std", self.w_std)
        check_non_negative("conv_features.b_std", self.b_std)


class ConvBody(nn.Module):
    """`finite.ConvNet` up to its readout: the representation the readout layer sees."""

    width: int
    depth: int
    w_std: float
    b_std: float

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        for _ in range(self.depth):
            x = nn.relu(ScaledConv(self.width, "ntk", self.w_std, self.b_std)(x))
            x = nn.avg_pool(x, (2, 2), strides=(2, 2))
        return x.reshape(x.shape[0], -1)


def check_image_shape(config: ConvFeatureConfig, image_shape: tuple[int, ...]) -> None:
    """Every block halves the image; refuse depths that would leave less than one pixel."""
    if len(image_shape) != 3:
        raise UserError(f"images have shape {tuple(image_shape)}; expected (height, width, channels)")
    smallest = min(image_shape[:2])
    if smallest < 2 ** config.depth:
        raise UserError(
            f"conv_features.depth={config.depth} halves {image_shape[0]}x{image_shape[1]} images below one pixel; "
            f"expected conv_features.depth <= {int(math.log2(smallest))}"
        )


def _body(config: ConvFeatureConfig) -> ConvBody:
    return ConvBody(config.width, config.depth, config.w_std, config.b_std)


def init(key: jax.Array, config: ConvFeatureConfig, image_shape: tuple[int, ...]) -> Params:
    """Parameters of `config.networks` independent random ConvNets, stacked on a leading axis."""
    check_image_shape(config, image_shape)
    body = _body(config)
    probe = jnp.zeros((1, *image_shape), jnp.float32)
    keys = jax.random.split(key, config.networks)
    return jax.vmap(lambda k: body.init(k, probe))(keys)


def features(params: Params, x: jax.Array, config: ConvFeatureConfig) -> jax.Array:
    """(n, networks x F) features whose inner products, plus b_std^2, are the estimated NNGP."""
    body = _body(config)
    h = jax.vmap(lambda p: body.apply(p, x))(params)  # (networks, n, F)
    scale = config.w_std / math.sqrt(h.shape[0] * h.shape[2])
    return scale * jnp.moveaxis(h, 0, 1).reshape(x.shape[0], -1)


def features_by_network(params: Params, x: jax.Array, config: ConvFeatureConfig) -> jax.Array:
    """`features`, computed one network at a time (memory: one network's activations, as in
    `kernel_by_network`), for feature maps of many networks on many images."""
    body = _body(config)
    h = jax.lax.map(lambda p: body.apply(p, x), params)  # (networks, n, F)
    scale = config.w_std / math.sqrt(h.shape[0] * h.shape[2])
    return scale * jnp.moveaxis(h, 0, 1).reshape(x.shape[0], -1)


def kernel_from_features(f1: jax.Array, f2: jax.Array, config: ConvFeatureConfig) -> jax.Array:
    return f1 @ f2.T + config.b_std ** 2


def kernel(params: Params, x1: jax.Array, x2: jax.Array, config: ConvFeatureConfig) -> jax.Array:
    """The estimated NNGP k(x1, x2) under one draw of random networks."""
    return kernel_from_features(features(params, x1, config), features(params, x2, config), config)


def kernel_by_network(params: Params, x1: jax.Array, x2: jax.Array, config: ConvFeatureConfig) -> jax.Array:
    """`kernel`, one network at a time: the activations of one network are alive at once, not of
    all (16 networks' first blocks on 1,000 MNIST images would be 3 GB together)."""
    body = _body(config)

    def one(p):
        h1, h2 = body.apply(p, x1), body.apply(p, x2)
        return h1 @ h2.T / h1.shape[1]

    per_network = jax.lax.map(one, params)  # (networks, n1, n2)
    return config.w_std ** 2 * jnp.mean(per_network, axis=0) + config.b_std ** 2


def feature_rows(params: Params, x: np.ndarray, config: ConvFeatureConfig, block_size: int = 1000,
                 one_network_at_a_time: bool = False) -> np.ndarray:
    """Features of many images, `block_size` at a time (one compiled shape; the last block padded)."""
    x = np.asarray(x, np.float32)
    featurize = features_by_network if one_network_at_a_time else features
    apply = jax.jit(lambda p, b: featurize(p, b, config))
    out = None
    for start in range(0, len(x), block_size):
        block = x[start:start + block_size]
        padded = np.concatenate([block, np.zeros((block_size - len(block), *x.shape[1:]), np.float32)])
        values = np.asarray(apply(params, padded))[: len(block)]
        if out is None:
            out = np.empty((len(x), values.shape[1]), np.float32)
        out[start:start + len(block)] = values
    return out


# Network draws: training steps fold in the step; the monitor and the evaluation kernel are one draw each.
TRAIN_STREAM, MONITOR_STREAM, EVAL_STREAM = 1, 2, 3
EVAL_SEED = 0  # the evaluation kernel is the same draw whatever the run's seed


def network_key(seed: int, stream: int, index: int) -> jax.Array:
    """The random networks of one draw: a pure function of (seed, stream, index)."""
    return jax.random.fold_in(jax.random.fold_in(jax.random.PRNGKey(seed), stream), index)


def feature_config(kernel: KernelConfig, networks: int | None = None) -> ConvFeatureConfig:
    """The random ConvNets behind a `conv_rf` kernel spec (`networks` defaults to one KIP step's)."""
    return ConvFeatureConfig(width=kernel.rf_width, depth=kernel.depth, networks=networks or kernel.rf_networks,
                             w_std=kernel.w_std, b_std=kernel.b_std)


class EvaluationKernel:
    """k(x1, x2) under one fixed draw of `kernel.rf_eval_networks` random ConvNets: a deterministic
    kernel function (`kernels.make`) for evaluation, Label Solve and random-subset baselines.

    The networks are drawn inside the call from a fixed key, so the function is pure and jittable
    and holds no arrays; they are evaluated one at a time (`kernel_by_network`).

    The kernel is an explicit finite feature map, so `kernels.kernel_rows` and
    `kernels.support_matrix` take its features instead (`feature_rows`): an evaluation scores many
    supports (random subsets, Label Solve repeats, KIP) against the same test, validation and
    training images, and each of those arrays then passes through the networks once per process
    instead of once per support. The features are kept by content (sha256) up to `cache_bytes`,
    least recently used first out: MNIST's 50,000 training images take 1.8 GB with 16 networks.
    """

    cache_bytes = 4 * 2**30

    def __init__(self, kernel: KernelConfig):
        self.features = feature_config(kernel, kernel.rf_eval_networks)
        self._cache: dict[str, np.ndarray] = {}  # insertion order = least recently used first

    def __call__(self, x1: jax.Array, x2: jax.Array) -> jax.Array:
        params = init(network_key(EVAL_SEED, EVAL_STREAM, 0), self.features, tuple(x1.shape[1:]))
        return kernel_by_network(params, x1, x2, self.features)

    @property
    def offset(self) -> float:
        """k = features . features + offset (the readout bias's variance)."""
        return self.features.b_std ** 2

    def feature_rows(self, x: np.ndarray) -> np.ndarray:
        """The (n, networks x F) float32 features of `x`, computed once per distinct content."""
        x = np.ascontiguousarray(x, np.float32)
        key = hashlib.sha256(repr(x.shape).encode() + x.tobytes()).hexdigest()
        if key in self._cache:
            self._cache[key] = self._cache.pop(key)  # most recently used
            return self._cache[key]
        params = init(network_key(EVAL_SEED, EVAL_STREAM, 0), self.features, tuple(x.shape[1:]))
        rows = feature_rows(params, x, self.features, one_network_at_a_time=True)
        rows.setflags(write=False)
        self._cache[key] = rows
        while sum(a.nbytes for a in self._cache.values()) > self.cache_bytes and len(self._cache) > 1:
            self._cache.pop(next(iter(self._cache)))
        return rows


PIPELINE_VAL_IMAGES = 2000  # KIP with kernel.architecture=conv_rf monitors on the first 2,000 validation images


class RandomFeatureKernel:
    """The KIP engine's view of conv_rf (`kip.KipKernel`): every step draws `features.networks`
    fresh random ConvNets, a pure function of (seed, step), as RFAD does (Loo et al., NeurIPS 2022).
    Resampling keeps the support from fitting one draw's noise; the expected loss is KIP's loss
    under the exact kernel up to the estimate's bias. Target features need no gradient, so a step
    is one forward pass of the targets and one forward-backward pass of the support.
    """

    refusals = {
        "distill.float64": "its random ConvNets are float32 Flax modules; expected float64: false",
        "several processes": "each process would draw and run every network for all target rows; run it as one process",
    }

    def __init__(self, features: ConvFeatureConfig, image_shape: tuple[int, ...], seed: int):
        check_image_shape(features, image_shape)
        self.features, self.image_shape, self.seed = features, tuple(image_shape), seed
        self.settings = {"name": "kernel.architecture=conv_rf", "features": dict(features.__dict__),
                         "seed": seed}

    def draw(self, step: int) -> jax.Array:
        return network_key(self.seed, TRAIN_STREAM, step)

    def fit(self, key: jax.Array, images: jax.Array, labels: jax.Array, reg: float):
        params = init(key, self.features, self.image_shape)
        f_s = features(params, images, self.features)
        return params, f_s, krr.fit(kernel_from_features(f_s, f_s, self.features), labels, reg)

    def predict(self, key: jax.Array, fitted, x: jax.Array) -> jax.Array:
        params, f_s, alpha = fitted
        f_t = jax.lax.stop_gradient(features(params, x, self.features))
        return kernel_from_features(f_t, f_s, self.features) @ alpha

    def monitor(self, x_val: np.ndarray, y_val: np.ndarray, reg: float, networks: int,
                val_images: int = PIPELINE_VAL_IMAGES):
        """Validation accuracy with one draw of `networks` networks from a stream training never
        uses, on the first `val_images` validation images: `kip.distill`'s monitor."""
        monitor_features = ConvFeatureConfig(**{**self.features.__dict__, "networks": networks})
        params = init(network_key(self.seed, MONITOR_STREAM, 0), monitor_features, self.image_shape)
        x_mon, y_mon = x_val[:val_images], y_val[:val_images]

        def monitor(images: np.ndarray, labels: np.ndarray) -> dict[str, float]:
            return {"val_accuracy": krr_accuracy(images, labels, x_mon, y_mon, params, monitor_features, reg)}

        return monitor


def krr_accuracy(images: np.ndarray, labels: np.ndarray, x: np.ndarray, y: np.ndarray, params: Params,
                 features_config: ConvFeatureConfig, reg: float, block_size: int = 500) -> float:
    """Accuracy of KRR fitted on (images, labels) with the kernel of `params`' networks."""
    return krr.accuracy(krr_predictions(images, labels, x, params, features_config, reg, block_size), y)


def krr_predictions(images: np.ndarray, labels: np.ndarray, x: np.ndarray, params: Params,
                    features_config: ConvFeatureConfig, reg: float, block_size: int = 500) -> np.ndarray:
    """KRR's outputs on `x` (one row per image), fitted on (images, labels) with the kernel of
    `params`' networks. Everything after the support is computed `block_size` rows at a time, so
    the rows of one whole block scored alone come out as they do in a full scoring
    (tests/test_published_supports.py re-scores a block against a full scoring's predictions)."""
    f_s = feature_rows(params, images, features_config, block_size)
    k_ss = jnp.asarray(f_s @ f_s.T + features_config.b_std ** 2)
    alpha = np.asarray(krr.fit(k_ss, jnp.asarray(labels, jnp.float32), reg))
    f_x = feature_rows(params, x, features_config, block_size)
    return np.concatenate([(f_x[start:start + block_size] @ f_s.T + features_config.b_std ** 2) @ alpha
                           for start in range(0, len(f_x), block_size)])
