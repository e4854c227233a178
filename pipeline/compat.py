"""The few JAX names that moved between the releases the core supports (jax 0.5.3, the pinned set,
through the newest release: constraints.txt and constraints-latest.txt). Everything else the
library uses is the same public API in both; these shims keep one code path."""
from __future__ import annotations

import jax

try:  # jax >= 0.6: a public config context manager
    enable_x64 = jax.enable_x64
except AttributeError:  # jax 0.5.x
    from jax.experimental import enable_x64  # noqa: F401


def jaxlib_extension():
    """jaxlib's C++ extension module, which hosts the distributed coordination service:
    `xla_extension` in jaxlib 0.5, `_jax` later."""
    try:
        from jaxlib import xla_extension as module
    except ImportError:
        from jaxlib import _jax as module
    return module
