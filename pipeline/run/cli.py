"""`kip`: distil a dataset with Kernel Inducing Points and score the result.

User errors (bad parameters, missing files, unreachable registries) print one line and exit 2;
anything else is a bug and keeps its traceback.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
from pathlib import Path
from typing import NoReturn, Sequence

from pipeline.data.datasets import default_cache_dir
from pipeline.errors import UserError
from pipeline.run import config as cfg, runtime

DESCRIPTION = """\
Distil a small synthetic training set with Kernel Inducing Points (KIP; Nguyen, Chen & Lee,
ICLR 2021): the support images are learned so that kernel ridge regression on them predicts the
real training set well.

examples:
  kip distill -o out/mnist-100.npz                      # 100 images of MNIST, FC NTK kernel
  kip distill --source embedded --dataset digits --steps 200 -o out/digits.npz
  kip evaluate out/mnist-100.npz                        # KRR test accuracy vs random real images
  kip train out/mnist-100.npz --seeds 3                 # width-1024 networks trained on it vs on real images
  kip inspect artifacts/distilled.parquet               # validate an artifact, print its lineage
  kip data --source registry --dataset fashion_mnist    # fetch and describe a dataset
"""


class _OneLineErrors(argparse.ArgumentParser):
    """argparse prints the whole usage block before a bad-value message; we print one line."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")

    def parse_args(self, args=None, namespace=None):  # type: ignore[override]
        """Unknown options are reported by the command they were given to, with a did-you-mean:
        argparse would report them from the top level (`see kip --help`)."""
        import difflib

        parsed, extras = self.parse_known_args(args, namespace)
        if extras:
            command = getattr(self, "commands", {}).get(getattr(parsed, "command", None), self)
            known = [flag for action in command._actions for flag in action.option_strings]
            hints = []
            for extra in extras:
                close = difflib.get_close_matches(extra.split("=", 1)[0], known, n=1) if extra.startswith("-") else []
                if close:
                    hints.append(f"did you mean {close[0]}?")
            command.error(f"unrecognized arguments: {' '.join(extras)}" + (f"; {' '.join(hints)}" if hints else ""))
        return parsed


_TRAIN_HELP = {
    "architecture": "|".join(cfg.NETWORKS), "width": "fc hidden units", "depth": "fc hidden layers",
    "conv_width": "conv channels", "conv_depth": "conv blocks (3x3 conv, ReLU, 2x2 pooling)",
    "pooling": "|".join(cfg.POOLINGS), "parameterization": "|".join(cfg.PARAMETERIZATIONS),
    "w_std": "weight std at init", "b_std": "bias std at init", "loss": "|".join(cfg.LOSSES),
    "temperature": "soft_xent: targets softmax(labels / temperature)",
    "label_scale": "mse, mse_centered: fit label_scale x labels (> 1: further from the kernel regime)",
    "label_scale_choice": "validation: the best of 0.1|1|10 on the validation split, per support; fixed: --label-scale",
    "optimizer_choice": "validation: also try Adam 1e-3 for 1000 steps, keep the better on the validation split; fixed",
    "labels": "support: the set's own labels | solved: labels solved for each network's own NTK (fc, mse_centered)",
    "labels_choice": "validation: try both label sources, keep the better on the validation split; fixed: --labels",
    "solve_targets": "solved labels: class-balanced training images they are solved on",
    "solve_reg": "solved labels: ridge, relative to the kernel's mean diagonal",
    "optimizer": "|".join(cfg.OPTIMIZERS), "learning_rate": "optimizer step size", "momentum": "sgd only",
    "l2": "weight decay", "batch_size": "images per step", "steps": "optimizer steps per network",
    "seeds": "networks per side (distilled / random real)", "eval_every": "validation accuracy every N steps",
    "seed": "network inits and baseline subsets",
}


