"""What caps the ConvNet-kernel KRR accuracy: the evaluation kernel's size, or the support?

The conv-KIP numbers (benchmarks/conv_kip.py, the matrix's conv_rf cells) are KRR accuracies under a
random-feature estimate of the ConvNet NNGP: 16 random ConvNets of width 64. If that estimate were
what held the accuracy down, more or wider networks would raise it at no cost to the support. This
script measures it, on validation images only (the test split is never read):

`networks`: KRR accuracy of each committed 100-image conv-KIP support (benchmarks/results/supports/,
            with its learned labels) and of a class-balanced random real subset of the same size,
            under estimates from 1, 2, 4, ... 128 networks of width 64 (prefixes of one draw of 128),
            32 of width 128 and 16 of width 256. Scored on the validation images after the first
            2,000 (those chose the support's step, so they are left out).
`preprocess`: the same kernel (16 networks, width 64) on random real subsets (10 and 100 per class,
            two draws each) after each preprocessing: standardise (what the matrix uses) and ZCA at
            two strengths (the follow-up paper whitens its inputs). A cheap check of whether ZCA
            makes the kernel itself better on these datasets before anyone pays for a KIP run.

    python benchmarks/conv_eval_kernel.py --out benchmarks/results/conv_eval_kernel.json
    python benchmarks/conv_eval_kernel.py --table benchmarks/results/conv_eval_kernel.json   # docs' tables

About 20 minutes on 2 cores (most of it the 128-network features of 4,000 validation images per
dataset).
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import jax.numpy as jnp
import numpy as np
from _report import emit

from pipeline.data.prepared import prepare
from pipeline.distill import kip, krr
from pipeline.kernels import conv_features
from pipeline.kernels.conv_features import ConvFeatureConfig
from pipeline.data.datasets import default_cache_dir
from pipeline.run.config import DataConfig, PreprocessConfig

SUPPORTS = {"mnist": "mnist100_conv_kip.npz", "fashion_mnist": "fashion100_conv_kip.npz"}
HERE = Path(__file__).resolve().parent
MONITORED = conv_features.PIPELINE_VAL_IMAGES  # the validation images that chose the support's step
STREAM = 4  # a network stream that neither KIP training (1), monitoring (2) nor evaluation (3) draws from
SIZES = ((64, 128), (128, 32), (256, 16))  # (width, networks): prefixes of each draw are scored too
REG = 1e-6


def krr_accuracy(f_support: np.ndarray, labels: np.ndarray, f_val: np.ndarray, y_val: np.ndarray,
                 offset: float) -> float:
    """KRR on explicit features (k = f . f' + offset), the ridge relative as everywhere in the library."""
    k_ss = jnp.asarray(f_support @ f_support.T + offset)
    alpha = np.asarray(krr.fit(k_ss, jnp.asarray(labels, jnp.float32), REG))
    return krr.accuracy((f_val @ f_support.T + offset) @ alpha, y_val)


def network_counts(dataset: str) -> dict:
    from conv_kip import _load_support

    prepared = prepare(DataConfig(source="registry", name=dataset), PreprocessConfig(method="standardize"),
                       cache_dir=default_cache_dir())
    support = _load_support(HERE / "results" / "supports" / SUPPORTS[dataset])
    x_val, y_val = prepared.x_val[MONITORED:], prepared.y_val[MONITORED:]
    idx = kip.class_balanced_indices(prepared.y_train, 10, prepared.num_classes, np.random.default_rng([0, 0]))
    sides = {"kip": (support.images, support.labels),
             "random": (prepared.x_train[idx], krr.centered_one_hot(prepared.y_train[idx], prepared.num_classes))}
    rows = []
    for width, networks in SIZES:
        config = ConvFeatureConfig(width=width, depth=3, networks=networks)
        params = conv_features.init(conv_features.network_key(0, STREAM, width), config, prepared.x_train.shape[1:])
        started = time.perf_counter()
        f_val = conv_features.feature_rows(params, x_val, config, 500, one_network_at_a_time=True)
        f_sides = {name: conv_features.feature_rows(params, x, config, 100, one_network_at_a_time=True)
                   for name, (x, _) in sides.items()}
        seconds = time.perf_counter() - started
        per_network = f_val.shape[1] // networks
        m = 1
        while m <= networks:
            rescale = np.sqrt(networks / m)  # features of m networks carry 1/sqrt(m), not 1/sqrt(networks)
            row = {"width": width, "networks": m}
            for name, (_, labels) in sides.items():
                row[name] = krr_accuracy(f_sides[name][:, : m * per_network] * rescale, labels,
                                         f_val[:, : m * per_network] * rescale, y_val, config.b_std ** 2)
            rows.append(row)
            print(row, flush=True)
            m *= 2
        rows[-1]["feature_seconds"] = round(seconds, 1)
    return {"support": f"benchmarks/results/supports/{SUPPORTS[dataset]}", "validation_images": int(len(y_val)),
            "validation_slice": f"[{MONITORED}:]", "rows": rows}


def preprocessing(dataset: str) -> list[dict]:
    rows = []
    config = ConvFeatureConfig(width=64, depth=3, networks=16)
    for preprocess in (PreprocessConfig(method="standardize"), PreprocessConfig(method="zca", zca_reg=0.1),
                       PreprocessConfig(method="zca", zca_reg=1.0)):
        prepared = prepare(DataConfig(source="registry", name=dataset), preprocess, cache_dir=default_cache_dir())
        params = conv_features.init(conv_features.network_key(0, STREAM, 0), config, prepared.x_train.shape[1:])
        x_val, y_val = prepared.x_val[MONITORED:], prepared.y_val[MONITORED:]
        f_val = conv_features.feature_rows(params, x_val, config, 500, one_network_at_a_time=True)
        for per_class in (10, 100):
            accuracies = []
            for draw in range(2):
                idx = kip.class_balanced_indices(prepared.y_train, per_class, prepared.num_classes,
                                                 np.random.default_rng([draw, 0]))
                f_s = conv_features.feature_rows(params, prepared.x_train[idx], config, 500, one_network_at_a_time=True)
                accuracies.append(krr_accuracy(f_s, krr.centered_one_hot(prepared.y_train[idx], prepared.num_classes),
                                               f_val, y_val, config.b_std ** 2))
            row = {"preprocess": preprocess.method,
                   "zca_reg": preprocess.zca_reg if preprocess.method == "zca" else None,
                   "per_class": per_class, "random_subsets": accuracies, "mean": float(np.mean(accuracies))}
            rows.append(row)
            print(row, flush=True)
    return rows


SHOWN = ((64, 1), (64, 4), (64, 16), (64, 128), (128, 32), (256, 16))  # (width, networks) rows of `table`


def table(report: dict) -> str:
    """The docs' tables (docs/scaling.md), from a saved report: tests/test_benchmark_reports.py holds
    the docs to them line for line."""
    datasets = list(report["networks"])
    lines = ["| evaluation kernel (networks × channels) | " + " | ".join(
                 f"{d}: conv-KIP support | {d}: random real subset" for d in datasets) + " |",
             "|---|" + "---|---|" * len(datasets)]
    for width, networks in SHOWN:
        cells = []
        for d in datasets:
            row = next(r for r in report["networks"][d]["rows"] if (r["width"], r["networks"]) == (width, networks))
            cells += [f"{100 * row['kip']:.2f} %", f"{100 * row['random']:.2f} %"]
        lines.append(f"| {networks} × {width} | " + " | ".join(cells) + " |")
    lines += ["", "| preprocessing (random real subsets, 16 × 64 kernel) | " + " | ".join(
                  f"{d}: 10 per class | {d}: 100 per class" for d in datasets) + " |",
              "|---|" + "---|---|" * len(datasets)]
    first = report["preprocess"][datasets[0]]
    for i in range(0, len(first), 2):
        name = first[i]["preprocess"] + (f", zca_reg {first[i]['zca_reg']}" if first[i]["zca_reg"] is not None else "")
        cells = [f"{100 * r['mean']:.2f} %" for d in datasets for r in report["preprocess"][d][i:i + 2]]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", nargs="+", default=list(SUPPORTS), choices=list(SUPPORTS))
    parser.add_argument("--out", type=Path)
    parser.add_argument("--table", type=Path, metavar="REPORT", help="print the docs' tables of a saved report and exit")
    args = parser.parse_args()
    if args.table:
        print(table(json.loads(args.table.read_text())))
        return
    report = {"benchmark": "conv_eval_kernel", "split": "validation (the test split is not read)",
              "kernel": "random-feature ConvNet NNGP: 3 blocks of 3x3 conv, ReLU, 2x2 average pooling; w_std sqrt 2, "
                        "b_std 0.1 (pipeline.kernels.conv_features)",
              "networks": {d: network_counts(d) for d in args.datasets},
              "preprocess": {d: preprocessing(d) for d in args.datasets}}
    emit(report, args.out)


if __name__ == "__main__":
    main()
