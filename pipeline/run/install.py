"""Which install this is. The base install (numpy, pyarrow, PyYAML, cryptography) reads and checks
distilled sets; distilling, scoring, training and the DVC stages need the '.[full]' extra. A command
that needs it says so in one line instead of failing on an import deep inside JAX code."""
from __future__ import annotations

import importlib.util

from pipeline.errors import UserError

FULL_INSTALL = "pip install -c constraints.txt -e '.[full]'"
# One module per '.[full]' requirement the pipeline imports (import name, not distribution name).
FULL_MODULES = ("jax", "optax", "flax", "scipy", "sklearn", "tqdm", "dvc", "mlflow", "matplotlib", "threadpoolctl")


def missing_full_modules(needed: tuple[str, ...] = FULL_MODULES) -> list[str]:
    """The modules of `needed` this environment lacks (empty on a full install)."""
    return [name for name in needed if importlib.util.find_spec(name) is None]


def require_full(needed: tuple[str, ...] = FULL_MODULES) -> None:
    """Raise one line naming what is missing and the install that brings it."""
    missing = missing_full_modules(needed)
    if missing:
        named = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
        raise UserError(f"this install reads distilled sets only ({named} missing); install the full one: {FULL_INSTALL}")