def build_parser() -> argparse.ArgumentParser:
    parser = _OneLineErrors(
        prog="kip", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True, parser_class=_OneLineErrors)
    parser.commands = commands.choices  # name (and alias) -> its parser, for _OneLineErrors.parse_args

    distill = commands.add_parser(
        "distill", help="learn a support set and write it as .npz",
        description="Learn a support set with KIP and write it (images, labels, preprocessing, lineage) as .npz.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    _add_data_args(distill)
    prep = distill.add_argument_group("preprocessing")
    prep.add_argument("--preprocess", dest="preprocess.method", default="standardize", help="|".join(cfg.PREPROCESS_METHODS))
    prep.add_argument("--zca-reg", dest="preprocess.zca_reg", type=float, default=0.1, help="ZCA ridge, relative to the mean eigenvalue")
    kernel = distill.add_argument_group("kernel")
    kernel.add_argument("--kernel", dest="kernel.architecture", default="fc", help="|".join(cfg.ARCHITECTURES))
    kernel.add_argument("--kernel-kind", dest="kernel.kind", default="ntk", help="|".join(cfg.KERNEL_KINDS))
    kernel.add_argument("--depth", dest="kernel.depth", type=int, default=1, help="hidden layers of the fc/conv network")
    kernel.add_argument("--w-std", dest="kernel.w_std", type=float, default=math.sqrt(2.0), help="weight standard deviation")
    kernel.add_argument("--b-std", dest="kernel.b_std", type=float, default=0.1, help="bias standard deviation")
    kernel.add_argument("--parameterization", dest="kernel.parameterization", default="ntk", help="|".join(cfg.PARAMETERIZATIONS))
    kernel.add_argument("--activation", dest="kernel.activation", default="relu", help="|".join(cfg.ACTIVATIONS))
    kernel.add_argument("--conv-readout", dest="kernel.conv_readout", default="flatten", help="|".join(cfg.CONV_READOUTS))
    kernel.add_argument("--gamma", dest="kernel.gamma", type=float, default=1.0, help="RBF bandwidth: exp(-gamma |x-y|^2 / dim)")
    kernel.add_argument("--rf-networks", dest="kernel.rf_networks", type=int, default=4,
                        help="conv_rf: random ConvNets drawn for each KIP step")
    kernel.add_argument("--rf-width", dest="kernel.rf_width", type=int, default=64, help="conv_rf: channels of those ConvNets")
    kernel.add_argument("--rf-eval-networks", dest="kernel.rf_eval_networks", type=int, default=16,
                        help="conv_rf: random ConvNets in the fixed kernels that monitor and evaluate")
    kip = distill.add_argument_group("KIP")
    kip.add_argument("--method", dest="distill.method", default="kip", help="kip|label_solve (closed-form labels for the initial images)")
    kip.add_argument("--support-per-class", dest="distill.support_per_class", type=int, default=10, help="support images per class")
    kip.add_argument("--steps", dest="distill.steps", type=int, default=1000, help="Adam steps")
    kip.add_argument("--lr", dest="distill.learning_rate", type=float, default=0.04, help="Adam learning rate")
    kip.add_argument("--lr-schedule", dest="distill.lr_schedule", default="constant", help="constant|cosine (decay to 0)")
    kip.add_argument("--target-batch", dest="distill.target_batch", type=int, default=5000, help="class-balanced target images per step")
    kip.add_argument("--kernel-block", dest="distill.kernel_block", type=int, default=20_000_000,
                     help="largest target x support kernel block, in entries (bounded memory)")
    kip.add_argument("--learn-labels", dest="distill.learn_labels", action="store_true", help="learn the support labels too")
    kip.add_argument("--loss", dest="distill.loss", default="mse",
                     help="mse (KIP's) | cross_entropy (Platt-scaled, learned temperature)")
    kip.add_argument("--keep", dest="distill.keep", default="last",
                     help="last | best_validation (the step that scores best on the validation split; needs --eval-every)")
    kip.add_argument("--augment", dest="distill.augment", default="none",
                     help="none | crop (random translations) | crop_flip (and left-right flips; not for digits)")
    kip.add_argument("--augment-on", dest="distill.augment_on", default="target", help="target | support | both")
    kip.add_argument("--augment-pad", dest="distill.augment_pad", type=int, default=2,
                     help="largest translation, in pixels")
    kip.add_argument("--init", dest="distill.init", default="real", help="|".join(cfg.INITS))
    kip.add_argument("--corruption", dest="distill.corruption", type=float, default=0.0,
                     help="fraction of pixels replaced by noise at init and never learned (privacy)")
    kip.add_argument("--reg", dest="distill.reg", type=float, default=1e-6, help="KRR ridge, relative to tr(K)/n")
    kip.add_argument("--float64", dest="distill.float64", action="store_true", help="compute in double precision")
    kip.add_argument("--seed", dest="distill.seed", type=int, default=0, help="same seed and options -> identical output")
    kip.add_argument("--eval-every", dest="distill.eval_every", type=int, default=0, help="log KRR accuracy on the validation split every N steps (0: never)")
    kip.add_argument("--checkpoint", type=_file_path, default=None, help="checkpoint file to save to and resume from")
    kip.add_argument("--checkpoint-every", dest="distill.checkpoint_every", type=int, default=100, help="steps between checkpoints")
    kip.add_argument("--history", type=_file_path, default=None, help="write the per-step loss history here (JSON)")
    kip.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    distill.add_argument("-o", "--out", type=_file_path, required=True, help="output .npz")
    several = distill.add_argument_group("several processes (docs/scaling.md)")
    several.add_argument("--processes", type=int, default=1,
                         help="run as this many cooperating processes on this machine (jax.distributed); on a cluster, "
                              "set KIP_COORDINATOR, KIP_NUM_PROCESSES, KIP_PROCESS_ID (or KIP_DISTRIBUTED=auto) instead")
    several.add_argument("--devices-per-process", type=int, default=None,
                         help="with --processes: CPU devices each process exposes (XLA's forced host devices)")

    evaluate = commands.add_parser(
        "evaluate", help="KRR test accuracy of a support set, against random real images",
        description="Score a distilled .npz with KRR on the full test split, beside class-balanced random "
        "real subsets of the same size. Prints JSON.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    evaluate.add_argument("support", type=Path, help="a .npz written by `kip distill`")
    evaluate.add_argument("--reg", type=float, default=1e-6, help="KRR ridge, relative to tr(K)/n")
    evaluate.add_argument("--baseline-repeats", type=int, default=3, help="random subsets to average")
    evaluate.add_argument("--batch-size", type=int, default=1000, help="kernel block size (bounds memory)")
    evaluate.add_argument("--seed", type=int, default=0, help="which random real subsets form the baseline")
    evaluate.add_argument("--json", type=_file_path, default=None, help="also write the metrics to this file")
    evaluate.add_argument("--cache-dir", type=Path, default=None, help="download cache [$KIP_CACHE_DIR, else ~/.cache/kip-pipeline]")
    other = evaluate.add_argument_group(
        "another kernel", "By default a set is scored under the kernel it was distilled for (its metadata). Any of "
        "these scores it under that kernel with the given fields changed instead; the JSON then says so.")
    for flag, field, kind, shown in (
        ("--kernel", "architecture", str, "|".join(cfg.ARCHITECTURES)), ("--kernel-kind", "kind", str, "|".join(cfg.KERNEL_KINDS)),
        ("--depth", "depth", int, "hidden layers"), ("--w-std", "w_std", float, "weight std"),
        ("--b-std", "b_std", float, "bias std"), ("--activation", "activation", str, "|".join(cfg.ACTIVATIONS)),
        ("--parameterization", "parameterization", str, "|".join(cfg.PARAMETERIZATIONS)),
        ("--conv-readout", "conv_readout", str, "|".join(cfg.CONV_READOUTS)), ("--gamma", "gamma", float, "RBF bandwidth"),
        ("--rf-eval-networks", "rf_eval_networks", int, "conv_rf: random ConvNets scored over"),
        ("--rf-width", "rf_width", int, "conv_rf: their channels"),
    ):
        other.add_argument(flag, dest=f"kernel.{field}", type=kind, default=None, help=f"{shown} [the set's own]")

    train = commands.add_parser(
        "train", help="finite networks trained on a support set, against random real images",
        description="Train finite networks (Flax) on a distilled .npz and, with the same budget, on "
        "class-balanced random real subsets of the same size; score both on the full test split over "
        "several seeds. Prints JSON. Options are the params.yaml train.* keys.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    train.add_argument("support", type=Path, help="a .npz written by `kip distill`")
    for field in dataclasses.fields(cfg.TrainConfig):
        train.add_argument(
            f"--{field.name.replace('_', '-')}", dest=f"train.{field.name}", type=type(field.default),
            default=field.default, help=_TRAIN_HELP[field.name],
        )
    train.add_argument("--json", type=_file_path, default=None, help="also write the metrics to this file")
    train.add_argument("--cache-dir", type=Path, default=None, help="download cache [$KIP_CACHE_DIR, else ~/.cache/kip-pipeline]")
    train.add_argument("-q", "--quiet", action="store_true", help="no progress bar")

    inspect = commands.add_parser(
        "inspect", aliases=["show"], help="validate a distilled .parquet or .npz and print its metadata",
        description="Check a distilled artifact (schema, shapes, checksum, stored preprocessing) and print "
        "its lineage as JSON. Exit 2 if it is damaged.",
    )
    inspect.add_argument("artifact", type=Path, help="artifacts/distilled.parquet or a .npz")

    data = commands.add_parser(
        "data", help="fetch a dataset (if needed) and describe it",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    _add_data_args(data)
    doctor = commands.add_parser(
        "doctor", aliases=["repair"], help="repair the DVC state a killed `dvc repro` left, so the next one resumes",
        description="Check dvc.lock and DVC's lock files in the DVC project at or above DIR. A dvc.lock that a "
        "killed DVC left empty or cut off is replaced by its git version (staged, else committed) if valid, "
        "else removed; a damaged or stale .dvc/tmp/rwlock is removed. Prints one line; refuses while DVC runs.",
    )
    doctor.add_argument("dir", nargs="?", type=Path, default=Path("."), help="a directory inside the DVC project")

    keygen = commands.add_parser(
        "keygen", help="make an ed25519 key pair for signing distilled sets",
        description="Write a new ed25519 private key (mode 0600; keep it out of git) and its public key (commit it, "
        "e.g. keys/team.pub). Never replaces an existing file. docs/artifacts.md, \"Signatures\".",
    )
    keygen.add_argument("private_key", type=_file_path, help="where to write the private key (PEM)")
    keygen.add_argument("public_key", type=_file_path, help="where to write the public key (PEM)")
    sign = commands.add_parser(
        "sign", help="sign a distilled set (writes SET.sig beside it)",
        description="Write a detached ed25519 signature of the file's sha256 to SET.sig. The set's own bytes "
        "are not changed, so DVC's md5 and byte-identical reruns hold.",
    )
    sign.add_argument("artifact", type=Path, help="a distilled .npz or .parquet")
    sign.add_argument("--key", type=Path, required=True, help="the private key from `kip keygen`")
    verify = commands.add_parser(
        "verify", help="check a distilled set's signature, or its md5 against dvc.lock / MLflow",
        description="Exit 0 and one line if every requested check passes, else exit 2 and one line naming "
        "what failed. With no option, checks SET.sig against $KIP_PUBLIC_KEY.",
    )
    verify.add_argument("artifact", type=Path, help="a distilled .npz or .parquet")
    verify.add_argument("--public-key", type=Path, default=None, help="the trusted public key [$KIP_PUBLIC_KEY]")
    verify.add_argument("--signature", type=Path, default=None, help="the signature file [ARTIFACT.sig]")
    verify.add_argument("--md5", default=None, help="the md5 dvc.lock or the MLflow tag kip.out.<path> records")
    verify.add_argument("--lock", type=Path, default=None, help="a dvc.lock to take the recorded md5 from")
    verify.add_argument("--as", dest="lock_path", default=None,
                        help="the output's path in --lock [ARTIFACT's path relative to the lock's folder]")
    ui = commands.add_parser(
        "ui", help="open the MLflow runs table with each run's deciding metrics",
        description="Print the address of the project's MLflow experiment in a view that shows each execution's "
        "validation and test accuracy (best krr_val_accuracy first). For the SQLite store it also serves "
        "the UI on 127.0.0.1 until Ctrl-C; for a tracking server it only prints the address.",
    )
    ui.add_argument("dir", nargs="?", type=Path, default=Path("."), help="the project (where params.yaml is)")
    ui.add_argument("--port", type=_port, default=5000, help="where to serve the SQLite store's UI")
    for sub in (distill, evaluate, train, inspect, data, keygen, sign, verify, ui):
        _short_metavars(sub)
    return parser


def _port(text: str) -> int:
    try:
        port = int(text)
    except ValueError:
        port = 0
    if not 1 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"{text!r} is not allowed; expected a TCP port 1..65535")
    return port


def _file_path(text: str) -> Path:
    """An output path: `Path('')` is `.`, so an empty -o would otherwise mean "the current directory"."""
    if not text.strip():
        raise argparse.ArgumentTypeError(f"{text!r} is not allowed; expected a file path")
    return Path(text)


def _check_outputs(*paths: Path | None) -> None:
    """Every file a command will write must be writable before it computes anything."""
    from pipeline.artifacts import atomic

    for path in paths:
        if path is not None:
            atomic.check_writable(path)


def _short_metavars(parser: argparse.ArgumentParser) -> None:
    """Show `--lr LEARNING_RATE`, not the internal `section.field` dest, in usage lines."""
    for action in parser._actions:
        if action.metavar is None and "." in (action.dest or "") and action.nargs != 0:
            action.metavar = action.dest.split(".", 1)[1].upper()


def _add_data_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("data")
    group.add_argument("--source", dest="data.source", default="registry", help="|".join(cfg.SOURCES))
    group.add_argument("--dataset", dest="data.name", default="mnist",
                       help=f"registry: {'|'.join(cfg.REGISTRY_NAMES)}; embedded: digits; tfds: any TFDS name; files, imagefolder, parquet: a label")
    group.add_argument("--data-dir", dest="data.data_dir", default=None,
                       help="TFDS data_dir; the folder of IDX/.npz files; the image folder; the Parquet file or folder")
    group.add_argument("--channels", dest="data.channels", type=int, default=None,
                       help="imagefolder/parquet: 1 (grayscale) or 3 (RGB)")
    group.add_argument("--image-size", dest="data.image_size", type=int, default=None,
                       help="imagefolder/parquet: images are resized to this many pixels square")
    group.add_argument("--test-fraction", dest="data.test_fraction", type=float, default=0.2,
                       help="imagefolder/parquet without a test split: the share carved off (class-balanced, by seed)")
    group.add_argument("--on-unreadable", dest="data.on_unreadable", default="stop", help="|".join(cfg.ON_UNREADABLE))
    group.add_argument("--image-column", dest="data.image_column", default="image", help="parquet: the encoded images")
    group.add_argument("--label-column", dest="data.label_column", default="label", help="parquet: the labels")
    group.add_argument("--validation-fraction", dest="data.validation_fraction", type=float, default=0.1,
                       help="share of the training split held out for validation (monitoring, never KIP targets)")
    group.add_argument("--cache-dir", type=Path, default=None, help="download cache [$KIP_CACHE_DIR, else ~/.cache/kip-pipeline]")


def _section(args: argparse.Namespace, section: str) -> dict:
    """The options whose dest is `section.field`, as {field: value} for that section's record."""
    prefix = f"{section}."
    return {k[len(prefix):]: v for k, v in vars(args).items() if k.startswith(prefix)}


def _cmd_distill(args: argparse.Namespace) -> None:
    from pipeline.artifacts import atomic, npz as artifacts
    from pipeline.data.prepared import prepare
    from pipeline.run import distributed, workflow

    if args.devices_per_process and args.processes == 1:
        raise UserError("--devices-per-process applies with --processes N > 1; for one process with several CPU devices "
                        "set XLA_FLAGS=--xla_force_host_platform_device_count=K")
    if args.processes != 1 and distributed.process_count() == 1:
        code = distributed.launch(_without_launch_options(sys.argv[1:]), args.processes, args.devices_per_process)
        if code:
            raise SystemExit(code)
        return
    distill = cfg.DistillConfig(**_section(args, "distill"))
    data = cfg.DataConfig(**_section(args, "data"), seed=distill.seed)
    prep = cfg.PreprocessConfig(**_section(args, "preprocess"))
    kernel = cfg.KernelConfig(**_section(args, "kernel"))
    workflow.check_distill_settings(kernel, distill)
    _check_outputs(args.out, args.history, args.checkpoint)
    prepared = prepare(data, prep, cache_dir=args.cache_dir or default_cache_dir())
    run = workflow.distill(prepared, kernel, distill, checkpoint=args.checkpoint, progress=not args.quiet)
    distilled, history = run.distilled, run.history
    if not distributed.is_main():
        return  # process 0 writes
    artifacts.save_npz(args.out, distilled)
    if args.history:
        atomic.write_json(args.history, history, indent=None, sort_keys=False)
    loss = distilled.metadata["final_loss"]
    print(f"wrote {args.out}: {len(distilled.images)} images" + (f", final loss {loss:.4g}" if loss is not None else ""))


def _without_launch_options(argv: Sequence[str]) -> list[str]:
    """The command line each launched process runs: the same, less the options that launch."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg in ("--processes", "--devices-per-process"):
            skip = True
        elif not arg.startswith(("--processes=", "--devices-per-process=")):
            out.append(arg)
    return out


def _cmd_evaluate(args: argparse.Namespace) -> None:
    from pipeline.artifacts import atomic, npz as artifacts, signing
    from pipeline.data.prepared import prepare, reprepare
    from pipeline.run import workflow

    config = cfg.EvaluateConfig(
        reg=args.reg, baseline_repeats=args.baseline_repeats, batch_size=args.batch_size, seed=args.seed
    )
    _check_outputs(args.json)
    signing.verify_if_configured(args.support)
    distilled = artifacts.load_npz(args.support)
    cache_dir = args.cache_dir or default_cache_dir()
    prepared = reprepare(distilled, cache_dir=cache_dir)
    default = None
    if prepared.transform.method != cfg.PreprocessConfig().method:  # the strongest baseline may be there
        default = prepare(cfg.DataConfig(**distilled.metadata["data"]), cfg.PreprocessConfig(), cache_dir=cache_dir)
    changed = {field: value for field, value in _section(args, "kernel").items() if value is not None}
    metrics = workflow.evaluate(distilled, prepared, config, default, kernel_changes=changed)
    if "scored_under_kernel" in metrics:
        print(f"kip evaluate: scored under another kernel than the set's own ({metrics['scored_under_kernel']}); "
              "these are not the set's numbers", file=sys.stderr)
    if args.json:
        atomic.write_json(args.json, metrics)
    print(json.dumps(metrics, indent=2, sort_keys=True))


def _cmd_train(args: argparse.Namespace) -> None:
    from pipeline.artifacts import atomic, npz as artifacts, signing
    from pipeline.data.prepared import reprepare
    from pipeline.evaluate import transfer

    config = cfg.TrainConfig(**_section(args, "train"))
    _check_outputs(args.json)
    signing.verify_if_configured(args.support)
    distilled = artifacts.load_npz(args.support)
    prepared = reprepare(distilled, cache_dir=args.cache_dir or default_cache_dir())
    metrics, _ = transfer.transfer(distilled, prepared, config, progress=not args.quiet)
    if args.json:
        atomic.write_json(args.json, metrics)
    print(json.dumps(metrics, indent=2, sort_keys=True))


def _cmd_inspect(args: argparse.Namespace) -> None:
    from pipeline.artifacts import signing
    from pipeline.artifacts.inspection import inspect_artifact

    signed_by = signing.verify_if_configured(args.artifact)
    report = inspect_artifact(args.artifact)
    report["checksums_catch"] = "accidental damage, not an edit whose author recomputes them (that needs kip sign / verify)"
    report["signature"] = f"valid, key {signed_by}" if signed_by else f"not checked (no ${signing.PUBLIC_KEY_ENV})"
    print(json.dumps(report, indent=2))


def _cmd_keygen(args: argparse.Namespace) -> None:
    from pipeline.artifacts import signing

    key = signing.generate_keypair(args.private_key, args.public_key)
    print(f"kip keygen: key {key}: private {args.private_key} (keep it out of git), public {args.public_key} (commit it)")


def _cmd_sign(args: argparse.Namespace) -> None:
    from pipeline.artifacts import signing

    target, key = signing.sign(args.artifact, args.key)
    print(f"kip sign: wrote {target} (key {key})")


def _cmd_verify(args: argparse.Namespace) -> None:
    import os

    from pipeline.artifacts import signing

    passed = []
    if args.lock_path and not args.lock:
        raise UserError("--as names an output of --lock; give --lock dvc.lock too")
    if args.md5 and args.lock:
        raise UserError("give --md5 or --lock, not both")
    if args.lock:
        out = args.lock_path or os.path.relpath(args.artifact, args.lock.parent)
        expected = signing.recorded_md5(args.lock, out)
        passed.append(f"md5 {signing.check_md5(args.artifact, expected)} as {args.lock} records for {out}")
    elif args.md5:
        passed.append(f"md5 {signing.check_md5(args.artifact, args.md5)} as recorded")
    public_key = args.public_key or os.environ.get(signing.PUBLIC_KEY_ENV)
    if public_key or args.signature or not passed:
        if not public_key:
            raise UserError(f"no trusted key: give --public-key or set ${signing.PUBLIC_KEY_ENV} (or check --md5 / --lock)")
        passed.append(f"signed by key {signing.verify(args.artifact, Path(public_key), args.signature)}")
    print(f"kip verify: {args.artifact}: " + "; ".join(passed))


def _cmd_data(args: argparse.Namespace) -> None:
    from pipeline.data.datasets import load_dataset

    dataset = load_dataset(cfg.DataConfig(**_section(args, "data")), args.cache_dir or default_cache_dir())
    print(json.dumps(dataset.describe(), indent=2))


def _cmd_doctor(args: argparse.Namespace) -> None:
    from pipeline.artifacts.lockfile import find_root, repair
    from pipeline.run import store_doctor

    said = repair(args.dir)
    store = _tracking_store(find_root(args.dir))
    done = store_doctor.repair(store) if store is not None else None
    print(f"kip doctor: {said}" + (f"; {done}" if done else ""))


def _cmd_ui(args: argparse.Namespace) -> None:
    from pipeline.run import ui

    if not (args.dir / "params.yaml").is_file():
        raise UserError(f"dir={args.dir}: no params.yaml there; expected a kip-pipeline project")
    uri, address = ui.runs_address(args.dir.resolve(), args.port)
    print(address, flush=True)
    if not uri.startswith(("http://", "https://")):
        print(f"kip ui: serving {uri} on 127.0.0.1:{args.port} (Ctrl-C stops it)", file=sys.stderr, flush=True)
        code = ui.serve(uri, args.port, args.dir.resolve())
        if code not in (0, -2, 130):
            raise UserError(f"mlflow ui stopped with exit code {code} (port {args.port} in use? try --port)")


def _tracking_store(root: Path) -> Path | None:
    """The project's SQLite MLflow store, as the stages resolve it; None for a server or no file."""
    from pipeline.run import store_doctor, tracking

    config = tracking.project_config(root)
    path = store_doctor.sqlite_path(tracking.resolve_uri(config, root))
    if path is None:
        return None
    path = path if path.is_absolute() else root / path
    return path if path.exists() else None


def _version() -> str:
    from pipeline import __version__

    return __version__


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if argv is not None and args.command == "distill" and getattr(args, "processes", 1) != 1:
        sys.argv = [sys.argv[0], *argv]  # the launcher repeats this command line
    runtime.tune_process()
    runtime.stop_on_sigterm()
    handler = {
        "distill": _cmd_distill, "evaluate": _cmd_evaluate, "train": _cmd_train,
        "inspect": _cmd_inspect, "show": _cmd_inspect,
        "data": _cmd_data,
        "doctor": _cmd_doctor, "repair": _cmd_doctor,
        "keygen": _cmd_keygen, "sign": _cmd_sign, "verify": _cmd_verify,
        "ui": _cmd_ui,
    }[args.command]
    from pipeline.run import distributed

    code = _run(args, handler, distributed)
    if distributed.process_count() > 1:
        distributed.leave(code)  # success: say so, so peers wait for this one at shutdown; failure: go now
    return code


_READ_ONLY_COMMANDS = {"inspect", "show", "keygen", "sign", "verify"}  # what the base install runs


def _run(args: argparse.Namespace, handler, distributed) -> int:
    try:
        if args.command not in _READ_ONLY_COMMANDS:
            from pipeline.run.install import FULL_MODULES, require_full

            require_full(("mlflow",) if args.command == "ui" else FULL_MODULES)
        if args.command == "distill":  # the only command that runs as several processes
            distributed.initialize_from_env()
        handler(args)
    except UserError as err:
        print(f"kip {args.command}: error: {err}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # `kip inspect ... | head`: the reader has all it wanted
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at interpreter exit
        return 141  # 128 + SIGPIPE, what a shell reports for a pipe's writer
    except KeyboardInterrupt as stop:
        terminated = isinstance(stop, runtime.Terminated)
        print(f"kip {args.command}: {'terminated' if terminated else 'interrupted'}", file=sys.stderr)
        return 143 if terminated else 130
    except Exception as err:
        return distributed.exit_code_of_failure(err, f"kip {args.command}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
