"""ConvNet-kernel KIP on a 2-core CPU: what one step costs, and what a full run reaches.

`steps`: the jitted value-and-gradient of the KIP loss (100-image support, MNIST-shaped 28x28x1
inputs, float32), in one process, samples of the implementations interleaved:

  ours      pipeline.distill.kip.kip_loss with conv_features.RandomFeatureKernel: the random-feature NNGP of `--networks` random ConvNets of
            `--width` channels (3 blocks of 3x3 conv, ReLU, 2x2 average pooling), drawn inside the
            step as in the KIP loop, for 500 / 1000 / 5000 targets
  exact     neural-tangents' exact NNGP of the same infinite ConvNet (kernels.exact_conv_kernel_fn),
            and of the ConvNets `kernel.architecture=conv` builds today (conv blocks without pooling,
            `flatten` or `gap` readout, depth 1-3). Its cost is linear in the number of image pairs,
            so it is timed on a few pairs and projected to 100 x n_t (marked "projected"): a real
            100 x 1000 step would take hours.

Every sample records the cores other processes used while it ran (`_report.OtherLoad`); medians
are over unloaded samples, and a row with fewer than half its samples unloaded is marked loaded.

`run`: a full conv-KIP run on MNIST or Fashion-MNIST (standardised as the paper matrix, or `--preprocess zca`), settings
from the command line, validation choosing the step; then KRR accuracy on the test split, once each,
with an evaluation kernel of `--eval-networks` networks drawn from a stream neither training nor
monitoring uses: for the KIP support, for a class-balanced random real subset with one-hot labels,
and for the same subset with Label Solve (labels solved on 10,000 training images: the strongest
simple baseline). The support is saved (npz + Parquet, lineage and the evaluation kernel in its
metadata); `rescore` recomputes its KRR test accuracy from that file alone.

`convnets`: finite ConvNets of the kernel's architecture (`train.architecture=conv`, width and depth
of the features, 3 seeds, label scale and optimizer chosen on validation) trained on a run's saved
support and on random real subsets of the same size, scored once on the test split; added to the
run's JSON with each network's accuracy on the validation split too, which is what to compare
supports by (choosing a support by its networks' test accuracy would fit the test split).

    python benchmarks/conv_kip.py steps --out benchmarks/results/conv_kip_steps.json
    python benchmarks/conv_kip.py run --dataset mnist --steps 2000 --eval-networks 16 --checkpoint /tmp/conv.ckpt.npz \\
        --save benchmarks/results/supports/mnist100_conv_kip --out benchmarks/results/conv_kip_mnist.json
    python benchmarks/conv_kip.py run --dataset fashion_mnist --steps 300 --loss cross_entropy --preprocess zca \\
        --zca-reg 1.0 --validation-only   # a settings pilot: validation curve only
    python benchmarks/conv_kip.py convnets benchmarks/results/conv_kip_mnist.json
    python benchmarks/conv_kip.py rescore benchmarks/results/supports/mnist100_conv_kip.npz
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from _report import OtherLoad, emit

from pipeline.distill import kip, krr
from pipeline.kernels import conv_features
from pipeline.kernels.conv_features import ConvFeatureConfig
from pipeline.run.config import KIP_LOSSES, LR_SCHEDULES, PREPROCESS_METHODS, DistillConfig, PreprocessConfig

SHAPE = (28, 28, 1)
EVAL_STREAM = 3  # training draws use stream 1, the monitor stream 2 (conv_features.RandomFeatureKernel)
MONITOR_NETWORKS = 16  # the validation monitor's fixed draw


def _timed(fn, *args) -> tuple[float, float]:
    with OtherLoad() as load:
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        seconds = time.perf_counter() - start
    return seconds, load.cores


def _exact_loss(kernel_fn):
    def loss(x_s, x_t, y_s, y_t):
        k_ss, k_ts = kernel_fn(x_s, x_s), kernel_fn(x_t, x_s)
        alpha = jnp.linalg.solve(k_ss + 1e-6 * jnp.trace(k_ss) / k_ss.shape[0] * jnp.eye(k_ss.shape[0]), y_s)
        return 0.5 * jnp.mean((k_ts @ alpha - y_t) ** 2)
    return jax.jit(jax.value_and_grad(loss))


def _ours(features: ConvFeatureConfig):
    kernel = conv_features.RandomFeatureKernel(features, SHAPE, seed=0)

    def loss(x_s, x_t, y_s, y_t, key):
        return kip.kip_loss(kernel, 1e-6, kip.Support(x_s, y_s), x_t, y_t, draw=key)
    return jax.jit(jax.value_and_grad(loss))


def _exact_networks() -> dict[str, tuple]:
    """name -> (kernel_fn(x1, x2), support, targets measured on)."""
    from pipeline.kernels import functions as kernels
    from pipeline.run.config import KernelConfig

    out = {"ConvNet avg-pool depth 3 (the kernel ours estimates)":
           (kernels.exact_conv_kernel_fn(ConvFeatureConfig(depth=3)), 4, 8)}
    for readout in ("flatten", "gap"):
        for depth in (1, 2, 3):
            spec = KernelConfig(architecture="conv", kind="nngp", depth=depth, conv_readout=readout)
            _, _, kernel_fn = kernels.stax_network(spec)
            pairs = (20, 100) if readout == "flatten" else (4, 8)
            out[f"kernel.architecture=conv {readout} depth {depth}"] = (lambda a, b, f=kernel_fn: f(a, b, "nngp"), *pairs)
    return out


def step_times(args) -> dict:
    rng = np.random.default_rng(0)

    def data(n_s, n_t):
        return (jnp.asarray(rng.standard_normal((n_s, *SHAPE)), jnp.float32), jnp.asarray(rng.standard_normal((n_t, *SHAPE)), jnp.float32),
                jnp.asarray(rng.standard_normal((n_s, 10)), jnp.float32), jnp.asarray(rng.standard_normal((n_t, 10)), jnp.float32))

    features = ConvFeatureConfig(width=args.width, networks=args.networks)
    jobs = {}
    ours = _ours(features)
    for n_t in (500, 1000, 5000):
        jobs[f"ours {args.networks} networks x width {args.width}, 100 x {n_t}"] = (ours, (*data(100, n_t), jax.random.PRNGKey(0)), None)
    for name, (kernel_fn, n_s, n_t) in _exact_networks().items():
        jobs[f"exact: {name}"] = (_exact_loss(kernel_fn), data(n_s, n_t), (n_s, n_t))
    samples: dict[str, list] = {name: [] for name in jobs}
    for name, (fn, inputs, _) in jobs.items():  # compile, outside the samples
        started = time.perf_counter()
        jax.block_until_ready(fn(*inputs))
        print(f"compiled {name} in {time.perf_counter() - started:.1f} s", file=sys.stderr, flush=True)
    for _ in range(args.repeats):  # interleaved: a load spell hits every implementation alike
        for name, (fn, inputs, _) in jobs.items():
            samples[name].append(_timed(fn, *inputs))
    rows = []
    for name, (_, _, measured_on) in jobs.items():
        quiet = [s for s, cores in samples[name] if cores <= OtherLoad.LOADED_CORES]
        use = quiet or [s for s, _ in samples[name]]
        median = statistics.median(use)
        row = {"name": name, "samples": [{"seconds": round(s, 4), "other_cores": round(c, 2)} for s, c in samples[name]],
               "median_seconds": round(median, 4), "spread_seconds": [round(min(use), 4), round(max(use), 4)],
               "loaded": len(quiet) < len(samples[name]) / 2}
        if measured_on:
            n_s, n_t = measured_on
            per_pair = median / (n_s * n_t + n_s * n_s)
            row.update(measured_on={"support": n_s, "targets": n_t}, seconds_per_pair=per_pair,
                       projected_seconds={f"100x{t}": round(per_pair * (100 * t + 100 * 100), 1) for t in (1000, 5000)})
        rows.append(row)
    return {"benchmark": "conv_kip_steps", "features": dataclasses.asdict(features), "repeats": args.repeats, "rows": rows}


def full_run(args) -> dict:
    from pipeline.compat import enable_x64

    from pipeline.artifacts import npz as artifacts, parquet
    from pipeline.data.prepared import prepare
    from pipeline.evaluate import privacy, transfer
    from pipeline.data.datasets import default_cache_dir
    from pipeline.run.config import DataConfig, TrainConfig

    prepared = prepare(DataConfig(source="registry", name=args.dataset),
                       PreprocessConfig(method=args.preprocess, zca_reg=args.zca_reg), cache_dir=default_cache_dir())
    features = ConvFeatureConfig(width=args.width, depth=args.depth, networks=args.networks)
    config = DistillConfig(support_per_class=args.spc, steps=args.steps, learning_rate=args.learning_rate,
                           target_batch=args.target_batch, reg=args.reg, seed=args.seed, loss=args.loss,
                           lr_schedule=args.lr_schedule, learn_labels=True, eval_every=100, keep="best_validation")
    kernel = conv_features.RandomFeatureKernel(features, SHAPE, args.seed)
    started = time.process_time(), time.perf_counter()
    result = kip.distill(prepared.x_train, prepared.y_train, prepared.num_classes, kernel, config,
                         checkpoint=args.checkpoint, checkpoint_key="benchmarks/conv_kip.py",
                         monitor=kernel.monitor(prepared.x_val, prepared.y_val, config.reg, MONITOR_NETWORKS))
    cpu_minutes, wall_minutes = (time.process_time() - started[0]) / 60, (time.perf_counter() - started[1]) / 60
    if args.validation_only:  # a pilot for choosing settings: the test split is not read, nothing is saved
        return {"benchmark": "conv_kip_pilot", "dataset": args.dataset, "preprocess": prepared.provenance["preprocess"],
                "conv_kip": dataclasses.asdict(config), "best_step": result.best_step,
                "kip_wall_minutes": round(wall_minutes, 1),
                "validation_curve": [p for p in result.history if "val_accuracy" in p]}
    if args.save is None:
        raise SystemExit("conv_kip.py run: --save is required unless --validation-only")

    evaluation = dataclasses.replace(features, networks=args.eval_networks)
    eval_params = conv_features.init(conv_features.network_key(args.seed, EVAL_STREAM, 0), evaluation, SHAPE)

    def test_accuracy(images, labels):
        return conv_features.krr_accuracy(images, labels, prepared.x_test, prepared.y_test, eval_params, evaluation, config.reg)

    rng = np.random.default_rng([args.seed, 3, 0])  # the first random subset transfer's baseline draws
    idx = kip.class_balanced_indices(prepared.y_train, args.spc, prepared.num_classes, rng)
    x_rand, y_rand = prepared.x_train[idx], krr.centered_one_hot(prepared.y_train[idx], prepared.num_classes)
    solve_idx = kip.class_balanced_indices(prepared.y_train, 1000, prepared.num_classes, np.random.default_rng([args.seed, 7]))
    f_s = conv_features.feature_rows(eval_params, x_rand, evaluation, 500)
    f_t = conv_features.feature_rows(eval_params, prepared.x_train[solve_idx], evaluation, 500)
    with enable_x64():
        k_ss = jnp.asarray(f_s, jnp.float64) @ jnp.asarray(f_s, jnp.float64).T + evaluation.b_std ** 2
        k_ts = jnp.asarray(f_t, jnp.float64) @ jnp.asarray(f_s, jnp.float64).T + evaluation.b_std ** 2
        solved = np.asarray(krr.label_solve(k_ss, k_ts, jnp.asarray(krr.centered_one_hot(prepared.y_train[solve_idx], prepared.num_classes), jnp.float64), config.reg), np.float32)
    krr_test = {"kip": test_accuracy(result.images, result.labels), "random": test_accuracy(x_rand, y_rand),
                "random_label_solve": test_accuracy(x_rand, solved)}
    print("KRR test", krr_test, file=sys.stderr, flush=True)

    metadata = {"method": "conv_kip", **{k: prepared.provenance[k] for k in ("data", "preprocess", "dataset", "validation")},
                "conv_kip": dataclasses.asdict(config), "features": dataclasses.asdict(features), "best_step": result.best_step,
                "evaluation_kernel": {**dataclasses.asdict(evaluation), "stream": EVAL_STREAM, "seed": args.seed},
                "privacy": {**privacy.report(result.images, prepared.x_train, prepared.x_val, args.seed), "heldout_split": "validation"}}
    support = artifacts.DistilledSet(result.images, result.labels, result.classes.astype(np.int32), prepared.transform, metadata)
    npz, table = args.save.with_suffix(".npz"), args.save.with_suffix(".parquet")
    artifacts.save_npz(npz, support)
    parquet.save_parquet(table, support, prepared.class_names)
    _load_support(npz)  # what was saved reads back (checksums, shapes, finiteness)

    return {"benchmark": "conv_kip_run", "dataset": args.dataset, "preprocess": prepared.provenance["preprocess"],
            "support_size": len(result.images),
            "features": dataclasses.asdict(features), "conv_kip": dataclasses.asdict(config),
            "best_step": result.best_step, "kip_cpu_minutes": round(cpu_minutes, 1), "kip_wall_minutes": round(wall_minutes, 1),
            "validation_curve": [p for p in result.history if "val_accuracy" in p],
            "evaluation_kernel": metadata["evaluation_kernel"], "krr_test_accuracy": krr_test,
            "saved": str(npz), "saved_sha256": hashlib.sha256(npz.read_bytes()).hexdigest()}


def _load_support(path: Path):
    """A saved conv-KIP support, checked as `artifacts.load_npz` checks a `kip distill` set (checksums,
    shapes, finiteness, transform) except for the `kernel` lineage section: the
    random-feature ConvNet kernel is not a `kernel` config yet, so `kip evaluate` cannot re-score
    this file (it would use another kernel); `rescore` below does, from the metadata's
    `evaluation_kernel`."""
    import json

    from pipeline.artifacts import npz as artifacts, safe_read
    from pipeline.data.preprocess import Transform

    arrays = safe_read.read_npz(path, max_array_bytes=artifacts.MAX_ARRAY_BYTES, strings=True)
    record = artifacts.parse_checksums(path, str(arrays["checksums"]), "checksums")
    artifacts.verify_checksums(path, record, {k: v for k, v in arrays.items() if k != "checksums"})
    transform = Transform.from_arrays({k[len("transform/"):]: v for k, v in arrays.items() if k.startswith("transform/")})
    support = artifacts.DistilledSet(arrays["images"], arrays["labels"], arrays["classes"].astype(np.int32), transform,
                                     json.loads(str(arrays["metadata"])))
    artifacts.check_consistent(path, support)
    artifacts.check_transform(path, transform, support.images.shape[1:])
    return support


def train_convnets(args) -> dict:
    """Finite ConvNets on a saved support and on random real subsets; adds them to the run's JSON."""
    import json

    from pipeline.data.prepared import reprepare
    from pipeline.evaluate import transfer
    from pipeline.data.datasets import default_cache_dir
    from pipeline.run.config import TrainConfig

    report = json.loads(args.report.read_text())
    support = _load_support(Path(report["saved"]))
    prepared = reprepare(support, cache_dir=default_cache_dir())
    features = support.metadata["features"]
    train = TrainConfig(architecture="conv", conv_width=features["width"], conv_depth=features["depth"], pooling="avg",
                        w_std=features["w_std"], b_std=features["b_std"], eval_every=0)
    started = time.process_time(), time.perf_counter()
    runs = transfer.train_networks(support, prepared, train, baseline=True, progress=True)
    networks = {"network": {k: v for k, v in dataclasses.asdict(train).items()
                            if k in ("architecture", "conv_width", "conv_depth", "pooling", "parameterization", "seeds")}}
    for side in ("distilled", "baseline"):
        accuracy = [r.accuracy for r in runs[side]]
        validation = [transfer.validation_accuracy(r, prepared) for r in runs[side]]
        networks[side] = {"settings": runs["settings"][side], "test_accuracy": accuracy,
                          "mean": float(np.mean(accuracy)), "std": float(np.std(accuracy)),
                          "validation_accuracy": validation, "validation_mean": float(np.mean(validation))}
    networks["cpu_minutes"] = round((time.process_time() - started[0]) / 60, 1)
    networks["wall_minutes"] = round((time.perf_counter() - started[1]) / 60, 1)
    report.pop("machine", None)
    # The KIP run's load becomes run_other_load; `emit` adds this command's own as other_load. On a
    # re-run the report's other_load is the earlier networks' (superseded with them).
    if "other_load" in report:
        earlier = report.pop("other_load")
        report.setdefault("run_other_load", earlier)
    return {**report, "networks": networks}


