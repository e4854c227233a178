"""The `kip` command as a user meets it: help, one-line errors, and a whole distill/evaluate run."""
from __future__ import annotations

import os
import json
import subprocess
import sys

import numpy as np
import pytest

from pipeline.artifacts import npz as artifacts
from pipeline.run.cli import main


def run_cli(capsys, *argv):
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.mark.parametrize("argv, fragment", [
    (["data", "--source", "hub"], "data.source='hub' is not allowed; expected one of: embedded|registry|tfds|files"),
    (["data", "--source", "registry", "--dataset", "cifar10"], "data.name='cifar10' is not allowed; expected one of: mnist|fashion_mnist"),
    (["data", "--source", "embedded", "--dataset", "mnist"], "data.name='mnist' is not allowed; expected one of: digits"),
    (["data", "--source", "files"], "data.data_dir is required when data.source=files"),
    (["distill", "-o", "x.npz", "--kernel", "resnet"], "kernel.architecture='resnet' is not allowed; expected one of: fc|conv|rbf|conv_rf"),
    (["distill", "-o", "x.npz", "--kernel-kind", "gp"], "kernel.kind='gp' is not allowed; expected one of: ntk|nngp"),
    (["distill", "-o", "x.npz", "--support-per-class", "0"], "distill.support_per_class=0 is not allowed; expected a positive integer"),
    (["distill", "-o", "x.npz", "--steps", "-5"], "distill.steps=-5 is not allowed; expected a positive integer"),
    (["distill", "-o", "x.npz", "--lr", "0"], "distill.learning_rate=0.0 is not allowed; expected a positive finite number"),
    (["distill", "-o", "x.npz", "--preprocess", "pca"], "preprocess.method='pca' is not allowed; expected one of: none|standardize|zca"),
    (["distill", "-o", "x.npz", "--source", "embedded", "--dataset", "digits", "--support-per-class", "500"],
     "distill.support_per_class=500 needs 5000 training images; the training split has 1297 (without the validation split)"),
    (["evaluate", "missing.npz"], "missing.npz does not exist"),
    # A name MLflow cannot store used to fail after the whole run ("the MLflow store failed").
    (["distill", "-o", "x.npz", "--source", "files", "--data-dir", ".", "--dataset", "x" * 6000],
     "data.name='" + "x" * 40 + "'... is not allowed; expected 1 to 100 letters"),
    (["distill", "-o", "x.npz", "--source", "tfds", "--dataset", "mnist; rm -rf"], "data.name='mnist; rm -rf' is not allowed"),
    (["train", "missing.npz", "--loss", "hinge"], "train.loss='hinge' is not allowed; expected one of: mse|xent|mse_centered|soft_xent"),
])
def test_user_errors_are_one_line_and_exit_2(capsys, tmp_path, monkeypatch, argv, fragment):
    monkeypatch.chdir(tmp_path)
    code, out, err = run_cli(capsys, *argv)
    assert code == 2
    assert fragment in err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert not (tmp_path / "x.npz").exists()


def test_files_directory_with_missing_files_is_a_one_line_error(capsys, tmp_path):
    (tmp_path / "train.npz").write_bytes(b"")
    code, _, err = run_cli(capsys, "data", "--source", "files", "--data-dir", str(tmp_path))
    assert code == 2 and "lacks train-images-idx3-ubyte[.gz]" in err and err.count("\n") == 1


def test_corrupt_artifact_is_reported(capsys, tmp_path):
    broken = tmp_path / "broken.npz"
    broken.write_bytes(b"PK\x03\x04 truncated")
    code, _, err = run_cli(capsys, "evaluate", str(broken))
    assert code == 2 and "truncated" in err and err.count("\n") == 1


