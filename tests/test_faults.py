"""Faults a user will meet: a distill or a `dvc repro` killed mid-run, and malformed params or files.

The kill test runs `kip distill` in a subprocess, SIGKILLs it once a checkpoint exists, runs the same
command again, and compares the result byte for byte with an uninterrupted run. The `dvc repro` tests
(below the file tests) do the same through DVC, killing it also while it writes dvc.lock, with
`kip doctor` as the documented repair.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from projects import SMALL, copy_project, dvc as _dvc, run as _run

from pipeline.artifacts import npz as artifacts, parquet
from pipeline.data.datasets import load_dataset
from pipeline.errors import UserError
from pipeline.run import config as cfg

DISTILL = [
    sys.executable, "-m", "pipeline.run.cli", "distill", "--source", "embedded", "--dataset", "digits",
    "--support-per-class", "2", "--steps", "1500", "--target-batch", "300", "--learn-labels",
    "--checkpoint-every", "50", "-q",
]


def _env() -> dict[str, str]:
    return {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "JAX_PLATFORMS": "cpu"}


def _checkpoint_step(path: Path) -> int:
    try:
        with np.load(path) as data:
            return json.loads(str(data["meta"]))["step"]
    except Exception:  # not written yet, or mid-rename
        return 0


def test_killed_distill_resumes_to_the_same_bytes(tmp_path):
    reference = tmp_path / "reference.npz"
    subprocess.run([*DISTILL, "-o", str(reference)], env=_env(), check=True, capture_output=True, timeout=600)

    checkpoint, out = tmp_path / "run.ckpt.npz", tmp_path / "run.npz"
    command = [*DISTILL, "--checkpoint", str(checkpoint), "-o", str(out)]
    victim = subprocess.Popen(command, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while _checkpoint_step(checkpoint) < 100:
        assert victim.poll() is None, "distill finished before it could be killed; raise --steps"
        assert time.monotonic() < deadline
        time.sleep(0.02)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    killed_at = _checkpoint_step(checkpoint)
    assert not out.exists() and 100 <= killed_at < 1500

    resumed = subprocess.run(command, env=_env(), capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr
    assert f"resuming from {checkpoint} at step" in resumed.stderr
    assert out.read_bytes() == reference.read_bytes()


# --- malformed params: per key, the values a correct reader must refuse, and some it must keep ------
#
# The contract: each record's docstring and validation messages (pipeline/run/config.py), the comments of
# params.yaml, and config._coerce ("YAML's natural spellings and nothing looser"). Sizes, steps and
# counts are positive integers; seeds and `*_every` integers >= 0; standard deviations, rates, scales,
# ridges finite numbers (> 0, or >= 0 where the message says so); fractions lie in [0, 1); switches
# are true|false; names one of a fixed list. bool is never a number, a float never an integer, and
# NaN or an infinity is no key's value. A float key takes 1 for 1.0 and "1e-3" for 0.001 (PyYAML reads
# 1e-3 as a string) and stores a float. A record refuses the same values when built directly (the
# config module's docstring: "a record that exists is a record that is valid, whichever way it was
# built"; artifacts.check_metadata builds them so from a file's JSON).

NAN, INF = float("nan"), float("inf")
HUGE = 10**400  # an integer no float can hold


@dataclasses.dataclass(frozen=True)
class Kind:
    rejected: tuple  # every one a UserError naming the key
    accepted: tuple  # every one stored as given (a float key: as float(value))
    floating: bool = False
    names: str = ""  # what every error for a string value must show: the allowed values


_NOT_A_NUMBER = (None, "", "x", "nan", "inf", "-inf", "1e400", HUGE, True, False, [1], {"a": 1}, NAN, INF, -INF)
POSITIVE = Kind(_NOT_A_NUMBER + (0, 0.0, -0.0, -1, -1e-9, "-1e-3"), (1e-9, 0.5, 1, 2.5, 10**12, "1e-3"), floating=True)
NON_NEGATIVE = Kind(_NOT_A_NUMBER + (-1, -1e-9, "-1e-3"), (0, 0.0, 1e-9, 0.5, 1, 10**12, "1e-6"), floating=True)
FRACTION = Kind(_NOT_A_NUMBER + (-1, -1e-9, 1, 1.0, 1.5, 10**12), (0, 0.0, 0.1, 0.5, 0.999, "0.25"), floating=True)
OPEN_FRACTION = Kind(_NOT_A_NUMBER + (0, 0.0, -1e-9, 1, 1.0, 1.5, 10**12), (1e-9, 0.1, 0.5, 0.999, "0.25"), floating=True)
COUNT = Kind((None, "", "x", "1", True, False, [1], {"a": 1}, NAN, INF, 0, -1, 0.5, 1.0, 1e12), (1, 7, 10**12))
INDEX = Kind((None, "", "x", "0", True, False, [1], {"a": 1}, NAN, INF, -1, 0.5, 0.0, 1.0), (0, 1, 10**12))
SWITCH = Kind((None, "", "true", "false", "yes", 0, 1, 1.0, [True], {"a": 1}, NAN), (True, False), names="true|false")


def choice(allowed: tuple[str, ...]) -> Kind:
    first = allowed[0]
    return Kind(("", "x", first.upper(), f"{first} ", None, 1, True, [first], {"a": 1}, NAN), allowed, names="|".join(allowed))


def text(rejected: tuple, accepted: tuple) -> Kind:
    return Kind(rejected + (1, 0.5, True, False, [1], {"a": 1}, NAN), accepted)


KEYS = {
    "data": {
        "source": choice(cfg.SOURCES), "name": choice(cfg.REGISTRY_NAMES),  # the default source, registry; others below
        "data_dir": text((), (None, "d", "/tmp/a b")), "validation_fraction": FRACTION, "seed": INDEX,
        # the image sources' keys (accepted values need source: imagefolder beside them, see NEEDS)
        "channels": Kind(("", "x", "1", 0, 2, 4, True, False, 1.0, [1], {"a": 1}, NAN), (1, 3)),
        "image_size": Kind(("", "x", "16", 0, 7, 129, 16.0, True, False, [16], {"a": 1}, NAN, INF), (8, 32, 128)),
        "test_fraction": OPEN_FRACTION, "on_unreadable": choice(cfg.ON_UNREADABLE),
        "image_column": text(("",), ("image", "img")), "label_column": text(("",), ("label", "kind")),
    },
    "preprocess": {"method": choice(cfg.PREPROCESS_METHODS), "zca_reg": NON_NEGATIVE},
    "kernel": {
        "architecture": choice(cfg.ARCHITECTURES), "kind": choice(cfg.KERNEL_KINDS), "depth": COUNT,
        "w_std": POSITIVE, "b_std": NON_NEGATIVE, "parameterization": choice(cfg.PARAMETERIZATIONS),
        "activation": choice(cfg.ACTIVATIONS), "conv_readout": choice(cfg.CONV_READOUTS), "gamma": POSITIVE,
        "rf_networks": COUNT, "rf_width": COUNT, "rf_eval_networks": COUNT,
    },
    "distill": {
        "method": choice(cfg.METHODS), "support_per_class": COUNT, "steps": COUNT, "learning_rate": POSITIVE,
        "lr_schedule": choice(cfg.LR_SCHEDULES), "target_batch": COUNT, "kernel_block": COUNT, "learn_labels": SWITCH,
        "init": choice(cfg.INITS), "corruption": FRACTION, "reg": NON_NEGATIVE, "float64": SWITCH,
        "eval_every": INDEX, "checkpoint_every": INDEX, "seed": INDEX, "loss": choice(cfg.KIP_LOSSES),
        "keep": choice(cfg.KEEP_STEPS), "augment": choice(cfg.AUGMENTATIONS), "augment_on": choice(cfg.AUGMENT_ON),
        "augment_pad": INDEX,
    },
    "evaluate": {"reg": NON_NEGATIVE, "baseline_repeats": COUNT, "batch_size": COUNT, "seed": INDEX},
    "train": {
        "architecture": choice(cfg.NETWORKS), "width": COUNT, "depth": COUNT, "conv_width": COUNT, "conv_depth": COUNT,
        "pooling": choice(cfg.POOLINGS), "parameterization": choice(cfg.PARAMETERIZATIONS), "w_std": POSITIVE,
        "b_std": NON_NEGATIVE, "loss": choice(cfg.LOSSES), "temperature": POSITIVE, "label_scale": POSITIVE,
        "label_scale_choice": choice(cfg.LABEL_SCALE_CHOICES), "optimizer_choice": choice(cfg.OPTIMIZER_CHOICES),
        "labels": choice(cfg.LABEL_SOURCES), "labels_choice": choice(cfg.LABEL_SOURCE_CHOICES),
        "solve_targets": COUNT, "solve_reg": POSITIVE, "optimizer": choice(cfg.OPTIMIZERS), "learning_rate": POSITIVE,
        "momentum": FRACTION,  # heavy-ball SGD: a momentum >= 1 never forgets a gradient
        "l2": NON_NEGATIVE, "batch_size": COUNT, "steps": COUNT, "seeds": COUNT, "eval_every": INDEX, "seed": INDEX,
    },
    "tracking": {
        "enabled": SWITCH,
        "uri": text(("", "  "), (None, "sqlite:///mlflow.db", "http://127.0.0.1:5000", "file:///tmp/ml runs")),
        "experiment": text((None, "", "  "), ("kip-pipeline", "x")),
    },
}
NEEDS = {  # accepted values that are valid only beside other keys: those keys
    ("data", "source", "embedded"): {"name": "digits"},
    ("data", "source", "files"): {"data_dir": "d"},
    **{("data", "source", source): {"data_dir": "d", "channels": 3, "image_size": 32} for source in cfg.IMAGE_SOURCES},
    **{("data", "channels", value): {"source": "imagefolder", "data_dir": "d", "image_size": 32} for value in cfg.CHANNELS},
    **{("data", "image_size", value): {"source": "parquet", "data_dir": "d", "channels": 1} for value in (8, 32, 128)},
    ("kernel", "architecture", "conv_rf"): {"kind": "nngp"},
}
RECORDS = {
    "data": cfg.DataConfig, "preprocess": cfg.PreprocessConfig, "kernel": cfg.KernelConfig,
    "distill": cfg.DistillConfig, "evaluate": cfg.EvaluateConfig, "train": cfg.TrainConfig,
    "tracking": cfg.TrackingConfig,
}
VALUES = [None, "", "x", "1e-3", -1, 0, 0.5, 1, 10**12, -1e-9, True, False, [1], {"a": 1}, float("nan"), float("inf")]


def _refusal(build, shown: str) -> str:
    """The one-line UserError `build()` must raise; anything else fails the test with its traceback."""
    try:
        build()
    except UserError as err:
        message = str(err)
        assert "\n" not in message, message
        return message
    pytest.fail(f"{shown} was accepted; expected a UserError")


def _refused(section: str, values: dict, names: list[str]) -> None:
    """Refused by from_mapping and by the record itself, in one line naming every one of `names`."""
    shown = ", ".join(f"{section}.{k}={v!r}" for k, v in values.items())[:200]
    for how, build in (("params", lambda: cfg.from_mapping(RECORDS[section], values, section)),
                       ("record", lambda: RECORDS[section](**values))):
        if how == "record" and any(v is HUGE for v in values.values()):
            continue  # errors.check_positive compares ints exactly (10**400 < inf): from_mapping is the user's path
        message = _refusal(build, f"{shown} ({how})")
        assert "expected" in message and all(name in message for name in names), f"{shown} ({how}): {message}"


@pytest.mark.parametrize("section", sorted(RECORDS))
def test_every_key_refuses_its_bad_values_in_one_clear_line_and_keeps_good_ones(section):
    record, keys = RECORDS[section], KEYS[section]
    assert sorted(keys) == sorted(f.name for f in dataclasses.fields(record)), "a key without its row in KEYS"
    for key, kind in keys.items():
        for value in kind.rejected:
            _refused(section, {key: value}, [f"{section}.{key}"] + ([kind.names] if kind.names and isinstance(value, str) else []))
        for value in kind.accepted:
            values = {**NEEDS.get((section, key, value), {}), key: value}
            stored = float(value) if kind.floating else value
            for built in (cfg.from_mapping(record, values, section), record(**{**values, key: stored})):
                assert getattr(built, key) == stored and type(getattr(built, key)) is type(stored), (key, value)
        for value in VALUES:  # any other value: accepted, or one line naming the section
            try:
                cfg.from_mapping(record, {key: value}, section)
            except UserError as err:
                assert "\n" not in str(err) and f"{section}." in str(err), str(err)


CROSS_KEY = [  # (section, values, None where valid, else the text the one-line error must show)
    ("data", {"source": "embedded", "name": "digits"}, None),
    ("data", {"source": "embedded"}, ["data.name", "digits"]),  # name's default, mnist, is a registry name
    ("data", {"source": "registry", "name": "digits"}, ["data.name", "mnist|fashion_mnist"]),
    ("data", {"source": "tfds", "name": "cifar10"}, None),
    ("data", {"source": "tfds", "name": "svhn_cropped:3.0.0", "data_dir": "d"}, None),
    ("data", {"source": "files", "name": "my-set_1.0/a+b", "data_dir": "d"}, None),
    ("data", {"source": "files", "name": "toy"}, ["data.data_dir"]),
    ("data", {"source": "files", "name": "toy", "data_dir": ""}, ["data.data_dir"]),
    *(("data", {"source": source, "name": name, "data_dir": "d"}, ["data.name"])
      for source in ("tfds", "files") for name in ("", " ", "-x", "a b", "a\nb", "x" * 101, 1, None, ["mnist"])),
    ("kernel", {"architecture": "conv_rf", "kind": "nngp"}, None),
    ("kernel", {"architecture": "conv_rf"}, ["kernel.kind", "nngp"]),  # kind's default is ntk
    ("kernel", {"architecture": "conv_rf", "kind": "nngp", "activation": "erf"}, ["kernel.activation", "relu"]),
    ("kernel", {"architecture": "conv_rf", "kind": "nngp", "parameterization": "standard"}, ["kernel.parameterization", "ntk"]),
    ("distill", {"method": "label_solve", "learn_labels": True}, ["distill.learn_labels", "false"]),
    ("distill", {"method": "label_solve", "loss": "cross_entropy"}, ["distill.loss", "mse"]),
    ("train", {"labels": "solved", "loss": "mse"}, ["train.labels", "train.loss", "mse_centered"]),
    ("train", {"labels_choice": "validation", "loss": "xent"}, ["train.labels", "train.loss", "mse_centered"]),
    ("train", {"labels": "solved", "architecture": "conv"}, ["train.labels", "train.architecture", "fc"]),
    ("train", {"labels_choice": "validation", "architecture": "conv"}, ["train.labels_choice", "train.architecture"]),
    ("train", {"labels_choice": "validation", "loss": "mse_centered", "architecture": "fc"}, None),
]


@pytest.mark.parametrize("section, values, names", CROSS_KEY, ids=lambda v: v if isinstance(v, str) else None)
def test_keys_that_depend_on_each_other_are_checked_together(section, values, names):
    if names is not None:
        _refused(section, values, names)
        return
    for built in (cfg.from_mapping(RECORDS[section], values, section), RECORDS[section](**values)):
        assert {key: getattr(built, key) for key in values} == values


# --- malformed files ------------------------------------------------------------------------------

def _garbage(rng: np.random.Generator, valid: bytes) -> list[bytes]:
    """Empty, random and truncated variants of a valid file, one with 8 random bytes inverted, and
    one per bit flipped (the lowest bit of a byte: bit rot) at each of the first and last 32 bytes
    (magic numbers, headers, footers) and at 64 places spread evenly over the rest (data, checksums,
    metadata)."""
    inverted = bytearray(valid)
    for i in rng.choice(len(valid), size=8, replace=False):
        inverted[i] ^= 0xFF
    variants = [b"", rng.bytes(64), rng.bytes(4096), valid[: len(valid) // 2], valid[:-7], bytes(inverted)]
    places = np.unique(np.r_[0:32, len(valid) - 32 : len(valid), np.linspace(0, len(valid) - 1, 64).astype(int)])
    for i in places[(places >= 0) & (places < len(valid))]:
        flipped = bytearray(valid)
        flipped[i] ^= 0x01
        variants.append(bytes(flipped))
    return variants


@pytest.fixture(params=["standardize", "zca"])
def distilled(rng, request):
    from test_artifacts import lineage

    from pipeline.data import preprocess

    transform = preprocess.fit(cfg.PreprocessConfig(request.param), rng.random((20, 4, 4, 1)).astype(np.float32))
    return artifacts.DistilledSet(rng.standard_normal((10, 4, 4, 1)).astype(np.float32),
                                  rng.standard_normal((10, 10)).astype(np.float32),
                                  np.arange(10, dtype=np.int32), transform, {**lineage(request.param), "seed": 0})


def _changed_parts(loaded: artifacts.DistilledSet, written: artifacts.DistilledSet, metadata: dict) -> list[str]:
    """The parts of `loaded` that are not exactly what was written: dtype, shape and every bit."""
    def parts(distilled):
        return {"images": distilled.images, "labels": distilled.labels, "classes": distilled.classes,
                **{f"transform {k}": np.asarray(v) for k, v in distilled.transform.to_arrays().items()}}

    ours, theirs = parts(loaded), parts(written)
    changed = [name for name in theirs if (ours[name].dtype, ours[name].shape, ours[name].tobytes())
               != (theirs[name].dtype, theirs[name].shape, theirs[name].tobytes())]
    return changed + (["metadata"] if loaded.metadata != metadata else [])


def test_damaged_artifacts_are_reported_not_crashed_on(distilled, tmp_path, rng):
    """A damaged distilled set is a one-line error naming the file, or (a flip in zip padding or Parquet
    statistics, say) loads as exactly the set that was written: never as a set with other values."""
    npz, pq = tmp_path / "d.npz", tmp_path / "d.parquet"
    artifacts.save_npz(npz, distilled)
    parquet.save_parquet(pq, distilled, [str(i) for i in range(10)])
    metadata = {npz: {"format_version": artifacts.FORMAT_VERSION, **distilled.metadata}, pq: distilled.metadata}
    for path, read in ((npz, artifacts.load_npz), (pq, parquet.read_parquet)):
        valid = path.read_bytes()
        assert _changed_parts(read(path), distilled, metadata[path]) == []  # the undamaged file reads back as written
        for number, damaged in enumerate(_garbage(rng, valid)):
            path.write_bytes(damaged)
            try:
                loaded = read(path)
            except UserError as err:
                assert "\n" not in str(err) and str(path) in str(err), str(err)
            else:
                changed = _changed_parts(loaded, distilled, metadata[path])
                assert changed == [], f"{path.name} damaged (variant {number}) loaded with other {', '.join(changed)}"
        path.write_bytes(valid)


_IDX_TYPES = {0x08: "u1", 0x09: "i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def _idx_says(blob: bytes) -> np.ndarray | None:
    """What raw IDX bytes hold by the format's description (LeCun et al.): magic 0 0 type ndim,
    big-endian uint32 dimensions, then the data; None unless the size is exactly that."""
    if len(blob) < 4 or blob[:2] != b"\0\0" or blob[2] not in _IDX_TYPES or len(blob) < 4 + 4 * blob[3]:
        return None
    shape = tuple(int.from_bytes(blob[4 + 4 * i : 8 + 4 * i], "big") for i in range(blob[3]))
    dtype = np.dtype(_IDX_TYPES[blob[2]])
    data = blob[4 + 4 * len(shape):]
    return np.frombuffer(data, dtype).reshape(shape) if len(data) == math.prod(shape) * dtype.itemsize else None


@pytest.mark.parametrize("compress", [True, False], ids=["gzip", "raw"])
def test_damaged_idx_files_are_reported_not_crashed_on(tmp_path, rng, compress):
    """gzip records the data's CRC-32 and length, so a damaged .gz file is a one-line error naming it,
    or (a flip in its header's timestamp, say) loads exactly as written. A raw IDX file has no
    checksum: a changed data byte cannot be seen, so such a file must load as exactly what its bytes
    say (nothing invented, dropped or rescaled); anything else is an error naming it. Pixels are
    uint8 (0..255, loaded as k/255) or float (sources/files.py), labels integers."""
    from test_data import write_idx_dir

    arrays = write_idx_dir(tmp_path, compress=compress, rng=rng)
    config = cfg.DataConfig(source="files", name="x", data_dir=str(tmp_path))
    for stem, original in arrays.items():
        path = tmp_path / (f"{stem}.gz" if compress else stem)
        valid = path.read_bytes()
        for number, damaged in enumerate(_garbage(rng, valid)):
            path.write_bytes(damaged)
            try:
                dataset = load_dataset(config, tmp_path)
            except UserError as err:
                assert "\n" not in str(err) and str(path) in str(err), str(err)
                continue
            says = original if compress else _idx_says(damaged)
            shown = f"{path.name} damaged (variant {number})"
            assert says is not None, f"{shown} is no IDX file, yet it loaded"
            expected = {**arrays, stem: says}
            for key, x in (("train-images-idx3-ubyte", dataset.x_train), ("t10k-images-idx3-ubyte", dataset.x_test)):
                assert expected[key].dtype == np.uint8, f"{shown}: {key} holds {expected[key].dtype} pixels, yet it loaded"
                assert x.shape == (*expected[key].shape, 1) and np.abs(x[..., 0] * 255.0 - expected[key]).max() < 1e-3, shown
            for key, y in (("train-labels-idx1-ubyte", dataset.y_train), ("t10k-labels-idx1-ubyte", dataset.y_test)):
                assert y.shape == expected[key].shape and (y == expected[key]).all(), shown
            assert dataset.num_classes == 1 + int(max(expected["train-labels-idx1-ubyte"].max(), expected["t10k-labels-idx1-ubyte"].max()))
        path.write_bytes(valid)


# --- `dvc repro` killed at the worst moments, then `kip doctor`: the bytes of an uninterrupted run ---
#
# DVC 3.67.1 rewrites dvc.lock and .dvc/tmp/rwlock in place (open "w+" truncates, then it writes), so a
# kill in between leaves a file every later DVC command rejects. `kip doctor` (pipeline/artifacts/lockfile.py)
# repairs that; these tests kill `dvc repro` at chosen moments in a scratch copy of the project (the
# small embedded-digits setup of tests/projects.py), run `kip doctor` and `dvc repro`, and compare every
# output and dvc.lock with an uninterrupted run. The writes are killed deterministically by running the
# DVC CLI under _KILLER, which SIGKILLs its own process once the Nth write has truncated the file and
# written a chosen fraction of the new text. Nothing is patched outside these test children.

needs_git = pytest.mark.skipif(shutil.which("git") is None, reason="needs git")
CHECKPOINT = "checkpoints/distill.ckpt.npz"
RESUMED = f"resuming from {CHECKPOINT} at step"

_KILLER = r'''\
"""The DVC CLI, SIGKILLing itself in the middle of its Nth write of dvc.lock or of .dvc/tmp/rwlock."""
import json, os, signal, sys, types

target, nth, fraction = os.environ["KIP_KILL_AT"].split(":")  # e.g. dvc.lock:2:0.5
nth, fraction = int(nth), float(fraction)
writes = 0


def _maybe_die(stream, text):
    global writes
    writes += 1
    if writes == nth:  # the file is open and truncated: write part of the new text, then die
        part = text[: int(len(text) * fraction)]
        stream.write(part[:-1] if 0 < fraction < 1 and part.endswith("\n") else part)  # a cut mid-line
        stream.flush()
        os.kill(os.getpid(), signal.SIGKILL)


if target == "dvc.lock":
    from dvc.utils.serialize import _yaml

    real_dump = _yaml._dump  # what modify_yaml() calls on the open, truncated stream

    def _dump(data, stream):
        if os.path.basename(getattr(stream, "name", "")) == "dvc.lock":
            _maybe_die(stream, _yaml.dumps_yaml(data))
        return real_dump(data, stream)

    _yaml._dump = _dump
elif target == "rwlock":
    import dvc.rwlock

    def _json_dump(obj, stream, **kwargs):
        _maybe_die(stream, json.dumps(obj, **kwargs))
        return json.dump(obj, stream, **kwargs)

    dvc.rwlock.json = types.SimpleNamespace(**{**vars(json), "dump": _json_dump})
else:
    raise SystemExit(f"unknown target {target}")

from dvc.cli import main

sys.exit(main(sys.argv[1:]))
'''


def _outputs(root: Path) -> dict[str, object]:
    """Every file the pipeline writes that DVC tracks (outs, metrics, plots), and dvc.lock parsed."""
    import yaml

    files = {
        str(path.relative_to(root)): path.read_bytes()
        for folder in ("artifacts", "metrics", "plots") for path in sorted((root / folder).rglob("*"))
        if path.is_file() and path.name != ".gitignore"
    }
    files["dvc.lock (parsed)"] = yaml.safe_load((root / "dvc.lock").read_text())
    return files


@pytest.fixture(scope="module")
def reference(small_project, tmp_path_factory):
    """The session's finished small project (one uninterrupted `dvc repro`, committed), copied beside
    the killer script; and its outputs. Every fault test copies it, so all runs here hash the same code
    even while pipeline/ is being edited."""
    base = tmp_path_factory.mktemp("faults")
    (base / "killer.py").write_text(_KILLER)
    root = copy_project(small_project, base / "reference").root
    return root, _outputs(root)


@pytest.fixture(scope="module")
def dvc_template(reference):
    """The same project as it was before its first `dvc repro`: its first commit, nothing else."""
    root = _copy(reference[0], "template")
    env = _run_env(reference)
    _run(root, env, "git", "reset", "-q", "--hard", "HEAD~1")
    _run(root, env, "git", "clean", "-q", "-f", "-d", "-x")  # outputs, checkpoints, DVC's cache, mlflow.db
    assert not (root / "dvc.lock").exists() and not (root / "checkpoints").exists()
    return root, env


def _run_env(reference) -> dict[str, str]:
    from projects import env_for

    home = reference[0].parent / "home"
    home.mkdir(exist_ok=True)
    return env_for(home)


def _copy(source: Path, name: str) -> Path:
    target = source.parent / name
    shutil.copytree(source, target, symlinks=True)
    return target


def _repro_killed_at(root: Path, env: dict[str, str], kill_at: str, *args: str) -> str:
    """`dvc repro ARGS` killed at KILL_AT (see _KILLER); what it printed."""
    killer = str(root.parent / "killer.py")
    result = subprocess.run([sys.executable, killer, "repro", *args], cwd=root, env={**env, "KIP_KILL_AT": kill_at},
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == -signal.SIGKILL, f"not killed at {kill_at}:\n{result.stdout}\n{result.stderr}"
    return result.stdout + result.stderr


def _dvc_fails(root: Path, env: dict[str, str], *args: str) -> str:
    result = subprocess.run([sys.executable, "-m", "dvc", *args], cwd=root, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode != 0, f"dvc {' '.join(args)} unexpectedly worked:\n{result.stdout}\n{result.stderr}"
    return result.stdout + result.stderr


def _repro_matches(root: Path, env: dict[str, str], reference) -> str:
    """`dvc repro` after a repair: every output and dvc.lock as in the uninterrupted reference run, and
    a clean git tree. Returns what DVC printed."""
    printed = _dvc(root, env, "repro")
    assert _outputs(root) == reference[1]
    assert _run(root, env, "git", "status", "--porcelain").strip() == ""
    return printed


def _doctor(root: Path, env: dict[str, str]) -> str:
    """`kip doctor` as a user runs it (the project's own copy of the package): one line."""
    result = subprocess.run([sys.executable, "-m", "pipeline.run.cli", "doctor"], cwd=root, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == 1 and lines[0].startswith("kip doctor: "), result.stdout + result.stderr
    return lines[0]


@needs_git
def test_repro_killed_while_writing_dvc_lock_resumes_after_kip_doctor(dvc_template, reference):
    """The reported defect: killed just after "Updating lock file", on a project with no committed lock."""
    template, env = dvc_template
    root = _copy(template, "empty-lock")
    printed = _repro_killed_at(root, env, "dvc.lock:2:0")  # the write after distill: open, truncated, empty
    assert printed.count("Updating lock file 'dvc.lock'") == 2 and "Running stage 'evaluate'" not in printed
    assert (root / "dvc.lock").read_bytes() == b""
    assert "validation failed" in _dvc_fails(root, env, "repro")  # what users met: stuck until repaired

    line = _doctor(root, env)
    assert "dvc.lock was empty" in line and "removed it" in line, line
    assert not (root / "dvc.lock").exists()
    resumed = _dvc(root, env, "repro")
    assert RESUMED in resumed  # distill had finished: it resumes from its last checkpoint, no recomputation
    assert _outputs(root) == reference[1]
    assert _doctor(root, env).startswith("kip doctor: nothing to repair")


@needs_git
def test_repro_killed_partway_through_dvc_lock_is_restored_from_git(dvc_template, reference):
    """Half a dvc.lock: the committed one comes back, and DVC sees that the outputs match it."""
    _, env = dvc_template
    root = _copy(reference[0], "partial-lock")
    _repro_killed_at(root, env, "dvc.lock:2:0.5", "--force")
    damaged = (root / "dvc.lock").read_bytes()
    assert damaged and not damaged.endswith(b"\n")  # DVC may read such a prefix, or may not: it depends where the cut falls

    line = _doctor(root, env)
    assert "dvc.lock was cut off mid-write" in line and "replaced it by the version staged in git" in line, line
    assert (root / "dvc.lock").read_bytes() == (reference[0] / "dvc.lock").read_bytes()
    _repro_matches(root, env, reference)


@needs_git
def test_repro_killed_while_writing_its_rwlock_runs_again_after_kip_doctor(dvc_template, reference):
    _, env = dvc_template
    root = _copy(reference[0], "empty-rwlock")
    # DVC 3.67.1 writes the rwlock 10 times per stage: the 11th is distill taking its locks, after prepare ran
    printed = _repro_killed_at(root, env, "rwlock:11:0", "--force")
    assert "Running stage 'prepare'" in printed and "Running stage 'distill'" not in printed
    assert (root / ".dvc" / "tmp" / "rwlock").read_bytes() == b""
    assert "RWLock" in _dvc_fails(root, env, "repro")

    line = _doctor(root, env)
    assert "removed the empty .dvc/tmp/rwlock" in line, line
    _repro_matches(root, env, reference)


@needs_git
def test_repro_killed_with_its_process_group_during_distill_resumes_from_the_checkpoint(dvc_template, reference):
    """Ctrl-C's harsher cousin: SIGKILL to `dvc repro` and its stage at once, mid-distill."""
    _, env = dvc_template
    root = _copy(reference[0], "killed-group")
    shutil.rmtree(root / "checkpoints")  # a genuine distill from step 0, to be killed part way
    victim = subprocess.Popen([sys.executable, "-m", "dvc", "repro", "--force"], cwd=root, env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while _checkpoint_step(root / CHECKPOINT) < 40:
            assert victim.poll() is None, "dvc repro finished before it could be killed; raise distill.steps"
            assert time.monotonic() < deadline
            time.sleep(0.02)
    finally:
        os.killpg(victim.pid, signal.SIGKILL)
        victim.wait()
    killed_at = _checkpoint_step(root / CHECKPOINT)
    assert 40 <= killed_at < SMALL["distill"]["steps"]
    assert not (root / "artifacts" / "distilled.npz").exists()  # DVC removed the outputs before distill ran

    line = _doctor(root, env)  # DVC would drop the dead process's rwlock entries itself; doctor says so too
    assert "cleared .dvc/tmp/rwlock of killed DVC processes" in line or "nothing to repair" in line, line
    assert f"{RESUMED} {killed_at}" in _repro_matches(root, env, reference)


@needs_git
def test_kip_doctor_refuses_while_dvc_runs_and_clears_what_killed_runs_left(tmp_path):
    import psutil
    from dvc.repo import Repo

    from pipeline.artifacts.lockfile import repair

    with pytest.raises(UserError, match="not inside a DVC project"):
        repair(tmp_path)
    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
    Repo.init(str(tmp_path)).close()
    assert repair(tmp_path).startswith("nothing to repair")
    rwlock = tmp_path / ".dvc" / "tmp" / "rwlock"
    rwlock.write_text(json.dumps({"write": {str(tmp_path / "out"): {"pid": os.getpid(), "cmd": "dvc repro"}}}))
    (tmp_path / "dvc.lock").write_text("")
    with pytest.raises(UserError, match=rf"DVC is still running in .*pid {os.getpid()} \(dvc repro\)"):
        repair(tmp_path)  # a live DVC (between stages it does not hold the repo lock): touch nothing
    assert rwlock.exists() and (tmp_path / "dvc.lock").exists()

    before = psutil.Process().create_time() - 60  # the listed PID now names a process younger than the file:
    os.utime(rwlock, (before, before))            # reused by the system after its DVC was killed
    subprocess.run(["git", "add", "dvc.lock"], cwd=tmp_path, check=True)  # git's version is no better
    line = repair(tmp_path / ".dvc")
    assert "cleared .dvc/tmp/rwlock of killed DVC processes" in line and "dvc.lock was empty" in line, line
    assert "removed it (git has no valid version of it)" in line and line.endswith("run `dvc repro` to resume")
    assert not rwlock.exists() and not (tmp_path / "dvc.lock").exists()

    (tmp_path / ".git" / "index.lock").write_bytes(b"")  # git's lock, which only the user may remove
    line = repair(tmp_path)
    assert ".git/index.lock exists: a git command is running or was killed" in line and "delete it" in line, line
    assert (tmp_path / ".git" / "index.lock").exists()


@needs_git
def test_kip_doctor_names_a_hand_edited_dvc_lock_and_keeps_what_it_replaces(tmp_path):
    """Valid YAML with zeroed md5s was written whole: an edit, not a killed write. The line says so and
    which field DVC rejects, and the edited file survives beside the restored one."""
    from dvc.repo import Repo

    from pipeline.artifacts.lockfile import repair

    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
    Repo.init(str(tmp_path)).close()
    good = ("schema: '2.0'\nstages:\n  distill:\n    cmd: python stages/distill.py\n    outs:\n"
            "    - path: artifacts/distilled.npz\n      hash: md5\n      md5: c6de2cdf8063b6bf186cb80db4a3d5e5\n      size: 10\n")
    (tmp_path / "dvc.lock").write_text(good)
    subprocess.run(["git", "add", "dvc.lock"], cwd=tmp_path, check=True)
    assert repair(tmp_path).startswith("nothing to repair")
    edited = good.replace("md5: c6de2cdf8063b6bf186cb80db4a3d5e5", "md5: 0")
    (tmp_path / "dvc.lock").write_text(edited)
    line = repair(tmp_path)
    assert "dvc.lock was valid YAML: DVC's schema rejects it (" in line and "md5" in line, line
    assert "edited by hand or by another tool, not a killed DVC" in line and "replaced it by the version staged in git" in line
    (backup,) = (tmp_path / ".dvc" / "tmp").glob("dvc.lock.replaced-*")
    assert f"what it held is in .dvc/tmp/{backup.name}" in line
    assert backup.read_text() == edited and (tmp_path / "dvc.lock").read_text() == good


@needs_git
def test_a_failed_stage_gets_back_what_dvc_deleted_as_dvc_lock_records_it(tmp_path):
    """DVC removes a stage's outputs before running it; when the stage fails, each is put back from
    DVC's cache or git, only with the md5 dvc.lock records, and one that neither holds is named."""
    import hashlib

    from dvc.repo import Repo

    from pipeline.artifacts.lockfile import restore_outputs

    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
    Repo.init(str(tmp_path)).close()
    committed, cached, stale, lost = b'{"acc": 0.9}\n', b"npz bytes", b'{"acc": 0.5}\n', b"never stored"
    md5 = {name: hashlib.md5(content).hexdigest() for name, content in
           (("committed", committed), ("cached", cached), ("stale", b'{"acc": 0.7}\n'), ("lost", lost))}
    (tmp_path / "metrics").mkdir()
    (tmp_path / "metrics" / "evaluate.json").write_bytes(committed)
    (tmp_path / "metrics" / "old.json").write_bytes(stale)  # git holds another version than the lock's
    subprocess.run(["git", "add", "metrics"], cwd=tmp_path, check=True)
    blob = tmp_path / ".dvc" / "cache" / "files" / "md5" / md5["cached"][:2] / md5["cached"][2:]
    blob.parent.mkdir(parents=True)
    blob.write_bytes(cached)
    outs = [{"path": "metrics/evaluate.json", "md5": md5["committed"]}, {"path": "artifacts/d.npz", "md5": md5["cached"]},
            {"path": "metrics/old.json", "md5": md5["stale"]}, {"path": "plots/p.csv", "md5": md5["lost"]}]
    (tmp_path / "dvc.lock").write_text(json.dumps({"schema": "2.0", "stages": {"evaluate": {"cmd": "x", "outs": outs}}}))
    assert restore_outputs(tmp_path, "train") is None  # a stage the lock does not hold: nothing to do
    for path in ("metrics/evaluate.json", "metrics/old.json"):
        (tmp_path / path).unlink()
    said = restore_outputs(tmp_path, "evaluate")
    assert said.startswith("put back artifacts/d.npz, metrics/evaluate.json (deleted by DVC before the stage ran)"), said
    assert "metrics/old.json, plots/p.csv deleted by DVC and held neither by DVC's cache nor by git" in said
    assert (tmp_path / "metrics" / "evaluate.json").read_bytes() == committed
    assert (tmp_path / "artifacts" / "d.npz").read_bytes() == cached
    assert not (tmp_path / "metrics" / "old.json").exists()  # a version the lock does not record stays out
