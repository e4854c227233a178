"""Stage entry points on bad params: one line naming the key, exit 2, nothing written."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]


def _stage(tmp_path: Path, params: dict, *argv: str) -> subprocess.CompletedProcess:
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    return subprocess.run(
        [sys.executable, *argv, "--params", str(tmp_path / "params.yaml")],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
    )


@pytest.mark.parametrize("params, fragment", [
    ({"data": {"source": "hub", "name": "mnist"}}, "data.source='hub' is not allowed; expected one of: embedded|registry|tfds|files"),
    ({"data": {"source": "embedded", "name": "digits", "split": 3}}, "data.split"),
    ({"data": {"source": "embedded", "name": "digits"}, "preprocess": {"method": "pca"}},
     "preprocess.method='pca' is not allowed; expected one of: none|standardize|zca"),
    ({"data": "mnist"}, "data='mnist' is not allowed; expected a mapping of data.* keys"),
])
def test_prepare_rejects_bad_params_in_one_line(tmp_path, params, fragment):
    result = _stage(tmp_path, params, str(REPO / "stages" / "prepare.py"), "out.npz")
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("stage ")]
    assert len(lines) == 1 and fragment in lines[0] and "Traceback" not in result.stderr
    assert not (tmp_path / "out.npz").exists()


@pytest.mark.parametrize("params, fragment", [
    ({"distill": {"steps": 0}}, "distill.steps=0 is not allowed; expected a positive integer"),
    ({"distill": {"stepz": 10}}, "distill.stepz"),
    ({"kernel": {"architecture": "resnet"}}, "kernel.architecture='resnet' is not allowed; expected one of: fc|conv|rbf|conv_rf"),
    ({"seed": -1}, "seed=-1 is not allowed; expected an integer >= 0"),
    ({"kernel": {"architecture": "conv_rf"}}, "kernel.kind='ntk' is not available with kernel.architecture=conv_rf"),
    ({"kernel": {"architecture": "conv_rf", "kind": "nngp"}, "distill": {"float64": True}},
     "distill.float64=true is not available with kernel.architecture=conv_rf: its random ConvNets are float32"),
    ({"distill": {"seed": 1}}, "distill.seed is not a key of params.yaml; set the top-level seed instead"),
    ({"distil": {"steps": 5}}, "'distil' is not a section of the pipeline's params (did you mean distill?); expected: seed|"),
])
def test_distill_rejects_bad_params_before_reading_data(tmp_path, params, fragment):
    result = _stage(
        tmp_path, params, str(REPO / "stages" / "distill.py"), "missing-prepared.npz",
        "--npz", "d.npz", "--parquet", "d.parquet", "--metrics", "m.json",
        "--loss-curve", "l.csv", "--accuracy-curve", "a.csv", "--images", "s.png", "--curves", "c.png",
    )
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("stage ")]
    assert len(lines) == 1 and fragment in lines[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["params.yaml"]


def test_evaluate_names_the_missing_input(tmp_path):
    result = _stage(tmp_path, {}, str(REPO / "stages" / "evaluate.py"), "d.npz", "p.npz", "--metrics", "m.json")
    assert result.returncode == 2
    assert "d.npz does not exist" in result.stderr and not (tmp_path / "m.json").exists()


@pytest.mark.parametrize("params, fragment", [
    ({"train": {"architecture": "resnet"}}, "train.architecture='resnet' is not allowed; expected one of: fc|conv"),
    ({"train": {"loss": "hinge"}}, "train.loss='hinge' is not allowed; expected one of: mse|xent"),
    ({"train": {"seeds": 0}}, "train.seeds=0 is not allowed; expected a positive integer"),
    ({"train": {"architecture": "conv", "labels_choice": "validation"}},
     "train.labels=solved (tried by train.labels_choice=validation) needs train.architecture=fc (got 'conv')"),
])
def test_train_rejects_bad_params_in_one_line(tmp_path, params, fragment):
    result = _stage(
        tmp_path, params, str(REPO / "stages" / "train.py"), "d.npz", "p.npz",
        "--metrics", "m.json", "--curve", "c.csv", "--curve-png", "c.png",
    )
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("stage ")]
    assert len(lines) == 1 and fragment in lines[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["params.yaml"]


def test_a_yaml_alias_bomb_in_params_is_one_line_at_once(tmp_path):
    """Nine levels of nine aliases (387 million values once expanded, in 400 bytes): refused in one
    line within seconds, before PyYAML builds it; a real params file with anchors and merge keys
    (experiments/paper's) reads exactly as yaml.safe_load reads it."""
    import time

    import yaml

    from pipeline.errors import UserError
    from pipeline.run.params import read_params

    lines = ['a0: ["x", "x", "x", "x", "x", "x", "x", "x", "x"]']
    for level in range(1, 10):
        lines.append(f"a{level}: &a{level} [" + ", ".join([f"*a{level - 1}"] * 9) + "]")
    lines[0] = "a0: &a0 " + lines[0][4:]
    (tmp_path / "params.yaml").write_text("\n".join(lines) + "\n")
    started = time.monotonic()
    with pytest.raises(UserError, match=r"params.yaml expands to more than 100,000 values through YAML aliases") as raised:
        read_params(tmp_path / "params.yaml")
    assert time.monotonic() - started < 5 and "\n" not in str(raised.value)
    paper = REPO / "experiments" / "paper" / "params.yaml"
    assert read_params(paper) == yaml.safe_load(paper.read_text())
