"""What the paper matrix's stages share: a cell's config from params.yaml, and its dataset prepared
as every matrix stage prepares it (standardised, the cell's seed, the download cache)."""
from __future__ import annotations

import sys
from pathlib import Path

import paper  # this folder is on sys.path: the stage scripts beside it import this module

from pipeline.data.prepared import Prepared, prepare
from pipeline.errors import UserError
from pipeline.data.datasets import default_cache_dir
from pipeline.run.config import DataConfig, PreprocessConfig
from pipeline.run.params import read_params

# The stages' shared entry-point helpers (stages/_stage.py): the matrix's stage scripts import this
# module before `_stage`, so putting the main pipeline's stages/ folder on the path here is enough.
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "stages"))


def load_cell(params_path: Path, key: str) -> paper.CellConfig:
    params = read_params(params_path)
    cells = params.get("cells") or {}
    if key not in cells:
        raise UserError(f"cell {key!r} is not in {params_path}; expected one of: {'|'.join(sorted(cells))}")
    return paper.cell_config(key, params.get("shared") or {}, cells[key], params.get("train") or {})


def prepare_dataset(dataset: str, seed: int) -> Prepared:
    data = DataConfig(paper.DATASETS[dataset], dataset, seed=seed)
    return prepare(data, PreprocessConfig("standardize"), cache_dir=default_cache_dir())