def rescore(args) -> dict:
    """A saved support's KRR test accuracy under the evaluation kernel its metadata records."""
    from pipeline.data.datasets import default_cache_dir

    predictions, y_test = rescore_predictions(args.support, default_cache_dir())
    return {"benchmark": "conv_kip_rescore", "support": str(args.support),
            "krr_test_accuracy": krr.accuracy(predictions, y_test)}


def rescore_predictions(support_path: Path, cache_dir: Path, rows: slice = slice(None)) -> tuple[np.ndarray, np.ndarray]:
    """KRR's outputs on the test images `rows` (all by default) under the evaluation kernel a saved
    support's metadata records, and those images' labels. A whole 500-image block of rows gives the
    bytes a full scoring gives them (`conv_features.krr_predictions`)."""
    from pipeline.data.prepared import reprepare

    support = _load_support(support_path)
    prepared = reprepare(support, cache_dir=cache_dir)
    recorded = dict(support.metadata["evaluation_kernel"])
    stream, seed = recorded.pop("stream"), recorded.pop("seed")
    evaluation = ConvFeatureConfig(**recorded)
    params = conv_features.init(conv_features.network_key(seed, stream, 0), evaluation, prepared.x_test.shape[1:])
    predictions = conv_features.krr_predictions(support.images, support.labels, prepared.x_test[rows], params, evaluation,
                                                support.metadata["conv_kip"]["reg"])
    return predictions, prepared.y_test[rows]


