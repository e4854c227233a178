"""params.yaml -> config records, at the stage boundary.

One top-level key per stage section plus a shared `seed`. Unknown keys and wrong types are
one-line errors naming the key (`distill.steps='ten' is not allowed; expected an integer`).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, TypeVar

import yaml

from pipeline.errors import UserError
from pipeline.run.config import from_mapping

T = TypeVar("T")


def read_params(path: Path) -> dict[str, Any]:
    path = Path(path)
    try:
        params = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise UserError(f"{path} does not exist; expected the pipeline's params.yaml") from None
    except yaml.YAMLError as err:
        raise UserError(f"{path} is not valid YAML ({str(err).splitlines()[0]})") from None
    if not isinstance(params, dict):
        raise UserError(f"{path} holds {type(params).__name__}; expected a mapping of sections")
    return params


def section(params: dict[str, Any], name: str, record: type[T], **extra: Any) -> T:
    """Build `record` from params[name]; `extra` fills fields that live elsewhere (e.g. the seed)."""
    values = params.get(name)
    if values is None:
        values = {}
    if not isinstance(values, dict):
        raise UserError(f"{name}={values!r} is not allowed; expected a mapping of {name}.* keys")
    for key in extra:
        if key in values:
            raise UserError(f"{name}.{key} is not a key of params.yaml; set the top-level {key} instead")
    return from_mapping(record, {**values, **extra}, name)


def seed(params: dict[str, Any]) -> int:
    value = params.get("seed", 0)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise UserError(f"seed={value!r} is not allowed; expected an integer >= 0")
    return value
