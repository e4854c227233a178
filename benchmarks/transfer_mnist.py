"""Do KIP supports, learned labels included, transfer to finite networks? (KIP paper, Sec. 4, FC networks.)

Four MNIST supports made with `kip distill` (FC NTK kernel, depth 1, 2000 Adam steps; 10 and 100
images; labels fixed and learned), stored in benchmarks/results/supports/ so anyone can re-score them
(missing ones are distilled with the same settings). Width-1024 one-hidden-layer ReLU networks are
trained on each, and with the same budget on class-balanced random real subsets of the same size
(one-hot labels centred, as KIP's initial labels; a fresh subset per seed).

1. Validation: every candidate training method in METHODS, on every support and on random subsets,
   scored on the pipeline's validation split (data.validation_fraction 0.1, seed 0: 6000
   class-balanced training images that KIP never used as targets or support images, and that the
   random subsets never contain).
2. Choice: the method with the best mean validation accuracy over the four KIP supports; separately,
   the method with the best mean over the random subsets (so the baseline gets its own best method).
3. Test: only those methods, on the 10k test split, once. Writes JSON (--out).

    python benchmarks/transfer_mnist.py [--val-seeds 3] [--test-seeds 3] [--out benchmarks/results/transfer_mnist.json]

"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
from _report import emit

from pipeline.artifacts import npz as artifacts
from pipeline.data.prepared import reprepare
from pipeline.distill import kip, krr
from pipeline.errors import UserError
from pipeline.evaluate import finite
from pipeline.kernels import functions as kernels
from pipeline.data.datasets import default_cache_dir
from pipeline.run.config import KernelConfig, TrainConfig

HERE = Path(__file__).resolve().parent
SUPPORTS_DIR = HERE / "results" / "supports"
# name -> (support_per_class, learn_labels, KIP learning rate); 2000 steps each, the CLI's other defaults.
SUPPORTS = {
    "mnist10_fixed": (1, False, 0.04),
    "mnist10_labels": (1, True, 0.04),
    "mnist100_fixed": (10, False, 0.01),
    "mnist100_labels": (10, True, 0.01),
}
KIP_STEPS = 2000

# Every field that differs between candidates is spelled out, so the list means the same whatever
# TrainConfig's defaults are. _XENT is the pipeline's default before this comparison.
_XENT = dict(parameterization="standard", loss="xent", optimizer="adam", learning_rate=1e-3, steps=1000, label_scale=1.0)
_NTK_SGD = dict(parameterization="ntk", optimizer="sgd", momentum=0.9, steps=500, label_scale=1.0)
# Candidate training methods. soft_xent's temperature is fitted per support (see fit_temperature).
METHODS = {
    "xent_standard_adam": TrainConfig(**_XENT),
    "soft_xent_standard_adam": TrainConfig(**{**_XENT, "loss": "soft_xent"}),
    "mse_ntk_sgd": TrainConfig(loss="mse", learning_rate=0.5, **{**_NTK_SGD, "steps": 1000}),  # uncentred: the old MSE option
    # Centred MSE on the support's labels; label_scale s fits s * labels (argmax unchanged): s = 1 is the
    # kernel regime at this width, larger s moves the network further from its initialisation.
    "mse_centered_ntk_sgd_x0.1": TrainConfig(loss="mse_centered", learning_rate=0.5, **{**_NTK_SGD, "label_scale": 0.1}),
    "mse_centered_ntk_sgd": TrainConfig(loss="mse_centered", learning_rate=0.5, **_NTK_SGD),
    "mse_centered_ntk_sgd_x3": TrainConfig(loss="mse_centered", learning_rate=0.5, **{**_NTK_SGD, "label_scale": 3.0}),
    "mse_centered_ntk_sgd_x10": TrainConfig(loss="mse_centered", learning_rate=0.5, **{**_NTK_SGD, "label_scale": 10.0}),
    "mse_centered_ntk_sgd_x10_lr0.1": TrainConfig(loss="mse_centered", learning_rate=0.1, **{**_NTK_SGD, "label_scale": 10.0, "steps": 1000}),
    "mse_centered_ntk_sgd_x30_lr0.1": TrainConfig(loss="mse_centered", learning_rate=0.1, **{**_NTK_SGD, "label_scale": 30.0, "steps": 1000}),
}


def fit_temperature(kernel_fn, images, labels, x_val, y_val, num_classes) -> float:
    """Platt scaling: the T minimising the validation cross-entropy of softmax(KRR prediction / T),
    KRR of the support with its own labels (RFAD's calibration). A grid in log space is enough."""
    k_ss = kernel_fn(images, images)
    alpha = krr.fit(k_ss, labels, 1e-6)
    pred = np.concatenate([np.asarray(krr.predict(kernel_fn(x_val[i:i + 1000], images), alpha))
                           for i in range(0, len(x_val), 1000)]).astype(np.float64)
    best = None
    for t in np.geomspace(0.003, 3.0, 61):
        z = pred / t
        z -= z.max(axis=1, keepdims=True)
        nll = float(np.mean(np.log(np.exp(z).sum(axis=1)) - z[np.arange(len(y_val)), y_val]))
        if best is None or nll < best[0]:
            best = (nll, float(t))
    return best[1]


def load_supports() -> dict:
    """The four supports; a missing one is distilled as `kip distill` would (the CLI's data defaults)."""
    SUPPORTS_DIR.mkdir(parents=True, exist_ok=True)
    out = {}
    for name, (per_class, learn, lr) in SUPPORTS.items():
        path = SUPPORTS_DIR / f"{name}.npz"
        if not path.exists():
            cmd = ["kip", "distill", "--support-per-class", str(per_class), "--steps", str(KIP_STEPS), "--lr", str(lr),
                   "-q", "-o", str(path)] + (["--learn-labels"] if learn else [])
            subprocess.run(cmd, check=True)
        out[name] = artifacts.load_npz(path)
    return out


def score(sets, names, x_eval, y_eval, split, method, seeds, kernel_fn, x_val, y_val, cache) -> dict:
    """Accuracy on (x_eval, y_eval) of `seeds` networks per set in `names`, trained with METHODS[method];
    sets: name -> per-seed (x, y, classes). A run that diverges counts as failed (accuracy NaN)."""
    config = replace(METHODS[method], eval_every=0)
    rows = {}
    for set_name in names:
        accs, temps = [], []
        for seed in range(seeds):
            key = f"{split}|{method}|{json.dumps(asdict(config), sort_keys=True)}|{set_name}|{seed}"
            if key not in cache.data:
                x, y, classes = sets[set_name](seed)
                c = config
                if c.loss == "soft_xent":
                    c = replace(c, temperature=fit_temperature(kernel_fn, x, y, x_val, y_val, 10))
                try:
                    acc = finite.train(x, y, classes, x_eval, y_eval, 10, c, seed).accuracy
                except UserError:  # diverged
                    acc = None
                cache.put(key, {"accuracy": acc, "temperature": c.temperature if c.loss == "soft_xent" else None})
            accs.append(cache.data[key]["accuracy"])
            temps.append(cache.data[key]["temperature"])
        ok = [a for a in accs if a is not None]
        rows[set_name] = {"accuracy": float(np.mean(ok)) if len(ok) == len(accs) else float("nan"),
                          "std": float(np.std(ok)) if ok else float("nan"), "per_seed": accs}
        if config.loss == "soft_xent":
            rows[set_name]["temperature"] = temps
        print(json.dumps({"split": split, "method": method, "set": set_name, **rows[set_name]}), file=sys.stderr, flush=True)
    return rows


class Cache:
    """Finished runs by (split, method, config, set, seed), so an interrupted benchmark resumes."""

    def __init__(self, path: Path | None):
        self.path = path
        self.data = json.loads(path.read_text()) if path and path.exists() else {}

    def put(self, key: str, value: dict) -> None:
        self.data[key] = value
        if self.path:
            self.path.write_text(json.dumps(self.data))


def _best(results: dict, names: list[str]) -> str:
    """The method with the highest mean accuracy over `names` (a failed set disqualifies it)."""
    mean = {m: float(np.mean([r[n]["accuracy"] for n in names])) for m, r in results.items()}
    return max((m for m in mean if np.isfinite(mean[m])), key=mean.get)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--val-seeds", type=int, default=3)
    parser.add_argument("--test-seeds", type=int, default=3)
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset of METHODS")
    parser.add_argument("--cache", type=Path, default=None, help="JSON of finished runs, to resume from")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()

    started = time.perf_counter()
    # The data exactly as the supports were distilled from it: the pipeline's validation split
    # (data.validation_fraction 0.1 of the training split, seed 0: 6000 class-balanced images that were
    # never KIP targets or support images) and the rest of the training split, in their preprocessing.
    supports = load_supports()
    assert len({s.transform.checksum() for s in supports.values()}) == 1
    assert len({json.dumps(s.metadata.get("validation"), sort_keys=True) for s in supports.values()}) == 1
    prepared = reprepare(supports["mnist100_labels"], cache_dir=default_cache_dir())
    x_val, y_val = prepared.x_val, prepared.y_val
    x_rest, y_rest = prepared.x_train, prepared.y_train  # random subsets come from here only
    x_test, y_test = prepared.x_test, prepared.y_test
    kernel_fn = kernels.make(KernelConfig())
    cache = Cache(args.cache)

    sets = {name: (lambda seed, s=s: (s.images, s.labels, s.classes)) for name, s in supports.items()}
    for per_class in (1, 10):
        def random_subset(seed, per_class=per_class):
            idx = kip.class_balanced_indices(y_rest, per_class, 10, np.random.default_rng([0, 3, seed]))
            return x_rest[idx], np.asarray(krr.centered_one_hot(y_rest[idx], 10)), y_rest[idx]
        sets[f"random{10 * per_class}"] = random_subset
    kip_sets = [name for name in sets if not name.startswith("random")]
    random_sets = [name for name in sets if name.startswith("random")]

    methods = args.methods.split(",")
    validation = {m: score(sets, list(sets), x_val, y_val, "validation", m, args.val_seeds, kernel_fn, x_val, y_val, cache)
                  for m in methods}
    mean_over = lambda m, names: float(np.mean([validation[m][n]["accuracy"] for n in names]))  # noqa: E731
    # One method for every KIP support (the candidate default), one for the random subsets, and the
    # best method for each set on its own (every set, KIP or random, gets the same tuning).
    chosen, chosen_random = _best(validation, kip_sets), _best(validation, random_sets)
    per_set = {n: _best(validation, [n]) for n in sets}

    plan: dict[str, list[str]] = {}
    for name in sets:
        for m in dict.fromkeys([chosen, per_set[name]] + ([chosen_random] if name in random_sets else [])):
            plan.setdefault(m, []).append(name)
    test = {m: score(sets, names, x_test, y_test, "test", m, args.test_seeds, kernel_fn, x_val, y_val, cache)
            for m, names in plan.items()}
    summary = {n: {"chosen": test[chosen][n]["accuracy"], "per_set_best": test[per_set[n]][n]["accuracy"],
                   "per_set_method": per_set[n]} for n in sets}
    for size in (10, 100):
        for mode in ("fixed", "labels"):
            name = f"mnist{size}_{mode}"
            summary[name]["random_same_method"] = test[chosen][f"random{size}"]["accuracy"]
            # the random subsets' own validation-chosen method (never the better of two test numbers)
            summary[name]["random_own_method"] = test[per_set[f"random{size}"]][f"random{size}"]["accuracy"]
    report = {
        "benchmark": "transfer_mnist",
        "kernel": asdict(KernelConfig()),
        "network": "fc, width 1024, depth 1",
        "supports": {name: {"path": str((SUPPORTS_DIR / f"{name}.npz").relative_to(HERE.parent)),
                            "support_per_class": pc, "learn_labels": learn, "kip_learning_rate": lr, "kip_steps": KIP_STEPS}
                     for name, (pc, learn, lr) in SUPPORTS.items()},
        "validation": {"images": len(y_val), "split": prepared.provenance["validation"], "seeds": args.val_seeds,
                       "results": validation,
                       "mean_over_kip_supports": {m: mean_over(m, kip_sets) for m in validation},
                       "mean_over_random_subsets": {m: mean_over(m, random_sets) for m in validation}},
        "chosen_for_kip_supports": chosen,
        "chosen_for_random_subsets": chosen_random,
        "chosen_per_set": per_set,
        "test": {"images": len(y_test), "seeds": args.test_seeds, "results": test, "summary": summary},
        "methods": {name: asdict(METHODS[name]) for name in validation},
        "total_seconds": round(time.perf_counter() - started, 1),
    }
    emit(report, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