# The settings benchmarks/results/conv_kip_*.json were run with, where they differ from params.yaml's.
_RUN_DEFAULTS = DistillConfig(steps=2000, learning_rate=0.01, target_batch=500, reg=1e-6)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    steps = sub.add_parser("steps")
    steps.add_argument("--repeats", type=int, default=5)
    run = sub.add_parser("run")
    run.add_argument("--dataset", choices=("mnist", "fashion_mnist"), default="mnist")
    run.add_argument("--spc", type=int, default=10)
    run.add_argument("--steps", type=int, default=_RUN_DEFAULTS.steps)
    run.add_argument("--learning-rate", type=float, default=_RUN_DEFAULTS.learning_rate)
    run.add_argument("--target-batch", type=int, default=_RUN_DEFAULTS.target_batch)
    run.add_argument("--reg", type=float, default=_RUN_DEFAULTS.reg)
    run.add_argument("--depth", type=int, default=ConvFeatureConfig.depth)
    run.add_argument("--eval-networks", type=int, default=32)
    run.add_argument("--seed", type=int, default=0)
    run.add_argument("--loss", choices=KIP_LOSSES, default=_RUN_DEFAULTS.loss)
    run.add_argument("--lr-schedule", choices=LR_SCHEDULES, default=_RUN_DEFAULTS.lr_schedule)
    run.add_argument("--preprocess", choices=PREPROCESS_METHODS, default=PreprocessConfig.method)
    run.add_argument("--zca-reg", type=float, default=PreprocessConfig.zca_reg)
    run.add_argument("--checkpoint", type=Path, default=None)
    run.add_argument("--save", type=Path, default=None, help="path stem of the support (.npz, .parquet)")
    run.add_argument("--validation-only", action="store_true",
                     help="a settings pilot: print the validation curve; no test split, nothing saved")
    convnets = sub.add_parser("convnets", help="train finite ConvNets on a run's saved support, add them to its JSON")
    convnets.add_argument("report", type=Path)
    again = sub.add_parser("rescore", help="a saved support's KRR test accuracy under its recorded evaluation kernel")
    again.add_argument("support", type=Path)
    for p in (steps, run):
        p.add_argument("--width", type=int, default=ConvFeatureConfig.width)
        p.add_argument("--networks", type=int, default=ConvFeatureConfig.networks)
        p.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    commands = {"steps": step_times, "run": full_run, "convnets": train_convnets, "rescore": rescore}
    emit(commands[args.command](args), getattr(args, "out", None) or (args.report if args.command == "convnets" else None))
    return 0


if __name__ == "__main__":
    sys.exit(main())
