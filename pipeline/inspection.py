"""`kip inspect`: validate a distilled artifact and summarise its lineage.

Validation is the readers' own (`artifacts.load_npz`, `parquet.read_parquet`: schema, shapes,
checksum); here we add the cross-file check a Parquet artifact needs when its ZCA matrix lives in
the sibling .npz, and shape the answer for people.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from pipeline import artifacts, parquet
from pipeline.errors import UserError


def inspect_artifact(path: Path) -> dict[str, Any]:
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".npz":
        distilled = artifacts.load_npz(path)
        checks = ["npz readable", "shapes consistent", "values finite"]
    elif suffix == ".parquet":
        distilled = parquet.read_parquet(path)
        checks = ["schema", "checksum", "shapes consistent", "values finite"]
        record = parquet.transform_record(path)
        if "zca_matrix" in record:
            sibling = path.parent / record["zca_matrix"]["file"]
            npz = artifacts.load_npz(sibling)
            if npz.transform.checksum() != record["sha256"]:
                raise UserError(f"{sibling} holds a different preprocessing transform than {path} records")
            checks.append(f"ZCA transform matches {sibling.name}")
    else:
        raise UserError(f"{path} has suffix {suffix or '(none)'!r}; expected .parquet or .npz")
    meta = distilled.metadata
    counts = np.bincount(distilled.classes, minlength=len(distilled.labels[0])).tolist()
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
        "privacy": _privacy_summary(meta.get("privacy")),
        "versions": meta.get("versions"),
    }


def _privacy_summary(section: dict[str, Any] | None) -> dict[str, Any] | None:
    """The summary lines of the privacy section (the per-image lists stay in the file)."""
    if not section:
        return None
    keys = ("metric", "support", "real_test_images", "median_ratio")
    summary = {k: section[k] for k in keys if k in section}
    if "learned_pixels" in section:
        summary["learned_pixels"] = {k: section["learned_pixels"][k] for k in keys if k in section["learned_pixels"]}
    return summary
