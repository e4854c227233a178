"""`kip inspect`: validate a distilled artifact and summarise its lineage.

Validation is the readers' own (`artifacts.load_npz`, `parquet.read_parquet`: schema, per-part
checksums, shapes, class range, lineage sections, the transform's sha256); here we shape the
answer for people.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from pipeline.artifacts import npz as artifacts, parquet
from pipeline.errors import UserError


def inspect_artifact(path: Path) -> dict[str, Any]:
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".npz":
        distilled = artifacts.load_npz(path)
        checks = ["npz readable", "checksums", "shapes consistent", "values finite", "lineage"]
    elif suffix == ".parquet":
        distilled = parquet.read_parquet(path)
        checks = ["schema", "checksums", "shapes consistent", "values finite", "lineage", "transform sha256"]
    else:
        raise UserError(f"{path} has suffix {suffix or '(none)'!r}; expected .parquet or .npz")
    meta = distilled.metadata
    # The readers have checked 0 <= class < label width, so this allocates one counter per class.
    counts = np.bincount(distilled.classes, minlength=distilled.labels.shape[1]).tolist()
    return {
        "path": str(path),
        "valid": True,
        "checks": checks,
        "images": int(len(distilled.images)),
        "image_shape": list(distilled.images.shape[1:]),
        "images_per_class": counts,
        "preprocessing": distilled.transform.method,
        "dataset": meta.get("dataset"),
        "kernel": meta.get("kernel"),
        "distill": meta.get("distill"),
        "params_hash": meta.get("params_hash"),
        "seed": meta.get("seed"),
        "steps": meta.get("steps"),
        "final_loss": meta.get("final_loss"),
        "code_version": meta.get("code_version"),
        "privacy": _privacy_summary(path, meta.get("privacy")),
        "versions": meta.get("versions"),
    }


def _privacy_summary(path: Path, section: Any) -> dict[str, Any] | None:
    """The summary lines of the privacy section (the per-image lists stay in the file)."""
    if not section:
        return None
    if not isinstance(section, dict):
        raise UserError(f"{path}: metadata privacy is a JSON {type(section).__name__}; expected an object")
    keys = ("metric", "support", "real_heldout_images", "median_ratio")
    summary = {k: section[k] for k in keys if k in section}
    learned = section.get("learned_pixels")
    if isinstance(learned, dict):
        summary["learned_pixels"] = {k: learned[k] for k in keys if k in learned}
    return summary
