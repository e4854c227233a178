"""What the paper matrix's stages share: a cell's config from params.yaml, and its dataset prepared
as every matrix stage prepares it (standardised, the cell's seed, the download cache)."""
from __future__ import annotations

from pathlib import Path

from pipeline import paper
from pipeline.cli import default_cache_dir
from pipeline.config import DataConfig, PreprocessConfig
from pipeline.errors import UserError
from pipeline.params import read_params
from pipeline.prepared import Prepared, prepare


def load_cell(params_path: Path, key: str) -> paper.CellConfig:
    params = read_params(params_path)
    cells = params.get("cells") or {}
    if key not in cells:
        raise UserError(f"cell {key!r} is not in {params_path}; expected one of: {'|'.join(sorted(cells))}")
    return paper.cell_config(key, params.get("shared") or {}, cells[key], params.get("train") or {})


def prepare_dataset(dataset: str, seed: int) -> Prepared:
    data = DataConfig(paper.DATASETS[dataset], dataset, seed=seed)
    return prepare(data, PreprocessConfig("standardize"), cache_dir=default_cache_dir())
