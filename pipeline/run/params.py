"""params.yaml -> config records, at the stage boundary.

One top-level key per stage section plus a shared `seed`. Unknown keys and wrong types are
one-line errors naming the key (`distill.steps='ten' is not allowed; expected an integer`).
"""
from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any, TypeVar

import yaml

from pipeline.errors import UserError
from pipeline.run.config import from_mapping

T = TypeVar("T")


# The most values a params file may expand to. YAML aliases let a few hundred bytes expand into
# billions of values (9 levels of 9 aliases: 387 million), which PyYAML builds in full; ours are a
# few hundred (experiments/paper/params.yaml, anchors and merge keys included: about 2,000).
MAX_VALUES = 100_000


def load_yaml(text: str, where: str) -> Any:
    """yaml.safe_load with alias expansion bounded: the document is composed first (an alias is a
    reference to one node there, so composing is as cheap as the text), its expanded size counted,
    and only a document of at most MAX_VALUES values is built."""
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
        sizes: dict[int, int] = {}

        def expanded(node: yaml.Node) -> int:
            if id(node) not in sizes:
                sizes[id(node)] = 0  # a node that contains itself counts once (PyYAML builds it as a cycle)
                if isinstance(node, yaml.MappingNode):
                    children = [child for pair in node.value for child in pair]
                elif isinstance(node, yaml.SequenceNode):
                    children = node.value
                else:
                    children = []
                sizes[id(node)] = min(1 + sum(expanded(child) for child in children), MAX_VALUES + 1)
            return sizes[id(node)]

        if root is not None and expanded(root) > MAX_VALUES:
            raise UserError(f"{where} expands to more than {MAX_VALUES:,} values through YAML aliases; expected a "
                            "params file whose anchors expand to a few thousand values at most")
        return yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise UserError(f"{where} is not valid YAML ({str(err).splitlines()[0]})") from None
    except RecursionError:
        raise UserError(f"{where} nests deeper than YAML can be read here; expected a params file of a few levels") from None


def read_params(path: Path) -> dict[str, Any]:
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise UserError(f"{path} does not exist; expected the pipeline's params.yaml") from None
    params = load_yaml(text, str(path))
    if not isinstance(params, dict):
        raise UserError(f"{path} holds {type(params).__name__}; expected a mapping of sections")
    return params


PIPELINE_SECTIONS = ("seed", "data", "preprocess", "kernel", "distill", "evaluate", "train", "tracking")


def read_pipeline_params(path: Path) -> dict[str, Any]:
    """`read_params` for the main pipeline's stages: a top-level key that is none of its sections
    (a typo such as `distil:`) is one line, not a section silently ignored while its stage runs on
    defaults."""
    params = read_params(path)
    unknown = sorted((key for key in params if key not in PIPELINE_SECTIONS), key=str)
    if unknown:
        close = difflib.get_close_matches(str(unknown[0]), PIPELINE_SECTIONS, n=1)
        hint = f" (did you mean {close[0]}?)" if close else ""
        raise UserError(f"{path}: {unknown[0]!r} is not a section of the pipeline's params{hint}; "
                        f"expected: {'|'.join(PIPELINE_SECTIONS)}")
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