def test_help_reads_like_a_tool(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    out = capsys.readouterr().out
    assert exit_info.value.code == 0
    for word in ("distill", "evaluate", "data", "Kernel Inducing Points", "examples:"):
        assert word in out


def test_console_script_reports_errors_without_traceback(tmp_path):
    """The installed entry point, in a fresh process, exactly as a user runs it."""
    result = subprocess.run(
        [sys.executable, "-m", "pipeline.run.cli", "distill", "-o", str(tmp_path / "x.npz"), "--init", "zeros"],
        capture_output=True, text=True,
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == (
        "kip distill: error: distill.init='zeros' is not allowed; expected one of: real|noise"
    )
    assert "Traceback" not in result.stderr


def test_distill_then_evaluate_on_digits(capsys, tmp_path):
    out = tmp_path / "digits.npz"
    history = tmp_path / "history.json"
    argv = ["distill", "--source", "embedded", "--dataset", "digits", "--support-per-class", "2",
            "--steps", "60", "--target-batch", "500", "--learn-labels", "-q", "-o", str(out), "--history", str(history)]
    code, stdout, _ = run_cli(capsys, *argv)
    assert code == 0 and "wrote" in stdout
    first = out.read_bytes()
    distilled = artifacts.load_npz(out)
    assert distilled.images.shape == (20, 8, 8, 1) and distilled.labels.shape == (20, 10)
    assert distilled.metadata["dataset"]["source"] == "embedded"
    assert len(json.loads(history.read_text())) == 60

    code, stdout, _ = run_cli(capsys, *argv)  # same params, same bytes
    assert code == 0 and out.read_bytes() == first

    metrics_path = tmp_path / "metrics.json"
    code, stdout, _ = run_cli(capsys, "evaluate", str(out), "--json", str(metrics_path))
    assert code == 0
    metrics = json.loads(metrics_path.read_text())
    assert metrics == json.loads(stdout)
    assert metrics["support_size"] == 20 and metrics["test_size"] == 360
    assert metrics["krr_test_accuracy"] > metrics["baseline_test_accuracy"]
    assert "scored_under_kernel" not in metrics  # the set's own kernel, which its metadata names

    # Another kernel only when asked, and labelled as such in the JSON and on stderr.
    code, stdout, err = run_cli(capsys, "evaluate", str(out), "--kernel", "rbf", "--gamma", "2")
    other = json.loads(stdout)
    assert code == 0 and "scored under another kernel than the set's own" in err
    assert other["scored_under_kernel"] == {"architecture": "rbf", "gamma": 2.0}
    assert other["distilled_for_kernel"]["architecture"] == "fc" and other["support_size"] == 20
    assert other["krr_test_accuracy"] != metrics["krr_test_accuracy"]

    code, stdout, _ = run_cli(capsys, "train", str(out), "--width", "64", "--steps", "200", "--seeds", "2",
                              "--eval-every", "0")
    trained = json.loads(stdout)
    assert code == 0 and trained["seeds"] == 2 and trained["support_size"] == 20
    assert 0.1 < trained["nn_test_accuracy"] <= 1.0 and trained["nn_train_accuracy"] == 1.0


def test_npz_is_readable_without_our_code(tmp_path, capsys):
    """The released-set convention: np.load(...)['images'] and ['labels']."""
    out = tmp_path / "d.npz"
    run_cli(capsys, "distill", "--source", "embedded", "--dataset", "digits", "--support-per-class", "1",
            "--steps", "2", "-q", "-o", str(out))
    with np.load(out) as data:
        assert data["images"].shape == (10, 8, 8, 1)
        assert data["labels"].shape == (10, 10)
        assert json.loads(str(data["metadata"]))["kernel"]["architecture"] == "fc"


def test_cli_defaults_are_the_library_defaults():
    """One source of truth: `kip distill` with no options builds the default config records."""
    from pipeline.run import cli, config

    args = cli.build_parser().parse_args(["distill", "-o", "x.npz"])
    assert config.DataConfig(**cli._section(args, "data")) == config.DataConfig()
    assert config.PreprocessConfig(**cli._section(args, "preprocess")) == config.PreprocessConfig()
    assert config.KernelConfig(**cli._section(args, "kernel")) == config.KernelConfig()
    assert config.DistillConfig(**cli._section(args, "distill")) == config.DistillConfig()
    args = cli.build_parser().parse_args(["train", "x.npz"])
    assert config.TrainConfig(**cli._section(args, "train")) == config.TrainConfig()


@pytest.mark.parametrize("argv, fragment", [
    (["distill", "-o", "x.npz", "--steps", "ten"], "argument --steps: invalid int value: 'ten'"),
    (["evaluate", "x.npz", "--reg", "inf"], "evaluate.reg=inf is not allowed; expected a finite number >= 0"),
    (["distill", "-o", "x.npz", "--lr", "nan"], "distill.learning_rate=nan is not allowed; expected a positive finite number"),
])
def test_malformed_values_are_one_line_too(capsys, tmp_path, monkeypatch, argv, fragment):
    monkeypatch.chdir(tmp_path)
    try:
        code = main(argv)
    except SystemExit as exit_info:
        code = exit_info.code
    err = capsys.readouterr().err
    assert code == 2 and fragment in err and err.count("\n") == 1


def test_a_text_file_is_not_called_a_corrupted_npz(capsys, tmp_path):
    notes = tmp_path / "notes.md"
    notes.write_text("# not an artifact\n")
    code, _, err = run_cli(capsys, "evaluate", str(notes))
    assert code == 2 and "is not an .npz file (not a zip archive" in err


@pytest.mark.parametrize("argv, expected", [
    (["distill", "-o", "x.npz", "--stepz", "3"],
     "kip distill: error: unrecognized arguments: --stepz 3; did you mean --steps? (see kip distill --help)"),
    (["evaluate", "x.npz", "--gama=2"],
     "kip evaluate: error: unrecognized arguments: --gama=2; did you mean --gamma? (see kip evaluate --help)"),
    (["inspect", "x.npz", "--qqqqq"], "kip inspect: error: unrecognized arguments: --qqqqq (see kip inspect --help)"),
])
def test_an_unknown_option_is_named_by_its_command_with_a_did_you_mean(capsys, argv, expected):
    with pytest.raises(SystemExit) as stopped:
        main(argv)
    assert stopped.value.code == 2
    assert capsys.readouterr().err == expected + "\n"


def test_a_closed_pipe_ends_quietly(tmp_path, capsys):
    """`kip inspect set.npz | head -1`: the reader went away; no BrokenPipeError traceback."""
    out = tmp_path / "d.npz"
    run_cli(capsys, "distill", "--source", "embedded", "--dataset", "digits", "--support-per-class", "1",
            "--steps", "2", "-q", "-o", str(out))
    reader, writer = os.pipe()
    os.close(reader)  # closed before kip writes a byte: its first write fails with EPIPE
    with os.fdopen(writer, "wb") as stdout:
        done = subprocess.run([sys.executable, "-m", "pipeline.run.cli", "inspect", str(out)], stdout=stdout,
                              stderr=subprocess.PIPE, text=True, timeout=120)
    assert done.returncode == 141 and done.stderr == "", done.stderr
