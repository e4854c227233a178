"""Where KIP's arrays live: one mesh over every JAX device, batches of images split across it.

Work in KIP and in evaluation is a kernel between a small support set (replicated: every device
needs all of it) and a large batch of targets or test images (sharded by rows: each device
computes its rows of K_ts). XLA's SPMD partitioner (jax.sharding) inserts the one all-reduce the
support gradient needs. The same code runs on one CPU, several GPUs, or several hosts once
`jax.distributed.initialize()` has made their devices one global set (docs/scaling.md).

With a single device every helper here is the identity, so the single-device program is exactly
the one we benchmark.
"""
from __future__ import annotations

import functools

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

AXIS = "batch"


def count() -> int:
    return jax.device_count()


@functools.lru_cache(maxsize=None)
def _mesh(devices: tuple) -> Mesh:
    return Mesh(np.array(devices), (AXIS,))


def mesh() -> Mesh:
    """The 1-D mesh over all (global) devices."""
    return _mesh(tuple(jax.devices()))


def rows_sharding(ndim: int) -> NamedSharding:
    """Split the leading (batch) axis across devices, keep the rest whole."""
    return NamedSharding(mesh(), PartitionSpec(AXIS, *([None] * (ndim - 1))))


def replicated_sharding() -> NamedSharding:
    return NamedSharding(mesh(), PartitionSpec())


def shard_rows(x: jax.Array) -> jax.Array:
    """Inside jit: ask XLA to split x by rows across devices (any row count; XLA pads)."""
    if count() == 1:
        return x
    return jax.lax.with_sharding_constraint(x, rows_sharding(x.ndim))


def put_replicated(x: np.ndarray) -> jax.Array:
    """A host array on every device. Built shard by shard from the local copy, so it also works
    when the mesh spans hosts (each process holds the same array)."""
    x = np.asarray(x)
    if count() == 1:
        return jax.numpy.asarray(x)
    return jax.make_array_from_callback(x.shape, replicated_sharding(), lambda index: x[index])


def replicate_tree(tree):
    """Every array leaf of a pytree (support, optimiser state) on every device."""
    if count() == 1:
        return tree
    return jax.tree_util.tree_map(lambda leaf: put_replicated(np.asarray(leaf)), tree)


def put_rows(x: np.ndarray) -> jax.Array:
    """A host array split by rows across devices; rows must be a multiple of the device count
    (callers pad: see `padded_rows`)."""
    x = np.asarray(x)
    if count() == 1:
        return jax.numpy.asarray(x)
    return jax.make_array_from_callback(x.shape, rows_sharding(x.ndim), lambda index: x[index])


def to_host(x) -> np.ndarray:
    """A jax.Array as a NumPy array on this host, whatever its layout.

    With one process every array is addressable and this is np.asarray. Across processes
    (pipeline/run/distributed.py) a replicated result (the loss, the support) is read from a local
    copy, and a row-split one (a kernel block) is gathered from every process.
    """
    if not isinstance(x, jax.Array) or x.is_fully_addressable:
        return np.asarray(x)
    if x.is_fully_replicated:
        return np.asarray(x.addressable_data(0))
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def padded_rows(rows: int) -> int:
    """The smallest multiple of the device count that holds `rows`."""
    n = count()
    return -(-rows // n) * n
